"""The local (non-transformer-engine) layer spec with hpc_rlhf's modules substituted.

* ``torch_rmsnorm`` (always): megatron's ``WrappedTorchNorm`` refuses sequence parallelism;
  torch's ``RMSNorm`` with its parameters tagged ``sequence_parallel`` (megatron then sums
  their gradient over TP ranks) is exact under it.
* ``fused_rmsnorm``: the norms run ``ops.rms_norm`` (one pass per row each way; torch's
  CPU backward is a chain of element-wise ops) instead of ``torch.nn.RMSNorm``.
* ``swiglu_mlp``: the MLP's gated activation as one fused op (``models.mlp.SwiGLUMLP``,
  ``ops.swiglu``).
* ``core_attention``: the core attention runs fused and takes packed THD micro-batches
  (``models.attention.SDPAttention``, ``ops.causal_attention``), and the self-attention
  takes packed rows with shared prefixes (``models.attention.SharedPrefixSelfAttention``).
"""

from __future__ import annotations

import logging

import torch

from hpc_rlhf.ops.rmsnorm import rms_norm


class TorchRMSNorm:
    """torch ``RMSNorm`` as a megatron norm spec, usable with sequence parallelism."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]
        return norm


class FusedRMSNorm(torch.nn.Module):
    """RMSNorm through ``ops.rms_norm`` as a megatron norm spec: ``torch.nn.RMSNorm``'s
    parameter (``weight``, ones) and state-dict key, usable with sequence parallelism."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., H]`` normalised over ``H`` and scaled by ``weight``."""
        return rms_norm(x, self.weight, self.eps)


def norm_spec(fused_rmsnorm: bool = True):
    """The norm class of the local spec (``FusedRMSNorm`` or ``TorchRMSNorm``)."""
    return FusedRMSNorm if fused_rmsnorm else TorchRMSNorm


def local_layer_spec(
    swiglu_mlp: bool = True,
    core_attention: bool = True,
    qk_norm: bool = False,
    fused_rmsnorm: bool = True,
):
    """megatron-core's local GPT layer spec with the substitutions switched on; with
    ``qk_norm`` its per-head query and key norms are the spec's norm too (megatron sums
    their gradients over TP ranks: each rank normalises its own heads with the shared
    weight)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_norm)
    norm = norm_spec(fused_rmsnorm)
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    if qk_norm:
        spec.submodules.self_attention.submodules.q_layernorm = norm
        spec.submodules.self_attention.submodules.k_layernorm = norm
    if swiglu_mlp:
        from hpc_rlhf.models.mlp import SwiGLUMLP

        spec.submodules.mlp.module = SwiGLUMLP
        _silence_unknown_mlp_warning()
    if core_attention:
        from hpc_rlhf.models.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
        shared_prefix_attention(spec)
    return spec


def shared_prefix_attention(spec):
    """``spec`` (a GPT layer spec, local or transformer-engine) with the self-attention
    that runs packed rows with shared prefixes (``SelfAttention`` otherwise)."""
    from hpc_rlhf.models.attention import SharedPrefixSelfAttention

    spec.submodules.self_attention.module = SharedPrefixSelfAttention
    return spec


class _UnknownMLPFilter(logging.Filter):
    """Drops megatron's "Unknown MLP type ... Using default kwargs" warning.

    ``TransformerLayer`` passes the TP group only to modules that *are* its ``MLP`` class
    (an equality test), so for ``SwiGLUMLP`` (an ``MLP`` subclass) it warns once per layer
    and builds it with default kwargs, where ``MLP`` takes megatron's global TP group: the
    same group. Understood, hence silenced (other megatron warnings still show).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


def _silence_unknown_mlp_warning() -> None:
    layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _UnknownMLPFilter) for f in layer_logger.filters):
        layer_logger.addFilter(_UnknownMLPFilter())
