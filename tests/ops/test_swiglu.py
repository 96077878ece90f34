"""swiglu (silu(a) * b over x = [a | b]) of every CPU backend vs float64 autograd."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.ops import _backend, swiglu
from hpc_rlhf.ops.swiglu import SWIGLU_KERNELS, swiglu_reference
from tests.ops._common import BACKENDS as CPU_BACKENDS

HAVE_EXT = _backend.extension() is not None
# odd F, a single row, rows x F above the threading threshold, a 3-d activation
SHAPES = [(5, 2 * 7), (1, 2 * 1), (300, 2 * 300), (3, 4, 2 * 33)]


def _oracle(x, g):
    x64 = x.detach().double().requires_grad_(True)
    a, b = x64.chunk(2, dim=-1)
    out = a * torch.sigmoid(a) * b
    (out * g.double()).sum().backward()
    return out.detach(), x64.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_gradient_match_float64(backend, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * 4.0  # silu's curved part and its tails
    edges = torch.tensor([-95.0, 95.0, 0.0, -1e-3])  # exp under/overflow edges
    k = min(4, x.numel())
    x.view(-1)[:k] = edges[:k]
    g = torch.randn(*shape[:-1], shape[-1] // 2, generator=gen)
    want_out, want_grad = _oracle(x, g)
    xr = x.clone().requires_grad_(True)
    out = swiglu(xr, backend=backend)
    (out * g).sum().backward()
    assert out.shape == want_out.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=2e-6)
    torch.testing.assert_close(xr.grad.double(), want_grad, atol=2e-5, rtol=2e-6)


@pytest.mark.skipif(not HAVE_EXT, reason="hpc_rlhf._C not built")
def test_auto_picks_cpp_for_fp32_and_bf16_and_the_reference_for_fp16():
    x = torch.randn(4, 10, dtype=torch.float16)
    torch.testing.assert_close(swiglu(x), swiglu_reference(x))  # auto -> torch for fp16
    with pytest.raises(RuntimeError, match="needs hpc_rlhf._C and fp32 or bf16 CPU tensors"):
        swiglu(x, backend="cpp")
    chosen = _backend.resolve("swiglu", "auto", x.device, SWIGLU_KERNELS, dtype=torch.bfloat16)
    assert chosen == "cpp"
    with pytest.raises(ValueError, match="last dim of x must be even"):
        swiglu(torch.randn(3, 5))
    with pytest.raises(ValueError, match="expected one of"):
        swiglu(torch.randn(3, 4), backend="mkl")
    with pytest.raises(RuntimeError, match="backend 'cuda' needs"):
        swiglu(torch.randn(3, 4), backend="cuda")


@pytest.mark.skipif(not HAVE_EXT, reason="hpc_rlhf._C not built")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpp_bf16_rounds_the_fp32_result_once(shape):
    """The C++ kernel in bf16: every output and gradient is the float64 result on the bf16
    inputs rounded once (relative error 2^-9; 2^-8 allowed for fast_exp and the fp32
    products), the exp under/overflow edges included; ``auto`` picks it for bf16."""
    gen = torch.Generator().manual_seed(sum(shape) + 1)
    x = (torch.randn(shape, generator=gen) * 4.0).bfloat16()
    x.view(-1)[: min(4, x.numel())] = torch.tensor([-95.0, 95.0, 0.0, -1e-3])[: min(4, x.numel())]
    g = torch.randn(*shape[:-1], shape[-1] // 2, generator=gen).bfloat16()
    want_out, want_grad = _oracle(x.float(), g.float())
    xr = x.clone().requires_grad_(True)
    out = swiglu(xr)
    (out * g).sum().backward()
    assert out.dtype == xr.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want_out, atol=1e-30, rtol=2**-8)
    torch.testing.assert_close(xr.grad.double(), want_grad, atol=1e-30, rtol=2**-8)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b in ("triton", "cpp")])
def test_low_precision_storage_with_fp32_math(backend):
    """bf16 in and out, fp32 inside: within bf16 rounding of the float64 result."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 2 * 40, generator=gen) * 3).bfloat16()
    g = torch.randn(6, 40, generator=gen).bfloat16()
    want_out, want_grad = _oracle(x.float(), g.float())
    xr = x.clone().requires_grad_(True)
    out = swiglu(xr, backend=backend)
    (out * g).sum().backward()
    assert out.dtype == xr.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want_out, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(xr.grad.double(), want_grad, atol=2e-2, rtol=1e-2)
