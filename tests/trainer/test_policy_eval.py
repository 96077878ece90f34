"""``hpc-rlhf eval``: a policy and a baseline generate on the prompts; every written sample's
reward and cost equal transformers' ``LlamaForSequenceClassification`` end scores, and the
summary (mean, std, unsafe fraction, win rates) equals a plain-Python computation over
them, at 1 process and at DP=2 (the same prompts and seeds give the same samples)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from hpc_rlhf.config import EvalRunConfig, config_from_dict
from tests.trainer.tiny import TINY_MODEL

MODEL = {**TINY_MODEL, "max_position_embeddings": 128}


def _write_models(root: str) -> dict[str, str]:
    """Two policies and a reward and a cost model, HF checkpoints of random weights."""
    from hpc_rlhf.config import ModelConfig
    from hpc_rlhf.models.hf_io import save_hf_checkpoint
    from hpc_rlhf.models.init import random_hf_state

    model = ModelConfig(**MODEL)
    paths = {}
    for name, seed in (("policy", 1), ("baseline", 2)):
        paths[name] = os.path.join(root, name)
        save_hf_checkpoint(paths[name], model, random_hf_state(model, seed=seed))
    for name, seed in (("helpful", 3), ("harm", 4)):
        state = random_hf_state(model, seed=seed)
        state.pop("lm_head.weight")
        gen = torch.Generator().manual_seed(seed)
        state["score.weight"] = torch.randn(1, model.hidden_size, generator=gen)
        paths[name] = os.path.join(root, name)
        save_hf_checkpoint(paths[name], model, state)
    return paths


def _cfg(paths: dict[str, str]) -> EvalRunConfig:
    return config_from_dict(
        {
            "model": MODEL,
            "policy": paths["policy"],
            "baseline": paths["baseline"],
            "scorers": [
                {"path": paths["helpful"], "kind": "reward"},
                {"path": paths["harm"], "kind": "cost"},
            ],
            "generation": {"max_new_tokens": 8, "engine": {"cache_budget_bytes": 4 << 20}},
            "data": {"max_prompt_length": 24},
            "eval": {"prompts": 8, "samples_per_prompt": 2, "micro_batch_size_per_rank": 3},
        },
        EvalRunConfig,
    )


def _eval(rank, world, cfg, out_dir):
    from hpc_rlhf.trainer.policy_eval import run_eval

    return run_eval(cfg, out_dir)


def _hf_scores(path: str, rows: list[dict]) -> list[float]:
    from transformers import LlamaForSequenceClassification

    model = LlamaForSequenceClassification.from_pretrained(path).double().eval()
    with torch.no_grad():
        return [
            float(model(torch.tensor([r["prompt_ids"] + r["response_ids"]])).logits[0, 0])
            for r in rows
        ]


@pytest.mark.parametrize("world", [1, 2], ids=["1proc", "dp2"])
def test_eval_scores_and_summary_match_transformers(tmp_path, world):
    from tests.dist import run_world

    paths = _write_models(str(tmp_path / "models"))
    out = str(tmp_path / "out")
    results = run_world(_eval, world, _cfg(paths), out)[0]
    rows = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    assert json.load(open(os.path.join(out, "eval.json"))) == results
    by_policy = {p: [r for r in rows if r["policy"] == p] for p in ("policy", "baseline")}
    assert all(len(v) == 16 for v in by_policy.values())
    hf = {
        (p, s): _hf_scores(paths[s], by_policy[p]) for p in by_policy for s in ("helpful", "harm")
    }
    for (policy, scorer), want in hf.items():
        ours = [r["scores"][scorer] for r in by_policy[policy]]
        assert ours == pytest.approx(want, rel=1e-4, abs=1e-4), (policy, scorer)
    for scorer, kind in (("helpful", "reward"), ("harm", "cost")):
        mine, theirs = hf[("policy", scorer)], hf[("baseline", scorer)]
        m = results["policy"][scorer]
        mean = sum(mine) / len(mine)
        assert m["mean"] == pytest.approx(mean, abs=1e-4)
        std = math.sqrt(sum((x - mean) ** 2 for x in mine) / len(mine))
        assert m["std"] == pytest.approx(std, abs=1e-4)
        wins = [(a > b) if kind == "reward" else (a < b) for a, b in zip(mine, theirs)]
        assert m["win_rate"] == pytest.approx(sum(wins) / len(wins))
        if kind == "cost":
            assert m["unsafe_fraction"] == pytest.approx(sum(x > 0 for x in mine) / len(mine))
    assert "win_rate" not in results["baseline"]["helpful"]
    # different policies answer differently (the comparison is not of identical samples)
    assert [r["response_ids"] for r in by_policy["policy"]] != [
        r["response_ids"] for r in by_policy["baseline"]
    ]
