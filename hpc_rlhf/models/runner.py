"""One micro-batch through one model chunk.

Legend (one meaning per letter across the code):
  B  rows of a micro-batch;  S  sequence positions (right-padded);  T  positions of a
  packed row;  N  selected positions (position-major);  V  vocabulary (``V/tp`` per rank);
  H  hidden size.

Everything a trainer needs to run a megatron-core chunk on a batch lives here:

* ``MicroBatch``: the typed ``[B, S]`` tensors of one micro-batch (trainers subclass it
  to carry their loss inputs, e.g. ``trainer.losses.RolloutMicroBatch``);
* ``PackPlan`` / ``plan_packing``: whether and how the micro-batches of one schedule run
  packed (``models.packing``: one row of their real tokens, THD, shared prefixes once);
* ``output_selection``: the positions whose outputs a model's callers read (response
  positions, each row's last token, or all), so the head and the last layer's MLP run on
  those rows only (``models.overrides``);
* ``model_forward``: the chunk's forward on a micro-batch under a plan and a selection;
* ``logprobs_from_output``: token log-probs (and entropies) of the labels from the chunk's
  vocab-parallel logits, through the fused ``ops.token_logprobs``;
* the mask and position helpers of the padded layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from hpc_rlhf.algorithms.rewards import last_token_index
from hpc_rlhf.models.packing import PackedLayout, packed_length

OUTPUT_POSITIONS = ("head_mask", "last_token", "all")
_MB = TypeVar("_MB", bound="MicroBatch")


@dataclass
class MicroBatch:
    """The tensors of one micro-batch, every one ``[B, S]`` (right-padded).

    ``loss_mask_BS`` marks the positions a loss reads; ``head_mask_BS`` the positions whose
    head outputs are computed when the model selects by ``"head_mask"`` (``None``: all).
    """

    input_ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    labels_BS: torch.Tensor | None = None
    loss_mask_BS: torch.Tensor | None = None
    head_mask_BS: torch.Tensor | None = None

    @classmethod
    def unpadded(cls, input_ids_BS: torch.Tensor, **fields) -> MicroBatch:
        """A micro-batch whose every position is a real token."""
        mask_BS = torch.ones_like(input_ids_BS, dtype=torch.bool)
        return cls(input_ids_BS=input_ids_BS, attention_mask_BS=mask_BS, **fields)

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, S)``."""
        B, S = self.input_ids_BS.shape
        return B, S

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields holding tensors, by name."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value
        return out

    def truncated(self: _MB, S: int) -> _MB:
        """The same rows cut to their first ``S`` positions (same class)."""
        cut = {name: t[:, :S] for name, t in self.tensors().items() if t.dim() >= 2}
        return dataclasses.replace(self, **cut)

    def padded(self: _MB, S: int, pad_id: int) -> _MB:
        """The same rows right-padded to ``S`` positions (same class): token ids and labels
        ``pad_id``, masks and per-token values 0, so the new positions are padding."""
        B, length = self.shape
        if S < length:
            raise ValueError(f"padded: {S} positions is fewer than the batch's {length}")

        def pad(name: str, x_BS: torch.Tensor) -> torch.Tensor:
            fill = pad_id if name in ("input_ids_BS", "labels_BS") else 0
            return torch.cat([x_BS, x_BS.new_full((B, S - length, *x_BS.shape[2:]), fill)], 1)

        grown = {name: pad(name, t) for name, t in self.tensors().items() if t.dim() >= 2}
        return dataclasses.replace(self, **grown)

    def to(self: _MB, device: torch.device) -> _MB:
        """The same micro-batch (same class) with every tensor field, and every nested
        micro-batch's, on ``device``; itself when they are all there already (a CPU run
        copies nothing)."""
        device = torch.device(device)
        moved: dict[str, Any] = {
            name: t.to(device, non_blocking=True)
            for name, t in self.tensors().items()
            if t.device != device
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, MicroBatch):
                placed = value.to(device)
                if placed is not value:
                    moved[f.name] = placed
        return dataclasses.replace(self, **moved) if moved else self


@dataclass(frozen=True)
class PackPlan:
    """How the micro-batches of one schedule run packed (``models.packing``).

    ``multiple``: packed lengths are rounded up to it (TP under sequence parallelism, the
    packed row is split over TP ranks). ``length``: one packed length for every
    micro-batch (a pipeline's stages exchange fixed shapes), or ``None``: each its own.
    ``min_shared``: rows whose first ``min_shared`` or more tokens equal an earlier row's
    run them once (``models.packing``, shared prefixes); ``None``: every row whole.
    """

    multiple: int
    length: int | None = None
    min_shared: int | None = None

    def packed_length(self, mb: MicroBatch, must_save: bool = True) -> int | None:
        """``models.packing.packed_length`` of ``mb`` under this plan's sharing."""
        ids_BS = None if self.min_shared is None else mb.input_ids_BS
        return packed_length(
            mb.attention_mask_BS, self.multiple, must_save, ids_BS, self.min_shared
        )

    def layout(self, mb: MicroBatch) -> PackedLayout | None:
        """``mb``'s packed layout under this plan (``None``: it runs padded)."""
        ids_BS = None if self.min_shared is None else mb.input_ids_BS
        return PackedLayout.from_mask(
            mb.attention_mask_BS, self.multiple, self.length, ids_BS, self.min_shared
        )

    def tokens(self, mb: MicroBatch) -> int:
        """Positions ``mb`` occupies when run under this plan."""
        if self.length is not None:
            return self.length
        return self.packed_length(mb) or mb.input_ids_BS.numel()


def plan_packing(
    microbatches: Sequence[MicroBatch],
    multiple: int,
    pipelined: bool,
    min_shared: int | None = None,
) -> PackPlan | None:
    """The packing plan of one schedule: each micro-batch its own packed length, or with
    ``pipelined`` the longest one's for all; ``None`` (run padded) when a micro-batch of a
    pipelined schedule cannot be packed (its rows are not real tokens then padding).
    ``min_shared``: see ``PackPlan``."""
    plan = PackPlan(multiple, min_shared=min_shared)
    if not pipelined:
        return plan
    longest = 0
    for mb in microbatches:
        T = plan.packed_length(mb, must_save=False)
        if T is None:
            return None
        longest = max(longest, T)
    return PackPlan(multiple, longest, min_shared)


def output_selection(mb: MicroBatch, output_positions: str) -> torch.Tensor | None:
    """``[B, S]`` positions whose outputs are read (``None``: all): ``"head_mask"`` the
    batch's ``head_mask_BS``, ``"last_token"`` each row's last real token (a reward model's
    end score), ``"all"`` every position."""
    if output_positions == "last_token":
        return last_token_mask(mb.attention_mask_BS)
    if output_positions == "head_mask":
        return mb.head_mask_BS
    if output_positions == "all":
        return None
    raise ValueError(
        f"output_positions must be one of {OUTPUT_POSITIONS}, got {output_positions!r}"
    )


def model_forward(
    model: torch.nn.Module,
    mb: MicroBatch,
    plan: PackPlan | None = None,
    select_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run one chunk (a ``GPTModel``, possibly DDP-wrapped) on ``mb``.

    Returns hidden states ``[S, B, H]`` on non-last stages; on the last stage
    vocab-parallel logits ``[B, S, V/tp]`` or scalar scores ``[B, S, 1]``. With a
    selection ``select_BS`` (``output_selection``), LM logits come back ``[1, N, V/tp]``
    for the selected positions only (computed there only, or picked from the dense logits
    when ``model.overrides.selective_outputs`` is off) and scalar scores stay ``[B, S, 1]``
    (zero off the selection when only those rows were computed).
    With a ``plan`` a right-padded batch runs packed and per-token outputs come back
    padded, ``[B, S, ...]``.
    """
    from hpc_rlhf.models.overrides import output_rows

    mask_BS = mb.attention_mask_BS
    layout = None if plan is None else plan.layout(mb)
    if layout is not None and layout.expand_index is not None:
        if not getattr(getattr(model, "module", model), "shares_prefixes", False):
            raise ValueError(
                "model_forward: a packed micro-batch with shared prefixes needs the chunk's "
                "SharedPrefixSelfAttention (models.overrides, core_attention on)"
            )
    rows = None
    if select_BS is not None:
        rows = select_BS.t().contiguous() if layout is None else layout.selected_index(select_BS)
    with output_rows(model, rows) as kind:
        if layout is None:
            positions_BS = position_ids_from_mask(mask_BS)
            out = model(mb.input_ids_BS, positions_BS, attention_mask_for(mask_BS))
        else:
            out = model(
                layout.pack(mb.input_ids_BS),
                layout.positions_1T,
                None,
                packed_seq_params=layout.seq_params(),
            )
    module = getattr(model, "module", model)
    if not getattr(module, "post_process", True) or kind == "lm":
        return out
    if kind == "scalar" and select_BS is not None:
        return scatter_selected(out[0], select_BS)
    dense = out if layout is None else layout.unpack(out)
    if select_BS is not None and _has_lm_head(module):  # no override computed the rows
        return selected(dense, select_BS).unsqueeze(0)
    return dense


def _has_lm_head(module: torch.nn.Module) -> bool:
    """Whether the chunk's head is the LM head (not a scalar value/score head)."""
    rows = getattr(module, "output_rows", None)
    return rows is not None and not rows.scalar_head


# ----------------------------------------------------------------------------- selections


def selected(x_BS: torch.Tensor, select_BS: torch.Tensor) -> torch.Tensor:
    """The entries of ``x_BS`` ``[B, S, ...]`` at the selected positions, in the head's
    order: ``[N, ...]``."""
    return x_BS.transpose(0, 1)[select_BS.t()]


def scatter_selected(values_N: torch.Tensor, select_BS: torch.Tensor) -> torch.Tensor:
    """Dense ``[B, S, ...]`` tensor with ``values_N`` ``[N, ...]`` at the selected positions
    (the head's order), 0 elsewhere (differentiable)."""
    out_SB = values_N.new_zeros(*select_BS.t().shape, *values_N.shape[1:])
    out_SB[select_BS.t()] = values_N
    return out_SB.transpose(0, 1)


def logprobs_from_output(
    mb: MicroBatch,
    logits: torch.Tensor,
    tp_group,
    entropy: bool = False,
    loss_only: bool = False,
):
    """Dense ``[B, S]`` log-probs of ``mb.labels_BS`` (and entropies) from an LM chunk's
    output: full logits ``[B, S, V/tp]``, or ``[1, N, V/tp]`` at ``mb.head_mask_BS`` (zeros
    elsewhere). ``loss_only``: the logits feed nothing but this loss, so the backward may
    overwrite them with their gradient (one ``[N, V/tp]`` buffer less at the peak)."""
    from hpc_rlhf.ops import token_logprobs

    if mb.labels_BS is None:
        raise ValueError("logprobs_from_output needs a micro-batch with labels_BS")
    kw = {"tp_group": tp_group, "return_entropy": entropy, "inplace_grad": loss_only}
    select_BS = mb.head_mask_BS
    if select_BS is None:
        return token_logprobs(logits, mb.labels_BS, **kw)
    labels_N = selected(mb.labels_BS, select_BS)
    out = token_logprobs(logits.squeeze(0), labels_N, **kw)
    if entropy:
        return scatter_selected(out[0], select_BS), scatter_selected(out[1], select_BS)
    return scatter_selected(out, select_BS)


# ----------------------------------------------------------------------------- masks


def last_token_positions(attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """``[B]`` position of each row's last real token (left or right padding); a row
    without any real token raises ``ValueError``."""
    last_B = last_token_index(attention_mask_BS)
    if bool((last_B < 0).any()):
        raise ValueError("end_scores: a sequence has no non-pad token")
    return last_B


def last_token_mask(attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` True at each row's last real token only (where an end score is read)."""
    last_B = last_token_positions(attention_mask_BS)
    mask_BS = torch.zeros(attention_mask_BS.shape, dtype=torch.bool, device=last_B.device)
    mask_BS[torch.arange(mask_BS.shape[0], device=last_B.device), last_B] = True
    return mask_BS


def causal_padding_mask(attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """megatron attention mask ``[B, 1, S, S]`` (True = masked) from a padding mask.

    A query attends to keys at or before it that are real tokens; a pad query attends to
    itself only (its output is ignored; this keeps the softmax finite).
    """
    B, S = attention_mask_BS.shape
    keep_BS = attention_mask_BS.bool()
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=keep_BS.device).tril()
    allowed_BSS = causal_SS[None] & keep_BS[:, None, :]
    allowed_BSS |= torch.eye(S, dtype=torch.bool, device=keep_BS.device)[None]
    return (~allowed_BSS)[:, None]


def attention_mask_for(attention_mask_BS: torch.Tensor) -> torch.Tensor | None:
    """The megatron mask to pass for a padding mask ``[B, S]``: ``None`` (plain causal, which
    lets the fused attention skip the blocks above the diagonal) when every row is real
    tokens followed only by padding, since causality alone then keeps each real query off
    the pads after it; else ``causal_padding_mask``. Pad positions' outputs differ between
    the two and are ignored by every consumer."""
    keep_BS = attention_mask_BS.bool()
    if bool((keep_BS[:, 1:] <= keep_BS[:, :-1]).all()):
        return None
    return causal_padding_mask(attention_mask_BS)


def position_ids_from_mask(attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens (left padding starts at 0 on the first token)."""
    return (attention_mask_BS.long().cumsum(dim=1) - 1).clamp(min=0)
