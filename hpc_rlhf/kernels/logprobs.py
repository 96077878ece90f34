"""Triton kernels for token log-probs and entropy (see hpc_rlhf/ops/logprobs.py).

Forward: one program per row walks the vocabulary shard once in BLOCK_V tiles, keeping an
online max ``m``, ``s = sum exp(x - m)`` and ``t = sum exp(x - m) * (x - m)`` (rescaled when
the max grows), and picks the label's logit if this shard owns it. Backward: one program per
row recomputes ``log p = (x - m) - log s`` tile by tile and writes the gradient in the logits' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def logprobs_fwd_kernel(
    x_ptr,  # [N, V] logits (fp32/bf16/fp16)
    labels_ptr,  # [N] int64 global ids
    m_ptr,  # [N] fp32 out: row max
    s_ptr,  # [N] fp32 out: sum exp(x - m)
    t_ptr,  # [N] fp32 out: sum exp(x - m) * (x - m) (ENTROPY only)
    xl_ptr,  # [N] fp32 out: label logit on its owner shard, else 0
    V,
    vocab_start,
    ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * V
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep sums at 0
        alpha = tl.exp(m - m_safe)
        e = tl.exp(x - m_safe)
        if ENTROPY:
            d = tl.where(e > 0, x - m_safe, 0.0)  # 0 where x = -inf (p log p -> 0)
            shift = tl.where(s > 0, m - m_safe, 0.0)
            t = alpha * (t + shift * s) + tl.sum(e * d, axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    label = tl.load(labels_ptr + row)
    local = label - vocab_start
    owned = (local >= 0) & (local < V)
    xl = tl.load(base + tl.where(owned, local, 0), mask=owned, other=0.0).to(tl.float32)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(xl_ptr + row, xl)
    if ENTROPY:
        tl.store(t_ptr + row, t)


@triton.jit
def logprobs_bwd_kernel(
    x_ptr,  # [N, V] logits
    labels_ptr,  # [N] int64
    m_ptr,  # [N] fp32 global row max
    log_s_ptr,  # [N] fp32 log of the global sum exp(x - m)
    ent_ptr,  # [N] fp32 entropy (HAS_ENT only)
    g_lp_ptr,  # [N] fp32 grad of log-probs
    g_ent_ptr,  # [N] fp32 grad of entropy (HAS_ENT only)
    grad_ptr,  # [N, V] out, logits' dtype
    V,
    vocab_start,
    HAS_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * V
    offs = tl.arange(0, BLOCK_V)
    m = tl.load(m_ptr + row)
    log_s = tl.load(log_s_ptr + row)
    g = tl.load(g_lp_ptr + row)
    local = tl.load(labels_ptr + row) - vocab_start
    if HAS_ENT:
        h = tl.load(ent_ptr + row)
        ge = tl.load(g_ent_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inb = cols < V
        x = tl.load(x_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
        logp = (x - m) - log_s
        coef = g
        if HAS_ENT:
            coef = g + ge * (logp + h)
        grad = -tl.exp(logp) * coef + tl.where(cols == local, g, 0.0)
        tl.store(grad_ptr + base + cols, grad.to(grad_ptr.dtype.element_ty), mask=inb)


def _block_v(v: int) -> int:
    return min(triton.next_power_of_2(v), 4096)


def logprobs_fwd(x: torch.Tensor, labels: torch.Tensor, vocab_start: int, entropy: bool):
    """x [N, V], labels [N] int64 -> (m, s, t|None, xl), fp32 [N] each."""
    n, v = x.shape
    m = torch.empty(n, dtype=torch.float32, device=x.device)
    s, xl = torch.empty_like(m), torch.empty_like(m)
    t = torch.empty_like(m) if entropy else None
    if n:
        logprobs_fwd_kernel[(n,)](
            x, labels, m, s, t if entropy else m, xl, v, vocab_start,
            ENTROPY=entropy, BLOCK_V=_block_v(v), num_warps=8 if v >= 2048 else 4,
        )  # fmt: skip
    return m, s, t, xl


def logprobs_bwd(x, labels, vocab_start: int, m, log_s, ent, g_lp, g_ent):
    """Gradient w.r.t. x [N, V] (x's dtype); ent/g_ent None when entropy has no gradient."""
    n, v = x.shape
    grad = torch.empty_like(x)
    has_ent = g_ent is not None
    if n:
        logprobs_bwd_kernel[(n,)](
            x, labels, m, log_s, ent if has_ent else m, g_lp, g_ent if has_ent else g_lp, grad,
            v, vocab_start, HAS_ENT=has_ent, BLOCK_V=_block_v(v),
            num_warps=8 if v >= 2048 else 4,
        )  # fmt: skip
    return grad
