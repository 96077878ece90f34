"""One command from a base model to a policy (``hpc-rlhf pipeline``): SFT -> reward model
(-> cost model) -> PPO, each stage's HF export feeding the next (``PipelineConfig``).

A finished stage leaves ``out_dir/<stage>/done.json`` (its summary) after its export is
written; a rerun skips it. An interrupted stage resumes from its own checkpoints
(``out_dir/<stage>/ckpt``) when the pipeline is run again.
"""

from __future__ import annotations

import json
import logging
import os

from hpc_rlhf.config import PipelineConfig
from hpc_rlhf.parallel.comm import barrier, broadcast_object, world

logger = logging.getLogger(__name__)


def _done_path(cfg: PipelineConfig, stage: str) -> str:
    return os.path.join(cfg.stage_dir(stage), "done.json")


def _read_done(cfg: PipelineConfig, stage: str) -> dict | None:
    """The summary of a finished ``stage`` (rank 0 reads, every rank gets it), else None."""
    summary = None
    if world_rank() == 0 and os.path.exists(_done_path(cfg, stage)):
        with open(_done_path(cfg, stage)) as fh:
            summary = json.load(fh)
    return broadcast_object(summary, 0, world())


def world_rank() -> int:
    """This process's global rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def summarize(stage: str, history: list[dict]) -> dict:
    """The numbers a user checks after a stage (first and last values of its key metrics);
    a stage resumed at its last step (it had finished but not marked itself done) ran no
    step: ``{"steps": 0}``."""
    if not history:
        return {"steps": 0}
    first, last = history[0], history[-1]
    keys = {
        "sft": ("loss", "eval_loss"),
        "rm": ("loss", "eval_accuracy"),
        "cost": ("loss", "eval_accuracy", "eval_sign_accuracy"),
        "ppo": ("reward_mean", "kl", "cost_mean", "lambda"),  # the last two: ppo_lag
    }[stage]
    out = {"steps": len(history)}
    for key in keys:
        values = [h[key] for h in history if key in h]
        if values:
            out[f"{key}_first"], out[f"{key}_last"] = values[0], values[-1]
    return {**out, "first_step": first["step"], "last_step": last["step"]}


def run_stage(cfg: PipelineConfig, stage: str) -> list[dict]:
    """Run one stage with its wired config; its metrics go to ``out_dir/<stage>/metrics``."""
    stage_cfg = cfg.stage_config(stage)
    metrics_dir = os.path.join(cfg.stage_dir(stage), "metrics")
    if stage == "sft":
        from hpc_rlhf.trainer.sft import run_sft

        return run_sft(stage_cfg, metrics_dir)
    if stage in ("rm", "cost"):
        from hpc_rlhf.trainer.rm import run_rm

        return run_rm(stage_cfg, metrics_dir)
    from hpc_rlhf.trainer.ppo_run import run_ppo

    return run_ppo(stage_cfg, metrics_dir)


def run_pipeline(cfg: PipelineConfig) -> dict[str, dict]:
    """Every stage in order, skipping finished ones; returns each stage's summary (with
    ``"skipped": True`` for stages an earlier run finished)."""
    from hpc_rlhf.parallel.launch import init_distributed
    from hpc_rlhf.utils.logging import setup_logging

    init_distributed()  # every rank must agree on which stages are done
    setup_logging(world_rank())
    summaries = {}
    for stage in cfg.stages():
        done = _read_done(cfg, stage)
        if done is not None:
            logger.info(
                "pipeline: %s already finished (%s), skipped", stage, _done_path(cfg, stage)
            )
            summaries[stage] = {**done, "skipped": True}
            continue
        logger.info("pipeline: %s starts (outputs in %s)", stage, cfg.stage_dir(stage))
        summary = summarize(stage, run_stage(cfg, stage))
        if world_rank() == 0:
            tmp = _done_path(cfg, stage) + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(summary, fh, indent=1)
            os.replace(tmp, _done_path(cfg, stage))
        barrier()
        summaries[stage] = summary
    return summaries


def summary_table(summaries: dict[str, dict]) -> str:
    """One line per stage: what it started and ended at."""
    lines = []
    for stage, s in summaries.items():
        shown = ", ".join(
            f"{key[: -len('_first')]} {s[key]:.4f} -> {s[key[: -len('_first')] + '_last']:.4f}"
            for key in s
            if key.endswith("_first")
        )
        note = " (finished earlier, skipped)" if s.get("skipped") else ""
        lines.append(f"{stage:5s} {s['steps']:3d} steps: {shown}{note}")
    return "\n".join(lines)
