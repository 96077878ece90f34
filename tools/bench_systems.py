"""The two systems bench_ppo.py compares, each set up from the same checkpoints and run
for one PPO iteration on the same prompts and response lengths; ``algorithm``: "ppo", or
"ppo_lag" (PPO-Lagrangian: a cost model and a cost critic from ``workdir/cost`` too);
``profile``: the baseline's settings, "safe_rlhf" (Safe-RLHF's defaults) or "ppo_sh" (its
shipped ``scripts/ppo.sh``: gradient checkpointing and the ptx loss; hpc_rlhf then trains
on the same ptx rows with the same coefficient)."""

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
PROFILES = ("safe_rlhf", "ppo_sh")
PTX_COEF, PTX_LENGTH = 16.0, 256  # ppo.sh's ptx_coeff; pre-training rows of 256 tokens
# PPO-Lagrangian's multiplier, both systems: Safe-RLHF's defaults
LAGRANGIAN = {
    "threshold": 0.0,
    "lambda_init": 1.0,
    "lambda_lr": 0.1,
    "lambda_max": None,
    "episode_cost_window_size": 128,
}


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ptx_rows(n_rows: int) -> torch.Tensor:
    """``[n_rows, PTX_LENGTH]`` seeded random token ids: both systems' pre-training rows."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, BENCH_MODEL.vocab_size, (n_rows, PTX_LENGTH), generator=g)


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
    stop_ids = (EOS_ID,)


def ours_config(
    workdir: str,
    n_prompts: int,
    mini_batch: int,
    micro_batch: int,
    max_new: int,
    score_micro: int,
    algorithm: str = "ppo",
    dtype: str = "fp32",
    profile: str = "safe_rlhf",
):
    from hpc_rlhf.config import PPORunConfig, config_from_dict

    s = PPO_SETTINGS
    critic_optimizer = {"lr": s["critic_lr"], "weight_decay": 0.01, "lr_decay_style": "constant"}
    lag = {}
    if algorithm == "ppo_lag":
        lag = {
            "cost": {"models": [{"path": os.path.join(workdir, "cost"), "weight": 1.0}]},
            "cost_critic_optimizer": critic_optimizer,
            "lagrangian": LAGRANGIAN,
        }
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
            }
            | {"params_dtype": dtype},
            "actor_init": os.path.join(workdir, "actor"),
            "actor_optimizer": {
                "lr": s["actor_lr"],
                "weight_decay": 0.01,
                "lr_decay_style": "constant",
            },
            "critic_optimizer": critic_optimizer,
            "ppo": {
                "algorithm": algorithm,
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
                "ptx_coef": PTX_COEF if profile == "ppo_sh" else 0.0,
            },
            "generation": {
                "max_new_tokens": max_new,
                "temperature": s["temperature"],
                "stop_at_eos": False,
                "engine": {"cache_budget_bytes": 2 << 30},
            },
            "reward": {"models": [{"path": os.path.join(workdir, "reward"), "weight": 1.0}]},
            **lag,
        },
        PPORunConfig,
    )


def run_ours(
    workdir: str,
    prompts,
    lengths,
    mini_batch: int,
    micro_batch: int,
    score_micro: int,
    algorithm: str = "ppo",
    dtype: str = "fp32",
    profile: str = "safe_rlhf",
) -> dict:
    """hpc_rlhf's PPO iteration (one process): ``PPOTrainer.iterate`` on the given prompts
    with the given response lengths, set up as every run is (``trainer.run.Run``); with
    the ``ppo_sh`` profile, the ptx loss on the baseline's pre-training rows."""
    from hpc_rlhf.trainer.ppo import PPOTrainer
    from hpc_rlhf.trainer.run import Run, RunSettings

    cfg = ours_config(
        workdir,
        len(prompts),
        mini_batch,
        micro_batch,
        max(lengths),
        score_micro,
        algorithm,
        dtype,
        profile,
    )
    run = Run(cfg, RunSettings.of(cfg.ppo), tokenizer=_BenchTokenizer())
    ptx = None
    if profile == "ppo_sh":  # the baseline's rows as LM windows (all positions in the loss)
        from hpc_rlhf.data.lm import LMWindows

        ptx = LMWindows.of_windows(ptx_rows(len(prompts)))
    trainer = PPOTrainer(cfg, run.state, run.tokenizer, _FixedPrompts(prompts), ptx)
    it = trainer.iterate(prompts, max_new_tokens=lengths)
    assert [len(r) for r in it.rollout.response_ids] == list(lengths)
    times = {k: v for k, v in it.stage_seconds.items() if k != "prompts"}
    report = _report(times, sum(lengths), [tuple(it.experience.input_ids_BS.shape)], prompts)
    models = {"actor": trainer.actor, "reference": trainer.reference}
    if trainer.critic is not None:
        models["critic"] = trainer.critic
    models.update({f"reward{i}": m for i, m in enumerate(trainer.rewards.models)})
    if trainer.costs is not None and trainer.cost_critic is not None:
        models["cost_critic"] = trainer.cost_critic
        models.update({f"cost{i}": m for i, m in enumerate(trainer.costs.models)})
        report["lambda"] = it.metrics["lambda"]
    report["work"] = {name: dict(m.work) for name, m in models.items()}
    per_row = [len(p) + n for p, n in zip(prompts, lengths)]
    report["mean_padded_length"] = sum(per_row) / len(per_row)
    return report


def run_baseline(
    workdir: str,
    prompts,
    lengths,
    mini_batch: int,
    micro_batch: int,
    algorithm: str = "ppo",
    dtype: str = "fp32",
    profile: str = "safe_rlhf",
) -> dict:
    """The Safe-RLHF-style iteration on transformers models with the same weights (bf16:
    every model in bf16, the trained ones with fp32 master weights, as ``--bf16``), in
    rollout micro-batches of ``mini_batch`` prompts (Safe-RLHF's 16 rows); ``profile``
    "ppo_sh" adds gradient checkpointing and the ptx loss as its ``scripts/ppo.sh``."""
    from ppo_baseline import BaselinePPO
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    torch_dtype = TORCH_DTYPES[dtype]
    actor = LlamaForCausalLM.from_pretrained(
        os.path.join(workdir, "actor"), attn_implementation="sdpa", dtype=torch_dtype
    )
    reference = LlamaForCausalLM.from_pretrained(
        os.path.join(workdir, "actor"), attn_implementation="sdpa", dtype=torch_dtype
    ).eval()
    reward, critic = _scorer_and_critic(os.path.join(workdir, "reward"), torch_dtype)
    cost, cost_critic = None, None
    if algorithm == "ppo_lag":
        cost, cost_critic = _scorer_and_critic(os.path.join(workdir, "cost"), torch_dtype)
    ppo_sh = profile == "ppo_sh"
    settings: dict = {
        **PPO_SETTINGS,
        "pad_id": PAD_ID,
        "eos_id": EOS_ID,
        "rollout_batch": mini_batch,
        "micro_batch": mini_batch,
        "top_k": 50,  # HF's default, kept by Safe-RLHF's generation config
        "lagrangian": LAGRANGIAN,
        "gradient_checkpointing": ppo_sh,
        "ptx_coef": PTX_COEF,
    }
    ptx = ptx_rows(len(prompts)) if ppo_sh else None
    baseline = BaselinePPO(actor, reference, reward, critic, settings, cost, cost_critic, ptx)
    times = baseline.iteration(prompts, lengths)
    shapes = times.pop("padded_shapes")
    tokens = times.pop("response_tokens")
    assert int(tokens) == sum(lengths), (tokens, sum(lengths))
    report = _report(times, tokens, shapes, prompts)
    report["critics"] = len(baseline.critics)
    report["profile"] = profile
    report["rollout_batch"] = mini_batch
    report["ptx_length"] = PTX_LENGTH
    if baseline.constrained:
        report["lambda"] = float(baseline.log_lambda.detach().exp())
    return report


def _scorer_and_critic(path: str, dtype: torch.dtype):
    """A frozen score model and a trained critic, both from the score-model checkpoint
    ``path`` (Safe-RLHF starts a critic from its reward / cost model)."""
    from ppo_baseline import ScoreModel
    from transformers import LlamaForSequenceClassification

    models = []
    for _ in range(2):
        hf = LlamaForSequenceClassification.from_pretrained(
            path, attn_implementation="sdpa", dtype=dtype
        )
        models.append(ScoreModel(hf.model, hf.score.weight.detach()).eval())
    return models[0], models[1]


def _report(times: dict, response_tokens: float, padded_shapes, prompts) -> dict:
    """``padded_shapes``: the ``[B, S]`` of every batch the system padded (the baseline's
    rollout micro-batches; hpc_rlhf's experience batch)."""
    return {
        "times": {k: float(v) for k, v in times.items()},
        "total": float(sum(times.values())),
        "response_tokens": float(response_tokens),
        "padded_shapes": [list(shape) for shape in padded_shapes],
        "prompt_lengths": [len(p) for p in prompts],
        "time": time.time(),
    }
