"""SwiGLU activation of a gated MLP: ``silu(a) * b`` for ``x = [a | b]`` along the last dim.

Shapes: ``x`` ``[..., 2F]`` (the fused fc1 output, gate half first, as megatron-core lays
it out), result ``[..., F]``.

Backends: ``"torch"`` (the reference: chunk, silu, multiply; autograd through them),
``"cpp"`` (hpc_rlhf._C, fp32 or bf16 CPU tensors), ``"cuda"`` (csrc/swiglu.cu) and
``"triton"`` (hpc_rlhf/kernels/swiglu.py), the last two for fp32/bf16/fp16; every kernel
does its math in fp32, makes one pass forward and one backward and saves only ``x``.
``"auto"``: on CUDA tensors ``cuda``, then ``triton``, then the reference; on CPU ``cpp``
for fp32 and bf16, else the reference (see
``hpc_rlhf.ops._backend``). The transformer-engine layer spec brings its own fused
activation; the local spec's ``SwiGLUMLP`` uses this op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpc_rlhf.ops import _backend

# the C++ kernel stores fp32 or bf16, the CUDA and Triton ones any float dtype (fp32 math)
SWIGLU_KERNELS = (
    _backend.TORCH,
    _backend.Kernel("cpp", dtypes=_backend.FP32_BF16),
    _backend.Kernel("cuda"),
    _backend.Kernel("triton"),
)


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` with ``a, b = x.chunk(2, -1)`` in plain torch."""
    a, b = torch.chunk(x, 2, dim=-1)
    return F.silu(a) * b


def _kernels(backend: str):
    """(forward, backward) of a kernel backend over 2-D contiguous rows."""
    if backend == "triton":
        module = _backend.kernels("swiglu")
        return module.swiglu_fwd, module.swiglu_bwd
    ext = _backend.built_extension()
    if backend == "cpp":
        return ext.swiglu_fwd_cpu, ext.swiglu_bwd_cpu
    return ext.swiglu_cuda, ext.swiglu_cuda  # backward: the same launcher with grad_out


class _SwiGLUKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, backend):
        shape = x.shape
        x_R2F = x.reshape(-1, shape[-1]).contiguous()
        ctx.save_for_backward(x_R2F)
        ctx.backend, ctx.shape = backend, shape
        return _kernels(backend)[0](x_R2F).view(*shape[:-1], shape[-1] // 2)

    @staticmethod
    def backward(ctx, grad_out):
        (x_R2F,) = ctx.saved_tensors
        g_RF = grad_out.reshape(x_R2F.shape[0], -1).contiguous()
        return _kernels(ctx.backend)[1](x_R2F, g_RF).view(ctx.shape), None


def swiglu(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """SwiGLU of ``x`` ``[..., 2F]`` -> ``[..., F]``, differentiable (see module docstring)."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim of x must be even, got {tuple(x.shape)}")
    chosen = _backend.resolve("swiglu", backend, x.device, SWIGLU_KERNELS, dtype=x.dtype)
    if chosen == "torch" or x.numel() == 0:
        return swiglu_reference(x)
    return _SwiGLUKernel.apply(x, chosen)
