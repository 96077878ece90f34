"""GPU backends ("cuda" extension, "triton") vs the torch reference on CUDA tensors."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.ops import _backend, masked_gae, ppo_policy_loss, token_logprobs, value_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _gpu_backends():
    dev = torch.device("cuda")
    return [b for b in ("cuda", "triton") if _backend.unavailable_reason(b, dev) is None]


@pytest.fixture(params=["cuda", "triton"])
def backend(request):
    if request.param not in _gpu_backends():
        pytest.skip(_backend.unavailable_reason(request.param, torch.device("cuda")))
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(64, 32000), (7, 1001), (1, 5)], ids=str)
def test_logprobs_gpu(backend, dtype, shape):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=gen) * 3).to(dtype).cuda()
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen).cuda()
    g_lp, g_ent = torch.randn(shape[0], device="cuda"), torch.randn(shape[0], device="cuda")
    out = {}
    for be in (backend, "torch"):
        x = logits.clone().requires_grad_(True)
        logp, ent = token_logprobs(x, labels, return_entropy=True, backend=be)
        ((logp * g_lp).sum() + (ent * g_ent).sum()).backward()
        out[be] = (logp, ent, x.grad)
    for got, ref in zip(out[backend], out["torch"]):
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-5, rtol=1e-2)


def test_gae_and_losses_gpu(backend):
    gen = torch.Generator().manual_seed(1)
    r, v, o = (torch.randn(33, 257, generator=gen).cuda() for _ in range(3))
    mask = (torch.rand(33, 257, generator=gen) > 0.3).cuda()
    mask[3] = False
    for got, ref in zip(
        masked_gae(r, v, mask, backend=backend), masked_gae(r, v, mask, backend="torch")
    ):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for fn, kw in ((ppo_policy_loss, {"dual_clip": 3.0}), (value_loss, {})):
        grads, losses = [], []
        for be in (backend, "torch"):
            x = r.clone().requires_grad_(True)
            loss, _ = fn(x, v, o, mask, reduction="seq_mean", backend=be, **kw)
            loss.backward()
            grads.append(x.grad)
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_swiglu_gpu(backend, dtype):
    from hpc_rlhf.ops import swiglu

    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 1001, 2 * 1409, generator=gen) * 3).to(dtype).cuda()
    g = torch.randn(*x.shape[:-1], 1409, generator=gen).to(dtype).cuda()
    out = {}
    for be in (backend, "torch"):
        xr = x.clone().requires_grad_(True)
        y = swiglu(xr, backend=be)
        (y.float() * g.float()).sum().backward()
        out[be] = (y, xr.grad)
    for got, ref in zip(out[backend], out["torch"]):
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=1e-2)
