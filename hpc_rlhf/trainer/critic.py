"""The critic's and reward models' per-microbatch functions: values, end scores, value loss."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hpc_rlhf.config import PPOConfig
from hpc_rlhf.models.heads import end_scores
from hpc_rlhf.ops import value_loss
from hpc_rlhf.trainer.actor import GlobalCounts, to_global_mean


def values_fn(batch: dict, values_BS1: torch.Tensor) -> dict:
    """Scoring function for ``TrainableModel.infer``: the critic's values ``[B, S]``."""
    return {"values": values_BS1.squeeze(-1).float()}


def end_score_fn(batch: dict, scores_BS1: torch.Tensor) -> dict:
    """Scoring function for a reward model: the score at each row's last real token."""
    return {"score": end_scores(scores_BS1.squeeze(-1).float(), batch["attention_mask"])}


def critic_loss_fn(cfg: PPOConfig, counts: GlobalCounts) -> Callable:
    """Clipped value loss, pre-normalised by global counts (``normalize="none"``)."""

    def fn(batch: dict, values_BS1: torch.Tensor):
        mask_BS = batch["action_mask"]
        values_BS = values_BS1.squeeze(-1).float()
        loss, stats = value_loss(
            values_BS,
            batch["values"],
            batch["returns"],
            mask_BS,
            clip=cfg.value_clip,
            reduction=cfg.loss_reduction,
        )
        n_tokens = mask_BS.sum()
        scaled = to_global_mean(loss, mask_BS, cfg.loss_reduction, counts)
        metrics = {"value_loss": loss.detach()}
        metrics.update(
            {f"value_{k}" if not k.startswith("value") else k: v.detach() for k, v in stats.items()}
        )
        return scaled, n_tokens.long(), metrics

    return fn
