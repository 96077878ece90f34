"""Backend selection for the fused ops.

Backends: ``"torch"`` (reference, fp32 math, always available), ``"cpp"`` (hpc_rlhf._C, CPU
tensors), ``"cuda"`` (hpc_rlhf._C built with CUDA, CUDA tensors), ``"triton"`` (CUDA tensors,
or CPU tensors under ``TRITON_INTERPRET=1``) and ``"auto"``: the fastest available one for the
tensors' device, found by explicit capability checks (no ``except ImportError``) and logged
once per (op, device, choice) through the ``hpc_rlhf.ops`` logger.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

logger = logging.getLogger("hpc_rlhf.ops")

BACKENDS = ("torch", "cpp", "cuda", "triton")
_LOGGED: set[tuple[str, str, str]] = set()


@functools.cache
def extension() -> ModuleType | None:
    """Return ``hpc_rlhf._C`` if it was built, else None (a broken build raises)."""
    if importlib.util.find_spec("hpc_rlhf._C") is None:
        return None
    return importlib.import_module("hpc_rlhf._C")


def built_extension() -> ModuleType:
    """``hpc_rlhf._C`` for a backend that needs it (callers checked it was built)."""
    ext = extension()
    if ext is None:
        raise RuntimeError("hpc_rlhf._C is not built: reinstall with `pip install -e .`")
    return ext


def ext_has_cuda() -> bool:
    """True when hpc_rlhf._C was built with the CUDA kernels (HPC_RLHF_WITH_CUDA)."""
    ext = extension()
    return ext is not None and bool(getattr(ext, "WITH_CUDA", False))


@functools.cache
def triton_installed() -> bool:
    """True when the triton package is importable (not imported here)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device``; None when it can."""
    if backend == "torch":
        return None
    if backend == "cpp":
        if extension() is None:
            return "backend 'cpp' needs hpc_rlhf._C (pip install -e . builds it from csrc/)"
        if device.type != "cpu":
            return f"backend 'cpp' runs on CPU tensors, got {device.type} tensors"
        return None
    if backend == "cuda":
        if not ext_has_cuda() or device.type != "cuda":
            return (
                "backend 'cuda' needs hpc_rlhf._C built with CUDA and CUDA tensors; "
                f"extension built: {extension() is not None}, with CUDA: {ext_has_cuda()}, "
                f"tensors on: {device.type}"
            )
        return None
    if backend == "triton":
        if not triton_installed():
            return "backend 'triton' needs the triton package, which is not installed"
        if device.type == "cpu" and not triton_interpret():
            return (
                "backend 'triton' on CPU tensors only runs in the interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported"
            )
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' runs on CUDA tensors, got {device.type} tensors"
        return None
    raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")


def resolve(op: str, backend: str, device: torch.device) -> str:
    """Return the concrete backend for ``op`` on ``device``; raise with the reason if none."""
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"{op}: {reason}")
        return backend
    order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    choice = next(b for b in order if unavailable_reason(b, device) is None)
    key = (op, device.type, choice)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(
            "hpc_rlhf.ops.%s: backend 'auto' chose %r for %s tensors", op, choice, device.type
        )
    return choice


def kernels(module: str) -> ModuleType:
    """Import ``hpc_rlhf.kernels.<module>`` (Triton) lazily, after the capability check."""
    return importlib.import_module(f"hpc_rlhf.kernels.{module}")


def implementation(backend: str, torch_fn, kernel_module: str, name: str):
    """The callable ``name`` of a concrete backend: the torch reference, the Triton launcher
    ``hpc_rlhf.kernels.<kernel_module>.<name>``, or the extension's ``<name>_cpu`` /
    ``<name>_cuda``."""
    if backend == "torch":
        return torch_fn
    if backend == "triton":
        return getattr(kernels(kernel_module), name)
    return getattr(extension(), f"{name}_{'cpu' if backend == 'cpp' else 'cuda'}")
