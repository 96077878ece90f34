"""Dense fp32 GEMMs of the CPU path through oneDNN instead of MKL.

PyTorch's CPU ``mm``/``linear`` call MKL's sgemm. For this engine's shapes (hidden 512,
``x @ W^T`` with ``W`` stored ``[out, in]`` as ``nn.Linear`` does) oneDNN's matmul primitive
- the one inductor lowers CPU linears to, reachable as ``torch.ops.mkldnn._linear_pointwise``
- is faster on the same threads, at decode, fc1 and LM-head shapes alike
(``python tools/bench_gemm.py`` measures both).

Backends: ``"onednn"`` (CPU float32 tensors, torch built with oneDNN), ``"torch"``
(``F.linear``/``torch.matmul``, always) and ``"auto"``: oneDNN when both checks pass, logged
once. Anything else (CUDA tensors, bf16, a 1-D weight) takes the torch path: GPUs run cuBLAS
unchanged. oneDNN's op has no autograd formula (backprop through it silently yields no
gradient), so a call that needs gradients goes through :class:`_OneDNNLinear`, whose
backward runs the input gradient on oneDNN too and the weight gradient as MKL's ``mm``
(``g^T x`` is as fast there).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F

logger = logging.getLogger("hpc_rlhf.ops")

BACKENDS = ("auto", "onednn", "torch")
_backend = "auto"


@functools.cache
def onednn_available() -> bool:
    """True when this torch was built with oneDNN and exposes its linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def set_backend(name: str) -> None:
    """Choose the CPU GEMM backend for the whole process (``auto``, ``onednn``, ``torch``)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"cpu gemm backend {name!r}: choose one of {BACKENDS}")
    if name == "onednn" and not onednn_available():
        raise RuntimeError(
            "cpu gemm backend 'onednn': this torch build has no oneDNN linear "
            "(torch.backends.mkldnn.is_available() is False)"
        )
    _backend = name


def get_backend() -> str:
    """The configured backend name (``auto`` until :func:`set_backend` says otherwise)."""
    return _backend


@functools.cache
def _auto_choice() -> str:
    choice = "onednn" if onednn_available() else "torch"
    logger.info("hpc_rlhf.ops.cpu_gemm: backend 'auto' chose %r for cpu float32 GEMMs", choice)
    return choice


def uses_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True when :func:`linear` would run ``x @ w^T`` on oneDNN."""
    if _backend == "torch" or w.dim() != 2 or x.dim() == 0:
        return False
    if x.device.type != "cpu" or w.device.type != "cpu":
        return False
    if x.dtype != torch.float32 or w.dtype != torch.float32:
        return False
    return _backend == "onednn" or _auto_choice() == "onednn"


def _onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x[..., K] @ w[N, K]^T`` on oneDNN, no autograd (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``x @ w^T`` with gradients; forward and input gradient on oneDNN. With a process
    group, the input gradient is all-reduced over it while the weight gradient computes
    (a column-parallel layer's backward)."""

    @staticmethod
    def forward(ctx, x, w, dgrad_group):
        ctx.save_for_backward(x, w)
        ctx.dgrad_group = dgrad_group
        return _onednn_linear(x, w)

    @staticmethod
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        grad_x = grad_w = handle = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad_out, w.t())  # [..., N] @ [N, K]
            if ctx.dgrad_group is not None:
                handle = dist.all_reduce(grad_x, group=ctx.dgrad_group, async_op=True)
        if ctx.needs_input_grad[1]:
            g_MN = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = g_MN.t().mm(x.reshape(-1, x.shape[-1]))  # [N, K]
        if handle is not None:
            handle.wait()
        return grad_x, grad_w, None


def prepack(w: torch.Tensor) -> torch.Tensor:
    """A copy of the weight ``w[N, K]`` in oneDNN's blocked layout, which :func:`linear`
    takes in place of ``w`` for inference-only calls; ``w`` itself where the oneDNN path does
    not apply (torch backend, CUDA or non-fp32 weights).

    oneDNN reorders a plain weight into its blocked layout on every call; for a weight used
    by many small GEMMs (generation: one decode step per token) that reorder dominates
    (``python tools/bench_gemm.py`` measures plain against packed). The copy does not
    follow later updates of ``w``."""
    if not uses_onednn(w, w):
        return w
    return torch.ops.mkldnn._reorder_linear_weight(w.detach())


def _packed_linear(x: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("cpu_gemm.linear: a prepacked weight is for inference (no gradients)")
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError(
            f"cpu_gemm.linear: a prepacked weight needs fp32 CPU inputs, got {x.dtype} on "
            f"{x.device.type}"
        )
    return _onednn_linear(x, w_packed)


def linear(x: torch.Tensor, w: torch.Tensor, dgrad_group=None) -> torch.Tensor:
    """``x[..., K] @ w[N, K]^T -> [..., N]`` (``F.linear`` without bias) on the chosen
    backend; differentiable in both arguments. ``dgrad_group`` (oneDNN path only) all-reduces
    the input gradient over that process group in the backward. ``w`` may be a
    :func:`prepack` copy (inference only)."""
    if w.is_mkldnn:
        return _packed_linear(x, w)
    if not uses_onednn(x, w):
        if dgrad_group is not None:
            raise ValueError("cpu_gemm.linear: dgrad_group needs the oneDNN path")
        return F.linear(x, w)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _OneDNNLinear.apply(x, w, dgrad_group)
    return _onednn_linear(x, w)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)``; a 2-D ``b`` goes through :func:`linear` as ``a @ (b^T)^T``
    (free when ``b`` is a transposed weight, as in ``x @ W.t()``)."""
    if b.dim() == 2 and a.dim() >= 1 and uses_onednn(a, b):
        return linear(a, b.t())
    return torch.matmul(a, b)
