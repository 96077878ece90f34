"""The per-micro-batch functions trainers hand to ``TrainableModel``: losses for
``train_step`` and scoring functions for ``infer``.

A loss function is ``fn(mb, output) -> (loss_sum, count, metrics)`` (see
``trainer.trainable_model``); a scoring function ``fn(mb, output) -> {name: tensor}``.
They read vocab-parallel logits ``[B, S, V/tp]`` (or ``[1, N, V/tp]`` at the selected
positions) through the fused ``ops.token_logprobs`` over the TP group, so no rank
materialises a full-vocabulary log-softmax; scalar heads' outputs are ``[B, S, 1]``.

PPO's losses are pre-normalised by global counts (``normalize="none"``): token-mean (or
sequence-mean) PPO over every valid token of the mini-batch on every data-parallel rank,
plus ``ptx_coef`` x the LM loss over the ptx tokens, minus ``entropy_coef`` x the mean
entropy; the value loss likewise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpc_rlhf.algorithms.policy_losses import gspo_policy_loss, kl_loss
from hpc_rlhf.config import PPOConfig
from hpc_rlhf.models.heads import end_scores
from hpc_rlhf.models.runner import MicroBatch, logprobs_from_output
from hpc_rlhf.ops import ppo_policy_loss, value_loss


@dataclass(kw_only=True)
class RolloutMicroBatch(MicroBatch):
    """A PPO micro-batch: ``loss_mask_BS`` (and ``head_mask_BS``) are the action positions;
    the per-token quantities are on action positions (see ``trainer.experience``)."""

    old_logp_BS: torch.Tensor | None = None
    ref_logp_BS: torch.Tensor | None = None  # ppo.kl_loss_coef: the reference's log-probs
    advantages_BS: torch.Tensor | None = None
    returns_BS: torch.Tensor | None = None
    values_BS: torch.Tensor | None = None
    cost_returns_BS: torch.Tensor | None = None  # PPO-Lagrangian's cost critic
    cost_values_BS: torch.Tensor | None = None


@dataclass(frozen=True)
class GlobalCounts:
    """Valid tokens / sequences of one mini-batch summed over data-parallel ranks."""

    tokens: float
    sequences: float
    ptx_tokens: float = 0.0
    norm_tokens: float = 0.0  # loss_reduction token_sum: sequences x generation.max_new_tokens


def _required(value: torch.Tensor | None, name: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"this loss needs a micro-batch with {name}")
    return value


# ----------------------------------------------------------------------------- language model


def lm_nll(mb: MicroBatch, logits: torch.Tensor, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll_sum, token_count)``: next-token negative log-likelihood of ``mb.labels_BS``
    summed over ``mb.loss_mask_BS``."""
    logp_BS = logprobs_from_output(mb, logits, tp_group, loss_only=True)
    mask_BS = _required(mb.loss_mask_BS, "loss_mask_BS").to(logp_BS.dtype)
    return -(logp_BS * mask_BS).sum(), mask_BS.sum()


def lm_loss_fn(tp_group) -> Callable:
    """Masked next-token cross entropy for ``train_step`` (``normalize="count"``):
    ``(nll_sum, tokens, {"loss": mean})``."""

    def fn(mb: MicroBatch, logits: torch.Tensor):
        nll_sum, count = lm_nll(mb, logits, tp_group)
        return nll_sum, count.long(), {"loss": nll_sum.detach() / count.clamp(min=1)}

    return fn


def ranking_loss_fn(regularization: float, objective: str = "reward") -> Callable:
    """Reward- or cost-model loss for ``train_step`` (``normalize="count"``, count =
    samples): ``algorithms.ranking``'s pairwise loss on the end scores of a
    ``PreferenceMicroBatch``; metrics are per-sample means."""
    from hpc_rlhf.algorithms.ranking import cost_ranking_loss, pairwise_ranking_loss

    def fn(mb, scores_BS1: torch.Tensor):
        scores_B = end_scores(scores_BS1.squeeze(-1).float(), mb.attention_mask_BS)
        if objective == "cost":
            unsafe_B = _required(mb.unsafe_B, "unsafe_B (safety labels)")
            loss_sum, sums = cost_ranking_loss(
                scores_B, mb.pairs_P2, unsafe_B, mb.pair_weights_P, regularization
            )
        else:
            loss_sum, sums = pairwise_ranking_loss(
                scores_B, mb.pairs_P2, mb.margins_P, mb.pair_weights_P, regularization
            )
        n = mb.n_samples
        metrics = {"loss": loss_sum.detach() / n, **{k: v / n for k, v in sums.items()}}
        return loss_sum, n, metrics

    return fn


def sequence_logps(mb: MicroBatch, logits: torch.Tensor, tp_group, loss_only: bool = True):
    """``(logps_B, tokens_B)``: each row's summed log-prob of its ``loss_mask_BS`` tokens
    (a response) and their number."""
    logp_BS = logprobs_from_output(mb, logits, tp_group, loss_only=loss_only)
    mask_BS = _required(mb.loss_mask_BS, "loss_mask_BS").to(logp_BS.dtype)
    return (logp_BS * mask_BS).sum(dim=1), mask_BS.sum(dim=1)


def sequence_logps_fn(tp_group) -> Callable:
    """Scoring function: ``{"logps": [B]}``, each row's summed response log-prob (a frozen
    reference's, for DPO)."""

    def fn(mb: MicroBatch, logits: torch.Tensor) -> dict:
        return {"logps": sequence_logps(mb, logits, tp_group, loss_only=False)[0].double()}

    return fn


def preference_loss_fn(name: str, params, tp_group) -> Callable:
    """A DPO-family loss (``algorithms.preference``, registered as ``name``) for
    ``train_step`` (``normalize="count"``, count = samples) on a policy
    ``PreferenceMicroBatch``: each pair weighted by ``pair_weights_P`` (1 / pairs of its
    sample). Metrics as TRL names them: ``rewards/{chosen,rejected,margins,accuracies}``
    (implicit rewards), ``logps/{chosen,rejected}`` (summed), per-sample means."""
    from hpc_rlhf.algorithms.preference import REFERENCE_FREE, PairLogps, preference_loss

    def fn(mb, logits: torch.Tensor):
        logps_B, tokens_B = sequence_logps(mb, logits, tp_group)
        better_P, worse_P = mb.pairs_P2[:, 0], mb.pairs_P2[:, 1]
        ref_B = None
        if name not in REFERENCE_FREE:
            ref_B = _required(mb.ref_logps_B, "ref_logps_B (reference log-probs)")
            ref_B = ref_B.to(logps_B.dtype)
        pairs = PairLogps(
            logps_B[better_P],
            logps_B[worse_P],
            tokens_B[better_P],
            tokens_B[worse_P],
            None if ref_B is None else ref_B[better_P],
            None if ref_B is None else ref_B[worse_P],
        )
        loss_P, chosen_P, rejected_P = preference_loss(name, pairs, params)
        w_P, n = mb.pair_weights_P.to(loss_P.dtype), mb.n_samples
        loss_sum = (w_P * loss_P).sum()
        metrics = {
            "loss": loss_sum.detach() / n,
            "rewards/chosen": (w_P * chosen_P).sum() / n,
            "rewards/rejected": (w_P * rejected_P).sum() / n,
            "rewards/margins": (w_P * (chosen_P - rejected_P)).sum() / n,
            "rewards/accuracies": (w_P * (chosen_P > rejected_P)).sum() / n,
            "logps/chosen": (w_P * pairs.policy_chosen_P.detach()).sum() / n,
            "logps/rejected": (w_P * pairs.policy_rejected_P.detach()).sum() / n,
        }
        return loss_sum, n, metrics

    return fn


def kto_loss_fn(params, tp_group) -> Callable:
    """KTO (``algorithms.preference.kto_loss``) for ``train_step`` (``normalize="count"``,
    count = completions) on a ``KTOMicroBatch`` whose ``reference_point`` is set. Metrics:
    ``loss``, ``kl`` (z0), ``rewards/chosen`` / ``rewards/rejected`` and ``logps/chosen``
    / ``logps/rejected`` (means over the desirable / undesirable completions of the
    micro-batches that have them)."""
    from hpc_rlhf.algorithms.preference import kto_loss

    def fn(mb, logits: torch.Tensor):
        logps_B, _ = sequence_logps(mb, logits, tp_group)
        ref_B = _required(mb.ref_logps_B, "ref_logps_B (reference log-probs)")
        z0 = _required(mb.reference_point, "reference_point (KTO's z0)")
        desirable_B = mb.desirable_B.bool()
        loss_B, reward_B = kto_loss(logps_B, ref_B.to(logps_B.dtype), desirable_B, z0, params)
        n = mb.n_samples
        metrics = {"loss": loss_B.sum().detach() / n, "kl": z0.detach()}
        for name, rows_B in (("chosen", desirable_B), ("rejected", ~desirable_B)):
            if bool(rows_B.any()):
                metrics[f"rewards/{name}"] = reward_B[rows_B].mean()
                metrics[f"logps/{name}"] = logps_B.detach()[rows_B].mean()
        return loss_B.sum(), n, metrics

    return fn


# ----------------------------------------------------------------------------- scoring


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits at the sampling temperature (the policy PPO optimises is softmax(logits/T))."""
    return logits if temperature == 1.0 else logits / temperature


def logprobs_fn(tp_group, temperature: float = 1.0, entropy: bool = False) -> Callable:
    """Scoring function: ``{"logp": [B, S]}`` (+ ``"entropy"``) of an LM model."""

    def fn(mb: MicroBatch, logits: torch.Tensor) -> dict:
        out = logprobs_from_output(mb, scaled_logits(logits, temperature), tp_group, entropy)
        if entropy:
            return {"logp": out[0], "entropy": out[1]}
        return {"logp": out}

    return fn


def values_fn(mb: MicroBatch, values_BS1: torch.Tensor) -> dict:
    """Scoring function: a value model's per-token values ``{"values": [B, S]}``."""
    return {"values": values_BS1.squeeze(-1).float()}


def end_score_fn(mb: MicroBatch, scores_BS1: torch.Tensor) -> dict:
    """Scoring function: a reward model's score at each row's last real token."""
    return {"score": end_scores(scores_BS1.squeeze(-1).float(), mb.attention_mask_BS)}


def calibrated_end_score_fn(normalization: tuple[float, float] | None) -> Callable:
    """``end_score_fn`` with a reward model's stored calibration applied: ``(score - mean)
    / std`` (``None``: raw scores)."""
    if normalization is None:
        return end_score_fn
    mean, std = normalization

    def fn(mb: MicroBatch, scores_BS1: torch.Tensor) -> dict:
        return {"score": (end_score_fn(mb, scores_BS1)["score"] - mean) / std}

    return fn


# ----------------------------------------------------------------------------- PPO


def to_global_mean(loss, mask_BS, reduction: str, counts: GlobalCounts) -> torch.Tensor:
    """This micro-batch's share of the mini-batch mean: ``loss`` is a mean over its own valid
    tokens (``token_mean`` and ``token_sum``) or sequences (``seq_mean``); scale by their
    share of the global count (for ``token_sum``: of ``counts.norm_tokens``) so the sum over
    micro-batches and data-parallel ranks is the global mean."""
    if reduction == "token_mean":
        return loss * mask_BS.sum() / counts.tokens
    if reduction == "token_sum":  # Dr.GRPO: a constant denominator, no length normalisation
        return loss * mask_BS.sum() / counts.norm_tokens
    return loss * mask_BS.any(dim=1).sum() / counts.sequences


def per_token_metric(share: torch.Tensor, n_tokens: torch.Tensor, counts: GlobalCounts):
    """A micro-batch's ``share`` of a global mean (``to_global_mean``) as the metric value
    ``TrainableModel.reduce_metrics`` weights by the micro-batch's token count: their
    token-weighted mean is then the global mean, for either loss reduction (a sequence-mean
    loss reported as a token-weighted mean of micro-batch means would depend on the split
    into micro-batches and ranks)."""
    return share.detach() * counts.tokens / n_tokens.clamp(min=1)


def actor_loss_fn(cfg: PPOConfig, tp_group, counts: GlobalCounts, temperature: float) -> Callable:
    """PPO clip loss (+ entropy bonus) on rollout micro-batches, the ptx LM loss on plain
    ``MicroBatch``es, for ``train_step(..., normalize="none")``."""

    def fn(mb: MicroBatch, logits: torch.Tensor):
        logits = scaled_logits(logits, temperature)
        if not isinstance(mb, RolloutMicroBatch):
            return _ptx_loss(mb, logits, tp_group, cfg.ptx_coef, counts)
        mask_BS = _required(mb.loss_mask_BS, "loss_mask_BS")
        logp_BS, entropy_BS = logprobs_from_output(
            mb, logits, tp_group, entropy=True, loss_only=True
        )
        old_BS = _required(mb.old_logp_BS, "old_logp_BS")
        adv_BS = _required(mb.advantages_BS, "advantages_BS")
        if cfg.policy_loss == "gspo":
            loss, stats = gspo_policy_loss(
                logp_BS, old_BS, adv_BS, mask_BS, cfg.clip_low, cfg.clip_high
            )
        else:
            loss, stats = ppo_policy_loss(
                logp_BS,
                old_BS,
                adv_BS,
                mask_BS,
                clip_low=cfg.clip_low,
                clip_high=cfg.clip_high,
                dual_clip=cfg.dual_clip,
                reduction="seq_mean" if cfg.loss_reduction == "seq_mean" else "token_mean",
            )
        n_tokens = mask_BS.sum()
        pg_share = to_global_mean(loss, mask_BS, cfg.loss_reduction, counts)
        entropy_sum = (entropy_BS * mask_BS).sum()
        scaled = pg_share
        if cfg.entropy_coef:
            scaled = scaled - cfg.entropy_coef * entropy_sum / counts.tokens
        metrics = {
            "pg_loss": per_token_metric(pg_share, n_tokens, counts),
            "entropy": entropy_sum.detach() / n_tokens.clamp(min=1),
        }
        if cfg.kl_loss_coef:
            ref_BS = _required(mb.ref_logp_BS, "ref_logp_BS")
            kl = kl_loss(logp_BS, ref_BS, mask_BS, cfg.kl_loss_estimator, cfg.loss_reduction)
            kl_share = to_global_mean(kl, mask_BS, cfg.loss_reduction, counts)
            scaled = scaled + cfg.kl_loss_coef * kl_share
            metrics["kl_loss"] = per_token_metric(kl_share, n_tokens, counts)
        metrics.update({k: v.detach() for k, v in stats.items()})
        return scaled, n_tokens.long(), metrics

    return fn


def _ptx_loss(mb: MicroBatch, logits, tp_group, coef: float, counts: GlobalCounts):
    nll_sum, n = lm_nll(mb, logits, tp_group)
    return (
        coef * nll_sum / max(counts.ptx_tokens, 1.0),
        n.long(),
        {"ptx_loss": nll_sum.detach() / n.clamp(min=1)},
    )


def _critic_reduction(cfg: PPOConfig) -> str:
    """The critic's loss mean: the actor's, except Dr.GRPO's token sum (a normalisation of
    the policy gradient) is a token mean for the value regression."""
    return "token_mean" if cfg.loss_reduction == "token_sum" else cfg.loss_reduction


def critic_loss_fn(cfg: PPOConfig, counts: GlobalCounts, signal: str = "reward") -> Callable:
    """Clipped value loss, pre-normalised by global counts (``normalize="none"``), on the
    reward critic's values and returns, or (``signal="cost"``) the cost critic's, whose
    metrics are prefixed ``cost_``."""
    prefix = "cost_" if signal == "cost" else ""

    def fn(mb: RolloutMicroBatch, values_BS1: torch.Tensor):
        mask_BS = _required(mb.loss_mask_BS, "loss_mask_BS")
        values_BS = values_BS1.squeeze(-1).float()
        old_name, returns_name = f"{prefix}values_BS", f"{prefix}returns_BS"
        loss, stats = value_loss(
            values_BS,
            _required(getattr(mb, old_name), old_name),
            _required(getattr(mb, returns_name), returns_name),
            mask_BS,
            clip=cfg.value_clip,
            reduction=_critic_reduction(cfg),
        )
        n_tokens = mask_BS.sum()
        scaled = to_global_mean(loss, mask_BS, _critic_reduction(cfg), counts)
        metrics = {"value_loss": per_token_metric(scaled, n_tokens, counts)}
        metrics.update(
            {f"value_{k}" if not k.startswith("value") else k: v.detach() for k, v in stats.items()}
        )
        return scaled, n_tokens.long(), {prefix + k: v for k, v in metrics.items()}

    return fn
