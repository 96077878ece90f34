"""The one table of parameter names: HF Llama <-> megatron-core (this package's model).

Used by the checkpoint converter (``reshard``, ``param_layout``) and by the generation
engine (``inference/weights.py``), which reads the training parameters by these names.

Decoder layer ``i`` is ``model.layers.{i}.`` on the HF side (global index) and
``decoder.layers.{i}.`` in a megatron chunk (index local to the chunk). Megatron fuses some
HF tensors: ``qkv`` holds ``q``, ``k``, ``v`` (rows per query group), ``fc1`` holds
``[gate; up]``; ``proj`` is HF's ``o``, ``fc2`` HF's ``down``. The transformer-engine layer
spec keeps the two norms inside the following linear layers (``_TE_NORMS``).

Family options add roles: QKV biases (``qkv_bias``: HF's three biases fused as the weight
rows are) and per-head query/key norms (``qk_norm``: the same vector on both sides).
"""

from __future__ import annotations

from hpc_rlhf.config import InputError, ModelConfig


class ConversionError(InputError):
    """A checkpoint or layout cannot be converted; the message names the problem."""


HEAD_LM, HEAD_SCORE = "lm", "score"
EXTRA_STATE = "_extra_state"  # megatron's non-tensor state entries; never converted

# Tensors outside the decoder layers: (HF name, megatron name) per line.
HF_EMBEDDING, MCORE_EMBEDDING = "model.embed_tokens.weight", "embedding.word_embeddings.weight"
HF_FINAL_NORM, MCORE_FINAL_NORM = "model.norm.weight", "decoder.final_layernorm.weight"
HF_LM_HEAD, MCORE_OUTPUT = "lm_head.weight", "output_layer.weight"
HF_SCORE, MCORE_SCORE = "score.weight", "output_layer.linear.weight"
MCORE_SCORE_BIAS = "output_layer.linear.bias"  # HF's score layer has no bias

# HF tensors of one decoder layer by role, in the order HF files are written.
HF_LAYER = {
    "in_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}

HF_QKV_BIAS = {
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
}
HF_QK_NORM = {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}

# Megatron tensors of one decoder layer by role (local spec), in forward order.
MCORE_LAYER = {
    "in_norm": "input_layernorm.weight",
    "qkv": "self_attention.linear_qkv.weight",
    "proj": "self_attention.linear_proj.weight",
    "mlp_norm": "pre_mlp_layernorm.weight",
    "fc1": "mlp.linear_fc1.weight",
    "fc2": "mlp.linear_fc2.weight",
}
MCORE_QKV_BIAS = {"qkv_bias": "self_attention.linear_qkv.bias"}
MCORE_QK_NORM = {
    "q_norm": "self_attention.q_layernorm.weight",
    "k_norm": "self_attention.k_layernorm.weight",
}
_TE_NORMS = {
    "in_norm": "self_attention.linear_qkv.layer_norm_weight",
    "mlp_norm": "mlp.linear_fc1.layer_norm_weight",
}
_SPEC_NAMES = {"local": MCORE_LAYER, "transformer_engine": {**MCORE_LAYER, **_TE_NORMS}}


def _with_options(names: dict, model_cfg: ModelConfig, qkv_bias: dict, qk_norm: dict) -> dict:
    out = dict(names)
    if model_cfg.qkv_bias:
        out.update(qkv_bias)
    if model_cfg.qk_norm:
        out.update(qk_norm)
    return out


def hf_layer_names(i: int, model_cfg: ModelConfig) -> dict[str, str]:
    """HF names of global layer ``i``'s tensors by role (``HF_LAYER``'s, plus the family
    options of ``model_cfg``)."""
    roles = _with_options(HF_LAYER, model_cfg, HF_QKV_BIAS, HF_QK_NORM)
    return {role: f"model.layers.{i}.{name}" for role, name in roles.items()}


def mcore_layer_names(i: int, model_cfg: ModelConfig) -> dict[str, str]:
    """Megatron names of local layer ``i``'s tensors for ``model_cfg.transformer_impl`` by
    role (``MCORE_LAYER``'s, plus the family options of ``model_cfg``)."""
    names = _SPEC_NAMES.get(model_cfg.transformer_impl)
    if names is None:
        raise ConversionError(f"unknown model.transformer_impl={model_cfg.transformer_impl!r}")
    roles = _with_options(names, model_cfg, MCORE_QKV_BIAS, MCORE_QK_NORM)
    return {role: f"decoder.layers.{i}.{name}" for role, name in roles.items()}
