"""Supervised fine-tuning data: conversations tokenized with the loss on assistant turns.

A row is ``{"prompt": ..., "response": ...}`` (one exchange) or ``{"messages": [{"role":
..., "content": ...}, ...]}`` (any number of turns; key names from ``SFTDataConfig``). The
tokens are those PPO sees: ``BOS``, then per turn

* ``user``: ``tokens(chat_template.format(prompt=content))`` (no loss),
* ``system``: ``tokens(content)`` (no loss),
* ``assistant``: ``tokens(content) + [EOS]`` (loss on every one: the model learns to answer
  and to stop, as PPO's engine stops at EOS).

Each turn is tokenized on its own, as PPO tokenizes the prompt and generates the response.
A sample longer than ``seq_length + 1`` tokens is cut (``truncation_side``, counted and
warned once); one with no assistant token left is an error naming its row.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import torch

from hpc_rlhf.config import InputError, SFTDataConfig
from hpc_rlhf.data.text_files import check_token_ids, numbered_lines
from hpc_rlhf.data.tokenizer import ASSETS_DIR
from hpc_rlhf.models.runner import MicroBatch

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


def default_sft_path() -> str:
    """The tiny conversation set shipped with the package (``tools/make_tiny_data.py``)."""
    return os.path.join(ASSETS_DIR, "tiny_sft.jsonl")


@dataclass(frozen=True)
class Sample:
    """One tokenized conversation: ``ids`` and which of them the loss predicts."""

    ids: list[int]
    loss_mask: list[bool]
    where: str  # path:line, for errors

    def __len__(self) -> int:
        return len(self.ids)


def row_messages(row: object, cfg: SFTDataConfig, where: str) -> list[tuple[str, str]]:
    """``[(role, content), ...]`` of a JSON row in either layout; ``InputError`` naming
    ``where`` and the field otherwise."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if cfg.messages_key in row:
        turns = row[cfg.messages_key]
        if not isinstance(turns, list) or not turns:
            raise InputError(f"{where}: field {cfg.messages_key!r} must be a non-empty list")
        out = []
        for i, turn in enumerate(turns):
            field = f"{cfg.messages_key}[{i}]"
            if not isinstance(turn, dict):
                raise InputError(f"{where}: field {field} must be an object")
            role, content = turn.get(cfg.role_key), turn.get(cfg.content_key)
            if role not in ROLES:
                raise InputError(
                    f"{where}: field {field}.{cfg.role_key}={role!r}: expected {ROLES}"
                )
            if not isinstance(content, str):
                raise InputError(f"{where}: field {field}.{cfg.content_key} must be a string")
            out.append((role, content))
        return out
    for key in (cfg.prompt_key, cfg.response_key):
        if not isinstance(row.get(key), str):
            raise InputError(
                f"{where}: expected a string field {key!r} (or a {cfg.messages_key!r} list)"
            )
    return [("user", row[cfg.prompt_key]), ("assistant", row[cfg.response_key])]


def conversation_tokens(
    messages: list[tuple[str, str]], tokenizer, chat_template: str | None
) -> tuple[list[int], list[bool]]:
    """``(ids, loss_mask)`` of a conversation (see the module docstring)."""
    ids, mask = [tokenizer.bos_id], [False]
    for role, content in messages:
        if role == "assistant":
            piece = [*tokenizer.encode(content), tokenizer.eos_id]
        elif role == "user" and chat_template is not None:
            piece = tokenizer.encode(chat_template.format(prompt=content))
        else:
            piece = tokenizer.encode(content)
        ids += piece
        mask += [role == "assistant"] * len(piece)
    return ids, mask


def read_samples(
    path: str, tokenizer, cfg: SFTDataConfig, seq_length: int, vocab_size: int | None
) -> list[Sample]:
    """Every row of the JSONL file ``path`` tokenized, cut to ``seq_length + 1`` tokens."""
    samples, cut = [], 0
    for number, text in numbered_lines(path, "SFT data file"):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg})") from err
        ids, mask = conversation_tokens(row_messages(row, cfg, where), tokenizer, cfg.chat_template)
        check_token_ids(ids, vocab_size, where, tokenizer)
        if len(ids) > seq_length + 1:
            keep = (
                slice(0, seq_length + 1)
                if cfg.truncation_side == "right"
                else slice(-seq_length - 1, None)
            )
            ids, mask, cut = ids[keep], mask[keep], cut + 1
        if not any(mask[1:]):
            raise InputError(f"{where}: no assistant token within train.seq_length={seq_length}")
        samples.append(Sample(ids, mask, where))
    if not samples:
        raise InputError(f"{path}: no SFT rows")
    if cut:
        logger.warning(
            "%d of %d samples of %s are longer than train.seq_length + 1 = %d tokens: cut on "
            "the %s (data.truncation_side)",
            cut,
            len(samples),
            path,
            seq_length + 1,
            cfg.truncation_side,
        )
    return samples


def collate(samples: list[Sample], pad_id: int) -> MicroBatch:
    """Right-padded next-token micro-batch: position ``t`` reads ``ids[t]`` and predicts
    ``ids[t + 1]``, in the loss where that token is an assistant token; the LM head runs on
    those positions only (``head_mask_BS``)."""
    S = max(len(s) for s in samples) - 1
    B = len(samples)
    ids_BS1 = torch.full((B, S + 1), pad_id, dtype=torch.long)
    target_BS1 = torch.zeros(B, S + 1, dtype=torch.bool)
    attention_mask_BS = torch.zeros(B, S, dtype=torch.bool)
    for b, sample in enumerate(samples):
        n = len(sample)
        ids_BS1[b, :n] = torch.tensor(sample.ids)
        target_BS1[b, :n] = torch.tensor(sample.loss_mask)
        attention_mask_BS[b, : n - 1] = True
    loss_mask_BS = target_BS1[:, 1:]
    return MicroBatch(
        input_ids_BS=ids_BS1[:, :-1],
        attention_mask_BS=attention_mask_BS,
        labels_BS=ids_BS1[:, 1:],
        loss_mask_BS=loss_mask_BS.float(),
        head_mask_BS=loss_mask_BS,
    )


class SFTDataset:
    """Training and held-out samples in a seeded order, as micro-batches per step."""

    def __init__(
        self, cfg: SFTDataConfig, tokenizer, seq_length: int, seed: int, vocab_size: int | None
    ):
        path = cfg.path or default_sft_path()
        samples = read_samples(path, tokenizer, cfg, seq_length, vocab_size)
        if cfg.eval_path:
            self.eval = read_samples(cfg.eval_path, tokenizer, cfg, seq_length, vocab_size)
            self.train = samples
        else:
            order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
            n_eval = math.ceil(cfg.eval_fraction * len(samples))
            self.eval = [samples[i] for i in order[:n_eval].tolist()]
            self.train = [samples[i] for i in order[n_eval:].tolist()]
        if not self.train:
            raise InputError(f"{path}: no training rows left after holding out data.eval_fraction")
        self.pad_id = tokenizer.pad_id
        self.seed = seed
        self.shuffle = cfg.shuffle

    def _train_index(self, global_index: int) -> int:
        epoch, offset = divmod(global_index, len(self.train))
        if not self.shuffle:
            return offset
        gen = torch.Generator().manual_seed(self.seed + 1 + epoch)
        return int(torch.randperm(len(self.train), generator=gen)[offset])

    def step_microbatches(
        self, step: int, n_micro: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list[MicroBatch]:
        """This rank's micro-batches of global step ``step`` (``n_micro`` per rank)."""
        per_step = n_micro * micro_batch_size * dp_size
        out = []
        for m in range(n_micro):
            first = step * per_step + (m * dp_size + dp_rank) * micro_batch_size
            rows = [self.train[self._train_index(first + i)] for i in range(micro_batch_size)]
            out.append(collate(rows, self.pad_id))
        return out

    def eval_microbatches(
        self, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list[MicroBatch]:
        """This rank's share of the held-out samples (every sample once over the ranks)."""
        mine = self.eval[dp_rank::dp_size]
        return [
            collate(mine[i : i + micro_batch_size], self.pad_id)
            for i in range(0, len(mine), micro_batch_size)
        ]
