"""Token-level rewards for PPO (Safe-RLHF / DeepSpeed-Chat style), and reward combination.

``token_rewards``: every response token gets ``-kl_coef * KL_t``; the last response token of
each sequence also gets the (clipped) sequence score. Scores of several reward models are
combined linearly first, or gated as Llama-2 gates helpfulness and safety
(``llama2_safety_gate``); PPO-Lagrangian splits the KL penalty between the reward and
cost signals (``lagrangian_token_signals``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hpc_rlhf.algorithms.kl import kl_estimate


def combine_scores(scores: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i * score_i`` over reward models; each score is ``[B]``."""
    if len(scores) != len(weights) or not scores:
        raise ValueError(f"{len(scores)} reward scores for {len(weights)} weights")
    total_B = torch.zeros_like(scores[0], dtype=torch.float32)
    for score_B, weight in zip(scores, weights):
        total_B = total_B + weight * score_B.float()
    return total_B


def overlong_penalty(
    lengths_B: torch.Tensor, max_length: int, buffer: int, scale: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) per response length: 0 up to
    ``max_length - buffer`` tokens, then falling linearly to ``-scale`` at ``max_length``
    (``-scale`` beyond), ``[B]`` float32."""
    start = max_length - buffer
    over_B = (lengths_B.float() - start).clamp(min=0.0)
    return -scale * (over_B / buffer).clamp(max=1.0)


def last_token_index(mask_BS: torch.Tensor) -> torch.Tensor:
    """Index ``[B]`` of each row's last valid position (-1 for an empty row)."""
    S = mask_BS.shape[1]
    positions_BS = torch.arange(S, device=mask_BS.device).expand_as(mask_BS)
    return torch.where(mask_BS.bool(), positions_BS, -1).max(dim=1).values


def token_rewards(
    score_B: torch.Tensor,
    logp_BS: torch.Tensor,
    ref_logp_BS: torch.Tensor,
    mask_BS: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
    score_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rewards_BS, kl_BS)``: KL penalty on every valid token, the score on the last one.

    Positions where ``mask_BS`` is false get 0. ``score_clip`` clamps the score to
    ``[-clip, clip]`` before it is added.
    """
    mask_BS = mask_BS.bool()
    kl_BS = kl_estimate(logp_BS, ref_logp_BS, estimator) * mask_BS
    rewards_BS = -kl_coef * kl_BS
    score_B = score_B.float()
    if score_clip is not None:
        score_B = score_B.clamp(-score_clip, score_clip)
    last_B = last_token_index(mask_BS)
    has_tokens_B = last_B >= 0
    rows_B = torch.arange(score_B.shape[0], device=score_B.device)[has_tokens_B]
    rewards_BS[rows_B, last_B[has_tokens_B]] += score_B[has_tokens_B]
    return rewards_BS, kl_BS


def lagrangian_token_signals(
    score_B: torch.Tensor,
    cost_B: torch.Tensor,
    logp_BS: torch.Tensor,
    ref_logp_BS: torch.Tensor,
    mask_BS: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
    score_clip: float | None = None,
    cost_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rewards_BS, costs_BS, kl_BS)`` for PPO-Lagrangian: the KL penalty is shared as
    Safe-RLHF shares it, half as a penalty on the reward signal (``-kl_coef/2 * KL_t``) and
    half as a cost (``+kl_coef/2 * KL_t``); the end score and the end cost go on each
    row's last response token. The actor's ``(A_r - lambda A_c) / (1 + lambda)`` then
    sees ``kl_coef/2`` whatever lambda is."""
    rewards_BS, kl_BS = token_rewards(
        score_B, logp_BS, ref_logp_BS, mask_BS, 0.5 * kl_coef, estimator, score_clip
    )
    costs_BS, _ = token_rewards(
        cost_B, logp_BS, ref_logp_BS, mask_BS, -0.5 * kl_coef, estimator, cost_clip
    )
    return rewards_BS, costs_BS, kl_BS


def llama2_safety_gate(
    helpful_B: torch.Tensor,
    safety_B: torch.Tensor,
    unsafe_prompt_B: torch.Tensor,
    threshold: float = 0.15,
) -> torch.Tensor:
    """Llama-2's gated reward (Touvron et al. 2023, section 3.2.2) before whitening:
    the safety model's score where the prompt is tagged unsafe or ``sigmoid(safety) <
    threshold``, the helpfulness model's elsewhere, as a logit. The paper's scores are
    ``sigmoid`` of the models' outputs and it takes their ``logit``; ``logit(sigmoid(x))
    = x``, so the chosen model's raw score is returned (no round trip through a
    probability that saturates for ``|x| > 17`` in float32)."""
    use_safety_B = unsafe_prompt_B.bool() | (torch.sigmoid(safety_B.float()) < threshold)
    return torch.where(use_safety_B, safety_B.float(), helpful_B.float())


class RunningMoments:
    """Running mean and population variance (divided by the count, not count - 1) of scalar
    rewards over every value seen (Chan et al.'s parallel update), for normalisation."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-8

    def update(self, values_N: torch.Tensor) -> None:
        values_N = values_N.double().flatten()
        n = values_N.numel()
        if n == 0:
            return
        batch_mean, batch_var = float(values_N.mean()), float(values_N.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.var = (
            self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        ) / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 1e-12) ** 0.5

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / self.std

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
