"""Reward- and cost-model training (``hpc-rlhf rm``): the supervised step loop on
preference data (``data.preference``: pairs and K-wise rankings, every response of a sample
forwarded once in one packed micro-batch), the pairwise ranking loss with Llama-2 margins
or Safe-RLHF's cost objective with safety-sign terms (``rm.objective``), Safe-RLHF's
end-score regulariser (``algorithms.ranking``), held-out accuracy (and sign accuracy of a
cost model), and the model exported as an HF checkpoint with a ``score`` head that PPO's
``reward.models`` and critic read."""

from __future__ import annotations

from hpc_rlhf.config import InputError, RMRunConfig
from hpc_rlhf.data.preference import PreferenceDataset
from hpc_rlhf.trainer.losses import ranking_loss_fn
from hpc_rlhf.trainer.run import Run, RunSettings
from hpc_rlhf.trainer.sft import initial_state
from hpc_rlhf.trainer.supervised import build_trained_model, train_supervised

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
    if 0 < len(data.eval) < run.state.dp_size:
        raise InputError(
            f"{len(data.eval)} held-out preference samples for {run.state.dp_size} "
            "data-parallel ranks: raise data.eval_fraction or give a larger data.eval_path"
        )
    model = build_trained_model(cfg, run, initial_state(cfg), role="reward")
    loss_fn = ranking_loss_fn(cfg.rm.regularization, cfg.rm.objective)
    return train_supervised(cfg, run, data, model, data if data.eval else None, loss_fn)
