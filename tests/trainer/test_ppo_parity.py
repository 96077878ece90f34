"""PPO is exact in every layout: two iterations on one fixed rollout (prompt and response
token ids injected, so sampling cannot hide anything) at TP=2, PP=2, DP=2, TP=2 x DP=2,
PP=2 x DP=2, TP=2 with sequence parallelism and PP=2 with virtual stages give the
single-process run's score-stage outputs (reference log-probs, values, scores),
advantages, returns, logged metrics and parameters, within 1e-5 relative (fp32, ``TOL``).

Four option sets cover the layout-sensitive reductions: GAE with token-mean loss, ptx,
entropy bonus, reward normalisation, whitening and the adaptive KL controller (global
counts, moments and sequence KL over DP); GRPO with the sequence-mean loss; RLOO;
PPO-Lagrangian (cost critic, KL split, the multiplier's window over DP, combined
advantage: at DP=2 and TP=2 x DP=2). Groups
of samples of one prompt stay on one rank (prompts are split over DP, then sampled), so
group baselines are rank-local by construction and still compared here.
"""

from __future__ import annotations

import math

import pytest
import torch

from hpc_rlhf.config import PPORunConfig, config_from_dict
from tests.dist import run_world
from tests.parallel.common import max_rel_diff

PROMPTS, SAMPLES, VOCAB = 8, 2, 512
# fp32 through each layout's own reduction order (TP-split GEMMs and vocab-parallel
# log-softmax, DP sums): the largest difference measured is 1e-6 on an Intel Xeon
# (AVX-512 kernels) and 4.8e-6 on an AMD EPYC (AVX2 kernels: GRPO's advantages, divided by
# a group's small standard deviation); a layout bug (a missing or doubled reduction)
# differs at 1e-2 or more
TOL = 1e-5


def _cfg(option_set: str, parallel: dict) -> PPORunConfig:
    from hpc_rlhf.data.lm import default_corpus_path

    ppo = {
        "steps": 2,
        "rollout_batch_size": PROMPTS,
        "n_samples_per_prompt": SAMPLES,
        "micro_batch_size_per_rank": 2,
        "score_micro_batch_size_per_rank": 3,
        "mini_batches_per_rollout": 1,
        "ppo_epochs": 2,
        "recompute_old_logprobs": True,
        "kl_coef": 0.05,
    }
    reward: dict = {
        "rules": [
            {"function": "tests.trainer.rules:response_length", "weight": 0.1},
            {"function": "hpc_rlhf.algorithms.rule_rewards:target_id_fraction", "weight": 1.0},
        ]
    }
    data: dict = {"max_prompt_length": 16}
    extra: dict = {}
    if option_set == "ppo_lag":
        ppo.update(advantage="gae", algorithm="ppo_lag")
        extra = lagrangian_sections()
    elif option_set == "gae":
        ppo.update(advantage="gae", ptx_coef=0.3, entropy_coef=0.01, kl_target=0.045, kl_horizon=50)
        reward["normalize"] = True
        data["ptx_data"] = default_corpus_path()
    elif option_set == "grpo":
        ppo.update(advantage="grpo", loss_reduction="seq_mean", kl_estimator="k3")
    else:
        ppo.update(advantage="rloo", whiten_advantages=False)
    return config_from_dict(
        {
            "model": {
                "num_layers": 4,
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_query_groups": 2,
                "ffn_hidden_size": 176,
                "vocab_size": VOCAB,
                "max_position_embeddings": 64,
            },
            "parallel": parallel,
            "actor_optimizer": {"lr": 1e-4, "lr_decay_style": "constant"},
            "critic_optimizer": {"lr": 1e-4, "lr_decay_style": "constant"},
            "ppo": ppo,
            "generation": {"max_new_tokens": 12, "engine": {"cache_budget_bytes": 4 << 20}},
            "reward": reward,
            "data": data,
            **extra,
        },
        PPORunConfig,
    )


def lagrangian_sections() -> dict:
    """PPO-Lagrangian's sections for the fixed rollout: rule costs of both signs (token 7
    is frequent in it; longer responses cost less), a multiplier that moves every step."""
    return {
        "cost": {
            "rules": [
                {
                    "function": "hpc_rlhf.algorithms.rule_rewards:target_id_fraction",
                    "weight": 2.0,
                    "kwargs": {"target_id": 7},
                },
                {"function": "tests.trainer.rules:response_length", "weight": -0.05},
            ]
        },
        "cost_critic_optimizer": {"lr": 1e-4, "lr_decay_style": "constant"},
        "lagrangian": {
            "lambda_init": 0.5,
            "lambda_lr": 0.5,
            "threshold": 0.05,
            "episode_cost_window_size": 20,
        },
    }


def _fixed_rollout(dp_rank: int, dp_size: int):
    """This rank's share of one global rollout (prompt-major, prompts split over DP as the
    prompt dataset splits them); response lengths 1..12, some responses hit token 5 (the
    target of ``target_id_fraction``)."""
    from hpc_rlhf.trainer.experience import Rollout

    gen = torch.Generator().manual_seed(2024)
    prompts = [
        torch.randint(6, VOCAB, (int(torch.randint(3, 16, (1,), generator=gen)),), generator=gen)
        for _ in range(PROMPTS)
    ]
    rows = []
    for p, prompt in enumerate(prompts):
        for _ in range(SAMPLES):
            n = int(torch.randint(1, 13, (1,), generator=gen))
            response = torch.randint(4, 12, (n,), generator=gen)
            rows.append((p, prompt.tolist(), response.tolist()))
    per_rank = PROMPTS // dp_size
    mine = [r for r in rows if r[0] // per_rank == dp_rank]
    return Rollout(
        prompt_ids=[r[1] for r in mine],
        response_ids=[r[2] for r in mine],
        response_logprobs=[[0.0] * len(r[2]) for r in mine],  # recomputed by the actor
        finish_reasons=["length"] * len(mine),
        prompt_index=[r[0] - dp_rank * per_rank for r in mine],
    )


def _per_row(x_BS: torch.Tensor | None, mask_BS: torch.Tensor) -> list[list[float]] | None:
    """Each row's values on its action positions (layout-independent of padding)."""
    if x_BS is None:
        return None
    return [x_BS[b][mask_BS[b]].double().tolist() for b in range(x_BS.shape[0])]


def _iterations(rank, world, option_sets: tuple[str, ...], parallel: dict):
    from hpc_rlhf.trainer.ppo_run import build_trainer

    out = {}
    for option_set in option_sets:
        run, trainer = build_trainer(_cfg(option_set, parallel))
        state = trainer.state
        rollout = _fixed_rollout(state.dp_rank, state.dp_size)
        steps = []
        for _ in range(2):
            it = trainer.iterate(rollout=rollout)
            exp, mask_BS = it.experience, it.experience.action_mask_BS
            steps.append(
                {
                    "metrics": {
                        k: v
                        for k, v in it.metrics.items()
                        if not k.startswith("time_") and k != "tokens_per_s"
                    },
                    "rows": {
                        "ref_logp": _per_row(exp.ref_logp_BS, mask_BS),
                        "old_logp": _per_row(exp.old_logp_BS, mask_BS),
                        "values": _per_row(exp.values_BS, mask_BS),
                        "advantages": _per_row(exp.advantages_BS, mask_BS),
                        "returns": _per_row(exp.returns_BS, mask_BS),
                        "score": [[float(s)] for s in exp.score_B],
                        "cost_values": _per_row(exp.cost_values_BS, mask_BS),
                        "cost_returns": _per_row(exp.cost_returns_BS, mask_BS),
                        "cost": None if exp.cost_B is None else [[float(c)] for c in exp.cost_B],
                    },
                }
            )
        # the critic's update shows in the next step's values (its value head has a bias,
        # which the HF score-head format cannot hold)
        params = {"actor": trainer.actor.gather_hf_state()}
        run.close()
        out[option_set] = {"steps": steps, "params": params}
    return {
        "dp_rank": state.dp_rank,
        "first_of_mp": state.tp_rank == 0 and state.pp_rank == 0,
        "rank": rank,
        "runs": out,
    }


def _global_rows(results, option_set: str, step: int) -> dict[str, list[float]]:
    """Every rank-0-of-its-model-parallel-group's rows, in DP order, flattened."""
    leaders = sorted((r for r in results if r["first_of_mp"]), key=lambda r: r["dp_rank"])
    merged: dict[str, list[float]] = {}
    for leader in leaders:
        for key, rows in leader["runs"][option_set]["steps"][step]["rows"].items():
            if rows is not None:
                merged.setdefault(key, []).extend(v for row in rows for v in row)
    return merged


OPTION_SETS = ("gae", "grpo", "rloo", "ppo_lag")


@pytest.fixture(scope="module")
def reference():
    return run_world(_iterations, 1, OPTION_SETS, {})


def _close(ours: float, want: float) -> bool:
    """Within ``TOL`` relative to ``max(|want|, 1)``: metrics near 0 (KL, policy loss, clip
    fractions) are differences of log-probs of magnitude ~1-10, whose fp32 rounding is
    absolute, not relative to the small difference."""
    return abs(ours - want) <= TOL * max(abs(want), 1.0)


LAYOUTS = [
    (2, {}, ("gae", "grpo", "rloo", "ppo_lag")),
    (2, {"tensor_model_parallel_size": 2}, ("gae",)),
    (2, {"pipeline_model_parallel_size": 2}, ("gae",)),
    (4, {"tensor_model_parallel_size": 2}, ("gae", "grpo", "ppo_lag")),
    (4, {"pipeline_model_parallel_size": 2}, ("gae", "rloo")),
    (2, {"tensor_model_parallel_size": 2, "sequence_parallel": True}, ("gae",)),
    (
        2,
        {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2},
        ("gae",),
    ),
]


@pytest.mark.parametrize(
    "world,parallel,option_sets",
    LAYOUTS,
    ids=["dp2", "tp2", "pp2", "tp2_dp2", "pp2_dp2", "tp2_sp", "pp2_vpp2"],
)
def test_ppo_iterations_match_the_single_process_run(reference, world, parallel, option_sets):
    results = run_world(_iterations, world, option_sets, parallel)
    for option_set in option_sets:
        want_run = reference[0]["runs"][option_set]
        for step in range(2):
            want_rows = _global_rows(reference, option_set, step)
            ours_rows = _global_rows(results, option_set, step)
            for key, want in want_rows.items():
                err = max_rel_diff(torch.tensor(ours_rows[key]), torch.tensor(want))
                assert err <= TOL, f"{option_set} step {step + 1} {key}: rel. error {err:.2e}"
            want_metrics = want_run["steps"][step]["metrics"]
            for r in results:
                ours_metrics = r["runs"][option_set]["steps"][step]["metrics"]
                assert set(ours_metrics) == set(want_metrics)
                bad = [
                    f"{key}: {ours_metrics[key]!r} vs single-process {value!r}"
                    for key, value in want_metrics.items()
                    if not math.isfinite(value) or not _close(ours_metrics[key], value)
                ]
                assert not bad, f"{option_set} step {step + 1}, rank {r['rank']}: " + "; ".join(bad)
        ours_params = results[0]["runs"][option_set]["params"]
        for model, want_state in want_run["params"].items():
            for name, tensor in want_state.items():
                err = max_rel_diff(ours_params[model][name], tensor)
                assert err <= TOL, f"{option_set} {model} {name}: rel. error {err:.2e}"
