"""Shared reduction of the loss ops.

Each backend reduces every sequence (row) of a loss to a few fp32 partial sums
(``rows [B, K]``: loss sum, valid count, then op-specific counts/sums) and writes the
per-token derivative ``dcoef [B, T]`` of the unreduced loss (0 at masked positions). This
module turns them into the reduced loss and the per-row weight its gradient needs.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("token_mean", "seq_mean")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_shapes(name: str, *tensors) -> None:
    shape = tensors[0].shape
    if tensors[0].dim() != 2 or any(t.shape != shape for t in tensors):
        got = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise ValueError(f"{name}: all inputs must share one [B, T] shape, got {got}")


def reduce_rows(rows: torch.Tensor, reduction: str):
    """rows [B, K] (col 0 loss sum, col 1 count) -> (loss scalar, row weight [B], n_valid)."""
    count = rows[:, 1]  # [B]
    total = count.sum()
    if reduction == "token_mean":
        denom = total.clamp(min=1.0)
        return rows[:, 0].sum() / denom, (1.0 / denom).expand_as(count), denom
    nonempty = count > 0  # [B]
    n_seq = nonempty.sum().clamp(min=1).float()
    per_seq = rows[:, 0] / count.clamp(min=1.0)  # [B]
    weight = nonempty.float() / (count.clamp(min=1.0) * n_seq)  # [B]
    return per_seq.sum() / n_seq, weight, total.clamp(min=1.0)


class RowLoss(torch.autograd.Function):
    """loss = reduce(rows); d loss / d x = g * dcoef * weight[row]. x is the one input."""

    @staticmethod
    def forward(ctx, x, rows, dcoef, reduction):
        loss, weight, _ = reduce_rows(rows, reduction)
        ctx.save_for_backward(dcoef, weight)
        ctx.x_dtype = x.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        dcoef, weight = ctx.saved_tensors
        grad = (g * weight[:, None]) * dcoef  # [B, T]
        return grad.to(ctx.x_dtype), None, None, None
