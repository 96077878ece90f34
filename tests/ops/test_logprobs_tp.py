"""Vocab-parallel token_logprobs on gloo worlds equals the single-process result.

World 2: TP=2 with the torch, cpp and (under the interpreter) triton backends. World 4: TP=4
over the world and TP=2 over the subgroups {0, 1} and {2, 3} (rank within the group).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_fresh_world, run_world
from tests.ops._common import oracle_logprobs

V = 1204  # 4 * 301: odd shards
SHAPE = (2, 3)


def _data(dtype):
    gen = torch.Generator().manual_seed(123)
    logits = (torch.randn(*SHAPE, V, generator=gen) * 4).to(dtype)
    labels = torch.randint(0, V, SHAPE, generator=gen)
    labels[0, 0], labels[1, 2] = 0, V - 1  # first and last shard own a label
    return logits, labels, torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)


def _shard_run(logits, labels, g_lp, g_ent, group, backend):
    from hpc_rlhf.ops import token_logprobs

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    v_local = V // size
    local = logits[..., rank * v_local : (rank + 1) * v_local].clone().requires_grad_(True)
    logp, ent = token_logprobs(local, labels, tp_group=group, return_entropy=True, backend=backend)
    ((logp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return logp, ent, local.grad


def _worker(rank, world, backends, interpret):
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    out = {}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])] if world == 4 else []
    for dtype in (torch.float32, torch.bfloat16):
        data = _data(dtype)
        for backend in backends:
            if backend == "triton" and dtype == torch.bfloat16:
                continue  # keep the interpreter run short
            out[(str(dtype), backend, world)] = _shard_run(*data, dist.group.WORLD, backend)
            if pairs:
                out[(str(dtype), backend, 2)] = _shard_run(*data, pairs[rank // 2], backend)
    return out


def _check(results, world, tp):
    ranks = range(tp) if world == tp else range(world)
    for key in results[0]:
        dtype_name, backend, size = key
        if size != tp:
            continue
        dtype = torch.float32 if dtype_name == str(torch.float32) else torch.bfloat16
        logits, labels, g_lp, g_ent = _data(dtype)
        ref_lp, ref_ent, ref_grad = oracle_logprobs(logits, labels, g_lp, g_ent)
        single = _shard_single(logits, labels, g_lp, g_ent, backend)
        groups = [list(ranks)] if world == tp else [[0, 1], [2, 3]]
        for members in groups:
            parts = [results[r][key] for r in members]
            grad = torch.cat([p[2] for p in parts], dim=-1)
            for logp, ent, _ in parts:
                torch.testing.assert_close(logp, single[0], atol=2e-6, rtol=1e-6)
                torch.testing.assert_close(ent, single[1], atol=2e-6, rtol=1e-6)
                torch.testing.assert_close(logp.double(), ref_lp, atol=1e-4, rtol=1e-6)
                torch.testing.assert_close(ent.double(), ref_ent, atol=1e-4, rtol=1e-6)
            torch.testing.assert_close(grad.float(), single[2].float(), atol=1e-6, rtol=1e-2)
            assert grad.dtype == dtype


def _shard_single(logits, labels, g_lp, g_ent, backend):
    from hpc_rlhf.ops import token_logprobs

    be = "torch" if backend == "triton" else backend  # parent is not in the interpreter
    x = logits.clone().requires_grad_(True)
    logp, ent = token_logprobs(x, labels, return_entropy=True, backend=be)
    ((logp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return logp, ent, x.grad


def _backends():
    from hpc_rlhf.ops import _backend

    return ["torch"] + (["cpp"] if _backend.extension() is not None else [])


def test_tp2_matches_single_process():
    from hpc_rlhf.ops import _backend

    backends = _backends() + (["triton"] if _backend.triton_installed() else [])
    results = run_fresh_world(_worker, 2, backends, True)  # TRITON_INTERPRET before imports
    assert {k[1] for k in results[0]} == set(backends)
    _check(results, world=2, tp=2)


@pytest.mark.parametrize("tp", [4, 2])
def test_tp4_world_matches_single_process(tp, tp4_results):
    _check(tp4_results, world=4, tp=tp)


@pytest.fixture(scope="module")
def tp4_results():
    return run_world(_worker, 4, _backends(), False)
