"""Triton kernel for the clipped value loss (see hpc_rlhf/ops/value_loss.py): one program per
sequence writes the per-token derivative and the row sums
(loss, count, clipped, value sum, squared-error sum)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def value_rows_kernel(
    v_ptr,  # [B, T] fp32 values
    old_ptr,  # [B, T] fp32 old values
    ret_ptr,  # [B, T] fp32 returns
    mask_ptr,  # [B, T] uint8
    rows_ptr,  # [B, 5] fp32 out
    dcoef_ptr,  # [B, T] fp32 out (NEED_GRAD only)
    T,
    clip,
    USE_CLIP: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    acc_loss = tl.zeros([BLOCK_T], tl.float32)
    acc_n = tl.zeros([BLOCK_T], tl.float32)
    acc_clip = tl.zeros([BLOCK_T], tl.float32)
    acc_v = tl.zeros([BLOCK_T], tl.float32)
    acc_sq = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        inb = cols < T
        ptr = row * T + cols
        valid = (tl.load(mask_ptr + ptr, mask=inb, other=0) != 0) & inb
        v = tl.load(v_ptr + ptr, mask=valid, other=0.0)
        old = tl.load(old_ptr + ptr, mask=valid, other=0.0)
        r = tl.load(ret_ptr + ptr, mask=valid, other=0.0)
        err = v - r
        sq = err * err
        sq_clip = sq
        if USE_CLIP:
            vc = tl.minimum(tl.maximum(v, old - clip), old + clip)
            sq_clip = (vc - r) * (vc - r)
        clipped = (sq_clip > sq) & valid
        acc_loss += tl.where(valid, 0.5 * tl.maximum(sq, sq_clip), 0.0)
        acc_n += valid.to(tl.float32)
        acc_clip += clipped.to(tl.float32)
        acc_v += tl.where(valid, v, 0.0)
        acc_sq += tl.where(valid, sq, 0.0)
        if NEED_GRAD:
            tl.store(dcoef_ptr + ptr, tl.where(valid & ~clipped, err, 0.0), mask=inb)
    out = rows_ptr + row * 5
    tl.store(out + 0, tl.sum(acc_loss, axis=0))
    tl.store(out + 1, tl.sum(acc_n, axis=0))
    tl.store(out + 2, tl.sum(acc_clip, axis=0))
    tl.store(out + 3, tl.sum(acc_v, axis=0))
    tl.store(out + 4, tl.sum(acc_sq, axis=0))


def value_rows(values, old_values, returns, mask, clip, need_grad):
    """fp32 [B, T] inputs, uint8 mask, clip < 0 = off -> (rows [B, 5], dcoef [B, T] or empty)."""
    b, t = values.shape
    rows = torch.zeros(b, 5, dtype=torch.float32, device=values.device)
    dcoef = torch.empty_like(values) if need_grad else values.new_empty(0)
    if b and t:
        value_rows_kernel[(b,)](
            values, old_values, returns, mask, rows, dcoef if need_grad else rows, t,
            max(clip, 0.0), USE_CLIP=clip >= 0, NEED_GRAD=need_grad,
            BLOCK_T=min(triton.next_power_of_2(t), 1024),
        )  # fmt: skip
    return rows, dcoef
