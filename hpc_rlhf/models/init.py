"""Initial weights for runs that start without a checkpoint."""

from __future__ import annotations

import torch

from hpc_rlhf.config import ModelConfig


def random_hf_state(model_cfg: ModelConfig, seed: int, std: float | None = None) -> dict:
    """Seeded random Llama weights in HF naming (identical on every rank).

    Linear and embedding weights ~ N(0, std) (``model.init_method_std`` by default), norms 1.
    Starting actor, reference and critic from one such state gives them identical decoders.
    """
    from hpc_rlhf.models.param_layout import hf_shapes

    std = model_cfg.init_method_std if std is None else std
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in hf_shapes(model_cfg).items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape)
        else:
            state[name] = std * torch.randn(shape, generator=gen)
    return state
