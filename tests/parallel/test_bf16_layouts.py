"""bf16 mixed precision (``model.params_dtype: bf16``) in every layout, against the fp32
single-process run from the same weights and data.

What a bf16 run must be: bf16 parameters and activations, gradients accumulated and reduced
in fp32 (``main_grad``), fp32 main parameters and Adam state in the optimizer (the plain
and the distributed one), and a loss and gradients that differ from the fp32 ones only by
bf16 rounding.

Tolerance. bf16 keeps 8 significant bits (unit roundoff u = 2^-9 ~ 2e-3 per rounding); the
weights are rounded once and every layer's activations at each matmul, norm and residual,
so the errors of a 4-layer model's loss and gradients add up to a few hundred u in the
worst case and to ~sqrt(#roundings) u typically. Measured (1 process and TP=2 x PP=2):
loss 2e-5 relative, the worst gradient tensor 1.5-1.7e-2 (relative Frobenius,
``max_rel_diff``). The bounds below (loss 2e-4, gradients 4e-2) are 10x and 2.5x those: a layout that dropped a
reduction, double-counted a micro-batch or reduced in bf16 after a wrong cast shows up as an
O(1) error (tested by sabotage), while reduction-order noise stays far inside.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

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
LOSS_TOL, GRAD_TOL = 2e-4, 4e-2
STEPS, LR = 8, 1e-3
BF16 = dataclasses.replace(TINY, params_dtype="bf16")


def _optimizer_dtypes(optimizer) -> set[torch.dtype]:
    """The dtypes of the tensors the optimizer updates (its main parameters)."""
    return {p.dtype for group in optimizer.param_groups for p in group["params"]}


def _loss_and_grads(rank, world, parallel: ParallelConfig, model_cfg):
    """Loss, gradients (HF naming, fp32; None with the distributed optimizer, whose ranks
    each reduce only their shard), dtype facts, and the weights after ``STEPS`` optimizer steps."""
    hf_state = random_hf_state(TINY)  # fp32 weights, cast by the load
    state, trainable = build_trainable(model_cfg, parallel, hf_state, lr=LR)
    batches = dp_share(
        lm_microbatches(N_MICRO, MICRO_B, SEQ, model_cfg.vocab_size), state.dp_rank, state.dp_size
    )
    loss_fn = lm_loss_fn(state.tp_group)
    loss = trainable.reduce_metrics(trainable.forward_backward(batches, loss_fn))["loss"]
    params = [p for chunk in trainable.parameters_by_chunk() for p in chunk.parameters()]
    facts = {
        "param_dtypes": {p.dtype for p in params},
        "grad_dtypes": {p.main_grad.dtype for p in params},
        "main_param_dtypes": _optimizer_dtypes(trainable.optimizer),
    }
    grads = None
    if not parallel.use_distributed_optimizer:
        grads = gather_grads_hf(trainable, state)
        grads = None if grads is None else {k: g.float() for k, g in grads.items()}
    for _ in range(STEPS):
        trainable.train_step(batches, loss_fn)
    stepped = trainable.gather_hf_state()
    stepped = None if stepped is None else {k: w.float() for k, w in stepped.items()}
    return loss, grads, facts, stepped


@pytest.fixture(scope="module")
def fp32_reference():
    return run_world(_loss_and_grads, 1, ParallelConfig(), TINY)[0]


LAYOUTS = {
    "1proc": (1, ParallelConfig()),
    "tp2_sp": (2, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)),
    "pp2_vpp2": (
        2,
        ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
    ),
    "dp2": (2, ParallelConfig()),
    "tp2_pp2": (4, ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)),
}


def _check_dtypes(facts: dict) -> None:
    """bf16 parameters; fp32 gradients and main parameters."""
    assert facts["param_dtypes"] == {torch.bfloat16}, facts
    assert facts["grad_dtypes"] == {torch.float32}, facts
    assert facts["main_param_dtypes"] == {torch.float32}, facts


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bf16_loss_and_gradients_are_the_fp32_ones_within_bf16_rounding(fp32_reference, layout):
    world, parallel = LAYOUTS[layout]
    loss, grads, facts, _ = run_world(_loss_and_grads, world, parallel, BF16)[0]
    ref_loss, ref_grads, ref_facts, _ = fp32_reference
    assert ref_facts["param_dtypes"] == {torch.float32}
    _check_dtypes(facts)
    assert abs(loss - ref_loss) <= LOSS_TOL * abs(ref_loss), (loss, ref_loss)
    assert set(grads) == set(ref_grads)
    worst = max((max_rel_diff(grads[k], ref_grads[k]), k) for k in ref_grads)
    assert worst[0] <= GRAD_TOL, f"{layout}: gradient {worst[1]} differs by {worst[0]:.2e}"


def test_bf16_steps_keep_fp32_main_parameters_and_the_distributed_optimizer_agrees():
    """DP=2, ``STEPS`` Adam steps at lr 1e-3. Each step moves a weight by about lr, less
        than half a bf16 ulp of the RMSNorm weights (~1.0: ulp 2^-7): only fp32 main parameters
        accumulate those steps until the bf16 weights move, so moved norm weights show the
        fp32 main parameters at work. The distributed optimizer (fp32 main-parameter shards,
        reduce-scatter, gathered bf16 weights) ends on the plain optimizer's weights (the same
        Adam on the same fp32 values; only the gradient norm's summation order differs, which
    flips the bf16 rounding of a few weights by an ulp)."""
    plain = run_world(_loss_and_grads, 2, ParallelConfig(), BF16)[0]
    dist_opt = ParallelConfig(use_distributed_optimizer=True)
    loss, _, facts, stepped = run_world(_loss_and_grads, 2, dist_opt, BF16)[0]
    _check_dtypes(facts)
    assert loss == plain[0]
    worst = max(max_rel_diff(stepped[k], plain[3][k]) for k in stepped)
    assert worst <= 2**-8, worst  # a few weights a bf16 ulp apart (measured 1.2e-3)
    init = {k: w.to(torch.bfloat16).float() for k, w in random_hf_state(TINY).items()}
    norms = [k for k in stepped if k.endswith("norm.weight")]
    moved = [k for k in norms if not torch.equal(stepped[k], init[k])]
    assert len(norms) == 9 and moved == norms, moved
