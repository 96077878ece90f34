"""The actor's per-microbatch functions: policy log-probs (scoring) and the PPO loss.

Both read vocab-parallel logits ``[B, S, V/tp]`` and go through the fused
``hpc_rlhf.ops.token_logprobs`` over the TP group (no rank materialises a full-vocabulary
log-softmax). The loss is pre-normalised by global counts (``normalize="none"`` in
``TrainableModel.train_step``): token-mean PPO over every valid token of the mini-batch on
every data-parallel rank, plus ``ptx_coef`` x the LM loss over the ptx tokens, minus
``entropy_coef`` x the mean entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpc_rlhf.config import PPOConfig
from hpc_rlhf.models.selective_head import logprobs_from_output
from hpc_rlhf.ops import ppo_policy_loss


def scaled_logits(logits_BSV: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits at the sampling temperature (the policy PPO optimises is softmax(logits/T))."""
    return logits_BSV if temperature == 1.0 else logits_BSV / temperature


def logprobs_fn(tp_group, temperature: float = 1.0, entropy: bool = False) -> Callable:
    """Scoring function for ``TrainableModel.infer``: ``{"logp": [B,S]}`` (+ ``"entropy"``)."""

    def fn(batch: dict, logits: torch.Tensor) -> dict:
        out = logprobs_from_output(batch, scaled_logits(logits, temperature), tp_group, entropy)
        if entropy:
            return {"logp": out[0], "entropy": out[1]}
        return {"logp": out}

    return fn


@dataclass(frozen=True)
class GlobalCounts:
    """Valid tokens / sequences of one mini-batch summed over data-parallel ranks."""

    tokens: float
    sequences: float
    ptx_tokens: float = 0.0


def to_global_mean(loss, mask_BS, reduction: str, counts: GlobalCounts) -> torch.Tensor:
    """This microbatch's share of the mini-batch mean: ``loss`` is a mean over its own valid
    tokens (``token_mean``) or sequences (``seq_mean``); scale by their share of the
    global count so the sum over microbatches and data-parallel ranks is the global mean."""
    if reduction == "token_mean":
        return loss * mask_BS.sum() / counts.tokens
    return loss * mask_BS.any(dim=1).sum() / counts.sequences


def actor_loss_fn(cfg: PPOConfig, tp_group, counts: GlobalCounts, temperature: float) -> Callable:
    """PPO (+ entropy, + ptx) loss for ``train_step(..., normalize="none")``."""

    def fn(batch: dict, logits_BSV: torch.Tensor):
        logits_BSV = scaled_logits(logits_BSV, temperature)
        if batch.get("kind") == "ptx":
            return _ptx_loss(batch, logits_BSV, tp_group, cfg.ptx_coef, counts)
        mask_BS = batch["action_mask"]
        logp_BS, entropy_BS = logprobs_from_output(
            batch, logits_BSV, tp_group, entropy=True, loss_only=True
        )
        loss, stats = ppo_policy_loss(
            logp_BS,
            batch["old_logp"],
            batch["advantages"],
            mask_BS,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip,
            reduction=cfg.loss_reduction,
        )
        n_tokens = mask_BS.sum()
        scaled = to_global_mean(loss, mask_BS, cfg.loss_reduction, counts)
        entropy_sum = (entropy_BS * mask_BS).sum()
        if cfg.entropy_coef:
            scaled = scaled - cfg.entropy_coef * entropy_sum / counts.tokens
        metrics = {
            "pg_loss": loss.detach(),
            "entropy": entropy_sum.detach() / n_tokens.clamp(min=1),
        }
        metrics.update({k: v.detach() for k, v in stats.items()})
        return scaled, n_tokens.long(), metrics

    return fn


def _ptx_loss(batch, logits_BSV, tp_group, coef: float, counts: GlobalCounts):
    logp_BS = logprobs_from_output(batch, logits_BSV, tp_group, loss_only=True)
    mask_BS = batch["loss_mask"].float()
    nll_sum = -(logp_BS * mask_BS).sum()
    n = mask_BS.sum()
    return (
        coef * nll_sum / max(counts.ptx_tokens, 1.0),
        n.long(),
        {"ptx_loss": nll_sum / n.clamp(min=1)},
    )
