"""Supervised fine-tuning (``hpc-rlhf sft``): the supervised step loop on conversations,
with the loss on assistant tokens only (``data.sft``), held-out loss and perplexity, and
the model exported in HF format for PPO's ``actor_init``."""

from __future__ import annotations

from hpc_rlhf.config import DPORunConfig, RejectionSamplingRunConfig, RMRunConfig, SFTRunConfig
from hpc_rlhf.data.sft import SFTDataset
from hpc_rlhf.trainer.run import Run, RunSettings
from hpc_rlhf.trainer.supervised import (
    build_trained_model,
    require_eval_share,
    train_supervised,
)

PROGRESS_KEYS = ("loss", "eval_loss", "lr", "grad_norm")


def run_sft(cfg: SFTRunConfig, out_dir: str | None = None) -> list[dict[str, float]]:
    """Fine-tune for ``cfg.train.steps`` steps (from ``cfg.init``, resuming from
    ``train.save_dir``); return the per-step metrics on every rank."""
    t = cfg.train
    run = Run(cfg, RunSettings.of(t, "train"), out_dir, PROGRESS_KEYS, cfg.data.tokenizer)
    data = SFTDataset(cfg.data, run.tokenizer, t.seq_length, t.seed, cfg.model.vocab_size)
    require_eval_share(data, run.state.dp_size, "SFT")
    model = build_trained_model(cfg, run, initial_state(cfg))
    return train_supervised(cfg, run, data, model, data if data.eval else None)


def initial_state(
    cfg: SFTRunConfig | RMRunConfig | DPORunConfig | RejectionSamplingRunConfig,
) -> dict:
    """HF-format initial weights: the ``init`` checkpoint, or seeded random weights (the
    same in every layout, as PPO's random actor)."""
    if cfg.init:
        from hpc_rlhf.models.hf_io import load_hf_checkpoint_for

        return load_hf_checkpoint_for(cfg.model, cfg.init)
    from hpc_rlhf.models.init import random_hf_state

    return random_hf_state(cfg.model, seed=cfg.train.seed)
