"""Triton kernel for the PPO policy loss (see hpc_rlhf/ops/ppo_loss.py): one program per
sequence writes the per-token derivative and the row sums
(loss, count, clipped, sum(old - logp), ratio sum, ratio max, dual-clipped)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def ppo_rows_kernel(
    logp_ptr,  # [B, T] fp32
    old_ptr,  # [B, T] fp32
    adv_ptr,  # [B, T] fp32
    mask_ptr,  # [B, T] uint8
    rows_ptr,  # [B, 7] fp32 out
    dcoef_ptr,  # [B, T] fp32 out (NEED_GRAD only)
    T,
    lo,
    hi,
    dual,
    USE_DUAL: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    acc_loss = tl.zeros([BLOCK_T], tl.float32)
    acc_n = tl.zeros([BLOCK_T], tl.float32)
    acc_clip = tl.zeros([BLOCK_T], tl.float32)
    acc_kl = tl.zeros([BLOCK_T], tl.float32)
    acc_ratio = tl.zeros([BLOCK_T], tl.float32)
    acc_max = tl.zeros([BLOCK_T], tl.float32)
    acc_dual = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        inb = cols < T
        ptr = row * T + cols
        valid = (tl.load(mask_ptr + ptr, mask=inb, other=0) != 0) & inb
        lp = tl.load(logp_ptr + ptr, mask=valid, other=0.0)
        old = tl.load(old_ptr + ptr, mask=valid, other=0.0)
        a = tl.load(adv_ptr + ptr, mask=valid, other=0.0)
        ratio = tl.exp(lp - old)
        unclipped = ratio * a
        clipped_term = tl.minimum(tl.maximum(ratio, lo), hi) * a
        clipped = clipped_term < unclipped
        loss = -tl.minimum(unclipped, clipped_term)
        d = tl.where(clipped, 0.0, -ratio * a)
        if USE_DUAL:
            dual_on = (a < 0) & (loss > -dual * a) & valid
            loss = tl.where(dual_on, -dual * a, loss)
            d = tl.where(dual_on, 0.0, d)
            acc_dual += dual_on.to(tl.float32)
        acc_loss += tl.where(valid, loss, 0.0)
        acc_n += valid.to(tl.float32)
        acc_clip += (clipped & valid).to(tl.float32)
        acc_kl += tl.where(valid, old - lp, 0.0)
        acc_ratio += tl.where(valid, ratio, 0.0)
        acc_max = tl.maximum(acc_max, tl.where(valid, ratio, 0.0))
        if NEED_GRAD:
            tl.store(dcoef_ptr + ptr, tl.where(valid, d, 0.0), mask=inb)
    out = rows_ptr + row * 7
    tl.store(out + 0, tl.sum(acc_loss, axis=0))
    tl.store(out + 1, tl.sum(acc_n, axis=0))
    tl.store(out + 2, tl.sum(acc_clip, axis=0))
    tl.store(out + 3, tl.sum(acc_kl, axis=0))
    tl.store(out + 4, tl.sum(acc_ratio, axis=0))
    tl.store(out + 5, tl.max(acc_max, axis=0))
    tl.store(out + 6, tl.sum(acc_dual, axis=0))


def ppo_rows(logp, old_logp, adv, mask, clip_low, clip_high, dual_clip, need_grad):
    """fp32 [B, T] inputs, uint8 mask -> (rows [B, 7], dcoef [B, T] or empty)."""
    b, t = logp.shape
    rows = torch.zeros(b, 7, dtype=torch.float32, device=logp.device)
    dcoef = torch.empty_like(logp) if need_grad else logp.new_empty(0)
    if b and t:
        ppo_rows_kernel[(b,)](
            logp, old_logp, adv, mask, rows, dcoef if need_grad else rows, t,
            1.0 - clip_low, 1.0 + clip_high, dual_clip, USE_DUAL=dual_clip > 0,
            NEED_GRAD=need_grad, BLOCK_T=min(triton.next_power_of_2(t), 1024),
        )  # fmt: skip
    return rows, dcoef
