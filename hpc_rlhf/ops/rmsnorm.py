"""RMSNorm: ``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dim.

Shapes: ``x`` ``[..., H]``, ``weight`` ``[H]``, result ``[..., H]`` (the hidden states of a
decoder layer's norms, or ``[..., heads, D]`` for Qwen3's per-head query/key norms).

Backends: ``"torch"`` (the reference, the formula in fp32 and the result in ``x``'s dtype,
autograd through it; any dtype and device), ``"cpp"`` (``csrc/rmsnorm_cpu.cpp``, fp32 or
bf16 CPU tensors, fp32 math: one pass over each row forward, one backward, saving ``x``
and the fp32 ``1 / rms`` of each row; torch's CPU autograd runs the backward as a chain of
element-wise ops, ~15x slower at a [1700, 512] micro-batch) and ``"auto"``: ``cpp`` for
fp32 / bf16 CPU tensors when ``hpc_rlhf._C`` is built, else the reference (GPUs run
``torch.nn.functional.rms_norm``'s own kernels; transformer-engine's spec brings its
norms). The local spec's norms use it through ``models.overrides`` (``fused_rmsnorm``).
"""

from __future__ import annotations

import torch

from hpc_rlhf.ops import _backend


def _cpp_limit(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> str | None:
    """Why the C++ kernel cannot take a call: its weight must be in ``x``'s dtype."""
    if weight_dtype != x_dtype:
        return f"needs the weight in x's dtype, got {weight_dtype} for {x_dtype} x"
    return None


# the C++ kernel: fp32 or bf16 storage (x and weight alike), fp32 math
RMSNORM_KERNELS = (
    _backend.TORCH,
    _backend.Kernel("cpp", dtypes=_backend.FP32_BF16, limit=_cpp_limit),
)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The formula in fp32, returned in ``x``'s dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


class _RMSNormCpp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x_RH = x.reshape(-1, x.shape[-1]).contiguous()
        w_H = weight.contiguous()
        y_RH, rstd_R = _backend.built_extension().rmsnorm_fwd_cpu(x_RH, w_H, eps)
        ctx.save_for_backward(x_RH, w_H, rstd_R)
        ctx.shape = x.shape
        return y_RH.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x_RH, w_H, rstd_R = ctx.saved_tensors
        g_RH = grad_out.reshape(x_RH.shape).contiguous()
        dx_RH, dw_H = _backend.built_extension().rmsnorm_bwd_cpu(x_RH, w_H, rstd_R, g_RH)
        return dx_RH.view(ctx.shape), dw_H, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto"
) -> torch.Tensor:
    """RMSNorm of ``x`` ``[..., H]`` with ``weight`` ``[H]``, differentiable in both (see
    the module docstring)."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight {tuple(weight.shape)} must be [H] for x {tuple(x.shape)}"
        )
    chosen = _backend.resolve(
        "rmsnorm",
        backend,
        x.device,
        RMSNORM_KERNELS,
        dtype=x.dtype,
        x_dtype=x.dtype,
        weight_dtype=weight.dtype,
    )
    if chosen == "torch" or x.numel() == 0:
        return rmsnorm_reference(x, weight, eps)
    return _RMSNormCpp.apply(x, weight, float(eps))
