"""Rule rewards used only by the tests."""

from __future__ import annotations

from hpc_rlhf.rewards import batched_rule

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


def answer_length(prompt_ids, response_ids, tokenizer, answer: str) -> float:
    """The length of the prompt's reference ``answer`` (a prompt field)."""
    return float(len(answer))


def global_rank(prompt_ids, response_ids, tokenizer, **references) -> float:
    """This process's rank in the world (a rule whose value differs between ranks)."""
    import torch.distributed as dist

    return float(dist.get_rank())


def fail_on_first_rank(prompt_ids, response_ids, tokenizer, **references) -> float:
    """Raises on global rank 0 only."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        raise ValueError("rule failed on rank 0")
    return 0.0


@batched_rule
def batched_answer_lengths(prompt_ids, response_ids, tokenizer, answer, scale=1.0, short=False):
    """Per sample: ``scale * len(answer) + len(response)``, computed once for the batch;
    ``short`` returns one score too few."""
    scores = [scale * len(a) + len(r) for a, r in zip(answer, response_ids)]
    return scores[:-1] if short else scores
