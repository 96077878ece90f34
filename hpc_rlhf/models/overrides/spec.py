"""The local (non-transformer-engine) layer spec with hpc_rlhf's modules substituted.

* ``torch_rmsnorm`` (always): megatron's ``WrappedTorchNorm`` refuses sequence parallelism;
  torch's ``RMSNorm`` with its parameters tagged ``sequence_parallel`` (megatron then sums
  their gradient over TP ranks) is exact under it.
* ``swiglu_mlp``: the MLP's gated activation as one fused op (``models.mlp.SwiGLUMLP``,
  ``ops.swiglu``).
* ``core_attention``: the core attention runs fused and takes packed THD micro-batches
  (``models.attention.SDPAttention``, ``ops.causal_attention``).
"""

from __future__ import annotations

import torch


class TorchRMSNorm:
    """torch ``RMSNorm`` as a megatron norm spec, usable with sequence parallelism."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]
        return norm


def local_layer_spec(swiglu_mlp: bool = True, core_attention: bool = True):
    """megatron-core's local GPT layer spec with the substitutions switched on."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = TorchRMSNorm
    spec.submodules.pre_mlp_layernorm = TorchRMSNorm
    if swiglu_mlp:
        from hpc_rlhf.models.mlp import SwiGLUMLP

        spec.submodules.mlp.module = SwiGLUMLP
    if core_attention:
        from hpc_rlhf.models.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec
