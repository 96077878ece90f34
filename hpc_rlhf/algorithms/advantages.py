"""Advantage estimators, registered by name: ``gae``, ``grpo``, ``rloo``.

All are pure tensor functions returning ``(advantages_BT, returns_BT)`` (fp32, zero where
``mask_BT`` is false). ``whiten`` normalises over the valid tokens, optionally across the
ranks of an explicit process group (the data-parallel group) so every rank uses the same
global statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ADVANTAGES: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        ADVANTAGES[name] = fn
        return fn

    return deco


def compute_advantages(name: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the estimator registered as ``name``."""
    if name not in ADVANTAGES:
        raise ValueError(
            f"unknown advantage estimator {name!r}; expected one of {sorted(ADVANTAGES)}"
        )
    return ADVANTAGES[name](**kwargs)


@register("gae")
def gae_advantages(rewards_BT, values_BT, mask_BT, gamma=1.0, lam=0.95, backend="auto", **_):
    """Generalised advantage estimation over valid tokens (``hpc_rlhf.ops.masked_gae``)."""
    from hpc_rlhf.ops import masked_gae

    return masked_gae(
        rewards_BT.float(), values_BT.float(), mask_BT, gamma=gamma, lam=lam, backend=backend
    )


def _group_scores(score_B: torch.Tensor, group_size: int) -> torch.Tensor:
    if score_B.shape[0] % group_size:
        raise ValueError(
            f"batch of {score_B.shape[0]} is not a multiple of group size {group_size}"
        )
    return score_B.float().view(-1, group_size)


@register("grpo")
def grpo_advantages(score_B, mask_BT, group_size: int, eps: float = 1e-6, scale: bool = True, **_):
    """GRPO: each sample's score minus its group's mean (over the ``n`` samples of a prompt),
    divided by the group's std when ``scale``; the same advantage on every valid token."""
    scores_GN = _group_scores(score_B, group_size)
    adv_GN = scores_GN - scores_GN.mean(dim=1, keepdim=True)
    if scale:
        adv_GN = adv_GN / (scores_GN.std(dim=1, keepdim=True, unbiased=True) + eps)
    adv_BT = adv_GN.reshape(-1, 1) * mask_BT.float()
    return adv_BT, adv_BT.clone()


@register("rloo")
def rloo_advantages(score_B, mask_BT, group_size: int, **_):
    """RLOO: each sample's score minus the mean score of the other samples of its prompt."""
    if group_size < 2:
        raise ValueError("rloo needs at least 2 samples per prompt")
    scores_GN = _group_scores(score_B, group_size)
    baseline_GN = (scores_GN.sum(dim=1, keepdim=True) - scores_GN) / (group_size - 1)
    adv_BT = (scores_GN - baseline_GN).reshape(-1, 1) * mask_BT.float()
    return adv_BT, adv_BT.clone()


def masked_mean_var(x_BT: torch.Tensor, mask_BT: torch.Tensor, group=None):
    """Mean and (biased) variance over valid tokens, across ``group`` when given."""
    import torch.distributed as dist

    mask_BT = mask_BT.float()
    stats = torch.stack([(x_BT * mask_BT).sum(), (x_BT.square() * mask_BT).sum(), mask_BT.sum()])
    stats = stats.double()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(stats, group=group)
    count = stats[2].clamp(min=1.0)
    mean = stats[0] / count
    var = (stats[1] / count - mean.square()).clamp(min=0.0)
    return mean.float(), var.float()


def whiten(
    x_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    group=None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``(x - mean) / std`` over the valid tokens (of every rank in ``group``); 0 elsewhere."""
    mean, var = masked_mean_var(x_BT, mask_BT, group)
    out_BT = (x_BT - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out_BT = out_BT + mean
    return out_BT * mask_BT.float()
