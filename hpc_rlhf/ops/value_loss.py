"""Clipped value loss over masked tokens.

Per token ``l = 0.5 * max((v - R)^2, (clamp(v, old - clip, old + clip) - R)^2)`` (no clamp
when ``clip`` is None); its derivative w.r.t. v is ``v - R`` unless the clipped term is the
larger one (then 0). Backends return ``rows [B, 5]`` = (loss sum, valid count, clipped
count, value sum, squared-error sum) and ``dcoef [B, T]``.
"""

from __future__ import annotations

import torch

from hpc_rlhf.ops import _backend
from hpc_rlhf.ops._loss_common import RowLoss, check_reduction, check_shapes, reduce_rows


def _value_rows_torch(values, old_values, returns, mask, clip, need_grad):
    """Reference per-row sums and per-token derivative (fp32; clip < 0 means off)."""
    valid = mask.bool()  # [B, T]
    err = values - returns
    sq = err * err
    if clip >= 0:
        v_clip = torch.minimum(torch.maximum(values, old_values - clip), old_values + clip)
        sq_clip = (v_clip - returns) ** 2
        clipped = sq_clip > sq
        loss = 0.5 * torch.maximum(sq, sq_clip)
    else:
        clipped = torch.zeros_like(valid)
        loss = 0.5 * sq
    dcoef = torch.where(clipped | ~valid, 0.0, err)

    def vsum(x):
        return torch.where(valid, x, 0.0).sum(dim=1)  # [B]

    rows = torch.stack(
        [
            vsum(loss),
            valid.sum(dim=1).float(),
            (clipped & valid).sum(dim=1).float(),
            vsum(values),
            vsum(sq),
        ],
        dim=1,
    )
    return rows, dcoef


def _impl(backend: str):
    return _backend.implementation(backend, _value_rows_torch, "value_loss", "value_rows")


def value_loss(
    values, old_values, returns, mask, *, clip=0.2, reduction="token_mean", backend="auto"
):
    """Clipped value loss over valid tokens, differentiable w.r.t. ``values``.

    Args:
        values, old_values, returns: ``[B, T]``.
        mask: ``[B, T]`` bool of valid tokens.
        clip: clip range around ``old_values``; None disables clipping.
        reduction: "token_mean" or "seq_mean" (as in ``ppo_policy_loss``).
        backend: "auto", "torch", "cpp", "cuda" or "triton".

    Returns:
        ``(loss, stats)``: fp32 scalar (0 with zero gradient when fully masked) and fp32
        scalars ``clip_frac``, ``value_mean`` and ``value_mse`` (mean (v - R)^2) over valid
        tokens.
    """
    check_shapes("value_loss", values, old_values, returns, mask)
    check_reduction(reduction)
    if clip is not None and clip < 0:
        raise ValueError(f"clip must be >= 0 or None, got {clip}")
    chosen = _backend.resolve("value_loss", backend, values.device)
    args = [t.detach().float().contiguous() for t in (values, old_values, returns)]
    m = mask.to(torch.bool).contiguous().view(torch.uint8)  # [B, T]
    c = -1.0 if clip is None else float(clip)
    rows, dcoef = _impl(chosen)(*args, m, c, values.requires_grad)
    loss = RowLoss.apply(values, rows, dcoef, reduction)
    _, _, n_valid = reduce_rows(rows, reduction)
    stats = {
        "clip_frac": rows[:, 2].sum() / n_valid,
        "value_mean": rows[:, 3].sum() / n_valid,
        "value_mse": rows[:, 4].sum() / n_valid,
    }
    return loss, stats
