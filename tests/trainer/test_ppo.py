"""PPO end to end on the tiny model: it learns a toy task with a known optimum (1 process
and PP=2), GRPO learns too, resuming reproduces the uninterrupted run's metrics, a NaN
loss stops the run with the last checkpoint intact, and reward models + rule rewards
combine with their weights.

At TP=2 x DP=2, learning is shown by ``test_ppo_lagrangian`` (a dense toy task: PPO's
reward rises under the constraint) and exactness by ``test_ppo_parity``; this file's toy
(emit one of 512 tokens, found from a 1/512 start) did not learn in 16 steps at TP=2 x
DP=2 on an AMD EPYC, where the sampled trajectory differs from an Intel Xeon's."""

from __future__ import annotations

import os

import pytest
import torch

from hpc_rlhf.config import PPORunConfig, config_from_dict
from tests.dist import run_world
from tests.trainer.tiny import TINY_MODEL

BASE = {
    "model": dict(TINY_MODEL),
    "actor_optimizer": {"lr": 2e-2, "lr_decay_style": "constant"},
    "critic_optimizer": {"lr": 5e-3, "lr_decay_style": "constant"},
    "ppo": {
        "steps": 16,
        "rollout_batch_size": 8,
        "n_samples_per_prompt": 4,
        "micro_batch_size_per_rank": 8,
        "mini_batches_per_rollout": 4,
        "kl_coef": 0.01,
    },
    "generation": {
        "max_new_tokens": 12,
        "stop_at_eos": False,
        "engine": {"cache_budget_bytes": 8 << 20},
    },
    "reward": {
        "rules": [
            {
                "function": "hpc_rlhf.algorithms.rule_rewards:target_token_fraction",
                "kwargs": {"target": "\u2581the"},
            }
        ]
    },
    "data": {"max_prompt_length": 24},
}


def make_cfg(**sections) -> PPORunConfig:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(data, PPORunConfig)


def _run(rank, world, cfg):
    from hpc_rlhf.trainer.ppo_run import run_ppo

    return run_ppo(cfg)


def _learned(history) -> tuple[float, float]:
    rewards = [m["reward_mean"] for m in history]
    return sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2


@pytest.mark.parametrize(
    "world,sections",
    [
        (1, {}),
        (2, {"parallel": {"pipeline_model_parallel_size": 2}}),  # packed, pipelined
        (1, {"ppo": {"advantage": "grpo", "whiten_advantages": False, "steps": 24}}),
    ],
    ids=["gae_1proc", "gae_pp2", "grpo_1proc"],
)
def test_mean_reward_rises_on_the_toy_task(world, sections):
    history = run_world(_run, world, make_cfg(**sections))[0]
    start, end = _learned(history)
    assert end > start + 0.05 and end > 3 * start, f"reward {start:.3f} -> {end:.3f}"
    assert all(h["response_length"] == 12 for h in history)
    for key in ("kl", "entropy", "clip_frac", "advantage_mean", "time_generate", "tokens_per_s"):
        assert key in history[-1]


def resumed_and_uninterrupted(tmp_path, cfg_of) -> list[dict]:
    """Run ``cfg_of(ppo_section)`` for 4 steps, and for 2 then 2 more resumed from the
    step-2 checkpoint (one process): every logged metric but timings must be equal.
    Returns the uninterrupted run's metrics."""
    full_dir, half_dir = str(tmp_path / "full"), str(tmp_path / "half")
    ppo = {"steps": 4, "save_interval": 2}
    cfg_full = cfg_of({**ppo, "save_dir": full_dir})
    cfg_half = cfg_of({**ppo, "steps": 2, "save_dir": half_dir})
    cfg_resume = cfg_of({**ppo, "save_dir": half_dir})
    full, first, resumed = run_world(_resume2, 1, cfg_full, cfg_half, cfg_resume, half_dir)[0]
    assert len(resumed) == 2
    for ours, theirs in zip(first + resumed, full):
        for key, value in theirs.items():
            if not key.startswith("time_") and key != "tokens_per_s":
                assert ours[key] == value, f"step {theirs['step']} {key}: {ours[key]} != {value}"
    assert os.path.exists(os.path.join(full_dir, "step_000004", "meta.json"))
    return full


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    resumed_and_uninterrupted(tmp_path, lambda ppo: make_cfg(ppo=ppo))


def _resume2(rank, world, cfg_full, cfg_half, cfg_resume, half_dir):
    from hpc_rlhf.trainer.checkpoint import latest_checkpoint
    from hpc_rlhf.trainer.ppo_run import run_ppo

    full = run_ppo(cfg_full)
    first = run_ppo(cfg_half)
    assert latest_checkpoint(half_dir).endswith("step_000002")
    resumed = run_ppo(cfg_resume)
    return full, first, resumed


def _nan_run(rank, world, cfg, root):
    from hpc_rlhf.trainer.checkpoint import latest_checkpoint
    from hpc_rlhf.trainer.ppo_run import run_ppo
    from hpc_rlhf.trainer.trainable_model import NonFiniteLossError

    try:
        run_ppo(cfg)
    except NonFiniteLossError as err:
        return str(err), latest_checkpoint(root)
    return None, latest_checkpoint(root)


def test_nan_reward_stops_naming_its_rule_and_keeps_the_checkpoint(tmp_path):
    root = str(tmp_path / "ckpt")
    per_step = 8 * 4  # samples scored per step on the single rank
    cfg = make_cfg(
        ppo={"steps": 3, "save_interval": 1, "save_dir": root},
        reward={
            "rules": [
                {"function": "tests.trainer.rules:nan_after", "kwargs": {"after_calls": per_step}}
            ]
        },
    )
    message, latest = run_world(_nan_run, 1, cfg, root)[0]
    assert message is not None and "PPO step 2" in message
    # the cause is named where it enters (the rule), before it poisons a loss
    assert "reward rule tests.trainer.rules:nan_after gave NaN/inf for 32 of 32" in message
    assert message.endswith("last good checkpoint: " + os.path.join(root, "step_000001"))
    assert latest.endswith("step_000001")
    assert os.path.exists(os.path.join(latest, "actor", "tp00_pp000_dp000.pt"))
    assert not [p for p in os.listdir(root) if ".tmp-" in p]


def _reward_scores(rank, world, cfg, rm_dir):
    from hpc_rlhf.trainer.ppo_run import build_trainer

    _, trainer = build_trainer(cfg)
    prompts = trainer.prompts.next_batch(4, 0, 1)
    rollout = trainer.generate(prompts)
    exp = trainer.score(rollout)
    return rollout.prompt_ids, rollout.response_ids, exp.score_B


def write_random_reward_model(path: str, seed: int) -> tuple[str, dict]:
    """A random HF reward model of the toy's shape at ``path``: its directory and state."""
    from hpc_rlhf.models.hf_io import save_hf_checkpoint
    from hpc_rlhf.models.init import random_hf_state

    model = make_cfg().model
    rm_state = random_hf_state(model, seed=seed)
    rm_state.pop("lm_head.weight")
    rm_state["score.weight"] = 0.5 * torch.randn(
        1, model.hidden_size, generator=torch.Generator().manual_seed(seed + 1)
    )
    save_hf_checkpoint(path, model, rm_state)
    return path, rm_state


def hf_end_scores(rm_state: dict, sequences: list[list[int]]) -> list[float]:
    """transformers' Llama decoder with ``rm_state``: the score head at each sequence's
    last token (the independent reference for the trainer's reward and cost models)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from hpc_rlhf.models.hf_config import hf_config_from_model

    fields = hf_config_from_model(make_cfg().model, "score")
    hf = LlamaForSequenceClassification(
        LlamaConfig(**{k: v for k, v in fields.items() if k != "architectures"})
    ).eval()
    hf.load_state_dict(rm_state, strict=True)
    scores = []
    with torch.no_grad():
        for ids in sequences:
            hidden = hf.model(torch.tensor([ids])).last_hidden_state
            scores.append(float(hidden[0, -1] @ rm_state["score.weight"][0]))
    return scores


def test_reward_models_and_rules_combine_with_their_weights(tmp_path):
    rm_dir, rm_state = write_random_reward_model(str(tmp_path / "rm"), seed=5)
    from hpc_rlhf.models.hf_io import write_score_normalization

    write_score_normalization(rm_dir, 0.3, 2.0)  # PPO reads (score - 0.3) / 2
    cfg = make_cfg(
        ppo={
            "rollout_batch_size": 4,
            "n_samples_per_prompt": 2,
            "micro_batch_size_per_rank": 4,
            "score_micro_batch_size_per_rank": 3,  # 8 samples: micro-batches of 3, 3, 2
            "mini_batches_per_rollout": 1,
        },
        reward={
            "models": [{"path": rm_dir, "weight": 0.7}],
            "rules": [{"function": "tests.trainer.rules:response_length", "weight": 0.1}],
        },
        generation={"stop_at_eos": True},
    )
    prompts, responses, scores = run_world(_reward_scores, 1, cfg, rm_dir)[0]
    hf_scores = hf_end_scores(rm_state, [p + r for p, r in zip(prompts, responses)])
    for r, score, hf_score in zip(responses, scores, hf_scores):
        expected = 0.7 * (hf_score - 0.3) / 2.0 + 0.1 * len(r)
        assert float(score) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def _options_run(rank, world, cfg):
    from hpc_rlhf.trainer.ppo_run import build_trainer

    _, trainer = build_trainer(cfg)
    prompts = trainer.prompts.next_batch(cfg.ppo.rollout_batch_size, 0, 1)
    rollout = trainer.generate(prompts)
    # the engine's log-probs equal a teacher-forced forward (what recompute would give)
    exp = trainer.score(rollout)
    from hpc_rlhf.trainer.experience import build_experience

    engine_logp = build_experience(rollout, trainer.tokenizer.pad_id).old_logp_BS
    gap = float((exp.old_logp_BS - engine_logp).abs().max())
    kl_before = trainer.kl_ctl.value
    history = [trainer.step() for _ in range(2)]
    return gap, kl_before, trainer.kl_ctl.value, history


def test_ppo_options_ptx_dual_clip_seq_mean_adaptive_kl_and_recompute():
    from hpc_rlhf.data.lm import default_corpus_path

    cfg = make_cfg(
        ppo={
            "steps": 2,
            "ptx_coef": 0.5,
            "dual_clip": 3.0,
            "entropy_coef": 0.01,
            "loss_reduction": "seq_mean",
            "kl_estimator": "k3",
            "kl_target": 0.001,
            "kl_horizon": 100,
            "recompute_old_logprobs": True,
            "critic_init": "random",
        },
        reward={"normalize": True, "score_clip": 0.5},
        data={"ptx_data": default_corpus_path()},
        generation={"temperature": 0.7, "top_k": 50},
    )
    gap, kl_before, kl_after, history = run_world(_options_run, 1, cfg)[0]
    assert gap < 1e-4
    assert kl_after != kl_before  # the adaptive controller moved
    last = history[-1]
    for key in ("ptx_loss", "dual_clip_frac", "entropy", "value_loss", "pg_loss"):
        assert key in last, key
    assert last["ptx_loss"] > 0 and all(v == v for v in last.values())  # no NaN


def test_stage_timer_runs_its_hook_after_every_stage_inside_its_time():
    """PPO returns freed host memory after each stage through this hook: it runs once per
    stage, also when the stage raises, and its time counts in the stage's."""
    import time

    from hpc_rlhf.trainer.ppo import StageTimer

    calls = []
    timer = StageTimer(after_each=lambda: (calls.append(1), time.sleep(0.05)))
    with timer("generate"):
        pass
    with pytest.raises(RuntimeError):
        with timer("score"):
            raise RuntimeError("a failing stage")
    assert len(calls) == 2
    assert timer.seconds["generate"] >= 0.05 and timer.seconds["score"] >= 0.05


def _releases_per_step(rank, world, cfg):
    import hpc_rlhf.trainer.ppo as ppo_module
    import hpc_rlhf.trainer.trainable_model as trainable_module
    from hpc_rlhf.trainer.ppo_run import build_trainer

    run, trainer = build_trainer(cfg)
    calls = {"stage": 0, "train_step": 0, "optimizer_steps": 0}

    def counting(key):
        def release():
            calls[key] += 1
            return True

        return release

    ppo_module.release_free_memory = counting("stage")
    trainable_module.release_free_memory = counting("train_step")
    for model in trainer.trainable_models().values():
        inner = model._train_step

        def counted(*args, _inner=inner, **kwargs):
            calls["optimizer_steps"] += 1
            return _inner(*args, **kwargs)

        model._train_step = counted
    it = trainer.iterate()
    run.close()
    return calls, sorted(it.stage_seconds)


def test_freed_host_memory_is_returned_after_every_stage_and_train_step():
    """On a CPU run the caching allocator's free pages go back to the OS after each of the
    iteration's timed stages and after each optimizer step of each trained model (the
    release itself is tested in tests/parallel/test_host_allocator.py)."""
    cfg = make_cfg(ppo={"steps": 1, "mini_batches_per_rollout": 2})
    calls, stages = run_world(_releases_per_step, 1, cfg)[0]
    assert calls["stage"] == len(stages) and len(stages) >= 5, (calls, stages)
    assert calls["train_step"] == calls["optimizer_steps"] >= 4, calls  # actor + critic x 2
