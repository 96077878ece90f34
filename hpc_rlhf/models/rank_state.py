"""One rank's live model chunks <-> HF state: load its shard, gather every rank's chunks.

The only part of the converter that touches models and process groups; the tensor work is
``reshard``'s.
"""

from __future__ import annotations

import logging

import torch

from hpc_rlhf.config import ModelConfig
from hpc_rlhf.models.hf_names import (
    EXTRA_STATE,
    HEAD_LM,
    MCORE_OUTPUT,
    MCORE_SCORE,
    MCORE_SCORE_BIAS,
    ConversionError,
)
from hpc_rlhf.models.param_layout import detect_head
from hpc_rlhf.models.reshard import hf_to_megatron_rank, megatron_to_hf
from hpc_rlhf.parallel.comm import gather_objects, world

logger = logging.getLogger(__name__)


def state_from_model_chunks(chunks: list[torch.nn.Module]) -> list[dict[str, torch.Tensor]]:
    """This rank's chunk state dicts as detached CPU copies, without ``_extra_state``."""
    return [
        {
            name: t.detach().cpu().clone()
            for name, t in chunk.state_dict().items()
            if not name.endswith(EXTRA_STATE)
        }
        for chunk in chunks
    ]


def load_into_model_chunks(chunks: list[torch.nn.Module], shard_list: list[dict]) -> None:
    """Copy one rank's chunk state dicts into its live model chunks.

    Every non-``_extra_state`` tensor of each chunk must be given with the model's shape;
    a missing, unexpected or misshapen tensor raises ``ConversionError`` before any copy.
    A scalar head's missing bias is set to zero; a zero bias given to a head without one
    (a reward model's) is dropped.
    """
    if len(chunks) != len(shard_list):
        raise ConversionError(f"{len(shard_list)} chunk state(s) for {len(chunks)} model chunk(s)")
    for c, (chunk, shard) in enumerate(zip(chunks, shard_list)):
        own = {n: t for n, t in chunk.state_dict().items() if not n.endswith(EXTRA_STATE)}
        given = {n: t for n, t in shard.items() if not n.endswith(EXTRA_STATE)}
        if MCORE_SCORE_BIAS in own and MCORE_SCORE_BIAS not in given:
            given[MCORE_SCORE_BIAS] = torch.zeros_like(own[MCORE_SCORE_BIAS])
        elif MCORE_SCORE_BIAS in given and MCORE_SCORE_BIAS not in own:
            if bool(given[MCORE_SCORE_BIAS].ne(0).any()):
                raise ConversionError(f"model chunk {c}: its scalar head has no bias to load")
            del given[MCORE_SCORE_BIAS]  # HF's score layer has none; a critic's has
        missing = sorted(set(own) - set(given))
        unexpected = sorted(set(given) - set(own))
        if missing or unexpected:
            raise ConversionError(
                f"model chunk {c}: missing tensor(s) {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, t in given.items():
            if t.shape != own[name].shape:
                raise ConversionError(
                    f"model chunk {c}: tensor {name!r} has shape {tuple(t.shape)}, the model "
                    f"has {tuple(own[name].shape)}"
                )
        result = chunk.load_state_dict(given, strict=False)
        not_loaded = [n for n in result.missing_keys if not n.endswith(EXTRA_STATE)]
        if not_loaded or result.unexpected_keys:
            raise ConversionError(f"model chunk {c}: not loaded {not_loaded}")


def load_hf_state_into_rank(
    chunks: list[torch.nn.Module],
    state,
    model_cfg: ModelConfig,
    hf_state: dict[str, torch.Tensor],
    head: str | None = None,
) -> None:
    """Load this rank's shard of a full HF state (present on every rank) into ``chunks``.

    ``state`` is this rank's ``ParallelState``; no communication happens. A critic or reward
    model (``ScalarHead``) loaded from a causal-LM state (no ``score.weight``) gets the
    decoder from it and keeps its own head (the usual critic initialisation from an SFT
    model); the LM head is not used.
    """
    head = head or detect_head(hf_state)
    shard = hf_to_megatron_rank(
        hf_state,
        model_cfg,
        state.tp_size,
        state.pp_size,
        state.vpp_size,
        state.pp_rank,
        state.tp_rank,
        head,
    )
    last_own = shard[-1]
    model_head = {
        n: t.detach().clone()
        for n, t in chunks[-1].state_dict().items()
        if n in (MCORE_SCORE, MCORE_SCORE_BIAS)
    }
    if head == HEAD_LM and model_head:
        last_own.pop(MCORE_OUTPUT, None)
        last_own.update(model_head)
        if state.tp_rank == 0 and state.dp_rank == 0:
            logger.info("scalar-head model from a causal-LM state: head kept as initialised")
    load_into_model_chunks(chunks, shard)


def gather_hf_state(
    chunks: list[torch.nn.Module],
    state,
    model_cfg: ModelConfig,
    dst: int = 0,
    group=None,
    head: str | None = None,
) -> dict[str, torch.Tensor] | None:
    """Gather all ranks' chunks to global rank ``dst`` and return the HF state there.

    Collective over ``group`` (default: the whole world; every rank must call it). Only
    data-parallel rank 0 of each model-parallel rank sends tensors (CPU copies, pickled,
    so it works on gloo and nccl). Other ranks return None. Meant for small to medium
    models: rank ``dst`` holds the whole model in CPU memory.
    """
    mine = None
    if state.dp_rank == 0:
        mine = ((state.pp_rank, state.tp_rank), state_from_model_chunks(chunks))
    gathered = gather_objects(mine, dst, group if group is not None else world())
    if gathered is None:  # not the destination rank
        return None
    shards = dict(item for item in gathered if item is not None)
    return megatron_to_hf(shards, model_cfg, state.tp_size, state.pp_size, state.vpp_size, head)
