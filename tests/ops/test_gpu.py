"""GPU backends ("cuda" extension, "triton") on CUDA tensors vs float64 oracles.

Every result is compared with float64 math on the same (already rounded) inputs, within
element-wise bounds derived from the rounding of fp32 math and of the stored dtype
(``tests/ops/_common.py``: ``*_error_bounds``, ``stored_rounding``), rather than with the
torch reference at a loose fixed tolerance. The ``_check_*`` functions take the device and
backend, so the same checks can be run on CPU tensors with the CPU backends.
"""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.ops import _backend, masked_gae, ppo_policy_loss, token_logprobs, value_loss
from tests.ops._common import (
    FP32_EPS,
    assert_within,
    gae_error_bounds,
    logprob_error_bounds,
    oracle_gae,
    oracle_logprobs,
    oracle_ppo_loss,
    oracle_value_loss,
    ppo_loss_error_bounds,
    seed_in_failures,
    stable_seed,
    stored_rounding,
    swiglu_error_bounds,
    value_loss_error_bounds,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gpu_backends():
    dev = torch.device("cuda")
    return [b for b in ("cuda", "triton") if _backend.unavailable_reason(b, dev) is None]


@pytest.fixture(params=["cuda", "triton"])
def backend(request):
    if request.param not in _gpu_backends():
        pytest.skip(_backend.unavailable_reason(request.param, torch.device("cuda")))
    return request.param


def _check_logprobs(backend, dtype, shape, seed, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    g_lp, g_ent = torch.randn(shape[0], generator=gen), torch.randn(shape[0], generator=gen)
    x = logits.to(device).requires_grad_(True)
    logp, ent = token_logprobs(x, labels.to(device), return_entropy=True, backend=backend)
    ((logp * g_lp.to(device)).sum() + (ent * g_ent.to(device)).sum()).backward()
    assert logp.dtype == ent.dtype == torch.float32 and x.grad.dtype == dtype
    ref_lp, ref_ent, ref_grad = oracle_logprobs(logits, labels, g_lp, g_ent)
    b_lp, b_ent, b_grad = logprob_error_bounds(logits, labels, g_lp, g_ent)
    f32 = torch.float32
    assert_within(logp, ref_lp, b_lp.view_as(ref_lp) + stored_rounding(ref_lp, f32), "logp")
    assert_within(ent, ref_ent, b_ent.view_as(ref_ent) + stored_rounding(ref_ent, f32), "H")
    bound = b_grad.view_as(ref_grad) + stored_rounding(ref_grad, dtype)
    assert_within(x.grad, ref_grad, bound, f"grad ({dtype})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 32000), (7, 1001), (1, 5)], ids=str)
def test_logprobs_gpu(backend, dtype, shape):
    with seed_in_failures(stable_seed("logprobs", shape, str(dtype))) as seed:
        _check_logprobs(backend, dtype, shape, seed)


def _check_gae_and_losses(backend, seed, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    r, v, o = (torch.randn(33, 257, generator=gen) for _ in range(3))
    mask = torch.rand(33, 257, generator=gen) > 0.3
    mask[3] = False
    dev = [t.to(device) for t in (r, v, o, mask)]
    gamma, lam = 0.99, 0.95
    adv, ret = masked_gae(*dev[:2], dev[3], gamma=gamma, lam=lam, backend=backend)
    ref_adv, ref_ret = oracle_gae(r, v, mask, gamma, lam)
    b_adv, b_ret = gae_error_bounds(r, v, mask, gamma, lam)
    assert_within(adv, ref_adv, b_adv + stored_rounding(ref_adv, torch.float32), "advantages")
    assert_within(ret, ref_ret, b_ret + stored_rounding(ref_ret, torch.float32), "returns")
    for reduction in ("token_mean", "seq_mean"):
        # policy loss of logp = r against old = v with advantages o (ratios e^N(0, 2))
        x = dev[0].clone().requires_grad_(True)
        loss, _ = ppo_policy_loss(
            x, dev[1], dev[2], dev[3], dual_clip=3.0, reduction=reduction, backend=backend
        )
        loss.backward()
        args = (r, v, o, mask, 0.2, 0.2, 3.0, reduction)
        ref_loss, ref_grad, _ = oracle_ppo_loss(*args)
        b_loss, b_grad = ppo_loss_error_bounds(r, v, o, mask, 0.2, 3.0, reduction)
        assert_within(loss, ref_loss, b_loss + FP32_EPS * ref_loss.abs(), f"ppo {reduction}")
        assert_within(x.grad, ref_grad, b_grad + stored_rounding(ref_grad, torch.float32), "dppo")
        # value loss of values = r against old = v and returns o
        x = dev[0].clone().requires_grad_(True)
        loss, _ = value_loss(x, dev[1], dev[2], dev[3], reduction=reduction, backend=backend)
        loss.backward()
        ref_loss, ref_grad, _ = oracle_value_loss(r, v, o, mask, 0.2, reduction)
        b_loss, b_grad = value_loss_error_bounds(r, v, o, mask, 0.2, reduction)
        assert_within(loss, ref_loss, b_loss + FP32_EPS * ref_loss.abs(), f"value {reduction}")
        bound = b_grad + stored_rounding(ref_grad, torch.float32)
        assert_within(x.grad, ref_grad, bound, "dvalue")


def test_gae_and_losses_gpu(backend):
    with seed_in_failures(stable_seed("gae_and_losses")) as seed:
        _check_gae_and_losses(backend, seed)


def _swiglu_oracle(x, g):
    """float64 ``silu(a) b`` and the gradient of ``sum g y`` w.r.t. ``x = [a | b]``."""
    x64 = x.detach().double().cpu().requires_grad_(True)
    a, b = x64.chunk(2, dim=-1)
    y = a * torch.sigmoid(a) * b
    (y * g.double().cpu()).sum().backward()
    return y.detach(), x64.grad


def _check_swiglu(backend, dtype, seed, device="cuda", shape=(3, 1001, 1409)):
    from hpc_rlhf.ops import swiglu

    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape[:-1], 2 * shape[-1], generator=gen) * 3).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)  # the gradient reaching y, in y's dtype
    xr = x.to(device).requires_grad_(True)
    y = swiglu(xr, backend=backend)
    (y.float() * g.to(device).float()).sum().backward()
    assert y.dtype == xr.grad.dtype == dtype
    ref_y, ref_grad = _swiglu_oracle(x, g)
    b_y, b_grad = swiglu_error_bounds(x, g)
    assert_within(y, ref_y, b_y + stored_rounding(ref_y, dtype), f"swiglu ({dtype})")
    bound = b_grad + stored_rounding(ref_grad, dtype)
    assert_within(xr.grad, ref_grad, bound, f"swiglu grad ({dtype})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_gpu(backend, dtype):
    with seed_in_failures(stable_seed("swiglu", str(dtype))) as seed:
        _check_swiglu(backend, dtype, seed)
