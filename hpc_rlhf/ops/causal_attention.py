"""Causal self-attention within segments: the core attention of the local layer spec.

Shapes (megatron-core's ``sbhd`` layout): ``q`` ``[S, B, N, D]``, ``k`` and ``v``
``[S, B, G, D]`` (``N`` query heads over ``G`` key/value heads, grouped-query attention when
``G < N``), result ``[S, B, N, D]``. ``cu_seqlens`` ``[n + 1]`` (integers, from 0 to ``S``)
splits the ``S`` positions of every batch row into segments that attend only within
themselves; ``None`` is one segment (plain causal attention). A packed ``thd`` micro-batch
(``models.packing``) is ``B = 1`` with its ``cu_seqlens``. ``window`` (sliding-window
attention, Mistral): a position attends to at most the ``window`` latest positions of its
segment, itself included.

Backends:

* ``"torch"``: the reference, one ``scaled_dot_product_attention`` per segment (over the
  whole batch), heads repeated for grouped-query attention; any dtype and device, dropout.
* ``"cpp"``: ``csrc/causal_attention_cpu.cpp``, fp32 or bf16 CPU tensors (bf16 ones widened
  to fp32 around the kernel, the results narrowed back) with a head dim that is a multiple
  of 16, no dropout. Forward and backward are flash-style (the backward recomputes
  the probabilities from the saved row log-sum-exp), run on a register-blocked fp32
  micro-kernel and skip the key blocks above the diagonal. ``python tools/bench_kernels.py``
  times it against the reference.
* ``"auto"``: ``cpp`` when those conditions hold and ``hpc_rlhf._C`` is built, else the
  reference (on GPUs PyTorch's SDPA runs its flash kernels; the transformer-engine layer
  spec brings its own fused attention). The choice is logged once per reason
  (``hpc_rlhf.ops._backend.resolve``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpc_rlhf.ops import _backend


def _cpp_limit(head_dim: int, dropout_p: float, window: int | None = None) -> str | None:
    """Why the C++ kernel cannot take a call with this head dim, dropout and window; None
    if it can."""
    if head_dim % 16:
        return f"needs a head dim that is a multiple of 16, got {head_dim}"
    if dropout_p > 0.0:
        return f"has no attention dropout (dropout_p={dropout_p})"
    return window_limit(window)


def window_limit(window: int | None = None) -> str | None:
    """Why a C++ attention kernel (training's or the engine's paged decode) cannot take a
    sliding window; None without one."""
    return None if window is None else f"has no sliding window (window={window})"


def window_mask(length: int, window: int, device=None) -> torch.Tensor:
    """``[L, L]`` True where query ``i`` may attend key ``j``: ``i - window < j <= i``."""
    i_L1 = torch.arange(length, device=device)[:, None]
    j_1L = torch.arange(length, device=device)[None, :]
    return (j_1L <= i_L1) & (j_1L > i_L1 - window)


# the C++ kernel: fp32 math on fp32 or bf16 tensors (bf16 ones widened around it; measured
# fwd+bwd over 3 segments of 1024 positions, 8 heads of 64: 37 ms against 527 ms for torch's
# bf16 SDPA on an AMD EPYC), a head dim that is a multiple of 16, no dropout
CAUSAL_ATTENTION_KERNELS = (
    _backend.TORCH,
    _backend.Kernel("cpp", dtypes=_backend.FP32_BF16, limit=_cpp_limit),
)


def _segments(cu_seqlens: torch.Tensor | None, length: int) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, length)]
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != length or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"causal_attention: cu_seqlens {bounds} must rise from 0 to the length {length}"
        )
    return list(zip(bounds[:-1], bounds[1:]))


def repeat_kv_heads(k_BGLD: torch.Tensor, v_BGLD: torch.Tensor, n_heads: int):
    """K/V with each of the ``G`` key/value heads repeated for its ``n_heads / G`` query
    heads (grouped-query attention) -> ``[B, n_heads, L, D]`` each."""
    rep = n_heads // k_BGLD.shape[1]
    if rep == 1:
        return k_BGLD, v_BGLD
    return k_BGLD.repeat_interleave(rep, dim=1), v_BGLD.repeat_interleave(rep, dim=1)


def causal_attention_reference(
    q_SBND: torch.Tensor,
    k_SBGD: torch.Tensor,
    v_SBGD: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    window: int | None = None,
) -> torch.Tensor:
    """Causal (sliding-window with ``window``) attention within each segment with torch
    SDPA -> ``[S, B, N, D]``."""
    S, _, N, _ = q_SBND.shape
    parts = []
    for start, end in _segments(cu_seqlens, S):
        if end == start:
            continue
        q_BNLD = q_SBND[start:end].permute(1, 2, 0, 3)
        k_BNLD, v_BNLD = repeat_kv_heads(
            k_SBGD[start:end].permute(1, 2, 0, 3), v_SBGD[start:end].permute(1, 2, 0, 3), N
        )
        mask_LL = None if window is None else window_mask(end - start, window, q_SBND.device)
        ctx_BNLD = F.scaled_dot_product_attention(
            q_BNLD,
            k_BNLD,
            v_BNLD,
            attn_mask=mask_LL,
            dropout_p=dropout_p,
            is_causal=mask_LL is None,
            scale=scale,
        )
        parts.append(ctx_BNLD.permute(2, 0, 1, 3))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 (a copy for bf16: the kernel's storage and math are fp32)."""
    return t if t.dtype == torch.float32 else t.float()


class _CausalAttentionCpp(torch.autograd.Function):
    """The C++ kernel; bf16 inputs are widened to fp32 around it (the kernel computes in
    fp32 either way; the widening copies cost O(S D), the attention O(S^2 D)), their fp32
    copies not kept for the backward, which widens them again. Outputs and gradients come
    back in the inputs' dtype; the output kept for the backward stays fp32."""

    @staticmethod
    def forward(ctx, q_SBND, k_SBGD, v_SBGD, cu_seqlens, scale):
        ext = _backend.built_extension()
        out_SBND, lse_BNS = ext.causal_attention_fwd_cpu(
            _fp32(q_SBND), _fp32(k_SBGD), _fp32(v_SBGD), cu_seqlens, scale
        )
        ctx.save_for_backward(q_SBND, k_SBGD, v_SBGD, out_SBND, lse_BNS, cu_seqlens)
        ctx.scale = scale
        return out_SBND.to(q_SBND.dtype)

    @staticmethod
    def backward(ctx, grad_SBND):
        q_SBND, k_SBGD, v_SBGD, out_SBND, lse_BNS, cu_seqlens = ctx.saved_tensors
        grad_SBND = _fp32(grad_SBND)
        if grad_SBND.stride(-1) != 1:
            grad_SBND = grad_SBND.contiguous()
        ext = _backend.built_extension()
        dq_SBND, dk_SBND, dv_SBND = ext.causal_attention_bwd_cpu(
            _fp32(q_SBND),
            _fp32(k_SBGD),
            _fp32(v_SBGD),
            out_SBND,
            lse_BNS,
            grad_SBND,
            cu_seqlens,
            ctx.scale,
        )
        S, B, N, D = q_SBND.shape
        G = k_SBGD.shape[2]
        if G != N:  # the kernel returns per-query-head dK/dV: sum each group's heads
            dk_SBND = dk_SBND.view(S, B, G, N // G, D).sum(3)
            dv_SBND = dv_SBND.view(S, B, G, N // G, D).sum(3)
        dtype = q_SBND.dtype
        return dq_SBND.to(dtype), dk_SBND.to(dtype), dv_SBND.to(dtype), None, None


def causal_attention(
    q_SBND: torch.Tensor,
    k_SBGD: torch.Tensor,
    v_SBGD: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention within each ``cu_seqlens`` segment -> ``[S, B, N, D]``.

    ``scale`` defaults to ``D ** -0.5``; ``dropout_p`` is the attention dropout and
    ``window`` the sliding window (reference backend only). See the module docstring for
    shapes and backends.
    """
    if window is not None and window < 1:
        raise ValueError(f"causal_attention: window must be >= 1, got {window}")
    S, B, N, D = q_SBND.shape
    if k_SBGD.shape != v_SBGD.shape or k_SBGD.shape[:2] != (S, B) or k_SBGD.shape[3] != D:
        raise ValueError(
            f"causal_attention: k {tuple(k_SBGD.shape)} and v {tuple(v_SBGD.shape)} must be "
            f"[S, B, G, D] for q {tuple(q_SBND.shape)}"
        )
    if N % k_SBGD.shape[2]:
        raise ValueError(
            f"causal_attention: {N} query heads are not a multiple of {k_SBGD.shape[2]} "
            "key/value heads"
        )
    scale = D**-0.5 if scale is None else float(scale)
    chosen = _backend.resolve(
        "causal_attention",
        backend,
        q_SBND.device,
        CAUSAL_ATTENTION_KERNELS,
        dtype=q_SBND.dtype,
        head_dim=D,
        dropout_p=dropout_p,
        window=window,
    )
    if chosen == "torch":
        return causal_attention_reference(
            q_SBND, k_SBGD, v_SBGD, cu_seqlens, scale, dropout_p, window
        )
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, S], dtype=torch.int32)
    q_SBND, k_SBGD, v_SBGD = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (q_SBND, k_SBGD, v_SBGD)
    )
    return _CausalAttentionCpp.apply(q_SBND, k_SBGD, v_SBGD, cu_seqlens.cpu(), scale)
