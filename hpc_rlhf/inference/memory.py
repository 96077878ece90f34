"""Time-sharing of the actor's devices: training state out, KV cache in, and back, exactly.

Before generation ``TrainingMemory.release()`` frees

* the gradient buffers, with megatron-core's own ``DistributedDataParallel.
  offload_grad_buffers`` (``resize_(0)`` of each buffer's storage; every ``main_grad`` view
  stays a valid object). Their contents are not kept: ``restore_grad_buffers`` reallocates
  them zeroed, and every train step zeroes them first anyway;
* the optimizer state (Adam moments, step counters and, with mixed precision, the fp32 main
  parameters) of an accelerator: each storage is copied to pinned host memory and then
  resized to zero, so the device memory really is returned. ``restore()`` resizes it back
  and copies the bytes in: bit-exact, the same tensor objects. State already in host memory
  (a CPU-only run) stays where it is: a host copy of host memory frees nothing and, while
  both exist, doubles it (measured in the GRPO benchmark: +0.37 GB of peak RSS);
  ``move_host_state=True`` moves it anyway (the tests run the GPU path's round trip so).

megatron-core 0.16.1's ``MegatronOptimizer.offload_to_cpu`` is not used: it moves
``p.data`` of the optimizer's parameter groups, which for an fp32 optimizer *are* the model
weights that generation needs on the device, and it does nothing without CUDA.

Model weights are never moved: generation reads them in place (``weights.py``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from hpc_rlhf.utils.logging import info_once_then_debug

logger = logging.getLogger(__name__)


@dataclass
class MemoryReport:
    """Bytes released (or restored) per kind of training state, on this rank."""

    optimizer_bytes: int = 0
    grad_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.optimizer_bytes + self.grad_bytes


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    """Tensors of the optimizer's state (moments, steps, fp32 main params if any)."""
    tensors = []
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            for per_param in inner.state.values():
                tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
        for name in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            for group in getattr(opt, name, None) or []:
                tensors += [t for t in group if isinstance(t, torch.Tensor)]
    return tensors


def grad_buffer_bytes(ddp_chunks) -> int:
    """Bytes of every gradient buffer of the DDP-wrapped chunks (0 while released)."""
    total = 0
    for chunk in ddp_chunks:
        for buf in list(chunk.buffers) + list(getattr(chunk, "expert_parallel_buffers", [])):
            if buf.grad_data is not None:
                total += buf.grad_data.untyped_storage().nbytes()
    return total


class TrainingMemory:
    """Releases / restores one ``TrainableModel``'s optimizer state and gradient buffers."""

    def __init__(self, trainable, move_host_state: bool = False):
        if trainable.optimizer is None:
            raise ValueError(f"the {trainable.role} model has no optimizer state to release")
        self.trainable = trainable
        self.move_host_state = move_host_state
        self._host: list[tuple[torch.UntypedStorage, torch.Tensor]] = []
        self._released: MemoryReport | None = None

    @property
    def released(self) -> bool:
        return self._released is not None

    def _protected(self) -> set[int]:
        """Storages that must stay: model weights (generation reads them)."""
        ptrs = set()
        for chunk in self.trainable.parameters_by_chunk():
            for p in chunk.parameters():
                ptrs.add(p.untyped_storage().data_ptr())
        return ptrs

    def release(self) -> MemoryReport:
        """Free the gradient buffers and the accelerator's optimizer state (host copy
        kept; host-resident state stays unless ``move_host_state``)."""
        if self.released:
            raise RuntimeError("training memory is already released")
        report = MemoryReport()
        protected, seen = self._protected(), set()
        for tensor in optimizer_state_tensors(self.trainable.optimizer):
            storage = tensor.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            on_host = storage.device.type == "cpu" and not self.move_host_state
            if nbytes == 0 or ptr in seen or ptr in protected or on_host:
                continue
            seen.add(ptr)
            pin = storage.device.type == "cuda"
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
            host.untyped_storage().copy_(storage)
            storage.resize_(0)
            self._host.append((storage, host))
            report.optimizer_bytes += nbytes
        report.grad_bytes = grad_buffer_bytes(self.trainable.model)  # 0: released already
        for chunk in self.trainable.model if report.grad_bytes else ():
            chunk.offload_grad_buffers()
        self._released = report
        if self.trainable.state.rank == 0:
            logger.log(
                info_once_then_debug(("released", self.trainable.role)),
                "time-sharing: released %.1f MB (optimizer state %.1f MB, grad buffers %.1f MB)",
                report.total_bytes / 2**20,
                report.optimizer_bytes / 2**20,
                report.grad_bytes / 2**20,
            )
        return report

    def restore(self) -> MemoryReport:
        """Bring optimizer state back bit for bit and reallocate (zeroed) grad buffers."""
        if not self.released:
            raise RuntimeError("training memory was not released")
        for storage, host in self._host:
            storage.resize_(host.numel())
            storage.copy_(host.untyped_storage())
        self._host = []
        report, self._released = self._released, None
        assert report is not None  # self.released checked above
        for chunk in self.trainable.model if report.grad_bytes else ():  # only what it freed
            chunk.restore_grad_buffers()
        if self.trainable.state.rank == 0:
            logger.log(
                info_once_then_debug(("restored", self.trainable.role)),
                "time-sharing: restored %.1f MB of training state",
                report.total_bytes / 2**20,
            )
        return report


@contextlib.contextmanager
def training_memory_released(trainable):
    """``with training_memory_released(actor) as report: engine.generate(...)``."""
    memory = TrainingMemory(trainable)
    report = memory.release()
    try:
        yield report
    finally:
        memory.restore()
