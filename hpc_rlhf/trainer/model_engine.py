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
from hpc_rlhf.models.build import (
    attention_mask_for,
    build_model_chunks,
    position_ids_from_mask,
)
from hpc_rlhf.models.heads import ScalarHead, last_token_mask
from hpc_rlhf.models.packing import PackedLayout, packed_length
from hpc_rlhf.models.selective_head import head_selection, scatter_selected
from hpc_rlhf.parallel.state import ParallelState

logger = logging.getLogger(__name__)

OUTPUT_POSITIONS = ("head_mask", "last_token", "all")

# (batch, model output on the last stage) -> (loss_sum, count, metrics)
LossFn = Callable[[dict, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]]


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm became NaN/inf; the step was not applied."""


@dataclass
class StepResult:
    """What one optimizer step reports (metrics are global means over DP ranks)."""

    metrics: dict[str, float]
    grad_norm: float | None
    lr: float
    skipped: bool


def model_forward(
    model: torch.nn.Module,
    batch: dict,
    pack_multiple: int | None = None,
    pack_length: int | None = None,
    select_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run one chunk on a batch with ``input_ids`` ``[B, S]`` and ``attention_mask`` ``[B, S]``.

    Returns the chunk's output: hidden states ``[S, B, H]`` on non-last stages, vocab-parallel
    logits ``[B, S, V/tp]`` (actor) or scores ``[B, S, 1]`` (critic/reward) on the last one.
    ``select_BS`` ``[B, S]`` names the positions whose outputs are read
    (``models.selective_head``): the LM head then runs on those only and the logits are
    ``[1, N, V/tp]``; a scalar head's scores stay ``[B, S, 1]``, zero elsewhere.

    With ``pack_multiple``, a right-padded batch runs packed (``models.packing``: one row of
    its real tokens, length rounded up to the multiple, or exactly ``pack_length``, which a
    pipeline needs) and the last stage's per-token outputs come back padded, ``[B, S, ...]``.
    """
    input_ids_BS = batch["input_ids"]
    mask_BS = batch.get("attention_mask")
    if mask_BS is None:
        mask_BS = torch.ones_like(input_ids_BS, dtype=torch.bool)
    layout = None
    if pack_multiple is not None:
        layout = PackedLayout.from_mask(mask_BS, pack_multiple, pack_length)
    with head_selection(model, select_BS, layout) as selected:
        if layout is None:
            out = model(input_ids_BS, position_ids_from_mask(mask_BS), attention_mask_for(mask_BS))
        else:
            out = model(
                layout.pack(input_ids_BS),
                layout.positions_1T,
                None,
                packed_seq_params=layout.seq_params(),
            )
    module = getattr(model, "module", model)
    if not getattr(module, "post_process", True):
        return out
    if selected and select_BS is not None:  # [1, N, ...]
        scalar = isinstance(getattr(module, "output_layer", None), ScalarHead)
        return scatter_selected(out[0], select_BS) if scalar else out
    return out if layout is None else layout.unpack(out)


def _use_fused_cpu_adam(optimizer) -> int:
    """Switch megatron's torch ``Adam``/``AdamW`` (its fallback without apex or
    transformer-engine) to PyTorch's fused kernel when every parameter is on the CPU: torch
    defaults to a per-parameter loop of ~10 ops there (foreach/fused are CUDA defaults).
    Same update rule; measured 180 -> 25 ms per step on the bench actor (45M fp32 params,
    2 threads). Returns the number of param groups switched."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    switched = 0
    for wrapper in inner:
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
        self.output_positions = output_positions
        chunks = build_model_chunks(model_cfg, state, role)
        self.work = dict.fromkeys(
            ("infer_tokens", "infer_head_rows", "train_tokens", "train_head_rows"), 0
        )
        self.work.update(dict.fromkeys(("infer_final_mlp_rows", "train_final_mlp_rows"), 0))
        self.config = chunks[0].config
        self.config.calculate_per_token_loss = True
        self.trainable = optim_cfg is not None
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
    def _pack_plan(self, microbatches: Sequence[dict]) -> tuple[int, int | None] | None:
        """How micro-batches run packed (``model_forward``): ``(multiple, None)`` for a
        single-stage pipeline (each its own packed length), ``(multiple, T)`` with one
        length for all under pipelining (p2p shapes are fixed per schedule), or ``None``:
        padded. ``multiple`` is TP under sequence parallelism (the row is split over TP)."""
        if not self.pack_sequences:
            return None
        multiple = self.state.tp_size if self.state.sequence_parallel else 1
        if self.state.pp_size == 1:
            return multiple, None
        longest = 0
        for mb in microbatches:  # one unpackable (or unpadded) batch: all run padded
            T = packed_length(mb["attention_mask"], multiple) if "attention_mask" in mb else None
            if T is None:
                return None
            longest = max(longest, T)
        return multiple, longest

    def forward_backward(
        self,
        microbatches: Sequence[dict],
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
        selections = [self.output_selection(mb) for mb in microbatches]
        self._count_work(microbatches, selections, "infer" if forward_only else "train", plan)
        B, S = microbatches[0]["input_ids"].shape
        if plan is not None and plan[1] is not None:  # pipelined: one packed row per batch
            B, S = 1, plan[1]

        def forward_step(data_iterator, model):
            batch, select_BS = next(data_iterator)
            multiple, length = plan or (None, None)
            output = model_forward(model, batch, multiple, length, select_BS)
            return output, partial(_loss_adapter, loss_fn, batch, normalize, keep_tensors)

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

    def output_selection(self, batch: dict) -> torch.Tensor | None:
        """``[B, S]`` positions whose outputs this model's callers read (``None``: all):
        ``output_positions="head_mask"`` the batch's ``head_mask`` (response positions),
        ``"last_token"`` each row's last real token (a reward model's end score)."""
        if self.output_positions == "last_token":
            mask_BS = batch.get("attention_mask")
            if mask_BS is None:
                mask_BS = torch.ones_like(batch["input_ids"], dtype=torch.bool)
            return last_token_mask(mask_BS)
        if self.output_positions == "head_mask":
            return batch.get("head_mask")
        return None

    def _count_work(
        self, microbatches: Sequence[dict], selections: Sequence, kind: str, plan
    ) -> None:
        """Tokens run through the decoder, rows through the LM head and rows through the
        last layer's MLP (for FLOP counts); ``selections``: each one's output positions."""
        for mb, select_BS in zip(microbatches, selections):
            tokens = mb["input_ids"].numel()
            if plan is not None and plan[1] is not None:
                tokens = plan[1]
            elif plan is not None and "attention_mask" in mb:
                tokens = packed_length(mb["attention_mask"], plan[0]) or tokens
            self.work[f"{kind}_tokens"] += tokens
            rows = mb["input_ids"].numel() if select_BS is None else int(select_BS.sum())
            self.work[f"{kind}_head_rows"] += rows
            selective = select_BS is not None and not self.state.sequence_parallel
            self.work[f"{kind}_final_mlp_rows"] += rows if selective else tokens

    def infer(self, microbatches: Sequence[dict], fn) -> list[dict[str, torch.Tensor]]:
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
        tensors = [{k: v for k, v in out.items() if k != "_count"} for out in outputs]
        return _broadcast_from_last_stage(tensors, self.state)

    def train_step(
        self, microbatches: Sequence[dict], loss_fn: LossFn, normalize: str = "count"
    ) -> StepResult:
        """Zero grads, accumulate over ``microbatches``, step optimizer and LR schedule."""
        if not self.trainable:
            raise RuntimeError(f"the {self.role} model is frozen; it has no optimizer")
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
        updated, grad_norm, _ = self.optimizer.step()
        if grad_norm is not None and not torch.isfinite(torch.tensor(grad_norm)):
            raise NonFiniteLossError(f"{self.role}: gradient norm is {grad_norm}")
        if updated:
            self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        return StepResult(metrics, grad_norm, lr, skipped=not updated)

    def reduce_metrics(self, outputs: list[dict]) -> dict[str, float]:
        """Global means of the metrics: count-weighted sums all-reduced over PP and DP ranks.

        A metric only some microbatches report (e.g. ``ptx_loss``) is averaged over those.
        """
        names = sorted({k for out in outputs for k in out if k != "_count"})
        names = _broadcast_from_last_stage(names, self.state)  # known on the last stage
        sums = torch.zeros(2, len(names), dtype=torch.float64)  # [weighted sum, weight]
        for out in outputs:
            count = float(out["_count"])
            for i, name in enumerate(names):
                if name in out:
                    sums[0, i] += float(out[name]) * count
                    sums[1, i] += count
        group_sum(sums, self.state.pp_group)
        group_sum(sums, self.state.dp_group)
        return {
            name: float(sums[0, i]) / max(float(sums[1, i]), 1.0) for i, name in enumerate(names)
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


def _loss_adapter(
    loss_fn: LossFn, batch: dict, normalize: str, keep_tensors: bool, output: torch.Tensor
):
    """megatron's loss-function protocol: ``(loss_sum, num_tokens, reduced dict)``.

    With ``normalize="none"`` megatron is told 0 tokens, so it does not rescale gradients.
    """
    loss_sum, count, metrics = loss_fn(batch, output)
    count = torch.as_tensor(count, dtype=torch.int)
    if keep_tensors:
        reduced = {k: v.detach() for k, v in metrics.items()}
    else:
        reduced = {k: float(v) for k, v in metrics.items()}
    reduced["_count"] = int(count)
    megatron_count = count if normalize == "count" else torch.zeros((), dtype=torch.int)
    return loss_sum, megatron_count, reduced


def _broadcast_from_last_stage(items: list, state: ParallelState) -> list:
    """Send the last pipeline stage's ``items`` to every stage of the pipeline group."""
    import torch.distributed as dist

    if state.pp_size == 1:
        return items
    holder: list[list | None] = [items if state.is_last_stage else None]
    src = dist.get_global_rank(state.pp_group, state.pp_size - 1)
    dist.broadcast_object_list(holder, src=src, group=state.pp_group)
    return holder[0] or []


def group_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """All-reduce SUM over ``group`` in place (a group of one is a no-op)."""
    import torch.distributed as dist

    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor
