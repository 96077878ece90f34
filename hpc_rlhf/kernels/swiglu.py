"""Triton SwiGLU (see hpc_rlhf/ops/swiglu.py): out = silu(a) * b over rows x = [a | b].

A 2-D grid of (rows, column blocks); math in fp32 whatever the storage dtype. The backward
writes d/da = g b s (1 + a (1 - s)) and d/db = g a s (s = sigmoid(a)) into one [R, 2F]
gradient, reading only x and the output gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_gate_up(x_ptr, F, BLOCK_F: tl.constexpr):
    """This program's row, column block, bounds mask and fp32 halves a, b of x [R, 2F]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    inb = cols < F
    a = tl.load(x_ptr + row * 2 * F + cols, mask=inb, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * 2 * F + F + cols, mask=inb, other=0.0).to(tl.float32)
    return row, cols, inb, a, b


@triton.jit
def swiglu_fwd_kernel(
    x_ptr,  # [R, 2F]
    out_ptr,  # [R, F]
    F,
    BLOCK_F: tl.constexpr,
):
    row, cols, inb, a, b = _load_gate_up(x_ptr, F, BLOCK_F)
    out = a * tl.sigmoid(a) * b
    tl.store(out_ptr + row * F + cols, out.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def swiglu_bwd_kernel(
    x_ptr,  # [R, 2F]
    g_ptr,  # [R, F]
    dx_ptr,  # [R, 2F]
    F,
    BLOCK_F: tl.constexpr,
):
    row, cols, inb, a, b = _load_gate_up(x_ptr, F, BLOCK_F)
    g = tl.load(g_ptr + row * F + cols, mask=inb, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    da = g * b * s * (1.0 + a * (1.0 - s))
    db = g * a * s
    dty = dx_ptr.dtype.element_ty
    tl.store(dx_ptr + row * 2 * F + cols, da.to(dty), mask=inb)
    tl.store(dx_ptr + row * 2 * F + F + cols, db.to(dty), mask=inb)


def _grid(rows: int, width: int, block: int) -> tuple[int, int]:
    return rows, triton.cdiv(width, block)


def swiglu_fwd(x: torch.Tensor) -> torch.Tensor:
    """x [R, 2F] contiguous -> silu(a) * b [R, F] in x's dtype."""
    rows, width = x.shape[0], x.shape[1] // 2
    out = x.new_empty(rows, width)
    if rows and width:
        block = min(triton.next_power_of_2(width), 1024)
        swiglu_fwd_kernel[_grid(rows, width, block)](x, out, width, BLOCK_F=block)
    return out


def swiglu_bwd(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """x [R, 2F], grad_out [R, F] (contiguous) -> d(sum grad_out * swiglu(x))/dx [R, 2F]."""
    rows, width = x.shape[0], x.shape[1] // 2
    grad_x = torch.empty_like(x)
    if rows and width:
        block = min(triton.next_power_of_2(width), 1024)
        swiglu_bwd_kernel[_grid(rows, width, block)](x, grad_out, grad_x, width, BLOCK_F=block)
    return grad_x
