"""Typed rollout/experience batches.

Legend:
  B   samples (prompt x sample) on this data-parallel rank
  S   sequence positions: prompt + response, right-padded to a common length
  Per-token RL quantities live on *action positions*: index ``t`` holds the quantity of
  emitting token ``t + 1`` (log-probs of ``labels_BS[:, t]``, the critic's value of the
  state before it, its reward). ``action_mask_BS`` marks the positions whose label is a
  response token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from hpc_rlhf.parallel.state import round_up
from hpc_rlhf.trainer.losses import RolloutMicroBatch


@dataclass
class Rollout:
    """Generated samples of one step: prompt and response token ids, engine log-probs."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    response_logprobs: list[list[float]]
    finish_reasons: list[str | None]  # "stop" | "length" (generate() returns finished ones)
    prompt_index: list[int]  # which prompt of this rank's batch each sample answers
    unsafe_prompt: list[bool] | None = None  # per sample: its prompt is tagged unsafe
    # per sample: its prompt row's data.reference_fields (the rule rewards' keyword args)
    references: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.response_ids)

    def rows_by_prompt(self, n_prompts: int) -> list[list[int]]:
        """The sample rows answering each of this rank's ``n_prompts`` prompts, in order."""
        rows: list[list[int]] = [[] for _ in range(n_prompts)]
        for b, p in enumerate(self.prompt_index):
            rows[p].append(b)
        return rows


@dataclass
class ExperienceBatch:
    """Everything the PPO update needs, one row per sample (see the legend above)."""

    input_ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    labels_BS: torch.Tensor
    action_mask_BS: torch.Tensor
    old_logp_BS: torch.Tensor
    ref_logp_BS: torch.Tensor | None = None
    values_BS: torch.Tensor | None = None
    score_B: torch.Tensor | None = None
    rewards_BS: torch.Tensor | None = None
    kl_BS: torch.Tensor | None = None
    advantages_BS: torch.Tensor | None = None
    returns_BS: torch.Tensor | None = None
    # PPO-Lagrangian: end costs, the cost critic's values, KL-shared token costs, returns
    cost_B: torch.Tensor | None = None
    cost_values_BS: torch.Tensor | None = None
    costs_BS: torch.Tensor | None = None
    cost_returns_BS: torch.Tensor | None = None
    # ppo.tis_cap: min(pi_trainer / pi_engine, cap) per action token
    tis_weights_BS: torch.Tensor | None = None
    mismatch: dict[str, float] | None = None  # with them: the train/inference mismatch
    truncated_B: torch.Tensor | None = None  # ppo.overlong_filter: cut at max_new_tokens

    @property
    def size(self) -> int:
        return self.input_ids_BS.shape[0]

    def rows(self, index: torch.Tensor) -> ExperienceBatch:
        """The samples at ``index`` (a 1-D index tensor)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values[f.name] = value[index] if isinstance(value, torch.Tensor) else value
        return ExperienceBatch(**values)

    def length_order(self, by_prompt: bool = False) -> torch.Tensor:
        """Row indices sorted by real length (microbatches of similar lengths pad less).
        ``by_prompt``: the rows answering one prompt stay consecutive (so a packed
        micro-batch runs their shared prompt once, ``models.packing``), prompts in the
        order of their longest row, rows by length within one."""
        lengths_B = self.attention_mask_BS.sum(dim=1)
        if not by_prompt:
            return torch.argsort(lengths_B, stable=True)
        # the prompt is what precedes the first action position's label
        prompt_B = (self.action_mask_BS.long().cumsum(dim=1) == 0).sum(dim=1) + 1
        prompt_B = torch.minimum(prompt_B, lengths_B)
        groups: dict[tuple[int, ...], list[int]] = {}
        for b, (ids, n) in enumerate(zip(self.input_ids_BS.tolist(), prompt_B.tolist())):
            groups.setdefault(tuple(ids[:n]), []).append(b)
        lengths = lengths_B.tolist()
        rows = [sorted(g, key=lambda b: lengths[b]) for g in groups.values()]
        rows.sort(key=lambda g: lengths[g[-1]])
        return torch.tensor([b for g in rows for b in g], dtype=torch.long)

    def microbatches(
        self, size: int, order: torch.Tensor | None = None, trim_multiple: int | None = None
    ) -> list[RolloutMicroBatch]:
        """Micro-batches of ``size`` rows (taken in ``order``, default as stored); the LM
        head runs over the action positions only (``head_mask_BS``).

        With ``trim_multiple``, each micro-batch drops the padding columns after its longest
        row (length rounded up to the multiple): the work follows the real lengths.
        """
        order = torch.arange(self.size) if order is None else order
        out = []
        for start in range(0, self.size, size):
            rows = order[start : start + size]
            action_mask_BS = self.action_mask_BS[rows]
            mb = RolloutMicroBatch(
                input_ids_BS=self.input_ids_BS[rows],
                attention_mask_BS=self.attention_mask_BS[rows],
                labels_BS=self.labels_BS[rows],
                loss_mask_BS=action_mask_BS,
                head_mask_BS=action_mask_BS,
                old_logp_BS=self.old_logp_BS[rows],
                ref_logp_BS=_rows_of(self.ref_logp_BS, rows),
                advantages_BS=_rows_of(self.advantages_BS, rows),
                returns_BS=_rows_of(self.returns_BS, rows),
                values_BS=_rows_of(self.values_BS, rows),
                cost_values_BS=_rows_of(self.cost_values_BS, rows),
                cost_returns_BS=_rows_of(self.cost_returns_BS, rows),
            )
            if trim_multiple:
                longest = int(mb.attention_mask_BS.sum(dim=1).max())
                S = min(round_up(longest, trim_multiple), self.input_ids_BS.shape[1])
                mb = mb.truncated(S)
            out.append(mb)
        return out

    def gather_rows(self, parts: list[torch.Tensor], order: torch.Tensor | None = None):
        """Inverse of ``microbatches``: per-microbatch ``[b, S_i]`` results -> ``[B, S]``."""
        order = torch.arange(self.size) if order is None else order
        out_BS = parts[0].new_zeros(self.input_ids_BS.shape)
        start = 0
        for part in parts:
            out_BS[order[start : start + part.shape[0]], : part.shape[1]] = part
            start += part.shape[0]
        return out_BS


def _rows_of(x_BS: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if x_BS is None else x_BS[rows]


def build_experience(rollout: Rollout, pad_id: int, multiple_of: int = 1) -> ExperienceBatch:
    """Right-padded sequences and action masks from a rollout, with the engine's log-probs
    placed on the action positions. ``S`` is rounded up to ``multiple_of`` (sequence
    parallelism needs ``S`` divisible by TP)."""
    lengths = [len(p) + len(r) for p, r in zip(rollout.prompt_ids, rollout.response_ids)]
    S = round_up(max(lengths), multiple_of)
    B = len(rollout)
    input_ids_BS = torch.full((B, S), pad_id, dtype=torch.long)
    attention_mask_BS = torch.zeros(B, S, dtype=torch.bool)
    action_mask_BS = torch.zeros(B, S, dtype=torch.bool)
    old_logp_BS = torch.zeros(B, S)
    for b, (prompt, response) in enumerate(zip(rollout.prompt_ids, rollout.response_ids)):
        P, R = len(prompt), len(response)
        input_ids_BS[b, : P + R] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask_BS[b, : P + R] = True
        action_mask_BS[b, P - 1 : P + R - 1] = True
        if R:
            old_logp_BS[b, P - 1 : P + R - 1] = torch.tensor(rollout.response_logprobs[b])
    labels_BS = torch.full_like(input_ids_BS, pad_id)
    labels_BS[:, :-1] = input_ids_BS[:, 1:]
    return ExperienceBatch(
        input_ids_BS=input_ids_BS,
        attention_mask_BS=attention_mask_BS,
        labels_BS=labels_BS,
        action_mask_BS=action_mask_BS,
        old_logp_BS=old_logp_BS,
    )


def generate_rollout(
    engine,
    tokenizer,
    prompt_ids: list[list[int]],
    generation,
    n: int,
    seed: int,
    version: int | None,
    max_new_tokens: list[int] | None = None,
) -> Rollout:
    """``n`` sampled responses per prompt from ``engine`` with the sampling settings of
    ``generation`` (a ``config.RolloutConfig``), in (prompt, sample) order.
    ``max_new_tokens`` optionally limits each prompt's responses."""
    from hpc_rlhf.inference.sampling import SamplingParams

    sampling = SamplingParams(
        temperature=generation.temperature,
        top_k=generation.top_k,
        top_p=generation.top_p,
        max_new_tokens=generation.max_new_tokens,
        stop_token_ids=tuple(tokenizer.stop_ids) if generation.stop_at_eos else (),
        n=n,
        seed=seed,
    )
    completions = engine.generate(prompt_ids, sampling, version, max_new_tokens)
    completions = sorted(completions, key=lambda c: (c.prompt_index, c.sample_index))
    return Rollout(
        prompt_ids=[prompt_ids[c.prompt_index] for c in completions],
        response_ids=[list(c.token_ids) for c in completions],
        response_logprobs=[list(c.logprobs) for c in completions],
        finish_reasons=[c.finish_reason for c in completions],
        prompt_index=[c.prompt_index for c in completions],
    )
