"""HF Llama-style checkpoints <-> megatron-core state dicts in any TP x PP (x virtual) layout.

Pure tensor resharding: ``hf_to_megatron`` splits one HF state dict into the per-rank chunk
state dicts that ``build_model_chunks`` creates, ``megatron_to_hf`` merges them back. Both
are bit-exact (slices and concatenations only, dtypes kept). The rest of the module reads
and writes HF directories (``config.json`` + safetensors, sharded or not), loads a rank's
shard into its live model chunks and gathers all ranks' chunks back into an HF state.

Megatron layout of one chunk (local spec; the transformer-engine spec keeps the norms
inside the following linear layers, see ``_NORM_NAMES``):

* ``embedding.word_embeddings.weight`` [V/tp, H]: first chunk of the first stage only.
* ``decoder.layers.{i}.self_attention.linear_qkv.weight`` [(nh + 2 ng)/tp * d, H]: rows
  grouped per query group ``[q of its nh/ng heads; k; v]``; TP splits whole groups.
* ``...linear_proj.weight`` [H, nh d/tp], ``mlp.linear_fc2.weight`` [H, F/tp]: row parallel.
* ``mlp.linear_fc1.weight`` [2 F/tp, H]: ``[gate shard; up shard]`` of this rank.
* ``decoder.final_layernorm.weight`` and ``output_layer.weight`` [V/tp, H] (LM head) or
  ``output_layer.linear.{weight,bias}`` (scalar head) on the last chunk of the last stage.
  Tied embeddings: no output layer weight when one chunk is both first and last, else a
  copy of the word embeddings on the last stage.

Layer ``i`` of chunk ``c`` on stage ``p`` is global layer ``c * L/vpp + p * L/(pp vpp) + i``,
as megatron-core's ``get_transformer_layer_offset`` (uniform split, no embedding/loss
accounting; uneven first/last stages are not supported, ``build.py`` does not use them).

Both sides apply RoPE rotate-half style, so q/k rows need no permutation (pinned by
``tests/models/test_hf_parity.py`` against ``transformers``). HF has no bias on the
reward/critic ``score`` layer: export drops the ``ScalarHead`` bias when it is zero and
refuses otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from hpc_rlhf.config import ModelConfig, ParallelConfig, config_from_dict

logger = logging.getLogger(__name__)


class ConversionError(ValueError):
    """A checkpoint or layout cannot be converted; the message names the problem."""


HEAD_LM, HEAD_SCORE = "lm", "score"
EXTRA_STATE = "_extra_state"

# Megatron names of the two per-layer norms for each ``ModelConfig.transformer_impl``.
_NORM_NAMES = {
    "local": ("input_layernorm.weight", "pre_mlp_layernorm.weight"),
    "transformer_engine": (
        "self_attention.linear_qkv.layer_norm_weight",
        "mlp.linear_fc1.layer_norm_weight",
    ),
}

_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_HF_DTYPE_NAMES = {v: k for k, v in _HF_DTYPES.items()}

# ----------------------------------------------------------------------------- config


def _reject(hf_config: dict, key: str, allowed) -> None:
    value = hf_config.get(key)
    if value not in allowed:
        raise ConversionError(
            f"HF config field {key!r}={value!r} is not supported (supported: {allowed})"
        )


def _rope_theta(hf_config: dict) -> float:
    """RoPE base from ``rope_theta`` (transformers 4) or ``rope_parameters`` (5)."""
    _reject(hf_config, "rope_scaling", (None,))
    params = hf_config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConversionError(f"HF config field 'rope_parameters'={params!r} is not a mapping")
    if params.get("rope_type", "default") != "default":
        raise ConversionError(
            f"HF config field 'rope_parameters.rope_type'={params['rope_type']!r} is not "
            "supported (only 'default' RoPE)"
        )
    extra = sorted(set(params) - {"rope_type", "rope_theta"})
    if extra:
        raise ConversionError(f"HF config field 'rope_parameters' has unsupported keys {extra}")
    return float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))


def model_config_from_hf(hf_config: dict, **overrides) -> ModelConfig:
    """``ModelConfig`` from an HF Llama ``config.json`` dict (``overrides`` replace fields).

    Raises ``ConversionError`` naming the field for features the megatron model lacks
    (RoPE scaling, attention/MLP biases, activations other than SiLU, odd head sizes).
    """
    _reject(hf_config, "model_type", ("llama",))
    _reject(hf_config, "attention_bias", (None, False))
    _reject(hf_config, "mlp_bias", (None, False))
    _reject(hf_config, "hidden_act", (None, "silu"))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf_config.get(key), int):
            raise ConversionError(f"HF config field {key!r} is missing or not an integer")
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and head_dim * heads != hf_config["hidden_size"]:
        raise ConversionError(
            f"HF config field 'head_dim'={head_dim} is not hidden_size / num_attention_heads"
        )
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if dtype not in _HF_DTYPES:
        raise ConversionError(f"HF config field 'dtype'={dtype!r} is not one of {list(_HF_DTYPES)}")
    kv_heads = hf_config.get("num_key_value_heads") or heads
    values = dict(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hf_config["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=None if kv_heads == heads else kv_heads,
        ffn_hidden_size=hf_config["intermediate_size"],
        vocab_size=hf_config.get("vocab_size", 32000),
        max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
        rotary_base=_rope_theta(hf_config),
        norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        params_dtype=_HF_DTYPES[dtype],
        init_method_std=float(hf_config.get("initializer_range", 0.02)),
    )
    values.update(overrides)
    cfg = ModelConfig(**values)
    cfg.validate()
    return cfg


def hf_config_from_model(model_cfg: ModelConfig, head: str = HEAD_LM) -> dict:
    """HF ``config.json`` dict (Llama) for ``model_cfg``; ``head="score"`` for a scalar head."""
    rope = {"rope_type": "default", "rope_theta": float(model_cfg.rotary_base)}
    hf = {
        "architectures": [
            "LlamaForCausalLM" if head == HEAD_LM else "LlamaForSequenceClassification"
        ],
        "model_type": "llama",
        "hidden_size": model_cfg.hidden_size,
        "intermediate_size": model_cfg.ffn_hidden_size,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_attention_heads,
        "num_key_value_heads": model_cfg.query_groups,
        "head_dim": model_cfg.head_dim,
        "vocab_size": model_cfg.vocab_size,
        "max_position_embeddings": model_cfg.max_position_embeddings,
        "rms_norm_eps": model_cfg.norm_epsilon,
        "rope_theta": float(model_cfg.rotary_base),  # transformers 4 reads this
        "rope_parameters": rope,  # transformers 5 reads this
        "rope_scaling": None,
        "tie_word_embeddings": model_cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": model_cfg.init_method_std,
        "dtype": _HF_DTYPE_NAMES[model_cfg.params_dtype],
        "torch_dtype": _HF_DTYPE_NAMES[model_cfg.params_dtype],
    }
    if head == HEAD_SCORE:
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return hf


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """A TP x PP (x virtual stages) layout of ``model`` and where its layers live."""

    model: ModelConfig
    tp: int
    pp: int
    vpp: int | None = None

    def __post_init__(self):
        self.model.validate()
        ParallelConfig(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp,
        ).validate(self.model)

    @property
    def num_chunks(self) -> int:
        """Model chunks per rank: the virtual stages, or 1."""
        return self.vpp or 1

    @property
    def layers_per_chunk(self) -> int:
        """Transformer layers in every chunk (uniform split)."""
        return self.model.num_layers // (self.pp * self.num_chunks)

    def layer_offset(self, pp_rank: int, chunk: int) -> int:
        """Global index of local layer 0 of ``chunk`` on stage ``pp_rank``."""
        return chunk * (self.model.num_layers // self.num_chunks) + pp_rank * self.layers_per_chunk

    def is_first(self, pp_rank: int, chunk: int) -> bool:
        """Whether this chunk holds the word embeddings (megatron's ``pre_process``)."""
        return pp_rank == 0 and chunk == 0

    def is_last(self, pp_rank: int, chunk: int) -> bool:
        """Whether this chunk holds the final norm and head (megatron's ``post_process``)."""
        return pp_rank == self.pp - 1 and chunk == self.num_chunks - 1

    def has_output_weight(self, pp_rank: int, chunk: int, head: str) -> bool:
        """Whether this chunk holds an ``output_layer`` weight (tied: only a PP copy)."""
        if not self.is_last(pp_rank, chunk):
            return False
        tied = self.model.tie_word_embeddings and head == HEAD_LM
        return not (tied and self.is_first(pp_rank, chunk))

    def ranks(self) -> Iterator[tuple[int, int]]:
        """Every ``(pp_rank, tp_rank)`` of the layout, pipeline-major."""
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                yield pp_rank, tp_rank


def _norm_names(model_cfg: ModelConfig) -> tuple[str, str]:
    if model_cfg.transformer_impl not in _NORM_NAMES:
        raise ConversionError(f"unknown model.transformer_impl={model_cfg.transformer_impl!r}")
    return _NORM_NAMES[model_cfg.transformer_impl]


def _hf_layer(i: int) -> dict[str, str]:
    """HF names of global layer ``i``'s tensors, keyed by a short role name."""
    p = f"model.layers.{i}."
    return {
        "in_norm": p + "input_layernorm.weight",
        "mlp_norm": p + "post_attention_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "o": p + "self_attn.o_proj.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }


def _mcore_layer(i: int, model_cfg: ModelConfig) -> dict[str, str]:
    """Megatron names of local layer ``i``'s tensors, keyed like ``_hf_layer``."""
    p = f"decoder.layers.{i}."
    in_norm, mlp_norm = _norm_names(model_cfg)
    return {
        "in_norm": p + in_norm,
        "mlp_norm": p + mlp_norm,
        "qkv": p + "self_attention.linear_qkv.weight",
        "o": p + "self_attention.linear_proj.weight",
        "fc1": p + "mlp.linear_fc1.weight",
        "fc2": p + "mlp.linear_fc2.weight",
    }


def hf_shapes(model_cfg: ModelConfig, head: str = HEAD_LM) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the HF model with its expected shape, in HF order."""
    m = model_cfg
    H, d, F, V = m.hidden_size, m.head_dim, m.ffn_hidden_size, m.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    per_layer: dict[str, tuple[int, ...]] = {
        "in_norm": (H,),
        "mlp_norm": (H,),
        "q": (m.num_attention_heads * d, H),
        "k": (m.query_groups * d, H),
        "v": (m.query_groups * d, H),
        "o": (H, m.num_attention_heads * d),
        "gate": (F, H),
        "up": (F, H),
        "down": (H, F),
    }
    for i in range(m.num_layers):
        for role, name in _hf_layer(i).items():
            shapes[name] = per_layer[role]
    shapes["model.norm.weight"] = (H,)
    if head == HEAD_SCORE:
        shapes["score.weight"] = (1, H)
    elif not m.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def detect_head(hf_state: dict) -> str:
    """``"score"`` when the HF state has a ``score.weight`` (reward/critic), else ``"lm"``."""
    return HEAD_SCORE if "score.weight" in hf_state else HEAD_LM


def check_hf_state(hf_state: dict, model_cfg: ModelConfig, head: str = HEAD_LM) -> None:
    """Raise ``ConversionError`` for missing, unexpected or misshapen HF tensors."""
    expected = hf_shapes(model_cfg, head)
    missing = [name for name in expected if name not in hf_state]
    if missing:
        raise ConversionError(f"HF state is missing tensor(s) {missing[:5]}")
    tolerated = {"lm_head.weight"} if model_cfg.tie_word_embeddings else set()
    unexpected = [
        name
        for name in hf_state
        if name not in expected and name not in tolerated and not name.endswith("inv_freq")
    ]
    if unexpected:
        raise ConversionError(
            f"HF state has tensor(s) {unexpected[:5]} that a model with this config does not "
            f"have (num_layers={model_cfg.num_layers}, tie_word_embeddings="
            f"{model_cfg.tie_word_embeddings}, head={head!r})"
        )
    for name, shape in expected.items():
        if tuple(hf_state[name].shape) != shape:
            raise ConversionError(
                f"HF tensor {name!r} has shape {tuple(hf_state[name].shape)}, expected {shape}"
            )
    if "lm_head.weight" in tolerated and "lm_head.weight" in hf_state:
        if not torch.equal(hf_state["lm_head.weight"], hf_state["model.embed_tokens.weight"]):
            raise ConversionError(
                "tie_word_embeddings=True but HF 'lm_head.weight' differs from "
                "'model.embed_tokens.weight'"
            )


def mcore_chunk_shapes(
    layout: Layout, pp_rank: int, chunk: int, head: str = HEAD_LM
) -> dict[str, tuple[int, ...]]:
    """Every tensor name of one megatron chunk (no ``_extra_state``) with its shape."""
    m, tp = layout.model, layout.tp
    H, d, F, V = m.hidden_size, m.head_dim, m.ffn_hidden_size, m.vocab_size
    shapes: dict[str, tuple[int, ...]] = {}
    if layout.is_first(pp_rank, chunk):
        shapes["embedding.word_embeddings.weight"] = (V // tp, H)
    per_layer = {
        "in_norm": (H,),
        "mlp_norm": (H,),
        "qkv": ((m.num_attention_heads + 2 * m.query_groups) * d // tp, H),
        "o": (H, m.num_attention_heads * d // tp),
        "fc1": (2 * F // tp, H),
        "fc2": (H, F // tp),
    }
    for i in range(layout.layers_per_chunk):
        for role, name in _mcore_layer(i, m).items():
            shapes[name] = per_layer[role]
    if layout.is_last(pp_rank, chunk):
        shapes["decoder.final_layernorm.weight"] = (H,)
        if head == HEAD_SCORE:
            shapes["output_layer.linear.weight"] = (1, H)
            shapes["output_layer.linear.bias"] = (1,)
        elif layout.has_output_weight(pp_rank, chunk, head):
            shapes["output_layer.weight"] = (V // tp, H)
    return shapes


# ----------------------------------------------------------------------------- resharding


def _own(t: torch.Tensor) -> torch.Tensor:
    """A compact copy (a saved view would otherwise drag its whole storage along)."""
    return t.clone(memory_format=torch.contiguous_format)


def _split(t: torch.Tensor, tp: int, rank: int, dim: int) -> torch.Tensor:
    return _own(t.chunk(tp, dim=dim)[rank])


def _qkv_shard(hf: dict, names: dict, m: ModelConfig, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's fused QKV rows: per local query group ``[q heads; k; v]``."""
    ng, d = m.query_groups, m.head_dim
    per_group = m.num_attention_heads // ng
    H = hf[names["q"]].shape[1]
    q_GQH = hf[names["q"]].reshape(ng, per_group * d, H)
    k_GDH = hf[names["k"]].reshape(ng, d, H)
    v_GDH = hf[names["v"]].reshape(ng, d, H)
    groups = slice(rank * ng // tp, (rank + 1) * ng // tp)
    qkv_gRH = torch.cat([q_GQH[groups], k_GDH[groups], v_GDH[groups]], dim=1)
    return _own(qkv_gRH.reshape(-1, H))  # [(nh + 2 ng)/tp * d, H]


def _layer_shard(hf: dict, i_hf: int, i_local: int, m: ModelConfig, tp: int, rank: int) -> dict:
    src, dst = _hf_layer(i_hf), _mcore_layer(i_local, m)
    gate_FH, up_FH = hf[src["gate"]], hf[src["up"]]
    return {
        dst["in_norm"]: _own(hf[src["in_norm"]]),
        dst["mlp_norm"]: _own(hf[src["mlp_norm"]]),
        dst["qkv"]: _qkv_shard(hf, src, m, tp, rank),
        dst["o"]: _split(hf[src["o"]], tp, rank, dim=1),
        dst["fc1"]: torch.cat([_split(gate_FH, tp, rank, 0), _split(up_FH, tp, rank, 0)]),
        dst["fc2"]: _split(hf[src["down"]], tp, rank, dim=1),
    }


def _chunk_shard(hf: dict, layout: Layout, pp_rank: int, tp_rank: int, chunk: int, head: str):
    m, tp = layout.model, layout.tp
    out: dict[str, torch.Tensor] = {}
    if layout.is_first(pp_rank, chunk):
        out["embedding.word_embeddings.weight"] = _split(
            hf["model.embed_tokens.weight"], tp, tp_rank, 0
        )
    offset = layout.layer_offset(pp_rank, chunk)
    for i in range(layout.layers_per_chunk):
        out.update(_layer_shard(hf, offset + i, i, m, tp, tp_rank))
    if layout.is_last(pp_rank, chunk):
        out["decoder.final_layernorm.weight"] = _own(hf["model.norm.weight"])
        if head == HEAD_SCORE:
            score_1H = hf["score.weight"]
            out["output_layer.linear.weight"] = _own(score_1H)
            out["output_layer.linear.bias"] = torch.zeros(1, dtype=score_1H.dtype)
        elif layout.has_output_weight(pp_rank, chunk, head):
            name = "model.embed_tokens.weight" if m.tie_word_embeddings else "lm_head.weight"
            out["output_layer.weight"] = _split(hf[name], tp, tp_rank, 0)
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


def detect_shards_head(shards: dict) -> str:
    """``"score"`` when the shards hold a ``ScalarHead`` output layer, else ``"lm"``."""
    for chunks in shards.values():
        for chunk in chunks:
            if "output_layer.linear.weight" in chunk:
                return HEAD_SCORE
    return HEAD_LM


def check_shards(shards: dict, layout: Layout, head: str) -> None:
    """Raise ``ConversionError`` unless ``shards`` has every rank, chunk and tensor shape."""
    expected_ranks = set(layout.ranks())
    if set(shards) != expected_ranks:
        raise ConversionError(
            f"shards are for ranks {sorted(shards)}, expected (pp_rank, tp_rank) in "
            f"{sorted(expected_ranks)} for tp={layout.tp} pp={layout.pp}"
        )
    for (p, t), chunks in shards.items():
        if len(chunks) != layout.num_chunks:
            raise ConversionError(
                f"rank (pp={p}, tp={t}) has {len(chunks)} chunk(s), expected {layout.num_chunks}"
            )
        for c, chunk in enumerate(chunks):
            where = f"rank (pp={p}, tp={t}) chunk {c}"
            expected = mcore_chunk_shapes(layout, p, c, head)
            names = {n for n in chunk if not n.endswith(EXTRA_STATE)}
            optional = {"output_layer.linear.bias"}
            missing = sorted(set(expected) - names - optional)
            if missing:
                raise ConversionError(f"{where} is missing tensor(s) {missing[:5]}")
            unexpected = sorted(names - set(expected))
            if unexpected:
                raise ConversionError(f"{where} has unexpected tensor(s) {unexpected[:5]}")
            for name in names:
                if tuple(chunk[name].shape) != expected[name]:
                    raise ConversionError(
                        f"{where}: tensor {name!r} has shape {tuple(chunk[name].shape)}, "
                        f"expected {expected[name]}"
                    )


def _replicated(shards_tp: list[dict], name: str) -> torch.Tensor:
    """A TP-replicated tensor (rank 0's copy; a warning if the ranks disagree)."""
    first = shards_tp[0][name]
    if any(not torch.equal(first, s[name]) for s in shards_tp[1:]):
        logger.warning("replicated tensor %r differs across TP ranks; using TP rank 0", name)
    return _own(first)


def _qkv_merge(qkv_shards: list[torch.Tensor], m: ModelConfig) -> tuple:
    ng, d = m.query_groups, m.head_dim
    per_group = m.num_attention_heads // ng
    H = qkv_shards[0].shape[1]
    qkv_GRH = torch.cat(qkv_shards, dim=0).reshape(ng, (per_group + 2) * d, H)
    q_GQH, k_GDH, v_GDH = qkv_GRH.split([per_group * d, d, d], dim=1)
    return tuple(_own(t.reshape(-1, H)) for t in (q_GQH, k_GDH, v_GDH))


def _layer_merge(shards_tp: list[dict], i_local: int, i_hf: int, m: ModelConfig) -> dict:
    src, dst = _mcore_layer(i_local, m), _hf_layer(i_hf)
    F_tp = m.ffn_hidden_size // len(shards_tp)
    fc1 = [s[src["fc1"]] for s in shards_tp]  # each [2 F/tp, H]
    q, k, v = _qkv_merge([s[src["qkv"]] for s in shards_tp], m)
    return {
        dst["q"]: q,
        dst["k"]: k,
        dst["v"]: v,
        dst["o"]: torch.cat([s[src["o"]] for s in shards_tp], dim=1),
        dst["gate"]: torch.cat([t[:F_tp] for t in fc1], dim=0),
        dst["up"]: torch.cat([t[F_tp:] for t in fc1], dim=0),
        dst["down"]: torch.cat([s[src["fc2"]] for s in shards_tp], dim=1),
        dst["in_norm"]: _replicated(shards_tp, src["in_norm"]),
        dst["mlp_norm"]: _replicated(shards_tp, src["mlp_norm"]),
    }


def _head_merge(shards_tp: list[dict], hf: dict, m: ModelConfig, head: str) -> None:
    """Final norm and output layer of the last chunk into ``hf`` (in place)."""
    hf["model.norm.weight"] = _replicated(shards_tp, "decoder.final_layernorm.weight")
    if head == HEAD_SCORE:
        bias = shards_tp[0].get("output_layer.linear.bias")
        if bias is not None and bool(bias.ne(0).any()):
            raise ConversionError(
                f"score head bias is {bias.tolist()}, not zero: HF "
                "LlamaForSequenceClassification's score layer has no bias"
            )
        hf["score.weight"] = _replicated(shards_tp, "output_layer.linear.weight")
        return
    if "output_layer.weight" not in shards_tp[0]:
        return  # tied embeddings on a single stage: no separate output weight
    out_VH = torch.cat([s["output_layer.weight"] for s in shards_tp], dim=0)
    if not m.tie_word_embeddings:
        hf["lm_head.weight"] = out_VH
    elif not torch.equal(out_VH, hf["model.embed_tokens.weight"]):
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
    hf["model.embed_tokens.weight"] = torch.cat(
        [s["embedding.word_embeddings.weight"] for s in first], dim=0
    )
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


# ----------------------------------------------------------------------------- HF files

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def load_hf_checkpoint(path: str, **overrides) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF directory: ``config.json`` and ``*.safetensors`` (sharded via the index).

    ``overrides`` replace ``ModelConfig`` fields (e.g. ``transformer_impl``). Raises
    ``FileNotFoundError`` naming a missing directory/file, ``ConversionError`` for
    unsupported config fields.
    """
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise FileNotFoundError(f"HF checkpoint directory not found: {path}")
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"HF checkpoint has no {CONFIG_NAME}: {config_path}")
    with open(config_path) as fh:
        model_cfg = model_config_from_hf(json.load(fh), **overrides)
    index_path = os.path.join(path, INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path) as fh:
            weight_map = json.load(fh)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"HF checkpoint has no *.safetensors file in {path}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        file_path = os.path.join(path, name)
        if not os.path.exists(file_path):
            raise FileNotFoundError(f"safetensors shard listed in {INDEX_NAME} not found: {name}")
        state.update(load_file(file_path))
    return model_cfg, state


def _shard_groups(state: dict, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names split into consecutive groups of at most ``max_shard_bytes`` each."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def hf_token_fields(hf_config: dict) -> dict:
    """The tokenizer-related fields of an HF config (``ModelConfig`` does not hold them)."""
    return {k: hf_config[k] for k in TOKEN_FIELDS if hf_config.get(k) is not None}


def save_hf_checkpoint(
    path: str,
    model_cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_config: dict | None = None,
) -> None:
    """Write ``config.json`` and the safetensors file(s) of an HF Llama checkpoint.

    One ``model.safetensors`` when everything fits in ``max_shard_bytes``, else
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``. With tied
    embeddings ``lm_head.weight`` is left out (as ``save_pretrained`` does).
    ``extra_config`` is merged into ``config.json`` (e.g. ``hf_token_fields`` of the source
    checkpoint: a sequence-classification model needs ``pad_token_id`` to pool).
    """
    from safetensors.torch import save_file

    head = detect_head(state)
    state = {
        name: t.detach().cpu().contiguous()
        for name, t in state.items()
        if not (name == "lm_head.weight" and model_cfg.tie_word_embeddings)
    }
    check_hf_state(state, model_cfg, head)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as fh:
        json.dump({**hf_config_from_model(model_cfg, head), **(extra_config or {})}, fh, indent=2)
    groups = _shard_groups(state, max_shard_bytes)
    if len(groups) == 1:
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, names in enumerate(groups):
        file_name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(
            {n: state[n] for n in names}, os.path.join(path, file_name), metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(names, file_name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(path, INDEX_NAME), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)


# ----------------------------------------------------------------------------- live models


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
    A scalar head's missing bias is set to zero.
    """
    if len(chunks) != len(shard_list):
        raise ConversionError(f"{len(shard_list)} chunk state(s) for {len(chunks)} model chunk(s)")
    for c, (chunk, shard) in enumerate(zip(chunks, shard_list)):
        own = {n: t for n, t in chunk.state_dict().items() if not n.endswith(EXTRA_STATE)}
        given = {n: t for n, t in shard.items() if not n.endswith(EXTRA_STATE)}
        if "output_layer.linear.bias" in own and "output_layer.linear.bias" not in given:
            given["output_layer.linear.bias"] = torch.zeros_like(own["output_layer.linear.bias"])
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
        if n.startswith("output_layer.linear.")
    }
    if head == HEAD_LM and model_head:
        last_own.pop("output_layer.weight", None)
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
    import torch.distributed as dist

    mine = None
    if state.dp_rank == 0:
        mine = ((state.pp_rank, state.tp_rank), state_from_model_chunks(chunks))
    is_dst = dist.get_rank() == dst
    gathered: list[Any] | None = [None] * dist.get_world_size(group) if is_dst else None
    dist.gather_object(mine, gathered, dst=dst, group=group)
    if gathered is None:  # not the destination rank
        return None
    shards = dict(item for item in gathered if item is not None)
    return megatron_to_hf(shards, model_cfg, state.tp_size, state.pp_size, state.vpp_size, head)


# ----------------------------------------------------------------------------- mcore files

LAYOUT_NAME = "layout.json"


def mcore_rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron's per-rank directory name: ``mp_rank_TT`` or ``mp_rank_TT_PPP`` with PP."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def save_mcore_checkpoint(
    path: str,
    shards: dict,
    model_cfg: ModelConfig,
    tp: int,
    pp: int,
    vpp: int | None = None,
    hf_extra: dict | None = None,
) -> None:
    """Write one ``model.pt`` per (pp, tp) rank (``model`` or ``model0..`` with vpp) plus
    ``layout.json`` (sizes, head, ModelConfig, and ``hf_extra`` HF config fields to restore
    on export)."""
    layout = Layout(model_cfg, tp, pp, vpp)
    head = detect_shards_head(shards)
    check_shards(shards, layout, head)
    for (p, t), chunks in shards.items():
        rank_dir = os.path.join(path, mcore_rank_dir(t, p, pp))
        os.makedirs(rank_dir, exist_ok=True)
        if vpp is None:
            payload = {"model": chunks[0]}
        else:
            payload = {f"model{c}": chunk for c, chunk in enumerate(chunks)}
        payload["checkpoint_version"] = 3.0
        torch.save(payload, os.path.join(rank_dir, "model.pt"))
    meta = {"format": "hpc_rlhf.mcore", "tp": tp, "pp": pp, "vpp": vpp, "head": head}
    meta["model_config"] = dataclasses.asdict(model_cfg)
    meta["hf_extra"] = hf_extra or {}
    with open(os.path.join(path, LAYOUT_NAME), "w") as fh:
        json.dump(meta, fh, indent=2)


def load_mcore_checkpoint(path: str) -> tuple[ModelConfig, dict, dict]:
    """Read a directory written by ``save_mcore_checkpoint``: (ModelConfig, shards, layout)."""
    layout_path = os.path.join(path, LAYOUT_NAME)
    if not os.path.exists(layout_path):
        raise FileNotFoundError(f"megatron checkpoint has no {LAYOUT_NAME}: {layout_path}")
    with open(layout_path) as fh:
        meta = json.load(fh)
    model_cfg = config_from_dict(meta["model_config"], ModelConfig)
    tp, pp, vpp = meta["tp"], meta["pp"], meta["vpp"]
    shards = {}
    for p, t in Layout(model_cfg, tp, pp, vpp).ranks():
        file_path = os.path.join(path, mcore_rank_dir(t, p, pp), "model.pt")
        if not os.path.exists(file_path):
            raise FileNotFoundError(f"megatron checkpoint shard not found: {file_path}")
        payload = torch.load(file_path, map_location="cpu", weights_only=True)
        if vpp is None:
            shards[(p, t)] = [payload["model"]]
        else:
            shards[(p, t)] = [payload[f"model{c}"] for c in range(vpp)]
    return model_cfg, shards, meta
