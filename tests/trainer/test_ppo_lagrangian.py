"""PPO-Lagrangian end to end on the tiny model: the constraint is what moves the cost.

Toy task with dense signals from the first step (a random policy spreads over the 512 ids):
the rule reward favours ids ``[0, 256)``; the rule cost penalises ids ``[128, 256)``,
half of the rewarded ones, so maximising the reward alone keeps (or raises) the cost,
while the constrained optimum moves the mass to ``[0, 128)``: reward 1 and cost 0. With a
threshold under the initial cost (about 0.25), lambda rises while the cost is above it,
the cost falls under it while the reward rises, and lambda then settles (it decays
slowly once the constraint holds: the multiplier of an inactive constraint tends to 0).
With lambda fixed at 0 the same run keeps its cost. At 1 process and TP=2 x DP=2; a
resumed run reproduces the uninterrupted one with the cost critic and the multiplier; the
cost critic's optimizer state is released while generating. And with HF reward and cost
models: Llama-2's safety gate reads the prompt file's tags, and the end scores match
transformers' models.
"""

from __future__ import annotations

import json
import math

from tests.dist import run_world
from tests.trainer.test_ppo import (
    _run,
    hf_end_scores,
    make_cfg,
    resumed_and_uninterrupted,
    write_random_reward_model,
)

THRESHOLD = 0.15
RULES = "hpc_rlhf.algorithms.rule_rewards:id_range_fraction"


def lagrangian_cfg(**sections):
    """The toy task (module docstring) under PPO-Lagrangian, 16 steps; ``sections`` update
    its sections key by key."""
    toy = {
        "ppo": {"algorithm": "ppo_lag", "steps": 16},
        "reward": {"rules": [{"function": RULES, "kwargs": {"low": 0, "high": 256}}]},
        "cost": {"rules": [{"function": RULES, "kwargs": {"low": 128, "high": 256}}]},
        "cost_critic_optimizer": {"lr": 5e-3, "lr_decay_style": "constant"},
        "lagrangian": {
            "threshold": THRESHOLD,
            "lambda_init": 1.0,
            "lambda_lr": 1.0,
            "lambda_max": 10.0,
        },
    }
    for key, value in sections.items():
        toy[key] = {**toy.get(key, {}), **value}
    return make_cfg(**toy)


def _mean(history, key: str, steps: slice) -> float:
    values = [m[key] for m in history[steps]]
    return sum(values) / len(values)


def _constrained_and_free(rank, world, constrained, free):
    from hpc_rlhf.trainer.ppo_run import run_ppo

    return run_ppo(constrained), run_ppo(free)


def _assert_constrained(history) -> None:
    start_cost, end_cost = (
        _mean(history, "cost_mean", slice(0, 2)),
        _mean(history, "cost_mean", slice(-4, None)),
    )
    start_reward, end_reward = (
        _mean(history, "reward_mean", slice(0, 2)),
        _mean(history, "reward_mean", slice(-4, None)),
    )
    lambdas = [m["lambda"] for m in history]
    assert start_cost > THRESHOLD + 0.05, f"the toy starts above the threshold: {start_cost:.3f}"
    assert end_cost < THRESHOLD and end_cost < 0.5 * start_cost, (
        f"cost {start_cost:.3f} -> {end_cost:.3f}"
    )
    assert end_reward > start_reward + 0.2, f"reward {start_reward:.3f} -> {end_reward:.3f}"
    peak = max(range(len(lambdas)), key=lambdas.__getitem__)
    assert 0 < peak < len(lambdas) - 4 and lambdas[peak] > 1.15, f"lambda {lambdas}"
    assert history[peak - 1]["episode_cost"] > THRESHOLD  # it rose while the cost was above
    late = lambdas[-4:]
    assert max(late) / min(late) < 1.5 and min(late) > 0.05, f"lambda settles: {late}"
    for key in (
        "cost_positive_frac",
        "cost_value_loss",
        "cost_advantage_std",
        "cost_critic_grad_norm",
    ):
        assert key in history[-1]


def test_the_constraint_moves_the_cost_and_lambda_rises_then_settles():
    free_cfg = lagrangian_cfg(lagrangian={"lambda_init": 0.0, "lambda_lr": 0.0, "lambda_max": None})
    constrained, free = run_world(_constrained_and_free, 1, lagrangian_cfg(), free_cfg)[0]
    _assert_constrained(constrained)
    assert all(m["lambda"] == 0.0 for m in free)
    free_start = _mean(free, "cost_mean", slice(0, 2))
    free_end = _mean(free, "cost_mean", slice(-4, None))
    assert free_end > 0.9 * free_start, f"lambda = 0: cost {free_start:.3f} -> {free_end:.3f}"
    assert _mean(free, "reward_mean", slice(-4, None)) > 0.8  # it learned its reward
    assert _mean(constrained, "cost_mean", slice(-4, None)) < 0.5 * free_end


def test_the_constraint_holds_at_tp2_dp2():
    cfg = lagrangian_cfg(
        parallel={"tensor_model_parallel_size": 2}, ppo={"micro_batch_size_per_rank": 4}
    )
    _assert_constrained(run_world(_run, 4, cfg)[0])


def test_resume_with_the_cost_critic_and_multiplier_reproduces_the_run(tmp_path):
    full = resumed_and_uninterrupted(tmp_path, lambda ppo: lagrangian_cfg(ppo=ppo))
    assert len({m["lambda"] for m in full}) == 4  # the multiplier moved every step


def _grad_bytes_by_stage(rank, world, cfg):
    """Each trained model's gradient-buffer bytes while the engine generates, while the
    batch is scored, inside its own train steps and after the step (step 2, after an
    update)."""
    from hpc_rlhf.inference.memory import grad_buffer_bytes
    from hpc_rlhf.trainer.ppo_run import build_trainer

    run, trainer = build_trainer(cfg)
    models = trainer.trainable_models()

    def grad_bytes() -> dict[str, int]:
        return {name: grad_buffer_bytes(m.model) for name, m in models.items()}

    trainer.step()
    seen: dict[str, dict] = {"generate": {}, "score": {}, "own_step": {}}

    def spy(stage: str, fn):
        def wrapped(*args, **kwargs):
            seen[stage].update(grad_bytes())
            return fn(*args, **kwargs)

        return wrapped

    trainer.engine.generate = spy("generate", trainer.engine.generate)
    trainer.score = spy("score", trainer.score)
    for name, model in models.items():
        inner = model._train_step

        def own(*args, _name=name, _model=model, _inner=inner, **kwargs):
            seen["own_step"][_name] = grad_buffer_bytes(_model.model)
            return _inner(*args, **kwargs)

        model._train_step = own
    trainer.step()
    seen["after"] = grad_bytes()
    run.close()
    return seen


def test_each_trained_model_holds_gradients_only_in_its_own_steps():
    """Time-sharing of the three trained models: no gradient buffer while generating or
    scoring (nor between steps); each model's buffer exists inside its own train steps."""
    seen = run_world(_grad_bytes_by_stage, 1, lagrangian_cfg(ppo={"steps": 2}))[0]
    assert set(seen["own_step"]) == {"actor", "critic", "cost_critic"}
    for stage in ("generate", "score", "after"):
        assert all(n == 0 for n in seen[stage].values()), (stage, seen[stage])
    assert all(n > 0 for n in seen["own_step"].values()), seen["own_step"]


def _gated_iteration(rank, world, cfg):
    from hpc_rlhf.trainer.ppo_run import build_trainer

    run, trainer = build_trainer(cfg)
    it = trainer.iterate()
    run.close()
    r, exp = it.rollout, it.experience
    tags = {
        tuple(ids): trainer.prompts.unsafe(i) for i, ids in enumerate(trainer.prompts.token_ids)
    }
    return (
        r.prompt_ids,
        r.response_ids,
        r.unsafe_prompt,
        exp.score_B.tolist(),
        exp.cost_B.tolist(),
        tags,
    )


def test_llama2_gate_with_tagged_prompts_and_a_cost_model(tmp_path):
    """``reward.combine: llama2_safety`` over two HF reward models, prompts tagged in their
    file, and the safety model as PPO-Lagrangian's cost model: the trainer's scores equal
    the gate (reference: the Llama-2 formulas on transformers' end scores) and its costs
    the cost model's end scores."""
    helpful_dir, helpful = write_random_reward_model(str(tmp_path / "helpful"), seed=11)
    safety_dir, safety = write_random_reward_model(str(tmp_path / "safety"), seed=21)
    prompts = tmp_path / "prompts.jsonl"
    words = ["the cat", "a river", "the old tower", "a green lamp", "our teacher", "the sea"]
    with open(prompts, "w") as fh:
        for i, text in enumerate(words):
            fh.write(json.dumps({"prompt": text, "adversarial": i % 2 == 1}) + "\n")
    cfg = lagrangian_cfg(
        ppo={
            "steps": 1,
            "rollout_batch_size": 6,
            "n_samples_per_prompt": 2,
            "micro_batch_size_per_rank": 4,
            "mini_batches_per_rollout": 1,
        },
        reward={
            "rules": [],
            "combine": "llama2_safety",
            "safety_threshold": 0.5,  # random models: about half below it
            "models": [
                {"path": helpful_dir, "role": "helpfulness"},
                {"path": safety_dir, "role": "safety"},
            ],
        },
        cost={"rules": [], "models": [{"path": safety_dir}]},
        data={"prompts": str(prompts), "safety_field": "adversarial", "shuffle": False},
    )
    prompt_ids, responses, unsafe, scores, costs, tags = run_world(_gated_iteration, 1, cfg)[0]
    assert unsafe == [tags[tuple(p)] for p in prompt_ids] and 0 < sum(unsafe) < len(unsafe)
    sequences = [p + r for p, r in zip(prompt_ids, responses)]
    h_scores, s_scores = hf_end_scores(helpful, sequences), hf_end_scores(safety, sequences)
    sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    chosen = [s if u or sigmoid(s) < 0.5 else h for h, s, u in zip(h_scores, s_scores, unsafe)]
    by_threshold = sum(not u and sigmoid(s) < 0.5 for s, u in zip(s_scores, unsafe))
    assert 0 < by_threshold and sum(c == h for c, h in zip(chosen, h_scores)) > 0
    mean = sum(chosen) / len(chosen)
    std = math.sqrt(sum((c - mean) ** 2 for c in chosen) / len(chosen) + 1e-8)
    for ours, c in zip(scores, chosen):
        assert abs(ours - (c - mean) / std) < 1e-4
    for ours, s in zip(costs, s_scores):
        assert abs(ours - s) < 1e-4 * max(1.0, abs(s))
