"""LM head (and the last decoder layer's MLP) over selected positions only.

RLHF needs log-probs of response tokens only, yet a plain forward computes the LM head for
every position (prompt and padding included) and materialises ``[B, S, V/tp]`` logits. With
a selection set, the actor's/reference's output layer gathers the hidden states of the
selected positions first and returns logits ``[1, N, V/tp]`` for those ``N`` positions
(ordered position-major: ``hidden_SBH[select_SB]``), a fraction of the work and memory.

The last decoder layer goes one step further back: its attention must run everywhere (the
selected queries read every earlier key and value), but nothing reads its output at the
other positions, so its residual stream is cut to the selected rows right after attention
and its MLP, the final norm and the head (LM, value or score head) run on ``[N, 1, H]``
only. The critic selects its value positions (the response) and a reward model each row's
last token. Not installed under sequence parallelism (the residual is split over TP ranks
along the sequence there) or with full activation recomputation.

Installed by replacing the forward of megatron's ``ColumnParallelLinear`` instance and of
the last ``TransformerLayer`` (state dicts are unchanged). Gradients stay correct under
tensor parallelism: the head's input is routed through
``copy_to_tensor_model_parallel_region`` (all-reduce of its gradient), or, with sequence
parallelism, gathered along the sequence with a reduce-scatter backward, exactly as the
column-parallel layer does.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Any

import torch

from hpc_rlhf.ops import cpu_gemm


def install_selective_head(output_layer: torch.nn.Module, sequence_parallel: bool) -> None:
    """Let ``output_layer`` compute logits for selected positions when a selection is set."""
    # plain attributes on the module (nn.Module's __setattr__ is typed for tensors/modules)
    output_layer._dense_forward = output_layer.forward  # type: ignore[assignment]
    output_layer._select_SB = None  # type: ignore[assignment]
    output_layer._preselected = False  # type: ignore[assignment]
    output_layer._sp_gather = sequence_parallel  # type: ignore[assignment]
    output_layer.forward = types.MethodType(_selective_forward, output_layer)


def _selective_forward(self, hidden_SBH, weight=None, runtime_gather_output=None):
    select_SB = self._select_SB
    if select_SB is None:
        return self._dense_forward(
            hidden_SBH, weight=weight, runtime_gather_output=runtime_gather_output
        )
    from megatron.core.tensor_parallel import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    if self._preselected:  # the last decoder layer already cut the rows: [N, 1, H]
        hidden_N1H = copy_to_tensor_model_parallel_region(hidden_SBH)
    else:
        if self._sp_gather:
            hidden_SBH = gather_from_sequence_parallel_region(
                hidden_SBH, tensor_parallel_output_grad=True
            )
        else:
            hidden_SBH = copy_to_tensor_model_parallel_region(hidden_SBH)
        hidden_N1H = pick_rows(hidden_SBH, select_SB)
    w_VH = self.weight if weight is None else weight
    logits_N1V = cpu_gemm.linear(hidden_N1H, w_VH)
    return logits_N1V, None


def install_selective_final_layer(layer: torch.nn.Module) -> None:
    """Let the last ``TransformerLayer`` run its MLP on the selected rows only when a
    selection is set (returning ``[N, 1, H]``); its attention still runs on every row."""
    config: Any = layer.config
    if config.sequence_parallel or config.recompute_granularity is not None:
        raise ValueError(
            "a selective final layer needs sequence_parallel=False and no recomputation"
        )
    layer._dense_forward = layer.forward  # type: ignore[assignment]
    layer._select_SB = None  # type: ignore[assignment]
    layer.forward = types.MethodType(_final_layer_forward, layer)


def _final_layer_forward(self, *args, **kwargs):
    """megatron's ``TransformerLayer.forward`` with the residual stream cut to the selected
    rows between the attention and the MLP blocks."""
    select = self._select_SB
    if select is None:
        return self._dense_forward(*args, **kwargs)
    kwargs.pop("dynamic_inference_decode_only", None)
    hidden_SBH, context = self._forward_attention(*args, **kwargs)
    hidden_N1H = pick_rows(hidden_SBH, select)
    output_N1H = self._forward_mlp(
        hidden_N1H, kwargs.get("inference_context"), padding_mask=kwargs.get("padding_mask")
    )
    return output_N1H, context


def pick_rows(hidden_SBH: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H]`` rows of ``hidden_SBH`` at a selection: a boolean ``[S, B]`` mask
    (position-major order) or, for a packed row, explicit indices into its ``T`` positions
    (``models.packing.PackedLayout.selected_index``)."""
    if select.dtype == torch.bool:
        return hidden_SBH[select].unsqueeze(1)
    return hidden_SBH.flatten(0, 1).index_select(0, select).unsqueeze(1)


def _final_layer(module: torch.nn.Module):
    """The chunk's last decoder layer if it computes selected rows, else ``None``."""
    decoder = getattr(module, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if not layers or not hasattr(layers[-1], "_select_SB"):
        return None
    return layers[-1]


@contextmanager
def head_selection(model: torch.nn.Module, select_BS: torch.Tensor | None, layout=None):
    """Within the block, ``model`` (a GPTModel chunk, possibly DDP-wrapped) computes its
    outputs only where ``select_BS`` is true; yields whether a selection is installed,
    i.e. whether the last stage's output is ``[1, N, ...]`` (``N`` selected positions,
    position-major) rather than ``[B, S, ...]``. A no-op (``False``) on stages without an
    output layer, and for a scalar head without a selective final layer. With a packed
    ``layout`` (``models.packing.PackedLayout``) the model runs on the packed row and the
    selection picks the same positions, in the same order, as on the padded batch."""
    module = getattr(model, "module", model)
    head = getattr(module, "output_layer", None)
    final = _final_layer(module) if head is not None else None
    lm_head = hasattr(head, "_select_SB")
    if select_BS is None or (final is None and not lm_head):
        yield False
        return
    select = select_BS.t().contiguous() if layout is None else layout.selected_index(select_BS)
    targets = [m for m in (final, head if lm_head else None) if m is not None]
    for target in targets:
        target._select_SB = select
    if lm_head and head is not None:
        head._preselected = final is not None
    try:
        yield True
    finally:
        for target in targets:
            target._select_SB = None


def selected(x_BS: torch.Tensor, select_BS: torch.Tensor) -> torch.Tensor:
    """The entries of ``x_BS`` at the selected positions, in the head's order ``[N]``."""
    return x_BS.t()[select_BS.t()]


def scatter_selected(values_N: torch.Tensor, select_BS: torch.Tensor) -> torch.Tensor:
    """Dense ``[B, S, ...]`` tensor with ``values_N`` ``[N, ...]`` at the selected positions
    (the head's order), 0 elsewhere (differentiable)."""
    out_SB = values_N.new_zeros(*select_BS.t().shape, *values_N.shape[1:])
    out_SB[select_BS.t()] = values_N
    return out_SB.transpose(0, 1)


def logprobs_from_output(
    batch: dict, logits: torch.Tensor, tp_group, entropy: bool = False, loss_only: bool = False
):
    """Dense ``[B, S]`` log-probs of ``batch["labels"]`` (and entropies) from the actor's
    output: full logits ``[B, S, V/tp]``, or ``[1, N, V/tp]`` for the positions of
    ``batch["head_mask"]`` (zeros elsewhere). ``loss_only``: the logits feed nothing but
    this loss, so the backward may overwrite them with their gradient (less peak memory)."""
    from hpc_rlhf.ops import token_logprobs

    kw = {"tp_group": tp_group, "return_entropy": entropy, "inplace_grad": loss_only}
    select_BS = batch.get("head_mask")
    if select_BS is None:
        return token_logprobs(logits, batch["labels"], **kw)
    labels_N = selected(batch["labels"], select_BS)
    out = token_logprobs(logits.squeeze(0), labels_N, **kw)
    if entropy:
        return scatter_selected(out[0], select_BS), scatter_selected(out[1], select_BS)
    return scatter_selected(out, select_BS)
