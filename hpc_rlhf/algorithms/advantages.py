"""Advantage estimators, registered by name: ``gae``, ``grpo``, ``rloo``, ``drgrpo``
(Dr.GRPO: GRPO without the division by the group's std), ``reinforce_pp`` (REINFORCE++:
per-token discounted returns of the KL-penalised rewards, no critic, normalised over the
whole batch by the trainer's whitening) and ``reinforce_pp_baseline`` (the same minus the
mean return of the prompt's group).

All take one signature (``compute_advantages``) and are pure tensor functions returning
``(advantages_BS, returns_BS)`` (fp32, zero where ``mask_BS`` is false). ``whiten`` normalises over the valid tokens, optionally across the
ranks of an explicit process group (the data-parallel group) so every rank uses the same
global statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hpc_rlhf.parallel.comm import group_sum

ADVANTAGES: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        ADVANTAGES[name] = fn
        return fn

    return deco


def compute_advantages(
    name: str,
    rewards_BS: torch.Tensor,
    mask_BS: torch.Tensor,
    values_BS: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    group_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages_BS, returns_BS)`` of the estimator registered as ``name``.

    Every estimator takes the same inputs: token rewards ``rewards_BS`` (zero off
    ``mask_BS``; a sequence's return is their sum), the critic's ``values_BS`` (GAE only)
    and the number of samples per prompt ``group_size`` (consecutive rows; the group
    estimators only)."""
    if name not in ADVANTAGES:
        raise ValueError(
            f"unknown advantage estimator {name!r}; expected one of {sorted(ADVANTAGES)}"
        )
    return ADVANTAGES[name](
        rewards_BS, mask_BS, values_BS, gamma=gamma, lam=lam, group_size=group_size
    )


@register("gae")
def gae_advantages(rewards_BS, mask_BS, values_BS, *, gamma, lam, group_size):
    """Generalised advantage estimation over valid tokens (``hpc_rlhf.ops.masked_gae``)."""
    from hpc_rlhf.ops import masked_gae

    if values_BS is None:
        raise ValueError("the gae advantage needs critic values")
    return masked_gae(rewards_BS.float(), values_BS.float(), mask_BS, gamma=gamma, lam=lam)


def _group_returns(rewards_BS: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[G, n]`` sequence returns (summed token rewards) of ``group_size`` samples each."""
    B = rewards_BS.shape[0]
    if B % group_size:
        raise ValueError(f"batch of {B} is not a multiple of group size {group_size}")
    return rewards_BS.float().sum(dim=1).view(-1, group_size)


@register("grpo")
def grpo_advantages(rewards_BS, mask_BS, values_BS, *, gamma, lam, group_size, eps=1e-6):
    """GRPO: each sample's return minus its group's mean (over the ``n`` samples of a
    prompt), divided by the group's std; the same advantage on every valid token."""
    returns_Gn = _group_returns(rewards_BS, group_size)
    adv_Gn = returns_Gn - returns_Gn.mean(dim=1, keepdim=True)
    adv_Gn = adv_Gn / (returns_Gn.std(dim=1, keepdim=True, unbiased=True) + eps)
    adv_BS = adv_Gn.reshape(-1, 1) * mask_BS.float()
    return adv_BS, adv_BS.clone()


@register("rloo")
def rloo_advantages(rewards_BS, mask_BS, values_BS, *, gamma, lam, group_size):
    """RLOO: each sample's return minus the mean return of the other samples of its prompt."""
    if group_size < 2:
        raise ValueError("rloo needs at least 2 samples per prompt")
    returns_Gn = _group_returns(rewards_BS, group_size)
    baseline_Gn = (returns_Gn.sum(dim=1, keepdim=True) - returns_Gn) / (group_size - 1)
    adv_BS = (returns_Gn - baseline_Gn).reshape(-1, 1) * mask_BS.float()
    return adv_BS, adv_BS.clone()


@register("drgrpo")
def drgrpo_advantages(rewards_BS, mask_BS, values_BS, *, gamma, lam, group_size):
    """Dr.GRPO (Liu et al. 2025): each sample's return minus its group's mean, *not*
    divided by the group's std (which up-weights prompts whose samples all agree)."""
    returns_Gn = _group_returns(rewards_BS, group_size)
    adv_BS = (returns_Gn - returns_Gn.mean(dim=1, keepdim=True)).reshape(-1, 1)
    adv_BS = adv_BS * mask_BS.float()
    return adv_BS, adv_BS.clone()


def _token_returns(rewards_BS, mask_BS, gamma: float) -> torch.Tensor:
    """``G_t = sum_k gamma^k r_{t+k}`` over each row's valid tokens (GAE with zero values
    and lambda 1: ``ops.masked_gae``)."""
    from hpc_rlhf.ops import masked_gae

    zeros_BS = torch.zeros_like(rewards_BS, dtype=torch.float32)
    returns_BS, _ = masked_gae(rewards_BS.float(), zeros_BS, mask_BS, gamma=gamma, lam=1.0)
    return returns_BS


@register("reinforce_pp")
def reinforce_pp_advantages(rewards_BS, mask_BS, values_BS, *, gamma, lam, group_size):
    """REINFORCE++ (Hu 2025): the advantage of token ``t`` is its discounted return of
    KL-penalised token rewards; normalised over the global batch by the trainer's
    whitening (``ppo.whiten_advantages``, required)."""
    returns_BS = _token_returns(rewards_BS, mask_BS, gamma)
    return returns_BS.clone(), returns_BS


@register("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(rewards_BS, mask_BS, values_BS, *, gamma, lam, group_size):
    """REINFORCE++-baseline: token returns minus the mean sequence return of the prompt's
    ``group_size`` samples (then the global batch normalisation of ``reinforce_pp``)."""
    returns_BS = _token_returns(rewards_BS, mask_BS, gamma)
    baseline_Gn = _group_returns(rewards_BS, group_size).mean(dim=1, keepdim=True)
    baseline_B1 = baseline_Gn.expand(-1, group_size).reshape(-1, 1)
    adv_BS = (returns_BS - baseline_B1) * mask_BS.float()
    return adv_BS, returns_BS


def masked_mean_var(x_BS: torch.Tensor, mask_BS: torch.Tensor, group=None):
    """Mean and (biased) variance over valid tokens, across ``group`` when given."""
    mask_BS = mask_BS.float()
    stats = torch.stack([(x_BS * mask_BS).sum(), (x_BS.square() * mask_BS).sum(), mask_BS.sum()])
    stats = group_sum(stats.double(), group)
    count = stats[2].clamp(min=1.0)
    mean = stats[0] / count
    var = (stats[1] / count - mean.square()).clamp(min=0.0)
    return mean.float(), var.float()


def whiten(
    x_BS: torch.Tensor,
    mask_BS: torch.Tensor,
    group=None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``(x - mean) / std`` over the valid tokens (of every rank in ``group``); 0 elsewhere."""
    mean, var = masked_mean_var(x_BS, mask_BS, group)
    out_BS = (x_BS - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out_BS = out_BS + mean
    return out_BS * mask_BS.float()
