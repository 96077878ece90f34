"""RoPE frequencies of a model, in one place for training (megatron-core's rotary
embedding) and generation (the engine's tables).

``inv_freq`` is ``base^(-2i/D)`` for ``i < D/2``; with ``rope_scaling: llama3`` (Llama-3.1 /
3.2) wavelengths longer than ``original / low_freq_factor`` are divided by ``factor``, those
shorter than ``original / high_freq_factor`` kept, and the band between interpolated
smoothly, in the order of operations of transformers' ``_compute_llama3_parameters`` so the
two agree bit for bit (llama3 has no attention scaling of cos/sin).
"""

from __future__ import annotations

import math

import torch

from hpc_rlhf.config import ModelConfig


def inv_freq(model_cfg: ModelConfig) -> torch.Tensor:
    """The RoPE inverse frequencies ``[D/2]`` (float32) of ``model_cfg``."""
    D = model_cfg.head_dim
    exponent = torch.arange(0, D, 2, dtype=torch.int64).float() / D
    base = 1.0 / (model_cfg.rotary_base**exponent)
    if model_cfg.rope_scaling == "none":
        return base
    return _llama3(base, model_cfg)


def _llama3(freq: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    factor, low, high = m.rope_scaling_factor, m.rope_low_freq_factor, m.rope_high_freq_factor
    original = m.rope_original_max_positions
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_freq_wavelen, freq / factor, freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)
