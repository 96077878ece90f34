"""A held-out split and a seeded, resumable order of tokenized samples, served as
micro-batches per training step (SFT conversations, preference samples)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from hpc_rlhf.config import InputError


class SampleSet:
    """Training and held-out samples; subclasses say how samples become a micro-batch
    (``collate``). Step ``s`` takes the next ``n_micro x micro_batch_size x dp_size``
    training samples of a per-epoch seeded permutation; data-parallel rank ``r`` gets
    micro-batch ``m`` from samples ``(m * dp_size + r) * micro_batch_size`` on."""

    def __init__(
        self,
        samples: Sequence[Any],
        eval_samples: Sequence[Any] | None,
        eval_fraction: float,
        seed: int,
        shuffle: bool,
        source: str,
    ):
        if eval_samples is not None:
            self.train, self.eval = list(samples), list(eval_samples)
        else:
            order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
            n_eval = math.ceil(eval_fraction * len(samples))
            self.eval = [samples[i] for i in order[:n_eval].tolist()]
            self.train = [samples[i] for i in order[n_eval:].tolist()]
        if not self.train:
            raise InputError(
                f"{source}: no training rows left after holding out data.eval_fraction"
            )
        self.seed = seed
        self.shuffle = shuffle

    def collate(self, samples: list[Any]) -> Any:
        """One micro-batch of ``samples``."""
        raise NotImplementedError

    def _train_index(self, global_index: int) -> int:
        epoch, offset = divmod(global_index, len(self.train))
        if not self.shuffle:
            return offset
        gen = torch.Generator().manual_seed(self.seed + 1 + epoch)
        return int(torch.randperm(len(self.train), generator=gen)[offset])

    def step_microbatches(
        self, step: int, n_micro: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list[Any]:
        """This rank's micro-batches of global step ``step`` (``n_micro`` per rank)."""
        per_step = n_micro * micro_batch_size * dp_size
        out = []
        for m in range(n_micro):
            first = step * per_step + (m * dp_size + dp_rank) * micro_batch_size
            rows = [self.train[self._train_index(first + i)] for i in range(micro_batch_size)]
            out.append(self.collate(rows))
        return out

    def eval_microbatches(self, micro_batch_size: int, dp_rank: int, dp_size: int) -> list[Any]:
        """This rank's share of the held-out samples (every sample once over the ranks)."""
        mine = self.eval[dp_rank::dp_size]
        return [
            self.collate(mine[i : i + micro_batch_size])
            for i in range(0, len(mine), micro_batch_size)
        ]
