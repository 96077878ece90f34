"""Prompt datasets for RL: JSONL lines ``{"prompt": "..."}``, an optional chat template.
Rows may carry a safety tag (``data.safety_field``) and reference fields for the rule
rewards (``data.reference_fields``: a math answer, a program's tests).

Each step takes ``rollout_batch_size`` prompts over all data-parallel ranks; rank ``r``
gets a contiguous slice. The order is a seeded permutation per epoch, so ``position``
(prompts consumed) is all a checkpoint needs to resume exactly.

A prompt is ``[BOS] + tokens(chat_template with the prompt text)``. One longer than
``max_prompt_length`` has its *text* cut (``truncation_side``: "left" keeps the text's end,
"right" its start) while BOS, the template's head and its assistant tail stay whole; how
many prompts were cut is logged once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from hpc_rlhf.config import TOKENIZER_CHAT_TEMPLATE, InputError
from hpc_rlhf.data.prompt_presets import prompt_row
from hpc_rlhf.data.sources import read_rows
from hpc_rlhf.data.text_files import check_token_ids
from hpc_rlhf.data.tokenizer import ASSETS_DIR

logger = logging.getLogger(__name__)


def default_prompts_path() -> str:
    """The tiny prompt set shipped with the package."""
    return os.path.join(ASSETS_DIR, "tiny_prompts.jsonl")


def story_prompts_path() -> str:
    """The tiny "Continue the story" prompts shipped with the package, of the SFT and
    preference sets' kind (``tools/make_tiny_data.py``)."""
    return os.path.join(ASSETS_DIR, "tiny_story_prompts.jsonl")


def read_prompts(path: str) -> list[str]:
    """Prompts of a data file; a malformed row raises ``InputError`` naming it."""
    return [row.text for row in read_prompt_rows(path)]


@dataclass(frozen=True)
class PromptRow:
    """One prompt of a data file: where it is (``path:line``), its text, safety tag and
    reference fields."""

    where: str
    text: str
    unsafe: bool = False
    references: dict[str, Any] = field(default_factory=dict)


def read_prompt_rows(
    path: str,
    safety_field: str | None = None,
    reference_fields: tuple[str, ...] = (),
    preset: str | None = None,
) -> list[PromptRow]:
    """The prompts of a data file (JSON Lines, JSON, Parquet or Arrow: ``sources``), rows
    of a public set's layout first read through ``preset`` (``prompt_presets``);
    ``unsafe`` the boolean ``safety_field`` of each row (``False`` without a field name)
    and ``references`` its ``reference_fields`` (handed to the rule rewards). A row that is
    not ``{"prompt": str}``, whose ``safety_field`` is missing or not a boolean, or that
    lacks a reference field raises ``InputError`` naming ``path:line`` (or ``path:row N``)."""
    prompts = []
    for where, record in read_rows(path, "prompt file"):
        if preset is not None:
            record = {**record, **prompt_row(preset, record, where)}  # type: ignore[dict-item]
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise InputError(f'{where}: expected an object with a "prompt" string')
        tag = False if safety_field is None else record.get(safety_field)
        if not isinstance(tag, bool):
            raise InputError(
                f"{where}: data.safety_field {safety_field!r} must be true or false "
                f"in every row (got {tag!r})"
            )
        missing = [name for name in reference_fields if record.get(name) is None]
        if missing:
            raise InputError(
                f"{where}: no {', '.join(repr(m) for m in missing)} (data.reference_fields: "
                "every row needs them, the rule rewards read them)"
            )
        references = {name: record[name] for name in reference_fields}
        prompts.append(PromptRow(where, record["prompt"], tag, references))
    if not prompts:
        raise InputError(f"{path}: no prompts")
    return prompts


class PromptDataset:
    """Tokenized prompts in a seeded, resumable order.

    ``vocab_size`` (the model's) makes a prompt with a token id outside ``[0, vocab_size)``
    raise ``ValueError`` naming its file and line. ``safety_field`` names a boolean field
    of the rows tagging unsafe prompts (``unsafe(i)``); ``reference_fields`` the fields
    kept for the rule rewards (``references[i]``, a dict)."""

    def __init__(
        self,
        path: str | None,
        tokenizer,
        max_prompt_length: int,
        chat_template: str | None = None,
        seed: int = 0,
        shuffle: bool = True,
        truncation_side: str = "left",
        vocab_size: int | None = None,
        safety_field: str | None = None,
        reference_fields: tuple[str, ...] = (),
        preset: str | None = None,
    ):
        path = path or default_prompts_path()
        own_template = chat_template == TOKENIZER_CHAT_TEMPLATE
        if chat_template is not None and not own_template and "{prompt}" not in chat_template:
            raise InputError("data.chat_template must contain '{prompt}' (or be 'tokenizer')")
        if max_prompt_length < 1 or truncation_side not in ("left", "right"):
            raise InputError(
                f"max_prompt_length={max_prompt_length} must be >= 1 and "
                f"truncation_side={truncation_side!r} 'left' or 'right'"
            )
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.chat_template = chat_template
        self.truncation_side = truncation_side
        self.token_ids: list[list[int]] = []
        self.unsafe_tags: list[bool] = []
        self.references: list[dict[str, Any]] = []
        truncated = 0
        for row in read_prompt_rows(path, safety_field, tuple(reference_fields), preset):
            ids, cut = self._tokenize(row.text)
            check_token_ids(ids, vocab_size, row.where, tokenizer)
            self.token_ids.append(ids)
            self.unsafe_tags.append(row.unsafe)
            self.references.append(row.references)
            truncated += cut
        if truncated:
            logger.warning(
                "%d of %d prompts of %s are longer than data.max_prompt_length=%d tokens: "
                "their text was cut on the %s (data.truncation_side), keeping BOS and the "
                "chat template",
                truncated,
                len(self.token_ids),
                path,
                max_prompt_length,
                truncation_side,
            )
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0

    def _tokenize(self, text: str) -> tuple[list[int], bool]:
        """``[BOS] + tokens(template(text))`` (the tokenizer's own template renders BOS
        itself where the model has one) and whether the text had to be cut to fit."""
        tok, template = self.tokenizer, self.chat_template
        if template == TOKENIZER_CHAT_TEMPLATE:
            return self._render_user_turn(text)
        ids = [tok.bos_id, *tok.encode(template.format(prompt=text) if template else text)]
        if len(ids) <= self.max_prompt_length:
            return ids, False
        head_text, tail_text = template.split("{prompt}", 1) if template else ("", "")
        head = [tok.bos_id, *tok.encode(head_text.format())]
        tail = tok.encode(tail_text.format())
        room = self.max_prompt_length - len(head) - len(tail)
        if room < 1:
            raise InputError(
                f"data.max_prompt_length={self.max_prompt_length} leaves no room for the prompt "
                f"text: BOS and the chat template {template!r} take {len(head) + len(tail)} tokens"
            )
        body = tok.encode(text)
        body = body[-room:] if self.truncation_side == "left" else body[:room]
        return [*head, *body, *tail], True

    def _render_user_turn(self, text: str) -> tuple[list[int], bool]:
        """One user turn through the tokenizer's chat template, generation prompt added;
        a text too long is cut (``truncation_side``) token-wise and rendered again."""
        tok = self.tokenizer
        ids = tok.render([("user", text)], add_generation_prompt=True)
        if len(ids) <= self.max_prompt_length:
            return ids, False
        frame = len(tok.render([("user", "")], add_generation_prompt=True))
        body = tok.encode(text)
        room = self.max_prompt_length - frame
        while room >= 1:
            kept = body[-room:] if self.truncation_side == "left" else body[:room]
            ids = tok.render([("user", tok.decode(kept))], add_generation_prompt=True)
            if len(ids) <= self.max_prompt_length:
                return ids, True
            room -= len(ids) - self.max_prompt_length  # re-tokenised text grew: shrink
        raise InputError(
            f"data.max_prompt_length={self.max_prompt_length} leaves no room for the prompt "
            f"text: the tokenizer's chat template takes {frame} tokens"
        )

    def __len__(self) -> int:
        return len(self.token_ids)

    def _index(self, global_index: int) -> int:
        epoch, offset = divmod(global_index, len(self))
        if not self.shuffle:
            return offset
        order = torch.randperm(
            len(self), generator=torch.Generator().manual_seed(self.seed + epoch)
        )
        return int(order[offset])

    def next_indices(self, rollout_batch_size: int, dp_rank: int, dp_size: int) -> list[int]:
        """Indices of this rank's prompts of the next step; advances ``position`` by the
        global batch."""
        per_rank = rollout_batch_size // dp_size
        start = self.position + dp_rank * per_rank
        indices = [self._index(start + i) for i in range(per_rank)]
        self.position += rollout_batch_size
        return indices

    def step_indices(self, step: int, per_step: int, dp_rank: int, dp_size: int) -> list[int]:
        """Indices of this rank's prompts of step ``step`` when every step takes
        ``per_step`` prompts over all ranks (rank ``r`` its ``r``-th share), whatever
        ``position`` is: a resumed run draws what the uninterrupted one drew."""
        per_rank = per_step // dp_size
        first = step * per_step + dp_rank * per_rank
        return [self._index(first + i) for i in range(per_rank)]

    def next_batch(self, rollout_batch_size: int, dp_rank: int, dp_size: int) -> list[list[int]]:
        """This rank's prompts of the next step; advances ``position`` by the global batch."""
        indices = self.next_indices(rollout_batch_size, dp_rank, dp_size)
        return [self.token_ids[i] for i in indices]

    def unsafe(self, index: int) -> bool:
        """Whether prompt ``index`` is tagged unsafe (``safety_field``)."""
        return self.unsafe_tags[index]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def prompts_from_config(
    data, tokenizer, vocab_size: int, seed: int, shuffle: bool
) -> PromptDataset:
    """The prompt set of a ``config.DataConfig`` section (PPO and eval read prompts alike)."""
    return PromptDataset(
        data.prompts,
        tokenizer,
        data.max_prompt_length,
        data.chat_template,
        seed=seed,
        shuffle=shuffle,
        truncation_side=data.truncation_side,
        vocab_size=vocab_size,
        safety_field=data.safety_field,
        reference_fields=data.rule_fields,
        preset=data.preset,
    )
