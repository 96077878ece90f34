"""Training layout -> generation layout of the actor's weights, stamped with a policy version.

The engine runs the whole decoder on every rank of a TP group (no pipeline stages):

* training PP = 1: the generation weights *are* the training parameters (the same tensors,
  no copy; ``data_ptr()`` equal), so an optimizer step is visible to the next generation
  without any hand-off;
* training PP > 1: every rank all-gathers, over its pipeline group, the layer shards of its
  TP rank, so each rank holds all layers of its TP shard (TP=2 x PP=2 training -> TP=2
  generation on each pipeline stage). Embeddings come from the first stage, the final norm
  and LM head from the last. This is a copy, refreshed by every ``sync``.

Each sync stamps a policy version; ``GenerationEngine.generate(..., policy_version=v)``
refuses to run on weights of another version (``StaleWeightsError``).

Parameters are read by their megatron names from ``models/hf_names.py`` (the converter's
table), so the engine and the checkpoint converter cannot disagree on a name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from hpc_rlhf.config import ModelConfig
from hpc_rlhf.models.hf_names import (
    MCORE_EMBEDDING,
    MCORE_FINAL_NORM,
    MCORE_OUTPUT,
    mcore_layer_names,
)
from hpc_rlhf.models.param_layout import Layout
from hpc_rlhf.parallel.comm import all_gather_tensors, broadcast_tensor

logger = logging.getLogger(__name__)


class StaleWeightsError(RuntimeError):
    """The engine's weights are not of the policy version the caller asked for."""


@dataclass
class LayerWeights:
    """One decoder layer of this TP rank (megatron layouts, see ``models/param_layout.py``)."""

    in_norm_H: torch.Tensor
    qkv_RH: torch.Tensor  # [(nh + 2 ng)/tp * d, H], rows per local group [q..; k; v]
    proj_HQ: torch.Tensor  # [H, nh d / tp]
    mlp_norm_H: torch.Tensor
    fc1_FH: torch.Tensor  # [2 F/tp, H] = [gate shard; up shard]
    fc2_HF: torch.Tensor  # [H, F/tp]
    qkv_bias_R: torch.Tensor | None = None  # [(nh + 2 ng)/tp * d] (Qwen2), grouped as qkv_RH
    q_norm_D: torch.Tensor | None = None  # [d] per-head query RMSNorm weight (Qwen3)
    k_norm_D: torch.Tensor | None = None  # [d] per-head key RMSNorm weight (Qwen3)

    def present(self) -> dict[str, torch.Tensor]:
        """The tensors this layer has, by field name."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class GenerationWeights:
    """All layers of this TP rank's shard, plus embeddings, final norm and LM head."""

    embedding_vH: torch.Tensor  # [V/tp, H] rows of this TP rank's vocabulary range
    layers: list[LayerWeights]
    final_norm_H: torch.Tensor
    output_vH: torch.Tensor  # [V/tp, H] (the embeddings when tied)
    version: int | None
    in_place: bool  # True: the training parameters themselves

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor (with repeats for tied weights)."""
        out = [self.embedding_vH, self.final_norm_H, self.output_vH]
        for layer in self.layers:
            out += list(layer.present().values())
        return out


def _layer_tensors(chunk, index: int, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Local layer ``index``'s parameters of ``chunk`` by role (the tensors themselves)."""
    names = mcore_layer_names(index, model_cfg)
    return {role: chunk.get_parameter(name) for role, name in names.items()}


def _make_layer(t: dict[str, torch.Tensor]) -> LayerWeights:
    """``LayerWeights`` from one layer's tensors by role (the family's optional ones too)."""
    return LayerWeights(
        t["in_norm"],
        t["qkv"],
        t["proj"],
        t["mlp_norm"],
        t["fc1"],
        t["fc2"],
        qkv_bias_R=t.get("qkv_bias"),
        q_norm_D=t.get("q_norm"),
        k_norm_D=t.get("k_norm"),
    )


def _output_weight(chunk, model_cfg: ModelConfig) -> torch.Tensor:
    """The LM head weight of a last-stage chunk (the word embeddings when tied)."""
    if model_cfg.tie_word_embeddings:
        return chunk.shared_embedding_or_output_weight()
    return chunk.get_parameter(MCORE_OUTPUT)


def weights_in_place(
    chunks: list, model_cfg: ModelConfig, version: int | None
) -> GenerationWeights:
    """The training parameters of a single-stage model, used as they are (no copy)."""
    if len(chunks) != 1:
        raise ValueError("in-place generation weights need one model chunk (no pipeline)")
    chunk = chunks[0]
    layers = [
        _make_layer(_layer_tensors(chunk, i, model_cfg)) for i in range(len(chunk.decoder.layers))
    ]
    return GenerationWeights(
        embedding_vH=chunk.get_parameter(MCORE_EMBEDDING),
        layers=layers,
        final_norm_H=chunk.get_parameter(MCORE_FINAL_NORM),
        output_vH=_output_weight(chunk, model_cfg),
        version=version,
        in_place=True,
    )


def _pp_broadcast(tensor: torch.Tensor | None, shape, dtype, src_stage: int, state) -> torch.Tensor:
    """``tensor`` of pipeline stage ``src_stage`` on every rank of the pipeline group."""
    buf = tensor.detach().clone() if tensor is not None else torch.empty(shape, dtype=dtype)
    return broadcast_tensor(buf, src_stage, state.pp_group)


def gather_pipeline_weights(
    chunks: list, state, model_cfg: ModelConfig, version: int | None
) -> GenerationWeights:
    """All layers of this TP shard on every pipeline rank (collective over the PP group)."""
    layout = Layout(model_cfg, state.tp_size, state.pp_size, state.vpp_size)
    local: list[dict[str, torch.Tensor]] = []
    index_l: list[int] = []
    for c, chunk in enumerate(chunks):
        offset = layout.layer_offset(state.pp_rank, c)
        for i in range(len(chunk.decoder.layers)):
            local.append(_layer_tensors(chunk, i, model_cfg))
            index_l.append(offset + i)
    pp = state.pp_size
    indices = all_gather_tensors(torch.tensor(index_l), state.pp_group)
    order = torch.cat(indices).argsort().tolist()  # gathered position of global layer i
    gathered: dict[str, list[torch.Tensor]] = {}
    roles = list(local[0])
    for role in roles:
        mine = torch.stack([t[role].detach() for t in local])
        parts = all_gather_tensors(mine, state.pp_group)
        flat = [layer for part in parts for layer in part.unbind(0)]
        gathered[role] = [flat[k].clone() for k in order]
    layers = [_make_layer({r: gathered[r][i] for r in roles}) for i in range(len(order))]
    H, v = model_cfg.hidden_size, model_cfg.vocab_size // state.tp_size
    dtype = layers[0].qkv_RH.dtype
    first, last = chunks[0], chunks[-1]
    emb = first.get_parameter(MCORE_EMBEDDING) if state.is_first_stage else None
    embedding = _pp_broadcast(emb, (v, H), dtype, 0, state)
    norm = last.get_parameter(MCORE_FINAL_NORM) if state.is_last_stage else None
    final_norm = _pp_broadcast(norm, (H,), dtype, pp - 1, state)
    if model_cfg.tie_word_embeddings:
        output = embedding
    else:
        out = last.get_parameter(MCORE_OUTPUT) if state.is_last_stage else None
        output = _pp_broadcast(out, (v, H), dtype, pp - 1, state)
    return GenerationWeights(embedding, layers, final_norm, output, version, in_place=False)


def generation_weights(
    chunks: list, state, model_cfg: ModelConfig, version: int | None
) -> GenerationWeights:
    """In place for PP = 1, gathered along the pipeline group otherwise."""
    if state.pp_size == 1:
        return weights_in_place(chunks, model_cfg, version)
    weights = gather_pipeline_weights(chunks, state, model_cfg, version)
    nbytes = sum(
        t.numel() * t.element_size() for layer in weights.layers for t in layer.present().values()
    )
    if state.rank == 0:
        logger.info(
            "generation weights: gathered %d layers over PP=%d (%.1f MB of layer copies per rank)",
            len(weights.layers),
            state.pp_size,
            nbytes / 2**20,
        )
    return weights
