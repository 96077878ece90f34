"""HF Llama ``config.json`` <-> ``ModelConfig``: the field translation and what is refused."""

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
        if not _is_int(hf_config.get(key)):
            raise ConversionError(f"HF config field {key!r} is missing or not an integer")
    for key in ("vocab_size", "max_position_embeddings", "num_key_value_heads", "head_dim"):
        if hf_config.get(key) is not None and not _is_int(hf_config[key]):
            raise ConversionError(f"HF config field {key!r}={hf_config[key]!r} is not an integer")
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


def hf_token_fields(hf_config: dict) -> dict:
    """The tokenizer-related fields of an HF config (``ModelConfig`` does not hold them)."""
    return {k: hf_config[k] for k in TOKEN_FIELDS if hf_config.get(k) is not None}
