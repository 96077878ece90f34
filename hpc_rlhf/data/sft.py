"""Supervised fine-tuning data: conversations tokenized with the loss on assistant turns.

A row is ``{"prompt": ..., "response": ...}`` (one exchange) or ``{"messages": [{"role":
..., "content": ...}, ...]}`` (any number of turns; key names from ``SFTDataConfig``), or
the chosen dialogue of a public preference set's row (``data.preset``, ``data.presets``),
in a .jsonl, .json, .parquet or .arrow file (``data.sources``). The tokens are those PPO
sees: ``BOS``, then per turn

* ``user``: ``tokens(chat_template.format(prompt=content))`` (no loss),
* ``system``: ``tokens(content)`` (no loss),
* ``assistant``: ``tokens(content) + [EOS]`` (loss on every one: the model learns to answer
  and to stop, as PPO's engine stops at EOS).

Each turn is tokenized on its own, as PPO tokenizes the prompt and generates the response.
With ``data.chat_template: tokenizer`` the conversation is rendered by the tokenizer
directory's own chat template instead, the loss on each assistant turn as that template
renders it (``rendered_conversation``).
A sample longer than ``seq_length + 1`` tokens is cut (``truncation_side``, counted and
warned once); one with no assistant token left is an error naming its row.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from hpc_rlhf.config import TOKENIZER_CHAT_TEMPLATE, InputError, SFTDataConfig
from hpc_rlhf.data.presets import message_list, sft_row
from hpc_rlhf.data.samples import SampleSet
from hpc_rlhf.data.sources import read_rows
from hpc_rlhf.data.text_files import check_token_ids
from hpc_rlhf.data.tokenizer import ASSETS_DIR
from hpc_rlhf.models.runner import MicroBatch

logger = logging.getLogger(__name__)


def default_sft_path() -> str:
    """The tiny conversation set shipped with the package (``tools/make_tiny_data.py``)."""
    return os.path.join(ASSETS_DIR, "tiny_sft.jsonl")


@dataclass(frozen=True)
class Sample:
    """One tokenized conversation: ``ids`` and which of them the loss predicts."""

    ids: list[int]
    loss_mask: list[bool]
    where: str  # path:line or path:row N, for errors

    def __len__(self) -> int:
        return len(self.ids)


def row_messages(row: object, cfg: SFTDataConfig, where: str) -> list[tuple[str, str]]:
    """``[(role, content), ...]`` of a row in either layout (or ``cfg.preset``'s);
    ``InputError`` naming ``where`` and the field otherwise."""
    if cfg.preset is not None:
        return sft_row(cfg.preset, row, where)
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if row.get(cfg.messages_key) is not None:
        return message_list(
            row[cfg.messages_key], cfg.messages_key, where, cfg.role_key, cfg.content_key
        )
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
    if chat_template == TOKENIZER_CHAT_TEMPLATE:
        return rendered_conversation(messages, tokenizer)
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


def rendered_conversation(
    messages: list[tuple[str, str]], tokenizer
) -> tuple[list[int], list[bool]]:
    """``(ids, loss_mask)`` through the tokenizer's own chat template: the ids of the whole
    conversation; the loss on each assistant turn's tokens, found as what rendering up to
    and including the turn adds to rendering the turns before it with the generation prompt
    (the answer and the template's end-of-turn marker, e.g. ``<|im_end|>``)."""
    ids = tokenizer.render(messages, add_generation_prompt=False)
    mask = [False] * len(ids)
    for turn, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        before = tokenizer.render(messages[:turn], add_generation_prompt=True) if turn else []
        through = tokenizer.render(messages[: turn + 1], add_generation_prompt=False)
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise InputError(
                f"the chat template of {getattr(tokenizer, 'path', 'the tokenizer')} does not "
                "render a conversation as the concatenation of its turns (assistant turn "
                f"{turn}): its loss positions cannot be located"
            )
        mask[len(before) : len(through)] = [True] * (len(through) - len(before))
    return ids, mask


def read_samples(
    path: str, tokenizer, cfg: SFTDataConfig, seq_length: int, vocab_size: int | None
) -> list[Sample]:
    """Every row of the data file ``path`` (``data.sources``) tokenized, cut to
    ``seq_length + 1`` tokens."""
    samples, cut = [], 0
    for where, row in read_rows(path, "SFT data file"):
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


class SFTDataset(SampleSet):
    """SFT conversations: training and held-out samples as next-token micro-batches."""

    def __init__(
        self, cfg: SFTDataConfig, tokenizer, seq_length: int, seed: int, vocab_size: int | None
    ):
        path = cfg.path or default_sft_path()
        args = (tokenizer, cfg, seq_length, vocab_size)
        samples = read_samples(path, *args)
        held_out = read_samples(cfg.eval_path, *args) if cfg.eval_path else None
        super().__init__(samples, held_out, cfg.eval_fraction, seed, cfg.shuffle, path)
        self.pad_id = tokenizer.pad_id

    def collate(self, samples: list[Sample]) -> MicroBatch:
        return collate(samples, self.pad_id)
