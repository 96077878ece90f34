"""The PPO main loop: set-up, resume, steps with logging and checkpoints, HF export."""

from __future__ import annotations

import logging

from hpc_rlhf.config import PPORunConfig, config_to_dict
from hpc_rlhf.data.lm import LMWindows
from hpc_rlhf.data.prompts import PromptDataset
from hpc_rlhf.data.tokenizer import load_tokenizer
from hpc_rlhf.parallel.launch import init_distributed
from hpc_rlhf.parallel.state import initialize_parallel
from hpc_rlhf.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from hpc_rlhf.trainer.model_engine import NonFiniteLossError
from hpc_rlhf.trainer.ppo import PPOTrainer
from hpc_rlhf.utils.logging import MetricsSink, Progress, setup_logging

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


def build_trainer(cfg: PPORunConfig) -> PPOTrainer:
    """Distributed init, parallel groups, tokenizer, data and the trainer."""
    world = init_distributed()
    setup_logging(world.rank)
    cfg.validate(world.world_size)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{cfg.model.vocab_size}"
        )
    state = initialize_parallel(cfg.parallel, cfg.model, seed=cfg.ppo.seed)
    prompts = PromptDataset(
        cfg.data.prompts,
        tokenizer,
        cfg.data.max_prompt_length,
        cfg.data.chat_template,
        seed=cfg.ppo.seed,
        shuffle=cfg.data.shuffle,
    )
    ptx = None
    if cfg.data.ptx_data and cfg.ppo.ptx_coef:
        seq = cfg.data.max_prompt_length + cfg.generation.max_new_tokens
        ptx = LMWindows(cfg.data.ptx_data, tokenizer, seq, seed=cfg.ppo.seed)
    return PPOTrainer(cfg, state, tokenizer, prompts, ptx)


def run_ppo(cfg: PPORunConfig, out_dir: str | None = None) -> list[dict[str, float]]:
    """Train for ``cfg.ppo.steps`` iterations (resuming from ``ppo.save_dir``); return the
    per-step metrics. A NaN/inf loss stops the run with ``NonFiniteLossError`` before the
    optimizer step; the last checkpoint stays intact."""
    trainer = build_trainer(cfg)
    state, p = trainer.state, cfg.ppo
    resume_from = latest_checkpoint(p.save_dir) if p.save_dir else None
    if resume_from:
        saved = load_checkpoint(resume_from, state, trainer.trainable_models())
        trainer.load_trainer_state(saved)
        logger.info("resumed from %s at step %d", p.save_dir, trainer.step_count)
    sink = MetricsSink(out_dir, enabled=state.rank == 0)
    progress = Progress(p.steps, enabled=state.rank == 0, start_step=trainer.step_count)
    history = []
    try:
        while trainer.step_count < p.steps:
            try:
                metrics = trainer.step()
            except NonFiniteLossError as err:
                last = latest_checkpoint(p.save_dir) if p.save_dir else None
                raise NonFiniteLossError(
                    f"{err} at PPO step {trainer.step_count + 1}; last good checkpoint: {last}"
                ) from err
            history.append(metrics)
            step = trainer.step_count
            sink.write(step, metrics)
            if step % p.log_interval == 0 or step == p.steps:
                progress.update(step, metrics, PROGRESS_KEYS)
            if p.save_dir and p.save_interval and (step % p.save_interval == 0 or step == p.steps):
                save_checkpoint(
                    p.save_dir,
                    step,
                    state,
                    trainer.trainable_models(),
                    trainer.trainer_state(),
                    config_to_dict(cfg),
                )
    finally:
        sink.close()
    if p.hf_export_dir:
        export_actor(trainer, p.hf_export_dir)
    return history


def export_actor(trainer: PPOTrainer, path: str) -> None:
    """Write the actor as an HF Llama checkpoint (collective; rank 0 writes)."""
    from hpc_rlhf.models.hf_io import save_hf_checkpoint

    hf_state = trainer.actor.gather_hf_state()
    if hf_state is not None:
        save_hf_checkpoint(path, trainer.cfg.model, hf_state)
        logger.info("actor exported to %s (HF format)", path)


def reward_table(history: list[dict[str, float]], rows: int = 6) -> str:
    """A short table of the mean reward (and KL) over the run."""
    if not history:
        return ""
    idx = sorted({round(i * (len(history) - 1) / (rows - 1)) for i in range(rows)})
    lines = ["step | reward mean |   kl    | resp len", "-----+-------------+---------+---------"]
    for i in idx:
        m = history[i]
        lines.append(
            f"{i + 1:4d} | {m['reward_mean']:11.4f} | {m['kl']:7.4f} | {m['response_length']:7.1f}"
        )
    return "\n".join(lines)
