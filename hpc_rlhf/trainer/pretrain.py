"""Language-model training (pre-training / SFT-style) of the actor: the foundation demo.

Runs under torchrun on any TP/PP/DP layout: data-parallel ranks read disjoint microbatches
of the tiny shipped corpus, gradients accumulate over microbatches, and checkpoints are
written every ``train.save_interval`` steps (and resumed from when present).
"""

from __future__ import annotations

import logging

from hpc_rlhf.algorithms.lm import lm_loss
from hpc_rlhf.config import Config, config_to_dict
from hpc_rlhf.data.lm import LMWindows, default_corpus_path
from hpc_rlhf.data.tokenizer import load_tokenizer
from hpc_rlhf.parallel.launch import init_distributed
from hpc_rlhf.parallel.state import initialize_parallel
from hpc_rlhf.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from hpc_rlhf.trainer.model_engine import TrainableModel
from hpc_rlhf.utils.logging import MetricsSink, Progress, setup_logging

logger = logging.getLogger(__name__)


def run_pretrain(
    cfg: Config,
    corpus: str | None = None,
    tokenizer_path: str | None = None,
    out_dir: str | None = None,
) -> list[tuple[int, float]]:
    """Train for ``cfg.train.steps`` steps; return ``[(step, loss)]`` (on every rank)."""
    world = init_distributed()
    setup_logging(world.rank)
    cfg.validate(world.world_size)
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{cfg.model.vocab_size}"
        )
    state = initialize_parallel(cfg.parallel, cfg.model, seed=cfg.train.seed)
    data = LMWindows(
        corpus or default_corpus_path(), tokenizer, cfg.train.seq_length, seed=cfg.train.seed
    )
    actor = TrainableModel(cfg.model, cfg.optimizer, state, "actor", cfg.train.steps)
    n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size_per_rank * state.dp_size)
    start = 0
    save_dir = cfg.train.save_dir
    resume_from = latest_checkpoint(save_dir) if save_dir else None
    if resume_from:
        start = load_checkpoint(resume_from, state, {"actor": actor})["step"]
        logger.info("resumed from %s at step %d", save_dir, start)
    sink = MetricsSink(out_dir, enabled=state.rank == 0)
    progress = Progress(cfg.train.steps, enabled=state.rank == 0, start_step=start)
    history = []
    for step in range(start, cfg.train.steps):
        batches = data.step_microbatches(
            step, n_micro, cfg.train.micro_batch_size_per_rank, state.dp_rank, state.dp_size
        )
        result = actor.train_step(batches, lambda b, o: lm_loss(b, o, state.tp_group))
        metrics = {**result.metrics, "lr": result.lr, "grad_norm": result.grad_norm or 0.0}
        history.append((step + 1, metrics["loss"]))
        sink.write(step + 1, metrics)
        if (step + 1) % cfg.train.log_interval == 0 or step + 1 == cfg.train.steps:
            progress.update(step + 1, metrics, ("loss", "lr", "grad_norm"))
        if save_dir and cfg.train.save_interval and (step + 1) % cfg.train.save_interval == 0:
            save_checkpoint(save_dir, step + 1, state, {"actor": actor}, config=config_to_dict(cfg))
    sink.close()
    return history


def print_loss_table(history: list[tuple[int, float]], rows: int = 6) -> str:
    """A short table of the loss falling (first, evenly spaced, last steps)."""
    if not history:
        return ""
    idx = sorted({round(i * (len(history) - 1) / (rows - 1)) for i in range(rows)})
    lines = ["step | loss", "-----+--------"]
    lines += [f"{history[i][0]:4d} | {history[i][1]:.4f}" for i in idx]
    return "\n".join(lines)
