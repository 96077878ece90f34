"""One run set-up for every trainer: start, resume, record each step, save, close.

A trainer (pretraining, PPO, and the ones to come) builds its models and data on a
``Run`` and drives its own steps; everything around the steps is here, once:

* ``Run(...)``: the host-memory launch policy, the distributed world, rank-0 logging, the
  config checked against the world size, ``save_dir`` checked writable and seen by every
  rank (a shared filesystem) and ``hf_export_dir`` checked writable, the tokenizer
  (checked against the model's vocabulary), the parallel groups and the metrics sinks;
* ``resume(models)``: the newest complete checkpoint of ``save_dir`` loaded into the
  models (``trainer.checkpoint.load_latest_checkpoint``: every rank agrees, an unreadable
  checkpoint raises or, with ``resume_fallback``, falls back to the previous one); returns
  the saved trainer state (with its ``step``) or ``None``; it also starts the metrics
  history (a fresh run truncates ``metrics.jsonl``, a resumed one keeps the steps up to the
  resumed step);
* ``end_step(step, metrics, models, trainer_state)``: the metrics to JSONL/TensorBoard, the
  progress line every ``log_interval`` steps, a checkpoint every ``save_interval`` steps
  and at the last step (with ``save_dir`` set, the last step is saved even when
  ``save_interval`` is 0);
* ``close()``: flush the sinks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hpc_rlhf.config import config_to_dict
from hpc_rlhf.parallel.comm import broadcast_object, world
from hpc_rlhf.parallel.state import ParallelState
from hpc_rlhf.trainer.checkpoint import (
    latest_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from hpc_rlhf.trainer.checkpoint_files import (
    CheckpointError,
    check_shared_directory,
    writable_error,
)
from hpc_rlhf.utils.logging import MetricsSink, Progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    """The step loop's settings a trainer's config section provides.

    ``save_dir``: checkpoints go there (every ``save_interval`` steps, and always at the
    last step; ``save_interval`` 0 saves the last step only). ``hf_export_dir``: where the
    trainer exports its final model (checked writable at start). ``resume_fallback``: when
    the newest checkpoint cannot be read, resume from the previous complete one instead of
    stopping. ``section``: the config section's name, for error messages."""

    steps: int
    seed: int
    log_interval: int = 1
    save_dir: str | None = None
    save_interval: int = 0
    hf_export_dir: str | None = None
    resume_fallback: bool = False
    section: str = ""

    @classmethod
    def of(cls, section: Any, name: str = "") -> RunSettings:
        """The settings of a config section with these fields (``train``, ``ppo``, ...);
        ``name``: the section's name in the config."""
        return cls(
            steps=section.steps,
            seed=section.seed,
            log_interval=section.log_interval,
            save_dir=section.save_dir,
            save_interval=section.save_interval,
            hf_export_dir=getattr(section, "hf_export_dir", None),
            resume_fallback=section.resume_fallback,
            section=name,
        )

    def key(self, field_name: str) -> str:
        """The config key of ``field_name`` (``ppo.save_dir``)."""
        return f"{self.section}.{field_name}" if self.section else field_name


class Run:
    """The set-up shared by every trainer (see the module docstring)."""

    def __init__(
        self,
        cfg: Any,
        settings: RunSettings,
        out_dir: str | None = None,
        progress_keys: tuple[str, ...] = (),
        tokenizer_path: str | None = None,
        tokenizer: Any = None,
    ):
        """``tokenizer``: an already built tokenizer, else the one at ``tokenizer_path``
        (``None``: the shipped tiny one)."""
        from hpc_rlhf.data.tokenizer import load_tokenizer
        from hpc_rlhf.parallel.host_allocator import apply_launch_env
        from hpc_rlhf.parallel.launch import init_distributed
        from hpc_rlhf.parallel.state import initialize_parallel
        from hpc_rlhf.utils.logging import setup_logging

        apply_launch_env()
        world = init_distributed()
        setup_logging(world.rank)
        cfg.validate(world.world_size)
        check_output_dirs(settings, world.rank)
        self.cfg = cfg
        self.settings = settings
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_path)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size="
                f"{cfg.model.vocab_size}"
            )
        self.state: ParallelState = initialize_parallel(cfg.parallel, cfg.model, settings.seed)
        self.progress_keys = progress_keys
        self.sink = MetricsSink(
            out_dir, enabled=self.state.rank == 0, trackers=self._trackers(cfg, out_dir)
        )
        self.progress = Progress(settings.steps, enabled=self.state.rank == 0)

    def _trackers(self, cfg: Any, out_dir: str | None) -> list:
        """Rank 0's experiment trackers (``cfg.tracking``), started with the whole config."""
        from hpc_rlhf.config import config_to_dict
        from hpc_rlhf.utils.trackers import open_trackers

        if self.state.rank != 0:
            return []
        return open_trackers(cfg.tracking, out_dir, config_to_dict(cfg))

    def resume(self, models: Mapping[str, Any], fallback: bool | None = None) -> dict | None:
        """Load the newest complete checkpoint of ``save_dir`` into ``models`` (name ->
        ``TrainableModel``); return the saved trainer state (``"step"`` included), or
        ``None`` when there is nothing to resume. Collective; every rank loads the same
        checkpoint. ``fallback`` (default ``settings.resume_fallback``): load the previous
        complete checkpoint when the newest cannot be read. Starts the metrics history."""
        save_dir = self.settings.save_dir
        if fallback is None:
            fallback = self.settings.resume_fallback
        found = load_latest_checkpoint(save_dir, self.state, models, fallback) if save_dir else None
        if found is None:
            self.sink.begin(None)
            return None
        path, saved = found
        self.sink.begin(saved["step"])
        self.progress = Progress(
            self.settings.steps, enabled=self.state.rank == 0, start_step=saved["step"]
        )
        logger.info("resumed from %s at step %d (every rank loaded it)", path, saved["step"])
        return saved

    def end_step(
        self,
        step: int,
        metrics: dict[str, float],
        models: Mapping[str, Any],
        trainer_state: Callable[[], dict] | None = None,
    ) -> None:
        """Record step ``step`` (1-based) and save when its interval (or the end) is due."""
        s = self.settings
        self.sink.write(step, metrics)
        if step % s.log_interval == 0 or step == s.steps:
            self.progress.update(step, metrics, self.progress_keys)
        due = step == s.steps or (s.save_interval > 0 and step % s.save_interval == 0)
        if s.save_dir and due:
            save_checkpoint(
                s.save_dir,
                step,
                self.state,
                models,
                trainer_state() if trainer_state else None,
                config_to_dict(self.cfg),
            )

    def last_checkpoint(self) -> str | None:
        """The newest complete checkpoint written so far (for error messages)."""
        return latest_checkpoint(self.settings.save_dir) if self.settings.save_dir else None

    def close(self) -> None:
        self.sink.close()


def check_output_dirs(settings: RunSettings, rank: int) -> None:
    """Collective, at start: ``save_dir`` must be writable and seen by every rank (a shared
    filesystem), ``hf_export_dir`` writable by rank 0 (who exports). Raises
    ``CheckpointError`` on every rank naming the config key and the path."""
    if settings.save_dir:
        check_shared_directory(settings.save_dir, rank, settings.key("save_dir"))
    if settings.hf_export_dir:
        path = settings.hf_export_dir
        error = broadcast_object(writable_error(path) if rank == 0 else None, 0, world())
        if error is not None:
            raise CheckpointError(
                f"{settings.key('hf_export_dir')}={path!r} is not writable: {error}"
            )
