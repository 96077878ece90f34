"""Language-modelling loss (pre-training / SFT / ptx) over vocab-parallel logits."""

from __future__ import annotations

import torch


def lm_loss(batch: dict, logits_BSV: torch.Tensor, tp_group=None):
    """Masked next-token cross entropy: ``(loss_sum, token_count, {"loss": mean})``.

    ``batch["labels"]`` ``[B, S]`` holds the token to predict at each position and
    ``batch["loss_mask"]`` ``[B, S]`` which positions count. ``logits_BSV`` is this rank's
    vocabulary shard; the log-probs are reduced across ``tp_group``.
    """
    from hpc_rlhf.models.selective_head import logprobs_from_output

    logp_BS = logprobs_from_output(batch, logits_BSV, tp_group, loss_only=True)
    mask_BS = batch["loss_mask"].to(logp_BS.dtype)
    count = mask_BS.sum()
    loss_sum = -(logp_BS * mask_BS).sum()
    return loss_sum, count.long(), {"loss": loss_sum.detach() / count.clamp(min=1)}
