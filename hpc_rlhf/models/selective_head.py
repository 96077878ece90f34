"""LM head over selected positions only.

RLHF needs log-probs of response tokens only, yet a plain forward computes the LM head for
every position (prompt and padding included) and materialises ``[B, S, V/tp]`` logits. With
a selection set, the actor's/reference's output layer gathers the hidden states of the
selected positions first and returns logits ``[1, N, V/tp]`` for those ``N`` positions
(ordered position-major: ``hidden_SBH[select_SB]``), a fraction of the work and memory.

Installed by replacing the forward of megatron's ``ColumnParallelLinear`` instance (the
state dict is unchanged). Gradients stay correct under tensor parallelism: the input is
routed through ``copy_to_tensor_model_parallel_region`` (all-reduce of its gradient), or,
with sequence parallelism, gathered along the sequence with a reduce-scatter backward,
exactly as the column-parallel layer does.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch

from hpc_rlhf.ops import cpu_gemm


def install_selective_head(output_layer: torch.nn.Module, sequence_parallel: bool) -> None:
    """Let ``output_layer`` compute logits for selected positions when a selection is set."""
    # plain attributes on the module (nn.Module's __setattr__ is typed for tensors/modules)
    output_layer._dense_forward = output_layer.forward  # type: ignore[assignment]
    output_layer._select_SB = None  # type: ignore[assignment]
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

    if self._sp_gather:
        hidden_SBH = gather_from_sequence_parallel_region(
            hidden_SBH, tensor_parallel_output_grad=True
        )
    else:
        hidden_SBH = copy_to_tensor_model_parallel_region(hidden_SBH)
    if select_SB.dtype == torch.bool:
        hidden_N1H = hidden_SBH[select_SB].unsqueeze(1)
    else:  # packed row: explicit positions (models.packing.PackedLayout.selected_index)
        hidden_N1H = hidden_SBH.flatten(0, 1).index_select(0, select_SB).unsqueeze(1)
    w_VH = self.weight if weight is None else weight
    logits_N1V = cpu_gemm.linear(hidden_N1H, w_VH)
    return logits_N1V, None


@contextmanager
def head_selection(model: torch.nn.Module, select_BS: torch.Tensor | None, layout=None):
    """Within the block, ``model`` (a GPTModel chunk, possibly DDP-wrapped) computes LM-head
    logits only where ``select_BS`` is true; yields whether a selection is installed (a
    no-op on stages without an output layer or with a scalar head). With a packed
    ``layout`` (``models.packing.PackedLayout``) the model runs on the packed row and the
    head picks the same positions, in the same order, as on the padded batch."""
    module = getattr(model, "module", model)
    layer = getattr(module, "output_layer", None)
    if select_BS is None or layer is None or not hasattr(layer, "_select_SB"):
        yield False
        return
    if layout is None:
        layer._select_SB = select_BS.t().contiguous()
    else:
        layer._select_SB = layout.selected_index(select_BS)
    try:
        yield True
    finally:
        layer._select_SB = None


def selected(x_BS: torch.Tensor, select_BS: torch.Tensor) -> torch.Tensor:
    """The entries of ``x_BS`` at the selected positions, in the head's order ``[N]``."""
    return x_BS.t()[select_BS.t()]


def scatter_selected(values_N: torch.Tensor, select_BS: torch.Tensor) -> torch.Tensor:
    """Dense ``[B, S]`` tensor with ``values_N`` at the selected positions, 0 elsewhere."""
    out_SB = values_N.new_zeros(select_BS.t().shape)
    out_SB[select_BS.t()] = values_N
    return out_SB.t()


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
