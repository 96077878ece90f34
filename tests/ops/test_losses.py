"""ppo_policy_loss and value_loss of every CPU backend vs float64 autograd and vs "torch"."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.ops import ppo_policy_loss, value_loss
from tests.ops._common import (
    BACKENDS,
    oracle_ppo_loss,
    oracle_value_loss,
    random_mask,
    seed_in_failures,
    stable_seed,
)

MASKS = ["holes", "left_pad", "right_pad", "full"]
REDUCTIONS = ["token_mean", "seq_mean"]


def _inputs(shape, kind, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen)
    b = a + 0.4 * torch.randn(shape, generator=gen)  # ratios spread around 1: many clip
    c = torch.randn(shape, generator=gen)
    return a.to(dtype), b.to(dtype), c.to(dtype), random_mask(*shape, gen, kind)


def _assert_stats(stats, ref):
    for key, value in ref.items():
        assert stats[key].dtype == torch.float32 and stats[key].dim() == 0, key
        torch.testing.assert_close(stats[key].double(), value.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("shape", [(6, 33), (1, 1), (40, 70)], ids=str)
def test_ppo_loss(backend, reduction, kind, dual_clip, shape):
    with seed_in_failures(stable_seed("ppo", kind, shape, reduction)) as seed:
        _check_ppo_loss(backend, reduction, kind, dual_clip, shape, seed)


def _check_ppo_loss(backend, reduction, kind, dual_clip, shape, seed):
    logp, old, adv, mask = _inputs(shape, kind, seed)
    args = (0.2, 0.28, dual_clip, reduction)
    ref_loss, ref_grad, ref_stats = oracle_ppo_loss(logp, old, adv, mask, *args)
    x = logp.clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(
        x, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=dual_clip,
        reduction=reduction, backend=backend,
    )  # fmt: skip
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=1e-7, rtol=1e-5)
    _assert_stats(stats, ref_stats)
    if dual_clip is not None:
        assert "dual_clip_frac" in stats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("shape", [(6, 33), (1, 1), (40, 70)], ids=str)
def test_value_loss(backend, reduction, kind, clip, shape):
    with seed_in_failures(stable_seed("value", kind, shape, clip)) as seed:
        _check_value_loss(backend, reduction, kind, clip, shape, seed)


def _check_value_loss(backend, reduction, kind, clip, shape, seed):
    values, old, returns, mask = _inputs(shape, kind, seed)
    ref_loss, ref_grad, ref_stats = oracle_value_loss(values, old, returns, mask, clip, reduction)
    x = values.clone().requires_grad_(True)
    loss, stats = value_loss(x, old, returns, mask, clip=clip, reduction=reduction, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=1e-7, rtol=1e-5)
    _assert_stats(stats, ref_stats)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_batch_gives_zero(backend):
    gen = torch.Generator().manual_seed(3)
    logp = torch.randn(3, 5, generator=gen).requires_grad_(True)
    values = torch.randn(3, 5, generator=gen).requires_grad_(True)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for reduction in REDUCTIONS:
        loss, stats = ppo_policy_loss(
            logp,
            logp.detach() + 1,
            torch.randn(3, 5, generator=gen),
            mask,
            dual_clip=2.0,
            reduction=reduction,
            backend=backend,
        )
        v_loss, v_stats = value_loss(
            values,
            torch.randn(3, 5, generator=gen),
            torch.randn(3, 5, generator=gen),
            mask,
            reduction=reduction,
            backend=backend,
        )
        (loss + v_loss).backward()
        assert loss.item() == 0.0 and v_loss.item() == 0.0
        assert (logp.grad == 0).all() and (values.grad == 0).all()
        assert all(torch.isfinite(s) for s in [*stats.values(), *v_stats.values()])
        logp.grad = values.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_logp_gets_bf16_grad(backend):
    logp, old, adv, mask = _inputs((4, 12), "holes", seed=11, dtype=torch.bfloat16)
    ref_loss, ref_grad, _ = oracle_ppo_loss(logp, old, adv, mask, 0.2, 0.2, None, "token_mean")
    x = logp.clone().requires_grad_(True)
    loss, _ = ppo_policy_loss(x, old, adv, mask, backend=backend)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_grad.bfloat16().double(), atol=1e-6, rtol=1e-2)


def test_argument_errors():
    t = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_policy_loss(t, t, t, m, dual_clip=1.0, backend="torch")
    with pytest.raises(ValueError, match="reduction"):
        ppo_policy_loss(t, t, t, m, reduction="sum", backend="torch")
    with pytest.raises(ValueError, match="clip must be >= 0"):
        value_loss(t, t, t, m, clip=-0.1, backend="torch")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        value_loss(t, t, torch.zeros(3, 2), m, backend="torch")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_large_enough_for_threads(backend, reduction):
    """300 x 300: above the C++ single-thread threshold, so rows go to OpenMP."""
    a, b, c, mask = _inputs((300, 300), "holes", seed=4)
    ref_loss, ref_grad, _ = oracle_ppo_loss(a, b, c, mask, 0.2, 0.2, 2.5, reduction)
    x = a.clone().requires_grad_(True)
    loss, _ = ppo_policy_loss(x, b, c, mask, dual_clip=2.5, reduction=reduction, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=1e-8, rtol=1e-5)
    ref_loss, ref_grad, _ = oracle_value_loss(a, b, c, mask, 0.2, reduction)
    x = a.clone().requires_grad_(True)
    loss, _ = value_loss(x, b, c, mask, reduction=reduction, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=1e-8, rtol=1e-5)
