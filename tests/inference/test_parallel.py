"""Tensor- and pipeline-parallel generation equals the unsharded model.

* TP=2 (gloo): greedy tokens equal ``transformers`` (hence TP=1), and a seeded sampling run
  gives the same tokens as the TP=1 engine (vocab-parallel logits are all-gathered, every
  TP rank samples the same token with the same generator).
* TP=2 x PP=2 training layout (also with 2 virtual stages), handed to a TP=2 engine: each
  rank gathers all layers of its TP shard along the pipeline group; greedy tokens equal the
  unsharded model's on every rank; the policy version stamp is enforced.
"""

from __future__ import annotations

import dataclasses

import pytest

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


def _generate_all(engine, prompts):
    from hpc_rlhf.inference.sampling import SamplingParams

    greedy = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=MAX_NEW))
    sampled = engine.generate(prompts, SamplingParams(**SAMPLING))
    return {
        "greedy": [o.token_ids for o in greedy],
        "sampled": [o.token_ids for o in sampled],
        "sampled_logprobs": [o.logprobs for o in sampled],
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
    return out


def _world(rank, world_size, layouts, hf_weights, prompts):
    """Run the engine in each (tp, pp[, vpp]) layout in turn (groups are rebuilt each time)."""
    return [_layout_run(*layout[:2], hf_weights, prompts, *layout[2:]) for layout in layouts]


@pytest.fixture(scope="module")
def reference():
    model = hf_causal_lm(CFG, seed=3)
    prompts = make_prompts(seed=4)
    return hf_state(model), prompts, hf_greedy(model, prompts, MAX_NEW)


def test_tp2_equals_tp1(reference):
    weights, prompts, ref = reference
    # One 2-rank world: TP=1 (two data-parallel replicas), then TP=2.
    results = run_world(_world, 2, [(1, 1), (2, 1)], weights, prompts)
    tp1 = results[0][0]
    assert all(r[0] == tp1 for r in results)
    assert tp1["greedy"] == ref
    for _, rank_out in results:
        assert rank_out["greedy"] == ref
        assert rank_out["sampled"] == tp1["sampled"]
        assert rank_out["in_place"] is True
        assert rank_out["kept_after_release"] is True
        diff = max(
            abs(a - b)
            for xs, ys in zip(rank_out["sampled_logprobs"], tp1["sampled_logprobs"])
            for a, b in zip(xs, ys)
        )
        assert diff <= 1e-4


def test_tp2_pp2_training_layout_to_tp2_engine(reference):
    weights, prompts, ref = reference
    # TP=2 x PP=2, then with two virtual stages per rank (interleaved layer order).
    per_rank = run_world(_world, 4, [(2, 2), (2, 2, 2)], weights, prompts)
    for results in zip(*per_rank):
        for rank_out in results:
            assert rank_out["greedy"] == ref
            assert rank_out["in_place"] is False
            assert rank_out["kept_after_release"] is False
            assert rank_out["layers"] == CFG.num_layers
        assert all(r["sampled"] == results[0]["sampled"] for r in results)
