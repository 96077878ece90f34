"""A trainable megatron-core model: chunks + Megatron DDP + optimizer + LR schedule.

``TrainableModel`` is what the actor, the critic and the SFT/RM stages train. It runs
microbatches through megatron-core's pipeline schedules (no pipelining, 1F1B, or
interleaved 1F1B with virtual stages) with gradient accumulation, reduces gradients over
data-parallel ranks and takes an optimizer step.

Loss convention (``calculate_per_token_loss``): a loss function returns
``(loss_sum, count, metrics)`` per microbatch, where ``count`` is an integer tensor (tokens,
or sequences for a per-sequence mean). With ``normalize="count"`` (default) the gradient is
that of ``sum(loss_sum) / sum(count)`` over every microbatch of every data-parallel rank: a
true global mean, whatever the split into microbatches and ranks. With
``normalize="none"`` the gradient is that of ``sum(loss_sum)``: for losses the caller has
already divided by global counts (e.g. a PPO loss plus a ptx loss, each a mean over its own
tokens); ``count`` then only weights the reported metrics.

``infer`` runs forward-only and returns per-microbatch tensors (e.g. log-probs, values),
available on every pipeline stage.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from hpc_rlhf.config import ModelConfig, OptimizerConfig
from hpc_rlhf.models.build import build_model_chunks
from hpc_rlhf.models.packing import SHARED_PREFIX_MIN_TOKENS
from hpc_rlhf.models.runner import (
    OUTPUT_POSITIONS,
    MicroBatch,
    PackPlan,
    model_forward,
    output_selection,
    plan_packing,
)
from hpc_rlhf.parallel.comm import (
    all_gather_objects,
    broadcast_from_last_stage,
    compute_device,
    group_max,
    group_sum,
)
from hpc_rlhf.parallel.host_allocator import release_free_memory
from hpc_rlhf.parallel.state import ParallelState

logger = logging.getLogger(__name__)

# (micro-batch, model output on the last stage) -> (loss_sum, count, metrics)
LossFn = Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]]


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm became NaN/inf; the step was not applied."""


@dataclass
class StepResult:
    """What one optimizer step reports (metrics are global means over DP ranks)."""

    metrics: dict[str, float]
    grad_norm: float | None
    lr: float
    skipped: bool


def _use_fused_cpu_adam(optimizer) -> int:
    """Switch megatron's torch ``Adam``/``AdamW`` (its fallback without apex or
    transformer-engine) to PyTorch's fused kernel when every parameter is on the CPU: torch
    defaults to a per-parameter loop of ~10 ops there (foreach/fused are CUDA defaults).
    Same update rule. Returns the number of param groups switched."""
    switched = 0
    for wrapper in sub_optimizers(optimizer):
        torch_opt = getattr(wrapper, "optimizer", None)
        if not isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in torch_opt.param_groups:
            if all(p.device.type == "cpu" for p in group["params"]):
                group["fused"], group["foreach"] = True, False
                switched += 1
    return switched


class TrainableModel:
    """Model chunks of one role, wrapped for training (or frozen for inference)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        optim_cfg: OptimizerConfig | None,
        state: ParallelState,
        role: str,
        total_steps: int = 1,
        pack_sequences: bool = False,
        output_positions: str = "head_mask",
        share_prefixes: bool = True,
    ):
        if output_positions not in OUTPUT_POSITIONS:
            raise ValueError(
                f"output_positions must be one of {OUTPUT_POSITIONS}, got {output_positions!r}"
            )
        self.model_cfg = model_cfg
        self.optim_cfg = optim_cfg
        self.state = state
        self.role = role
        self.pack_sequences = pack_sequences
        # packed rows whose leading tokens equal an earlier row's run them once
        # (models.packing: shared prefixes); None: every row whole
        self.min_shared_prefix = SHARED_PREFIX_MIN_TOKENS if share_prefixes else None
        self.output_positions = output_positions
        # built on the host (one initialisation for every device), then placed where this
        # rank computes (its CUDA device under nccl) before DDP allocates grad buffers
        self.device = compute_device()
        chunks = [chunk.to(self.device) for chunk in build_model_chunks(model_cfg, state, role)]
        self.work = dict.fromkeys(
            ("infer_tokens", "infer_head_rows", "train_tokens", "train_head_rows"), 0
        )
        self.work.update(dict.fromkeys(("infer_final_mlp_rows", "train_final_mlp_rows"), 0))
        self.config = chunks[0].config
        self.config.calculate_per_token_loss = True
        self.trainable = optim_cfg is not None
        # False: gradient buffers exist only inside train_step (release_grads_between_steps)
        self.grads_between_steps = True
        if optim_cfg is not None:
            self.model = self._wrap_ddp(chunks)
            self.optimizer = self._build_optimizer(optim_cfg)
            self.scheduler = self._build_scheduler(optim_cfg, total_steps)
        else:
            self.model = chunks
            for chunk in chunks:
                chunk.requires_grad_(False)
            self.optimizer = None
            self.scheduler = None

    # ------------------------------------------------------------------ construction
    def _wrap_ddp(self, chunks: list) -> list:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self.state.config.use_distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        wrapped = [
            DistributedDataParallel(
                config=self.config,
                ddp_config=ddp_config,
                module=chunk,
                disable_bucketing=index > 0,
            )
            for index, chunk in enumerate(chunks)
        ]
        self.config.finalize_model_grads_func = finalize_model_grads
        no_sync = [m.no_sync for m in wrapped]
        self.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        return wrapped

    def _build_optimizer(self, cfg: OptimizerConfig):
        from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer

        mcfg = McoreOptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad,
            bf16=self.config.bf16,
            fp16=self.config.fp16,
            params_dtype=self.config.params_dtype,
            use_distributed_optimizer=self.state.config.use_distributed_optimizer,
            initial_loss_scale=cfg.initial_loss_scale,
            min_loss_scale=cfg.min_loss_scale,
            loss_scale_window=cfg.loss_scale_window,
            hysteresis=cfg.hysteresis,
        )
        optimizer = get_megatron_optimizer(mcfg, self.model, use_gloo_process_groups=False)
        self.config.grad_scale_func = optimizer.scale_loss if self.config.fp16 else None
        _use_fused_cpu_adam(optimizer)
        return optimizer

    def _build_scheduler(self, cfg: OptimizerConfig, total_steps: int):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        decay_steps = max(total_steps, cfg.warmup_steps + 1)
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if cfg.warmup_steps else cfg.lr,
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.warmup_steps,
            lr_decay_steps=decay_steps,
            lr_decay_style=cfg.lr_decay_style,
            start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay,
            wd_incr_steps=decay_steps,
            wd_incr_style="constant",
        )

    # ------------------------------------------------------------------ running
    def _pack_plan(self, microbatches: Sequence[MicroBatch]) -> PackPlan | None:
        """How this schedule's micro-batches run packed (``models.runner.plan_packing``,
        with shared prefixes unless ``share_prefixes`` was off); ``None``: padded. Packed
        rows are split over TP under sequence parallelism, so their lengths are multiples
        of TP there."""
        if not self.pack_sequences:
            return None
        multiple = self.state.sequence_multiple
        pipelined = self.state.pp_size > 1
        return plan_packing(microbatches, multiple, pipelined, self.min_shared_prefix)

    def forward_backward(
        self,
        microbatches: Sequence[MicroBatch],
        loss_fn: LossFn,
        forward_only: bool = False,
        normalize: str = "count",
        keep_tensors: bool = False,
    ) -> list[dict]:
        """Run all microbatches through the pipeline schedule; return per-microbatch metrics.

        Metrics dicts come back on the last pipeline stage only (an empty list elsewhere).
        Every microbatch must have the same ``[B, S]`` shape.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not microbatches:
            raise ValueError("forward_backward needs at least one microbatch")
        if normalize not in ("count", "none"):
            raise ValueError(f"normalize must be 'count' or 'none', got {normalize!r}")
        plan = self._pack_plan(microbatches)
        selections = [output_selection(mb, self.output_positions) for mb in microbatches]
        self._count_work(microbatches, selections, "infer" if forward_only else "train", plan)
        B, S = microbatches[0].shape
        if plan is not None and plan.length is not None:  # pipelined: one packed row each
            B, S = 1, plan.length
        elif self.state.pp_size > 1 and len({mb.shape for mb in microbatches}) > 1:
            raise ValueError(
                "a pipeline exchanges one activation shape per schedule: padded micro-batches "
                f"must all be [B, S], got {sorted({mb.shape for mb in microbatches})} (they "
                "run packed when every row is real tokens then padding)"
            )

        def forward_step(data_iterator, model):
            mb, select_BS = next(data_iterator)
            mb = mb.to(self.device)
            select_BS = None if select_BS is None else select_BS.to(self.device)
            output = model_forward(model, mb, plan, select_BS)
            return output, partial(_loss_adapter, loss_fn, mb, normalize, keep_tensors)

        n_chunks = len(self.model)
        iterators = [iter(zip(microbatches, selections)) for _ in range(n_chunks)]
        with torch.set_grad_enabled(not forward_only):
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iterators if n_chunks > 1 else iterators[0],
                model=self.model if n_chunks > 1 else self.model[0],
                num_microbatches=len(microbatches),
                seq_length=S,
                micro_batch_size=B,
                forward_only=forward_only,
            )
        return list(outputs)

    def _count_work(
        self,
        microbatches: Sequence[MicroBatch],
        selections: Sequence,
        kind: str,
        plan: PackPlan | None,
    ) -> None:
        """Tokens run through the decoder, rows through the LM head and rows through the
        last layer's MLP (for FLOP counts); ``selections``: each one's output positions."""
        for mb, select_BS in zip(microbatches, selections):
            tokens = mb.input_ids_BS.numel() if plan is None else plan.tokens(mb)
            self.work[f"{kind}_tokens"] += tokens
            rows = mb.input_ids_BS.numel() if select_BS is None else int(select_BS.sum())
            self.work[f"{kind}_head_rows"] += rows
            selective = select_BS is not None and not self.state.sequence_parallel
            self.work[f"{kind}_final_mlp_rows"] += rows if selective else tokens

    def infer(self, microbatches: Sequence[MicroBatch], fn) -> list[dict[str, torch.Tensor]]:
        """Forward-only: ``fn(batch, output) -> {name: tensor}`` per microbatch, on every rank.

        The outputs are computed on the last pipeline stage and broadcast along the
        pipeline group, so every rank of the model-parallel group gets them.
        """

        def loss_fn(batch, output):
            return torch.zeros(()), 0, fn(batch, output)

        was_training = [chunk.training for chunk in self.model]
        self.set_train(False)
        try:
            outputs = self.forward_backward(
                microbatches, loss_fn, forward_only=True, keep_tensors=True
            )
        finally:
            for chunk, mode in zip(self.model, was_training):
                chunk.train(mode)
        # results leave on the host, where the trainer keeps everything between stages
        tensors = [{k: v.cpu() for k, v in out.items() if k != "_count"} for out in outputs]
        return broadcast_from_last_stage(tensors, self.state.pp_group)

    def release_grads_between_steps(self) -> None:
        """Free the gradient buffers now and after every ``train_step`` (which reallocates
        them zeroed first): a trainer with several trained models (PPO's actor and critics)
        then holds one model's gradients at a time, none while scoring. Their contents are
        never needed between steps (each step zeroes them first)."""
        self.grads_between_steps = False
        for chunk in self.model:
            chunk.offload_grad_buffers()

    def train_step(
        self, microbatches: Sequence[MicroBatch], loss_fn: LossFn, normalize: str = "count"
    ) -> StepResult:
        """Zero grads, accumulate over ``microbatches``, step optimizer and LR schedule.
        Afterwards the heap's free pages go back to the OS (``release_free_memory``: a CPU
        run's caching allocator otherwise keeps the step's freed activations resident, and
        the next step's other shapes land beside them; SFT bench: peak 1.71 -> 1.62 GB)."""
        if not self.trainable:
            raise RuntimeError(f"the {self.role} model is frozen; it has no optimizer")
        try:
            if self.grads_between_steps:
                return self._train_step(microbatches, loss_fn, normalize)
            for chunk in self.model:
                chunk.restore_grad_buffers()
            try:
                return self._train_step(microbatches, loss_fn, normalize)
            finally:
                for chunk in self.model:
                    chunk.offload_grad_buffers()
        finally:
            release_free_memory()

    def _train_step(self, microbatches, loss_fn: LossFn, normalize: str) -> StepResult:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self.forward_backward(microbatches, loss_fn, normalize=normalize)
        metrics = self.reduce_metrics(outputs)
        bad = [f"{k} is {v}" for k, v in metrics.items() if "loss" in k and not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(
                f"{self.role}: {', '.join(bad)} - stopping before the optimizer step"
            )
        updated, grad_norm = self._checked_optimizer_step()
        if updated:
            self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        return StepResult(metrics, grad_norm, lr, skipped=not updated)

    def _checked_optimizer_step(self) -> tuple[bool, float | None]:
        """megatron's optimizer step with the gradient norm checked *before* the update.

        ``optimizer.step()`` clips and applies in one call and reports the norm afterwards,
        so a NaN/inf gradient would already be in the weights and the Adam moments. This is
        the same sequence through megatron's public stages (``prepare_grads``,
        ``get_grad_norm``, clip by that norm, ``step_with_ready_grads``), raising
        ``NonFiniteLossError`` between the norm and the update: weights, optimizer state
        and LR schedule stay as they were. Returns ``(updated, grad_norm)``; an fp16
        loss-scale overflow skips the step as megatron does.
        """
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        if self.optimizer.prepare_grads():
            return False, None
        grad_norm = float(self.optimizer.get_grad_norm())
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"{self.role}: gradient norm is {grad_norm} - stopping before the optimizer "
                "step (weights and optimizer state unchanged)"
            )
        for sub in sub_optimizers(self.optimizer):
            params = sub.get_parameters()
            if params and sub.config.clip_grad > 0.0:
                decoupled = sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
                clip_grad_by_total_norm_fp32(params, sub.config.clip_grad, grad_norm, decoupled)
        return bool(self.optimizer.step_with_ready_grads()), grad_norm

    def reduce_metrics(self, outputs: list[dict]) -> dict[str, float]:
        """Global values of the metrics over every micro-batch of every PP and DP rank:
        count-weighted means, except names ending in ``_max`` (a maximum, e.g.
        ``ratio_max``), which take the maximum.

        A metric only some microbatches report (e.g. ``ptx_loss``, or KTO's reward of the
        desirable completions) is averaged over those, on whichever ranks they ran.
        """
        names = sorted({k for out in outputs for k in out if k != "_count"})
        names = broadcast_from_last_stage(names, self.state.pp_group)  # known on the last stage
        if self.state.dp_size > 1:  # each data-parallel rank may have seen other names
            names = sorted(set().union(*all_gather_objects(names, self.state.dp_group)))
        sums = torch.zeros(2, len(names), dtype=torch.float64)  # [weighted sum, weight]
        maxima = torch.full((len(names),), -math.inf, dtype=torch.float64)
        for out in outputs:
            count = float(out["_count"])
            for i, name in enumerate(names):
                if name in out:
                    sums[0, i] += float(out[name]) * count
                    sums[1, i] += count
                    maxima[i] = max(float(maxima[i]), float(out[name]))
        for group in (self.state.pp_group, self.state.dp_group):
            group_sum(sums, group)
            group_max(maxima, group)
        return {
            name: float(maxima[i])
            if is_max_metric(name)
            else float(sums[0, i]) / max(float(sums[1, i]), 1.0)
            for i, name in enumerate(names)
        }

    def load_hf_state(self, hf_state: dict[str, torch.Tensor]) -> None:
        """Load this rank's shard of a full HF-format state (present on every rank)."""
        from hpc_rlhf.models.rank_state import load_hf_state_into_rank

        load_hf_state_into_rank(self.parameters_by_chunk(), self.state, self.model_cfg, hf_state)
        if self.optimizer is not None and hasattr(self.optimizer, "reload_model_params"):
            self.optimizer.reload_model_params()

    def gather_hf_state(self, dst: int = 0) -> dict[str, torch.Tensor] | None:
        """The full HF-format state on global rank ``dst`` (None elsewhere); collective."""
        from hpc_rlhf.models.rank_state import gather_hf_state

        return gather_hf_state(self.parameters_by_chunk(), self.state, self.model_cfg, dst)

    def parameters_by_chunk(self) -> list[torch.nn.Module]:
        """The unwrapped model chunks (``GPTModel``s)."""
        return [getattr(m, "module", m) for m in self.model]

    def set_train(self, training: bool) -> None:
        for chunk in self.model:
            chunk.train(training)


def is_max_metric(name: str) -> bool:
    """Metrics named ``*_max`` are maxima: they combine by ``max``, not by a mean."""
    return name.endswith("_max")


def sub_optimizers(optimizer) -> list:
    """The per-group optimizers inside megatron's ``ChainedOptimizer`` (or the one)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _loss_adapter(
    loss_fn: LossFn, mb: MicroBatch, normalize: str, keep_tensors: bool, output: torch.Tensor
):
    """megatron's loss-function protocol: ``(loss_sum, num_tokens, reduced dict)``.

    With ``normalize="none"`` megatron is told 0 tokens, so it does not rescale gradients.
    """
    loss_sum, count, metrics = loss_fn(mb, output)
    count = torch.as_tensor(count, dtype=torch.int, device=loss_sum.device)
    if keep_tensors:
        reduced = {k: v.detach() for k, v in metrics.items()}
    else:
        reduced = {k: float(v) for k, v in metrics.items()}
    reduced["_count"] = int(count)
    megatron_count = count if normalize == "count" else torch.zeros_like(count)
    return loss_sum, megatron_count, reduced
