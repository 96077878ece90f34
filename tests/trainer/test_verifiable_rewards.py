"""Rule rewards that read the prompt's references (``data.reference_fields``): the rule's
arguments are checked before any model is built, per-sample and batched rules receive each
sample's references, the model-parallel group's first rank runs the rules and hands its
scores (or its error) to the others, the math verifier scores a rollout end to end, and a
PPO run at TP=2 scores with the references of the prompts it drew."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hpc_rlhf.algorithms.rule_rewards import RuleRewardError, check_rule_arguments
from hpc_rlhf.config import InputError, PPORunConfig, config_from_dict
from hpc_rlhf.data.prompts import default_prompts_path
from hpc_rlhf.trainer.experience import Rollout
from hpc_rlhf.trainer.score_sources import ScoreSources, load_rules_first
from tests.dist import run_world
from tests.trainer.test_ppo import _run, make_cfg

GSM8K = os.path.join(os.path.dirname(default_prompts_path()), "tiny_gsm8k.jsonl")


def _fn(prompt_ids, response_ids, tokenizer, answer, timeout=2.0):
    return 0.0


def _any(prompt_ids, response_ids, tokenizer, **kwargs):
    return 0.0


@pytest.mark.parametrize(
    "fn,kwargs,fields,message",
    [
        (_fn, {}, (), r"rule reward 'm:f' needs \['answer'\]: give them in the rule's kwargs"),
        (_fn, {"answer": "1", "tests": []}, (), r"takes no argument \['tests'\]"),
        (_fn, {}, ("answer", "tests"), r"takes no argument \['tests'\]"),
        (_fn, {"answer": "1"}, ("answer",), r"\['answer'\] given both in its kwargs and data"),
    ],
)
def test_a_rule_that_cannot_be_called_is_named_before_any_step(fn, kwargs, fields, message):
    with pytest.raises(InputError, match=message):
        check_rule_arguments("m:f", fn, kwargs, fields)


def test_rule_arguments_that_fit_pass():
    check_rule_arguments("m:f", _fn, {"timeout": 1.0}, ("answer",))
    check_rule_arguments("m:f", _any, {"anything": 1}, ("answer", "tests"))


def test_a_ppo_config_whose_rule_lacks_its_reference_fails_at_once():
    rule = {"function": "hpc_rlhf.rewards.math_answers:answer_match"}
    cfg = config_from_dict({"reward": {"rules": [rule]}}, PPORunConfig)
    with pytest.raises(InputError, match=r"answer_match' needs \['answer'\]"):
        load_rules_first(cfg)
    cfg = config_from_dict(
        {"reward": {"rules": [rule]}, "data": {"preset": "gsm8k", "prompts": GSM8K}}, PPORunConfig
    )
    load_rules_first(cfg)  # the preset fills data.reference_fields: [answer]


ROLLOUT = Rollout(
    prompt_ids=[[1], [1], [2], [2]],
    response_ids=[[5], [5, 6], [7, 8, 9], [7]],
    response_logprobs=[[0.0]] * 4,
    finish_reasons=["stop"] * 4,
    prompt_index=[0, 0, 1, 1],
    references=[{"answer": "ab"}] * 2 + [{"answer": "abcd"}] * 2,
)


def _sources(*rules: dict, mp_group=None) -> ScoreSources:
    section = config_from_dict({"reward": {"rules": list(rules)}}, PPORunConfig).reward
    return ScoreSources(section, "reward", [], [], mp_group)


def test_per_sample_and_batched_rules_read_each_samples_references():
    sources = _sources(
        {"function": "tests.trainer.rules:answer_length", "weight": 1.0},
        {"function": "tests.trainer.rules:batched_answer_lengths", "kwargs": {"scale": 10.0}},
    )
    scores_RB = sources.rule_scores(ROLLOUT, None)
    assert scores_RB.tolist() == [[2, 2, 4, 4], [21, 22, 43, 41]]
    assert sources.combined(ROLLOUT, [], None, None).tolist() == [23, 24, 47, 45]


def test_a_batched_rule_returning_the_wrong_count_is_named():
    sources = _sources(
        {"function": "tests.trainer.rules:batched_answer_lengths", "kwargs": {"short": True}}
    )
    with pytest.raises(RuleRewardError, match=r"batched_answer_lengths' returned 3 scores for 4"):
        sources.rule_scores(ROLLOUT, None)


class _Words:
    """A stand-in tokenizer: ids index a word list."""

    WORDS = ["", "The", "answer", "is", r"\boxed{1/2}", "0.5", "7", "nothing", r"\frac{2}{4}"]

    def decode(self, ids):
        return " ".join(self.WORDS[i] for i in ids)


def test_the_math_verifier_scores_a_rollout_with_its_references():
    from hpc_rlhf.rewards.math_answers import shutdown_worker

    rollout = Rollout(
        prompt_ids=[[1]] * 5,
        response_ids=[[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 6], [7], [1, 2, 3, 8]],
        response_logprobs=[[0.0]] * 5,
        finish_reasons=["stop"] * 5,
        prompt_index=[0, 0, 0, 0, 1],
        references=[{"answer": r"\frac{1}{2}"}] * 4 + [{"answer": "#### 0.5"}],
    )
    rule = {
        "function": "hpc_rlhf.rewards.math_answers:answer_match",
        "kwargs": {"format_score": 0.1},
    }
    try:
        scores = _sources(rule).rule_scores(rollout, _Words())[0].tolist()
    finally:
        shutdown_worker()
    # boxed 1/2, plain 0.5, a wrong number (format score), no answer, 2/4 against "#### 0.5"
    assert scores == pytest.approx([1.0, 1.0, 0.1, 0.0, 1.0])


def _rules_in_a_world(rank, world, rules):
    import torch.distributed as dist

    sources = _sources(*rules, mp_group=dist.group.WORLD)
    try:
        return sources.rule_scores(ROLLOUT, None).tolist()
    except ValueError as err:
        return f"error: {err}"


def test_the_first_model_parallel_rank_runs_the_rules_for_its_group():
    rank_rule = [{"function": "tests.trainer.rules:global_rank"}]
    assert run_world(_rules_in_a_world, 2, rank_rule) == [[[0.0] * 4]] * 2
    failing = [{"function": "tests.trainer.rules:fail_on_first_rank"}]
    assert run_world(_rules_in_a_world, 2, failing) == ["error: rule failed on rank 0"] * 2


def test_a_tp2_run_scores_each_prompt_with_its_own_reference():
    """Every prompt of the shipped GSM8K-layout set, 4 samples each, once (no shuffle): the
    mean reward is the mean length of their reference answers, on both TP ranks."""
    cfg = make_cfg(
        ppo={"steps": 1, "rollout_batch_size": 16, "n_samples_per_prompt": 2},
        data={"prompts": GSM8K, "preset": "gsm8k", "shuffle": False},
        reward={"rules": [{"function": "tests.trainer.rules:answer_length"}]},
        parallel={"tensor_model_parallel_size": 2},
    )
    histories = run_world(_run, 2, cfg)
    answers = [json.loads(line)["answer"].rsplit("#### ", 1)[1] for line in open(GSM8K)]
    lengths = [len(a.replace(",", "")) for a in answers]
    for history in histories:
        assert history[0]["reward_mean"] == pytest.approx(sum(lengths) / len(lengths))
        assert history[0]["reward_std"] == pytest.approx(
            float(torch.tensor(lengths, dtype=torch.float64).repeat_interleave(2).std())
        )


class _Texts:
    """A stand-in tokenizer: response id ``i`` decodes to ``texts[i]``."""

    def __init__(self, texts: list[str]):
        self.texts = texts

    def decode(self, ids):
        return self.texts[ids[0]]


def test_the_code_verifier_passes_the_shipped_references_and_fails_wrong_code():
    """The shipped MBPP-layout set's reference code (fenced, as a model would answer)
    passes all its tests; a wrong body passes only the tests it happens to satisfy."""
    from hpc_rlhf.data.prompts import read_prompt_rows

    path = os.path.join(os.path.dirname(default_prompts_path()), "tiny_mbpp.jsonl")
    rows = [json.loads(line) for line in open(path)]
    refs = read_prompt_rows(path, reference_fields=("tests",), preset="mbpp")
    texts = [f"Here:\n```python\n{row['code']}```\n" for row in rows]
    texts.append("```python\ndef add(a, b):\n    return a - b\n```")
    rollout = Rollout(
        prompt_ids=[[1]] * (len(rows) + 1),
        response_ids=[[i] for i in range(len(texts))],
        response_logprobs=[[0.0]] * len(texts),
        finish_reasons=["stop"] * len(texts),
        prompt_index=list(range(len(texts))),
        references=[r.references for r in refs] + [refs[0].references],
    )
    rule = {
        "function": "hpc_rlhf.rewards.code_tests:pass_fraction",
        "kwargs": {"timeout": 5.0, "max_workers": 2},
    }
    scores = _sources(rule).rule_scores(rollout, _Texts(texts))[0].tolist()
    # add(a, b) = a - b: add(1, 2) == -1, add(-3, 3) == -6, add(10, 5) == 5: all wrong
    assert scores == [1.0] * len(rows) + [0.0]
