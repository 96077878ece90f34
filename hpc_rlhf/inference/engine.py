"""Colocated generation with the actor's own weights: paged KV cache, continuous batching.

``GenerationEngine`` runs on every rank of the actor's TP group (any TP; a pipeline-parallel
training layout is gathered into one without stages, see ``weights.py``). ``generate``
takes token-id prompts and ``SamplingParams`` and returns one ``Completion`` per
(prompt, sample), ordered by prompt then sample.

Per iteration (``scheduler.py``): newly admitted prompts are prefilled together as one packed
batch (no padding; the LM head only at each prompt's last token; ``n`` samples of a prompt
share one prefill and its KV blocks), then every running sequence decodes one token in one
batched step. Sequences leave as they finish and waiting ones take their place; when the
cache is full, sequences are preempted and recomputed later, never dropped.

Minimal use in a PPO iteration (actor = a ``TrainableModel``)::

    engine = GenerationEngine(actor, model_cfg, state, GenerationConfig(cache_budget_bytes=2**30))
    ...
    engine.sync_weights(version=step)      # after every optimizer step (PP>1: regathers)
    with training_memory_released(actor):  # optimizer state + grads out, KV cache in
        outs = engine.generate(prompts, SamplingParams(temperature=1.0, top_p=0.9, seed=step),
                               policy_version=step)
    engine.release_weights()               # PP>1: drop the gathered copy before training

With a pipeline-parallel training layout every pipeline rank of a TP group holds the whole
model after ``sync_weights``; ranks of one TP group must get the same prompts (they
generate in lockstep), different pipeline ranks may get the same or different prompts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hpc_rlhf.config import ModelConfig
from hpc_rlhf.inference import attention as attn
from hpc_rlhf.inference.config import CacheShape, GenerationConfig, pool_blocks, require_capacity
from hpc_rlhf.inference.forward import DecoderRunner, TPComm
from hpc_rlhf.inference.kv_cache import PagedKVCache
from hpc_rlhf.inference.sampling import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    SamplingParams,
    sample_tokens,
    sequence_generator,
)
from hpc_rlhf.inference.scheduler import PrefillItem, Scheduler, Sequence
from hpc_rlhf.inference.weights import GenerationWeights, StaleWeightsError, generation_weights
from hpc_rlhf.ops.rope import segment_positions
from hpc_rlhf.utils.logging import info_once_then_debug

if TYPE_CHECKING:  # CUDA-only module, imported on first use
    from hpc_rlhf.inference.cuda_graphs import CudaGraphDecoder

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters of one engine (cumulative over generate() calls)."""

    prefill_tokens: int = 0
    prefill_batches: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    cow_copies: int = 0
    peak_blocks: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class GenerationEngine:
    """Generates with the actor's weights on the actor's devices (see module docstring)."""

    def __init__(
        self, model, model_cfg: ModelConfig, state, config: GenerationConfig | None = None
    ):
        self.chunks = (
            model.parameters_by_chunk() if hasattr(model, "parameters_by_chunk") else list(model)
        )
        self.model_cfg = model_cfg
        self.state = state
        self.config = config or GenerationConfig()
        self.comm = TPComm(state.tp_group, state.tp_size, state.tp_rank)
        self.device = next(self.chunks[0].parameters()).device
        self.dtype = next(self.chunks[0].parameters()).dtype
        self.kv_dtype = self.config.kv_dtype(self.dtype)
        self.window = model_cfg.sliding_window
        self.backend = attn.select_backend(
            self.config.attention_backend,
            self.device,
            self.config.block_size,
            self.kv_dtype,
            self.window,
        )
        if self.config.cuda_graphs and (self.device.type != "cuda" or self.backend != "flash_attn"):
            raise RuntimeError(
                "GenerationConfig.cuda_graphs needs a CUDA device and the flash_attn backend "
                f"(device {self.device}, backend {self.backend})"
            )
        self.cache_shape = CacheShape.for_model(
            model_cfg, state.tp_size, self.config.block_size, self.kv_dtype
        )
        self.cache: PagedKVCache | None = None
        self.weights: GenerationWeights | None = None
        self.runner: DecoderRunner | None = None
        self.stats = EngineStats()
        self._graphs: CudaGraphDecoder | None = None

    # ------------------------------------------------------------------ weights / memory
    def sync_weights(self, version: int | None = None) -> None:
        """Bind (PP=1, no copy) or gather (PP>1) the actor's current weights as ``version``."""
        self.weights = generation_weights(self.chunks, self.state, self.model_cfg, version)
        self.runner = DecoderRunner(self.weights, self.model_cfg, self.comm)
        self._graphs = None

    def release_weights(self) -> None:
        """Drop a gathered (PP>1) weight copy; a no-op for in-place weights (PP=1). The
        engine needs ``sync_weights`` again before the next ``generate``."""
        if self.weights is not None and not self.weights.in_place:
            self.weights = None
            self.runner = None
            self._graphs = None

    @property
    def weights_version(self) -> int | None:
        return None if self.weights is None else self.weights.version

    @property
    def num_blocks(self) -> int:
        """Blocks of the KV pool for the configured budget."""
        return pool_blocks(self.cache_shape, self.config)

    def allocate_cache(self) -> PagedKVCache:
        """Allocate the KV pool (done by ``generate`` when needed)."""
        if self.cache is None:
            layout = attn.kv_layout(self.backend)
            self.cache = PagedKVCache(
                self.cache_shape,
                self.num_blocks,
                layout,
                self.device,
                scratch=self.config.cuda_graphs,
            )
            if self.state.rank == 0:
                logger.log(
                    info_once_then_debug(("kv cache", id(self))),
                    "KV cache: %d blocks of %d tokens, %.1f MB",
                    self.num_blocks,
                    self.config.block_size,
                    self.cache.nbytes / 2**20,
                )
        return self.cache

    def _graph_decoder(self) -> CudaGraphDecoder:
        """The captured decode steps over the current weights and KV pool, built on first
        use (reset when either changes). ``__init__`` allows it on CUDA + flash-attn only."""
        if self._graphs is None:
            from hpc_rlhf.inference.cuda_graphs import CudaGraphDecoder

            cache = self._require_cache()
            if cache.scratch_block is None:
                raise RuntimeError("CUDA-graph decode needs the pool's scratch block")
            max_len = self.model_cfg.max_position_embeddings
            self._graphs = CudaGraphDecoder(
                self._require_runner(),
                cache,
                max_batch=self.config.max_running_seqs,
                max_blocks=-(-max_len // self.config.block_size),
                scratch_block=cache.scratch_block,
            )
        return self._graphs

    def free_cache(self) -> None:
        """Release the KV pool's memory."""
        self._graphs = None  # captured graphs point into the pool
        if self.cache is not None:
            self.cache.release()
            self.cache = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        policy_version: int | None = None,
        max_new_tokens: list[int] | None = None,
    ) -> list[Completion]:
        """Complete every prompt ``sampling.n`` times; see ``sampling.py`` for the log-probs.

        ``max_new_tokens`` optionally gives each prompt its own length limit (at most
        ``sampling.max_new_tokens``), e.g. to replay a workload's response lengths.

        Raises ``StaleWeightsError`` when ``policy_version`` is given and differs from the
        synced weights' version, ``CacheTooSmallError`` when the KV budget cannot hold one
        prompt plus ``max_new_tokens``.
        """
        sampling.validate()
        self._check_version(policy_version)
        self._check_budget(prompts, sampling)
        if max_new_tokens is not None and (
            len(max_new_tokens) != len(prompts)
            or not all(1 <= n <= sampling.max_new_tokens for n in max_new_tokens)
        ):
            raise ValueError(
                "max_new_tokens must give one limit per prompt, each in "
                f"[1, sampling.max_new_tokens={sampling.max_new_tokens}]"
            )
        t0 = time.perf_counter()
        cache = self.allocate_cache()
        sched = Scheduler(cache, self.config.max_running_seqs, self.config.max_prefill_tokens)
        cow_before = cache.cow_copies
        seqs = self._make_sequences(prompts, sampling, sched, max_new_tokens)
        try:
            with torch.no_grad():
                while sched.has_work():
                    items = sched.schedule_prefill()
                    if items:
                        self._prefill(items, sampling, sched)
                    running = sched.reserve_decode_slots()
                    if running:
                        self._decode(running, sampling, sched)
        finally:
            self.stats.preemptions += sched.preemptions
            self.stats.cow_copies += cache.cow_copies - cow_before
            self.stats.peak_blocks = max(self.stats.peak_blocks, sched.peak_blocks)
            if not self.config.keep_cache:
                self.free_cache()
        self.stats.seconds += time.perf_counter() - t0
        return [s.completion for s in seqs]

    def _require_cache(self) -> PagedKVCache:
        """The KV pool ``generate`` allocated (steps never allocate one themselves)."""
        if self.cache is None:
            raise RuntimeError("no KV pool: decode steps run inside generate()")
        return self.cache

    def _require_runner(self) -> DecoderRunner:
        """The decoder over the synced weights."""
        if self.runner is None:
            raise StaleWeightsError("the engine has no weights: call sync_weights(version) first")
        return self.runner

    def _check_version(self, policy_version: int | None) -> None:
        if self.weights is None:
            raise StaleWeightsError("the engine has no weights: call sync_weights(version) first")
        if policy_version is not None and policy_version != self.weights.version:
            raise StaleWeightsError(
                f"engine weights are policy version {self.weights.version}, generate() was asked "
                f"for version {policy_version}: call sync_weights({policy_version}) after the update"
            )

    def _check_budget(self, prompts: list[list[int]], sampling: SamplingParams) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs non-empty prompts")
        longest = max(len(p) for p in prompts) + sampling.max_new_tokens
        require_capacity(self.cache_shape, self.config, longest)  # longest prompt + new tokens

    def _make_sequences(
        self, prompts, sampling: SamplingParams, sched: Scheduler, limits=None
    ) -> list[Sequence]:
        seqs: list[Sequence] = []
        for p, prompt in enumerate(prompts):
            group = []
            for k in range(sampling.n):
                gen = None if sampling.greedy else sequence_generator(sampling.seed, p, k)
                seq = Sequence(len(seqs), list(prompt), gen, Completion(p, k))
                seq.max_new_tokens = None if limits is None else limits[p]
                group.append(seq)
                seqs.append(seq)
            sched.add(group)
        return seqs

    def _prefill(
        self, items: list[PrefillItem], sampling: SamplingParams, sched: Scheduler
    ) -> None:
        """One packed forward over the admitted prompts; sample each sequence's next token."""
        cache = self._require_cache()
        lens = [len(item.tokens) for item in items]
        ids_T = torch.tensor([t for item in items for t in item.tokens], device=self.device)
        pos_T = segment_positions(lens).to(self.device)
        blocks: list[int] = []
        offsets: list[int] = []
        for item in items:
            b, o = cache.slots(item.seqs[0].block_table, 0, len(item.tokens))
            blocks += b
            offsets += o
        self._zero_fresh_blocks([item.seqs[0].block_table for item in items])
        rows = cache.slot_rows(
            torch.tensor(blocks, device=self.device), torch.tensor(offsets, device=self.device)
        )
        prefill_fn = {
            "flash_attn": attn.prefill_attention_flash,
            "cpp": attn.prefill_attention_cpp,
        }.get(self.backend, attn.prefill_attention_torch)

        def attention(layer, q_THD, k_TGD, v_TGD):
            q_THD, k_TGD, v_TGD = (t.to(self.kv_dtype) for t in (q_THD, k_TGD, v_TGD))
            cache.write(layer, rows, k_TGD, v_TGD)
            return prefill_fn(q_THD, k_TGD, v_TGD, lens, self.window).to(self.dtype)

        last_I = torch.tensor(lens, device=self.device).cumsum(0) - 1
        logits_IV = self._require_runner().forward(ids_T, pos_T, attention, last_I)
        item_of_seq = [i for i, item in enumerate(items) for _ in item.seqs]
        seqs = [s for item in items for s in item.seqs]
        self.stats.prefill_tokens += sum(lens)
        self.stats.prefill_batches += 1
        self._append(seqs, logits_IV[item_of_seq], sampling, sched)

    def _zero_fresh_blocks(self, tables: list[list[int]]) -> None:
        """Zero newly used blocks, except for the C++ decode kernel, which never reads a
        slot past a sequence's length (the torch path multiplies them by zero weights)."""
        if self.backend != "cpp":
            self._require_cache().zero_fresh_blocks(tables)

    def _decode(self, seqs: list[Sequence], sampling: SamplingParams, sched: Scheduler) -> None:
        """One batched decode step: feed each sequence's last token, sample the next."""
        cache = self._require_cache()
        W = self.config.block_size
        pos = [s.num_cached for s in seqs]
        ids_B = torch.tensor([s.generated[-1] for s in seqs], device=self.device)
        pos_B = torch.tensor(pos, device=self.device)
        blocks_B = torch.tensor(
            [s.block_table[p // W] for s, p in zip(seqs, pos)], device=self.device
        )
        offsets_B = pos_B % W
        rows = cache.slot_rows(blocks_B, offsets_B)
        self._zero_fresh_blocks([s.block_table for s in seqs])
        meta = attn.build_decode_meta(
            [s.block_table for s in seqs],
            [p + 1 for p in pos],
            W,
            self.device,
            block_rows=self.backend == "torch",
            window=self.window,
        )
        decode_fn = {
            "flash_attn": attn.decode_attention_flash,
            "cpp": attn.decode_attention_cpp,
            "torch": attn.decode_attention_torch,
        }[self.backend]

        def attention(layer, q_BHD, k_BGD, v_BGD):
            q_BHD, k_BGD, v_BGD = (t.to(self.kv_dtype) for t in (q_BHD, k_BGD, v_BGD))
            cache.write(layer, rows, k_BGD, v_BGD)
            return decode_fn(q_BHD, cache.k_LN[layer], cache.v_LN[layer], meta).to(self.dtype)

        if self.config.cuda_graphs:
            logits_BV = self._graph_decoder().run(ids_B, pos_B, blocks_B, offsets_B, meta)
        else:
            logits_BV = self._require_runner().forward(ids_B, pos_B, attention, slice(None))
        for s in seqs:
            s.num_cached += 1
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(seqs)
        self._append(seqs, logits_BV, sampling, sched)

    def _append(
        self, seqs: list[Sequence], logits_BV, sampling: SamplingParams, sched: Scheduler
    ) -> None:
        """Sample, record tokens/log-probs, retire finished sequences."""
        tokens_B, logp_B, slogp_B = sample_tokens(logits_BV, sampling, [s.generator for s in seqs])
        stops = set(sampling.stop_token_ids)
        for seq, tok, lp, slp in zip(seqs, tokens_B.tolist(), logp_B.tolist(), slogp_B.tolist()):
            out = seq.completion
            out.token_ids.append(tok)
            out.logprobs.append(lp)
            out.sampling_logprobs.append(slp)
            if tok in stops:
                out.finish_reason = FINISH_STOP
            elif len(out.token_ids) >= (seq.max_new_tokens or sampling.max_new_tokens):
                out.finish_reason = FINISH_LENGTH
            if out.finish_reason is not None:
                sched.finish(seq)
