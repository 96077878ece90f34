"""The engine on bf16 weights (a ``model.params_dtype: bf16`` actor, as every cluster config
runs): a bf16 KV cache by default and an fp32 one when ``cache_dtype: fp32`` asks for it,
greedy tokens that are the teacher-forced bf16 forward's argmax, and returned log-probs
computed in fp32 from the bf16 logits.

Tolerances. Decoding with a KV cache and the teacher-forced forward round in bf16 at other
points (per-step vs full-sequence matmuls, the cache's own rounding), so their logits
differ by about a bf16 ulp of the logits' size (0.06 for logits of magnitude 8-16). A
greedy token must be within ``TIE`` of the teacher-forced maximum (an argmax among
near-ties may flip; a wrong token lies whole units below), and log-probs within ``LOGP``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist import run_world
from tests.inference.common import CFG, build_actor, hf_causal_lm, hf_state, make_prompts
from tests.inference.test_engine import teacher_forced_logits

BF16 = dataclasses.replace(CFG, params_dtype="bf16")
MAX_NEW = 12
TIE, LOGP = 0.0625, 0.05  # measured: 0.008 and 0.015 (bf16 cache), 0.008 (fp32 cache)


def _checks(actor, prompts, outs) -> dict:
    """The worst greedy margin below the teacher-forced maximum and the worst log-prob error."""
    margin, logp_err = 0.0, 0.0
    for out in outs:
        logits_NV = teacher_forced_logits(actor, prompts[out.prompt_index], out.token_ids)
        tokens_N = torch.tensor(out.token_ids)
        chosen_N = logits_NV.gather(1, tokens_N[:, None])[:, 0]
        margin = max(margin, float((logits_NV.max(dim=1).values - chosen_N).max()))
        want_N = torch.log_softmax(logits_NV, dim=-1).gather(1, tokens_N[:, None])[:, 0]
        logp_err = max(logp_err, float((torch.tensor(out.logprobs) - want_N).abs().max()))
    return {"margin": margin, "logp_err": logp_err}


def _world(rank, world, weights, prompts):
    from hpc_rlhf.config import ParallelConfig
    from hpc_rlhf.inference.engine import GenerationConfig, GenerationEngine
    from hpc_rlhf.inference.sampling import SamplingParams

    state, actor = build_actor(BF16, ParallelConfig(), weights)
    out = {}
    for cache_dtype in ("auto", "fp32"):
        config = GenerationConfig(
            block_size=4, cache_budget_blocks=400, cache_dtype=cache_dtype, keep_cache=True
        )
        engine = GenerationEngine(actor, BF16, state, config)
        engine.sync_weights(0)
        outs = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=MAX_NEW))
        out[cache_dtype] = {
            "weights": {str(t.dtype) for t in engine.weights.tensors()},
            "cache": str(engine.cache.k_LN.dtype),
            "backend": engine.backend,
            "tokens": [o.token_ids for o in outs],
            **_checks(actor, prompts, outs),
        }
    return out


@pytest.fixture(scope="module")
def bf16_engine():
    weights = {k: v.to(torch.bfloat16) for k, v in hf_state(hf_causal_lm(CFG)).items()}
    return run_world(_world, 1, weights, make_prompts())[0]


@pytest.mark.parametrize(
    "cache_dtype,expected,backend",
    [("auto", "torch.bfloat16", "cpp"), ("fp32", "torch.float32", "cpp")],
)
def test_bf16_engine_cache_dtype_greedy_tokens_and_fp32_logprobs(
    bf16_engine, cache_dtype, expected, backend
):
    res = bf16_engine[cache_dtype]
    assert res["weights"] == {"torch.bfloat16"}  # generation reads the bf16 weights
    assert res["cache"] == expected
    assert res["backend"] == backend  # the C++ kernels take either cache
    assert all(len(t) == MAX_NEW for t in res["tokens"])
    assert res["margin"] <= TIE, res
    assert res["logp_err"] <= LOGP, res


def test_bf16_and_fp32_caches_mostly_agree(bf16_engine):
    """Same weights, caches rounded differently: the greedy continuations share most of
    their tokens (an early near-tie can fork one sequence, not all)."""
    a, b = bf16_engine["auto"]["tokens"], bf16_engine["fp32"]["tokens"]
    same = sum(x == y for ta, tb in zip(a, b) for x, y in zip(ta, tb))
    assert same >= 0.6 * sum(len(t) for t in a), (a, b)
