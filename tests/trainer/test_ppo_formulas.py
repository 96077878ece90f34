"""PPO's options as the trainer wires them, against plain-Python float64 references
written from the papers, on fixed rollouts (``iterate(rollout=...)``, one process).

Two runs share one 1-process world (module fixture):

* ``gae``: GAE + whitening, k3 KL penalty under the adaptive controller (two
  iterations), running reward normalisation then score clip, sequence-mean PPO loss with
  dual clip and asymmetric clip range, entropy bonus, ptx loss;
* ``grpo``: GRPO over groups of 4 samples, k2 KL penalty, score clip on raw scores,
  token-mean PPO loss, no whitening;
* ``ppo_lag``: Safe-RLHF's PPO-Lagrangian over two iterations: rule costs, the KL
  penalty split between reward and cost, cost GAE on the cost critic, the multiplier's
  SGD step on ``log lambda`` from a window of episode costs spanning both iterations, the
  combined advantage ``(A_r - lambda A_c) / (1 + lambda)`` and the cost critic's loss.

The behaviour log-probs are injected (``recompute_old_logprobs=False``) as the
reference model's log-probs plus designed log-ratios (``LOG_RATIOS``): at the first
update the actor still equals the reference (both start from the same weights), so the
PPO ratios are ``exp(-log_ratio)`` and fall on both sides of the clip range, and
negative-advantage tokens with ratio > 3 hit the dual clip. Every reference reads only
the experience's stored inputs (scores, old/reference log-probs, values) and the policy's
log-probs/entropies recomputed here in float64 from the actor's raw logits before the
update; never the trainer's intermediate results.

Conventions (stated, then tested): policy ``q``, reference ``p``, tokens sampled from
``q``, Schulman's ``r = p(x) / q(x)``: ``k1 = -log r``, ``k2 = (log r)^2 / 2``,
``k3 = (r - 1) - log r`` (http://joschu.net/blog/kl-approx.html); the KL controller
observes the summed KL of a sample averaged over samples (Ziegler et al. 2019,
``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``); running reward
normalisation uses the population variance of every score seen so far (including the
current batch), then the score is clipped to ``[-c, c]``; GRPO divides by the group's
sample (n - 1) standard deviation (+1e-6); whitening uses the population variance over
all valid tokens (+1e-8 inside the square root).

Tolerance: the trainer computes in fp32 (unit roundoff 6e-8). Quantities here are O(1)
to O(10) (log-probs up to ~7, ratios up to 4.5) and sums run over at most ~200 tokens, so
the expected rounding is ~sqrt(200) x 6e-8 x 10 ~ 1e-5 at worst relative to
``max(|value|, 1)``; the largest difference measured is 5e-7. ``TOL = 2e-5`` with that
floor (values near 0, such as clip fractions' differences of log-probs, carry absolute
rounding, as in ``test_ppo_parity._close``).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from hpc_rlhf.config import PPORunConfig
from tests.dist import run_world
from tests.trainer.test_ppo_parity import _cfg, _fixed_rollout, _per_row, lagrangian_sections

TOL = 2e-5
# designed log(old / ref) per token, cycled over (row, token): ratios exp(-x) are
# 4.48 (dual clip when A < 0), 2.23, 1.65 (above 1 + clip_high), 1.105, 0.95 (inside),
# 0.67, 0.41, 0.30 (below 1 - clip_low)
LOG_RATIOS = (-1.5, 0.4, -0.5, 0.9, -0.1, 0.05, 1.2, -0.8)
GAE_KL_COEF, GRPO_KL_COEF = 0.05, 0.2
CLIP_LOW, CLIP_HIGH, DUAL_CLIP = 0.2, 0.28, 3.0
ENTROPY_COEF, PTX_COEF, SCORE_CLIP = 0.05, 0.3, 1.0
KL_HORIZON, GAMMA, LAM = 50, 0.99, 0.9
GROUP = 4  # GRPO samples per prompt


# ----------------------------------------------------------------------------- references


def _log_ratio(b: int, t: int) -> float:
    """The designed ``log(old / ref)`` of token ``t`` of row ``b``."""
    return LOG_RATIOS[(3 * b + t) % len(LOG_RATIOS)]


def _schulman_kl(logp: float, ref_logp: float, estimator: str) -> float:
    """Schulman's estimator of KL(q || p) from one sample of ``q`` (the policy):
    ``r = p(x) / q(x)``; k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r."""
    log_r = ref_logp - logp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r * log_r
    return (math.exp(log_r) - 1.0) - log_r


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _pop_var(xs: list[float]) -> float:
    m = _mean(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs)


def _clip(x: float, c: float) -> float:
    return max(-c, min(c, x))


def _ziegler(value: float, observed: float, target: float, n: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: one update of the KL coefficient."""
    error = max(-0.2, min(0.2, observed / target - 1.0))
    return value * (1.0 + error * n / horizon)


def _token_rewards_ref(kl_rows, scores, beta) -> list[list[float]]:
    """``-beta * KL_t`` on every token, plus the (already normalised/clipped) score on the
    last one."""
    out = []
    for kls, score in zip(kl_rows, scores):
        row = [-beta * k for k in kls]
        if row:
            row[-1] += score
        out.append(row)
    return out


def _gae_ref(reward_rows, value_rows, gamma, lam) -> list[list[float]]:
    """GAE (Schulman et al. 2016) over each row's valid tokens, V = 0 after the last."""
    out = []
    for rewards, values in zip(reward_rows, value_rows):
        adv, a_next, v_next = [0.0] * len(rewards), 0.0, 0.0
        for t in reversed(range(len(rewards))):
            delta = rewards[t] + gamma * v_next - values[t]
            a_next = delta + gamma * lam * a_next
            adv[t], v_next = a_next, values[t]
        out.append(adv)
    return out


def _whiten_ref(rows, shift_mean: bool = True) -> list[list[float]]:
    """``(x - mean) / sqrt(var + 1e-8)`` over every valid token (population variance);
    without ``shift_mean`` the mean is added back."""
    flat = [x for row in rows for x in row]
    mean, std = _mean(flat), math.sqrt(_pop_var(flat) + 1e-8)
    back = 0.0 if shift_mean else mean
    return [[(x - mean) / std + back for x in row] for row in rows]


def _grpo_ref(returns: list[float]) -> list[float]:
    """GRPO (Shao et al. 2024): each return minus its group's mean, over the group's
    sample standard deviation (+1e-6); groups of ``GROUP`` consecutive samples."""
    out = []
    for g in range(0, len(returns), GROUP):
        group = returns[g : g + GROUP]
        mean = _mean(group)
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (GROUP - 1))
        out += [(x - mean) / (std + 1e-6) for x in group]
    return out


def _ppo_token_loss(logp, old, adv, clip_low, clip_high, dual_clip):
    """PPO clip (Schulman et al. 2017) with Ye et al. 2020's dual clip, one token:
    ``(loss, clipped, dual_clipped)``; ``loss = max(-A r, -A clip(r))``, capped at
    ``-c A`` for ``A < 0``."""
    ratio = math.exp(logp - old)
    unclipped = -adv * ratio
    clipped = -adv * max(1.0 - clip_low, min(1.0 + clip_high, ratio))
    loss = max(unclipped, clipped)
    dual = dual_clip is not None and adv < 0 and loss > -dual_clip * adv
    if dual:
        loss = -dual_clip * adv
    return loss, clipped > unclipped, dual


def _policy_loss_ref(cur_rows, old_rows, adv_rows, reduction, dual_clip):
    """PPO loss and its statistics over every valid token; ``seq_mean`` is the mean over
    sequences of each sequence's token mean."""
    per_row, ratios, n_clip, n_dual, n_tok, kl_sum = [], [], 0, 0, 0, 0.0
    for cur, old, adv in zip(cur_rows, old_rows, adv_rows):
        losses = []
        for lp, o, a in zip(cur, old, adv):
            loss, clipped, dual = _ppo_token_loss(lp, o, a, CLIP_LOW, CLIP_HIGH, dual_clip)
            losses.append(loss)
            ratios.append(math.exp(lp - o))
            n_clip, n_dual, kl_sum = n_clip + clipped, n_dual + dual, kl_sum + (o - lp)
        per_row.append(losses)
        n_tok += len(losses)
    if reduction == "seq_mean":
        pg = _mean([_mean(losses) for losses in per_row if losses])
    else:
        pg = sum(x for losses in per_row for x in losses) / n_tok
    return {
        "pg_loss": pg,
        "clip_frac": n_clip / n_tok,
        "dual_clip_frac": n_dual / n_tok,
        "ratio_mean": _mean(ratios),
        "ratio_max": max(ratios),
        "approx_kl": kl_sum / n_tok,
    }


# ----------------------------------------------------------------------------- assertions


def _assert_close(name: str, ours, want, tol: float = TOL) -> None:
    """Every value within ``tol`` of ``max(|want|, 1)``; nested lists compared element-wise."""
    if isinstance(want, list):
        assert len(ours) == len(want), f"{name}: {len(ours)} values, expected {len(want)}"
        for i, (o, w) in enumerate(zip(ours, want)):
            _assert_close(f"{name}[{i}]", o, w, tol)
        return
    assert abs(ours - want) <= tol * max(abs(want), 1.0), f"{name}: {ours!r} vs reference {want!r}"


# ----------------------------------------------------------------------------- the runs


def _gae_cfg() -> PPORunConfig:
    """GAE run: the parity test's ``gae`` option set with the options under test set, and
    the KL target 1/1.1 of the designed observation (error +0.1: the controller's clip at
    +-0.2 is not active)."""
    base = _cfg("gae", {})
    rollout = _fixed_rollout(0, 1)
    designed = _mean(
        [
            sum(_schulman_kl(_log_ratio(b, t), 0.0, "k3") for t in range(len(response)))
            for b, response in enumerate(rollout.response_ids)
        ]
    )
    ppo = replace(
        base.ppo,
        ppo_epochs=1,
        mini_batches_per_rollout=1,
        recompute_old_logprobs=False,
        kl_coef=GAE_KL_COEF,
        kl_estimator="k3",
        kl_target=designed / 1.1,
        kl_horizon=KL_HORIZON,
        gamma=GAMMA,
        lam=LAM,
        clip_low=CLIP_LOW,
        clip_high=CLIP_HIGH,
        dual_clip=DUAL_CLIP,
        entropy_coef=ENTROPY_COEF,
        ptx_coef=PTX_COEF,
        loss_reduction="seq_mean",
        whiten_advantages=True,
    )
    return replace(
        base, ppo=ppo, reward=replace(base.reward, normalize=True, score_clip=SCORE_CLIP)
    )


def _grpo_cfg() -> PPORunConfig:
    """GRPO run: groups of ``GROUP`` samples, k2 penalty, raw-score clip, token mean."""
    base = _cfg("grpo", {})
    n_rows = len(_fixed_rollout(0, 1))
    ppo = replace(
        base.ppo,
        rollout_batch_size=n_rows // GROUP,
        n_samples_per_prompt=GROUP,
        ppo_epochs=1,
        mini_batches_per_rollout=1,
        recompute_old_logprobs=False,
        kl_coef=GRPO_KL_COEF,
        kl_estimator="k2",
        kl_target=None,
        clip_low=CLIP_LOW,
        clip_high=CLIP_HIGH,
        dual_clip=None,
        loss_reduction="token_mean",
        whiten_advantages=False,
    )
    return replace(
        base, ppo=ppo, reward=replace(base.reward, normalize=False, score_clip=SCORE_CLIP)
    )


def _grouped(rollout):
    """The fixed rollout's rows in groups of ``GROUP`` consecutive samples answering one
    prompt (the first of the group's)."""
    prompts = [rollout.prompt_ids[GROUP * (b // GROUP)] for b in range(len(rollout))]
    return replace(
        rollout, prompt_ids=prompts, prompt_index=[b // GROUP for b in range(len(rollout))]
    )


def _more_target_tokens(rollout):
    """The same rollout with every odd response token set to 5 (``target_id_fraction``'s
    target): same lengths, different scores."""
    responses = [[5 if t % 2 else tok for t, tok in enumerate(r)] for r in rollout.response_ids]
    return replace(rollout, response_ids=responses)


def _injected(trainer, rollout):
    """``rollout`` with behaviour log-probs = the reference's + the designed log-ratios."""
    exp = trainer.score(rollout)
    ref_rows = _per_row(exp.ref_logp_BS, exp.action_mask_BS)
    logprobs = [
        [ref + _log_ratio(b, t) for t, ref in enumerate(row)] for b, row in enumerate(ref_rows)
    ]
    return replace(rollout, response_logprobs=logprobs)


def _float64_head(trainer, mbs):
    """Per micro-batch ``{"logp", "entropy"}`` ``[B, S]`` (float64, at the sampling
    temperature) from the actor's raw logits at its head positions."""
    from hpc_rlhf.models.runner import scatter_selected, selected

    temperature = trainer.cfg.generation.temperature

    def fn(mb, logits):
        select_BS = mb.head_mask_BS
        lsm_NV = torch.log_softmax(logits.squeeze(0).double() / temperature, dim=-1)
        labels_N = selected(mb.labels_BS, select_BS)
        logp_N = lsm_NV.gather(1, labels_N[:, None]).squeeze(1)
        entropy_N = -(lsm_NV.exp() * lsm_NV).sum(dim=-1)
        return {
            "logp": scatter_selected(logp_N, select_BS),
            "entropy": scatter_selected(entropy_N, select_BS),
        }

    return trainer.actor.infer(mbs, fn)


def _policy_rows(trainer, exp):
    """The actor's current log-probs and entropies on ``exp``'s action positions."""
    order = exp.length_order()
    mbs = exp.microbatches(trainer.cfg.ppo.score_micro_batch, order)
    parts = _float64_head(trainer, mbs)
    mask_BS = exp.action_mask_BS
    logp_BS = exp.gather_rows([p["logp"] for p in parts], order)
    entropy_BS = exp.gather_rows([p["entropy"] for p in parts], order)
    return _per_row(logp_BS, mask_BS), _per_row(entropy_BS, mask_BS)


def _ptx_nll(trainer, exp) -> tuple[float, float]:
    """``(nll_sum, tokens)`` of the ptx micro-batches the first update trains on."""
    n_micro = math.ceil(exp.size / trainer.cfg.ppo.micro_batch_size_per_rank)
    ptx_mbs = trainer._ptx_microbatches(n_micro, exp.input_ids_BS.shape[1])
    nll, tokens = 0.0, 0.0
    for mb, out in zip(ptx_mbs, _float64_head(trainer, ptx_mbs)):
        mask_BS = mb.loss_mask_BS.bool()
        nll -= float(out["logp"][mask_BS].sum())
        tokens += float(mask_BS.sum())
    return nll, tokens


class _ObjectiveRecorder:
    """Wraps ``ppo.actor_loss_fn``: records the loss each micro-batch contributes to the
    actor's objective (what is backpropagated), split into PPO and ptx micro-batches."""

    def __init__(self):
        import hpc_rlhf.trainer.ppo as ppo_module

        self.module, self.original = ppo_module, ppo_module.actor_loss_fn
        self.parts = {"ppo": 0.0, "ptx": 0.0}

    def __enter__(self):
        from hpc_rlhf.trainer.losses import RolloutMicroBatch

        def make(*args, **kwargs):
            inner = self.original(*args, **kwargs)

            def fn(mb, logits):
                out = inner(mb, logits)
                kind = "ppo" if isinstance(mb, RolloutMicroBatch) else "ptx"
                self.parts[kind] += float(out[0].detach())
                return out

            return fn

        self.module.actor_loss_fn = make
        return self

    def __exit__(self, *exc):
        self.module.actor_loss_fn = self.original


def _experience_rows(exp) -> dict:
    """The experience's per-token quantities on action positions, its scores (and costs)."""
    mask_BS = exp.action_mask_BS
    keys = ["old_logp", "ref_logp", "values", "rewards", "kl", "advantages", "returns"]
    if exp.cost_B is not None:
        keys += ["cost_values", "costs", "cost_returns"]
    rows = {key: _per_row(getattr(exp, f"{key}_BS"), mask_BS) for key in keys}
    rows["score"] = exp.score_B.double().tolist()
    if exp.cost_B is not None:
        rows["cost"] = exp.cost_B.double().tolist()
    return rows


def _lag_cfg() -> PPORunConfig:
    """PPO-Lagrangian run: the parity test's ``ppo_lag`` option set, one update per
    iteration, k1 KL at a fixed coefficient, whitened advantages."""
    base = _cfg("ppo_lag", {})
    ppo = replace(
        base.ppo,
        ppo_epochs=1,
        mini_batches_per_rollout=1,
        recompute_old_logprobs=False,
        kl_coef=GAE_KL_COEF,
        kl_estimator="k1",
        kl_target=None,
        gamma=GAMMA,
        lam=LAM,
        whiten_advantages=True,
    )
    return replace(base, ppo=ppo)


def _metrics(it) -> dict[str, float]:
    return {k: v for k, v in it.metrics.items() if not k.startswith("time_")}


def _formula_runs(rank, world):
    from hpc_rlhf.trainer.ppo_run import build_trainer

    out = {}
    run, trainer = build_trainer(_gae_cfg())
    first = _fixed_rollout(0, 1)
    rollouts = [_injected(trainer, r) for r in (first, _more_target_tokens(first))]
    exp = trainer.score(rollouts[0])
    cur_logp, entropy = _policy_rows(trainer, exp)
    ptx = _ptx_nll(trainer, exp)
    iterations = []
    for rollout in rollouts:
        with _ObjectiveRecorder() as recorder:
            it = trainer.iterate(rollout=rollout)
        iterations.append(
            {
                "rows": _experience_rows(it.experience),
                "metrics": _metrics(it),
                "kl_coef": trainer.kl_ctl.value,
                "objective": dict(recorder.parts),
            }
        )
    run.close()
    out["gae"] = {
        "iterations": iterations,
        "cur_logp": cur_logp,
        "entropy": entropy,
        "ptx": ptx,
        "kl_target": trainer.cfg.ppo.kl_target,
        "n_samples": exp.size,
    }

    run, trainer = build_trainer(_lag_cfg())
    first = _fixed_rollout(0, 1)
    iterations = []
    for rollout in (first, _more_target_tokens(first)):
        it = trainer.iterate(rollout=_injected(trainer, rollout))
        iterations.append(
            {
                "rows": _experience_rows(it.experience),
                "metrics": _metrics(it),
                "responses": rollout.response_ids,
            }
        )
    run.close()
    out["ppo_lag"] = {"iterations": iterations}

    run, trainer = build_trainer(_grpo_cfg())
    rollout = _injected(trainer, _grouped(_fixed_rollout(0, 1)))
    cur_logp, _ = _policy_rows(trainer, trainer.score(rollout))
    it = trainer.iterate(rollout=rollout)
    run.close()
    out["grpo"] = {
        "iterations": [{"rows": _experience_rows(it.experience), "metrics": _metrics(it)}],
        "cur_logp": cur_logp,
    }
    return out


@pytest.fixture(scope="module")
def runs():
    return run_world(_formula_runs, 1)[0]


# ----------------------------------------------------------------------------- tests


def _kl_rows(rows, estimator):
    return [
        [_schulman_kl(o, r, estimator) for o, r in zip(olds, refs)]
        for olds, refs in zip(rows["old_logp"], rows["ref_logp"])
    ]


def _normalised_scores(iterations) -> list[list[float]]:
    """Each iteration's scores normalised by the mean and population variance of every
    score seen so far (that iteration's included), then clipped to +-SCORE_CLIP."""
    seen, out = [], []
    for it in iterations:
        seen += it["rows"]["score"]
        mean, std = _mean(seen), math.sqrt(_pop_var(seen))
        out.append([_clip((s - mean) / std, SCORE_CLIP) for s in it["rows"]["score"]])
    return out


def _gae_betas(run) -> list[float]:
    """The KL coefficient each GAE iteration's rewards used: the initial one, then the
    controller's value after the previous iteration (from the Ziegler reference)."""
    betas = [GAE_KL_COEF]
    for it in run["iterations"][:-1]:
        observed = _mean([sum(row) for row in _kl_rows(it["rows"], "k3")])
        betas.append(_ziegler(betas[-1], observed, run["kl_target"], run["n_samples"], KL_HORIZON))
    return betas


def test_adaptive_kl_controller_follows_ziegler_over_two_iterations(runs):
    run = runs["gae"]
    value = GAE_KL_COEF
    for i, it in enumerate(run["iterations"]):
        observed = _mean([sum(row) for row in _kl_rows(it["rows"], "k3")])
        error = observed / run["kl_target"] - 1.0
        assert 0.05 < abs(error) < 0.2, f"iteration {i + 1}: error {error} (clip must be off)"
        value = _ziegler(value, observed, run["kl_target"], run["n_samples"], KL_HORIZON)
        _assert_close(f"iteration {i + 1} kl_coef", it["kl_coef"], value)
        _assert_close(f"iteration {i + 1} kl_coef metric", it["metrics"]["kl_coef"], value)
        assert abs(value / GAE_KL_COEF - 1.0) > 0.01 * (i + 1)  # the controller moved


def test_kl_estimators_k3_and_k2_in_token_rewards(runs):
    """The trainer's per-token KL is Schulman's estimator of the configured kind
    (k3 in the GAE run, k2 in the GRPO run) from the behaviour and reference log-probs,
    and every non-final token's reward is ``-beta`` times it."""
    cases = [("gae", "k3", _gae_betas(runs["gae"])), ("grpo", "k2", [GRPO_KL_COEF])]
    for name, estimator, betas in cases:
        for i, (it, beta) in enumerate(zip(runs[name]["iterations"], betas)):
            rows = it["rows"]
            want = _kl_rows(rows, estimator)
            _assert_close(f"{name} {i + 1} kl", rows["kl"], want)
            for b, (rewards, kls) in enumerate(zip(rows["rewards"], want)):
                _assert_close(
                    f"{name} {i + 1} row {b} rewards", rewards[:-1], [-beta * k for k in kls[:-1]]
                )
            flat = [k for row in want for k in row]
            _assert_close(f"{name} {i + 1} kl metric", it["metrics"]["kl"], _mean(flat))


def test_running_reward_normalisation_then_score_clip(runs):
    """GAE run: the last token's reward is the score normalised by the running moments of
    every score seen (both iterations' in the second), clipped, minus ``beta * KL``."""
    run = runs["gae"]
    iterations = run["iterations"]
    assert iterations[0]["rows"]["score"] != iterations[1]["rows"]["score"]
    for i, (it, scores, beta) in enumerate(
        zip(iterations, _normalised_scores(iterations), _gae_betas(run))
    ):
        clipped = sum(abs(s) == SCORE_CLIP for s in scores)
        assert 0 < clipped < len(scores), f"iteration {i + 1}: {clipped} scores clipped"
        want = _token_rewards_ref(_kl_rows(it["rows"], "k3"), scores, beta)
        _assert_close(f"iteration {i + 1} rewards", it["rows"]["rewards"], want)


def test_gae_advantages_whitened_over_all_valid_tokens(runs):
    """Whitening with mean shift over every valid token of the batch; returns are the
    un-whitened advantages plus values; the advantage metrics are the un-whitened ones."""
    run = runs["gae"]
    for i, (it, scores, beta) in enumerate(
        zip(run["iterations"], _normalised_scores(run["iterations"]), _gae_betas(run))
    ):
        rows = it["rows"]
        rewards = _token_rewards_ref(_kl_rows(rows, "k3"), scores, beta)
        adv = _gae_ref(rewards, rows["values"], GAMMA, LAM)
        _assert_close(f"iteration {i + 1} advantages", rows["advantages"], _whiten_ref(adv))
        returns = [[a + v for a, v in zip(ar, vr)] for ar, vr in zip(adv, rows["values"])]
        _assert_close(f"iteration {i + 1} returns", rows["returns"], returns)
        flat = [a for row in adv for a in row]
        assert abs(_mean(flat)) > 0.05  # the mean shift is not trivially zero
        _assert_close(
            f"iteration {i + 1} advantage_mean", it["metrics"]["advantage_mean"], _mean(flat)
        )
        _assert_close(
            f"iteration {i + 1} advantage_std",
            it["metrics"]["advantage_std"],
            math.sqrt(_pop_var(flat)),
        )


def test_grpo_advantage_is_group_normalised_score_minus_beta_summed_kl(runs):
    rows = runs["grpo"]["iterations"][0]["rows"]
    kls = _kl_rows(rows, "k2")
    scores = [_clip(s, SCORE_CLIP) for s in rows["score"]]
    assert 0 < sum(abs(s) == SCORE_CLIP for s in scores) < len(scores)  # clip active on some
    want = _grpo_ref([s - GRPO_KL_COEF * sum(k) for s, k in zip(scores, kls)])
    without_kl = _grpo_ref(scores)
    assert max(abs(w - x) for w, x in zip(want, without_kl)) > 0.1  # the KL term matters
    for b, adv in enumerate(rows["advantages"]):
        _assert_close(f"row {b} advantages", adv, [want[b]] * len(adv))
        _assert_close(f"row {b} returns", rows["returns"][b], [want[b]] * len(adv))


def test_seq_mean_policy_loss_with_dual_clip(runs):
    """GAE run, first update (one epoch, one mini-batch: the loss is at the pre-update
    weights): PPO clip with dual clip, reduced as the mean over sequences of their token
    means; the clip statistics over tokens."""
    run = runs["gae"]
    it = run["iterations"][0]
    rows = it["rows"]
    want = _policy_loss_ref(
        run["cur_logp"], rows["old_logp"], rows["advantages"], "seq_mean", DUAL_CLIP
    )
    assert 0 < want["dual_clip_frac"] and 0 < want["clip_frac"] < 1
    for key, value in want.items():
        _assert_close(key, it["metrics"][key], value)
    token_mean = _policy_loss_ref(
        run["cur_logp"], rows["old_logp"], rows["advantages"], "token_mean", DUAL_CLIP
    )
    assert abs(token_mean["pg_loss"] - want["pg_loss"]) > 1e-2  # the reductions differ here


def test_token_mean_policy_loss_without_dual_clip(runs):
    run = runs["grpo"]
    it = run["iterations"][0]
    rows = it["rows"]
    want = _policy_loss_ref(
        run["cur_logp"], rows["old_logp"], rows["advantages"], "token_mean", None
    )
    assert 0 < want["clip_frac"] < 1
    for key, value in want.items():
        if key != "dual_clip_frac":
            _assert_close(key, it["metrics"][key], value)
    assert "dual_clip_frac" not in it["metrics"]


def test_entropy_bonus_and_ptx_loss_in_the_actor_objective(runs):
    """The first update's objective is ``pg_loss - entropy_coef * mean token entropy`` on
    the PPO micro-batches plus ``ptx_coef * mean token NLL`` on the ptx ones."""
    run = runs["gae"]
    it = run["iterations"][0]
    rows = it["rows"]
    entropy = _mean([h for row in run["entropy"] for h in row])
    nll_sum, ptx_tokens = run["ptx"]
    assert ptx_tokens > 0
    _assert_close("entropy", it["metrics"]["entropy"], entropy)
    _assert_close("ptx_loss", it["metrics"]["ptx_loss"], nll_sum / ptx_tokens)
    pg = _policy_loss_ref(
        run["cur_logp"], rows["old_logp"], rows["advantages"], "seq_mean", DUAL_CLIP
    )
    _assert_close("PPO objective", it["objective"]["ppo"], pg["pg_loss"] - ENTROPY_COEF * entropy)
    _assert_close("ptx objective", it["objective"]["ptx"], PTX_COEF * nll_sum / ptx_tokens)


def test_seq_mean_value_loss(runs):
    """First critic update: its values are the scored ones (value clip inactive), so the
    loss is the mean over sequences of each one's mean ``0.5 * (V - R)^2``."""
    rows = runs["gae"]["iterations"][0]["rows"]
    per_seq = [
        _mean([0.5 * (v - r) ** 2 for v, r in zip(vs, rs)])
        for vs, rs in zip(rows["values"], rows["returns"])
    ]
    _assert_close(
        "value_loss", runs["gae"]["iterations"][0]["metrics"]["value_loss"], _mean(per_seq)
    )


# ----------------------------------------------------------------------------- PPO-Lagrangian


def _lagrangian_refs(run) -> list[dict]:
    """Per iteration, from the stored inputs only: the rule costs, the KL-split token
    signals, both GAEs whitened, lambda after its SGD step and the combined advantage."""
    lag = lagrangian_sections()["lagrangian"]
    log_lam, window, out = math.log(lag["lambda_init"]), [], []
    for it in run["iterations"]:
        rows = it["rows"]
        costs = [2.0 * sum(t == 7 for t in r) / len(r) - 0.05 * len(r) for r in it["responses"]]
        kls = _kl_rows(rows, "k1")
        rewards = _token_rewards_ref(kls, rows["score"], GAE_KL_COEF / 2)
        cost_signal = _token_rewards_ref(kls, costs, -GAE_KL_COEF / 2)
        reward_adv = _gae_ref(rewards, rows["values"], GAMMA, LAM)
        cost_adv = _gae_ref(cost_signal, rows["cost_values"], GAMMA, LAM)
        window = (window + costs)[-lag["episode_cost_window_size"] :]
        j_c = _mean(window)
        log_lam += lag["lambda_lr"] * (j_c - lag["threshold"]) * math.exp(log_lam)
        lam = math.exp(log_lam)
        combined = [
            [(r - lam * c) / (1 + lam) for r, c in zip(r_row, c_row)]
            for r_row, c_row in zip(_whiten_ref(reward_adv), _whiten_ref(cost_adv))
        ]
        out.append(
            {
                "costs": costs,
                "rewards": rewards,
                "cost_signal": cost_signal,
                "cost_adv": cost_adv,
                "lambda": lam,
                "episode_cost": j_c,
                "advantages": combined,
            }
        )
    return out


def test_lagrangian_costs_kl_split_and_cost_gae(runs):
    run = runs["ppo_lag"]
    for i, (it, ref) in enumerate(zip(run["iterations"], _lagrangian_refs(run))):
        rows = it["rows"]
        assert 0 < sum(c > 0 for c in ref["costs"]) < len(ref["costs"])  # both signs
        _assert_close(f"iteration {i + 1} cost", rows["cost"], ref["costs"])
        _assert_close(f"iteration {i + 1} rewards", rows["rewards"], ref["rewards"])
        _assert_close(f"iteration {i + 1} token costs", rows["costs"], ref["cost_signal"])
        returns = [
            [a + v for a, v in zip(ar, vr)] for ar, vr in zip(ref["cost_adv"], rows["cost_values"])
        ]
        _assert_close(f"iteration {i + 1} cost returns", rows["cost_returns"], returns)
        m = it["metrics"]
        flat = [a for row in ref["cost_adv"] for a in row]
        _assert_close("cost_advantage_mean", m["cost_advantage_mean"], _mean(flat))
        _assert_close("cost_advantage_std", m["cost_advantage_std"], math.sqrt(_pop_var(flat)))
        _assert_close("cost_mean", m["cost_mean"], _mean(ref["costs"]))
        positive = sum(c > 0 for c in ref["costs"]) / len(ref["costs"])
        _assert_close("cost_positive_frac", m["cost_positive_frac"], positive)


def test_lagrange_multiplier_and_combined_advantage_over_two_iterations(runs):
    """The window (20 episodes) spans both iterations' 16 costs in the second; lambda
    moves each iteration, and the actor's advantage combines the whitened advantages."""
    run = runs["ppo_lag"]
    refs = _lagrangian_refs(run)
    assert abs(refs[1]["lambda"] - refs[0]["lambda"]) > 1e-3
    assert abs(refs[0]["lambda"] - lagrangian_sections()["lagrangian"]["lambda_init"]) > 1e-3
    for i, (it, ref) in enumerate(zip(run["iterations"], refs)):
        _assert_close(f"iteration {i + 1} lambda", it["metrics"]["lambda"], ref["lambda"])
        _assert_close(
            f"iteration {i + 1} episode_cost", it["metrics"]["episode_cost"], ref["episode_cost"]
        )
        _assert_close(f"iteration {i + 1} advantages", it["rows"]["advantages"], ref["advantages"])


def test_cost_critic_value_loss(runs):
    """First cost-critic update at the scored values: token mean of ``0.5 (V_c - R_c)^2``."""
    it = runs["ppo_lag"]["iterations"][0]
    rows = it["rows"]
    losses = [
        0.5 * (v - r) ** 2
        for vs, rs in zip(rows["cost_values"], rows["cost_returns"])
        for v, r in zip(vs, rs)
    ]
    _assert_close("cost_value_loss", it["metrics"]["cost_value_loss"], _mean(losses))
    assert it["metrics"]["cost_value_loss"] != it["metrics"]["value_loss"]
