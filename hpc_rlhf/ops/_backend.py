"""Backend selection for the fused ops and the generation engine's attention: one resolver.

Backends: ``"torch"`` (reference, fp32 math, always available), ``"cpp"`` (hpc_rlhf._C, CPU
tensors), ``"cuda"`` (hpc_rlhf._C built with CUDA, CUDA tensors), ``"triton"`` (CUDA tensors,
or CPU tensors under ``TRITON_INTERPRET=1``), ``"flash_attn"`` (the flash-attn package on a
CUDA device of compute capability >= 8.0; the engine's attention only) and ``"auto"``.

An op declares the backends it implements as :class:`Kernel` s: a backend name, the dtypes
its kernel takes and the op's own limit on a call (e.g. a head dim that is a multiple of
16). :func:`resolve` checks, in order, the backend's capability on the device (explicit
checks, no ``except ImportError``), the dtype and the op's limit. An explicit request that
fails a check raises with the reason; ``"auto"`` takes the first backend that passes in the
device's order (:data:`AUTO_ORDER`: fastest first, ``torch`` last), filtered to the op's
backends. Every choice, requested or ``auto``'s, is logged once per (op, device, choice,
reason) through the ``hpc_rlhf.ops`` logger; ``auto``'s names why it passed over the faster
backends (e.g. "backend 'cpp' needs a head dim that is a multiple of 16, got 24").
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch

logger = logging.getLogger("hpc_rlhf.ops")

BACKENDS = ("torch", "cpp", "cuda", "triton")
# auto's preference per device type, fastest first; any other device type takes the CPU order
AUTO_ORDER = {"cuda": ("flash_attn", "cuda", "triton", "torch"), "cpu": ("cpp", "torch")}
FP32 = (torch.float32,)
FP32_BF16 = (torch.float32, torch.bfloat16)  # C++ kernels with bf16 storage, fp32 math
_SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# what a backend runs on, completed by the dtypes a kernel takes (refusal messages)
_RUNS_ON = {
    "torch": "{} tensors",
    "cpp": "hpc_rlhf._C and {} CPU tensors",
    "cuda": "hpc_rlhf._C built with CUDA and {} CUDA tensors",
    "triton": "triton and {} tensors",
    "flash_attn": "flash-attn and {} CUDA tensors",
}
_LOGGED: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Kernel:
    """A backend an op implements: ``name`` (one of ``_RUNS_ON``), the ``dtypes`` its kernel
    takes (empty: any) and ``limit``, the op's condition on a call, called with the facts
    given to :func:`resolve` and returning why the kernel cannot take the call (or None)."""

    name: str
    dtypes: tuple[torch.dtype, ...] = ()
    limit: Callable[..., str | None] | None = None


TORCH = Kernel("torch")  # the reference every op has: any dtype and device
# the ops that implement every backend with no condition beyond the backend's capability
EVERY_BACKEND = tuple(Kernel(name) for name in BACKENDS)


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


@functools.cache
def flash_attn_installed() -> bool:
    """True when the flash_attn package is importable (not imported here)."""
    return importlib.util.find_spec("flash_attn") is not None


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cpp_reason(device: torch.device) -> str | None:
    if extension() is None:
        return "backend 'cpp' needs hpc_rlhf._C (pip install -e . builds it from csrc/)"
    if device.type != "cpu":
        return f"backend 'cpp' runs on CPU tensors, got {device.type} tensors"
    return None


def _cuda_reason(device: torch.device) -> str | None:
    if not ext_has_cuda() or device.type != "cuda":
        return (
            "backend 'cuda' needs hpc_rlhf._C built with CUDA and CUDA tensors; "
            f"extension built: {extension() is not None}, with CUDA: {ext_has_cuda()}, "
            f"tensors on: {device.type}"
        )
    return None


def _triton_reason(device: torch.device) -> str | None:
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


def _flash_attn_reason(device: torch.device) -> str | None:
    capable = (
        device.type == "cuda"
        and flash_attn_installed()
        and torch.cuda.get_device_capability(device)[0] >= 8
    )
    if not capable:
        return (
            "backend 'flash_attn' needs flash-attn installed and a CUDA device of compute "
            f"capability >= 8.0 (flash-attn installed: {flash_attn_installed()}, "
            f"device: {device})"
        )
    return None


_CAPABILITY: dict[str, Callable[[torch.device], str | None]] = {
    "torch": lambda device: None,
    "cpp": _cpp_reason,
    "cuda": _cuda_reason,
    "triton": _triton_reason,
    "flash_attn": _flash_attn_reason,
}


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device``; None when it can."""
    if backend not in _CAPABILITY:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto', *_CAPABILITY)}")
    return _CAPABILITY[backend](device)


def _dtype_name(dtype: torch.dtype) -> str:
    return _SHORT_DTYPE.get(dtype, str(dtype))


def refusal(
    kernel: Kernel, device: torch.device, dtype: torch.dtype | None, facts: dict[str, object]
) -> str | None:
    """Why ``kernel`` cannot take a call on ``device`` tensors of ``dtype`` with these facts
    (capability, then dtype, then the op's limit); None when it can."""
    reason = unavailable_reason(kernel.name, device)
    if reason is None and kernel.dtypes and dtype not in kernel.dtypes:
        if dtype is None:
            raise TypeError(f"backend {kernel.name!r} takes some dtypes only: pass dtype=")
        wanted = " or ".join(_dtype_name(d) for d in kernel.dtypes)
        runs_on = _RUNS_ON[kernel.name].format(wanted)
        reason = f"backend {kernel.name!r} needs {runs_on}, got {dtype} tensors"
    if reason is None and kernel.limit is not None:
        limit = kernel.limit(**facts)
        reason = None if limit is None else f"backend {kernel.name!r} {limit}"
    return reason


def resolve(
    op: str,
    backend: str,
    device: torch.device,
    implemented: Sequence[Kernel] = EVERY_BACKEND,
    *,
    dtype: torch.dtype | None = None,
    **facts: object,
) -> str:
    """The concrete backend of ``op`` (whose backends are ``implemented``) for a call on ``device``
    tensors of ``dtype`` with ``facts`` (keyword arguments of the kernels' limits).

    Raises ValueError for a backend the op does not implement and RuntimeError, with the
    reason, for one that cannot take the call; ``"auto"`` falls back along
    :data:`AUTO_ORDER` (see the module docstring)."""
    by_name = {k.name: k for k in implemented}
    if backend != "auto" and backend not in by_name:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {('auto', *by_name)}")
    if backend != "auto":
        reason = refusal(by_name[backend], device, dtype, facts)
        if reason is not None:
            raise RuntimeError(f"{op}: {reason}; use 'torch' or 'auto'")
        _log_once(op, f"backend {backend!r} as requested for {device.type} tensors")
        return backend
    passed_over: list[str] = []
    for name in AUTO_ORDER.get(device.type, AUTO_ORDER["cpu"]):
        if name not in by_name:
            continue
        reason = refusal(by_name[name], device, dtype, facts)
        if reason is None:
            note = f" ({'; '.join(passed_over)})" if passed_over else ""
            _log_once(op, f"backend 'auto' chose {name!r} for {device.type} tensors{note}")
            return name
        passed_over.append(reason)
    raise RuntimeError(f"{op}: no backend can take this call ({'; '.join(passed_over)})")


def _log_once(op: str, message: str) -> None:
    """Log ``message`` (it names the device and the choice) the first time ``op`` has it."""
    key = (op, message)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info("%s: %s", op, message)


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
