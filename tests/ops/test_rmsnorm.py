"""rms_norm of every CPU backend against float64 autograd (values and both gradients), in
fp32 and bf16, and the backend choice."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.ops import _backend, rms_norm
from hpc_rlhf.ops.rmsnorm import RMSNORM_KERNELS, rmsnorm_reference

HAVE_EXT = _backend.extension() is not None
BACKENDS = ["torch"] + (["cpp"] if HAVE_EXT else [])
# odd H, one row, rows x H above the threading threshold, per-head [..., heads, D]
SHAPES = [(5, 7), (1, 1), (400, 300), (3, 4, 2, 16)]
EPS = 1e-5


def _oracle(x, w, g):
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    out = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * w64
    (out * g.double()).sum().backward()
    return out.detach(), x64.grad, w64.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_gradients_match_float64(backend, dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3.0).to(dtype)
    x.view(-1)[0] = 0.0
    w = (1.0 + 0.5 * torch.randn(shape[-1], generator=gen)).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    want_out, want_dx, want_dw = _oracle(x, w, g)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = rms_norm(xr, wr, EPS, backend=backend)
    (out * g).sum().backward()
    assert out.shape == x.shape and out.dtype == dtype and wr.grad.dtype == dtype
    # every result is computed in fp32 from the exact stored inputs and rounded once to the
    # storage: |error| <= u |value| (u = 2^-24 fp32, 2^-8 bf16) plus the roundings of the
    # fp32 chain (mean, sqrt, reciprocal, products: at most 8 x 2^-24 relative) plus the
    # fp32 sums' error, at most (terms summed) x 2^-24 x the largest term (row sums of H
    # terms; the weight gradient sums rows x H-term products over the rows)
    rows, H = x.numel() // shape[-1], shape[-1]
    u = (2.0**-24 if dtype == torch.float32 else 2.0**-8) + 8 * 2.0**-24
    fp32_sums = 2.0**-24 * H * float(want_out.abs().max() * g.double().abs().max() + 1)
    torch.testing.assert_close(out.double(), want_out, rtol=u, atol=fp32_sums)
    torch.testing.assert_close(xr.grad.double(), want_dx, rtol=u, atol=4 * fp32_sums)
    torch.testing.assert_close(wr.grad.double(), want_dw, rtol=u, atol=4 * rows * fp32_sums)


@pytest.mark.skipif(not HAVE_EXT, reason="hpc_rlhf._C not built")
def test_auto_picks_cpp_for_fp32_and_bf16_and_names_what_it_cannot_take():
    chosen = _backend.resolve(
        "rmsnorm",
        "auto",
        torch.device("cpu"),
        RMSNORM_KERNELS,
        dtype=torch.bfloat16,
        x_dtype=torch.bfloat16,
        weight_dtype=torch.bfloat16,
    )
    assert chosen == "cpp"
    x16 = torch.randn(4, 8, dtype=torch.float16)
    w16 = torch.ones(8, dtype=torch.float16)
    torch.testing.assert_close(rms_norm(x16, w16, EPS), rmsnorm_reference(x16, w16, EPS))
    with pytest.raises(RuntimeError, match="needs hpc_rlhf._C and fp32 or bf16 CPU tensors"):
        rms_norm(x16, w16, EPS, backend="cpp")
    with pytest.raises(RuntimeError, match="needs the weight in x's dtype"):
        rms_norm(torch.randn(4, 8), torch.ones(8, dtype=torch.bfloat16), EPS, backend="cpp")
    with pytest.raises(ValueError, match=r"weight \(7,\) must be \[H\]"):
        rms_norm(torch.randn(4, 8), torch.ones(7), EPS)
