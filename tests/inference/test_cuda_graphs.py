"""CUDA-graph decode (``GenerationConfig.cuda_graphs``) against eager decode on a GPU with
flash-attn; on the CPU the engine refuses the setting with a clear error."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.dist import run_world
from tests.inference.common import CFG, build_actor, hf_causal_lm, hf_state, make_prompts

GPU_READY = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def _graphs_vs_eager(rank, world_size, hf_weights, prompts):
    from hpc_rlhf.config import ParallelConfig
    from hpc_rlhf.inference.engine import GenerationConfig, GenerationEngine
    from hpc_rlhf.inference.sampling import SamplingParams

    state, actor = build_actor(CFG, ParallelConfig(), hf_weights)
    if torch.cuda.is_available():
        for chunk in actor.parameters_by_chunk():
            chunk.cuda()
    out = {}
    for graphs in (False, True):
        config = GenerationConfig(block_size=16, cache_budget_blocks=200, cuda_graphs=graphs)
        engine = GenerationEngine(actor, CFG, state, config)
        engine.sync_weights(0)
        sampling = SamplingParams(temperature=0.8, max_new_tokens=10, seed=3)
        outs = engine.generate(prompts, sampling)
        out[graphs] = ([o.token_ids for o in outs], [o.logprobs for o in outs])
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_READY, reason="needs a CUDA GPU and flash-attn")
def test_cuda_graph_decode_matches_eager():
    (out,) = run_world(_graphs_vs_eager, 1, hf_state(hf_causal_lm(CFG)), make_prompts())
    assert out[True][0] == out[False][0]
    for got, want in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)


def _refused_on_cpu(rank, world_size, hf_weights):
    from hpc_rlhf.config import ParallelConfig
    from hpc_rlhf.inference.engine import GenerationConfig, GenerationEngine

    state, actor = build_actor(CFG, ParallelConfig(), hf_weights)
    with pytest.raises(RuntimeError, match="cuda_graphs needs a CUDA device"):
        GenerationEngine(actor, CFG, state, GenerationConfig(cuda_graphs=True))
    return True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cuda_graphs_refused_on_cpu():
    assert run_world(_refused_on_cpu, 1, hf_state(hf_causal_lm(CFG))) == [True]
