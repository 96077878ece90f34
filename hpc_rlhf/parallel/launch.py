"""Start a distributed world from torchrun's environment (single node or ``--nnodes``).

nccl when CUDA is available (one device per local rank), gloo on CPU. Works without
torchrun too (a world of one).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits in the world and what it computes on."""

    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: torch.device


def choose_backend() -> str:
    """``nccl`` when this process has a CUDA device, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_minutes: int = 30) -> WorldInfo:
    """Initialise ``torch.distributed`` from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* variables.

    Without them (a plain ``python`` run) a world of one is created on a free local port.
    """
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = choose_backend()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if rank == 0:
        logger.info("world of %d ranks on %s (backend %s)", world_size, device.type, backend)
    return WorldInfo(rank, local_rank, world_size, backend, device)


def shutdown_distributed() -> None:
    """End a run's distributed state: megatron-core's model-parallel groups first (it keeps
    its own references to them), then every process group. Left to interpreter exit,
    still-referenced gloo groups can abort a finished run (their worker threads are torn
    down while joinable: "terminate called without an active exception")."""
    from hpc_rlhf.parallel.state import destroy_parallel

    destroy_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
