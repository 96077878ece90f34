"""One run set-up for every trainer: start, resume, record each step, save, close.

A trainer (pretraining, PPO, and the ones to come) builds its models and data on a
``Run`` and drives its own steps; everything around the steps is here, once:

* ``Run(...)``: the host-memory launch policy, the distributed world, rank-0 logging, the
  config checked against the world size, the tokenizer (checked against the model's
  vocabulary), the parallel groups and the metrics sinks;
* ``resume(models)``: the newest complete checkpoint of ``save_dir`` loaded into the
  models; returns the saved trainer state (with its ``step``) or ``None``;
* ``end_step(step, metrics, models, trainer_state)``: the metrics to JSONL/TensorBoard, the
  progress line every ``log_interval`` steps, a checkpoint every ``save_interval`` steps
  and at the last step;
* ``close()``: flush the sinks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hpc_rlhf.config import config_to_dict
from hpc_rlhf.parallel.state import ParallelState
from hpc_rlhf.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from hpc_rlhf.utils.logging import MetricsSink, Progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    """The step loop's settings a trainer's config section provides."""

    steps: int
    seed: int
    log_interval: int = 1
    save_dir: str | None = None
    save_interval: int = 0

    @classmethod
    def of(cls, section: Any) -> RunSettings:
        """The settings of a config section with these fields (``train``, ``ppo``, ...)."""
        return cls(
            steps=section.steps,
            seed=section.seed,
            log_interval=section.log_interval,
            save_dir=section.save_dir,
            save_interval=section.save_interval,
        )


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
        self.sink = MetricsSink(out_dir, enabled=self.state.rank == 0)
        self.progress = Progress(settings.steps, enabled=self.state.rank == 0)

    def resume(self, models: Mapping[str, Any]) -> dict | None:
        """Load the newest complete checkpoint of ``save_dir`` into ``models`` (name ->
        ``TrainableModel``); return the saved trainer state (``"step"`` included), or
        ``None`` when there is nothing to resume."""
        save_dir = self.settings.save_dir
        path = latest_checkpoint(save_dir) if save_dir else None
        if path is None:
            return None
        saved = load_checkpoint(path, self.state, models)
        self.progress = Progress(
            self.settings.steps, enabled=self.state.rank == 0, start_step=saved["step"]
        )
        logger.info("resumed from %s at step %d", save_dir, saved["step"])
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
        if s.save_dir and s.save_interval and (step % s.save_interval == 0 or step == s.steps):
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
