"""PPO-Lagrangian's multiplier, combined advantage and KL split, and Llama-2's safety-gated
reward, against plain-Python float64 references written from the papers:

* Safe-RLHF (Dai et al. 2024, and its PPO-Lag trainer's published description): the
  multiplier ``lambda = exp(log_lambda)`` minimises ``-(J_c - d) * lambda`` by SGD on
  ``log_lambda``, so ``log_lambda += lr * (J_c - d) * lambda``; ``J_c`` the mean cost of the
  last ``window`` episodes; capped at ``log(lambda_max)``; the actor's advantage
  ``(A_r - lambda A_c) / (1 + lambda)``; the KL penalty split half into the reward and
  half (with the opposite sign) into the cost.
* Llama-2 (Touvron et al. 2023, section 3.2.2): ``R_c = R_s`` if the prompt is a safety
  prompt or ``R_s < 0.15``, else ``R_h``, the scores being sigmoid probabilities; then
  ``whiten(logit(R_c))``.
"""

from __future__ import annotations

import math

import pytest
import torch

from hpc_rlhf.algorithms.lagrange import LagrangeMultiplier, combined_advantage
from hpc_rlhf.algorithms.rewards import lagrangian_token_signals, llama2_safety_gate
from hpc_rlhf.config import ConfigError, PPORunConfig, config_from_dict

TOL = 1e-6


def _multiplier_ref(costs_per_step, init, lr, threshold, window, max_value, delay):
    """lambda after each step, by the formulas above (float64 Python)."""
    log_lam, seen, out = math.log(init), [], []
    for step, costs in enumerate(costs_per_step):
        seen = (seen + list(costs))[-window:]
        if step >= delay:
            j_c = sum(seen) / len(seen)
            log_lam += lr * (j_c - threshold) * math.exp(log_lam)
            if max_value is not None:
                log_lam = min(log_lam, math.log(max_value))
        out.append(math.exp(log_lam))
    return out


COSTS = [[0.9, 0.4, 1.3], [0.2, -0.5, 0.6], [-0.8, -1.1, -0.3], [-0.9, -0.2, 0.1], [0.0, 2.5, 1.0]]


@pytest.mark.parametrize(
    "init,lr,threshold,window,max_value,delay",
    [
        (1.0, 0.1, 0.0, 128, None, 0),
        (0.5, 0.7, 0.2, 4, None, 1),  # a window shorter than two steps, a delay
        (2.0, 0.5, 0.3, 3, 2.5, 0),  # the cap binds, then lambda falls
    ],
)
def test_multiplier_follows_sgd_on_log_lambda(init, lr, threshold, window, max_value, delay):
    mult = LagrangeMultiplier(init, lr, threshold, window, max_value, delay)
    ours = []
    for step, costs in enumerate(COSTS):
        mult.observe(torch.tensor(costs))
        ours.append(mult.update(step))
    want = _multiplier_ref(COSTS, init, lr, threshold, window, max_value, delay)
    for step, (o, w) in enumerate(zip(ours, want)):
        assert abs(o - w) <= TOL * max(w, 1.0), f"step {step}: lambda {o} vs {w}"
    if max_value is not None:
        assert max(ours) == pytest.approx(max_value)
    assert len(set(round(x, 9) for x in ours)) > 2  # it moved


def test_multiplier_state_resumes_exactly_and_a_zero_rate_keeps_lambda():
    a = LagrangeMultiplier(1.0, 0.3, 0.1, 5, None, 0)
    for step, costs in enumerate(COSTS[:2]):
        a.observe(torch.tensor(costs))
        a.update(step)
    b = LagrangeMultiplier(1.0, 0.3, 0.1, 5, None, 0)
    b.load_state_dict(a.state_dict())
    for step, costs in enumerate(COSTS[2:], start=2):
        for m in (a, b):
            m.observe(torch.tensor(costs))
        assert a.update(step) == b.update(step)
    assert a.episode_cost == b.episode_cost
    fixed = LagrangeMultiplier(0.0, 0.0, 0.0, 5)
    fixed.observe(torch.tensor([5.0]))
    assert fixed.update(0) == 0.0 and fixed.value == 0.0


def test_combined_advantage_is_reward_minus_lambda_cost_over_one_plus_lambda():
    reward_adv = torch.tensor([[0.5, -1.0, 2.0]])
    cost_adv = torch.tensor([[1.5, 0.25, -0.75]])
    lam = 0.6
    ours = combined_advantage(reward_adv, cost_adv, lam)[0].tolist()
    want = [(r - lam * c) / (1 + lam) for r, c in zip([0.5, -1.0, 2.0], [1.5, 0.25, -0.75])]
    assert ours == pytest.approx(want, abs=TOL)


def test_kl_penalty_is_split_between_the_reward_and_the_cost_signals():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.7, 0.0, 0.0]])
    ref = torch.tensor([[-1.4, -1.5, -0.9, 0.0], [-0.2, -1.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    score, cost = torch.tensor([2.0, -1.0]), torch.tensor([0.7, -0.4])
    beta = 0.1
    rewards, costs, kl = lagrangian_token_signals(score, cost, logp, ref, mask, beta)
    for b in range(2):
        n = int(mask[b].sum())
        kls = [float(logp[b, t]) - float(ref[b, t]) for t in range(n)]  # k1 = log q - log p
        want_r = [-beta / 2 * k for k in kls]
        want_c = [beta / 2 * k for k in kls]
        want_r[-1] += float(score[b])
        want_c[-1] += float(cost[b])
        assert rewards[b, :n].tolist() == pytest.approx(want_r, abs=TOL)
        assert costs[b, :n].tolist() == pytest.approx(want_c, abs=TOL)
        assert kl[b, :n].tolist() == pytest.approx(kls, abs=TOL)
        assert rewards[b, n:].abs().sum() == 0 and costs[b, n:].abs().sum() == 0
    # whatever lambda, the actor sees half the KL coefficient
    lam = 3.0
    total = (rewards - lam * costs) / (1 + lam)
    score_part = torch.zeros_like(total)
    score_part[0, 2], score_part[1, 1] = (
        (2.0 - lam * 0.7) / (1 + lam),
        (-1.0 + lam * 0.4) / (1 + lam),
    )
    assert torch.allclose(total - score_part, -beta / 2 * kl, atol=TOL)


def _llama2_ref(helpful, safety, unsafe_prompt, threshold=0.15):
    """The paper's formulas: probabilities sigmoid(x), the gate, logit, whitening."""
    sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    logit = lambda p: math.log(p / (1.0 - p))  # noqa: E731
    chosen = []
    for h, s, tagged in zip(helpful, safety, unsafe_prompt):
        r_s, r_h = sigmoid(s), sigmoid(h)
        chosen.append(logit(r_s if tagged or r_s < threshold else r_h))
    mean = sum(chosen) / len(chosen)
    var = sum((x - mean) ** 2 for x in chosen) / len(chosen)
    return chosen, [(x - mean) / math.sqrt(var + 1e-8) for x in chosen]


HELPFUL = [2.0, -0.5, 1.2, 0.3, 3.1, -2.2]
SAFETY = [-2.5, 0.4, -1.0, -1.9, 1.7, 0.0]  # sigmoid: 0.076 (< 0.15), 0.6, 0.27, 0.13 (< 0.15) ...
TAGGED = [False, False, True, False, False, True]


def test_llama2_gate_takes_the_safety_score_on_tagged_or_unsafe_responses():
    chosen, _ = _llama2_ref(HELPFUL, SAFETY, TAGGED)
    ours = llama2_safety_gate(torch.tensor(HELPFUL), torch.tensor(SAFETY), torch.tensor(TAGGED))
    assert ours.tolist() == pytest.approx(chosen, abs=1e-5)
    assert chosen == pytest.approx([-2.5, -0.5, -1.0, -1.9, 3.1, 0.0], abs=1e-9)


def test_llama2_combine_whitens_the_gated_score_and_adds_rules():
    from hpc_rlhf.trainer.experience import Rollout
    from hpc_rlhf.trainer.score_sources import ScoreSources

    section = config_from_dict(
        {
            "reward": {
                "combine": "llama2_safety",
                "models": [
                    {"path": "/rm/safety", "role": "safety"},
                    {"path": "/rm/helpful", "role": "helpfulness"},
                ],
                "rules": [{"function": "tests.trainer.rules:response_length", "weight": 0.1}],
            }
        },
        PPORunConfig,
    ).reward
    rollout = Rollout(
        prompt_ids=[[1]] * 6,
        response_ids=[[7] * (n + 1) for n in range(6)],
        response_logprobs=[[0.0]] * 6,
        finish_reasons=["stop"] * 6,
        prompt_index=list(range(6)),
        unsafe_prompt=TAGGED,
    )
    sources = ScoreSources(section, "reward", [], [None, None])
    ours = sources.combined(
        rollout, [torch.tensor(SAFETY), torch.tensor(HELPFUL)], None, None, torch.tensor(TAGGED)
    )
    _, whitened = _llama2_ref(HELPFUL, SAFETY, TAGGED)
    want = [w + 0.1 * (n + 1) for n, w in enumerate(whitened)]
    assert ours.tolist() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize(
    "data,message",
    [
        ({"ppo": {"algorithm": "ppo_lag"}}, r"ppo_lag needs a cost section"),
        ({"cost": {"rules": [{"function": "m:f"}]}}, r"cost is read only with ppo.algorithm"),
        (
            {"ppo": {"algorithm": "ppo_lag", "advantage": "grpo", "n_samples_per_prompt": 2}},
            r"ppo_lag learns reward and cost critics",
        ),
        (
            {
                "ppo": {"algorithm": "ppo_lag"},
                "cost": {"rules": [{"function": "m:f"}]},
                "lagrangian": {"lambda_init": 0.0},
            },
            r"lagrangian.lambda_init=0.0 must be > 0",
        ),
        (
            {
                "ppo": {"algorithm": "ppo_lag", "cost_critic_init": "cost"},
                "cost": {"rules": [{"function": "m:f"}]},
            },
            r"cost_critic_init='cost' needs at least one cost.models",
        ),
        (
            {
                "ppo": {"algorithm": "ppo_lag"},
                "cost": {"rules": [{"function": "m:f"}]},
                "lagrangian": {"episode_cost_window_size": 0},
            },
            r"lagrangian.episode_cost_window_size",
        ),
        (
            {"reward": {"combine": "llama2_safety", "models": [{"path": "a", "role": "safety"}]}},
            r"needs one reward.models entry with role: helpfulness",
        ),
        ({"reward": {"models": [{"path": "a", "role": "safety"}]}}, r"role is read only with"),
    ],
)
def test_bad_safe_rlhf_settings_name_their_key(data, message):
    base = {"reward": {"rules": [{"function": "m:r"}]}}
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**base, **data}, PPORunConfig).validate()


def test_a_large_rate_keeps_lambda_finite_and_recoverable():
    """SGD on log lambda grows lambda geometrically: it stops at the bound instead of
    overflowing to inf (a NaN actor loss), and after the cost falls it stops at the
    lower bound instead of reaching exactly 0 (from which it could never rise again)."""
    from hpc_rlhf.algorithms.lagrange import LOG_LAMBDA_BOUND

    mult = LagrangeMultiplier(1.0, 50.0, 0.0, 4)
    for step in range(6):
        mult.observe(torch.tensor([1.0, 1.0]))
        mult.update(step)
    assert mult.value == pytest.approx(math.exp(LOG_LAMBDA_BOUND))
    adv = combined_advantage(torch.ones(1, 2), torch.full((1, 2), 2.0), mult.value)
    assert torch.isfinite(adv).all() and adv[0, 0] == pytest.approx(-2.0, abs=1e-6)
    for step in range(6, 12):
        mult.observe(torch.tensor([-1.0] * 4))
        mult.update(step)
    assert mult.value == pytest.approx(math.exp(-LOG_LAMBDA_BOUND)) and mult.value > 0
    mult.observe(torch.tensor([1.0] * 4))
    before = mult.value
    assert mult.update(12) > before  # it rises again
