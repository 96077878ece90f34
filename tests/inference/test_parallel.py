"""Tensor- and pipeline-parallel generation equals the unsharded model.

* TP=2 (gloo): greedy tokens equal ``transformers`` (hence TP=1), and a seeded sampling run
  gives the same tokens as the TP=1 engine (vocab-parallel logits are all-gathered, every
  TP rank samples the same token with the same generator).
* TP=2 x PP=2 training layout (also with 2 virtual stages), handed to a TP=2 engine: each
  rank gathers all layers of its TP shard along the pipeline group; greedy tokens equal the
  unsharded model's on every rank, and seeded sampling (the policy at temperature 1, and
  top-k/top-p at temperature 0.9) gives the TP=1 engine's tokens and log-probs; the policy
  version stamp is enforced, and a released gathered copy cannot generate.

Why exact token equality under sampling is expected here: the layouts compute the same fp32
logits up to summation order (TP splits the attention heads and the FFN columns, and the
row-parallel partial sums meet in an all-reduce), i.e. differences of a few ulps
(~1e-6 measured on the log-probs). A sampled token changes only if its uniform lands within
that distance of a boundary of the cumulative distribution: ~1e-6 per draw, ~1e-4 over the
120 draws of a run; the weights are scaled up (``hf_causal_lm``), so greedy near-ties are
rare too. The seeds are fixed, so the outcome is deterministic on a given machine.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist import run_world
from tests.inference import common
from tests.inference.common import (
    build_actor,
    hf_causal_lm,
    hf_greedy,
    hf_state,
    make_prompts,
)

CFG = dataclasses.replace(common.CFG, num_layers=4)  # PP=2 x 2 virtual stages: 1 layer each
MAX_NEW = 10
SAMPLING = dict(temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=MAX_NEW, seed=11, n=2)
# PPO's rollout: the policy itself (temperature 1, no truncation), seeded
POLICY_SAMPLING = dict(temperature=1.0, max_new_tokens=MAX_NEW, seed=12, n=2)
# Log-probs of layouts that differ in fp32 summation order: 2 (the token's logit and the
# log-sum-exp) x 5 sequential reductions (4 layers + LM head) x sqrt(128) (rounding of the
# longest, FFN, reduction growing as a random walk) x eps32 x 8 (magnitude of the logits
# of these scaled-up random weights) = 1.1e-4; measured differences are ~1.5e-6, while a
# wrong shard or layer order moves log-probs by O(0.1).
LOGPROB_TOL = 2 * 5 * 128**0.5 * torch.finfo(torch.float32).eps * 8


def _generate_all(engine, prompts):
    from hpc_rlhf.inference.sampling import SamplingParams

    greedy = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=MAX_NEW))
    sampled = engine.generate(prompts, SamplingParams(**SAMPLING))
    policy = engine.generate(prompts, SamplingParams(**POLICY_SAMPLING))
    return {
        "greedy": [o.token_ids for o in greedy],
        "sampled": [o.token_ids for o in sampled],
        "sampled_logprobs": [o.logprobs for o in sampled],
        "policy": [o.token_ids for o in policy],
        "policy_logprobs": [o.logprobs for o in policy],
        "policy_sampling_logprobs": [o.sampling_logprobs for o in policy],
    }


def _layout_run(tp, pp, hf_weights, prompts, vpp=None):
    from hpc_rlhf.config import ParallelConfig
    from hpc_rlhf.inference.engine import GenerationConfig, GenerationEngine
    from hpc_rlhf.inference.sampling import SamplingParams
    from hpc_rlhf.inference.weights import StaleWeightsError

    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    state, actor = build_actor(CFG, parallel, hf_weights)
    engine = GenerationEngine(actor, CFG, state, GenerationConfig(block_size=8))
    engine.sync_weights(version=5)
    out = _generate_all(engine, prompts)
    out["in_place"] = engine.weights.in_place
    out["layers"] = len(engine.weights.layers)
    with pytest.raises(StaleWeightsError):
        engine.generate(prompts, SamplingParams(greedy=True), policy_version=4)
    engine.release_weights()  # drops a gathered copy (PP>1); keeps in-place weights
    out["kept_after_release"] = engine.weights is not None
    if not out["kept_after_release"]:
        with pytest.raises(StaleWeightsError, match="call sync_weights"):
            engine.generate(prompts, SamplingParams(greedy=True), policy_version=5)
    return out


def _world(rank, world_size, layouts, hf_weights, prompts):
    """Run the engine in each (tp, pp[, vpp]) layout in turn (groups are rebuilt each time)."""
    return [_layout_run(*layout[:2], hf_weights, prompts, *layout[2:]) for layout in layouts]


@pytest.fixture(scope="module")
def reference():
    model = hf_causal_lm(CFG, seed=3)
    prompts = make_prompts(seed=4)
    return hf_state(model), prompts, hf_greedy(model, prompts, MAX_NEW)


def _max_diff(xss, yss) -> float:
    """Largest difference between two lists of per-sequence log-prob lists."""
    return max(abs(a - b) for xs, ys in zip(xss, yss) for a, b in zip(xs, ys))


def _assert_same_samples(got: dict, tp1: dict) -> None:
    """Seeded sampling of a layout equals the TP=1 engine's: tokens exactly, log-probs
    within ``LOGPROB_TOL``."""
    for run in ("sampled", "policy"):
        assert got[run] == tp1[run], run
    assert _max_diff(got["sampled_logprobs"], tp1["sampled_logprobs"]) <= LOGPROB_TOL
    for key in ("policy_logprobs", "policy_sampling_logprobs"):
        assert _max_diff(got[key], tp1[key]) <= LOGPROB_TOL, key


def test_tp2_equals_tp1(reference):
    weights, prompts, ref = reference
    # One 2-rank world: TP=1 (two data-parallel replicas), then TP=2.
    results = run_world(_world, 2, [(1, 1), (2, 1)], weights, prompts)
    tp1 = results[0][0]
    assert all(r[0] == tp1 for r in results)
    assert tp1["greedy"] == ref
    # untruncated sampling at temperature 1: the sampling law is the policy
    assert tp1["policy_sampling_logprobs"] == tp1["policy_logprobs"]
    for _, rank_out in results:
        assert rank_out["greedy"] == ref
        _assert_same_samples(rank_out, tp1)
        assert rank_out["in_place"] is True
        assert rank_out["kept_after_release"] is True


def test_tp2_pp2_training_layout_to_tp2_engine(reference):
    weights, prompts, ref = reference
    # One 4-rank world: TP=1 (four replicas, the reference), then TP=2 x PP=2, then with two
    # virtual stages per rank (interleaved layer order).
    per_rank = run_world(_world, 4, [(1, 1), (2, 2), (2, 2, 2)], weights, prompts)
    tp1 = per_rank[0][0]
    assert all(r[0] == tp1 for r in per_rank)
    for rank_results in per_rank:
        for rank_out in rank_results[1:]:
            assert rank_out["greedy"] == ref
            _assert_same_samples(rank_out, tp1)
            assert rank_out["in_place"] is False
            assert rank_out["kept_after_release"] is False
            assert rank_out["layers"] == CFG.num_layers
