"""The frozen reference policy of the DPO family (``trainer.dpo``, ``trainer.kto``): built
from ``dpo.reference`` (default ``init``'s weights), and its summed response log-probs
either per step (``ReferencePass``) or once before training (``precompute_reference``,
cached in ``train.save_dir`` as ``reference_logps.pt`` with a fingerprint of the data and
the reference, so a resumed run reads it and other data never does)."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import replace
from typing import Any

import torch

from hpc_rlhf.config import DPORunConfig
from hpc_rlhf.data.preference import PreferenceSample, collate_policy_preferences
from hpc_rlhf.data.samples import SampleSet
from hpc_rlhf.parallel.comm import broadcast_object, group_sum, world
from hpc_rlhf.trainer.checkpoint_files import CheckpointError, load_file, save_synced
from hpc_rlhf.trainer.losses import sequence_logps_fn
from hpc_rlhf.trainer.run import Run
from hpc_rlhf.trainer.trainable_model import TrainableModel

logger = logging.getLogger(__name__)

REFERENCE_CACHE = "reference_logps.pt"


def frozen_reference(cfg: DPORunConfig, run: Run, init_state: dict) -> TrainableModel:
    """The frozen reference policy: ``dpo.reference``'s weights, else ``init_state``."""
    state = init_state
    if cfg.dpo.reference:
        from hpc_rlhf.models.hf_io import load_hf_checkpoint_for

        state = load_hf_checkpoint_for(cfg.model, cfg.dpo.reference)
    t = cfg.train
    reference = TrainableModel(
        cfg.model,
        None,
        run.state,
        "reference",
        pack_sequences=t.pack_sequences,
        share_prefixes=t.share_prefixes,
    )
    reference.load_hf_state(state)
    return reference


class ReferencePass:
    """Per step: the reference's log-probs of every row of the step's micro-batches (and
    of their mismatched ``kl`` rows, KTO's), set as their ``ref_logps_B``
    (``train_supervised``'s ``prepare``); micro-batches that have them are skipped."""

    def __init__(self, reference: TrainableModel):
        self.reference = reference
        self.fn = sequence_logps_fn(reference.state.tp_group)

    def __call__(self, microbatches: list) -> None:
        todo = [mb for mb in microbatches if mb.ref_logps_B is None]
        todo += [mb.kl for mb in microbatches if getattr(mb, "kl", None) is not None]
        todo = [mb for mb in todo if mb.ref_logps_B is None]
        if todo:
            for mb, out in zip(todo, self.reference.infer(todo, self.fn)):
                mb.ref_logps_B = out["logps"]


def _reference_logps(
    reference: TrainableModel, pad_id: int, samples: list, micro_batch_size: int
) -> torch.Tensor:
    """``[R]`` float64: the reference's summed response log-prob of every sequence of
    ``samples`` (in order), each data-parallel rank scoring its share."""
    state = reference.state
    offsets = [0]
    for sample in samples:
        offsets.append(offsets[-1] + len(sample.sequences))
    out_R = torch.zeros(offsets[-1], dtype=torch.float64)
    mine = list(range(state.dp_rank, len(samples), state.dp_size))
    fn = sequence_logps_fn(state.tp_group)
    for i in range(0, len(mine), micro_batch_size):
        chunk = mine[i : i + micro_batch_size]
        mb = collate_policy_preferences([samples[j] for j in chunk], pad_id)
        logps_B = reference.infer([mb], fn)[0]["logps"]
        rows = [r for j in chunk for r in range(offsets[j], offsets[j + 1])]
        out_R[rows] = logps_B.double()
    return group_sum(out_R, state.dp_group)  # each row is non-zero on one rank only


def _with_reference(samples: list[PreferenceSample], logps_R: torch.Tensor) -> list:
    out, offset = [], 0
    for sample in samples:
        n = len(sample.sequences)
        out.append(replace(sample, ref_logps=logps_R[offset : offset + n].tolist()))
        offset += n
    return out


def reference_fingerprint(cfg: DPORunConfig, data: SampleSet) -> str:
    """What the cached reference log-probs depend on: every sequence and response start
    of the training and held-out samples, the reference's weights (its path, or the
    seeded init) and the layout-independent numerics settings."""
    digest = hashlib.sha256()
    source = cfg.dpo.reference or cfg.init or f"random seed {cfg.train.seed}"
    digest.update(repr((source, cfg.model.params_dtype)).encode())
    for sample in data.train + data.eval:
        digest.update(repr((sample.sequences, sample.response_starts)).encode())
    return digest.hexdigest()


def precompute_reference(reference: TrainableModel, data: Any, cfg: DPORunConfig, run: Run) -> None:
    """Give every training and held-out sample its reference log-probs: from the cache in
    ``train.save_dir`` when it matches this data and reference, else one pass over the
    data (then written to the cache by rank 0)."""
    save_dir, rank = cfg.train.save_dir, run.state.rank
    fingerprint = reference_fingerprint(cfg, data)
    path = os.path.join(save_dir, REFERENCE_CACHE) if save_dir else None
    cached = _read_cache(path, fingerprint) if path and rank == 0 else None
    cached = broadcast_object(cached, 0, world())
    if cached is None:
        size = cfg.train.micro_batch_size_per_rank
        cached = {
            "fingerprint": fingerprint,
            "train": _reference_logps(reference, data.pad_id, data.train, size),
            "eval": _reference_logps(reference, data.pad_id, data.eval, size),
        }
        if path and rank == 0:
            tmp = f"{path}.tmp"
            save_synced(cached, tmp)
            os.replace(tmp, path)
        logger.info("reference log-probs precomputed for %d samples", len(data.train))
    else:
        logger.info("reference log-probs read from %s", path)
    data.train = _with_reference(data.train, cached["train"])
    data.eval = _with_reference(data.eval, cached["eval"])


def _read_cache(path: str, fingerprint: str) -> dict | None:
    """The cached reference log-probs at ``path`` if they are for ``fingerprint``."""
    if not os.path.exists(path):
        return None
    try:
        cached = load_file(path)
    except CheckpointError as err:
        logger.warning("%s; computing the reference log-probs again", err)
        return None
    if not isinstance(cached, dict) or cached.get("fingerprint") != fingerprint:
        logger.warning("%s is for other data or another reference: computing again", path)
        return None
    return cached
