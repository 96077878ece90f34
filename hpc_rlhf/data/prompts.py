"""Prompt datasets for RL: JSONL lines ``{"prompt": "..."}``, an optional chat template.

Each step takes ``rollout_batch_size`` prompts over all data-parallel ranks; rank ``r``
gets a contiguous slice. The order is a seeded permutation per epoch, so ``position``
(prompts consumed) is all a checkpoint needs to resume exactly.
"""

from __future__ import annotations

import json
import os

import torch

from hpc_rlhf.data.tokenizer import ASSETS_DIR


def default_prompts_path() -> str:
    """The tiny prompt set shipped with the package."""
    return os.path.join(ASSETS_DIR, "tiny_prompts.jsonl")


def read_prompts(path: str) -> list[str]:
    """Prompts of a JSONL file; a malformed line raises ``ValueError`` naming the line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = []
    with open(path) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'{path}:{number}: expected an object with a "prompt" string')
            prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


class PromptDataset:
    """Tokenized prompts in a seeded, resumable order."""

    def __init__(
        self,
        path: str | None,
        tokenizer,
        max_prompt_length: int,
        chat_template: str | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ):
        texts = read_prompts(path or default_prompts_path())
        if chat_template is not None and "{prompt}" not in chat_template:
            raise ValueError("data.chat_template must contain '{prompt}'")
        self.tokenizer = tokenizer
        self.token_ids: list[list[int]] = []
        for text in texts:
            shown = chat_template.format(prompt=text) if chat_template else text
            ids = [tokenizer.bos_id, *tokenizer.encode(shown)]
            self.token_ids.append(ids[-max_prompt_length:])  # keep the end (the question)
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0

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

    def next_batch(self, rollout_batch_size: int, dp_rank: int, dp_size: int) -> list[list[int]]:
        """This rank's prompts of the next step; advances ``position`` by the global batch."""
        per_rank = rollout_batch_size // dp_size
        start = self.position + dp_rank * per_rank
        batch = [self.token_ids[self._index(start + i)] for i in range(per_rank)]
        self.position += rollout_batch_size
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
