"""Bad inputs fail before any training step, with errors naming the rule, file or key:
rule rewards that do not import or return non-numbers, NaN/inf scores, vocabularies that do
not match the actor's, malformed HF checkpoints."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from hpc_rlhf.algorithms.rule_rewards import load_rule, rule_score
from hpc_rlhf.config import PPORunConfig, config_from_dict
from hpc_rlhf.models.hf_names import ConversionError
from hpc_rlhf.trainer.experience import Rollout
from hpc_rlhf.trainer.ppo import NonFiniteRewardError, PPOTrainer
from hpc_rlhf.trainer.score_sources import ScoreSources
from hpc_rlhf.trainer.trainable_model import NonFiniteLossError

HERE = "tests.test_bad_inputs"


# rule rewards used below (module:function names point here)
def returns_none(prompt_ids, response_ids, tokenizer):
    return None


def returns_text(prompt_ids, response_ids, tokenizer):
    return "0.5"


def returns_vector(prompt_ids, response_ids, tokenizer):
    return torch.tensor([0.5, 0.5])


def nan_for_long(prompt_ids, response_ids, tokenizer, limit: int = 2):
    return float("nan") if len(response_ids) > limit else 1.0


def inf_always(prompt_ids, response_ids, tokenizer):
    return float("inf")


def length(prompt_ids, response_ids, tokenizer):
    return len(response_ids)


# ----------------------------------------------------------------------------- loading rules


def test_rules_that_do_not_import_name_the_rule(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"rule reward 'no_such_mod:f': cannot import"):
        load_rule("no_such_mod:f")
    (tmp_path / "broken_rule_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ValueError, match=r"'broken_rule_mod:f': cannot import .*RuntimeError: boom at import"
    ):
        load_rule("broken_rule_mod:f")
    with pytest.raises(ValueError, match=rf"'{HERE}:nope': {HERE} has no function 'nope'"):
        load_rule(f"{HERE}:nope")
    with pytest.raises(ValueError, match="must be 'module:function'"):
        load_rule("just_a_name")


def test_trainer_loads_rules_before_building_any_model():
    """A bad rule fails at once, not after minutes of model loading (the trainer raises
    before it touches its (here absent) parallel state or builds a model)."""
    cfg = config_from_dict({"reward": {"rules": [{"function": "no_such_mod:f"}]}}, PPORunConfig)
    with pytest.raises(ValueError, match=r"rule reward 'no_such_mod:f': cannot import"):
        PPOTrainer(cfg, None, None, None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    "value,expected", [(1, 1.0), (True, 1.0), (np.float32(0.25), 0.25), (torch.tensor([0.5]), 0.5)]
)
def test_rule_numbers_of_every_kind_are_accepted(value, expected):
    assert rule_score("m:f", value) == expected


class _Scores:
    """The reward sources of a config without models (their scores are given), one process."""

    def __init__(self, rules: list[dict], models: list[dict] = ()):
        cfg = config_from_dict({"reward": {"rules": rules, "models": list(models)}}, PPORunConfig)
        self.sources = ScoreSources(cfg.reward, "reward", [], [None] * len(models))

    def _scores(self, rollout, model_scores):
        return self.sources.combined(rollout, model_scores, None, None)


def _trainer(rules: list[dict], models: list[dict] = ()) -> _Scores:
    return _Scores(rules, models)


ROLLOUT = Rollout(
    prompt_ids=[[1, 2]] * 4,
    response_ids=[[5], [5, 6], [5, 6, 7], [5, 6, 7, 8]],
    response_logprobs=[[0.0]] * 4,
    finish_reasons=["length"] * 4,
    prompt_index=[0, 0, 1, 1],
)


@pytest.mark.parametrize(
    "name,shown",
    [
        ("returns_none", r"returned NoneType None"),
        ("returns_text", r"returned str '0.5'"),
        ("returns_vector", r"returned Tensor tensor\(\[0.5000, 0.5000\]\)"),
    ],
)
def test_a_rule_returning_a_non_number_is_named_with_the_type(name, shown):
    trainer = _trainer([{"function": f"{HERE}:{name}"}])
    with pytest.raises(TypeError, match=rf"rule reward '{HERE}:{name}' {shown}: expected a number"):
        trainer._scores(ROLLOUT, [])


def test_nan_or_inf_scores_name_their_source_and_count_before_the_loss():
    trainer = _trainer(
        [
            {"function": f"{HERE}:length", "weight": 0.5},
            {"function": f"{HERE}:nan_for_long", "kwargs": {"limit": 2}},
        ]
    )
    with pytest.raises(NonFiniteRewardError) as info:
        trainer._scores(ROLLOUT, [])
    assert isinstance(info.value, NonFiniteLossError)  # run_ppo's handling applies
    assert str(info.value) == (
        f"non-finite reward scores: reward rule {HERE}:nan_for_long gave NaN/inf for 2 of 4 samples"
    )
    rm = {"path": "/ckpt/rm-helpful", "weight": 1.0}
    trainer = _trainer([{"function": f"{HERE}:inf_always"}], [rm])
    model_scores = [torch.tensor([0.1, float("nan"), 0.3, 0.4])]
    with pytest.raises(
        NonFiniteRewardError,
        match=r"reward model /ckpt/rm-helpful gave NaN/inf for 1 of 4 samples; reward rule "
        rf"{HERE}:inf_always gave NaN/inf for 4 of 4 samples",
    ):
        trainer._scores(ROLLOUT, model_scores)
    trainer = _trainer([{"function": f"{HERE}:length", "weight": 0.5}], [rm])
    scores = trainer._scores(ROLLOUT, [torch.tensor([1.0, 2.0, 3.0, 4.0])])
    assert scores.tolist() == [1.5, 3.0, 4.5, 6.0]


# ----------------------------------------------------------------------------- vocabularies


def _write_hf_config(path, model_cfg) -> str:
    from hpc_rlhf.models.hf_config import hf_config_from_model

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(hf_config_from_model(model_cfg, "score"), fh)
    return str(path)


def test_reward_model_or_tokenizer_vocabulary_smaller_than_the_actor_is_named(tmp_path):
    from hpc_rlhf.data.tokenizer import load_tokenizer
    from hpc_rlhf.trainer.ppo_setup import check_vocabularies

    tok = load_tokenizer()  # 512 tokens
    cfg = config_from_dict(
        {"model": {"vocab_size": 512}, "reward": {"rules": [{"function": f"{HERE}:length"}]}},
        PPORunConfig,
    )
    check_vocabularies(cfg, tok)
    small = config_from_dict({"model": {"vocab_size": 256}}, PPORunConfig)
    with pytest.raises(ValueError, match=r"tokenizer .*tiny_sp.model has 512 tokens but model"):
        check_vocabularies(small, tok)
    rm_small = _write_hf_config(tmp_path / "rm_small", small.model)
    rm_same = _write_hf_config(tmp_path / "rm_same", cfg.model)

    def with_reward_model(path: str) -> PPORunConfig:
        return config_from_dict(
            {"model": {"vocab_size": 512}, "reward": {"models": [{"path": path}]}}, PPORunConfig
        )

    check_vocabularies(with_reward_model(rm_same), tok)
    with pytest.raises(
        ValueError, match=rf"reward model {rm_small}: vocab_size=256 in its config.json"
    ):
        check_vocabularies(with_reward_model(rm_small), tok)


# ----------------------------------------------------------------------------- HF files


def _hf_checkpoint(tmp_path) -> str:
    from hpc_rlhf.config import ModelConfig
    from hpc_rlhf.models.hf_io import save_hf_checkpoint
    from hpc_rlhf.models.init import random_hf_state

    tiny = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64)
    path = str(tmp_path / "hf")
    save_hf_checkpoint(path, tiny, random_hf_state(tiny, seed=0))
    return path


def test_malformed_hf_config_json_names_the_file(tmp_path):
    from hpc_rlhf.models.hf_io import load_hf_checkpoint

    path = _hf_checkpoint(tmp_path)
    config_path = os.path.join(path, "config.json")
    good = json.load(open(config_path))
    assert load_hf_checkpoint(path)[0].num_layers == 1
    cases = [
        ('{"model_type": "llama", ', rf"{config_path} is not valid JSON"),
        ("[1, 2]", rf"{config_path}: expected a JSON object, got list"),
        (
            json.dumps({k: v for k, v in good.items() if k != "hidden_size"}),
            rf"{config_path}: HF config field 'hidden_size' is missing",
        ),
        (
            json.dumps({**good, "vocab_size": "32000"}),
            rf"{config_path}: HF config field 'vocab_size'='32000' is not an integer",
        ),
        (
            json.dumps({**good, "num_attention_heads": 3, "head_dim": None}),
            rf"{config_path}: model.hidden_size=32 is not divisible",
        ),
    ]
    for text, match in cases:
        with open(config_path, "w") as fh:
            fh.write(text)
        with pytest.raises(ConversionError, match=match):
            load_hf_checkpoint(path)


def test_truncated_safetensors_names_the_file(tmp_path):
    from hpc_rlhf.models.hf_io import load_hf_checkpoint

    path = _hf_checkpoint(tmp_path)
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=rf"{weights} is not a readable safetensors file"):
        load_hf_checkpoint(path)
