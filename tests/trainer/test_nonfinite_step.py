"""A NaN/inf gradient norm stops ``train_step`` *before* the optimizer applies it: the
weights, the Adam moments and the LR schedule are those of the last good step, and the
next good step is the one a run without the bad step would have taken (TP=2 and a
distributed optimizer over DP=2, where the norm is a cross-rank reduction)."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.config import ParallelConfig
from hpc_rlhf.trainer.losses import lm_loss_fn
from tests.dist import run_world
from tests.parallel.common import TINY, build_trainable, dp_share, lm_microbatches, random_hf_state


def _nan_gradient_loss(tp_group):
    """The LM loss plus ``sqrt(0 * logits)``: a finite (unchanged) loss whose gradient is
    NaN (d sqrt(u)/du at 0 is inf, times 0)."""
    lm = lm_loss_fn(tp_group)

    def fn(mb, logits):
        loss_sum, count, metrics = lm(mb, logits)
        return loss_sum + torch.sqrt(logits.sum() * 0.0), count, metrics

    return fn


def _optimizer_tensors(trainable) -> list[torch.Tensor]:
    out = []
    for sub in getattr(trainable.optimizer, "chained_optimizers", [trainable.optimizer]):
        for param_state in sub.optimizer.state.values():
            out += [v.clone() for v in param_state.values() if isinstance(v, torch.Tensor)]
    return out


def _steps(rank, world, parallel: ParallelConfig, with_bad_step: bool):
    from hpc_rlhf.trainer.trainable_model import NonFiniteLossError

    state, trainable = build_trainable(TINY, parallel, random_hf_state(TINY), lr=3e-3)
    mine = dp_share(lm_microbatches(4, 2, 16, TINY.vocab_size), state.dp_rank, state.dp_size)
    good = trainable.train_step(mine, lm_loss_fn(state.tp_group))
    out: dict = {"first": good.metrics["loss"]}
    if with_bad_step:
        params = [p.detach().clone() for p in trainable.model[0].parameters()]
        moments = _optimizer_tensors(trainable)
        lr_steps = trainable.scheduler.num_steps
        with pytest.raises(NonFiniteLossError, match="gradient norm is nan") as caught:
            trainable.train_step(mine, _nan_gradient_loss(state.tp_group))
        out["message"] = str(caught.value)
        out["params_kept"] = all(
            torch.equal(a, b) for a, b in zip(params, trainable.model[0].parameters())
        )
        after = _optimizer_tensors(trainable)
        out["moments_kept"] = len(after) == len(moments) and all(
            torch.equal(a, b) for a, b in zip(moments, after)
        )
        out["schedule_kept"] = trainable.scheduler.num_steps == lr_steps
    nxt = trainable.train_step(mine, lm_loss_fn(state.tp_group))
    out["next"] = (nxt.metrics["loss"], nxt.grad_norm, nxt.lr)
    out["params"] = trainable.gather_hf_state()
    return out


@pytest.mark.parametrize(
    "world,parallel",
    [
        (1, ParallelConfig()),
        (4, ParallelConfig(tensor_model_parallel_size=2, use_distributed_optimizer=True)),
    ],
    ids=["1proc", "tp2_dp2_distopt"],
)
def test_nan_gradient_is_caught_before_the_update(world, parallel):
    bad = run_world(_steps, world, parallel, True)
    clean = run_world(_steps, world, parallel, False)[0]
    for rank_result in bad:
        assert "before the optimizer step" in rank_result["message"]
        assert rank_result["params_kept"] and rank_result["moments_kept"]
        assert rank_result["schedule_kept"]
    assert bad[0]["next"] == clean["next"]
    for name, tensor in clean["params"].items():
        assert torch.equal(bad[0]["params"][name], tensor), name
