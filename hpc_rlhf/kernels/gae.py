"""Triton kernel for masked GAE (see hpc_rlhf/ops/gae.py): each program owns BLOCK_B
sequences and walks time backwards, carrying the next valid value and advantage."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def gae_kernel(
    r_ptr,  # [B, T] fp32 rewards
    v_ptr,  # [B, T] fp32 values
    mask_ptr,  # [B, T] uint8
    adv_ptr,  # [B, T] fp32 out
    ret_ptr,  # [B, T] fp32 out
    B,
    T,
    gamma,
    gamma_lam,
    BLOCK_B: tl.constexpr,
):
    seqs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = seqs < B
    row = seqs.to(tl.int64) * T
    next_v = tl.zeros([BLOCK_B], tl.float32)
    next_a = tl.zeros([BLOCK_B], tl.float32)
    for i in range(0, T):
        t = T - 1 - i
        ok = tl.load(mask_ptr + row + t, mask=live, other=0) != 0
        r = tl.load(r_ptr + row + t, mask=live, other=0.0)
        v = tl.load(v_ptr + row + t, mask=live, other=0.0)
        a = r + gamma * next_v - v + gamma_lam * next_a
        tl.store(adv_ptr + row + t, tl.where(ok, a, 0.0), mask=live)
        tl.store(ret_ptr + row + t, tl.where(ok, a + v, 0.0), mask=live)
        next_v = tl.where(ok, v, next_v)
        next_a = tl.where(ok, a, next_a)


def gae_fwd(rewards, values, mask, gamma: float, lam: float):
    """rewards, values [B, T] fp32, mask [B, T] uint8 -> (advantages, returns) fp32 [B, T]."""
    b, t = rewards.shape
    adv, ret = torch.empty_like(rewards), torch.empty_like(rewards)
    block_b = 32
    if b and t:
        gae_kernel[(triton.cdiv(b, block_b),)](
            rewards, values, mask, adv, ret, b, t, gamma, gamma * lam, BLOCK_B=block_b,
            num_warps=1,
        )  # fmt: skip
    return adv, ret
