"""Spawn small gloo worlds for distributed tests.

``run_world(fn, world_size, *args)`` starts ``world_size`` processes, initialises a gloo
process group in each, calls ``fn(rank, world_size, *args)`` and returns the per-rank
return values (anything ``torch.save`` can write), in rank order. An exception in any rank
is re-raised in the parent with that rank's traceback. ``fn`` must be importable (a
module-level function) so that spawned processes can find it.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpc_rlhf.parallel.launch import free_port, shutdown_distributed

# Ranks are forked from a server that imported torch, megatron-core and hpc_rlhf once: a
# fresh process per rank, as with "spawn", without each paying ~5 s of imports (the suite's
# distributed tests ran 3-4x faster). The server starts at the first world, with the
# environment of that moment; each rank sets its own distributed variables.
mp.set_forkserver_preload(
    ["tests.dist", "hpc_rlhf.trainer.trainable_model", "megatron.core.models.gpt"]
)


def _worker(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    fn: Callable,
    args_blob: bytes,
    backend: str = "gloo",
):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *pickle.loads(args_blob))
        torch.save({"ok": True, "value": result}, path)
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        shutdown_distributed()
        # Leave without interpreter finalisation: any group handle still referenced (a
        # test's own objects, pending async work) would be torn down there, where gloo's
        # worker threads are destroyed while joinable and the process aborts ("terminate
        # called without an active exception", SIGABRT) after the test already passed.
        # The result is on disk; nothing else needs finalising.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_world(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results."""
    return _run(fn, world_size, args, "gloo", "forkserver")


def run_world_on(backend: str, fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """``run_world`` with the given backend (``nccl``: one GPU per rank, the models then
    compute there)."""
    return _run(fn, world_size, args, backend, "forkserver")


def run_fresh_world(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """``run_world`` in freshly spawned interpreters, for a ``fn`` that sets environment
    variables read at import time (``TRITON_INTERPRET``) before importing anything."""
    return _run(fn, world_size, args, "gloo", "spawn")


def _run(fn, world_size: int, args: tuple, backend: str, start_method: str) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker,
            # the arguments travel as plain pickled bytes: torch's multiprocessing pickler
            # would share each tensor through a file descriptor, and a fork server takes
            # at most 256 per process
            args=(world_size, free_port(), out_dir, fn, pickle.dumps(args), backend),
            nprocs=world_size,
            join=True,
            start_method=start_method,
        )
        results = []
        for rank in range(world_size):
            record = torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False)
            if not record["ok"]:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{record['error']}")
            results.append(record["value"])
        return results


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun_cli(command: str, config: str, *args: str, nproc: int = 2):
    """``torchrun --nproc_per_node=nproc -m hpc_rlhf.cli command --config config args...``
    from the repository root (``OMP_NUM_THREADS=1``); the completed process."""
    import subprocess

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "hpc_rlhf.cli",
            command,
            "--config",
            config,
            *args,
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
