"""Pure tensor resharding: one HF Llama-family state dict <-> megatron-core chunk state dicts.

``hf_to_megatron`` splits one HF state dict into the per-rank chunk state dicts that
``build_model_chunks`` creates, ``megatron_to_hf`` merges them back. Both are bit-exact
(slices and concatenations only, dtypes kept). No files, no process groups: the layout and
shapes are in ``param_layout``, the names in ``hf_names``.

Both sides apply RoPE rotate-half style, so q/k rows need no permutation (pinned by
``tests/models/test_hf_parity.py`` against ``transformers``). HF has no bias on the
reward/critic ``score`` layer: export drops the ``ScalarHead`` bias when it is zero and
refuses otherwise.
"""

from __future__ import annotations

import logging

import torch

from hpc_rlhf.config import ModelConfig
from hpc_rlhf.models.hf_names import (
    HEAD_SCORE,
    HF_EMBEDDING,
    HF_FINAL_NORM,
    HF_LM_HEAD,
    HF_SCORE,
    MCORE_EMBEDDING,
    MCORE_FINAL_NORM,
    MCORE_OUTPUT,
    MCORE_SCORE,
    MCORE_SCORE_BIAS,
    ConversionError,
    hf_layer_names,
    mcore_layer_names,
)
from hpc_rlhf.models.param_layout import (
    Layout,
    check_hf_state,
    check_shards,
    detect_head,
    detect_shards_head,
    hf_shapes,
)

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- HF -> megatron


def _own(t: torch.Tensor) -> torch.Tensor:
    """A compact copy (a saved view would otherwise drag its whole storage along)."""
    return t.clone(memory_format=torch.contiguous_format)


def _split(t: torch.Tensor, tp: int, rank: int, dim: int) -> torch.Tensor:
    """TP rank ``rank``'s slice of ``t`` along ``dim`` (a compact copy)."""
    return _own(t.chunk(tp, dim=dim)[rank])


def _qkv_shard(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig, tp: int, rank: int
) -> torch.Tensor:
    """This TP rank's fused QKV rows (weights ``[rows, H]`` or biases ``[rows]``): per
    local query group ``[q heads; k; v]``."""
    ng, d = m.query_groups, m.head_dim
    per_group = m.num_attention_heads // ng
    rest = tuple(q.shape[1:])
    q_GQ_ = q.reshape(ng, per_group * d, *rest)
    k_GD_, v_GD_ = k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)
    groups = slice(rank * ng // tp, (rank + 1) * ng // tp)
    qkv_gR_ = torch.cat([q_GQ_[groups], k_GD_[groups], v_GD_[groups]], dim=1)
    return _own(qkv_gR_.reshape(-1, *rest))  # [(nh + 2 ng)/tp * d, ...]


def _layer_shard(hf: dict, i_hf: int, i_local: int, m: ModelConfig, tp: int, rank: int) -> dict:
    """TP rank ``rank``'s tensors of HF layer ``i_hf``, named as local layer ``i_local``."""
    src, dst = hf_layer_names(i_hf, m), mcore_layer_names(i_local, m)
    gate_FH, up_FH = hf[src["gate"]], hf[src["up"]]
    out = {
        dst["in_norm"]: _own(hf[src["in_norm"]]),
        dst["mlp_norm"]: _own(hf[src["mlp_norm"]]),
        dst["qkv"]: _qkv_shard(hf[src["q"]], hf[src["k"]], hf[src["v"]], m, tp, rank),
        dst["proj"]: _split(hf[src["o"]], tp, rank, dim=1),
        dst["fc1"]: torch.cat([_split(gate_FH, tp, rank, 0), _split(up_FH, tp, rank, 0)]),
        dst["fc2"]: _split(hf[src["down"]], tp, rank, dim=1),
    }
    if m.qkv_bias:
        biases = (hf[src["q_bias"]], hf[src["k_bias"]], hf[src["v_bias"]])
        out[dst["qkv_bias"]] = _qkv_shard(*biases, m, tp, rank)
    if m.qk_norm:
        out[dst["q_norm"]], out[dst["k_norm"]] = _own(hf[src["q_norm"]]), _own(hf[src["k_norm"]])
    return out


def _chunk_shard(hf: dict, layout: Layout, pp_rank: int, tp_rank: int, chunk: int, head: str):
    """The state dict of one chunk of rank ``(pp_rank, tp_rank)``."""
    m, tp = layout.model, layout.tp
    out: dict[str, torch.Tensor] = {}
    if layout.is_first(pp_rank, chunk):
        out[MCORE_EMBEDDING] = _split(hf[HF_EMBEDDING], tp, tp_rank, 0)
    offset = layout.layer_offset(pp_rank, chunk)
    for i in range(layout.layers_per_chunk):
        out.update(_layer_shard(hf, offset + i, i, m, tp, tp_rank))
    if layout.is_last(pp_rank, chunk):
        out[MCORE_FINAL_NORM] = _own(hf[HF_FINAL_NORM])
        if head == HEAD_SCORE:
            score_1H = hf[HF_SCORE]
            out[MCORE_SCORE] = _own(score_1H)  # no bias: a critic's starts at zero on load
        elif layout.has_output_weight(pp_rank, chunk, head):
            name = HF_EMBEDDING if m.tie_word_embeddings else HF_LM_HEAD
            out[MCORE_OUTPUT] = _split(hf[name], tp, tp_rank, 0)
    return out


def hf_to_megatron_rank(
    hf_state: dict,
    model_cfg: ModelConfig,
    tp: int,
    pp: int,
    vpp: int | None,
    pp_rank: int,
    tp_rank: int,
    head: str | None = None,
) -> list[dict]:
    """The chunk state dicts (one per virtual stage) of rank ``(pp_rank, tp_rank)``."""
    layout = Layout(model_cfg, tp, pp, vpp)
    head = head or detect_head(hf_state)
    check_hf_state(hf_state, model_cfg, head)
    if not (0 <= pp_rank < pp and 0 <= tp_rank < tp):
        raise ConversionError(f"rank (pp={pp_rank}, tp={tp_rank}) is outside pp={pp} x tp={tp}")
    return [
        _chunk_shard(hf_state, layout, pp_rank, tp_rank, c, head) for c in range(layout.num_chunks)
    ]


def hf_to_megatron(
    hf_state: dict,
    model_cfg: ModelConfig,
    tp: int,
    pp: int,
    vpp: int | None = None,
    head: str | None = None,
) -> dict[tuple[int, int], list[dict]]:
    """Split an HF state into ``{(pp_rank, tp_rank): [chunk state dict per virtual stage]}``.

    ``head`` is ``"lm"`` or ``"score"`` (reward/critic ``ScalarHead``, bias set to zero);
    by default ``"score"`` iff the HF state has ``score.weight``. Raises ``ConversionError``
    for missing/unexpected/misshapen tensors and ``ConfigError`` when TP does not divide
    heads, query groups, FFN or vocabulary, or PP x VPP does not divide the layers.
    """
    layout = Layout(model_cfg, tp, pp, vpp)
    head = head or detect_head(hf_state)
    check_hf_state(hf_state, model_cfg, head)
    return {
        (p, t): [_chunk_shard(hf_state, layout, p, t, c, head) for c in range(layout.num_chunks)]
        for p, t in layout.ranks()
    }


# ----------------------------------------------------------------------------- megatron -> HF


def _replicated(shards_tp: list[dict], name: str) -> torch.Tensor:
    """A TP-replicated tensor (rank 0's copy; a warning if the ranks disagree)."""
    first = shards_tp[0][name]
    if any(not torch.equal(first, s[name]) for s in shards_tp[1:]):
        logger.warning("replicated tensor %r differs across TP ranks; using TP rank 0", name)
    return _own(first)


def _qkv_merge(qkv_shards: list[torch.Tensor], m: ModelConfig) -> tuple:
    """HF ``(q, k, v)`` from every TP rank's fused QKV rows, weights or biases (the inverse
    of ``_qkv_shard``)."""
    ng, d = m.query_groups, m.head_dim
    per_group = m.num_attention_heads // ng
    rest = tuple(qkv_shards[0].shape[1:])
    qkv_GR_ = torch.cat(qkv_shards, dim=0).reshape(ng, (per_group + 2) * d, *rest)
    q_GQ_, k_GD_, v_GD_ = qkv_GR_.split([per_group * d, d, d], dim=1)
    return tuple(_own(t.reshape(-1, *rest)) for t in (q_GQ_, k_GD_, v_GD_))


def _layer_merge(shards_tp: list[dict], i_local: int, i_hf: int, m: ModelConfig) -> dict:
    """HF layer ``i_hf`` from local layer ``i_local`` of every TP rank's chunk."""
    src, dst = mcore_layer_names(i_local, m), hf_layer_names(i_hf, m)
    F_tp = m.ffn_hidden_size // len(shards_tp)
    fc1 = [s[src["fc1"]] for s in shards_tp]  # each [2 F/tp, H]
    q, k, v = _qkv_merge([s[src["qkv"]] for s in shards_tp], m)
    out = {
        dst["q"]: q,
        dst["k"]: k,
        dst["v"]: v,
        dst["o"]: torch.cat([s[src["proj"]] for s in shards_tp], dim=1),
        dst["gate"]: torch.cat([t[:F_tp] for t in fc1], dim=0),
        dst["up"]: torch.cat([t[F_tp:] for t in fc1], dim=0),
        dst["down"]: torch.cat([s[src["fc2"]] for s in shards_tp], dim=1),
        dst["in_norm"]: _replicated(shards_tp, src["in_norm"]),
        dst["mlp_norm"]: _replicated(shards_tp, src["mlp_norm"]),
    }
    if m.qkv_bias:
        biases = _qkv_merge([s[src["qkv_bias"]] for s in shards_tp], m)
        out.update(zip((dst["q_bias"], dst["k_bias"], dst["v_bias"]), biases))
    if m.qk_norm:
        out[dst["q_norm"]] = _replicated(shards_tp, src["q_norm"])
        out[dst["k_norm"]] = _replicated(shards_tp, src["k_norm"])
    return out


def _head_merge(shards_tp: list[dict], hf: dict, m: ModelConfig, head: str) -> None:
    """Final norm and output layer of the last chunk into ``hf`` (in place)."""
    hf[HF_FINAL_NORM] = _replicated(shards_tp, MCORE_FINAL_NORM)
    if head == HEAD_SCORE:
        bias = shards_tp[0].get(MCORE_SCORE_BIAS)
        if bias is not None and bool(bias.ne(0).any()):
            raise ConversionError(
                f"score head bias is {bias.tolist()}, not zero: HF "
                "LlamaForSequenceClassification's score layer has no bias"
            )
        hf[HF_SCORE] = _replicated(shards_tp, MCORE_SCORE)
        return
    if MCORE_OUTPUT not in shards_tp[0]:
        return  # tied embeddings on a single stage: no separate output weight
    out_VH = torch.cat([s[MCORE_OUTPUT] for s in shards_tp], dim=0)
    if not m.tie_word_embeddings:
        hf[HF_LM_HEAD] = out_VH
    elif not torch.equal(out_VH, hf[HF_EMBEDDING]):
        logger.warning(
            "tied embeddings: the last stage's output_layer.weight differs from the first "
            "stage's word embeddings; exporting the word embeddings"
        )


def megatron_to_hf(
    shards: dict[tuple[int, int], list[dict]],
    model_cfg: ModelConfig,
    tp: int,
    pp: int,
    vpp: int | None = None,
    head: str | None = None,
) -> dict[str, torch.Tensor]:
    """Merge ``{(pp_rank, tp_rank): [chunk state dicts]}`` into one HF Llama state dict.

    The inverse of ``hf_to_megatron`` (bit-exact). ``_extra_state`` entries are ignored. A
    scalar head's bias is dropped when zero; a nonzero bias raises ``ConversionError``.
    """
    layout = Layout(model_cfg, tp, pp, vpp)
    head = head or detect_shards_head(shards)
    check_shards(shards, layout, head)
    hf: dict[str, torch.Tensor] = {}
    first = [shards[(0, t)][0] for t in range(tp)]
    hf[HF_EMBEDDING] = torch.cat([s[MCORE_EMBEDDING] for s in first], dim=0)
    for c in range(layout.num_chunks):
        for p in range(pp):
            shards_tp = [shards[(p, t)][c] for t in range(tp)]
            offset = layout.layer_offset(p, c)
            for i in range(layout.layers_per_chunk):
                hf.update(_layer_merge(shards_tp, i, offset + i, model_cfg))
    last = [shards[(pp - 1, t)][layout.num_chunks - 1] for t in range(tp)]
    _head_merge(last, hf, model_cfg, head)
    order = list(hf_shapes(model_cfg, head))
    return {name: hf[name] for name in order}
