"""Optimizer steps with megatron-core's DDP (plain and distributed optimizer) reduce the loss,
match the single-process run, and a checkpoint of model + optimizer + scheduler + RNG
reloads into an identical next step."""

from __future__ import annotations

import os

import pytest
import torch

from hpc_rlhf.config import ParallelConfig
from hpc_rlhf.trainer.losses import lm_loss_fn
from tests.dist import run_world
from tests.parallel.common import (
    TINY,
    build_trainable,
    dp_share,
    lm_microbatches,
    random_hf_state,
)

STEPS = 4


def _train_save_resume(rank, world, parallel: ParallelConfig, ckpt_root: str):
    from hpc_rlhf.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    state, trainable = build_trainable(TINY, parallel, random_hf_state(TINY), lr=3e-3)
    batches = lm_microbatches(4, 2, 16, TINY.vocab_size)
    mine = dp_share(batches, state.dp_rank, state.dp_size)

    def step():
        return trainable.train_step(mine, lm_loss_fn(state.tp_group))

    losses = [step().metrics["loss"] for _ in range(STEPS)]
    save_checkpoint(ckpt_root, STEPS, state, {"actor": trainable}, {"data_position": 7})
    torch.manual_seed(1000 + rank)  # disturb the global RNG (its restore: test_resume_layouts)
    after = step()
    params_after = trainable.gather_hf_state()
    # Resume in place: the loaded state must reproduce the same next step exactly.
    trainer_state = load_checkpoint(latest_checkpoint(ckpt_root), state, {"actor": trainable})
    again = step()
    params_again = trainable.gather_hf_state()
    return {
        "losses": losses,
        "after": (after.metrics["loss"], after.grad_norm, after.lr),
        "again": (again.metrics["loss"], again.grad_norm, again.lr),
        "params_equal": None
        if params_after is None
        else all(torch.equal(params_after[k], params_again[k]) for k in params_after),
        "trainer_state": trainer_state,
    }


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_world(_train_save_resume, 1, ParallelConfig(), str(tmp_path_factory.mktemp("c1")))


@pytest.mark.parametrize(
    "world,parallel",
    [
        (4, ParallelConfig(tensor_model_parallel_size=2, use_distributed_optimizer=True)),
        (4, ParallelConfig(pipeline_model_parallel_size=2, use_distributed_optimizer=False)),
    ],
    ids=["tp2_dp2_distopt", "pp2_dp2"],
)
def test_steps_reduce_loss_match_single_process_and_resume_exactly(
    single, tmp_path, world, parallel
):
    results = run_world(_train_save_resume, world, parallel, str(tmp_path))
    ref = single[0]
    first = results[0]
    losses = first["losses"]
    assert losses[-1] < losses[0] - 0.05, f"loss did not fall: {losses}"
    for ours, theirs in zip(losses, ref["losses"]):
        assert abs(ours - theirs) <= 1e-5 * abs(theirs)
    assert first["again"] == first["after"]
    assert first["params_equal"] is True
    assert first["trainer_state"]["data_position"] == 7
    assert first["trainer_state"]["step"] == STEPS
    assert os.path.exists(tmp_path / "latest")
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_single_process_resume_is_exact(single):
    ref = single[0]
    assert ref["again"] == ref["after"] and ref["params_equal"] is True
    assert ref["losses"][-1] < ref["losses"][0]


def test_fused_cpu_adam_switch_gives_the_same_update():
    from types import SimpleNamespace

    from hpc_rlhf.trainer.trainable_model import _use_fused_cpu_adam

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(300, 70, generator=gen), torch.randn(70, generator=gen)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(3)]

    def run(switch: bool):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        chained = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=opt)])
        switched = _use_fused_cpu_adam(chained) if switch else 0
        with torch.profiler.profile() as prof:
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                opt.step()
        ops = {e.name for e in prof.events()}
        return switched, "aten::_fused_adamw_" in ops, [p.detach() for p in params]

    n, fused_kernel_ran, got = run(True)
    _, default_ran_fused, want = run(False)
    assert n == 1 and fused_kernel_ran and not default_ran_fused
    for g, w, p0 in zip(got, want, init):
        assert not torch.allclose(g, p0)  # the parameters did move
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
