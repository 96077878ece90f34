"""masked_gae of every CPU backend vs an independent float64 Python loop and vs "torch"."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.ops import masked_gae
from tests.ops._common import BACKENDS, oracle_gae, random_mask, seed_in_failures, stable_seed

MASKS = ["holes", "left_pad", "right_pad", "full"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape", [(5, 17), (3, 1), (37, 40)], ids=str)
def test_matches_python_loop(backend, kind, shape):
    with seed_in_failures(stable_seed(kind, shape)) as seed:
        _check_against_python_loop(backend, kind, shape, seed)


def _check_against_python_loop(backend, kind, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(shape, generator=gen)
    values = torch.randn(shape, generator=gen)
    mask = random_mask(*shape, gen, kind)
    gamma, lam = 0.99, 0.95
    adv, ret = masked_gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    ref_adv, ref_ret = oracle_gae(rewards, values, mask, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == shape
    torch.testing.assert_close(adv.double(), ref_adv, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, atol=2e-5, rtol=1e-5)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    t_adv, t_ret = masked_gae(rewards, values, mask, gamma=gamma, lam=lam, backend="torch")
    torch.testing.assert_close(adv, t_adv, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ret, t_ret, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_holes_do_not_break_recursion(backend):
    """A hole between two valid steps: the earlier step bootstraps from the later one."""
    rewards = torch.tensor([[1.0, 9.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 9.0, 0.25, 9.0]])
    mask = torch.tensor([[True, False, True, False]])
    adv, ret = masked_gae(rewards, values, mask, gamma=0.5, lam=0.5, backend=backend)
    a2 = 2.0 - 0.25  # last valid step: no next value
    a0 = (1.0 + 0.5 * 0.25 - 0.5) + 0.25 * a2
    torch.testing.assert_close(adv, torch.tensor([[a0, 0.0, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, 0.0, a2 + 0.25, 0.0]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_and_int_mask(backend):
    gen = torch.Generator().manual_seed(5)
    rewards = torch.randn(4, 9, generator=gen).bfloat16()
    values = torch.randn(4, 9, generator=gen).bfloat16()
    mask = (torch.rand(4, 9, generator=gen) > 0.4).long()
    adv, ret = masked_gae(rewards, values, mask, backend=backend)
    ref_adv, ref_ret = oracle_gae(rewards.float(), values.float(), mask, 1.0, 0.95)
    torch.testing.assert_close(adv.double(), ref_adv, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, atol=2e-5, rtol=1e-5)


def test_shape_error():
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        masked_gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), backend="torch")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_large_enough_for_threads(backend):
    """300 x 300: above the C++ single-thread threshold, so sequences go to OpenMP."""
    gen = torch.Generator().manual_seed(8)
    rewards, values = torch.randn(300, 300, generator=gen), torch.randn(300, 300, generator=gen)
    mask = random_mask(300, 300, gen, "holes")
    adv, ret = masked_gae(rewards, values, mask, gamma=0.9, lam=0.8, backend=backend)
    ref_adv, ref_ret = oracle_gae(rewards, values, mask, 0.9, 0.8)
    torch.testing.assert_close(adv.double(), ref_adv, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, atol=2e-5, rtol=1e-5)
