"""fp16 with dynamic loss scaling (``model.params_dtype: fp16``): megatron-core's
mixed-precision optimizer with its dynamic grad scaler, configured from
``OptimizerConfig`` (initial scale, hysteresis, window).

A step whose scaled gradients overflow is skipped (weights, Adam state and LR schedule
unchanged) and the scale halves; with a sane scale fp16 training follows the fp32 run
within fp16 rounding. Checked in one process and at TP=2 (the overflow flag is reduced
over the model-parallel group, so both ranks skip together).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist import run_world
from tests.inference.common import CFG, hf_causal_lm, hf_state, make_prompts


def _train(rank, world_size, hf_weights, dtype, tp, initial_scale, steps):
    from hpc_rlhf.config import OptimizerConfig, ParallelConfig
    from hpc_rlhf.models.runner import MicroBatch
    from hpc_rlhf.parallel.state import initialize_parallel
    from hpc_rlhf.trainer.losses import lm_loss_fn
    from hpc_rlhf.trainer.trainable_model import TrainableModel

    cfg = dataclasses.replace(CFG, params_dtype=dtype)
    state = initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp), cfg)
    optim = OptimizerConfig(
        lr=3e-3,
        clip_grad=1.0,
        lr_decay_style="constant",
        initial_loss_scale=initial_scale,
        hysteresis=1,
    )
    actor = TrainableModel(cfg, optim, state, "actor", steps)
    actor.load_hf_state(hf_weights)
    ids_BS = torch.tensor([p[:9] for p in make_prompts((9, 12, 10, 15))])
    mb = MicroBatch.unpadded(
        ids_BS[:, :-1], labels_BS=ids_BS[:, 1:], loss_mask_BS=torch.ones_like(ids_BS[:, 1:])
    )
    weight = actor.parameters_by_chunk()[0].decoder.layers[0].mlp.linear_fc2.weight
    history = []
    for _ in range(steps):
        before = weight.detach().float().clone()
        scale = float(actor.optimizer.get_loss_scale())
        result = actor.train_step([mb], lm_loss_fn(state.tp_group))
        moved = not torch.equal(before, weight.detach().float())
        history.append((result.skipped, scale, result.metrics["loss"], moved))
    return history


START = 20  # log2 of the first loss scale of the overflow test


@pytest.fixture(scope="module")
def weights():
    return hf_state(hf_causal_lm(CFG))


def test_fp16_follows_fp32_with_a_loss_scale_that_does_not_overflow(weights):
    (fp32,) = run_world(_train, 1, weights, "fp32", 1, 1.0, 6)
    (fp16,) = run_world(_train, 1, weights, "fp16", 1, 256.0, 6)
    assert not any(skipped for skipped, *_ in fp16) and all(moved for *_, moved in fp16)
    losses16 = torch.tensor([loss for _, _, loss, _ in fp16])
    losses32 = torch.tensor([loss for _, _, loss, _ in fp32])
    assert losses16[-1] < losses16[0] - 1.0, losses16
    # fp16 weights and activations (11-bit significand, 2^-11 = 4.9e-4 per rounding) over
    # 6 steps: measured 1e-4 relative; 2e-3 allows a few roundings' worth
    torch.testing.assert_close(losses16, losses32, rtol=2e-3, atol=0)


@pytest.mark.parametrize("tp", [1, 2])
def test_overflowing_steps_are_skipped_and_halve_the_scale(weights, tp):
    """From 2^20 with hysteresis 1 (this model's scaled gradients overflow fp16 above about
    2^13): an overflowing step changes no weight and halves the scale, a clean one updates
    and keeps it (the growth window is 1000 steps); updates begin after several halvings
    and training proceeds."""
    ranks = run_world(_train, tp, weights, "fp16", tp, 2.0**START, 14)
    assert all(history == ranks[0] for history in ranks)
    history = ranks[0]
    skipped = [s for s, *_ in history]
    assert skipped[:3] == [True] * 3 and skipped.count(False) >= 3, skipped
    for step, (was_skipped, scale, loss, moved) in enumerate(history[:-1]):
        next_scale, next_loss = history[step + 1][1], history[step + 1][2]
        assert moved == (not was_skipped), step
        assert next_scale == (scale / 2 if was_skipped else scale), step
        if was_skipped:  # the same weights see the same batch: the same loss
            assert next_loss == loss, step
    assert history[0][1] == 2.0**START and history[-1][2] < history[0][2] - 0.5
