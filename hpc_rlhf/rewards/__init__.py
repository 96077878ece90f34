"""Verifiable rewards: rules that check a response against the prompt's reference (a math
answer, unit tests), importable as ``module:function`` like every rule reward.

A rule is ``fn(prompt_ids, response_ids, tokenizer, **kwargs) -> float``, called once per
sample; the prompt row's ``data.reference_fields`` arrive as keyword arguments (a row
``{"prompt": ..., "answer": "42"}`` with ``reference_fields: [answer]`` calls
``fn(..., answer="42")``). A rule marked ``@batched_rule`` is called once per step with
lists instead (``prompt_ids``, ``response_ids`` and each reference field a list over the
samples, the config's kwargs as they are) and returns one float per sample: a verifier
that runs programs uses it to run them in parallel. These rules run code or solvers with
time limits, so they live here, not in the pure ``algorithms`` package.
"""

from __future__ import annotations

from collections.abc import Callable


def batched_rule(fn: Callable) -> Callable:
    """Mark ``fn`` as a batched rule (see the module docstring)."""
    fn.batched = True  # type: ignore[attr-defined]
    return fn


def is_batched(fn: Callable) -> bool:
    """Whether ``fn`` takes a whole step's samples at once."""
    return bool(getattr(fn, "batched", False))
