"""Time-sharing round trip: release training state, generate, restore, train - bit-exact.

Two identical actors in one world take the same two train steps; between them the first
releases its optimizer state and gradient buffers, generates with its own weights in a
KV cache and restores. Every parameter after the second step must be ``torch.equal``.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_world
from tests.inference.common import CFG, build_actor, hf_causal_lm, hf_state, make_prompts


def _batches(seed: int) -> list:
    from hpc_rlhf.models.runner import MicroBatch

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (2, 17), generator=gen)
    return [
        MicroBatch.unpadded(tokens[:, :-1], labels_BS=tokens[:, 1:], loss_mask_BS=torch.ones(2, 16))
    ]


def _world(rank, world_size, hf_weights, prompts, distributed_optimizer):
    from hpc_rlhf.config import ParallelConfig
    from hpc_rlhf.inference.engine import GenerationConfig, GenerationEngine
    from hpc_rlhf.inference.memory import TrainingMemory, optimizer_state_tensors
    from hpc_rlhf.inference.sampling import SamplingParams

    parallel = ParallelConfig(use_distributed_optimizer=distributed_optimizer)
    state, shared = build_actor(CFG, parallel, hf_weights, trainable=True)
    _, plain = build_actor(CFG, parallel, hf_weights, trainable=True)

    from hpc_rlhf.trainer.losses import lm_loss_fn

    loss = lm_loss_fn(state.tp_group)

    for actor in (shared, plain):  # step 1 creates the optimizer state
        actor.train_step(_batches(0), loss)
    n_params = sum(p.numel() for p in shared.parameters_by_chunk()[0].parameters())
    memory = TrainingMemory(shared, move_host_state=True)  # the GPU path's round trip
    report = memory.release()
    res = {"optimizer_bytes": report.optimizer_bytes, "grad_bytes": report.grad_bytes}
    res["n_params"] = n_params
    res["state_sizes_during"] = sorted(
        {t.untyped_storage().nbytes() for t in optimizer_state_tensors(shared.optimizer)}
    )
    res["grad_sizes_during"] = sorted(
        {b.grad_data.untyped_storage().nbytes() for b in shared.model[0].buffers}
    )
    engine = GenerationEngine(shared, CFG, state, GenerationConfig(block_size=8))
    engine.sync_weights(1)
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8, seed=3))
    res["generated"] = sum(len(o.token_ids) for o in outs)
    memory.restore()
    for actor in (shared, plain):
        actor.train_step(_batches(1), loss)
    pairs = zip(
        shared.parameters_by_chunk()[0].parameters(), plain.parameters_by_chunk()[0].parameters()
    )
    res["params_equal"] = all(torch.equal(a, b) for a, b in pairs)
    states = zip(
        optimizer_state_tensors(shared.optimizer), optimizer_state_tensors(plain.optimizer)
    )
    res["optimizer_equal"] = all(torch.equal(a, b) for a, b in states)
    res["moved"] = not all(
        torch.equal(a, b)
        for a, b in zip(
            shared.parameters_by_chunk()[0].parameters(),
            build_actor(CFG, parallel, hf_weights)[1].parameters_by_chunk()[0].parameters(),
        )
    )
    # by default, host-resident optimizer state stays: copying host memory to the host
    # would free nothing; the gradient buffers are still released
    sizes = [t.untyped_storage().nbytes() for t in optimizer_state_tensors(plain.optimizer)]
    default = TrainingMemory(plain)
    report = default.release()
    res["default_report"] = (report.optimizer_bytes, report.grad_bytes > 0)
    res["default_state_kept"] = sizes == [
        t.untyped_storage().nbytes() for t in optimizer_state_tensors(plain.optimizer)
    ]
    default.restore()
    return res


@pytest.mark.parametrize("world_size,distributed_optimizer", [(1, False), (2, True)])
def test_time_sharing_round_trip_is_exact(world_size, distributed_optimizer):
    model = hf_causal_lm(CFG, seed=5)
    results = run_world(
        _world, world_size, hf_state(model), make_prompts(seed=6), distributed_optimizer
    )
    # Adam's two fp32 moments per parameter (+ step counters), sharded over the ranks by
    # the distributed optimizer; every rank's fp32 grad buffer (padded for sharding).
    n = results[0]["n_params"]
    optimizer_bytes = [r["optimizer_bytes"] for r in results]
    copies = 1 if distributed_optimizer else world_size
    assert 8 * n * copies <= sum(optimizer_bytes) <= 8 * n * copies + 4096 * world_size
    assert all(b > 0 for b in optimizer_bytes)
    for res in results:
        assert 4 * n <= res["grad_bytes"] <= 4 * n + 65536
        _check(res)


def _check(res: dict) -> None:
    assert res["state_sizes_during"] == [0]
    assert res["grad_sizes_during"] == [0]
    assert res["generated"] == 6 * 8
    assert res["params_equal"] is True
    assert res["optimizer_equal"] is True
    assert res["moved"] is True  # the steps did change the weights
    assert res["default_report"] == (0, True) and res["default_state_kept"] is True
