"""The two systems bench_ppo.py compares, each set up from the same checkpoints and run
for one PPO iteration on the same prompts and response lengths."""

from __future__ import annotations

import os
import time

import torch
from bench_common import BENCH_MODEL, EOS_ID, PAD_ID

PPO_SETTINGS = {
    "kl_coef": 0.05,
    "clip": 0.2,
    "gamma": 1.0,
    "lam": 0.95,
    "temperature": 1.0,
    "actor_lr": 1e-6,
    "critic_lr": 5e-6,
    "seed": 0,
}


class _FixedPrompts:
    """Stands in for the prompt dataset: always the benchmark's prompts."""

    def __init__(self, prompts):
        self.prompts = prompts

    def next_batch(self, rollout_batch_size, dp_rank, dp_size):
        return self.prompts

    def state_dict(self):
        return {}


class _BenchTokenizer:
    vocab_size = BENCH_MODEL.vocab_size
    eos_id, pad_id, bos_id = EOS_ID, PAD_ID, 1


def ours_config(
    workdir: str, n_prompts: int, mini_batch: int, micro_batch: int, max_new: int, score_micro: int
):
    from hpc_rlhf.config import PPORunConfig, config_from_dict

    s = PPO_SETTINGS
    return config_from_dict(
        {
            "model": {
                k: getattr(BENCH_MODEL, k)
                for k in (
                    "num_layers",
                    "hidden_size",
                    "num_attention_heads",
                    "ffn_hidden_size",
                    "vocab_size",
                    "max_position_embeddings",
                )
            },
            "actor_init": os.path.join(workdir, "actor"),
            "actor_optimizer": {
                "lr": s["actor_lr"],
                "weight_decay": 0.01,
                "lr_decay_style": "constant",
            },
            "critic_optimizer": {
                "lr": s["critic_lr"],
                "weight_decay": 0.01,
                "lr_decay_style": "constant",
            },
            "ppo": {
                "steps": 1,
                "rollout_batch_size": n_prompts,
                "micro_batch_size_per_rank": micro_batch,
                "score_micro_batch_size_per_rank": score_micro,
                "mini_batches_per_rollout": max(1, n_prompts // mini_batch),
                "ppo_epochs": 1,
                "kl_coef": s["kl_coef"],
                "clip_low": s["clip"],
                "clip_high": s["clip"],
                "value_clip": s["clip"],
                "gamma": s["gamma"],
                "lam": s["lam"],
                "whiten_advantages": False,
                "critic_init": "reward",
                "seed": s["seed"],
            },
            "generation": {
                "max_new_tokens": max_new,
                "temperature": s["temperature"],
                "stop_at_eos": False,
                "engine": {"cache_budget_bytes": 2 << 30},
            },
            "reward": {"models": [{"path": os.path.join(workdir, "reward"), "weight": 1.0}]},
        },
        PPORunConfig,
    )


def run_ours(
    workdir: str, prompts, lengths, mini_batch: int, micro_batch: int, score_micro: int
) -> dict:
    """hpc_rlhf's PPO iteration (one process): ``PPOTrainer.iterate`` on the given prompts
    with the given response lengths, set up as every run is (``trainer.run.Run``)."""
    from hpc_rlhf.trainer.ppo import PPOTrainer
    from hpc_rlhf.trainer.run import Run, RunSettings

    cfg = ours_config(workdir, len(prompts), mini_batch, micro_batch, max(lengths), score_micro)
    run = Run(cfg, RunSettings.of(cfg.ppo), tokenizer=_BenchTokenizer())
    trainer = PPOTrainer(cfg, run.state, run.tokenizer, _FixedPrompts(prompts))
    it = trainer.iterate(prompts, max_new_tokens=lengths)
    assert [len(r) for r in it.rollout.response_ids] == list(lengths)
    times = {k: v for k, v in it.stage_seconds.items() if k != "prompts"}
    report = _report(times, sum(lengths), tuple(it.experience.input_ids_BS.shape), prompts)
    models = {"actor": trainer.actor, "reference": trainer.reference}
    if trainer.critic is not None:
        models["critic"] = trainer.critic
    models.update({f"reward{i}": m for i, m in enumerate(trainer.rewards.models)})
    report["work"] = {name: dict(m.work) for name, m in models.items()}
    per_row = [len(p) + n for p, n in zip(prompts, lengths)]
    report["mean_padded_length"] = sum(per_row) / len(per_row)
    return report


def run_baseline(workdir: str, prompts, lengths, mini_batch: int, micro_batch: int) -> dict:
    """The Safe-RLHF-style iteration on transformers models with the same weights."""
    from ppo_baseline import BaselinePPO, ScoreModel
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    actor = LlamaForCausalLM.from_pretrained(
        os.path.join(workdir, "actor"), attn_implementation="sdpa"
    )
    reference = LlamaForCausalLM.from_pretrained(
        os.path.join(workdir, "actor"), attn_implementation="sdpa"
    ).eval()
    rm = LlamaForSequenceClassification.from_pretrained(
        os.path.join(workdir, "reward"), attn_implementation="sdpa"
    )
    critic_rm = LlamaForSequenceClassification.from_pretrained(
        os.path.join(workdir, "reward"), attn_implementation="sdpa"
    )
    reward = ScoreModel(rm.model, rm.score.weight.detach()).eval()
    critic = ScoreModel(critic_rm.model, critic_rm.score.weight.detach())
    settings = {**PPO_SETTINGS, "pad_id": PAD_ID, "eos_id": EOS_ID, "micro_batch": mini_batch}
    baseline = BaselinePPO(actor, reference, reward, critic, settings)
    times = baseline.iteration(prompts, lengths)
    shape = times.pop("padded_shape")
    tokens = times.pop("response_tokens")
    assert int(tokens) == sum(lengths), (tokens, sum(lengths))
    return _report(times, tokens, shape, prompts)


def _report(times: dict, response_tokens: float, padded_shape, prompts) -> dict:
    return {
        "times": {k: float(v) for k, v in times.items()},
        "total": float(sum(times.values())),
        "response_tokens": float(response_tokens),
        "padded_shape": list(padded_shape),
        "prompt_lengths": [len(p) for p in prompts],
        "time": time.time(),
    }
