"""Offline preference optimisation (``hpc-rlhf dpo``): the DPO family on the supervised
step loop.

The policy (``init``, e.g. the SFT model) trains on preference data (``data.preference``:
pairs and K-wise rankings, every response of a sample in one packed micro-batch, the LM
head on response positions only) with a loss of ``algorithms.preference`` (``dpo.loss``),
read from each response's summed log-prob (``trainer.losses.preference_loss_fn``), or with
KTO on labelled completions (``data.kto``, ``trainer.kto``). The frozen reference
(``trainer.reference``) gives its log-probs per step or precomputed once; reference-free
losses (SimPO, ORPO) build none. Checkpoints, resume, metrics and the HF export are the
supervised loop's (``trainer.supervised``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hpc_rlhf.algorithms.preference import PreferenceParams
from hpc_rlhf.config import DPORunConfig, RankingLossConfig
from hpc_rlhf.data.preference import PreferenceDataset, check_response_tokens
from hpc_rlhf.trainer import kto
from hpc_rlhf.trainer.losses import preference_loss_fn
from hpc_rlhf.trainer.online_dpo import OnlinePairs
from hpc_rlhf.trainer.reference import ReferencePass, frozen_reference, precompute_reference
from hpc_rlhf.trainer.run import Run, RunSettings
from hpc_rlhf.trainer.sft import initial_state
from hpc_rlhf.trainer.supervised import (
    build_trained_model,
    require_eval_share,
    train_supervised,
)

PROGRESS_KEYS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "eval_rewards/accuracies",
    "lr",
    "grad_norm",
)
ONLINE_PROGRESS_KEYS = ("loss", "reward_mean", "reward_chosen", "rewards/margins", "lr")


def preference_params(cfg: DPORunConfig) -> PreferenceParams:
    """The loss parameters of ``cfg.dpo`` (beta: the method's published default if unset)."""
    d = cfg.dpo
    return PreferenceParams(
        beta=d.effective_beta(),
        label_smoothing=d.label_smoothing,
        simpo_gamma=d.simpo_gamma,
        desirable_weight=d.desirable_weight,
        undesirable_weight=d.undesirable_weight,
    )


def preference_data(cfg: DPORunConfig, tokenizer) -> PreferenceDataset:
    """The run's preference samples as policy micro-batches, each response checked to keep
    a token within ``train.seq_length``."""
    t = cfg.train
    data = PreferenceDataset(
        cfg.data,
        RankingLossConfig().margins,  # a row's margin label is read and unused
        tokenizer,
        t.seq_length + 1,
        t.seed,
        cfg.model.vocab_size,
        for_policy=True,
    )
    check_response_tokens(data.train + data.eval, t.seq_length)
    return data


def online_pairs(cfg: DPORunConfig, run: Run, policy) -> OnlinePairs:
    """Online DPO's step source: the ``sampling`` prompts (``data.chat_template``), the
    engine over ``policy`` and the ``reward`` judge."""
    from hpc_rlhf.data.prompts import PromptDataset, story_prompts_path
    from hpc_rlhf.trainer.self_sampling import PolicySampler

    s, t = cfg.sampling, cfg.train
    prompts = PromptDataset(
        s.prompts or story_prompts_path(),
        run.tokenizer,
        s.max_prompt_length,
        cfg.data.chat_template,
        seed=t.seed,
        shuffle=s.shuffle,
        truncation_side=s.truncation_side,
        vocab_size=cfg.model.vocab_size,
    )
    sampler = PolicySampler.for_run(cfg, run, policy, s.samples_per_prompt)
    return OnlinePairs(sampler, prompts, s.samples_per_prompt, t.seed)


def run_dpo(cfg: DPORunConfig, out_dir: str | None = None) -> list[dict[str, float]]:
    """Train the policy for ``cfg.train.steps`` steps (from ``cfg.init``, resuming from
    ``train.save_dir``); return the per-step metrics on every rank."""
    t, d = cfg.train, cfg.dpo
    is_kto = d.loss == "kto"
    keys = kto.PROGRESS_KEYS if is_kto else ONLINE_PROGRESS_KEYS if d.online else PROGRESS_KEYS
    run = Run(cfg, RunSettings.of(t, "train"), out_dir, keys, cfg.data.tokenizer)
    offline = None  # the data set of offline training (online DPO samples its pairs)
    if not d.online:
        read = kto.completion_data if is_kto else preference_data
        offline = read(cfg, run.tokenizer)
        require_eval_share(offline, run.state.dp_size, "KTO" if is_kto else "preference")
    init_state = initial_state(cfg)
    policy = build_trained_model(cfg, run, init_state)
    data: Any = online_pairs(cfg, run, policy) if offline is None else offline
    reference_pass = None
    if not d.reference_free:
        reference = frozen_reference(cfg, run, init_state)
        if d.precompute_reference:
            precompute_reference(reference, data, cfg, run)  # then the reference is freed
        else:
            reference_pass = ReferencePass(reference)
        del reference
    del init_state
    params = preference_params(cfg)
    prepare: Callable[[list], None] | None
    if is_kto:
        prepare = kto.KTOReferencePoint(policy, reference_pass)
        loss_fn = kto.kto_loss_fn(params, run.state.tp_group)
    else:
        prepare = reference_pass
        loss_fn = preference_loss_fn(d.loss, params, run.state.tp_group)
    eval_data = offline if offline is not None and offline.eval else None
    return train_supervised(cfg, run, data, policy, eval_data, loss_fn, prepare)
