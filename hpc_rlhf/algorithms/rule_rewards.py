"""Rule-based rewards, importable by name as ``hpc_rlhf.algorithms.rule_rewards:<name>``.

A rule reward is ``fn(prompt_ids, response_ids, tokenizer, **kwargs) -> float``. A run
imports it by its ``module:function`` name (``load_rule``), which runs that module's code
like any Python import.
"""

from __future__ import annotations

import importlib
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
