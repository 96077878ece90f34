"""``shutdown_distributed``: a finished run leaves no model-parallel or process group."""

from __future__ import annotations

from hpc_rlhf.config import ParallelConfig
from tests.dist import run_world
from tests.parallel.common import TINY


def _init_then_shut_down(rank, world_size):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from hpc_rlhf.parallel.launch import shutdown_distributed
    from hpc_rlhf.parallel.state import initialize_parallel

    state = initialize_parallel(ParallelConfig(tensor_model_parallel_size=2), TINY, seed=0)
    total = torch.ones(1)
    dist.all_reduce(total, group=state.tp_group)
    before = (mpu.model_parallel_is_initialized(), dist.is_initialized())
    shutdown_distributed()
    after = (mpu.model_parallel_is_initialized(), dist.is_initialized())
    shutdown_distributed()  # idempotent: a second call (the harness's) is a no-op
    return {"sum": float(total), "before": before, "after": after}


def test_shutdown_tears_down_megatron_groups_then_the_world():
    for out in run_world(_init_then_shut_down, 2):
        assert out["sum"] == 2.0
        assert out["before"] == (True, True)
        assert out["after"] == (False, False)
