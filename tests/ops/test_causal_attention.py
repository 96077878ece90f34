"""causal_attention (segment-wise causal attention) of every CPU backend vs float64 math."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.ops import _backend
from hpc_rlhf.ops.causal_attention import causal_attention, causal_attention_reference

HAVE_EXT = _backend.extension() is not None
BACKENDS = ["torch"] + (["cpp"] if HAVE_EXT else [])

# (S, B, N query heads, G key/value heads, D, segment boundaries or None)
CASES = {
    "plain_causal": (70, 3, 2, 2, 32, None),
    # an empty segment, one token, lengths across the kernel's 64-row blocks and not
    # multiples of 16, grouped-query heads
    "packed_gqa": (230, 1, 4, 2, 16, [0, 5, 5, 6, 156, 230]),
    "segments_per_row": (131, 2, 8, 8, 64, [0, 65, 66, 131]),
    "multi_query": (40, 2, 4, 1, 16, [0, 17, 40]),
}


def _oracle(q, k, v, cu, scale, g_out, window=None):
    """float64 scores, an explicit causal (sliding-window: also keys ``window`` or more
    positions back) mask per segment, softmax and V; with gradients."""
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    S, B, N, _ = q.shape
    rep = N // k.shape[2]
    bounds = [0, S] if cu is None else cu
    out = torch.zeros_like(q64)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q64[start:end].permute(1, 2, 0, 3)  # [B, N, L, D]
        ks = k64[start:end].permute(1, 2, 0, 3).repeat_interleave(rep, dim=1)
        vs = v64[start:end].permute(1, 2, 0, 3).repeat_interleave(rep, dim=1)
        scores = qs @ ks.transpose(-1, -2) * scale
        above = torch.ones(end - start, end - start, dtype=torch.bool).triu(1)
        if window is not None:  # keys at i - window and earlier: masked too
            above |= torch.ones(end - start, end - start, dtype=torch.bool).tril(-window)
        probs = scores.masked_fill(above, float("-inf")).softmax(-1)
        out[start:end] = (probs @ vs).permute(2, 0, 1, 3)
    (out * g_out.double()).sum().backward()
    return out.detach(), q64.grad, k64.grad, v64.grad


def _inputs(S, B, N, G, D, seed, strided=False):
    gen = torch.Generator().manual_seed(seed)
    if strided:  # q, k, v as views into one fused projection, as megatron splits them
        qkv = torch.randn(S, B, N + 2 * G, D, generator=gen) * 2.0
        return qkv[:, :, :N], qkv[:, :, N : N + G], qkv[:, :, N + G :]
    return tuple(torch.randn(S, B, h, D, generator=gen) * 2.0 for h in (N, G, G))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "fused_qkv_views"])
def test_output_and_gradients_match_float64(backend, case, strided):
    S, B, N, G, D, cu = CASES[case]
    q, k, v = _inputs(S, B, N, G, D, seed=S + N, strided=strided)
    scale = 0.7 * D**-0.5
    g_out = torch.randn(S, B, N, D, generator=torch.Generator().manual_seed(1))
    want = _oracle(q, k, v, cu, scale, g_out)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    out = causal_attention(*leaves, cu_t, scale, backend=backend)
    if strided:  # a gradient arriving as a non-contiguous view
        out.backward(g_out.transpose(0, 1).contiguous().transpose(0, 1))
    else:
        out.backward(g_out)
    assert out.shape == (S, B, N, D) and out.dtype == torch.float32
    got = (out.detach(), *(t.grad for t in leaves))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, atol=3e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(not HAVE_EXT, reason="hpc_rlhf._C not built")
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_tensors_match_float64_within_bf16_rounding(case):
    """bf16 q, k, v (and output gradient) through the C++ kernel, fp32 math inside: against
    float64 math on the same bf16 values, each output and gradient entry is off by little
    more than its own rounding to bf16 (8 significant bits: 2^-9 relative, 2^-8 at worst):
    |got - want| <= (|want| + 1% of max |want|) / 128. Measured: 0.0034-0.0038 of that
    scale. torch's bf16 SDPA (the reference backend) rounds its intermediates to bf16 and
    measured 0.03-0.56 on the same scale: the kernel is the more exact bf16 path too."""
    S, B, N, G, D, cu = CASES[case]
    q, k, v = (t.bfloat16() for t in _inputs(S, B, N, G, D, seed=S + 5))
    scale = D**-0.5
    g_out = torch.randn(S, B, N, D, generator=torch.Generator().manual_seed(3)).bfloat16()
    want = _oracle(q, k, v, cu, scale, g_out)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = causal_attention(*leaves, cu_t, scale, backend="cpp")
    out.backward(g_out)
    assert out.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in leaves)
    got = (out.detach(), *(t.grad for t in leaves))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        error = (g.double() - w).abs() / (w.abs() + 0.01 * w.abs().max())
        assert float(error.max()) <= 1 / 128, f"{name}: {float(error.max()):.4f}"


@pytest.mark.parametrize("case", ["plain_causal", "packed_gqa", "multi_query"])
@pytest.mark.parametrize("window", [1, 7, 64])
def test_sliding_window_matches_float64(case, window):
    """Mistral's window on the reference (``auto`` picks it: the C++ kernel has none): each
    position attends its latest ``window`` positions of its own segment; a window of 1 is
    the position itself, one longer than a segment is plain causal attention there."""
    S, B, N, G, D, cu = CASES[case]
    q, k, v = _inputs(S, B, N, G, D, seed=S + window)
    g_out = torch.randn(S, B, N, D, generator=torch.Generator().manual_seed(2))
    want = _oracle(q, k, v, cu, D**-0.5, g_out, window)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    out = causal_attention(*leaves, cu_t, window=window)
    out.backward(g_out)
    for name, g, w in zip(
        ("out", "dq", "dk", "dv"), (out.detach(), *(t.grad for t in leaves)), want
    ):
        torch.testing.assert_close(g.double(), w, atol=3e-5, rtol=1e-4, msg=name)
    if HAVE_EXT:
        with pytest.raises(RuntimeError, match="no sliding window"):
            causal_attention(q, k, v, cu_t, backend="cpp", window=window)
    with pytest.raises(ValueError, match="window must be >= 1"):
        causal_attention(q, k, v, cu_t, window=0)


@pytest.mark.skipif(not HAVE_EXT, reason="hpc_rlhf._C not built")
def test_auto_uses_the_kernel_only_where_it_applies(caplog):
    q, k, v = _inputs(20, 1, 2, 2, 24, seed=3)  # head dim 24: not a multiple of 16
    with pytest.raises(RuntimeError, match="multiple of 16, got 24"):
        causal_attention(q, k, v, backend="cpp")
    torch.testing.assert_close(causal_attention(q, k, v), causal_attention_reference(q, k, v))
    q, k, v = _inputs(20, 1, 2, 2, 16, seed=3)
    with pytest.raises(RuntimeError, match="no attention dropout"):
        causal_attention(q, k, v, dropout_p=0.1, backend="cpp")
    with pytest.raises(RuntimeError, match="fp32 or bf16 CPU tensors"):
        causal_attention(q.double(), k.double(), v.double(), backend="cpp")
    with pytest.raises(RuntimeError, match="cu_seqlens must run from 0"):
        causal_attention(q, k, v, torch.tensor([0, 7]), backend="cpp")
    with pytest.raises(ValueError, match="must rise from 0"):
        causal_attention(q, k, v, torch.tensor([0, 9, 7, 20]), backend="torch")
    with pytest.raises(ValueError, match="not a multiple of 3 key/value heads"):
        causal_attention(q, k.repeat(1, 1, 2, 1)[:, :, :3], v.repeat(1, 1, 2, 1)[:, :, :3])
    with pytest.raises(ValueError, match="expected one of"):
        causal_attention(q, k, v, backend="flash")


@pytest.mark.skipif(not HAVE_EXT, reason="hpc_rlhf._C not built")
def test_kernel_is_stable_at_large_scores():
    """Scores in the hundreds (softmax near one-hot) stay finite and match float64."""
    q, k, v = _inputs(90, 1, 2, 2, 16, seed=9)
    q = q * 40.0
    g_out = torch.randn_like(q)
    want = _oracle(q, k, v, [0, 90], 0.25, g_out)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = causal_attention(*leaves, None, 0.25, backend="cpp")
    out.backward(g_out)
    for g, w in zip((out.detach(), *(t.grad for t in leaves)), want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, atol=2e-4, rtol=1e-4)
