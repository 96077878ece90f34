"""LM head (and the last decoder layer's MLP) over selected rows only.

RLHF reads log-probs of response tokens only, yet a plain forward computes the LM head for
every position (prompt and padding included) and materialises ``[B, S, V/tp]`` logits.
While a selection is active (``OutputRows.active``), the LM output layer gathers the
hidden states of the selected rows first and returns logits ``[1, N, V/tp]`` for those
``N`` rows (position-major: ``hidden_SBH[select_SB]``, or explicit packed indices).

The last decoder layer goes one step further back: its attention must run everywhere (the
selected queries read every earlier key and value), but nothing reads its output at the
other rows, so its residual stream is cut to the selected rows right after attention and
its MLP, the final norm and the head (LM, value or score head) run on ``[N, 1, H]`` only.
Not installed under sequence parallelism (the residual is split over TP ranks along the
sequence there) or with activation recomputation.

megatron-core's ``GPTModel.forward`` has no argument that reaches its output layer or its
last layer, so the selection travels in one typed ``OutputRows`` object per chunk: the
runner sets it for the duration of one forward (``models.runner.model_forward``), and the
two substituted forwards read it. Gradients stay correct under tensor parallelism: the
head's input goes through ``copy_to_tensor_model_parallel_region`` (all-reduce of its
gradient), or, with sequence parallelism, is gathered along the sequence with a
reduce-scatter backward, exactly as the column-parallel layer does.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from hpc_rlhf.ops import cpu_gemm


@dataclass
class OutputRows:
    """The rows a chunk's head computes during one forward (``None``: all rows).

    ``rows``: a boolean ``[S, B]`` mask (position-major) or ``[N]`` indices into a packed
    row's ``T`` positions. ``lm_head`` / ``final_layer``: which substituted modules read
    it; ``scalar_head``: the chunk's head is a scalar (value/score) head.
    """

    lm_head: bool = False
    final_layer: bool = False
    scalar_head: bool = False
    rows: torch.Tensor | None = None

    @property
    def applies(self) -> bool:
        """Whether a selection changes this chunk's output (some module reads it)."""
        return self.lm_head or self.final_layer

    @contextmanager
    def active(self, rows: torch.Tensor | None):
        """Within the block the chunk computes ``rows`` only; yields the output kind:
        ``"lm"`` (logits ``[1, N, V/tp]``), ``"scalar"`` (scores ``[1, N, 1]``) or ``None``
        (no selection applies: the output is dense)."""
        if rows is None or not self.applies:
            yield None
            return
        self.rows = rows
        try:
            yield "scalar" if self.scalar_head else "lm"
        finally:
            self.rows = None


def pick_rows(hidden_SBH: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H]`` rows of ``hidden_SBH`` at a selection: a boolean ``[S, B]`` mask
    (position-major order) or explicit indices into a packed row's ``T`` positions."""
    if rows.dtype == torch.bool:
        return hidden_SBH[rows].unsqueeze(1)
    return hidden_SBH.flatten(0, 1).index_select(0, rows).unsqueeze(1)


def install_selective_head(
    output_layer: torch.nn.Module, selection: OutputRows, sequence_parallel: bool
) -> None:
    """Let megatron's LM ``output_layer`` compute logits for ``selection.rows`` only."""
    dense_forward = output_layer.forward
    preselected = selection.final_layer  # the last layer already cut the rows: [N, 1, H]

    def forward(self, hidden_SBH, weight=None, runtime_gather_output=None):
        if selection.rows is None:
            return dense_forward(
                hidden_SBH, weight=weight, runtime_gather_output=runtime_gather_output
            )
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        if preselected:
            hidden_N1H = copy_to_tensor_model_parallel_region(hidden_SBH)
        else:
            if sequence_parallel:
                hidden_SBH = gather_from_sequence_parallel_region(
                    hidden_SBH, tensor_parallel_output_grad=True
                )
            else:
                hidden_SBH = copy_to_tensor_model_parallel_region(hidden_SBH)
            hidden_N1H = pick_rows(hidden_SBH, selection.rows)
        w_VH = self.weight if weight is None else weight
        return cpu_gemm.linear(hidden_N1H, w_VH), None

    output_layer.forward = types.MethodType(forward, output_layer)
    selection.lm_head = True


def install_selective_final_layer(layer: torch.nn.Module, selection: OutputRows) -> None:
    """Let the last ``TransformerLayer`` run its MLP on ``selection.rows`` only (returning
    ``[N, 1, H]``); its attention still runs on every row."""
    config: Any = layer.config
    if config.sequence_parallel or config.recompute_granularity is not None:
        raise ValueError(
            "a selective final layer needs sequence_parallel=False and no recomputation"
        )
    dense_forward = layer.forward

    def forward(self, *args, **kwargs):
        if selection.rows is None:
            return dense_forward(*args, **kwargs)
        kwargs.pop("dynamic_inference_decode_only", None)
        hidden_SBH, context = self._forward_attention(*args, **kwargs)
        hidden_N1H = pick_rows(hidden_SBH, selection.rows)
        output_N1H = self._forward_mlp(
            hidden_N1H, kwargs.get("inference_context"), padding_mask=kwargs.get("padding_mask")
        )
        return output_N1H, context

    layer.forward = types.MethodType(forward, layer)
    selection.final_layer = True
