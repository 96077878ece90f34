"""Every substitution ``models.overrides`` makes in megatron-core, against megatron-core's
own code: with all overrides on (the default) the loss and every gradient equal those of the
same model with all of them off, from the same weights and data, at 1 process and TP=2,
with the LM head computed densely and at the loss positions only. Each run is a fresh
process (the process-scope overrides are applied once per process)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hpc_rlhf.config import MegatronOverrides, ParallelConfig
from tests.dist import run_world
from tests.parallel.common import TINY, max_rel_diff
from tests.parallel.test_parallel_grads import _loss_and_grads

ALL_OFF = MegatronOverrides(**{f.name: False for f in dataclasses.fields(MegatronOverrides)})

# Both runs are fp32 with different kernels (summation orders): each of the ~6 GEMM-like
# reductions per layer (and the LM head) errs by at most K * eps32 relative to its
# inputs' magnitudes (K <= the widest reduction), and those errors add up through the
# layers; a substitution that computed anything else would differ at O(1e-2) or more.
_WIDEST = max(TINY.hidden_size, TINY.ffn_hidden_size, TINY.vocab_size)
TOL = (6 * TINY.num_layers + 1) * _WIDEST * torch.finfo(torch.float32).eps

LAYOUTS = {"1": (1, ParallelConfig()), "tp2": (2, ParallelConfig(tensor_model_parallel_size=2))}


@pytest.mark.parametrize("selective", [False, True], ids=["dense_head", "selective_head"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_overrides_match_megatron_core_own_modules(layout, selective):
    world, parallel = LAYOUTS[layout]
    on = run_world(_loss_and_grads, world, parallel, TINY, selective)[0]
    off_cfg = dataclasses.replace(TINY, overrides=ALL_OFF)
    off = run_world(_loss_and_grads, world, parallel, off_cfg, selective)[0]
    (loss_on, grads_on), (loss_off, grads_off) = on, off
    assert abs(loss_on - loss_off) <= TOL * abs(loss_off)
    assert set(grads_on) == set(grads_off)
    worst = max((max_rel_diff(grads_on[k], grads_off[k]), k) for k in grads_off)
    assert worst[0] <= TOL, f"gradient {worst[1]} differs by {worst[0]:.2e} (bound {TOL:.1e})"
