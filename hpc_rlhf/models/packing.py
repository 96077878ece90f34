"""Packed (THD) micro-batches: right-padded rows run as one row without their padding.

A micro-batch of ``B`` rows padded to ``S`` spends ``B*S - sum(lengths)`` positions of
every matmul on padding. ``PackedLayout`` lays the real tokens of the rows end to end in
one row of ``T`` positions (``T = sum(lengths)``; a tail segment of padding rounds it up to
a multiple of TP under sequence parallelism, or to the one length every micro-batch of a
pipeline schedule shares), with per-row positions restarting at 0 and
megatron-core's ``PackedSeqParams`` (``qkv_format="thd"``, ``cu_seqlens``) so that RoPE
and the core attention keep each row to itself.

Consumers keep the padded layout: ``unpack`` scatters per-token outputs back to
``[B, S, ...]`` (zeros at padding) and ``selected_index`` orders the LM head's selected
positions exactly as the padded path does (position-major, see ``models.overrides.selective``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpc_rlhf.ops.rope import segment_positions
from hpc_rlhf.parallel.state import round_up


@dataclass(frozen=True)
class PackedLayout:
    """Where each real token of a right-padded ``[B, S]`` batch sits in the packed row."""

    flat_index_N: torch.Tensor  # [N] b*S + s of each real token, in packed order
    starts_B: torch.Tensor  # [B] packed offset of each row's first token
    cu_seqlens: torch.Tensor  # [n_segments + 1] int32 (rows, then the tail if any)
    positions_1T: torch.Tensor  # [1, T] position of each packed token within its row
    batch_shape: tuple[int, int]  # (B, S)
    max_seqlen: int

    @property
    def packed_length(self) -> int:
        """``T``: real tokens plus the tail padding."""
        return self.positions_1T.shape[1]

    @classmethod
    def from_mask(
        cls, mask_BS: torch.Tensor, multiple: int = 1, length: int | None = None
    ) -> PackedLayout | None:
        """The layout of ``mask_BS`` (True = real token), or ``None`` where
        ``packed_length`` says packing does not apply. ``length``: the packed length to
        use instead (a pipeline needs one for every micro-batch of a schedule), at least
        this batch's ``packed_length(mask_BS, multiple)``."""
        keep_BS = mask_BS.bool()
        B, S = keep_BS.shape
        T = packed_length(keep_BS, multiple, must_save=length is None)
        if T is None:
            return None
        lengths_B = keep_BS.sum(dim=1)
        n_real = int(lengths_B.sum())
        if length is not None:
            if length < T or length % multiple:
                raise ValueError(
                    f"packed length {length} must be a multiple of {multiple} and >= {T}"
                )
            T = length
        seg_lengths = lengths_B.tolist() + ([T - n_real] if T > n_real else [])
        device = keep_BS.device
        cu = torch.zeros(len(seg_lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(seg_lengths).cumsum(0)
        positions_T = segment_positions(seg_lengths)
        return cls(
            flat_index_N=keep_BS.reshape(-1).nonzero().squeeze(1),
            starts_B=cu[:B].long().to(device),
            cu_seqlens=cu.to(device),
            positions_1T=positions_T[None, :].to(device),
            batch_shape=(B, S),
            max_seqlen=max(seg_lengths),
        )

    def pack(self, x_BS: torch.Tensor, fill=0) -> torch.Tensor:
        """``[B, S, ...]`` -> ``[1, T, ...]``: the real tokens end to end, tail = ``fill``."""
        B, S = self.batch_shape
        real_N = x_BS.reshape(B * S, *x_BS.shape[2:])[self.flat_index_N]
        tail = self.packed_length - real_N.shape[0]
        if tail:
            pad = real_N.new_full((tail, *real_N.shape[1:]), fill)
            real_N = torch.cat([real_N, pad])
        return real_N.unsqueeze(0)

    def unpack(self, out_1T: torch.Tensor) -> torch.Tensor:
        """``[1, T, ...]`` -> ``[B, S, ...]`` with zeros at padding (differentiable)."""
        B, S = self.batch_shape
        real_N = out_1T[0, : self.flat_index_N.shape[0]]
        dense = real_N.new_zeros(B * S, *real_N.shape[1:])
        return dense.index_copy(0, self.flat_index_N, real_N).view(B, S, *real_N.shape[1:])

    def selected_index(self, select_BS: torch.Tensor) -> torch.Tensor:
        """Packed positions of the selected entries, in the padded path's position-major
        order (``hidden_SBH[select_BS.t()]``), so the head's outputs line up the same way."""
        s_N, b_N = select_BS.t().nonzero(as_tuple=True)
        return self.starts_B[b_N] + s_N

    def seq_params(self):
        """megatron-core's THD description of the packed row."""
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )


def packed_length(mask_BS: torch.Tensor, multiple: int = 1, must_save: bool = True) -> int | None:
    """Packed length of a right-padded ``mask_BS``: its real tokens rounded up to
    ``multiple``; ``None`` when packing does not apply (a row is empty or is not real
    tokens then padding) or, with ``must_save``, would save nothing (no shorter than
    ``B * S``; a pipeline packs such a micro-batch anyway, its schedule has one format)."""
    keep_BS = mask_BS.bool()
    B, S = keep_BS.shape
    lengths_B = keep_BS.sum(dim=1)
    prefix_BS = torch.arange(S, device=keep_BS.device) < lengths_B[:, None]
    if not torch.equal(prefix_BS, keep_BS) or int(lengths_B.min()) == 0:
        return None
    T = round_up(int(lengths_B.sum()), multiple)
    return T if T < B * S or not must_save else None


def segment_bounds(packed_seq_params) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of each packed segment, from ``cu_seqlens_q``."""
    cu = packed_seq_params.cu_seqlens_q.tolist()
    return list(zip(cu[:-1], cu[1:]))
