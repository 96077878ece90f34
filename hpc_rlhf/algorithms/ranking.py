"""Ranking losses of reward (and, later, cost) models: pure tensor functions.

Pairs ``(better, worse)`` index end scores ``scores_B``; each pair carries a margin (Llama-2)
and a weight (1 / the number of pairs of its sample, so every sample counts once, as
InstructGPT's K-wise loss normalises by K(K-1)/2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_ranking_loss(
    scores_B: torch.Tensor,
    pairs_P2: torch.Tensor,
    margins_P: torch.Tensor,
    weights_P: torch.Tensor,
    regularization: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss_sum, sums)``: ``loss_sum = sum_p w_p * (-log sigmoid(r_better - r_worse - m_p)
    + regularization * (r_better^2 + r_worse^2))`` (Llama-2's margin loss; Safe-RLHF's
    end-score regulariser), and weighted sums of the pair statistics (``accuracy``: better
    scored higher, a tie counting one half as a coin flip would; ``better_score``,
    ``worse_score``). Divide by the number of samples for means."""
    dtype = torch.promote_types(scores_B.dtype, torch.float32)  # bf16 scores: fp32 math
    better_P = scores_B[pairs_P2[:, 0]].to(dtype)
    worse_P = scores_B[pairs_P2[:, 1]].to(dtype)
    w_P = weights_P.to(better_P)
    per_pair_P = -F.logsigmoid(better_P - worse_P - margins_P.to(better_P))
    if regularization:
        per_pair_P = per_pair_P + regularization * (better_P.square() + worse_P.square())
    sums = {
        "accuracy": (w_P * ((better_P > worse_P) + 0.5 * (better_P == worse_P))).sum().detach(),
        "better_score": (w_P * better_P).sum().detach(),
        "worse_score": (w_P * worse_P).sum().detach(),
    }
    return (w_P * per_pair_P).sum(), sums
