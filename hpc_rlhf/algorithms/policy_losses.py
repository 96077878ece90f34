"""Policy losses beside PPO's token-level clip (``ops.ppo_policy_loss``): GSPO's
sequence-level ratio, GRPO's KL penalty in the loss, and truncated importance sampling (TIS)
against the generation engine's log-probs. Pure tensor functions; the trainer applies them
(``trainer.losses.actor_loss_fn``, ``trainer.ppo``).
"""

from __future__ import annotations

import torch

from hpc_rlhf.algorithms.kl import kl_estimate


def gspo_policy_loss(
    logp_BS: torch.Tensor,
    old_logp_BS: torch.Tensor,
    advantages_BS: torch.Tensor,
    mask_BS: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025): the sequence's importance ratio is the geometric mean of its
    token ratios, ``s_i = exp(mean_t (logp - old_logp))``, clipped to
    ``[1 - clip_low, 1 + clip_high]`` as PPO clips token ratios; the loss is
    ``-min(s_i A_i, clip(s_i) A_i)`` averaged over the micro-batch's sequences (rows with a
    valid token). ``A_i`` is the row's mean advantage over its valid tokens (the GRPO family
    gives every token of a sequence the same one). Returns ``(loss, stats)``: the fraction
    of sequences whose ratio was clipped, and the largest ratio."""
    mask = mask_BS.to(logp_BS.dtype)
    n_B = mask.sum(dim=1)
    live_B = n_B > 0
    n_B = n_B.clamp(min=1.0)
    log_ratio_B = ((logp_BS - old_logp_BS) * mask).sum(dim=1) / n_B
    ratio_B = log_ratio_B.exp()
    adv_B = (advantages_BS.to(logp_BS.dtype) * mask).sum(dim=1) / n_B
    clipped_B = ratio_B.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_B = -torch.minimum(ratio_B * adv_B, clipped_B * adv_B)
    n_seq = live_B.sum().clamp(min=1)
    loss = (loss_B * live_B).sum() / n_seq
    with torch.no_grad():
        was_clipped_B = (clipped_B != ratio_B) & live_B
        stats = {
            "clip_fraction": was_clipped_B.sum().float() / n_seq,
            "ratio_max": ratio_B.masked_fill(~live_B, 0.0).max(),
        }
    return loss, stats


def truncated_is_weights(
    trainer_logp_BS: torch.Tensor, engine_logp_BS: torch.Tensor, mask_BS: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance-sampling weights ``min(pi_trainer / pi_engine, cap)`` per valid
    token (zero elsewhere): the rollouts were sampled by the engine, whose log-probs differ
    from the trainer's (dtype, kernels). Also the mismatch it corrects, as sums over this
    rank's valid tokens (``*_sum``, with ``tokens``) and a maximum: ``kl_k1`` and ``kl_k3``
    estimate KL(engine || trainer) on the engine's samples, ``ratio_max`` is the largest
    ratio, ``clipped`` counts the truncated tokens."""
    mask = mask_BS.bool()
    log_ratio_BS = (trainer_logp_BS.double() - engine_logp_BS.double()).masked_fill(~mask, 0.0)
    ratio_BS = log_ratio_BS.exp()
    weights_BS = ratio_BS.clamp(max=cap).masked_fill(~mask, 0.0).float()
    stats = {
        "kl_k1_sum": (-log_ratio_BS).sum(),
        "kl_k3_sum": ((ratio_BS - 1.0) - log_ratio_BS).masked_fill(~mask, 0.0).sum(),
        "clipped_sum": ((ratio_BS > cap) & mask).sum().double(),
        "tokens": mask.sum().double(),
        "ratio_max": ratio_BS.masked_fill(~mask, 0.0).max(),
    }
    return weights_BS, stats


def kl_loss(
    logp_BS: torch.Tensor,
    ref_logp_BS: torch.Tensor,
    mask_BS: torch.Tensor,
    estimator: str = "k3",
    reduction: str = "token_mean",
) -> torch.Tensor:
    """GRPO's KL term in the loss (Shao et al. 2024; verl's ``use_kl_loss``, TRL's ``beta``):
    the per-token estimate of KL(pi || pi_ref) (``estimator``: k1, k2 or k3, the paper's)
    differentiated through the policy's log-probs, reduced as the policy loss is: a mean
    over the valid tokens (``token_mean`` / ``token_sum``, whose constant denominator the
    trainer applies) or over sequences of their token means (``seq_mean``)."""
    mask = mask_BS.to(torch.float32)
    kl_BS = kl_estimate(logp_BS, ref_logp_BS, estimator) * mask
    if reduction == "seq_mean":
        n_B = mask.sum(dim=1)
        live_B = n_B > 0
        per_seq_B = kl_BS.sum(dim=1) / n_B.clamp(min=1.0)
        return (per_seq_B * live_B).sum() / live_B.sum().clamp(min=1)
    return kl_BS.sum() / mask.sum().clamp(min=1.0)
