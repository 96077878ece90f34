"""The batching limits bind and change nothing: ``max_running_seqs`` / ``max_prefill_tokens``.

One engine with generous limits is the reference; engines whose limits are smaller than
the workload (fewer running slots than prompts, a prefill token budget smaller than the
batch of prompts and than single prompts, more samples per prompt than running slots)
must produce the same token ids and log-probs, greedy and seeded-sampled. Only the batch
shapes differ between the runs, so log-probs may differ by fp32 rounding of the logits.

A prompt (or a preempted sequence's prompt + tokens) longer than ``max_prefill_tokens`` is
prefilled whole, alone in its batch (the scheduler always admits the head of the queue into
an empty batch): the budget is a batching limit, not a cap on one prompt's length. The
test pins that: every multi-prompt prefill batch fits the budget, only single-prompt
batches exceed it, and generation finishes with the reference output.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_world
from tests.inference.common import CFG, build_actor, hf_causal_lm, hf_state, make_prompts

MAX_NEW = 8
# Longer than the prefill budgets below (11, 17, 24 > 10), more prompts than running slots.
LENS = (5, 11, 3, 17, 8, 24, 2, 9)
SAMPLED = dict(temperature=1.0, top_k=40, top_p=0.9, max_new_tokens=MAX_NEW, seed=5)
LIMITS = {
    "running=1": dict(max_running_seqs=1),
    "running=3": dict(max_running_seqs=3),
    "prefill=10": dict(max_prefill_tokens=10),  # below 3 of the prompts alone
    "prefill=1": dict(max_prefill_tokens=1),  # every prompt exceeds it
    # + a pool of 10 blocks of 4 tokens: two long sequences do not fit, one is preempted
    "both": dict(max_running_seqs=2, max_prefill_tokens=12, cache_budget_blocks=10),
}
# fp32 logits of one token computed in batches of different shapes (GEMM blocking, packed
# prefill vs decode) differ in summation order only: 2 (the token's logit and the
# log-sum-exp) x 3 sequential reductions (2 layers + LM head) x sqrt(128) (the longest, FFN,
# reduction's rounding as a random walk) x eps32 x 8 (magnitude of these logits) = 6.5e-5.
# Measured: 0 to 5e-7; a token fed at a wrong position or a wrong cache slot moves O(0.1).
LOGPROB_TOL = 2 * 3 * 128**0.5 * torch.finfo(torch.float32).eps * 8


def _recorded(engine) -> dict:
    """Wrap the engine's prefill / decode steps to record the batches they get."""
    seen: dict = {"prefill": [], "decode": []}
    prefill, decode = engine._prefill, engine._decode

    def record_prefill(items, sampling, sched):
        seen["prefill"].append([len(item.tokens) for item in items])
        return prefill(items, sampling, sched)

    def record_decode(seqs, sampling, sched):
        seen["decode"].append(len(seqs))
        return decode(seqs, sampling, sched)

    engine._prefill, engine._decode = record_prefill, record_decode
    return seen


def _outputs(outs) -> dict:
    return {
        "tokens": [(o.prompt_index, o.sample_index, o.token_ids) for o in outs],
        "logprobs": [o.logprobs for o in outs],
        "sampling_logprobs": [o.sampling_logprobs for o in outs],
    }


def _world(rank, world_size, weights, prompts):
    from hpc_rlhf.config import ParallelConfig
    from hpc_rlhf.inference.engine import GenerationConfig, GenerationEngine
    from hpc_rlhf.inference.sampling import SamplingParams

    state, actor = build_actor(CFG, ParallelConfig(), weights)
    runs = {
        "greedy": SamplingParams(greedy=True, max_new_tokens=MAX_NEW),
        "sampled": SamplingParams(**SAMPLED),
        "sampled_n3": SamplingParams(**{**SAMPLED, "n": 3}),
    }
    res: dict = {}
    for name, limits in {"reference": {}, **LIMITS}.items():
        config = GenerationConfig(**{"block_size": 4, "cache_budget_blocks": 400, **limits})
        engine = GenerationEngine(actor, CFG, state, config)
        engine.sync_weights(0)
        seen = _recorded(engine)
        res[name] = {run: _outputs(engine.generate(prompts, p)) for run, p in runs.items()}
        res[name]["batches"] = seen
        res[name]["preemptions"] = engine.stats.preemptions
    return res


@pytest.fixture(scope="module")
def results():
    model = hf_causal_lm(CFG)
    prompts = make_prompts(LENS, seed=6)
    (res,) = run_world(_world, 1, hf_state(model), prompts)
    return prompts, res


@pytest.mark.parametrize("limits", list(LIMITS))
def test_limited_engine_equals_unlimited(results, limits):
    _, res = results
    ref, got = res["reference"], res[limits]
    for run in ("greedy", "sampled", "sampled_n3"):
        assert got[run]["tokens"] == ref[run]["tokens"], (limits, run)
        for key in ("logprobs", "sampling_logprobs"):
            diff = max(
                abs(a - b) for xs, ys in zip(got[run][key], ref[run][key]) for a, b in zip(xs, ys)
            )
            assert diff <= LOGPROB_TOL, (limits, run, key, diff)


@pytest.mark.parametrize("limits", list(LIMITS))
def test_limits_bind(results, limits):
    """Decode batches never exceed ``max_running_seqs``; a prefill batch exceeds the token
    budget only when it is a single prompt; both limits actually constrained the run."""
    prompts, res = results
    cfg = {"max_running_seqs": 256, "max_prefill_tokens": 8192, **LIMITS[limits]}
    batches = res[limits]["batches"]
    assert max(batches["decode"]) <= cfg["max_running_seqs"]
    for lens in batches["prefill"]:
        assert len(lens) == 1 or sum(lens) <= cfg["max_prefill_tokens"], lens
    if "max_running_seqs" in LIMITS[limits]:
        assert max(batches["decode"]) == cfg["max_running_seqs"]
    if "max_prefill_tokens" in LIMITS[limits]:
        # prompts longer than the budget were admitted (alone) and prefilled whole
        too_long = [n for n in map(len, prompts) if n > cfg["max_prefill_tokens"]]
        assert too_long and all([n] in batches["prefill"] for n in too_long)
    if "cache_budget_blocks" in LIMITS[limits]:
        assert res[limits]["preemptions"] > 0
    ref = res["reference"]["batches"]
    assert len(ref["prefill"]) == 3  # unlimited: one prefill batch per generate() call
    assert len(batches["prefill"]) > 3
