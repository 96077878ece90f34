"""Reward- and cost-model training (``hpc-rlhf rm``): the supervised step loop on
preference data (``data.preference``: pairs and K-wise rankings, every response of a sample
forwarded once in one packed micro-batch), the pairwise ranking loss with Llama-2 margins
or Safe-RLHF's cost objective with safety-sign terms (``rm.objective``), Safe-RLHF's
end-score regulariser (``algorithms.ranking``), held-out accuracy (and sign accuracy of a
cost model), and the model exported as an HF checkpoint with a ``score`` head that PPO's
``reward.models`` and critic read."""

from __future__ import annotations

import logging

import torch

from hpc_rlhf.config import RMRunConfig
from hpc_rlhf.data.preference import PreferenceDataset
from hpc_rlhf.models.hf_io import write_score_normalization
from hpc_rlhf.parallel.comm import all_gather_cat
from hpc_rlhf.trainer.losses import end_score_fn, ranking_loss_fn
from hpc_rlhf.trainer.run import Run, RunSettings
from hpc_rlhf.trainer.sft import initial_state
from hpc_rlhf.trainer.supervised import (
    build_trained_model,
    require_eval_share,
    train_supervised,
)

logger = logging.getLogger(__name__)

PROGRESS_KEYS = ("loss", "accuracy", "eval_accuracy", "eval_sign_accuracy", "lr", "grad_norm")


def run_rm(cfg: RMRunConfig, out_dir: str | None = None) -> list[dict[str, float]]:
    """Train the reward model for ``cfg.train.steps`` steps (from ``cfg.init``, resuming
    from ``train.save_dir``); return the per-step metrics on every rank."""
    t = cfg.train
    run = Run(cfg, RunSettings.of(t, "train"), out_dir, PROGRESS_KEYS, cfg.data.tokenizer)
    cost = cfg.rm.objective == "cost"
    data = PreferenceDataset(
        cfg.data, cfg.rm.margins, run.tokenizer, t.seq_length, t.seed, cfg.model.vocab_size, cost
    )
    require_eval_share(data, run.state.dp_size, "preference")
    model = build_trained_model(cfg, run, initial_state(cfg), role="reward")
    loss_fn = ranking_loss_fn(cfg.rm.regularization, cfg.rm.objective)
    history = train_supervised(cfg, run, data, model, data if data.eval else None, loss_fn)
    if cfg.rm.normalize_scores and t.hf_export_dir:
        mean, std = score_statistics(model, data, t.micro_batch_size_per_rank)
        if run.state.rank == 0:
            write_score_normalization(t.hf_export_dir, mean, std)
            logger.info(
                "score normalisation (mean %.4f, std %.4f) stored in %s", mean, std, t.hf_export_dir
            )
    return history


def score_statistics(model, data: PreferenceDataset, micro_batch_size: int) -> tuple[float, float]:
    """Mean and (population) std of ``model``'s end scores over every response of the
    held-out samples (the training ones without a held-out split), split over the
    data-parallel ranks."""
    state = model.state
    samples = data.eval or data.train
    mine = samples[state.dp_rank :: state.dp_size]
    size = micro_batch_size
    mbs = [data.collate(mine[i : i + size]) for i in range(0, len(mine), size)]
    scores = [out["score"] for out in model.infer(mbs, end_score_fn)] if mbs else []
    local = torch.cat(scores).double() if scores else torch.zeros(0, dtype=torch.float64)
    everyone = all_gather_cat(local, state.dp_group)
    return float(everyone.mean()), float(everyone.std(unbiased=False).clamp(min=1e-6))
