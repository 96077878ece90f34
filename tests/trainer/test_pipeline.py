"""``hpc-rlhf pipeline``: the stages are wired through their exports (reward and cost
models and the PPO actor from the SFT model, PPO's critic and reward from the reward
model), a rerun skips finished stages, and a stage interrupted mid-way resumes from its
own checkpoint without redoing the stages before it."""

from __future__ import annotations

import json
import os

import pytest

from hpc_rlhf.config import ConfigError, PipelineConfig, config_from_dict
from tests.trainer.tiny import TINY_MODEL

MODEL = {**TINY_MODEL, "max_position_embeddings": 128}
TRAIN = {"steps": 3, "micro_batch_size_per_rank": 2, "global_batch_size": 4}


def _pipeline(out_dir: str, ppo_rules: list | None = None) -> PipelineConfig:
    ppo = {
        "ppo": {
            "steps": 3,
            "rollout_batch_size": 4,
            "n_samples_per_prompt": 2,
            "micro_batch_size_per_rank": 4,
            "save_interval": 1,
            "algorithm": "ppo_lag",  # the cost stage's model is PPO-Lagrangian's cost
        },
        "lagrangian": {"threshold": 0.0, "lambda_lr": 0.5},
        "generation": {"max_new_tokens": 6, "engine": {"cache_budget_bytes": 4 << 20}},
        "data": {"max_prompt_length": 32},
    }
    if ppo_rules:
        ppo["reward"] = {"rules": ppo_rules}
    return config_from_dict(
        {
            "model": MODEL,
            "out_dir": out_dir,
            "sft": {"train": {**TRAIN, "seq_length": 96}},
            "rm": {"train": {**TRAIN, "seq_length": 64}},
            "cost": {"train": {**TRAIN, "seq_length": 96}},
            "ppo": ppo,
        },
        PipelineConfig,
    )


def test_stages_are_wired_through_their_exports(tmp_path):
    cfg = _pipeline(str(tmp_path)).validate(1)
    sft, rm, cost, ppo = (cfg.stage_config(s) for s in ("sft", "rm", "cost", "ppo"))
    assert sft.init is None and sft.train.hf_export_dir == str(tmp_path / "sft" / "hf")
    assert rm.init == cost.init == str(tmp_path / "sft" / "hf")
    assert (rm.rm.objective, cost.rm.objective) == ("reward", "cost")
    assert ppo.actor_init == str(tmp_path / "sft" / "hf")
    assert ppo.reward.models[0].path == str(tmp_path / "rm" / "hf")
    assert ppo.ppo.critic_init == "reward"
    assert [m.path for m in ppo.cost.models] == [str(tmp_path / "cost" / "hf")]
    assert ppo.cost_critic_init == "cost" and ppo.lagrangian.lambda_lr == 0.5
    assert ppo.ppo.save_dir == str(tmp_path / "ppo" / "ckpt")
    for stage_cfg in (sft, rm, cost, ppo):
        assert stage_cfg.model.num_layers == 2


@pytest.mark.parametrize(
    "section,match",
    [
        ({"sft": {"train": {"stepz": 3}}}, r"unknown config key 'sft.train.stepz'"),
        ({"sft": {"train": {"hf_export_dir": "x"}}}, r"sft.train.hf_export_dir is set by the"),
        ({"rm": {"rm": {"objective": "cost"}}}, r"rm.rm.objective is set by the pipeline"),
        ({"sft": {"train": {"steps": 0}}}, r"pipeline stage sft: train.steps"),
    ],
)
def test_bad_stage_sections_name_the_stage(tmp_path, section, match):
    data = {"model": MODEL, "out_dir": str(tmp_path), **section}
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data, PipelineConfig).validate(1)


def _run(rank, world, cfg):
    from hpc_rlhf.trainer.pipeline import run_pipeline

    try:
        return run_pipeline(cfg)
    except RuntimeError as err:
        return str(err)


def test_pipeline_runs_end_to_end_skips_finished_stages_and_resumes_an_interrupted_one(
    tmp_path,
):
    from tests.dist import run_world

    out = str(tmp_path)
    failing = [
        {"function": "tests.trainer.rules:fail_after", "weight": 0.0, "kwargs": {"after_calls": 8}}
    ]  # 8 samples per PPO step: fails in step 2
    interrupted = run_world(_run, 1, _pipeline(out, failing))[0]
    assert "interrupted by tests.trainer.rules:fail_after" in interrupted
    for stage in ("sft", "rm", "cost"):
        assert os.path.exists(os.path.join(out, stage, "done.json")), stage
        assert os.path.exists(os.path.join(out, stage, "hf", "config.json")), stage
    assert not os.path.exists(os.path.join(out, "ppo", "done.json"))
    assert os.path.isdir(os.path.join(out, "ppo", "ckpt", "step_000001"))
    done_times = {s: os.path.getmtime(os.path.join(out, s, "done.json")) for s in ("sft", "rm")}

    summaries = run_world(_run, 1, _pipeline(out))[0]
    assert all(summaries[s].get("skipped") for s in ("sft", "rm", "cost"))
    assert summaries["ppo"]["first_step"] == 2 and summaries["ppo"]["last_step"] == 3
    assert "skipped" not in summaries["ppo"]
    assert summaries["ppo"]["lambda_last"] != summaries["ppo"]["lambda_first"]  # PPO-Lagrangian
    for stage, mtime in done_times.items():
        assert os.path.getmtime(os.path.join(out, stage, "done.json")) == mtime
    with open(os.path.join(out, "sft", "done.json")) as fh:
        sft = json.load(fh)
    assert sft["steps"] == 3 and sft["loss_last"] < sft["loss_first"]
    assert os.path.exists(os.path.join(out, "ppo", "hf", "config.json"))
    again = run_world(_run, 1, _pipeline(out))[0]
    assert all(s.get("skipped") for s in again.values())
