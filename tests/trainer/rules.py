"""Rule rewards used only by the tests."""

from __future__ import annotations

_CALLS = {"n": 0}


def nan_after(prompt_ids, response_ids, tokenizer, after_calls: int = 0) -> float:
    """0.5 for the first ``after_calls`` calls of this process, NaN afterwards."""
    _CALLS["n"] += 1
    return float("nan") if _CALLS["n"] > after_calls else 0.5


def response_length(prompt_ids, response_ids, tokenizer) -> float:
    """Number of response tokens (deterministic, easy to check)."""
    return float(len(response_ids))


def fail_after(prompt_ids, response_ids, tokenizer, after_calls: int = 0) -> float:
    """0.0 for the first ``after_calls`` calls of this process, then an error (a run
    interrupted mid-stage)."""
    _CALLS["n"] += 1
    if _CALLS["n"] > after_calls:
        raise RuntimeError("interrupted by tests.trainer.rules:fail_after")
    return 0.0
