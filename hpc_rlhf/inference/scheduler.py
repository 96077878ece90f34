"""Continuous batching over a paged KV cache: admission, slot reservation, preemption.

Sequences wait in a FIFO of groups: the ``n`` samples of a fresh prompt form one group (one
prefill, prompt blocks shared by reference count; split into groups of at most
``max_running`` when ``n`` is larger), a preempted sequence is a group of one that goes back
to the *front* of the queue. Each engine iteration:

1. ``schedule_prefill`` admits groups from the head of the queue while the batch limits and
   free blocks allow (a group needs blocks for its tokens plus the next one); no skipping
   ahead, so nothing starves. ``max_prefill_tokens`` limits a batch of several groups: a
   group longer than it is prefilled whole, alone in its batch (no chunked prefill).
2. ``reserve_decode_slots`` makes sure every running sequence owns the block its next token
   goes to (a new block at a block boundary, a private copy of a shared block). When the
   pool is empty the most recently admitted sequence is preempted: its blocks are freed and
   it is recomputed later from its prompt and the tokens it already generated (its
   generator state travels with it, so it continues exactly where it stopped).
3. Finished sequences free their blocks at once (``finish``), making room for waiting ones.

Every rank of a TP group runs the same deterministic schedule on the same inputs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from hpc_rlhf.inference.kv_cache import PagedKVCache
from hpc_rlhf.inference.sampling import Completion


@dataclass(eq=False)  # identity: sequences are compared by object, never by value
class Sequence:
    """One sample being generated."""

    seq_id: int
    prompt: list[int]
    generator: torch.Generator | None
    completion: Completion
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    max_new_tokens: int | None = None  # this sequence's own limit (else the sampling one)

    @property
    def generated(self) -> list[int]:
        return self.completion.token_ids

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.completion.token_ids)

    def all_tokens(self) -> list[int]:
        return self.prompt + self.completion.token_ids


@dataclass
class PrefillItem:
    """Tokens to prefill once, and the sequences that share the result."""

    tokens: list[int]
    seqs: list[Sequence]


class Scheduler:
    """Waiting queue, running batch and the block bookkeeping between them."""

    def __init__(self, cache: PagedKVCache, max_running: int, max_prefill_tokens: int):
        self.cache = cache
        self.allocator = cache.allocator
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[list[Sequence]] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.peak_blocks = 0

    def add(self, group: list[Sequence]) -> None:
        """Queue the samples of one prompt (they will share its prefill). More samples than
        ``max_running`` are queued as several groups of at most ``max_running`` (one prefill
        each): a group is admitted whole, and the decode batch must never exceed the limit
        (the CUDA-graph decoder has no bucket above it)."""
        for start in range(0, len(group), self.max_running):
            self.waiting.append(group[start : start + self.max_running])

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule_prefill(self) -> list[PrefillItem]:
        """Admit groups from the head of the queue; allocate their prompt blocks."""
        items: list[PrefillItem] = []
        tokens_total = 0
        shape = self.cache.shape
        while self.waiting:
            group = self.waiting[0]
            tokens = group[0].all_tokens()
            if len(self.running) + len(group) > self.max_running and self.running:
                break
            if items and tokens_total + len(tokens) > self.max_prefill_tokens:
                break
            if self.allocator.num_free < shape.blocks_for_tokens(len(tokens) + 1):
                if not self.running and not items:
                    raise RuntimeError("scheduler: an empty cache cannot admit a sequence")
                break
            self.waiting.popleft()
            table = [self.allocator.allocate() for _ in range(shape.blocks_for_tokens(len(tokens)))]
            for k, seq in enumerate(group):
                seq.block_table = table if k == 0 else [self.allocator.share(b) for b in table]
                seq.num_cached = len(tokens)
            self.running.extend(group)
            items.append(PrefillItem(tokens, group))
            tokens_total += len(tokens)
        self._track_peak()
        return items

    def reserve_decode_slots(self) -> list[Sequence]:
        """Give each running sequence a private block for its next token, preempting the
        latest admitted sequences when the pool runs dry. Returns the sequences to decode."""
        W = self.cache.shape.block_size
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            index = seq.num_cached // W
            while True:
                try:
                    if index == len(seq.block_table):
                        seq.block_table.append(self.allocator.allocate())
                    else:
                        self.cache.copy_on_write(seq.block_table, index)
                    break
                except IndexError:
                    victim = self.running[-1]
                    self.preempt(victim)
                    if victim is seq:
                        break
            if seq in self.running:
                i += 1
        self._track_peak()
        return list(self.running)

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and put it back at the front of the queue (recompute)."""
        if len(self.running) == 1:
            raise RuntimeError("scheduler: cannot preempt the only running sequence")
        self.running.remove(seq)
        self.allocator.free_table(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0
        self.waiting.appendleft([seq])
        self.preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """A finished sequence leaves the batch and frees its blocks."""
        self.running.remove(seq)
        self.allocator.free_table(seq.block_table)
        seq.block_table = []

    def _track_peak(self) -> None:
        used = self.allocator.num_blocks - self.allocator.num_free
        self.peak_blocks = max(self.peak_blocks, used)
