"""Unpaired preference data for KTO: completions labelled desirable or not.

A row is ``{"prompt", "completion", "label"}`` (``label`` true: desirable; key names from
``PreferenceDataConfig``), or a preference pair (our layout or a ``data.preset``), which
gives two completions: the chosen one desirable, the rejected one not (as TRL unpairs a
preference set). Rankings are refused. Each completion is tokenized as DPO tokenizes a
response (``data.sft.conversation_tokens``).

KTO's reference point ``z0`` estimates KL(policy || reference) on *mismatched* pairs: each
completion also comes with a second sequence, its prompt followed by the completion of the
next row of the file (the last row's partner is the first). A sample is a
``PreferenceSample`` with ``sequences = [completion, mismatched]`` and ``desirable`` set;
a micro-batch (``KTOMicroBatch``) holds the completions, and in ``kl`` the mismatched rows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import torch

from hpc_rlhf.config import InputError, PreferenceDataConfig, RankingLossConfig
from hpc_rlhf.data.preference import (
    PreferenceMicroBatch,
    PreferenceSample,
    collate_policy_preferences,
    last_span_start,
    row_preference,
)
from hpc_rlhf.data.presets import Turn, string_field
from hpc_rlhf.data.samples import SampleSet
from hpc_rlhf.data.sft import conversation_tokens
from hpc_rlhf.data.sources import read_rows
from hpc_rlhf.data.text_files import check_token_ids
from hpc_rlhf.data.tokenizer import ASSETS_DIR
from hpc_rlhf.models.runner import MicroBatch

logger = logging.getLogger(__name__)


def default_kto_path() -> str:
    """The tiny set of labelled completions shipped with the package
    (``tools/make_tiny_data.py``)."""
    return os.path.join(ASSETS_DIR, "tiny_kto.jsonl")


@dataclass(kw_only=True)
class KTOMicroBatch(MicroBatch):
    """Completions as policy rows (``data.preference.collate_policy_preferences``), whether
    each is desirable, the reference's log-probs, and the mismatched rows (``kl``) from
    which ``reference_point`` (z0) is estimated before the loss reads it."""

    desirable_B: torch.Tensor
    kl: PreferenceMicroBatch
    ref_logps_B: torch.Tensor | None = None
    reference_point: torch.Tensor | None = None
    n_samples: int = 0


def _label(row: dict, key: str, where: str) -> bool:
    value = row.get(key)
    if not isinstance(value, bool):
        raise InputError(f"{where}: expected a true/false field {key!r} (true: desirable)")
    return value


def row_completions(
    row: object, cfg: PreferenceDataConfig, where: str
) -> list[tuple[list[Turn], str, bool]]:
    """``[(context, completion, desirable), ...]`` of a row: one for a labelled
    completion, two for a preference pair."""
    if isinstance(row, dict) and cfg.preset is None and row.get(cfg.completion_key) is not None:
        prompt = string_field(row, cfg.prompt_key, where)
        completion = string_field(row, cfg.completion_key, where)
        return [([("user", prompt)], completion, _label(row, cfg.label_key, where))]
    if isinstance(row, dict) and cfg.preset is None and row.get(cfg.responses_key) is not None:
        raise InputError(
            f"{where}: KTO reads labelled completions ({cfg.completion_key!r}, "
            f"{cfg.label_key!r}) or pairs, not rankings ({cfg.responses_key!r})"
        )
    margins = RankingLossConfig().margins  # a pair's margin label is read and unused
    context, responses, _, _ = row_preference(row, cfg, margins, where, False)
    return [(context, responses[0], True), (context, responses[1], False)]


def read_completions(
    path: str, tokenizer, cfg: PreferenceDataConfig, seq_length: int, vocab_size: int | None
) -> list[PreferenceSample]:
    """Every completion of the data file ``path``, with its mismatched partner, each
    sequence cut to ``seq_length`` tokens."""
    items = []
    for where, row in read_rows(path, "KTO data file"):
        for context, completion, desirable in row_completions(row, cfg, where):
            ids, mask = conversation_tokens(
                [*context, ("assistant", completion)], tokenizer, cfg.chat_template
            )
            check_token_ids(ids, vocab_size, where, tokenizer)
            start = last_span_start(mask)  # the completion (with its template tokens)
            items.append((ids[:start], ids[start:], desirable, where))
    if len(items) < 2:
        raise InputError(f"{path}: KTO needs at least 2 completions (one is the other's KL pair)")
    samples, cut = [], 0
    for i, (context_ids, completion_ids, desirable, where) in enumerate(items):
        partner_ids = items[(i + 1) % len(items)][1]
        sequences = [context_ids + completion_ids, context_ids + partner_ids]
        cut += len(sequences[0]) > seq_length
        samples.append(
            PreferenceSample(
                [seq[:seq_length] for seq in sequences],
                [],
                where,
                response_starts=[len(context_ids)] * 2,
                desirable=desirable,
            )
        )
    if cut:
        logger.warning(
            "%d completions of %s are longer than train.seq_length + 1 = %d tokens: their end is "
            "cut",
            cut,
            path,
            seq_length,
        )
    return samples


def collate_completions(samples: list[PreferenceSample], pad_id: int) -> KTOMicroBatch:
    """The completions of ``samples`` as policy rows, their mismatched sequences in ``kl``
    (with the precomputed reference log-probs of both when the samples have them)."""

    def view(sample: PreferenceSample, i: int) -> PreferenceSample:
        starts, refs = sample.response_starts or [], sample.ref_logps
        return replace(
            sample,
            sequences=[sample.sequences[i]],
            response_starts=[starts[i]],
            ref_logps=None if refs is None else [refs[i]],
        )

    completions = collate_policy_preferences([view(s, 0) for s in samples], pad_id)
    return KTOMicroBatch(
        input_ids_BS=completions.input_ids_BS,
        attention_mask_BS=completions.attention_mask_BS,
        labels_BS=completions.labels_BS,
        loss_mask_BS=completions.loss_mask_BS,
        head_mask_BS=completions.head_mask_BS,
        desirable_B=torch.tensor([bool(s.desirable) for s in samples]),
        kl=collate_policy_preferences([view(s, 1) for s in samples], pad_id),
        ref_logps_B=completions.ref_logps_B,
        n_samples=len(samples),
    )


class KTODataset(SampleSet):
    """Labelled completions: training and held-out, as ``KTOMicroBatch``es."""

    def __init__(
        self,
        cfg: PreferenceDataConfig,
        tokenizer,
        seq_length: int,
        seed: int,
        vocab_size: int | None,
    ):
        path = cfg.path or default_kto_path()
        args = (tokenizer, cfg, seq_length, vocab_size)
        samples = read_completions(path, *args)
        held_out = read_completions(cfg.eval_path, *args) if cfg.eval_path else None
        super().__init__(samples, held_out, cfg.eval_fraction, seed, cfg.shuffle, path)
        self.pad_id = tokenizer.pad_id

    def collate(self, samples: list[PreferenceSample]) -> KTOMicroBatch:
        return collate_completions(samples, self.pad_id)
