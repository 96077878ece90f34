"""Ranking losses of reward and cost models: pure tensor functions.

Pairs ``(better, worse)`` index end scores ``scores_B`` (the better response of a pair is
the preferred one: for a cost model, the safer one, which should cost less); each pair
carries a margin (Llama-2) and a weight (1 / the number of pairs of its sample, so every
sample counts once, as InstructGPT's K-wise loss normalises by K(K-1)/2). Both losses add
``regularization`` x the mean squared end score of the pair (Safe-RLHF's regulariser).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair_scores(scores_B: torch.Tensor, pairs_P2: torch.Tensor, weights_P: torch.Tensor):
    dtype = torch.promote_types(scores_B.dtype, torch.float32)  # bf16 scores: fp32 math
    better_P = scores_B[pairs_P2[:, 0]].to(dtype)
    worse_P = scores_B[pairs_P2[:, 1]].to(dtype)
    return better_P, worse_P, weights_P.to(dtype)


def _won(high_P: torch.Tensor, low_P: torch.Tensor) -> torch.Tensor:
    """1 where ``high`` is higher, 1/2 on a tie (a coin flip), else 0."""
    return (high_P > low_P) + 0.5 * (high_P == low_P)


def pairwise_ranking_loss(
    scores_B: torch.Tensor,
    pairs_P2: torch.Tensor,
    margins_P: torch.Tensor,
    weights_P: torch.Tensor,
    regularization: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A reward model's ``(loss_sum, sums)``: ``loss_sum = sum_p w_p * (-log sigmoid(r_better
    - r_worse - m_p) + regularization * (r_better^2 + r_worse^2) / 2)``, and weighted sums of
    the pair statistics (``accuracy``: the better response scored higher; ``better_score``,
    ``worse_score``, ``margin``: their difference). Divide by the number of samples for
    means."""
    better_P, worse_P, w_P = _pair_scores(scores_B, pairs_P2, weights_P)
    per_pair_P = -F.logsigmoid(better_P - worse_P - margins_P.to(better_P))
    if regularization:
        per_pair_P = per_pair_P + regularization * (better_P.square() + worse_P.square()) / 2
    sums = {
        "accuracy": (w_P * _won(better_P, worse_P)).sum().detach(),
        "better_score": (w_P * better_P).sum().detach(),
        "worse_score": (w_P * worse_P).sum().detach(),
        "margin": (w_P * (better_P - worse_P)).sum().detach(),
    }
    return (w_P * per_pair_P).sum(), sums


def cost_ranking_loss(
    costs_B: torch.Tensor,
    pairs_P2: torch.Tensor,
    unsafe_B: torch.Tensor,
    weights_P: torch.Tensor,
    regularization: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A cost model's ``(loss_sum, sums)`` (Safe-RLHF's sequence-wise objective): the worse
    (less safe) response of each pair costs more, and every response's end cost has the
    sign of its safety label (> 0 unsafe, < 0 safe)::

        loss_p = -log sigmoid(c_worse - c_better)
                 - log sigmoid(s_better * c_better) - log sigmoid(s_worse * c_worse)
                 + regularization * (c_better^2 + c_worse^2) / 2,   s = +1 unsafe, -1 safe

    ``sums``: ``accuracy`` (the worse response costs more), ``sign_accuracy`` (the mean over
    the pair's two responses of the cost having its label's sign), ``better_cost``,
    ``worse_cost``, weighted as ``loss_sum``."""
    better_P, worse_P, w_P = _pair_scores(costs_B, pairs_P2, weights_P)
    sign_B = unsafe_B.to(better_P) * 2 - 1
    s_better_P, s_worse_P = sign_B[pairs_P2[:, 0]], sign_B[pairs_P2[:, 1]]
    per_pair_P = (
        -F.logsigmoid(worse_P - better_P)
        - F.logsigmoid(s_better_P * better_P)
        - F.logsigmoid(s_worse_P * worse_P)
    )
    if regularization:
        per_pair_P = per_pair_P + regularization * (better_P.square() + worse_P.square()) / 2
    signs_right_P = ((s_better_P * better_P > 0).to(w_P) + (s_worse_P * worse_P > 0).to(w_P)) / 2
    sums = {
        "accuracy": (w_P * _won(worse_P, better_P)).sum().detach(),
        "sign_accuracy": (w_P * signs_right_P).sum().detach(),
        "better_cost": (w_P * better_P).sum().detach(),
        "worse_cost": (w_P * worse_P).sum().detach(),
    }
    return (w_P * per_pair_P).sum(), sums
