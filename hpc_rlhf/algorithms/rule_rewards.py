"""Rule-based rewards, importable by name as ``hpc_rlhf.algorithms.rule_rewards:<name>``.

A rule reward is ``fn(prompt_ids, response_ids, tokenizer, **kwargs) -> float``. A run
imports it by its ``module:function`` name (``load_rule``), which runs that module's code
like any Python import.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
from collections.abc import Callable
from typing import Any

import torch

from hpc_rlhf.config import InputError


class RuleRewardError(InputError, TypeError):
    """A rule reward returned something that is not one number."""


def target_token_fraction(
    prompt_ids, response_ids, tokenizer, target: str | list[str] = "the", others: bool = False
) -> float:
    """Fraction of response tokens equal to the token of ``target`` (or to any of a list of
    tokens): a toy task with a known optimum, 1.0, reached by emitting only those tokens.
    ``others``: the fraction of the other tokens instead (as a PPO-Lagrangian cost, it
    penalises every token but the targets)."""
    if not response_ids:
        return 0.0
    targets = [target] if isinstance(target, str) else list(target)
    ids = set()
    for name in targets:
        token_id = tokenizer.token_id(name) if hasattr(tokenizer, "token_id") else int(name)
        if token_id < 0:
            raise ValueError(f"target token {name!r} is not in the tokenizer's vocabulary")
        ids.add(token_id)
    hits = sum(1 for t in response_ids if (t in ids) != others)
    return hits / len(response_ids)


def answer_token_fraction(prompt_ids, response_ids, tokenizer, answer: str) -> float:
    """Fraction of response tokens that are the word the prompt names (its reference
    ``answer``, a prompt field: ``data.reference_fields: [answer]``): a verifiable toy task
    the tiny model can learn (``assets/tiny_repeat_prompts.jsonl``). The word is looked up
    as a word-initial piece (``"\u2581" + answer``) first, then as given."""
    piece = tokenizer.token_id("\u2581" + answer)
    if piece < 0:
        piece = tokenizer.token_id(answer)
    if piece < 0:
        raise ValueError(f"answer {answer!r} is not one token of the tokenizer's vocabulary")
    return target_id_fraction(prompt_ids, response_ids, tokenizer, piece)


def id_range_fraction(
    prompt_ids, response_ids, tokenizer=None, low: int = 0, high: int = 1
) -> float:
    """Fraction of response tokens with ``low <= id < high``: a dense toy signal (a random
    policy over ``V`` ids scores ``(high - low) / V`` from the first step)."""
    if not response_ids:
        return 0.0
    return sum(1 for t in response_ids if low <= t < high) / len(response_ids)


def target_id_fraction(prompt_ids, response_ids, tokenizer=None, target_id: int = 5) -> float:
    """Fraction of response tokens equal to ``target_id``."""
    if not response_ids:
        return 0.0
    return sum(1 for t in response_ids if t == target_id) / len(response_ids)


def load_rule(spec: str) -> Callable:
    """Import ``module:function``; errors name what could not be found."""
    if ":" not in spec:
        raise InputError(f"rule reward {spec!r} must be 'module:function'")
    module_name, fn_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a missing module, or the module's own code failing
        raise InputError(
            f"rule reward {spec!r}: cannot import {module_name!r} ({type(err).__name__}: {err})"
        ) from err
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise InputError(f"rule reward {spec!r}: {module_name} has no function {fn_name!r}")
    return fn


def check_rule_arguments(
    spec: str, fn: Callable, kwargs: dict, reference_fields: tuple[str, ...] = ()
) -> None:
    """Raise ``InputError`` before any step when ``fn`` (the rule named ``spec``) cannot be
    called with its config ``kwargs`` and the prompts' ``reference_fields``: a required
    argument nobody gives, an argument it does not take, or one given twice."""
    given = [*kwargs, *reference_fields]
    twice = sorted({name for name in given if given.count(name) > 1})
    if twice:
        raise InputError(
            f"rule reward {spec!r}: {twice} given both in its kwargs and data.reference_fields"
        )
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return
    named = params[3:]  # after (prompt_ids, response_ids, tokenizer)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in named):
        accepted = None
    else:
        accepted = {p.name for p in named}
    required = [
        p.name
        for p in named
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    ]
    missing = [name for name in required if name not in given]
    if missing:
        raise InputError(
            f"rule reward {spec!r} needs {missing}: give them in the rule's kwargs or as "
            "prompt fields (data.reference_fields)"
        )
    unknown = [name for name in given if accepted is not None and name not in accepted]
    if unknown:
        raise InputError(f"rule reward {spec!r} takes no argument {unknown}")


def rule_score(spec: str, value: Any) -> float:
    """The float a rule returned: a real number, or a tensor / array of one element.
    Anything else (None, a string, a tensor of several elements) raises ``TypeError``
    naming the rule ``spec`` and the value's type. NaN and inf pass (the trainer counts
    them over every source of scores)."""
    if isinstance(value, numbers.Real):
        return float(value)
    size = value.numel() if isinstance(value, torch.Tensor) else getattr(value, "size", None)
    if size == 1 and hasattr(value, "item") and isinstance(value.item(), numbers.Real):
        return float(value.item())
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise RuleRewardError(
        f"rule reward {spec!r} returned {type(value).__name__} {shown}: expected a number "
        "(a float, or a tensor/array of one element)"
    )
