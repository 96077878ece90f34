"""DAPO's dynamic sampling: a group of responses whose rewards are all equal has zero
group-relative advantage and teaches nothing, so its prompt is dropped and more prompts are
sampled until every data-parallel rank holds its share of groups whose rewards differ.

``fill_batch`` runs the rounds: each draws the next global batch of prompts (every rank
draws, so the data position stays the same on all of them and a resumed run draws alike),
generates and scores them with the reward sources only, and keeps the groups with varied
rewards. After ``max_extra_rounds`` extra rounds without a full batch it gives up: the batch
is completed with equal-reward groups (zero advantage under GRPO-style estimators), a
warning names how many, and the step's metrics count them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpc_rlhf.parallel.comm import group_max, group_sum
from hpc_rlhf.trainer.experience import Rollout

logger = logging.getLogger(__name__)


@dataclass
class SampledGroups:
    """Groups of one round: their rollout and reward scores, and which groups vary."""

    rollout: Rollout
    score_B: torch.Tensor
    groups: list[list[int]]  # rows of each prompt's group
    varied: list[bool]  # the group's rewards are not all equal


def group_rows(rollout: Rollout) -> list[list[int]]:
    """The rows of each prompt's group, in prompt order."""
    n_prompts = max(rollout.prompt_index, default=-1) + 1
    return rollout.rows_by_prompt(n_prompts)


def varied_groups(score_B: torch.Tensor, groups: list[list[int]]) -> list[bool]:
    """Whether each group's scores differ (a group of equal scores, e.g. all solved or all
    failed, has zero advantage under group-relative estimators)."""
    return [bool(len(g) > 1 and (score_B[g] != score_B[g[0]]).any()) for g in groups]


def select_groups(rollout: Rollout, groups: list[list[int]]) -> Rollout:
    """The samples of ``groups`` (each a list of rows), prompts renumbered in that order."""
    rows = [row for g in groups for row in g]
    index = [i for i, g in enumerate(groups) for _ in g]

    def pick(values):
        return None if values is None else [values[r] for r in rows]

    return Rollout(
        prompt_ids=[rollout.prompt_ids[r] for r in rows],
        response_ids=[rollout.response_ids[r] for r in rows],
        response_logprobs=[rollout.response_logprobs[r] for r in rows],
        finish_reasons=[rollout.finish_reasons[r] for r in rows],
        prompt_index=index,
        unsafe_prompt=pick(rollout.unsafe_prompt),
        references=pick(rollout.references),
    )


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """One rollout of ``parts`` in order, prompt indices offset to stay distinct."""
    out = Rollout([], [], [], [], [])
    offset = 0
    tagged = all(p.unsafe_prompt is not None for p in parts)
    referenced = all(p.references is not None for p in parts)
    out.unsafe_prompt = [] if tagged else None
    out.references = [] if referenced else None
    for part in parts:
        out.prompt_ids += part.prompt_ids
        out.response_ids += part.response_ids
        out.response_logprobs += part.response_logprobs
        out.finish_reasons += part.finish_reasons
        out.prompt_index += [offset + i for i in part.prompt_index]
        offset += max(part.prompt_index, default=-1) + 1
        if out.unsafe_prompt is not None and part.unsafe_prompt is not None:
            out.unsafe_prompt += part.unsafe_prompt
        if out.references is not None and part.references is not None:
            out.references += part.references
    return out


def fill_batch(
    sample_round: Callable[[int], SampledGroups],
    groups_per_rank: int,
    max_extra_rounds: int,
    dp_group,
) -> tuple[Rollout, torch.Tensor, dict[str, float]]:
    """This rank's ``groups_per_rank`` groups with varied rewards (rollout and scores),
    sampling ``sample_round(round)`` until every DP rank has its share or the extra rounds
    run out, and the metrics of the search (rounds, groups kept of groups sampled, groups
    of equal rewards filled in)."""
    kept: list[tuple[SampledGroups, list[int]]] = []  # (round, its groups kept)
    spare: list[tuple[SampledGroups, list[int]]] = []  # equal-reward groups, in order
    n_kept = n_sampled = rounds = 0
    while True:
        sampled = sample_round(rounds)
        rounds += 1
        room = groups_per_rank - n_kept
        take = [i for i, v in enumerate(sampled.varied) if v][:room]
        kept.append((sampled, take))
        spare.append((sampled, [i for i, v in enumerate(sampled.varied) if not v]))
        n_kept += len(take)
        n_sampled += len(sampled.groups)
        missing = torch.tensor([float(groups_per_rank - n_kept)])
        if float(group_max(missing, dp_group)) == 0 or rounds > max_extra_rounds:
            break
    filled = groups_per_rank - n_kept
    if filled:
        kept += _fill_from(spare, filled)
    parts = [(s, g) for s, g in kept if g]
    rollout = concat_rollouts(
        [select_groups(s.rollout, [s.groups[i] for i in g]) for s, g in parts]
    )
    score_B = torch.cat([s.score_B[[r for i in g for r in s.groups[i]]] for s, g in parts])
    return rollout, score_B, _metrics(rounds, n_kept, n_sampled, filled, max_extra_rounds, dp_group)


def _fill_from(spare, count: int) -> list[tuple[SampledGroups, list[int]]]:
    """The first ``count`` equal-reward groups of the rounds."""
    out = []
    for sampled, indices in spare:
        out.append((sampled, indices[:count]))
        count -= len(out[-1][1])
    return out


def _metrics(rounds, n_kept, n_sampled, filled, max_extra_rounds, dp_group) -> dict[str, float]:
    """The search's metrics over every DP rank; a warning when groups had to be filled."""
    totals = torch.tensor([float(n_kept), float(n_sampled), float(filled)], dtype=torch.float64)
    group_sum(totals, dp_group)
    if totals[2] > 0:
        logger.warning(
            "ppo.dynamic_sampling: after %d extra rounds (ppo.dynamic_sampling_max_rounds) "
            "only %d of %d sampled prompt groups had differing rewards; %d groups of equal "
            "rewards (zero advantage) complete the batch. Raise the bound, or check that the "
            "rewards can vary (a task all solved or all failed)",
            max_extra_rounds,
            int(totals[0]),
            int(totals[1]),
            int(totals[2]),
        )
    return {
        "dynamic_sampling_rounds": float(rounds),
        "dynamic_sampling_kept_fraction": float(totals[0] / totals[1].clamp(min=1.0)),
        "dynamic_sampling_filled_groups": float(totals[2]),
    }
