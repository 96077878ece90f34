"""RL math against independent plain-Python references: KL estimators, token rewards,
GRPO / RLOO advantages, whitening, KL controllers, running reward moments, experience
layout."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hpc_rlhf.algorithms.advantages import compute_advantages, whiten
from hpc_rlhf.algorithms.kl import AdaptiveKLController, kl_estimate, make_kl_controller
from hpc_rlhf.algorithms.rewards import RunningMoments, combine_scores, token_rewards
from hpc_rlhf.trainer.experience import Rollout, build_experience


def test_kl_estimators_match_their_formulas():
    gen = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    for i in range(3):
        for t in range(5):
            r = float(logp[i, t] - ref[i, t])
            assert kl_estimate(logp, ref, "k1")[i, t].item() == pytest.approx(r, rel=1e-6)
            assert kl_estimate(logp, ref, "k2")[i, t].item() == pytest.approx(0.5 * r * r, rel=1e-5)
            k3 = math.exp(-r) - 1 + r
            assert kl_estimate(logp, ref, "k3")[i, t].item() == pytest.approx(
                k3, rel=1e-4, abs=1e-6
            )
    assert bool((kl_estimate(logp, ref, "k3") >= 0).all())
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(logp, ref, "k4")


def test_token_rewards_put_kl_everywhere_and_score_on_last_valid_token():
    gen = torch.Generator().manual_seed(1)
    B, T = 4, 7
    logp, ref = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:6] = True  # right-padded response
    mask[1, 0:7] = True
    mask[2, 3:4] = True  # one token
    score = torch.tensor([1.0, -2.0, 3.0, 5.0])  # row 3 has no tokens
    rewards, kl = token_rewards(score, logp, ref, mask, kl_coef=0.1, score_clip=2.5)
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        for t in range(T):
            expected = -0.1 * float(logp[b, t] - ref[b, t]) if t in valid else 0.0
            if valid and t == valid[-1]:
                expected += max(-2.5, min(2.5, float(score[b])))
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-6)
    assert rewards[3].abs().sum() == 0 and kl[3].abs().sum() == 0


def test_combine_scores_is_the_weighted_sum():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 4.0])
    assert torch.allclose(combine_scores([a, b], [0.5, 2.0]), torch.tensor([-1.5, 9.0]))
    with pytest.raises(ValueError):
        combine_scores([a], [1.0, 2.0])


def test_grpo_and_rloo_against_python_loops():
    rng = random.Random(0)
    G, N, T = 3, 4, 5
    scores = [rng.uniform(-2, 2) for _ in range(G * N)]
    mask = torch.ones(G * N, T, dtype=torch.bool)
    mask[1, 3:] = False
    score_B = torch.tensor(scores)
    rewards_BS = torch.zeros(G * N, T)
    rewards_BS[:, 0] = score_B  # a sequence's return is the sum of its token rewards
    grpo, _ = compute_advantages("grpo", rewards_BS, mask, group_size=N)
    rloo, _ = compute_advantages("rloo", rewards_BS, mask, group_size=N)
    for g in range(G):
        group = scores[g * N : (g + 1) * N]
        mean = sum(group) / N
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (N - 1))
        for i in range(N):
            b = g * N + i
            loo = (sum(group) - group[i]) / (N - 1)
            for t in range(T):
                m = float(mask[b, t])
                assert grpo[b, t].item() == pytest.approx(
                    m * (group[i] - mean) / (std + 1e-6), abs=1e-5
                )
                assert rloo[b, t].item() == pytest.approx(m * (group[i] - loo), abs=1e-5)
    with pytest.raises(ValueError, match="not a multiple of group size"):
        compute_advantages("grpo", rewards_BS[:5], mask[:5], group_size=N)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages("vtrace", rewards_BS, mask)


def test_gae_registry_uses_the_masked_gae_op():
    gen = torch.Generator().manual_seed(2)
    r, v = torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    adv, ret = compute_advantages("gae", r, mask, v, gamma=0.9, lam=0.8)
    for b in range(2):  # independent recursion over the valid positions only
        valid = [t for t in range(6) if mask[b, t]]
        a_next, v_next = 0.0, 0.0
        for t in reversed(valid):
            delta = float(r[b, t]) + 0.9 * v_next - float(v[b, t])
            a = delta + 0.9 * 0.8 * a_next
            assert adv[b, t].item() == pytest.approx(a, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(a + float(v[b, t]), abs=1e-5)
            a_next, v_next = a, float(v[b, t])
        assert all(adv[b, t] == 0 for t in range(6) if t not in valid)


def test_whiten_over_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    out = whiten(x, mask)
    vals = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean = sum(vals) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 5)
    assert out[0, 0].item() == pytest.approx((1 - mean) / std, rel=1e-5)
    assert out[0, 2].item() == 0.0


def test_adaptive_kl_controller_moves_toward_target():
    ctl = make_kl_controller(0.1, target=6.0, horizon=1000)
    assert isinstance(ctl, AdaptiveKLController)
    ctl.update(observed_kl=12.0, n_samples=100)  # too much KL: coefficient grows
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    ctl.update(observed_kl=3.0, n_samples=100)  # too little: shrinks
    assert ctl.value < 0.1 * (1 + 0.2 * 100 / 1000)
    fixed = make_kl_controller(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05


def test_running_moments_equal_batch_statistics():
    gen = torch.Generator().manual_seed(3)
    data = torch.randn(1000, generator=gen) * 3 + 2
    moments = RunningMoments()
    for chunk in data.split(97):
        moments.update(chunk)
    assert moments.mean == pytest.approx(float(data.mean()), rel=1e-6)
    assert moments.std == pytest.approx(float(data.std(unbiased=False)), rel=1e-5)


def test_experience_layout_puts_logprobs_on_action_positions():
    rollout = Rollout(
        prompt_ids=[[2, 10, 11], [2, 12]],
        response_ids=[[20, 21], [22, 23, 24]],
        response_logprobs=[[-0.5, -0.6], [-0.1, -0.2, -0.3]],
        finish_reasons=["length", "length"],
        prompt_index=[0, 1],
    )
    exp = build_experience(rollout, pad_id=0, multiple_of=4)
    assert exp.input_ids_BS.shape == (2, 8)  # 5 tokens rounded up to a multiple of 4
    assert exp.input_ids_BS[0, :5].tolist() == [2, 10, 11, 20, 21]
    assert exp.action_mask_BS[0].tolist() == [False, False, True, True] + [False] * 4
    assert exp.action_mask_BS[1].tolist() == [False, True, True, True] + [False] * 4
    # label at an action position is the response token the log-prob belongs to
    assert exp.labels_BS[0, 2].item() == 20 and exp.old_logp_BS[0, 2].item() == -0.5
    assert exp.labels_BS[1, 3].item() == 24 and exp.old_logp_BS[1, 3].item() == pytest.approx(-0.3)


def test_length_order_by_prompt_keeps_a_prompts_samples_together():
    # two prompts, three samples each, interleaved by length; a third prompt alone
    prompts = [[2, 10, 11], [2, 12], [2, 10, 11], [2, 12], [2, 10, 11], [2, 12], [2, 13]]
    responses = [[20] * n for n in (5, 1, 2, 7, 3, 2, 4)]
    rollout = Rollout(
        prompt_ids=prompts,
        response_ids=responses,
        response_logprobs=[[-0.1] * len(r) for r in responses],
        finish_reasons=["length"] * 7,
        prompt_index=[0, 1, 0, 1, 0, 1, 2],
    )
    exp = build_experience(rollout, pad_id=0)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    assert exp.length_order().tolist() == sorted(range(7), key=lambda b: lengths[b])
    # prompts in the order of their longest sample (6, 8, 9 tokens), samples by length
    assert exp.length_order(by_prompt=True).tolist() == [6, 2, 4, 0, 1, 5, 3]


def _schulman_kl(logp: float, ref_logp: float, estimator: str) -> float:
    """Schulman's estimators of KL(q || p), one sample x of the policy q, r = p(x) / q(x)
    (http://joschu.net/blog/kl-approx.html): k1 = -log r, k2 = (log r)^2 / 2,
    k3 = (r - 1) - log r."""
    log_r = ref_logp - logp
    r = math.exp(log_r)
    return {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": (r - 1.0) - log_r}[estimator]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_token_rewards_penalise_each_kl_estimator(estimator):
    """Inside ``token_rewards``: every valid token gets ``-beta * k``, the last one also the
    score, with ``k`` Schulman's estimator of the given kind (policy log-probs first)."""
    gen = torch.Generator().manual_seed(4)
    B, T, beta = 3, 6, 0.3
    logp = -torch.rand(B, T, generator=gen) * 3
    ref = -torch.rand(B, T, generator=gen) * 3
    mask = torch.tensor(
        [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]], dtype=torch.bool
    )
    score = torch.tensor([0.5, -1.0, 2.0])
    rewards, kl = token_rewards(score, logp, ref, mask, beta, estimator)
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        for t in range(T):
            k = _schulman_kl(float(logp[b, t]), float(ref[b, t]), estimator) if t in valid else 0.0
            want = -beta * k + (float(score[b]) if t == valid[-1] else 0.0)
            assert kl[b, t].item() == pytest.approx(k, rel=1e-5, abs=1e-6)
            assert rewards[b, t].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def _whiten_ref(rows: list[list[float]], shift_mean: bool) -> list[list[float]]:
    """``(x - mean) / sqrt(var + 1e-8)`` over every value (population variance); without
    ``shift_mean`` (TRL's convention) the mean is added back: unit spread, mean kept."""
    flat = [x for row in rows for x in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat) + 1e-8)
    return [[(x - mean) / std + (0.0 if shift_mean else mean) for x in row] for row in rows]


def _whiten_shard(rank: int, world: int):
    """This rank's share of one global batch (rows of different lengths, mean 2), whitened
    over the world group, with and without mean shift."""
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(5 + rank)
    x = torch.randn(3, 5, generator=gen) * 1.5 + 2.0 + rank
    mask = torch.arange(5).expand(3, 5) < torch.tensor([[2], [5], [3 + rank]])
    out = {s: whiten(x, mask, dist.group.WORLD, shift_mean=s) for s in (True, False)}
    return x, mask, out


def test_whiten_with_and_without_mean_shift_across_a_group():
    """Whitening over the valid tokens of both ranks of a group equals whitening the
    concatenated batch; 0 off the mask."""
    from tests.dist import run_world

    shards = run_world(_whiten_shard, 2)
    rows = [x[b][m[b]].double().tolist() for x, m, _ in shards for b in range(x.shape[0])]
    for shift_mean in (True, False):
        want = _whiten_ref(rows, shift_mean)
        got = [o[shift_mean][b][m[b]].double().tolist() for x, m, o in shards for b in range(3)]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g == pytest.approx(w, rel=1e-5, abs=1e-5)
        for _, m, o in shards:
            assert bool((o[shift_mean][~m] == 0).all())
