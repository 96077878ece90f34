"""Language-model training (pre-training / SFT-style) of the actor: the foundation demo.

Runs under torchrun on any TP/PP/DP layout: data-parallel ranks read disjoint microbatches
of the tiny shipped corpus, gradients accumulate over microbatches, and checkpoints are
written every ``train.save_interval`` steps and at the end (and resumed from when present).
"""

from __future__ import annotations

from hpc_rlhf.config import Config
from hpc_rlhf.data.lm import LMWindows, default_corpus_path
from hpc_rlhf.trainer.losses import lm_loss_fn
from hpc_rlhf.trainer.run import Run, RunSettings
from hpc_rlhf.trainer.trainable_model import TrainableModel


def run_pretrain(
    cfg: Config,
    corpus: str | None = None,
    tokenizer_path: str | None = None,
    out_dir: str | None = None,
) -> list[tuple[int, float]]:
    """Train for ``cfg.train.steps`` steps; return ``[(step, loss)]`` (on every rank)."""
    t = cfg.train
    run = Run(cfg, RunSettings.of(t, "train"), out_dir, ("loss", "lr", "grad_norm"), tokenizer_path)
    state = run.state
    data = LMWindows(
        corpus or default_corpus_path(), run.tokenizer, t.seq_length, t.seed, cfg.model.vocab_size
    )
    models = {"actor": TrainableModel(cfg.model, cfg.optimizer, state, "actor", t.steps)}
    n_micro = t.global_batch_size // (t.micro_batch_size_per_rank * state.dp_size)
    saved = run.resume(models)
    start = saved["step"] if saved else 0
    loss_fn = lm_loss_fn(state.tp_group)
    history = []
    try:
        for step in range(start, t.steps):
            batches = data.step_microbatches(
                step, n_micro, t.micro_batch_size_per_rank, state.dp_rank, state.dp_size
            )
            result = models["actor"].train_step(batches, loss_fn)
            metrics = {**result.metrics, "lr": result.lr, "grad_norm": result.grad_norm or 0.0}
            history.append((step + 1, metrics["loss"]))
            run.end_step(step + 1, metrics, models)
    finally:
        run.close()
    return history


def print_loss_table(history: list[tuple[int, float]], rows: int = 6) -> str:
    """A short table of the loss falling (first, evenly spaced, last steps)."""
    if not history:
        return ""
    idx = sorted({round(i * (len(history) - 1) / (rows - 1)) for i in range(rows)})
    lines = ["step | loss", "-----+--------"]
    lines += [f"{history[i][0]:4d} | {history[i][1]:.4f}" for i in idx]
    return "\n".join(lines)
