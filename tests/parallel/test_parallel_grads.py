"""TP / PP / TPxPP (with and without sequence parallel) / DP / virtual-pipeline runs give the
same loss and gradients as one process, in fp32, from the same weights and data."""

from __future__ import annotations

import dataclasses

import pytest

from hpc_rlhf.config import ParallelConfig
from hpc_rlhf.trainer.losses import lm_loss_fn
from tests.dist import run_world
from tests.parallel.common import (
    TINY,
    build_trainable,
    dp_share,
    gather_grads_hf,
    lm_microbatches,
    max_rel_diff,
    random_hf_state,
)

N_MICRO, MICRO_B, SEQ = 4, 2, 16
TOL = 1e-6


def _loss_and_grads(rank, world, parallel: ParallelConfig, model_cfg, selective=False):
    hf_state = random_hf_state(model_cfg)
    state, trainable = build_trainable(model_cfg, parallel, hf_state)
    batches = lm_microbatches(N_MICRO, MICRO_B, SEQ, model_cfg.vocab_size)
    if selective:  # LM head over the loss positions only (models.overrides.selective)
        batches = [dataclasses.replace(b, head_mask_BS=b.loss_mask_BS.bool()) for b in batches]
    mine = dp_share(batches, state.dp_rank, state.dp_size)
    outputs = trainable.forward_backward(mine, lm_loss_fn(state.tp_group))
    loss = trainable.reduce_metrics(outputs)["loss"]
    return loss, gather_grads_hf(trainable, state)


@pytest.fixture(scope="module")
def reference():
    """Loss and gradients of the single-process run, for untied and tied embeddings."""
    out = {}
    for tied in (False, True):
        model_cfg = dataclasses.replace(TINY, tie_word_embeddings=tied)
        out[tied] = run_world(_loss_and_grads, 1, ParallelConfig(), model_cfg)[0]
    return out


LAYOUTS = {
    "tp2": (2, ParallelConfig(tensor_model_parallel_size=2)),
    "pp2": (2, ParallelConfig(pipeline_model_parallel_size=2)),
    "dp2": (2, ParallelConfig()),
    "pp2_vpp2": (
        2,
        ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
    ),
    "tp2_pp2": (4, ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)),
    "tp2_pp2_sp": (
        4,
        ParallelConfig(
            tensor_model_parallel_size=2, pipeline_model_parallel_size=2, sequence_parallel=True
        ),
    ),
}


# Tied embeddings are checked on the layouts that split them across pipeline stages.
CASES = [(name, False) for name in LAYOUTS] + [("pp2", True), ("tp2_pp2_sp", True)]


@pytest.mark.parametrize(
    "layout,tied", CASES, ids=[f"{n}-{'tied' if t else 'untied'}" for n, t in CASES]
)
def test_loss_and_every_gradient_match_single_process(reference, layout, tied):
    world, parallel = LAYOUTS[layout]
    model_cfg = dataclasses.replace(TINY, tie_word_embeddings=tied)
    loss, grads = run_world(_loss_and_grads, world, parallel, model_cfg)[0]
    ref_loss, ref_grads = reference[tied]
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    assert set(grads) == set(ref_grads)
    worst = max((max_rel_diff(grads[k], ref_grads[k]), k) for k in ref_grads)
    assert worst[0] <= TOL, f"{layout}: gradient {worst[1]} differs by {worst[0]:.2e} (relative)"
    # The gradients are not trivially zero: every tensor receives some gradient.
    assert all(float(g.abs().max()) > 0 for g in ref_grads.values())


@pytest.mark.parametrize(
    "layout", ["tp2_pp2", "tp2_pp2_sp"], ids=["selective_tp2_pp2", "selective_tp2_pp2_sp"]
)
def test_selective_lm_head_matches_the_dense_single_process_run(reference, layout):
    """Computing the LM head only at the loss positions changes nothing but the work."""
    world, parallel = LAYOUTS[layout]
    loss, grads = run_world(_loss_and_grads, world, parallel, TINY, True)[0]
    ref_loss, ref_grads = reference[False]
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    worst = max((max_rel_diff(grads[k], ref_grads[k]), k) for k in ref_grads)
    assert worst[0] <= TOL, f"{layout}: gradient {worst[1]} differs by {worst[0]:.2e} (relative)"
