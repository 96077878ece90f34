"""Preference data for reward models: pairs and K-wise rankings, as packed micro-batches.

A row is a pair ``{"prompt", "chosen", "rejected"[, "margin"]}`` or a ranking ``{"prompt",
"responses": [r0, r1, ...], "ranking": [best index, ..., worst index]}`` (key names from
``PreferenceDataConfig``). Each response becomes one sequence, tokenized as PPO and SFT see
it (``data.sft.conversation_tokens``: BOS, the templated prompt, the response, EOS). A
sample's K responses are forwarded once, side by side in one micro-batch, and the loss
reads all K(K-1)/2 ordered pairs from their end scores (InstructGPT), never one forward
per pair. ``margin``: a label of ``rm.margins`` (Llama-2) or a number; 0 when absent.

Rows come from a .jsonl, .json, .parquet or .arrow file (``data.sources``); with
``data.preset`` they have the layout of a public preference set (``data.presets``: its pair
follows the conversation before the responses, every turn rendered as SFT renders it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from hpc_rlhf.config import InputError, PreferenceDataConfig
from hpc_rlhf.data.presets import Turn, flag_field, preference_row, string_field
from hpc_rlhf.data.samples import SampleSet
from hpc_rlhf.data.sft import conversation_tokens
from hpc_rlhf.data.sources import read_rows
from hpc_rlhf.data.text_files import check_token_ids
from hpc_rlhf.data.tokenizer import ASSETS_DIR
from hpc_rlhf.models.runner import MicroBatch

logger = logging.getLogger(__name__)


def default_preference_path(safety: bool = False) -> str:
    """The tiny preference set shipped with the package (``tools/make_tiny_data.py``);
    ``safety``: the one with safety labels, for cost models."""
    return os.path.join(ASSETS_DIR, "tiny_safety.jsonl" if safety else "tiny_preferences.jsonl")


@dataclass(frozen=True)
class PreferenceSample:
    """One prompt's responses (full token sequences) and its ordered pairs
    ``(better index, worse index, margin)``."""

    sequences: list[list[int]]
    pairs: list[tuple[int, int, float]]
    where: str
    safe: list[bool] | None = None  # per response, when the row has safety labels
    # per sequence: the index of its response's first token (after BOS and the context)
    response_starts: list[int] | None = None
    # per sequence: the frozen reference's summed response log-prob (DPO, precomputed)
    ref_logps: list[float] | None = None
    desirable: bool | None = None  # KTO's label of its completion (``data.kto``)


@dataclass(kw_only=True)
class PreferenceMicroBatch(MicroBatch):
    """The rows of several samples; ``pairs_P2`` holds (better row, worse row) of each pair,
    ``margins_P`` its margin and ``pair_weights_P`` 1 / (pairs of its sample)."""

    pairs_P2: torch.Tensor
    margins_P: torch.Tensor
    pair_weights_P: torch.Tensor
    n_samples: int
    unsafe_B: torch.Tensor | None = None  # per row, when every sample has safety labels
    ref_logps_B: torch.Tensor | None = None  # per row: the reference's response log-prob


def last_span_start(mask: list[bool]) -> int:
    """Where the last run of ``True`` in ``mask`` starts (the final assistant turn of a
    conversation's loss mask: the response); ``len(mask)`` when there is none."""
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start if end > 0 else len(mask)


def _margin(row: dict, cfg: PreferenceDataConfig, margins: dict, where: str) -> float:
    value = row.get(cfg.margin_key)
    if value is None:
        return 0.0
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value in margins:
        return float(margins[value])
    raise InputError(
        f"{where}: field {cfg.margin_key!r}={value!r}: expected a number or one of the "
        f"rm.margins labels {sorted(margins)}"
    )


def row_responses(
    row: object, cfg: PreferenceDataConfig, margins: dict, where: str
) -> tuple[str, list[str], list[tuple[int, int, float]]]:
    """``(prompt, responses, pairs)`` of a JSON row in either layout (``row_safety`` reads
    its safety labels)."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt = string_field(row, cfg.prompt_key, where)
    if row.get(cfg.responses_key) is None:
        chosen = string_field(row, cfg.chosen_key, where)
        rejected = string_field(row, cfg.rejected_key, where)
        return prompt, [chosen, rejected], [(0, 1, _margin(row, cfg, margins, where))]
    responses, ranking = row[cfg.responses_key], row.get(cfg.ranking_key)
    if not isinstance(responses, list) or len(responses) < 2:
        raise InputError(f"{where}: field {cfg.responses_key!r} must list at least 2 responses")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise InputError(f"{where}: field {cfg.responses_key}[{i}] must be a string")
    if not isinstance(ranking, list) or sorted(ranking) != list(range(len(responses))):
        raise InputError(
            f"{where}: field {cfg.ranking_key!r}={ranking!r} must order the indices "
            f"0..{len(responses) - 1} of {cfg.responses_key!r}, best first"
        )
    pairs = [
        (ranking[a], ranking[b], 0.0)
        for a in range(len(ranking))
        for b in range(a + 1, len(ranking))
    ]
    return prompt, responses, pairs


def row_safety(row: dict, cfg: PreferenceDataConfig, n: int, where: str) -> list[bool]:
    """The safety label (true = safe) of each of a row's ``n`` responses."""
    if row.get(cfg.responses_key) is None:
        return [
            flag_field(row, cfg.chosen_safe_key, where),
            flag_field(row, cfg.rejected_safe_key, where),
        ]
    labels = row.get(cfg.safe_key)
    if not isinstance(labels, list) or len(labels) != n:
        raise InputError(f"{where}: field {cfg.safe_key!r} must list {n} safety labels")
    return [flag_field({cfg.safe_key: v}, cfg.safe_key, where) for v in labels]


def row_preference(
    row: object, cfg: PreferenceDataConfig, margins: dict, where: str, safety: bool
) -> tuple[list[Turn], list[str], list[tuple[int, int, float]], list[bool] | None]:
    """``(context, responses, pairs, safe)`` of a row: the conversation before the
    responses, the responses, their ordered pairs and, with ``safety``, their safety labels
    (``row_responses`` and ``row_safety``, or ``cfg.preset``'s layout)."""
    if cfg.preset is not None:
        pair = preference_row(cfg.preset, row, where, safety)
        safe = None if pair.safe is None else list(pair.safe)
        return pair.context, [pair.chosen, pair.rejected], [(0, 1, 0.0)], safe
    prompt, responses, pairs = row_responses(row, cfg, margins, where)
    assert isinstance(row, dict)  # row_responses checked it
    safe = row_safety(row, cfg, len(responses), where) if safety else None
    return [("user", prompt)], responses, pairs, safe


def read_preferences(
    path: str,
    tokenizer,
    cfg: PreferenceDataConfig,
    margins: dict,
    seq_length: int,
    vocab_size: int | None,
    safety: bool = False,
) -> list[PreferenceSample]:
    """Every row of the data file ``path`` (``data.sources``), each response cut to
    ``seq_length`` tokens; with ``safety``, every row's safety labels too (a cost model's
    data)."""
    samples, cut = [], 0
    for where, row in read_rows(path, "preference data file"):
        context, responses, pairs, safe = row_preference(row, cfg, margins, where, safety)
        sequences, starts = [], []
        for response in responses:
            turns = [*context, ("assistant", response)]
            ids, mask = conversation_tokens(turns, tokenizer, cfg.chat_template)
            check_token_ids(ids, vocab_size, where, tokenizer)
            cut += len(ids) > seq_length
            sequences.append(ids[:seq_length])
            starts.append(last_span_start(mask))
        samples.append(PreferenceSample(sequences, pairs, where, safe, starts))
    if not samples:
        raise InputError(f"{path}: no preference rows")
    if cut:
        logger.warning(
            "%d responses of %s are longer than train.seq_length=%d tokens: their end is cut "
            "(the end score then reads the cut response)",
            cut,
            path,
            seq_length,
        )
    return samples


def _pair_rows(samples: list[PreferenceSample]):
    """``(pairs_P2, margins_P, pair_weights_P)``: every sample's ordered pairs as indices of
    the rows (all samples' sequences, in order)."""
    pairs, margins, weights, offset = [], [], [], 0
    for sample in samples:
        for better, worse, margin in sample.pairs:
            pairs.append((offset + better, offset + worse))
            margins.append(margin)
            weights.append(1.0 / len(sample.pairs))
        offset += len(sample.sequences)
    return (
        torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
        torch.tensor(margins, dtype=torch.float64),
        torch.tensor(weights, dtype=torch.float64),
    )


def collate_preferences(samples: list[PreferenceSample], pad_id: int) -> PreferenceMicroBatch:
    """Every response of ``samples`` as one right-padded row (a reward model reads its end
    score); pairs index those rows."""
    rows = [seq for sample in samples for seq in sample.sequences]
    B, S = len(rows), max(len(r) for r in rows)
    input_ids_BS = torch.full((B, S), pad_id, dtype=torch.long)
    attention_mask_BS = torch.zeros(B, S, dtype=torch.bool)
    for b, row in enumerate(rows):
        input_ids_BS[b, : len(row)] = torch.tensor(row)
        attention_mask_BS[b, : len(row)] = True
    pairs_P2, margins_P, weights_P = _pair_rows(samples)
    return PreferenceMicroBatch(
        input_ids_BS=input_ids_BS,
        attention_mask_BS=attention_mask_BS,
        pairs_P2=pairs_P2,
        margins_P=margins_P,
        pair_weights_P=weights_P,
        n_samples=len(samples),
        unsafe_B=_unsafe_rows(samples),
    )


def collate_policy_preferences(
    samples: list[PreferenceSample], pad_id: int
) -> PreferenceMicroBatch:
    """Every response of ``samples`` as one right-padded next-token row for a policy (DPO):
    position ``t`` reads token ``t`` and predicts ``t + 1``; the loss and the LM head read
    the positions predicting response tokens. Pairs index the rows; ``ref_logps_B`` holds
    the samples' precomputed reference log-probs when every sample has them."""
    rows, starts = [], []
    for sample in samples:
        if sample.response_starts is None:
            raise ValueError(f"{sample.where}: a policy needs each response's start")
        rows += sample.sequences
        starts += sample.response_starts
    B, S = len(rows), max(len(r) for r in rows) - 1
    ids_BS1 = torch.full((B, S + 1), pad_id, dtype=torch.long)
    attention_mask_BS = torch.zeros(B, S, dtype=torch.bool)
    loss_mask_BS = torch.zeros(B, S, dtype=torch.bool)
    for b, (row, start) in enumerate(zip(rows, starts)):
        ids_BS1[b, : len(row)] = torch.tensor(row)
        attention_mask_BS[b, : len(row) - 1] = True
        loss_mask_BS[b, start - 1 : len(row) - 1] = True
    pairs_P2, margins_P, weights_P = _pair_rows(samples)
    refs = [s.ref_logps for s in samples]
    return PreferenceMicroBatch(
        input_ids_BS=ids_BS1[:, :-1],
        attention_mask_BS=attention_mask_BS,
        labels_BS=ids_BS1[:, 1:],
        loss_mask_BS=loss_mask_BS.float(),
        head_mask_BS=loss_mask_BS,
        pairs_P2=pairs_P2,
        margins_P=margins_P,
        pair_weights_P=weights_P,
        n_samples=len(samples),
        unsafe_B=_unsafe_rows(samples),
        ref_logps_B=None
        if any(r is None for r in refs)
        else torch.tensor([v for r in refs for v in r or []], dtype=torch.float64),
    )


def check_response_tokens(samples: list[PreferenceSample], seq_length: int) -> None:
    """Every response of ``samples`` keeps at least one token within ``seq_length + 1``
    tokens (a policy's loss reads them); ``InputError`` naming the row otherwise."""
    for sample in samples:
        for seq, start in zip(sample.sequences, sample.response_starts or []):
            if start >= len(seq):
                raise InputError(
                    f"{sample.where}: no response token within train.seq_length={seq_length} "
                    f"(the context alone has {start} tokens): raise train.seq_length"
                )


def _unsafe_rows(samples: list[PreferenceSample]) -> torch.Tensor | None:
    if any(sample.safe is None for sample in samples):
        return None
    return torch.tensor([not safe for sample in samples for safe in sample.safe or []])


class PreferenceDataset(SampleSet):
    """Preference samples: training and held-out, as micro-batches of whole samples (all
    the responses of a sample in one micro-batch)."""

    def __init__(
        self,
        cfg: PreferenceDataConfig,
        margins: dict,
        tokenizer,
        seq_length: int,
        seed: int,
        vocab_size: int | None,
        safety: bool = False,
        for_policy: bool = False,
    ):
        """``for_policy``: micro-batches for a policy's sequence log-probs (DPO,
        ``collate_policy_preferences``), else for a reward model's end scores."""
        path = cfg.path or default_preference_path(safety)
        args = (tokenizer, cfg, margins, seq_length, vocab_size, safety)
        samples = read_preferences(path, *args)
        held_out = read_preferences(cfg.eval_path, *args) if cfg.eval_path else None
        super().__init__(samples, held_out, cfg.eval_fraction, seed, cfg.shuffle, path)
        self.pad_id = tokenizer.pad_id
        self.for_policy = for_policy

    def collate(self, samples: list[PreferenceSample]) -> PreferenceMicroBatch:
        if self.for_policy:
            return collate_policy_preferences(samples, self.pad_id)
        return collate_preferences(samples, self.pad_id)
