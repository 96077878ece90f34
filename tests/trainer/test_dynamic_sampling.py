"""DAPO's dynamic sampling and the verifiable toy task.

The search (``trainer.dynamic_sampling.fill_batch``) on scripted rounds: it keeps the groups
whose rewards differ in the order sampled, stops once the batch is full, and after its bound
completes the batch with equal-reward groups and a warning naming the counts. In the trainer,
DAPO (clip-higher, token-level loss, dynamic sampling) and GSPO learn the verifiable toy task
(each prompt names a word, its reference ``answer``; reward: the fraction of response tokens
that are that word) at 1 process and TP=2 x DP=2, and a run resumed from a checkpoint draws
what the uninterrupted one drew."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from hpc_rlhf.data.prompts import default_prompts_path
from hpc_rlhf.trainer.dynamic_sampling import (
    SampledGroups,
    concat_rollouts,
    fill_batch,
    group_rows,
    select_groups,
    varied_groups,
)
from hpc_rlhf.trainer.experience import Rollout
from tests.dist import run_world
from tests.trainer.test_ppo import _learned, _run, make_cfg, resumed_and_uninterrupted

REPEAT_PROMPTS = os.path.join(os.path.dirname(default_prompts_path()), "tiny_repeat_prompts.jsonl")


def _rollout(n_prompts: int, n: int, tag: str) -> Rollout:
    """``n`` samples per prompt; sample ``j`` of prompt ``i`` answers ``[i, j]``."""
    rows = [(i, j) for i in range(n_prompts) for j in range(n)]
    return Rollout(
        prompt_ids=[[100 + i] for i, _ in rows],
        response_ids=[[i, j] for i, j in rows],
        response_logprobs=[[0.0, 0.0] for _ in rows],
        finish_reasons=["stop"] * len(rows),
        prompt_index=[i for i, _ in rows],
        unsafe_prompt=[i % 2 == 1 for i, _ in rows],
        references=[{"answer": f"{tag}{i}"} for i, _ in rows],
    )


def _scripted(patterns: list[list[bool]], n: int = 2):
    """A ``sample_round`` whose round ``k`` has one group per entry of ``patterns[k]``:
    varied groups score ``[0, 1]``, equal ones ``[k, k]``."""

    def sample_round(k: int) -> SampledGroups:
        rollout = _rollout(len(patterns[k]), n, tag=f"r{k}p")
        scores = [[0.0, 1.0] if v else [float(k)] * n for v in patterns[k]]
        score_B = torch.tensor([s for group in scores for s in group])
        groups = group_rows(rollout)
        return SampledGroups(rollout, score_B, groups, varied_groups(score_B, groups))

    return sample_round


def test_groups_vary_only_when_their_scores_differ():
    score_B = torch.tensor([1.0, 1.0, 0.0, 0.5, 2.0])
    assert varied_groups(score_B, [[0, 1], [2, 3], [4]]) == [False, True, False]


def test_select_and_concat_keep_every_field_in_group_order():
    a, b = _rollout(3, 2, "a"), _rollout(2, 2, "b")
    picked = select_groups(a, [[4, 5], [0, 1]])
    assert picked.response_ids == [[2, 0], [2, 1], [0, 0], [0, 1]]
    assert picked.prompt_index == [0, 0, 1, 1]
    assert picked.references == [{"answer": "a2"}] * 2 + [{"answer": "a0"}] * 2
    assert picked.unsafe_prompt == [False, False, False, False]
    both = concat_rollouts([picked, b])
    assert both.prompt_index == [0, 0, 1, 1, 2, 2, 3, 3]
    assert both.prompt_ids == [[102], [102], [100], [100], [100], [100], [101], [101]]
    assert [r["answer"] for r in both.references] == ["a2"] * 2 + ["a0"] * 2 + ["b0"] * 2 + [
        "b1"
    ] * 2
    assert both.unsafe_prompt == [False] * 6 + [True] * 2


def test_fill_batch_keeps_varied_groups_in_order_until_full():
    patterns = [[True, False, False, True], [False, True, True, True]]
    rollout, score_B, metrics = fill_batch(_scripted(patterns), 3, 5, None)
    # round 0's groups 0 and 3, then round 1's group 1 (its groups 2 and 3 are not needed)
    assert [r["answer"] for r in rollout.references[::2]] == ["r0p0", "r0p3", "r1p1"]
    assert rollout.prompt_index == [0, 0, 1, 1, 2, 2]
    assert score_B.tolist() == [0.0, 1.0] * 3
    assert metrics == {
        "dynamic_sampling_rounds": 2.0,
        "dynamic_sampling_kept_fraction": 3 / 8,
        "dynamic_sampling_filled_groups": 0.0,
    }


def test_fill_batch_gives_up_after_its_bound_with_a_clear_message(caplog):
    patterns = [[False, True, False], [False, False, False], [True, True, True]]
    with caplog.at_level(logging.WARNING, logger="hpc_rlhf.trainer.dynamic_sampling"):
        rollout, score_B, metrics = fill_batch(_scripted(patterns), 3, 1, None)
    # two rounds only (one extra): 1 varied group, then the first 2 equal groups sampled
    assert [r["answer"] for r in rollout.references[::2]] == ["r0p1", "r0p0", "r0p2"]
    assert score_B.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert (
        metrics["dynamic_sampling_rounds"] == 2 and metrics["dynamic_sampling_filled_groups"] == 2
    )
    message = caplog.records[-1].getMessage()
    assert "after 1 extra rounds" in message and "only 1 of 6 sampled prompt groups" in message
    assert "2 groups of equal rewards" in message and "dynamic_sampling_max_rounds" in message


def test_fill_batch_without_extra_rounds_samples_once():
    _, _, metrics = fill_batch(_scripted([[False, False]]), 2, 0, None)
    assert (
        metrics["dynamic_sampling_rounds"] == 1 and metrics["dynamic_sampling_filled_groups"] == 2
    )


# ----------------------------------------------------------------------------- trainer

VERIFIABLE = {
    "data": {"prompts": REPEAT_PROMPTS, "reference_fields": ["answer"]},
    "reward": {"rules": [{"function": "hpc_rlhf.algorithms.rule_rewards:answer_token_fraction"}]},
}
DYNAMIC = {"advantage": "grpo", "dynamic_sampling": True, "dynamic_sampling_max_rounds": 3}
DAPO = {**DYNAMIC, "clip_low": 0.2, "clip_high": 0.28}  # clip-higher; token-mean loss
GSPO = {
    **DYNAMIC,
    "policy_loss": "gspo",
    "loss_reduction": "seq_mean",
    "clip_low": 3e-4,
    "clip_high": 4e-4,
}
TP2_DP2 = {"parallel": {"tensor_model_parallel_size": 2}}


def _verifiable_cfg(ppo: dict, world: int):
    ppo = {"steps": 20, **ppo, **({"micro_batch_size_per_rank": 4} if world == 4 else {})}
    return make_cfg(ppo=ppo, **VERIFIABLE, **(TP2_DP2 if world == 4 else {}))


@pytest.mark.parametrize(
    "world,ppo",
    [(1, DAPO), (4, DAPO), (1, GSPO), (4, GSPO)],
    ids=["dapo_1proc", "dapo_tp2_dp2", "gspo_1proc", "gspo_tp2_dp2"],
)
def test_the_verifiable_toy_task_is_learned(world, ppo):
    """A random policy names the word in ~1 of 512 tokens: most groups score all zero and
    are dropped, so the first steps need extra rounds (and fill the rest)."""
    history = run_world(_run, world, _verifiable_cfg(ppo, world))[0]
    start, end = _learned(history)
    assert end > start + 0.1 and end > 3 * start, f"reward {start:.3f} -> {end:.3f}"
    first = history[0]
    assert first["dynamic_sampling_rounds"] > 1 and first["dynamic_sampling_kept_fraction"] < 1
    assert all(1 <= h["dynamic_sampling_rounds"] <= 4 for h in history)


def test_a_resumed_dynamic_sampling_run_draws_what_the_uninterrupted_one_drew(tmp_path):
    full = resumed_and_uninterrupted(
        tmp_path, lambda ppo: make_cfg(ppo={**DAPO, **ppo}, **VERIFIABLE)
    )
    assert any(step["dynamic_sampling_rounds"] > 1 for step in full)
