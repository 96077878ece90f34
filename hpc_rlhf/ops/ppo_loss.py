"""PPO clipped policy loss (with optional dual clip) over masked tokens.

Shapes: B sequences, T tokens. Per token ``ratio = exp(logp - old_logp)`` and
``l = -min(ratio * A, clamp(ratio, 1 - clip_low, 1 + clip_high) * A)``; with ``dual_clip=c``
tokens with ``A < 0`` use ``min(l, -c * A)``. The derivative w.r.t. logp is ``-ratio * A``
unless a clip bound is active (then 0), as autograd of the formula gives.

Backends return ``rows [B, 7]`` = (loss sum, valid count, clipped count, sum(old - logp),
ratio sum, ratio max (0 for empty rows), dual-clipped count) and ``dcoef [B, T]``.
"""

from __future__ import annotations

import torch

from hpc_rlhf.ops import _backend
from hpc_rlhf.ops._loss_common import RowLoss, check_reduction, check_shapes, reduce_rows


def _ppo_rows_torch(logp, old, adv, mask, clip_low, clip_high, dual_clip, need_grad):
    """Reference per-row sums and per-token derivative (fp32; dual_clip <= 0 means off)."""
    valid = mask.bool()  # [B, T]
    ratio = torch.exp(logp - old)  # [B, T]
    unclipped = ratio * adv
    clipped_term = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped_term)
    clipped = clipped_term < unclipped
    dcoef = torch.where(clipped, 0.0, -ratio * adv)
    dual = torch.zeros_like(valid)
    if dual_clip > 0:
        dual = (adv < 0) & (loss > -dual_clip * adv)
        loss = torch.where(dual, -dual_clip * adv, loss)
        dcoef = torch.where(dual, 0.0, dcoef)

    def vsum(x):
        return torch.where(valid, x, 0.0).sum(dim=1)  # [B]

    rows = torch.stack(
        [
            vsum(loss),
            valid.sum(dim=1).float(),
            (clipped & valid).sum(dim=1).float(),
            vsum(old - logp),
            vsum(ratio),
            torch.where(valid, ratio, 0.0).amax(dim=1),
            (dual & valid).sum(dim=1).float(),
        ],
        dim=1,
    )
    return rows, torch.where(valid, dcoef, 0.0)


def _impl(backend: str):
    return _backend.implementation(backend, _ppo_rows_torch, "ppo_loss", "ppo_rows")


def ppo_policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    reduction="token_mean",
    backend="auto",
):
    """Clipped PPO policy loss over valid tokens, differentiable w.r.t. ``logp``.

    Args:
        logp, old_logp, advantages: ``[B, T]`` (new log-probs, behaviour log-probs, A).
        mask: ``[B, T]`` bool of valid tokens.
        clip_low, clip_high: ratio bounds ``[1 - clip_low, 1 + clip_high]``.
        dual_clip: c > 1 caps the loss of negative-advantage tokens at ``-c * A``.
        reduction: "token_mean" (over all valid tokens) or "seq_mean" (per sequence, then
            over sequences that have a valid token).
        backend: "auto", "torch", "cpp", "cuda" or "triton".

    Returns:
        ``(loss, stats)``: fp32 scalar (0 with zero gradient for a fully masked batch) and
        fp32 scalars ``clip_frac``, ``approx_kl`` (mean old_logp - logp), ``ratio_mean``,
        ``ratio_max`` (+ ``dual_clip_frac`` with dual clip), all over valid tokens.
    """
    check_shapes("ppo_policy_loss", logp, old_logp, advantages, mask)
    check_reduction(reduction)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    chosen = _backend.resolve("ppo_policy_loss", backend, logp.device)
    args = [t.detach().float().contiguous() for t in (logp, old_logp, advantages)]
    m = mask.to(torch.bool).contiguous().view(torch.uint8)  # [B, T]
    rows, dcoef = _impl(chosen)(
        *args, m, float(clip_low), float(clip_high), float(dual_clip or 0.0), logp.requires_grad
    )
    loss = RowLoss.apply(logp, rows, dcoef, reduction)
    _, _, n_valid = reduce_rows(rows, reduction)
    stats = {
        "clip_frac": rows[:, 2].sum() / n_valid,
        "approx_kl": rows[:, 3].sum() / n_valid,
        "ratio_mean": rows[:, 4].sum() / n_valid,
        "ratio_max": rows[:, 5].max() if rows.shape[0] else rows.new_zeros(()),
    }
    if dual_clip is not None:
        stats["dual_clip_frac"] = rows[:, 6].sum() / n_valid
    return loss, stats
