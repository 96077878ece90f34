"""Rank-0 logging, a progress bar with ETA, and metrics sinks (stdout, JSONL, TensorBoard)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from typing import IO

_SEEN_ONCE: set[tuple] = set()


def info_once_then_debug(key: tuple) -> int:
    """``logging.INFO`` the first time ``key`` is seen in this process, then ``DEBUG``: for
    messages repeated every step with the same content (buffer sizes, pool allocations)."""
    if key in _SEEN_ONCE:
        return logging.DEBUG
    _SEEN_ONCE.add(key)
    return logging.INFO


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """INFO logs on rank 0, warnings and errors elsewhere; library noise silenced."""
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [r{rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # megatron-core warns at import about missing optional GPU libraries; we log our own
    # accelerator choice once instead.
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")


class MetricsSink:
    """Writes step metrics to a JSONL file and TensorBoard (rank 0 only; others no-op)."""

    def __init__(self, out_dir: str | None, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled and out_dir is not None
        self._jsonl: IO[str] | None = None
        self._tb = None
        if not self.enabled or out_dir is None:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; say so once
                logging.getLogger(__name__).info("tensorboard not installed: JSONL metrics only")
            else:
                self._tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A one-line progress report with ETA, printed by rank 0."""

    def __init__(self, total: int, enabled: bool, start_step: int = 0):
        self.total = total
        self.enabled = enabled
        self.start_step = start_step
        self.t0 = time.perf_counter()

    def line(self, step: int, metrics: dict[str, float], keys: tuple[str, ...]) -> str:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        bar_len = 20
        filled = int(bar_len * step / max(self.total, 1))
        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
        return (
            f"[{'#' * filled}{'.' * (bar_len - filled)}] {step}/{self.total} {shown} "
            f"({elapsed:.0f}s, eta {eta:.0f}s)"
        )

    def update(self, step: int, metrics: dict[str, float], keys: tuple[str, ...]) -> None:
        if self.enabled:
            print(self.line(step, metrics, keys), flush=True)
