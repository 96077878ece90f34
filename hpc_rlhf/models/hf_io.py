"""HF checkpoint directories: ``config.json`` plus safetensors (one file, or shards + index)."""

from __future__ import annotations

import json
import os

import torch

from hpc_rlhf.config import ConfigError, InputError, ModelConfig
from hpc_rlhf.models.hf_config import hf_config_from_model, model_config_from_hf
from hpc_rlhf.models.hf_names import HF_LM_HEAD, ConversionError
from hpc_rlhf.models.param_layout import check_hf_state, detect_head

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def _read_json(path: str) -> dict:
    """A JSON object from ``path``; ``ConversionError`` naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_hf_config(path: str, **overrides) -> ModelConfig:
    """The ``ModelConfig`` of the HF checkpoint directory ``path`` (its ``config.json``
    only, no weights read). Raises ``FileNotFoundError`` naming a missing directory/file and
    ``ConversionError`` naming ``config.json`` when it is not JSON, lacks a field, or holds
    an unsupported or impossible value."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HF checkpoint directory not found: {path}")
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"HF checkpoint has no {CONFIG_NAME}: {config_path}")
    hf_config = _read_json(config_path)
    try:
        return model_config_from_hf(hf_config, **overrides)
    except (ConversionError, ConfigError) as err:
        raise ConversionError(f"{config_path}: {err}") from err


def _load_safetensors(file_path: str) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; ``ConversionError`` naming a truncated or
    corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file_path)
    except SafetensorError as err:
        raise ConversionError(
            f"{file_path} is not a readable safetensors file ({err}): truncated or corrupt?"
        ) from err


def load_hf_checkpoint(path: str, **overrides) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF directory: ``config.json`` and ``*.safetensors`` (sharded via the index).

    ``overrides`` replace ``ModelConfig`` fields (e.g. ``transformer_impl``). Raises
    ``FileNotFoundError`` naming a missing directory/file, ``ConversionError`` naming the
    file for a malformed ``config.json`` / index, unsupported config fields, or a
    truncated safetensors file.
    """
    model_cfg = load_hf_config(path, **overrides)
    index_path = os.path.join(path, INDEX_NAME)
    if os.path.exists(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index_path} has no 'weight_map' object")
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
        state.update(_load_safetensors(file_path))
    return model_cfg, state


def load_hf_checkpoint_for(model: ModelConfig, path: str) -> dict[str, torch.Tensor]:
    """The HF state at ``path``, checked to be of ``model``'s architecture (``InputError``
    naming the first field that differs): initial weights of a run's model."""
    hf_cfg, state = load_hf_checkpoint(path)
    fields = (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "query_groups",
        "ffn_hidden_size",
        "vocab_size",
        "tie_word_embeddings",
        "family",
        "head_dim",
        "rope_scaling",
        "sliding_window",
    )
    for name in fields:
        ours, theirs = getattr(model, name), getattr(hf_cfg, name)
        if ours != theirs:
            raise InputError(f"{path}: {name}={theirs} but the config says model.{name}={ours}")
    return state


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
        if not (name == HF_LM_HEAD and model_cfg.tie_word_embeddings)
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


SCORE_NORMALIZATION_FILE = "score_normalization.json"


def write_score_normalization(path: str, mean: float, std: float) -> None:
    """Store a reward model's score calibration (``(score - mean) / std`` has mean 0 and
    std 1 over the responses it was measured on) beside its HF checkpoint."""
    if not std > 0:
        raise ValueError(f"score normalisation needs std > 0, got {std}")
    with open(os.path.join(path, SCORE_NORMALIZATION_FILE), "w") as fh:
        json.dump({"mean": mean, "std": std}, fh, indent=1)


def read_score_normalization(path: str) -> tuple[float, float] | None:
    """``(mean, std)`` stored with the reward model at ``path``, or ``None`` (raw scores)."""
    file_path = os.path.join(path, SCORE_NORMALIZATION_FILE)
    if not os.path.exists(file_path):
        return None
    data = _read_json(file_path)
    mean, std = data.get("mean"), data.get("std")
    if not isinstance(mean, int | float) or not isinstance(std, int | float) or not std > 0:
        raise InputError(f"{file_path}: expected numbers 'mean' and 'std' > 0, got {data}")
    return float(mean), float(std)
