"""Rejection-sampling fine-tuning end to end (``hpc-rlhf rejection-sampling``): the keep
rules against a plain-Python oracle, the kept sets written each round (each prompt's best
sample by the judge's rule, recomputed here from the token ids), the policy's sampled
reward rising over rounds at 1 process and TP=2 x DP=2, and a run resumed within a round
continuing as the uninterrupted one (it reads the round's kept set back)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from hpc_rlhf.config import ConfigError, RejectionSamplingRunConfig, config_from_dict
from hpc_rlhf.trainer.rejection_sampling import keep
from tests.dist import run_world
from tests.trainer.tiny import TINY_MODEL

ID_RANGE = "hpc_rlhf.algorithms.rule_rewards:id_range_fraction"


def make_cfg(parallel: dict | None = None, rs: dict | None = None, **train):
    return config_from_dict(
        {
            "model": dict(TINY_MODEL),
            "parallel": parallel or {},
            "optimizer": {"lr": 1e-2, "lr_decay_style": "constant"},
            "train": {
                "steps": 18,
                "seq_length": 40,
                "micro_batch_size_per_rank": 4,
                "global_batch_size": 8,
                **train,
            },
            "generation": {
                "max_new_tokens": 12,
                "stop_at_eos": False,
                "engine": {"cache_budget_bytes": 8 << 20},
            },
            # the judge: the fraction of response ids below 128 (a random policy: 1/4)
            "reward": {"rules": [{"function": ID_RANGE, "kwargs": {"low": 0, "high": 128}}]},
            "data": {"max_prompt_length": 24},
            "rs": {"rounds": 3, "prompts_per_round": 16, "samples_per_prompt": 4, **(rs or {})},
        },
        RejectionSamplingRunConfig,
    )


def _run(rank, world, cfg, out_dir):
    from hpc_rlhf.trainer.rejection_sampling import run_rejection_sampling

    return run_rejection_sampling(cfg, out_dir)


@pytest.mark.parametrize(
    "scores,rule,expected",
    [
        ([0.1, 0.7, 0.7, 0.2], "best", [1]),  # the first of equal best ones
        ([0.1, 0.7, 0.3, 0.2], "top_k", [1, 2]),
        ([0.5, 0.5, 0.5], "top_k", [0, 1]),
        ([0.1, 0.7, 0.3, 0.2], "threshold", [1, 2]),
        ([0.1, 0.2], "threshold", []),
    ],
)
def test_keep_rules_against_plain_python(scores, rule, expected):
    assert keep(scores, rule, top_k=2, threshold=0.3) == expected


def _fraction(ids: list[int]) -> float:
    return sum(1 for t in ids if t < 128) / len(ids)


def _read_round(path: str) -> tuple[list[dict], dict]:
    with open(path) as fh:
        rows = [json.loads(line) for line in fh]
    return rows[:-1], rows[-1]["round_metrics"]


@pytest.mark.parametrize("world", [1, 4], ids=["1proc", "tp2_dp2"])
def test_sampled_reward_rises_over_rounds_and_kept_sets_are_each_prompts_best(tmp_path, world):
    parallel = {"tensor_model_parallel_size": 2} if world == 4 else None
    out = str(tmp_path / "out")
    history = run_world(_run, world, make_cfg(parallel), out)[0]
    by_round = [history[6 * r]["reward_mean"] for r in range(3)]
    assert 0.15 < by_round[0] < 0.35, by_round
    assert by_round[-1] > by_round[0] + 0.15, by_round
    for r in range(3):
        kept, metrics = _read_round(os.path.join(out, "kept", f"round_{r:03d}.jsonl"))
        assert len(kept) == 16  # one per prompt (keep: best)
        for row in kept:
            assert row["score"] == pytest.approx(_fraction(row["response_ids"]))
        # the best of 4 beats the round's mean sample
        assert metrics["kept_reward_mean"] == pytest.approx(sum(row["score"] for row in kept) / 16)
        assert metrics["kept_reward_mean"] > metrics["reward_mean"]
        assert history[6 * r]["kept_reward_mean"] == metrics["kept_reward_mean"]


def test_threshold_keeps_every_sample_above_it(tmp_path):
    out = str(tmp_path / "out")
    cfg = make_cfg(rs={"keep": "threshold", "threshold": 0.3, "rounds": 1}, steps=2)
    history = run_world(_run, 1, cfg, out)[0]
    kept, metrics = _read_round(os.path.join(out, "kept", "round_000.jsonl"))
    assert kept and all(row["score"] >= 0.3 for row in kept)
    assert history[0]["kept"] == len(kept) < 64


def test_a_run_resumed_within_a_round_reads_its_kept_set_and_continues_exactly(tmp_path):
    save = tmp_path / "save"
    cfg = make_cfg(save_dir=str(save), save_interval=2)
    whole = run_world(_run, 1, cfg, str(tmp_path / "a"))[0]
    # lose the last checkpoints: the newest complete one is step 16, within round 2
    for name in ("latest", "step_000018"):
        path = save / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = run_world(_run, 1, cfg, str(tmp_path / "b"))[0]
    assert [h["step"] for h in resumed] == [17, 18]
    assert resumed == whole[16:]


@pytest.mark.parametrize(
    "rs,train,message",
    [
        ({"keep": "all"}, {}, "rs.keep='all'"),
        ({"keep": "top_k", "top_k": 5}, {}, "rs.top_k=5"),
        ({}, {"steps": 10}, "train.steps=10 must be a multiple of rs.rounds=3"),
        ({}, {"seq_length": 20}, "train.seq_length=20 cannot hold"),
    ],
)
def test_impossible_rejection_sampling_settings_are_named(rs, train, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        make_cfg(rs=rs, **train).validate()


def test_rejection_sampling_command_under_torchrun(tmp_path):
    import re

    from tests.dist import torchrun_cli

    result = torchrun_cli(
        "rejection-sampling",
        "examples/configs/rejection_sampling_tiny_cpu.yaml",
        "--out-dir",
        str(tmp_path / "out"),
        "train.steps=8",
        "rs.rounds=2",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"policy's sampled reward by round: [0-9.]+ -> [0-9.]+", result.stdout)
    assert (tmp_path / "out" / "kept" / "round_001.jsonl").exists()
