"""Attention for generation: packed (varlen) causal prefill and paged-KV decode.

Legend: ``B`` decoding sequences, ``T`` packed prefill tokens, ``Hq`` query heads and ``G``
KV heads of this TP rank (``g = Hq / G`` queries per KV head), ``D`` head dim, ``N`` pool
blocks in use, ``W`` block size (token slots per block), ``J`` most blocks of one sequence,
``O`` most owners of one block (``n`` samples sharing a prompt block).

Three backends, chosen by ``select_backend`` through ``hpc_rlhf.ops._backend.resolve``
(explicit capability checks, logged once):

* ``"flash_attn"`` (CUDA of compute capability >= 8.0, flash-attn installed):
  ``flash_attn_varlen_func`` for prefill and ``flash_attn_with_kvcache(..., block_table=...)``
  for decode on the ``"NWGD"`` pool. Only a GPU runs it: ``tests/inference/test_cuda_graphs``
  (graph-captured against eager decode, both on this backend).
* ``"cpp"`` (CPU, an fp32 or bf16 cache, hpc_rlhf._C built): prefill on the C++ causal
  attention kernel
  (``ops.causal_attention`` over the packed sequences' ``cu_seqlens``); decode by
  ``paged_decode_attention_cpu``, one task per (sequence, KV head) reading each block of
  its table once for the query heads sharing it, with an online softmax per block, a bf16
  pool read in place and widened per element (fp32 math); it never reads past a
  sequence's length, so fresh blocks need no zeroing.
* ``"torch"`` (everywhere; the reference the others are tested against). Prefill runs
  ``scaled_dot_product_attention`` per packed sequence (a loop over sequences, never over
  tokens). Decode never gathers the
  history: scores and outputs are batched matmuls of each pool block *in place* (``[W, D]``
  matrices of the ``"NGWD"`` pool) with the queries of the sequences owning it; only the
  small ``[B, Hq, J*W]`` score matrix is gathered per sequence for an exact softmax, and
  the per-block outputs are summed back per sequence. A block shared by several samples is
  read once for all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hpc_rlhf.ops import _backend
from hpc_rlhf.ops.causal_attention import causal_attention, window_limit

# flash-attn (CUDA, compute capability >= 8.0), the C++ kernels on an fp32 or bf16 CPU cache
# without a sliding window, torch; the names are inference.config.ATTENTION_BACKENDS
# (tests/ops/test_resolver.py checks it)
GENERATION_KERNELS = (
    _backend.TORCH,
    _backend.Kernel("cpp", dtypes=_backend.FP32_BF16, limit=window_limit),
    _backend.Kernel("flash_attn"),
)


def select_backend(
    requested: str,
    device: torch.device,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    window: int | None = None,
) -> str:
    """The backend for a model on ``device`` with a ``dtype`` cache and a sliding ``window``
    (``_backend.resolve`` over :data:`GENERATION_KERNELS`: ``auto`` takes flash-attn on
    CUDA, the C++ kernels on CPU, else torch); refuses an unusable request and a flash-attn
    pool of blocks not a multiple of 256 tokens."""
    chosen = _backend.resolve(
        "generation.attention_backend",
        requested,
        device,
        GENERATION_KERNELS,
        dtype=dtype,
        window=window,
    )
    if chosen == "flash_attn" and block_size % 256:
        raise ValueError(f"flash-attn's paged KV needs block_size % 256 == 0, got {block_size}")
    return chosen


def kv_layout(backend: str) -> str:
    """The KV pool layout a backend reads (see ``kv_cache``)."""
    return "NWGD" if backend == "flash_attn" else "NGWD"


# ----------------------------------------------------------------------------- prefill


def _prefill_attention(
    q_THD, k_TGD, v_TGD, seq_lens: list[int], backend: str, window: int | None
) -> torch.Tensor:
    """Causal attention within each packed sequence through ``ops.causal_attention``:
    ``[T, Hq*D]``."""
    cu_seqlens = torch.tensor([0, *seq_lens]).cumsum(0)
    out_T1HD = causal_attention(
        q_THD.unsqueeze(1),
        k_TGD.unsqueeze(1),
        v_TGD.unsqueeze(1),
        cu_seqlens,
        backend=backend,
        window=window,
    )
    return out_T1HD.reshape(q_THD.shape[0], -1)


def prefill_attention_torch(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    v_TGD: torch.Tensor,
    seq_lens: list[int],
    window: int | None = None,
) -> torch.Tensor:
    """Causal (sliding-window) attention within each packed sequence, SDPA per sequence
    (the op's reference): ``[T, Hq*D]``."""
    return _prefill_attention(q_THD, k_TGD, v_TGD, seq_lens, "torch", window)


def prefill_attention_cpp(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    v_TGD: torch.Tensor,
    seq_lens: list[int],
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention within each packed sequence on the C++ CPU kernel of
    ``ops.causal_attention`` (its ``auto`` choice: the torch reference where the kernel does
    not apply, e.g. a head dim that is not a multiple of 16): ``[T, Hq*D]``."""
    return _prefill_attention(q_THD, k_TGD, v_TGD, seq_lens, "auto", window)


def _flash_window(window: int | None) -> tuple[int, int]:
    """flash-attn's ``window_size`` (left, right); (-1, -1) is unlimited."""
    return (-1, -1) if window is None else (window - 1, 0)


def prefill_attention_flash(
    q_THD, k_TGD, v_TGD, seq_lens: list[int], window: int | None = None
) -> torch.Tensor:
    """flash-attn varlen causal attention over packed sequences (GPU only)."""
    from flash_attn import flash_attn_varlen_func

    cu = torch.tensor([0, *seq_lens], device=q_THD.device).cumsum(0).to(torch.int32)
    out_THD = flash_attn_varlen_func(
        q_THD,
        k_TGD,
        v_TGD,
        cu,
        cu,
        max(seq_lens),
        max(seq_lens),
        causal=True,
        window_size=_flash_window(window),
    )
    return out_THD.reshape(q_THD.shape[0], -1)


# ----------------------------------------------------------------------------- decode


@dataclass
class DecodeMeta:
    """Per-step indexing shared by every layer (built once per decode step)."""

    num_blocks_used: int  # N: pool prefix [0, N) that holds every running block
    max_blocks: int  # J
    # paged-kernel inputs (flash-attn, cpp)
    block_table_BJ: torch.Tensor  # [B, J] int32 (padding 0)
    context_lens_B: torch.Tensor  # [B] int32
    # the torch path's (block, owner) rows; built only when asked (``block_rows=True``)
    max_owners: int = 0  # O
    q_source_NO: torch.Tensor | None = None  # [N*O] row of q per (block, owner); B = zero row
    pair_BJ: torch.Tensor | None = None  # [B, J] flat (block * O + owner slot); N*O = zero row
    valid_flat: torch.Tensor | None = None  # [P] flat b*J + j of real (sequence, block) pairs
    mask_BL: torch.Tensor | None = None  # [B, J*W] True where the query attends the position
    window: int | None = None  # sliding window: the latest ``window`` positions only


def build_decode_meta(
    tables: list[list[int]],
    context_lens: list[int],
    block_size: int,
    device=None,
    block_rows: bool = True,
    window: int | None = None,
) -> DecodeMeta:
    """Index tensors for one decode step of sequences with these block tables/lengths
    (each query attends its sequence's latest ``window`` positions with a sliding window).
    ``block_rows=False`` skips the torch path's (block, owner) indexing (Python loops over
    every block of every sequence) for the paged kernels, which read the tables directly."""
    J = max(len(t) for t in tables)
    padded = [t + [0] * (J - len(t)) for t in tables]
    meta = DecodeMeta(
        num_blocks_used=max(max(t) for t in tables) + 1,
        max_blocks=J,
        block_table_BJ=torch.tensor(padded, dtype=torch.int32, device=device),
        context_lens_B=torch.tensor(context_lens, dtype=torch.int32, device=device),
        window=window,
    )
    if block_rows:
        _add_block_rows(meta, tables, context_lens, block_size, device)
    return meta


def _add_block_rows(meta: DecodeMeta, tables, context_lens, block_size: int, device) -> None:
    """Fill the torch path's (block, owner slot) indexing of ``meta``."""
    B, J, N = len(tables), meta.max_blocks, meta.num_blocks_used
    owners: dict[int, int] = {}
    slot_BJ = []
    for table in tables:
        row = []
        for block in table:
            row.append(owners.get(block, 0))
            owners[block] = row[-1] + 1
        slot_BJ.append(row)
    Ow = max(owners.values())
    q_source = [B] * (N * Ow)
    pair = [[N * Ow] * J for _ in range(B)]
    valid = []
    for b, table in enumerate(tables):
        for j, block in enumerate(table):
            flat = block * Ow + slot_BJ[b][j]
            q_source[flat] = b
            pair[b][j] = flat
            valid.append(b * J + j)
    lens_B = torch.tensor(context_lens)
    meta.max_owners = Ow
    meta.q_source_NO = torch.tensor(q_source, device=device)
    meta.pair_BJ = torch.tensor(pair, device=device)
    meta.valid_flat = torch.tensor(valid, device=device)
    pos_1L = torch.arange(J * block_size)[None, :]
    mask_BL = pos_1L < lens_B[:, None]
    if meta.window is not None:
        mask_BL &= pos_1L >= lens_B[:, None] - meta.window
    meta.mask_BL = mask_BL.to(device)


def _to_blocks(x_BGgX: torch.Tensor, meta: DecodeMeta) -> torch.Tensor:
    """Per-sequence rows ``[B, G, g, X]`` -> per-(block, owner) rows ``[N, G, O*g, X]``."""
    B, G, g, X = x_BGgX.shape
    N, Ow = meta.num_blocks_used, meta.max_owners
    padded = torch.cat([x_BGgX, x_BGgX.new_zeros(1, G, g, X)])
    rows_NO = padded[meta.q_source_NO].view(N, Ow, G, g, X)
    return rows_NO.transpose(1, 2).reshape(N, G, Ow * g, X)


def _from_blocks(x_NGOX: torch.Tensor, meta: DecodeMeta, g: int) -> torch.Tensor:
    """Per-(block, owner) rows ``[N, G, O*g, X]`` -> per (sequence, block) ``[B, J, G, g, X]``."""
    N, G, _, X = x_NGOX.shape
    Ow = meta.max_owners
    flat = x_NGOX.view(N, G, Ow, g, X).transpose(1, 2).reshape(N * Ow, G, g, X)
    flat = torch.cat([flat, flat.new_zeros(1, G, g, X)])
    return flat[meta.pair_BJ]


def decode_attention_torch(
    q_BHD: torch.Tensor, k_NGWD: torch.Tensor, v_NGWD: torch.Tensor, meta: DecodeMeta
) -> torch.Tensor:
    """One query per sequence against its paged history (``"NGWD"`` pool of one layer).

    The new token's K/V must already be in the pool. Returns ``[B, Hq*D]``.
    """
    if (
        meta.q_source_NO is None
        or meta.pair_BJ is None
        or meta.valid_flat is None
        or meta.mask_BL is None
    ):
        raise ValueError("decode_attention_torch needs build_decode_meta(..., block_rows=True)")
    B, Hq, D = q_BHD.shape
    G, W = k_NGWD.shape[1], k_NGWD.shape[2]
    N = meta.num_blocks_used
    g, J, Ow = Hq // G, meta.max_blocks, meta.max_owners
    q_NGOD = _to_blocks(q_BHD.view(B, G, g, D) * (1.0 / math.sqrt(D)), meta)
    k_NGWD, v_NGWD = k_NGWD[:N], v_NGWD[:N]
    scores_NGOW = torch.matmul(q_NGOD, k_NGWD.transpose(-1, -2))
    scores_BJGgW = _from_blocks(scores_NGOW, meta, g)
    scores_BGgL = scores_BJGgW.permute(0, 2, 3, 1, 4).reshape(B, G, g, J * W)
    scores_BGgL = scores_BGgL.float().masked_fill(~meta.mask_BL[:, None, None, :], float("-inf"))
    probs_BGgL = torch.softmax(scores_BGgL, dim=-1).to(q_BHD.dtype)
    # Back to (block, owner) rows: each real (sequence, block) pair owns one row.
    probs_PGgW = probs_BGgL.view(B, G, g, J, W).permute(0, 3, 1, 2, 4).reshape(B * J, G, g, W)
    probs_flat = probs_BGgL.new_zeros(N * Ow + 1, G, g, W)
    pair_P = meta.pair_BJ.view(-1)[meta.valid_flat]
    probs_flat[pair_P] = probs_PGgW[meta.valid_flat]
    probs_NGOW = probs_flat[: N * Ow].view(N, Ow, G, g, W).transpose(1, 2).reshape(N, G, Ow * g, W)
    out_NGOD = torch.matmul(probs_NGOW, v_NGWD)
    out_BGgD = _from_blocks(out_NGOD, meta, g).sum(dim=1)
    return out_BGgD.reshape(B, Hq * D)


def decode_attention_cpp(
    q_BHD: torch.Tensor, k_NGWD: torch.Tensor, v_NGWD: torch.Tensor, meta: DecodeMeta
) -> torch.Tensor:
    """The C++ CPU paged decode kernel (``"NGWD"`` pool of one layer) -> ``[B, Hq*D]``; no
    sliding window (``select_backend`` picks torch for one)."""
    if meta.window is not None:
        raise ValueError("decode_attention_cpp has no sliding window; use the torch backend")
    B, Hq, D = q_BHD.shape
    out_BHD = _backend.built_extension().paged_decode_attention_cpu(
        q_BHD.contiguous(),
        k_NGWD,
        v_NGWD,
        meta.block_table_BJ,
        meta.context_lens_B,
        1.0 / math.sqrt(D),
    )
    return out_BHD.reshape(B, Hq * D)


def decode_attention_flash(q_BHD, k_NWGD, v_NWGD, meta: DecodeMeta) -> torch.Tensor:
    """flash-attn paged decode (GPU only): the new K/V are already in the pool."""
    from flash_attn import flash_attn_with_kvcache

    out_B1HD = flash_attn_with_kvcache(
        q_BHD[:, None],
        k_NWGD,
        v_NWGD,
        cache_seqlens=meta.context_lens_B,
        block_table=meta.block_table_BJ,
        causal=True,
        window_size=_flash_window(meta.window),
    )
    return out_B1HD.reshape(q_BHD.shape[0], -1)
