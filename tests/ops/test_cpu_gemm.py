"""ops.cpu_gemm (oneDNN linear on CPU fp32) against float64 math, with and without autograd."""

from __future__ import annotations

import contextlib

import pytest
import torch

from hpc_rlhf.ops import cpu_gemm
from tests.ops._common import assert_matmul_close

HAVE_ONEDNN = cpu_gemm.onednn_available()
needs_onednn = pytest.mark.skipif(not HAVE_ONEDNN, reason="torch built without oneDNN")


@contextlib.contextmanager
def gemm_backend(name: str):
    previous = cpu_gemm.get_backend()
    cpu_gemm.set_backend(name)
    try:
        yield
    finally:
        cpu_gemm.set_backend(previous)


def _inputs(shape_x, n, seed=0, x_transposed=False):
    gen = torch.Generator().manual_seed(seed)
    k = shape_x[-1]
    if x_transposed:  # a non-contiguous activation
        x = torch.randn(k, *shape_x[:-1], generator=gen).movedim(0, -1)
    else:
        x = torch.randn(*shape_x, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5  # [N, K]
    return x, w


# decode rows, a prefill/training block, a 3-d [S, B, K] activation, one row, no rows
CASES = [((64, 96), 200), ((300, 48), 33), ((7, 3, 40), 24), ((1, 16), 5), ((0, 16), 8)]


@needs_onednn
@pytest.mark.parametrize("shape_x,n", CASES, ids=str)
@pytest.mark.parametrize("x_transposed", [False, True])
def test_linear_forward_matches_float64(shape_x, n, x_transposed):
    x, w = _inputs(shape_x, n, seed=n, x_transposed=x_transposed)
    with gemm_backend("onednn"):
        assert cpu_gemm.uses_onednn(x, w)
        out = cpu_gemm.linear(x, w)
    want = x.double() @ w.double().t()
    assert out.shape == (*shape_x[:-1], n) and out.dtype == torch.float32
    assert_matmul_close(out, want, x, w.t())


@needs_onednn
@pytest.mark.parametrize("shape_x,n", CASES[:4], ids=str)
def test_linear_gradients_match_float64(shape_x, n):
    """oneDNN's op has no autograd formula; the wrapper's backward must give both grads."""
    x, w = _inputs(shape_x, n, seed=3 * n)
    g = torch.randn(*shape_x[:-1], n, generator=torch.Generator().manual_seed(1))
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    (x64 @ w64.t() * g.double()).sum().backward()
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with gemm_backend("onednn"):
        (cpu_gemm.linear(xr, wr) * g).sum().backward()
    g_2d, x_2d = g.reshape(-1, n), x.reshape(-1, x.shape[-1])
    assert_matmul_close(xr.grad, x64.grad, g, w)  # dx = g @ w, summed over N
    assert_matmul_close(wr.grad, w64.grad, g_2d.t(), x_2d)  # dw = g^T @ x, over the rows
    # only the weight needs a gradient (a frozen activation): still correct
    wr.grad = None
    with gemm_backend("onednn"):
        (cpu_gemm.linear(x, wr) * g).sum().backward()
    assert_matmul_close(wr.grad, w64.grad, g_2d.t(), x_2d)


@needs_onednn
def test_matmul_routes_transposed_weights_and_keeps_other_cases():
    x, w = _inputs((5, 4, 32), 12, seed=7)
    with gemm_backend("onednn"):
        assert_matmul_close(cpu_gemm.matmul(x, w.t()), x.double() @ w.double().t(), x, w.t())
        b = torch.randn(32, 6)  # a contiguous right operand goes the same way
        assert_matmul_close(cpu_gemm.matmul(x, b), x.double() @ b.double(), x, b)
        batched = torch.randn(5, 32, 6)  # 3-d right operand: torch.matmul semantics
        torch.testing.assert_close(cpu_gemm.matmul(x, batched), torch.matmul(x, batched))
        v = torch.randn(32)
        torch.testing.assert_close(cpu_gemm.matmul(x, v), torch.matmul(x, v))


def test_torch_backend_and_other_dtypes_take_f_linear():
    x, w = _inputs((6, 16), 10)
    with gemm_backend("torch"):
        assert not cpu_gemm.uses_onednn(x, w)
        torch.testing.assert_close(cpu_gemm.linear(x, w), torch.nn.functional.linear(x, w))
        with pytest.raises(ValueError, match="dgrad_group needs the oneDNN path"):
            cpu_gemm.linear(x, w, dgrad_group=object())
    xb, wb = x.bfloat16(), w.bfloat16()
    assert not cpu_gemm.uses_onednn(xb, wb)  # bf16 already runs on oneDNN inside torch
    torch.testing.assert_close(cpu_gemm.linear(xb, wb), torch.nn.functional.linear(xb, wb))


def test_bad_backend_names_raise():
    with pytest.raises(ValueError, match="choose one of"):
        cpu_gemm.set_backend("mkl")


@needs_onednn
@pytest.mark.parametrize("shape_x,n", [c for c in CASES if c[0][0] > 0], ids=str)
def test_prepacked_weight_matches_float64_and_is_a_snapshot(shape_x, n):
    x, w = _inputs(shape_x, n, seed=4, x_transposed=len(shape_x) == 2)
    with gemm_backend("onednn"):
        packed = cpu_gemm.prepack(w)
        assert packed.is_mkldnn and packed.shape == w.shape
        want, w_t = x.double() @ w.double().t(), w.t().clone()
        assert_matmul_close(cpu_gemm.linear(x, packed), want, x, w_t)
        w.add_(1.0)  # later updates of w do not reach the copy
        assert_matmul_close(cpu_gemm.linear(x, packed), want, x, w_t)


@needs_onednn
def test_prepack_falls_back_and_refuses_gradients():
    x, w = _inputs((4, 16), 8, seed=5)
    with gemm_backend("torch"):
        assert cpu_gemm.prepack(w) is w  # no oneDNN path: the weight itself
    with gemm_backend("onednn"):
        assert cpu_gemm.prepack(w.double()).dtype == torch.float64  # not fp32: itself
        packed = cpu_gemm.prepack(w)
        with pytest.raises(ValueError, match="prepacked weight is for inference"):
            cpu_gemm.linear(x.requires_grad_(True), packed)
        with pytest.raises(ValueError, match="needs fp32 CPU inputs"):
            cpu_gemm.linear(x.detach().double(), packed)
