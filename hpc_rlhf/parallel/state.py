"""ParallelState: the TP / PP (virtual stages) / DP layout of this rank, and its groups.

This is the only place process groups are created. It wraps megatron-core's
``parallel_state`` (whose globals are read here and nowhere else) and hands the rest of the
code explicit groups and sizes. On a CPU-only machine it applies the CPU adaptations of
``hpc_rlhf.parallel.cpu`` first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hpc_rlhf.config import ModelConfig, ParallelConfig

logger = logging.getLogger(__name__)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= n``."""
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class ParallelState:
    """Sizes, ranks and process groups of this rank (built by ``initialize_parallel``)."""

    config: ParallelConfig
    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    vpp_size: int | None
    tp_group: Any
    pp_group: Any
    dp_group: Any
    model_parallel_group: Any
    embedding_group: Any

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def holds_embedding(self, vp_stage: int | None = None) -> bool:
        """Whether model chunk ``vp_stage`` of this rank is the pipeline's first chunk."""
        return self.is_first_stage and (vp_stage or 0) == 0

    def holds_output_layer(self, vp_stage: int | None = None) -> bool:
        """Whether model chunk ``vp_stage`` of this rank is the pipeline's last chunk."""
        last_chunk = (self.vpp_size or 1) - 1
        return (
            self.is_last_stage and (vp_stage if vp_stage is not None else last_chunk) == last_chunk
        )

    @property
    def sequence_parallel(self) -> bool:
        return self.config.sequence_parallel

    @property
    def sequence_multiple(self) -> int:
        """What every sequence (or packed row) length must be a multiple of: TP under
        sequence parallelism (the sequence is split over TP ranks), else 1."""
        return self.tp_size if self.sequence_parallel else 1

    def __repr__(self) -> str:
        vpp = f" vpp={self.vpp_size}" if self.vpp_size else ""
        return (
            f"ParallelState(rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp_size}"
            f" pp {self.pp_rank}/{self.pp_size}{vpp} dp {self.dp_rank}/{self.dp_size})"
        )


def initialize_parallel(
    config: ParallelConfig, model: ModelConfig | None = None, seed: int = 1234
) -> ParallelState:
    """Create the TP/PP/DP groups for an initialised world and seed the model-parallel RNG.

    The layout is checked before any group is created: the world size must be divisible by
    TP x PP and, when ``model`` is given, heads, query groups, FFN size and vocabulary must
    divide by TP and layers by PP x virtual stages (``ConfigError`` names the key).
    """
    if not dist.is_initialized():
        raise RuntimeError("initialize_parallel() needs torch.distributed to be initialised")
    world_size = dist.get_world_size()
    config.data_parallel_size(world_size)
    if model is not None:
        config.validate(model, world_size)
    if not torch.cuda.is_available():
        from hpc_rlhf.parallel.cpu import apply_cpu_patches
        from hpc_rlhf.parallel.host_allocator import configure_host_allocator

        apply_cpu_patches()
        configure_host_allocator(config.host_allocator)
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_model_parallel_size,
        create_gloo_process_groups=False,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    state = ParallelState(
        config=config,
        world_size=world_size,
        rank=dist.get_rank(),
        tp_size=mpu.get_tensor_model_parallel_world_size(),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_size=mpu.get_pipeline_model_parallel_world_size(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_size=mpu.get_data_parallel_world_size(),
        dp_rank=mpu.get_data_parallel_rank(),
        vpp_size=config.virtual_pipeline_model_parallel_size,
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(),
        model_parallel_group=mpu.get_model_parallel_group(),
        embedding_group=mpu.get_embedding_group(check_initialized=False),
    )
    if state.rank == 0:
        logger.info("parallel layout: %r", state)
    return state


def destroy_parallel() -> None:
    """Tear down megatron-core's model-parallel groups (the world stays initialised)."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()


def set_virtual_stage(rank: int | None) -> None:
    """Tell megatron-core which virtual pipeline stage is being built or run."""
    from megatron.core import parallel_state as mpu

    mpu.set_virtual_pipeline_model_parallel_rank(rank)
