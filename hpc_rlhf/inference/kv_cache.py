"""Paged KV cache: a fixed pool of fixed-size blocks, reference-counted for prefix sharing.

Legend: ``L`` layers, ``N`` blocks in the pool, ``G`` KV heads (query groups) of this TP
rank, ``W`` block size (token slots per block), ``D`` head dim, ``T`` tokens written at once.

One K and one V tensor per engine hold every layer's blocks. Two layouts:

* ``"NGWD"`` (torch attention): ``[L, N, G, W, D]``, so a block of one head is a contiguous
  ``[W, D]`` matrix that decode attention multiplies in place (no gather of the history);
* ``"NWGD"`` (flash-attn's paged layout): ``[L, N, W, G, D]``.

A sequence owns a block table (list of block ids); block ``j`` holds its tokens
``j*W .. j*W+W-1``. Blocks are handed out lowest id first (a heap), which keeps the used
blocks packed at the start of the pool so decode attention touches a short prefix of it.
``n`` samples of a prompt share the prompt's blocks by reference count; the first write into
a shared block copies it (copy-on-write, ``BlockAllocator.copy_on_write``).
"""

from __future__ import annotations

import heapq
import logging

import torch

from hpc_rlhf.inference.config import CacheShape

logger = logging.getLogger(__name__)


class BlockAllocator:
    """Free list (lowest id first) and reference counts of ``num_blocks`` blocks."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))  # already a heap
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """A fresh block with reference count 1 (``IndexError`` when none is free)."""
        if not self._free:
            raise IndexError("no free KV-cache block")
        block = heapq.heappop(self._free)
        self._refs[block] = 1
        return block

    def share(self, block: int) -> int:
        """One more owner of ``block`` (prefix sharing)."""
        self._refs[block] += 1
        return block

    def free(self, block: int) -> None:
        """Drop one owner; the block returns to the free list with its last owner."""
        self._refs[block] -= 1
        if self._refs[block] == 0:
            heapq.heappush(self._free, block)
        elif self._refs[block] < 0:
            raise RuntimeError(f"KV block {block} freed more often than allocated")

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def free_table(self, table: list[int]) -> None:
        """Release every block of a block table."""
        for block in table:
            self.free(block)

    def used_range(self) -> int:
        """One past the highest block id in use (0 when the pool is empty)."""
        for block in range(self.num_blocks - 1, -1, -1):
            if self._refs[block]:
                return block + 1
        return 0


class PagedKVCache:
    """The K/V pools of one engine plus their allocator."""

    def __init__(
        self, shape: CacheShape, num_blocks: int, layout: str, device=None, scratch: bool = False
    ):
        if layout not in ("NGWD", "NWGD"):
            raise ValueError(f"unknown KV layout {layout!r}")
        self.shape = shape
        self.layout = layout
        self.num_blocks = num_blocks
        s = shape
        if layout == "NGWD":
            dims = (s.num_layers, num_blocks, s.num_kv_heads, s.block_size, s.head_dim)
        else:
            dims = (s.num_layers, num_blocks, s.block_size, s.num_kv_heads, s.head_dim)
        # Uninitialised (no page is touched before use); a block is zeroed when first handed
        # out (``zero_fresh_blocks``): attention multiplies a block's unwritten slots by a
        # zero probability, and 0 * NaN garbage would poison the sum.
        self.k_LN = torch.empty(dims, dtype=s.dtype, device=device)
        self.v_LN = torch.empty(dims, dtype=s.dtype, device=device)
        # ``scratch``: the last block is kept out of the allocator (CUDA-graph padding rows).
        self.allocator = BlockAllocator(num_blocks - 1 if scratch else num_blocks)
        self.scratch_block = num_blocks - 1 if scratch else None
        self._zeroed = torch.zeros(num_blocks, dtype=torch.bool)
        self.cow_copies = 0

    @property
    def nbytes(self) -> int:
        return 2 * self.k_LN.numel() * self.k_LN.element_size()

    def zero_fresh_blocks(self, tables: list[list[int]]) -> None:
        """Zero the blocks of ``tables`` never used since the pool was allocated."""
        blocks = torch.tensor(sorted({b for t in tables for b in t}), dtype=torch.long)
        if blocks.numel() == 0:
            return
        fresh = blocks[~self._zeroed[blocks]]
        if fresh.numel():
            self.k_LN.index_fill_(1, fresh.to(self.k_LN.device), 0)
            self.v_LN.index_fill_(1, fresh.to(self.v_LN.device), 0)
            self._zeroed[fresh] = True

    def slots(self, table: list[int], start: int, end: int) -> tuple[list[int], list[int]]:
        """(block id, offset in block) of token positions ``start .. end-1`` of a sequence."""
        W = self.shape.block_size
        return [table[p // W] for p in range(start, end)], [p % W for p in range(start, end)]

    def slot_rows(self, blocks_T: torch.Tensor, offsets_T: torch.Tensor) -> torch.Tensor:
        """Row indices of ``T`` token slots in a layer's pool flattened to rows (``[T*G]``
        rows of ``D`` for ``"NGWD"``, ``[T]`` rows of ``G*D`` for ``"NWGD"``). Computed
        once per forward and shared by every layer and by K and V."""
        W, G = self.shape.block_size, self.shape.num_kv_heads
        if self.layout == "NWGD":
            return blocks_T * W + offsets_T
        heads_G = torch.arange(G, device=blocks_T.device)
        return ((blocks_T[:, None] * G + heads_G[None, :]) * W + offsets_T[:, None]).reshape(-1)

    def write(self, layer: int, rows, k_TGD: torch.Tensor, v_TGD: torch.Tensor) -> None:
        """Store the K/V of ``T`` tokens at their slot ``rows`` (``slot_rows``) of ``layer``.

        ``index_copy_`` on the flattened pool: advanced-index assignment into the strided
        ``[N, G, W, D]`` pool takes a slow path (measured ~250x slower on CPU)."""
        width = self.k_LN.shape[-1] * (self.shape.num_kv_heads if self.layout == "NWGD" else 1)
        self.k_LN[layer].view(-1, width).index_copy_(0, rows, k_TGD.reshape(-1, width))
        self.v_LN[layer].view(-1, width).index_copy_(0, rows, v_TGD.reshape(-1, width))

    def copy_on_write(self, table: list[int], index: int) -> bool:
        """Give the sequence its own copy of ``table[index]`` if it is shared. Returns
        whether a copy was made; raises ``IndexError`` when no block is free."""
        block = table[index]
        if self.allocator.refcount(block) == 1:
            return False
        fresh = self.allocator.allocate()
        self.k_LN[:, fresh] = self.k_LN[:, block]
        self.v_LN[:, fresh] = self.v_LN[:, block]
        self._zeroed[fresh] = True  # fully written by the copy: no zeroing later
        self.allocator.free(block)
        table[index] = fresh
        self.cow_copies += 1
        return True

    def release(self) -> None:
        """Free the pool's memory (the cache is unusable afterwards)."""
        self.k_LN = torch.empty(0)
        self.v_LN = torch.empty(0)
