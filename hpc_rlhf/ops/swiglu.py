"""SwiGLU activation of a gated MLP: ``silu(a) * b`` for ``x = [a | b]`` along the last dim.

Shapes: ``x`` ``[..., 2F]`` (the fused fc1 output, gate half first, as megatron-core lays
it out), result ``[..., F]``.

Backends: ``"torch"`` (the reference: chunk, silu, multiply; autograd through them) and
``"cpp"`` (hpc_rlhf._C, fp32 CPU tensors: one pass forward, one pass backward, only ``x``
saved). ``"auto"`` picks ``"cpp"`` for fp32 CPU tensors when the extension is built and the
reference otherwise; on a GPU the transformer-engine layer spec brings its own fused
activation, so no CUDA/Triton SwiGLU is provided here.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from hpc_rlhf.ops import _backend

logger = logging.getLogger("hpc_rlhf.ops")

SWIGLU_BACKENDS = ("auto", "torch", "cpp")
_LOGGED: set[tuple[str, str]] = set()


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` with ``a, b = x.chunk(2, -1)`` in plain torch."""
    a, b = torch.chunk(x, 2, dim=-1)
    return F.silu(a) * b


def _resolve(backend: str, x: torch.Tensor) -> str:
    if backend not in SWIGLU_BACKENDS:
        raise ValueError(f"swiglu backend {backend!r}: expected one of {SWIGLU_BACKENDS}")
    cpp_ok = _backend.unavailable_reason("cpp", x.device) is None and x.dtype == torch.float32
    if backend == "cpp" and not cpp_ok:
        raise RuntimeError(
            "swiglu: backend 'cpp' needs hpc_rlhf._C and fp32 CPU tensors "
            f"(got {x.dtype} on {x.device.type})"
        )
    chosen = backend if backend != "auto" else ("cpp" if cpp_ok else "torch")
    key = (x.device.type, chosen)
    if backend == "auto" and key not in _LOGGED:
        _LOGGED.add(key)
        logger.info("hpc_rlhf.ops.swiglu: backend 'auto' chose %r for %s tensors", *key[::-1])
    return chosen


class _SwiGLUCpp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        ctx.save_for_backward(x)
        return _backend.extension().swiglu_fwd_cpu(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return _backend.extension().swiglu_bwd_cpu(x, grad_out.contiguous())


def swiglu(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """SwiGLU of ``x`` ``[..., 2F]`` -> ``[..., F]``, differentiable (see module docstring)."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim of x must be even, got {tuple(x.shape)}")
    if _resolve(backend, x) == "cpp":
        return _SwiGLUCpp.apply(x)
    return swiglu_reference(x)
