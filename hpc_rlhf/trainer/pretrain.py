"""Language-model training (pre-training / SFT-style) of the actor: the foundation demo.

Runs under torchrun on any TP/PP/DP layout: data-parallel ranks read disjoint microbatches
of the tiny shipped corpus, gradients accumulate over microbatches, and checkpoints are
written every ``train.save_interval`` steps and at the end (and resumed from when present).
"""

from __future__ import annotations

from hpc_rlhf.config import Config
from hpc_rlhf.data.lm import LMWindows, default_corpus_path
from hpc_rlhf.trainer.run import Run, RunSettings
from hpc_rlhf.trainer.supervised import build_trained_model, train_supervised


def run_pretrain(
    cfg: Config,
    corpus: str | None = None,
    tokenizer_path: str | None = None,
    out_dir: str | None = None,
) -> list[tuple[int, float]]:
    """Train for ``cfg.train.steps`` steps; return ``[(step, loss)]`` (on every rank)."""
    t = cfg.train
    run = Run(cfg, RunSettings.of(t, "train"), out_dir, ("loss", "lr", "grad_norm"), tokenizer_path)
    data = LMWindows(
        corpus or default_corpus_path(), run.tokenizer, t.seq_length, t.seed, cfg.model.vocab_size
    )
    history = train_supervised(cfg, run, data, build_trained_model(cfg, run))
    return [(int(h["step"]), h["loss"]) for h in history]


def print_loss_table(history: list[tuple[int, float]], rows: int = 6) -> str:
    """A short table of the loss falling (first, evenly spaced, last steps)."""
    if not history:
        return ""
    idx = sorted({round(i * (len(history) - 1) / (rows - 1)) for i in range(rows)})
    lines = ["step | loss", "-----+--------"]
    lines += [f"{history[i][0]:4d} | {history[i][1]:.4f}" for i in idx]
    return "\n".join(lines)
