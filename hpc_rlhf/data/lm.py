"""Language-modelling data: a text file tokenized into fixed-length training windows.

Deterministic and resumable: the window order is a seeded permutation, each data-parallel
rank reads a disjoint slice of every global batch, and ``position`` (microbatches consumed)
is all a checkpoint needs to continue where it stopped.
"""

from __future__ import annotations

import os

import torch

from hpc_rlhf.config import InputError
from hpc_rlhf.data.text_files import check_token_ids, numbered_lines
from hpc_rlhf.data.tokenizer import ASSETS_DIR
from hpc_rlhf.models.runner import MicroBatch


def default_corpus_path() -> str:
    """The tiny corpus shipped with the package."""
    return os.path.join(ASSETS_DIR, "tiny_corpus.txt")


class LMWindows:
    """All ``seq_length + 1``-token windows of a tokenized text file, in a seeded order.

    ``vocab_size`` (the model's) makes a line with a token id outside ``[0, vocab_size)``
    raise ``ValueError`` naming its file and line; text that is not UTF-8 raises too."""

    def __init__(
        self, path: str, tokenizer, seq_length: int, seed: int = 0, vocab_size: int | None = None
    ):
        ids: list[int] = []
        for number, line in numbered_lines(path, "training text"):
            if line.strip():
                line_ids = [*tokenizer.encode(line.strip()), tokenizer.eos_id]
                check_token_ids(line_ids, vocab_size, f"{path}:{number}", tokenizer)
                ids.extend(line_ids)
        n_windows = (len(ids) - 1) // seq_length
        if n_windows < 1:
            raise InputError(f"{path}: {len(ids)} tokens is shorter than one window")
        tokens_NS = torch.tensor(ids[: n_windows * seq_length + 1])
        self._set_windows(
            torch.stack(
                [tokens_NS[i * seq_length : (i + 1) * seq_length + 1] for i in range(n_windows)]
            ),
            seed,
        )

    def _set_windows(self, windows_NS1: torch.Tensor, seed: int) -> None:
        self.windows_NS1 = windows_NS1
        n_windows = windows_NS1.shape[0]
        self.order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))

    @classmethod
    def of_windows(cls, windows_NS1: torch.Tensor, seed: int = 0) -> LMWindows:
        """Windows given as token ids ``[N, seq_length + 1]`` (no text file), in the same
        seeded order (the PPO benchmark's ptx rows)."""
        windows = cls.__new__(cls)
        windows._set_windows(windows_NS1, seed)
        return windows

    def __len__(self) -> int:
        return len(self.order)

    def microbatch(self, index: int, micro_batch_size: int) -> MicroBatch:
        """Microbatch number ``index`` (wrapping around the data): inputs, labels, mask."""
        rows = [
            self.order[(index * micro_batch_size + i) % len(self)] for i in range(micro_batch_size)
        ]
        window_BS1 = self.windows_NS1[torch.stack(rows)]
        return MicroBatch.unpadded(
            window_BS1[:, :-1],
            labels_BS=window_BS1[:, 1:],
            loss_mask_BS=torch.ones(window_BS1.shape[0], window_BS1.shape[1] - 1),
        )

    def step_microbatches(
        self, step: int, n_micro: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list[MicroBatch]:
        """The microbatches of ``dp_rank`` for global step ``step``."""
        base = step * n_micro * dp_size
        return [
            self.microbatch(base + m * dp_size + dp_rank, micro_batch_size) for m in range(n_micro)
        ]
