"""The GRPO family's estimators and losses against plain-Python formulas from their papers
(one Python float per token; loops, no tensor algebra), at odd shapes with padding."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hpc_rlhf.algorithms.advantages import compute_advantages
from hpc_rlhf.algorithms.policy_losses import gspo_policy_loss, kl_loss, truncated_is_weights

B, S, N = 6, 7, 3  # 2 prompts x 3 samples, 7 positions


def _batch(seed: int = 0):
    rng = random.Random(seed)
    lengths = [rng.randint(1, S) for _ in range(B)]
    mask = [[t < n for t in range(S)] for n in lengths]
    rewards = [[rng.gauss(0, 1) if mask[b][t] else 0.0 for t in range(S)] for b in range(B)]
    return rewards, mask


def _tensor(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def test_drgrpo_is_the_group_centred_return_without_the_std():
    rewards, mask = _batch(1)
    adv, _ = compute_advantages("drgrpo", _tensor(rewards), _tensor(mask, torch.bool), group_size=N)
    for b in range(B):
        group = range(b // N * N, b // N * N + N)
        mean = sum(sum(rewards[i]) for i in group) / N
        for t in range(S):
            want = sum(rewards[b]) - mean if mask[b][t] else 0.0
            assert adv[b, t].item() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_returns_and_its_group_baseline(gamma):
    rewards, mask = _batch(2)
    r, m = _tensor(rewards), _tensor(mask, torch.bool)
    adv, returns = compute_advantages("reinforce_pp", r, m, gamma=gamma, group_size=N)
    base_adv, _ = compute_advantages("reinforce_pp_baseline", r, m, gamma=gamma, group_size=N)
    for b in range(B):
        group = range(b // N * N, b // N * N + N)
        baseline = sum(sum(rewards[i]) for i in group) / N
        running = 0.0
        for t in reversed(range(S)):
            if not mask[b][t]:
                assert adv[b, t] == 0 and base_adv[b, t] == 0
                continue
            running = rewards[b][t] + gamma * running
            assert adv[b, t].item() == pytest.approx(running, abs=1e-5)
            assert returns[b, t].item() == pytest.approx(running, abs=1e-5)
            assert base_adv[b, t].item() == pytest.approx(running - baseline, abs=1e-5)


def _gspo_python(logp, old, adv, mask, lo, hi):
    """GSPO's objective with a Python loop over sequences (float64 tensors, autograd)."""
    total, count = 0.0, 0
    for b in range(len(mask)):
        tokens = [t for t in range(len(mask[b])) if mask[b][t]]
        if not tokens:
            continue
        log_s = sum(logp[b, t] - old[b][t] for t in tokens) / len(tokens)
        s = torch.exp(log_s)
        a = sum(adv[b][t] for t in tokens) / len(tokens)
        clipped = torch.clamp(s, 1 - lo, 1 + hi)
        total = total + -torch.minimum(s * a, clipped * a)
        count += 1
    return total / count


def test_gspo_loss_and_gradient_follow_the_sequence_ratio_formula():
    rng = random.Random(3)
    _, mask = _batch(3)
    mask[4] = [False] * S  # a row with no valid token
    old = [[rng.gauss(-2, 0.5) for _ in range(S)] for _ in range(B)]
    adv = [[a] * S for a in (rng.gauss(0, 1) for _ in range(B))]
    # ratios both inside and outside [1 - 3e-3, 1 + 4e-3]
    shift = [[rng.choice([-0.02, 0.0005, 0.02]) for _ in range(S)] for _ in range(B)]
    logp64 = torch.tensor(
        [[o + d for o, d in zip(ro, rd)] for ro, rd in zip(old, shift)],
        dtype=torch.float64,
        requires_grad=True,
    )
    want = _gspo_python(logp64, old, adv, mask, 3e-3, 4e-3)
    want.backward()
    logp = logp64.detach().float().requires_grad_(True)
    got, stats = gspo_policy_loss(
        logp, _tensor(old), _tensor(adv), _tensor(mask, torch.bool), 3e-3, 4e-3
    )
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(logp.grad.double(), logp64.grad, rtol=1e-4, atol=1e-7)
    assert torch.all(logp.grad[4] == 0)
    assert 0 < stats["clip_fraction"].item() < 1


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_loss_and_its_gradient_follow_the_estimators(estimator, reduction):
    """GRPO's KL term: per token r = logp - ref; k1 = r, k2 = r^2 / 2, k3 = e^-r - 1 + r
    (d/dlogp: 1, r, 1 - e^-r), averaged over valid tokens or over sequences' token means."""
    rng = random.Random(11)
    _, mask = _batch(5)
    mask[2] = [False] * S  # a row with no valid token
    ref = [[rng.gauss(-2, 0.5) for _ in range(S)] for _ in range(B)]
    logp = [[x + rng.gauss(0, 0.3) for x in row] for row in ref]
    estimate = {
        "k1": (lambda r: r, lambda r: 1.0),
        "k2": (lambda r: r * r / 2, lambda r: r),
        "k3": (lambda r: math.exp(-r) - 1 + r, lambda r: 1 - math.exp(-r)),
    }[estimator]
    rows = [[(i, j) for j in range(S) if mask[i][j]] for i in range(B) if any(mask[i])]
    if reduction == "token_mean":
        n = sum(len(r) for r in rows)
        weights = {ij: 1 / n for r in rows for ij in r}
    else:
        weights = {ij: 1 / (len(rows) * len(r)) for r in rows for ij in r}
    want = sum(w * estimate[0](logp[i][j] - ref[i][j]) for (i, j), w in weights.items())
    x = _tensor(logp).requires_grad_(True)
    got = kl_loss(x, _tensor(ref), _tensor(mask, torch.bool), estimator, reduction)
    got.backward()
    assert got.item() == pytest.approx(want, rel=1e-5)
    for i in range(B):
        for j in range(S):
            w = weights.get((i, j), 0.0)
            grad = w * estimate[1](logp[i][j] - ref[i][j]) if w else 0.0
            assert x.grad[i, j].item() == pytest.approx(grad, rel=1e-4, abs=1e-9)


def test_truncated_is_weights_and_the_mismatch_they_report():
    rng = random.Random(4)
    _, mask = _batch(4)
    engine = [[rng.gauss(-2, 0.5) for _ in range(S)] for _ in range(B)]
    trainer = [[e + rng.gauss(0, 0.8) for e in row] for row in engine]
    weights, stats = truncated_is_weights(
        _tensor(trainer), _tensor(engine), _tensor(mask, torch.bool), 2.0
    )
    k1 = k3 = clipped = n = 0.0
    top = 0.0
    for b in range(B):
        for t in range(S):
            if not mask[b][t]:
                assert weights[b, t] == 0
                continue
            ratio = math.exp(trainer[b][t] - engine[b][t])
            assert weights[b, t].item() == pytest.approx(min(ratio, 2.0), rel=1e-5)
            k1 += engine[b][t] - trainer[b][t]
            k3 += (ratio - 1) - math.log(ratio)
            clipped += ratio > 2.0
            n += 1
            top = max(top, ratio)
    assert stats["kl_k1_sum"].item() == pytest.approx(k1, rel=1e-5)
    assert stats["kl_k3_sum"].item() == pytest.approx(k3, rel=1e-5)
    assert stats["clipped_sum"].item() == clipped > 0 and stats["tokens"].item() == n
    assert stats["ratio_max"].item() == pytest.approx(top, rel=1e-5)


@pytest.mark.parametrize(
    "ppo, match",
    [
        ({"advantage": "dapo"}, r"ppo.advantage='dapo': expected one of"),
        ({"advantage": "drgrpo", "n_samples_per_prompt": 1}, "needs ppo.n_samples_per_prompt >= 2"),
        ({"advantage": "reinforce_pp", "whiten_advantages": False}, "needs ppo.whiten_advantages"),
        ({"policy_loss": "gspo"}, "set ppo.loss_reduction=seq_mean"),
        ({"policy_loss": "gspo", "loss_reduction": "seq_mean", "dual_clip": 3.0}, "dual clip"),
        ({"policy_loss": "cispo"}, "expected ppo or gspo"),
        ({"tis_cap": 0.5}, r"ppo.tis_cap=0.5 must be >= 1"),
        ({"loss_reduction": "token_max"}, "ppo.loss_reduction='token_max'"),
        ({"kl_loss_coef": -0.1}, "ppo.kl_loss_coef"),
        ({"kl_loss_estimator": "k4"}, r"ppo.kl_loss_estimator='k4': expected k1, k2 or k3"),
    ],
)
def test_bad_family_settings_are_named(ppo, match):
    from hpc_rlhf.config import ConfigError, PPOConfig

    with pytest.raises(ConfigError, match=match):
        PPOConfig(**{"n_samples_per_prompt": 4, **ppo}).validate()


def test_dapo_overlong_penalty_is_the_papers_piecewise_function():
    from hpc_rlhf.algorithms.rewards import overlong_penalty

    L_max, L_cache = 20, 8
    lengths = list(range(0, 26))
    got = overlong_penalty(torch.tensor(lengths), L_max, L_cache, scale=0.5)
    for n, value in zip(lengths, got.tolist()):
        if n <= L_max - L_cache:
            want = 0.0
        elif n <= L_max:
            want = (L_max - L_cache - n) / L_cache
        else:
            want = -1.0
        assert value == pytest.approx(0.5 * want, abs=1e-7), n
