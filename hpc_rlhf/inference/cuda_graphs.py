"""CUDA-graph capture of decode steps (GPU + flash-attn backend only; ``GenerationConfig.
cuda_graphs=True``).

The engine refuses ``cuda_graphs=True`` unless the device is CUDA and the attention
backend is flash-attn, so this module never runs on CPU; it is tested against eager decode
on a GPU (``tests/inference/test_cuda_graphs.py``, skipped without one).

One graph per batch-size bucket (1, 2, 4, ... up to ``max_running_seqs``) replays the whole
decoder forward of one decode step (embedding, layers with the paged-KV flash-attn decode
and the TP all-reduces, LM head, vocab all-gather). Inputs are copied into static buffers;
padded rows of a bucket write their K/V into a scratch block reserved at the end of the pool
(never handed to a sequence) and their logits are dropped. Sampling runs outside the graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from hpc_rlhf.inference.attention import DecodeMeta, decode_attention_flash

logger = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids_B: torch.Tensor
    pos_B: torch.Tensor
    blocks_B: torch.Tensor
    offsets_B: torch.Tensor
    table_BJ: torch.Tensor
    lens_B: torch.Tensor
    logits_BV: torch.Tensor


class CudaGraphDecoder:
    """Captured decode steps of one engine, by batch-size bucket."""

    def __init__(self, runner, cache, max_batch: int, max_blocks: int, scratch_block: int):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.runner = runner
        self.cache = cache
        self.max_blocks = max_blocks
        self.scratch = scratch_block
        self.buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < max_batch]
        self.buckets.append(max_batch)
        self.graphs: dict[int, _Graph] = {}
        # No host sync inside the graph: RoPE tables cover every position up front.
        runner.rope.ensure(max_blocks * cache.shape.block_size)
        logger.info("CUDA graphs: decode buckets %s", self.buckets)

    def _capture(self, B: int) -> _Graph:
        dev = self.runner.weights.embedding_vH.device
        i32 = dict(dtype=torch.int32, device=dev)
        g = _Graph(
            graph=torch.cuda.CUDAGraph(),
            ids_B=torch.zeros(B, dtype=torch.long, device=dev),
            pos_B=torch.zeros(B, dtype=torch.long, device=dev),
            blocks_B=torch.full((B,), self.scratch, dtype=torch.long, device=dev),
            offsets_B=torch.zeros(B, dtype=torch.long, device=dev),
            table_BJ=torch.full((B, self.max_blocks), self.scratch, **i32),
            lens_B=torch.ones(B, **i32),
            logits_BV=torch.empty(0),
        )
        meta = DecodeMeta(
            num_blocks_used=0,
            max_blocks=self.max_blocks,
            block_table_BJ=g.table_BJ,
            context_lens_B=g.lens_B,
        )
        cache = self.cache

        def attention(layer, q_BHD, k_BGD, v_BGD):
            cache.write(layer, cache.slot_rows(g.blocks_B, g.offsets_B), k_BGD, v_BGD)
            return decode_attention_flash(q_BHD, cache.k_LN[layer], cache.v_LN[layer], meta)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (allocator, lazy inits) before capture
            self.runner.forward(g.ids_B, g.pos_B, attention, slice(None), sync_free=True)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(g.graph):
            g.logits_BV = self.runner.forward(
                g.ids_B, g.pos_B, attention, slice(None), sync_free=True
            )
        return g

    def run(self, ids_B, pos_B, blocks_B, offsets_B, meta: DecodeMeta) -> torch.Tensor:
        """Logits ``[B, V]`` of one decode step, by replaying the bucket's graph."""
        B, J = ids_B.shape[0], meta.block_table_BJ.shape[1]
        if J > self.max_blocks:
            raise RuntimeError(f"sequence longer than the captured {self.max_blocks} blocks")
        bucket = next(b for b in self.buckets if b >= B)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        g = self.graphs[bucket]
        g.ids_B.zero_()
        g.pos_B.zero_()
        g.blocks_B.fill_(self.scratch)
        g.offsets_B.zero_()
        g.table_BJ.fill_(self.scratch)
        g.lens_B.fill_(1)
        g.ids_B[:B].copy_(ids_B)
        g.pos_B[:B].copy_(pos_B)
        g.blocks_B[:B].copy_(blocks_B)
        g.offsets_B[:B].copy_(offsets_B)
        g.table_BJ[:B, :J].copy_(meta.block_table_BJ)
        g.lens_B[:B].copy_(meta.context_lens_B)
        g.graph.replay()
        return g.logits_BV[:B]
