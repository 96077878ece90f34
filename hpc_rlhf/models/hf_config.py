"""HF ``config.json`` <-> ``ModelConfig`` for the supported families (Llama, Llama-3, Qwen2,
Qwen3, Mistral): the field translation and what is refused."""

from __future__ import annotations

from hpc_rlhf.config import ModelConfig
from hpc_rlhf.models.hf_names import HEAD_LM, HEAD_SCORE, ConversionError

_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_HF_DTYPE_NAMES = {v: k for k, v in _HF_DTYPES.items()}
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _reject(hf_config: dict, key: str, allowed) -> None:
    value = hf_config.get(key)
    if value not in allowed:
        raise ConversionError(
            f"HF config field {key!r}={value!r} is not supported (supported: {allowed})"
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# HF class-name prefix of each family (``{prefix}ForCausalLM`` / ``ForSequenceClassification``)
FAMILY_CLASSES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}
_ROPE_LLAMA3 = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def family_of(hf_config: dict) -> str:
    """The family of an HF config from ``model_type`` (or, without one, ``architectures``);
    ``ConversionError`` naming an unsupported one and the supported list."""
    model_type = hf_config.get("model_type")
    if model_type is None:
        archs = hf_config.get("architectures") or []
        by_class = {cls: fam for fam, cls in FAMILY_CLASSES.items()}
        for arch in archs if isinstance(archs, list) else []:
            for suffix in ("ForCausalLM", "ForSequenceClassification"):
                family = by_class.get(arch.removesuffix(suffix)) if isinstance(arch, str) else None
                if family:
                    return family
    if model_type not in FAMILY_CLASSES:
        raise ConversionError(
            f"HF model_type {model_type!r} is not supported (architectures "
            f"{hf_config.get('architectures')}); supported: {sorted(FAMILY_CLASSES)}"
        )
    return model_type


def _rope_fields(hf_config: dict, family: str) -> dict:
    """``ModelConfig`` RoPE fields from ``rope_parameters`` (transformers 5) or
    ``rope_theta`` + ``rope_scaling`` (transformers 4): default RoPE, or llama3 scaling."""
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling or {})):
        if not isinstance(value, dict):
            raise ConversionError(f"HF config field {key!r}={value!r} is not a mapping")
    if scaling and not params:
        params = scaling  # transformers 4: scaling here, rope_theta at the top level
    elif scaling and scaling.get("rope_type", scaling.get("type")) != params.get("rope_type"):
        raise ConversionError(
            f"HF config field 'rope_scaling'={scaling!r} disagrees with 'rope_parameters'"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    known = {"rope_type", "type", "rope_theta"}
    if rope_type == "llama3" and family == "llama":
        missing = [k for k in _ROPE_LLAMA3 if not isinstance(params.get(k), (int, float))]
        if missing:
            raise ConversionError(f"HF rope_type 'llama3' lacks numeric field(s) {missing}")
        known |= set(_ROPE_LLAMA3)
    elif rope_type != "default":
        raise ConversionError(
            f"HF config field 'rope_parameters.rope_type'={rope_type!r} is not supported for "
            f"{family!r} (supported: 'default'" + (", 'llama3')" if family == "llama" else ")")
        )
    extra = sorted(set(params) - known)
    if extra:
        raise ConversionError(f"HF config field 'rope_parameters' has unsupported keys {extra}")
    fields: dict = {"rotary_base": theta}
    if rope_type == "llama3":
        fields.update(
            rope_scaling="llama3",
            rope_scaling_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_positions=int(params["original_max_position_embeddings"]),
        )
    return fields


def _family_fields(hf_config: dict, family: str) -> dict:
    """Check the attention options an HF config sets for its family; the ``ModelConfig``
    fields they map to (the sliding window)."""
    _reject(hf_config, "mlp_bias", (None, False))
    _reject(hf_config, "hidden_act", (None, "silu"))
    # Llama's and Qwen3's attention_bias adds a bias to o_proj too: no megatron field has it
    _reject(hf_config, "attention_bias", (None, False))
    if family in ("qwen2", "qwen3"):
        _reject(hf_config, "use_sliding_window", (None, False))
    if family != "mistral":
        return {}
    window = hf_config.get("sliding_window")
    if window is not None and not (_is_int(window) and window > 0):
        raise ConversionError(f"HF config field 'sliding_window'={window!r} is not a positive int")
    return {"sliding_window": window}


def model_config_from_hf(hf_config: dict, **overrides) -> ModelConfig:
    """``ModelConfig`` from an HF ``config.json`` dict of a supported family (Llama,
    Llama-3 with llama3 RoPE scaling, Qwen2 / Qwen2.5, Qwen3, Mistral); ``overrides``
    replace fields. Raises ``ConversionError`` naming the field for features the megatron
    model lacks (an unsupported family, RoPE type, bias or activation)."""
    family = family_of(hf_config)
    family_fields = _family_fields(hf_config, family)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not _is_int(hf_config.get(key)):
            raise ConversionError(f"HF config field {key!r} is missing or not an integer")
    for key in ("vocab_size", "max_position_embeddings", "num_key_value_heads", "head_dim"):
        if hf_config.get(key) is not None and not _is_int(hf_config[key]):
            raise ConversionError(f"HF config field {key!r}={hf_config[key]!r} is not an integer")
    heads, hidden = hf_config["num_attention_heads"], hf_config["hidden_size"]
    head_dim = hf_config.get("head_dim") if family != "qwen2" else None
    if head_dim is not None and head_dim <= 0:
        raise ConversionError(f"HF config field 'head_dim'={head_dim} is not positive")
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if dtype not in _HF_DTYPES:
        raise ConversionError(f"HF config field 'dtype'={dtype!r} is not one of {list(_HF_DTYPES)}")
    kv_heads = hf_config.get("num_key_value_heads") or heads
    values = dict(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=None if kv_heads == heads else kv_heads,
        ffn_hidden_size=hf_config["intermediate_size"],
        vocab_size=hf_config.get("vocab_size", 32000),
        max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
        norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        params_dtype=_HF_DTYPES[dtype],
        init_method_std=float(hf_config.get("initializer_range", 0.02)),
        family=family,
        kv_channels=head_dim if head_dim and head_dim * heads != hidden else None,
        **_rope_fields(hf_config, family),
        **family_fields,
    )
    values.update(overrides)
    cfg = ModelConfig(**values)
    cfg.validate()
    return cfg


def _rope_parameters(m: ModelConfig) -> dict:
    rope: dict = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
    if m.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=m.rope_scaling_factor,
            low_freq_factor=m.rope_low_freq_factor,
            high_freq_factor=m.rope_high_freq_factor,
            original_max_position_embeddings=m.rope_original_max_positions,
        )
    return rope


def _family_hf_fields(m: ModelConfig) -> dict:
    """What an HF config of ``m.family`` says about its attention."""
    if m.family == "mistral":
        return {"sliding_window": m.sliding_window}
    if m.family in ("qwen2", "qwen3"):
        fields = {
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": m.num_layers,
        }
        return fields | ({"attention_bias": False} if m.family == "qwen3" else {})
    return {"attention_bias": False, "mlp_bias": False}


def hf_config_from_model(model_cfg: ModelConfig, head: str = HEAD_LM) -> dict:
    """HF ``config.json`` dict of ``model_cfg``'s family; ``head="score"`` for a scalar
    head (``*ForSequenceClassification``)."""
    m = model_cfg
    rope = _rope_parameters(m)
    prefix = FAMILY_CLASSES[m.family]
    kind = "ForCausalLM" if head == HEAD_LM else "ForSequenceClassification"
    hf = {
        "architectures": [prefix + kind],
        "model_type": m.family,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.query_groups,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(m.rotary_base),  # transformers 4 reads this
        "rope_parameters": rope,  # transformers 5 reads this
        "rope_scaling": None if rope["rope_type"] == "default" else rope,  # and 4 this
        "tie_word_embeddings": m.tie_word_embeddings,
        "hidden_act": "silu",
        "initializer_range": m.init_method_std,
        "dtype": _HF_DTYPE_NAMES[m.params_dtype],
        "torch_dtype": _HF_DTYPE_NAMES[m.params_dtype],
        **_family_hf_fields(m),
    }
    if m.family != "qwen2":  # Qwen2 derives it from hidden_size / heads
        hf["head_dim"] = m.head_dim
    if head == HEAD_SCORE:
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return hf


def hf_token_fields(hf_config: dict) -> dict:
    """The tokenizer-related fields of an HF config (``ModelConfig`` does not hold them)."""
    return {k: hf_config[k] for k in TOKEN_FIELDS if hf_config.get(k) is not None}
