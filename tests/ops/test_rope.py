"""ops.rope (rotate-half RoPE) vs float64 math, and megatron-core's RoPE redirected to it."""

from __future__ import annotations

import types

import pytest
import torch

from hpc_rlhf.ops import _backend
from hpc_rlhf.ops import rope as rope_mod
from hpc_rlhf.ops.rope import rope

HAVE_EXT = _backend.extension() is not None
BACKENDS = ["torch"] + (["cpp"] if HAVE_EXT else [])


def _tables(P, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    angles = torch.rand(P, D, generator=gen, dtype=torch.float64) * 6.3  # independent halves
    return angles.cos(), angles.sin()


def _oracle(t, cos64, sin64, pos, g):
    """float64, element by element as the rotation pairs (j, j + D/2)."""
    x = t.detach().double().requires_grad_(True)
    h = t.shape[-1] // 2
    c, s = cos64[pos][:, None, None], sin64[pos][:, None, None]
    lo, hi = x[..., :h], x[..., h:]
    out = torch.cat([lo * c[..., :h] - hi * s[..., :h], hi * c[..., h:] + lo * s[..., h:]], -1)
    (out * g.double()).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "view"])
def test_forward_and_gradient_match_float64(backend, strided):
    S, B, H, D = 37, 2, 3, 16
    gen = torch.Generator().manual_seed(1)
    if strided:  # a slice of a fused projection, as megatron's query is
        t = torch.randn(S, B, H + 2, D, generator=gen)[:, :, 1 : H + 1]
    else:
        t = torch.randn(S, B, H, D, generator=gen)
    cos64, sin64 = _tables(50, D)
    pos = torch.randint(0, 50, (S,), generator=gen)
    g = torch.randn(S, B, H, D, generator=gen)
    want_out, want_grad = _oracle(t, cos64, sin64, pos, g)
    x = t.clone().requires_grad_(True)
    out = rope(x, cos64.float(), sin64.float(), pos, backend=backend)
    out.backward(g)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), want_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAVE_EXT, reason="hpc_rlhf._C not built")
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "view"])
def test_bf16_kernel_rounds_the_fp32_result_once(strided):
    """bf16 in and out, fp32 math inside: each output is the float64 result on the bf16
    inputs rounded once to bf16 (relative error at most 2^-9, half a bf16 ulp; 2^-8 allowed
    for the fp32 products before it), forward and backward (``auto`` picks the kernel)."""
    S, B, H, D = 29, 2, 3, 32
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(S, B, H + 1, D, generator=gen).bfloat16()
    t = full[:, :, 1:] if strided else full[:, :, 1:].contiguous()
    cos64, sin64 = _tables(40, D, seed=2)
    pos = torch.randint(0, 40, (S,), generator=gen)
    g = torch.randn(S, B, H, D, generator=gen).bfloat16()
    want_out, want_grad = _oracle(t.float(), cos64.float().double(), sin64.float().double(), pos, g)
    x = t.clone().requires_grad_(True)
    out = rope(x, cos64.float(), sin64.float(), pos)
    out.backward(g)
    assert out.dtype == x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want_out, atol=1e-30, rtol=2**-8)
    torch.testing.assert_close(x.grad.double(), want_grad, atol=1e-30, rtol=2**-8)


@pytest.mark.skipif(not HAVE_EXT, reason="hpc_rlhf._C not built")
def test_bad_inputs_raise():
    t = torch.randn(4, 1, 2, 8)
    cos, sin = (x.float() for x in _tables(6, 8))
    with pytest.raises(RuntimeError, match="outside the 6-row table"):
        rope(t, cos, sin, torch.tensor([0, 1, 2, 6]), backend="cpp")
    with pytest.raises(ValueError, match="pos must be"):
        rope(t, cos, sin, torch.arange(3))
    with pytest.raises(ValueError, match="even D"):
        rope(torch.randn(4, 1, 2, 7), cos, sin, torch.arange(4))
    with pytest.raises(RuntimeError, match="fp32 or bf16 CPU tensors"):
        rope(t.double(), cos, sin, torch.arange(4), backend="cpp")


class _OneRankGroup:
    def size(self):
        return 1

    def rank(self):
        return 0


@pytest.mark.skipif(not HAVE_EXT, reason="hpc_rlhf._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["sbhd", "thd"])
def test_megatron_rope_on_cpu_runs_the_kernel_and_matches_megatron(layout, dtype, monkeypatch):
    """fp32: megatron's values to fp32 rounding. bf16: within 2^-7 relative of megatron's
    formula, which rounds its tables and each product to bf16 (the kernel: fp32 math, one
    rounding; with 2e-2 absolute it passes at 2^-8, not at 2^-9)."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import attention

    from hpc_rlhf.config import MegatronOverrides
    from hpc_rlhf.models.overrides import apply_process_overrides
    from hpc_rlhf.parallel.cpu import apply_cpu_patches

    apply_cpu_patches()
    apply_process_overrides(MegatronOverrides())
    assert attention.apply_rotary_pos_emb is not rope_utils.apply_rotary_pos_emb
    config = types.SimpleNamespace(
        apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False
    )
    gen = torch.Generator().manual_seed(2)
    # megatron's freqs: [P, 1, 1, D] with both halves the same angles
    half = torch.rand(64, 1, 1, 8, generator=gen) * 20.0
    freqs = torch.cat([half, half], dim=-1)
    if layout == "sbhd":
        t = torch.randn(64, 3, 4, 16, generator=gen).to(dtype)
        cu = None
    else:  # packed: positions restart at each segment
        t = torch.randn(90, 4, 16, generator=gen).to(dtype)
        cu = torch.tensor([0, 30, 31, 90], dtype=torch.int32)
    calls = []
    apply = rope_mod._RopeCpp.apply
    monkeypatch.setattr(rope_mod._RopeCpp, "apply", lambda *a: calls.append(1) or apply(*a))
    x = t.clone().requires_grad_(True)
    got = attention.apply_rotary_pos_emb(x, freqs, config, cu, cp_group=_OneRankGroup())
    x_ref = t.clone().requires_grad_(True)
    want = rope_utils.apply_rotary_pos_emb(x_ref, freqs, config, cu, cp_group=_OneRankGroup())
    assert calls, "the redirected RoPE did not run the kernel"
    g = torch.randn(want.shape, generator=gen).to(dtype)
    got.backward(g)
    want.backward(g)
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2**-7}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    config.rotary_interleaved = True  # not covered by the kernel: megatron's own function
    calls.clear()
    out = attention.apply_rotary_pos_emb(t, freqs, config, cu, cp_group=_OneRankGroup())
    assert not calls and out.shape == t.shape
