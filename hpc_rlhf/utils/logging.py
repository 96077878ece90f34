"""Rank-0 logging, a progress bar with ETA, and metrics sinks (stdout, JSONL, TensorBoard,
and the experiment trackers of ``utils.trackers``)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import IO, Any

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
    """Writes step metrics to a JSONL file and TensorBoard (rank 0 only; others no-op).

    One run, one history: ``begin(resumed_step)`` starts it. A fresh run (``None``)
    truncates ``metrics.jsonl``; a resumed run keeps the records of steps up to
    ``resumed_step`` and appends after them, so steps redone after a crash are not
    duplicated. TensorBoard readers drop the older events of the steps this run writes
    (``purge_step``). ``write`` before ``begin`` begins a fresh history."""

    def __init__(
        self,
        out_dir: str | None,
        enabled: bool,
        tensorboard: bool = True,
        trackers: Sequence[Any] = (),
    ):
        self.enabled = enabled and out_dir is not None
        self.out_dir = out_dir
        self.tensorboard = tensorboard
        self.trackers = list(trackers)  # utils.trackers (W&B, MLflow): rank 0's
        self._begun = False
        self._jsonl: IO[str] | None = None
        self._tb = None
        if self.enabled and out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)

    @property
    def path(self) -> str | None:
        """The JSONL file (``None`` when disabled)."""
        return (
            os.path.join(self.out_dir, "metrics.jsonl") if self.enabled and self.out_dir else None
        )

    def begin(self, resumed_step: int | None) -> None:
        """Start this run's history (see the class docstring); once per sink."""
        if self._begun:
            raise RuntimeError("MetricsSink.begin called twice")
        self._begun = True
        path = self.path
        if path is None or self.out_dir is None:
            return
        kept = _records_up_to(path, resumed_step) if resumed_step is not None else []
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.writelines(kept)
        os.replace(tmp, path)
        self._jsonl = open(path, "a")
        if self.tensorboard:
            self._tb = _summary_writer(os.path.join(self.out_dir, "tb"), (resumed_step or 0) + 1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Append one step's metrics."""
        if not self._begun:
            self.begin(None)
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def _records_up_to(path: str, last_step: int) -> list[str]:
    """The lines of JSONL file ``path`` whose ``step`` is at most ``last_step`` (a torn last
    line from a crash is dropped with a warning)."""
    if not os.path.exists(path):
        return []
    kept = []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                logging.getLogger(__name__).warning(
                    "%s:%d: unreadable record dropped", path, number
                )
                continue
            if step <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    return kept


def _summary_writer(log_dir: str, purge_step: int):
    """A TensorBoard writer whose readers drop older events from ``purge_step`` on, or
    ``None`` when tensorboard is not installed (said once)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; say so once
        logging.getLogger(__name__).info("tensorboard not installed: JSONL metrics only")
        return None
    return SummaryWriter(log_dir, purge_step=purge_step)


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
