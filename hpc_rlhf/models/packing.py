"""Packed (THD) micro-batches: right-padded rows run as one row without their padding, and
rows that begin with the same tokens run those tokens once.

A micro-batch of ``B`` rows padded to ``S`` spends ``B*S - sum(lengths)`` positions of
every matmul on padding. ``PackedLayout`` lays the real tokens of the rows end to end in
one row of ``T`` positions (a tail segment of padding rounds it up to a multiple of TP
under sequence parallelism, or to the one length every micro-batch of a pipeline schedule
shares), with megatron-core's ``PackedSeqParams`` (``qkv_format="thd"``, ``cu_seqlens``)
so that RoPE and the core attention keep each row to itself.

**Shared prefixes.** Rows of one micro-batch often begin with the same tokens: a
preference pair's chosen and rejected rows share their prompt, a GRPO group's responses
theirs, many rows a chat template's system turn. Under causal attention a token's hidden
states depend only on the tokens up to it, so two rows equal on their first ``L`` tokens
have equal hidden states there: with ``min_shared`` given, a row whose first ``L >=
min_shared`` tokens equal an earlier row's places only its other tokens in the packed row
and reads its first ``L`` outputs at that earlier row's positions (gradients from both
rows add there, as the unshared computation's would). Every per-position layer (the
projections, MLPs, norms: nearly all of the FLOPs) then runs on fewer positions. Attention
is the one layer that mixes positions: there ``SharedPrefixSeqParams`` carries an
*attention stream*, each row's full token sequence end to end (gathered from the packed
row: ``expand_index``), in which RoPE and any THD attention kernel see every row whole,
as without sharing, and ``collapse_index`` picks each packed position's output back out
of it (``models.attention.SharedPrefixSelfAttention``). The stream's only extra work is
the attention of the repeated prefix queries, whose outputs are dropped.

Consumers keep the padded layout: ``unpack`` gathers per-token outputs back to
``[B, S, ...]`` (zeros at padding) and ``selected_index`` orders the LM head's selected
positions exactly as the padded path does (position-major, see
``models.overrides.selective``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpc_rlhf.ops.rope import segment_positions
from hpc_rlhf.parallel.state import round_up

# Below this many equal leading tokens a row is packed whole: the saving would be a
# handful of positions (every row begins with BOS) against a gather per layer.
SHARED_PREFIX_MIN_TOKENS = 16


@dataclass(frozen=True)
class RowSharing:
    """Which earlier row holds each row's shared leading tokens: ``root[b]`` (``b``
    itself when none) and how many, ``shared[b]`` (0 when none)."""

    lengths: list[int]
    root: list[int]
    shared: list[int]

    @property
    def any(self) -> bool:
        """Whether some row shares a prefix."""
        return any(self.shared)

    @property
    def own_tokens(self) -> int:
        """Tokens placed in the packed row: real tokens minus the shared ones."""
        return sum(self.lengths) - sum(self.shared)


def row_sharing(
    keep_BS: torch.Tensor, ids_BS: torch.Tensor | None = None, min_shared: int | None = None
) -> RowSharing | None:
    """The rows of a right-padded batch and their shared prefixes (none without ``ids_BS``
    and ``min_shared``); ``None`` when packing does not apply (a row is empty or is not real
    tokens then padding). Each row shares with the earlier unshared row it agrees with on
    the most leading tokens, at least ``min_shared`` of them, and keeps its last token."""
    B, S = keep_BS.shape
    lengths_B = keep_BS.sum(dim=1)
    prefix_BS = torch.arange(S, device=keep_BS.device) < lengths_B[:, None]
    if not torch.equal(prefix_BS, keep_BS) or int(lengths_B.min()) == 0:
        return None
    lengths = [int(n) for n in lengths_B.tolist()]
    root, shared = list(range(B)), [0] * B
    if ids_BS is None or min_shared is None:
        return RowSharing(lengths, root, shared)
    if min_shared < 1:
        raise ValueError(f"min_shared must be >= 1, got {min_shared}")
    roots: list[int] = []
    for b in range(B):
        if roots and lengths[b] > min_shared:
            roots_R = torch.tensor(roots, device=ids_BS.device)
            equal_RS = (ids_BS[roots_R] == ids_BS[b]) & keep_BS[roots_R]
            common_R = equal_RS.int().cumprod(dim=1).sum(dim=1)  # equal leading real tokens
            best = int(common_R.argmax())
            length = min(int(common_R[best]), lengths[b] - 1)
            if length >= min_shared:
                root[b], shared[b] = roots[best], length
                continue
        roots.append(b)
    return RowSharing(lengths, root, shared)


@dataclass(frozen=True)
class PackedLayout:
    """Where each real token of a right-padded ``[B, S]`` batch sits in the packed row."""

    flat_index_N: torch.Tensor  # [N] b*S + s of each packed real token, in packed order
    packed_pos_BS: torch.Tensor  # [B, S] packed position of each real token's output, -1 pad
    cu_seqlens: torch.Tensor  # [segments + 1] int32 of the attention stream (rows, tail)
    positions_1T: torch.Tensor  # [1, T] position of each packed token within its row
    batch_shape: tuple[int, int]  # (B, S)
    max_seqlen: int
    expand_index: torch.Tensor | None = None  # [T_stream] with shared prefixes, else None
    collapse_index: torch.Tensor | None = None  # [T] with shared prefixes, else None

    @property
    def packed_length(self) -> int:
        """``T``: packed real tokens plus the tail padding."""
        return self.positions_1T.shape[1]

    @classmethod
    def from_mask(
        cls,
        mask_BS: torch.Tensor,
        multiple: int = 1,
        length: int | None = None,
        ids_BS: torch.Tensor | None = None,
        min_shared: int | None = None,
    ) -> PackedLayout | None:
        """The layout of ``mask_BS`` (True = real token), or ``None`` where
        ``packed_length`` says packing does not apply. ``length``: the packed length to
        use instead (a pipeline needs one for every micro-batch of a schedule), at least
        this batch's ``packed_length``. With ``ids_BS`` and ``min_shared``, rows share
        their equal leading tokens (``row_sharing``)."""
        keep_BS = mask_BS.bool()
        sharing = row_sharing(keep_BS, ids_BS, min_shared)
        T = _packed_length(sharing, keep_BS.numel(), multiple, must_save=length is None)
        if sharing is None or T is None:
            return None
        if length is not None:
            if length < T or length % multiple:
                raise ValueError(
                    f"packed length {length} must be a multiple of {multiple} and >= {T}"
                )
            T = length
        return _build_layout(keep_BS, sharing, T)

    def pack(self, x_BS: torch.Tensor, fill=0) -> torch.Tensor:
        """``[B, S, ...]`` -> ``[1, T, ...]``: the packed real tokens, tail = ``fill``."""
        B, S = self.batch_shape
        real_N = x_BS.reshape(B * S, *x_BS.shape[2:])[self.flat_index_N]
        tail = self.packed_length - real_N.shape[0]
        if tail:
            pad = real_N.new_full((tail, *real_N.shape[1:]), fill)
            real_N = torch.cat([real_N, pad])
        return real_N.unsqueeze(0)

    def unpack(self, out_1T: torch.Tensor) -> torch.Tensor:
        """``[1, T, ...]`` -> ``[B, S, ...]`` with zeros at padding (differentiable; a
        shared position's gradient is the sum of its rows')."""
        B, S = self.batch_shape
        index_R = self.packed_pos_BS.reshape(-1)
        real_R = index_R >= 0
        dense = out_1T.new_zeros(B * S, *out_1T.shape[2:])
        picked = out_1T[0].index_select(0, index_R[real_R])
        return dense.index_copy(0, real_R.nonzero().squeeze(1), picked).view(
            B, S, *out_1T.shape[2:]
        )

    def selected_index(self, select_BS: torch.Tensor) -> torch.Tensor:
        """Packed positions of the selected entries, in the padded path's position-major
        order (``hidden_SBH[select_BS.t()]``), so the head's outputs line up the same way."""
        return self.packed_pos_BS.t()[select_BS.t()]

    def seq_params(self):
        """megatron-core's THD description of the packed row (its attention stream with
        shared prefixes: ``models.attention.SharedPrefixSeqParams``)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        from hpc_rlhf.models.attention import SharedPrefixSeqParams

        fields = {
            "qkv_format": "thd",
            "cu_seqlens_q": self.cu_seqlens,
            "cu_seqlens_kv": self.cu_seqlens,
            "max_seqlen_q": self.max_seqlen,
            "max_seqlen_kv": self.max_seqlen,
        }
        if self.expand_index is None:
            return PackedSeqParams(**fields)
        return SharedPrefixSeqParams(
            **fields, expand_index=self.expand_index, collapse_index=self.collapse_index
        )


def _build_layout(keep_BS: torch.Tensor, sharing: RowSharing, T: int) -> PackedLayout:
    """The layout of rows ``sharing`` describes in a packed row of ``T`` positions."""
    B, S = keep_BS.shape
    device = keep_BS.device
    shared_B = torch.tensor(sharing.shared, device=device)
    own_B = torch.tensor(sharing.lengths, device=device) - shared_B
    starts_B = own_B.cumsum(0) - own_B  # each row's first packed token
    s_1S = torch.arange(S, device=device)[None, :]
    own_BS = keep_BS & (s_1S >= shared_B[:, None])
    root_start_B = starts_B[torch.tensor(sharing.root, device=device)]
    packed_pos_BS = torch.where(
        s_1S < shared_B[:, None],
        root_start_B[:, None] + s_1S,
        starts_B[:, None] + s_1S - shared_B[:, None],
    )
    packed_pos_BS = torch.where(keep_BS, packed_pos_BS, -1)
    flat_index_N = own_BS.reshape(-1).nonzero().squeeze(1)
    n_own = sharing.own_tokens
    tail = [T - n_own] if T > n_own else []
    positions_T = torch.cat([flat_index_N.cpu() % S, segment_positions(tail)])
    stream_lengths = sharing.lengths + tail  # the attention stream: every row whole
    cu = torch.zeros(len(stream_lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(stream_lengths).cumsum(0)
    expand = collapse = None
    if sharing.any:
        tail_T = torch.arange(n_own, T, device=device)
        expand = torch.cat([packed_pos_BS[keep_BS], tail_T])
        stream_pos_BS = cu[:B].long().to(device)[:, None] + s_1S
        collapse = torch.cat(
            [stream_pos_BS.reshape(-1)[flat_index_N], tail_T - n_own + sum(sharing.lengths)]
        )
    return PackedLayout(
        flat_index_N=flat_index_N,
        packed_pos_BS=packed_pos_BS,
        cu_seqlens=cu.to(device),
        positions_1T=positions_T[None, :].to(device),
        batch_shape=(B, S),
        max_seqlen=max(stream_lengths),
        expand_index=expand,
        collapse_index=collapse,
    )


def _packed_length(
    sharing: RowSharing | None, padded_size: int, multiple: int, must_save: bool
) -> int | None:
    if sharing is None:
        return None
    T = round_up(sharing.own_tokens, multiple)
    return T if T < padded_size or not must_save else None


def packed_length(
    mask_BS: torch.Tensor,
    multiple: int = 1,
    must_save: bool = True,
    ids_BS: torch.Tensor | None = None,
    min_shared: int | None = None,
) -> int | None:
    """Packed length of a right-padded ``mask_BS``: its packed real tokens (all, or with
    ``ids_BS`` and ``min_shared`` those not shared, see ``row_sharing``) rounded up to
    ``multiple``; ``None`` when packing does not apply (a row is empty or is not real
    tokens then padding) or, with ``must_save``, would save nothing (no shorter than
    ``B * S``; a pipeline packs such a micro-batch anyway, its schedule has one format)."""
    keep_BS = mask_BS.bool()
    sharing = row_sharing(keep_BS, ids_BS, min_shared)
    return _packed_length(sharing, keep_BS.numel(), multiple, must_save)
