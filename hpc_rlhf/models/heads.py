"""Scalar heads on the final hidden states: the critic's value head and the reward score head.

A head replaces ``GPTModel.output_layer``: it is called as
``head(hidden_SBH, weight=None, runtime_gather_output=None)`` and returns ``(out_SB1, None)``
so megatron-core's GPTModel forward returns ``[B, S, 1]`` instead of vocabulary logits.
The head's weights are replicated over tensor-parallel ranks; with sequence parallelism the
hidden states are gathered along the sequence first, with a backward that splits (not
sums) the gradient, so replicated weights get the same gradient as without TP.
"""

from __future__ import annotations

import torch
from torch import nn


class ScalarHead(nn.Module):
    """``Linear(hidden, 1)`` over every token; ``sequence_parallel`` gathers first."""

    def __init__(
        self,
        hidden_size: int,
        sequence_parallel: bool = False,
        bias: bool = True,
        init_std: float = 0.0,
    ):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, bias=bias)
        with torch.no_grad():
            if init_std > 0:
                self.linear.weight.normal_(0.0, init_std)
            else:
                self.linear.weight.zero_()
            if bias:
                self.linear.bias.zero_()
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden_SBH: torch.Tensor, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_SBH = gather_from_sequence_parallel_region(
                hidden_SBH, tensor_parallel_output_grad=False
            )
        out_SB1 = self.linear(hidden_SBH.to(self.linear.weight.dtype))
        return out_SB1, None


def end_scores(scores_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """Score at each sequence's last non-pad token (as Safe-RLHF's score models).

    ``scores_BS``: per-token scores; ``attention_mask_BS``: 1/True for real tokens. Works for
    left and right padding. A row without any real token raises ``ValueError``.
    """
    from hpc_rlhf.models.runner import last_token_positions

    last_B = last_token_positions(attention_mask_BS)
    return scores_BS.gather(1, last_B[:, None]).squeeze(1)
