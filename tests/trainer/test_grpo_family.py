"""The GRPO family in the PPO trainer on the toy task (reward: the fraction of "the" tokens
in the response): Dr.GRPO (group centring without the std, token sums over a constant),
REINFORCE++-baseline with truncated importance sampling, whose train/inference mismatch is
logged every step (fp32 engine and trainer: near zero). DAPO and GSPO learn the verifiable
toy task at 1 process and TP=2 x DP=2 in tests/trainer/test_dynamic_sampling.py; the
formulas themselves are tested in tests/algorithms/test_grpo_family.py."""

from __future__ import annotations

import dataclasses

import pytest

from tests.dist import run_world
from tests.trainer.test_ppo import _learned, _run, make_cfg

CASES = {
    "drgrpo_1proc": (
        1,
        {
            "ppo": {
                "advantage": "drgrpo",
                "loss_reduction": "token_sum",
                "whiten_advantages": False,
                "steps": 20,
            }
        },
    ),
    "reinforce_pp_baseline_tis_1proc": (
        1,
        {"ppo": {"advantage": "reinforce_pp_baseline", "tis_cap": 2.0, "steps": 20}},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_family_learns_the_toy_task(case):
    world, sections = CASES[case]
    history = run_world(_run, world, make_cfg(**sections))[0]
    start, end = _learned(history)
    assert end > start + 0.05 and end > 3 * start, f"reward {start:.3f} -> {end:.3f}"
    if "tis_cap" in sections["ppo"]:
        for step in history:
            # the engine's fp32 log-probs and the trainer's agree to rounding
            assert 0 <= step["mismatch_kl_k3"] < 1e-6 and abs(step["mismatch_kl_k1"]) < 1e-4
            assert 1 - 1e-3 < step["mismatch_ratio_max"] < 1 + 1e-3
            assert step["tis_clipped_fraction"] == 0


def test_dapo_overlong_shaping_and_filtering_in_the_trainer():
    """Every toy response runs to generation.max_new_tokens (no EOS stop): the soft
    penalty of a 4-token buffer is its full -scale on each (the first step's rollouts are
    the same with and without it), and the overlong filter leaves no token in the loss."""
    base = {"advantage": "grpo", "steps": 2}
    plain = run_world(_run, 1, make_cfg(ppo=base))[0]
    shaped = run_world(
        _run, 1, make_cfg(ppo={**base, "overlong_buffer": 4, "overlong_penalty": 0.5})
    )[0]
    assert shaped[0]["reward_mean"] == pytest.approx(plain[0]["reward_mean"] - 0.5, abs=1e-6)
    filtered = run_world(_run, 1, make_cfg(ppo={**base, "overlong_filter": True}))[0]
    assert all(step["actor_grad_norm"] == 0 for step in filtered)


def test_grpo_kl_in_the_loss_holds_the_policy_near_the_reference():
    """GRPO's KL term in the loss (``ppo.kl_loss_coef``, k3) with no KL in the reward: zero
    while the policy is the reference (step 1), and a strong coefficient keeps the
    policy's KL to the reference well below the unpenalised run's after a few steps (one
    update per step: step 1's update starts at the reference)."""
    base = {"advantage": "grpo", "kl_coef": 0.0, "steps": 6, "mini_batches_per_rollout": 1}
    free = run_world(_run, 1, make_cfg(ppo=base))[0]
    held = run_world(_run, 1, make_cfg(ppo={**base, "kl_loss_coef": 5.0}))[0]
    assert "kl_loss" not in free[-1] and abs(held[0]["kl_loss"]) < 1e-6
    assert held[-1]["kl_loss"] > 0
    assert held[-1]["kl"] < 0.5 * free[-1]["kl"], (held[-1]["kl"], free[-1]["kl"])


def _first_step(rank, world, cfg, share: bool):
    """One PPO step with shared prefixes on or off; its metrics and the positions the
    reference, the critic and the actor ran."""
    import hpc_rlhf.trainer.trainable_model as trainable_model
    from hpc_rlhf.trainer.ppo_run import build_trainer

    trainable_model.SHARED_PREFIX_MIN_TOKENS = 4  # the toy prompts are a few tokens long
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, share_prefixes=share))
    run, trainer = build_trainer(cfg)
    try:
        metrics = trainer.step()
    finally:
        run.close()
    work = {
        "reference": trainer.reference.work["infer_tokens"],
        "critic": trainer.critic.work["train_tokens"],
        "actor": trainer.actor.work["train_tokens"],
    }
    return metrics, work


def test_a_prompts_samples_share_its_tokens_with_the_same_step():
    """4 samples per prompt: with shared prefixes the reference, critic and actor passes
    run each prompt once per micro-batch (10%+ fewer positions here), and the step's
    metrics (KL to the reference, values, losses, gradient norms) are the unshared step's
    to rounding. (Which rows share a micro-batch: tests/algorithms/test_rl_math.py.)"""
    cfg = make_cfg(ppo={"steps": 1, "mini_batches_per_rollout": 1})
    (whole, whole_work), (shared, shared_work) = (
        run_world(_first_step, 1, cfg, share)[0] for share in (False, True)
    )
    for model in ("reference", "critic", "actor"):
        assert shared_work[model] < 0.9 * whole_work[model], (model, shared_work, whole_work)
    assert shared["reward_mean"] == whole["reward_mean"]  # the same rollouts
    compared = [k for k in whole if not k.startswith(("time_", "tokens_per_s"))]
    missing = {"kl", "value_mean", "pg_loss", "value_loss", "actor_grad_norm"} - set(compared)
    assert not missing, (missing, compared)
    for key in compared:
        assert shared[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key
