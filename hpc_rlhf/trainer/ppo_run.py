"""The PPO main loop: set-up, resume, steps with logging and checkpoints, HF export."""

from __future__ import annotations

import logging

from hpc_rlhf.config import PPORunConfig
from hpc_rlhf.data.lm import LMWindows
from hpc_rlhf.data.prompts import prompts_from_config
from hpc_rlhf.trainer.ppo import PPOTrainer
from hpc_rlhf.trainer.run import Run, RunSettings
from hpc_rlhf.trainer.supervised import export_hf
from hpc_rlhf.trainer.trainable_model import NonFiniteLossError

logger = logging.getLogger(__name__)

PROGRESS_KEYS = (
    "reward_mean",
    "kl",
    "entropy",
    "clip_frac",
    "value_loss",
    "response_length",
    "tokens_per_s",
)
LAGRANGIAN_PROGRESS_KEYS = ("cost_mean", "lambda")  # after reward_mean, ppo.algorithm=ppo_lag


def progress_keys(cfg: PPORunConfig) -> tuple[str, ...]:
    """The metrics of the progress line (each is also in ``metrics.jsonl``)."""
    if not cfg.ppo.constrained:
        return PROGRESS_KEYS
    return (PROGRESS_KEYS[0], *LAGRANGIAN_PROGRESS_KEYS, *PROGRESS_KEYS[1:])


def build_trainer(cfg: PPORunConfig, out_dir: str | None = None) -> tuple[Run, PPOTrainer]:
    """The run set-up (``trainer.run``), the prompt and ptx data, and the trainer."""
    run = Run(cfg, RunSettings.of(cfg.ppo, "ppo"), out_dir, progress_keys(cfg), cfg.data.tokenizer)
    prompts = prompts_from_config(
        cfg.data, run.tokenizer, cfg.model.vocab_size, cfg.ppo.seed, cfg.data.shuffle
    )
    ptx = None
    if cfg.data.ptx_data and cfg.ppo.ptx_coef:
        seq = cfg.data.max_prompt_length + cfg.generation.max_new_tokens
        ptx = LMWindows(cfg.data.ptx_data, run.tokenizer, seq, cfg.ppo.seed, cfg.model.vocab_size)
    return run, PPOTrainer(cfg, run.state, run.tokenizer, prompts, ptx)


def run_ppo(cfg: PPORunConfig, out_dir: str | None = None) -> list[dict[str, float]]:
    """Train for ``cfg.ppo.steps`` iterations (resuming from ``ppo.save_dir``); return the
    per-step metrics. A NaN/inf loss stops the run with ``NonFiniteLossError`` before the
    optimizer step; the last checkpoint stays intact."""
    run, trainer = build_trainer(cfg, out_dir)
    saved = run.resume(trainer.trainable_models())
    if saved is not None:
        trainer.load_trainer_state(saved)
    history = []
    try:
        while trainer.step_count < cfg.ppo.steps:
            try:
                metrics = trainer.step()
            except NonFiniteLossError as err:
                raise NonFiniteLossError(
                    f"{err} at PPO step {trainer.step_count + 1}; last good checkpoint: "
                    f"{run.last_checkpoint()}"
                ) from err
            history.append({"step": trainer.step_count, **metrics})  # for reward_table
            run.end_step(
                trainer.step_count, metrics, trainer.trainable_models(), trainer.trainer_state
            )
    finally:
        run.close()
    if cfg.ppo.hf_export_dir:
        export_hf(trainer.actor, cfg.ppo.hf_export_dir)
    return history


def reward_table(history: list[dict[str, float]], rows: int = 6) -> str:
    """A short table of the mean reward (and KL) over the run; steps are numbered by the
    entries' ``step`` (as ``run_ppo`` records them: a resumed run does not restart at 1),
    else by position."""
    if not history:
        return ""
    idx = sorted({round(i * (len(history) - 1) / (rows - 1)) for i in range(rows)})
    lines = ["step | reward mean |   kl    | resp len", "-----+-------------+---------+---------"]
    for i in idx:
        m = history[i]
        step = int(m.get("step", i + 1))
        lines.append(
            f"{step:4d} | {m['reward_mean']:11.4f} | {m['kl']:7.4f} | {m['response_length']:7.1f}"
        )
    return "\n".join(lines)
