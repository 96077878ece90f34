"""Run megatron-core on CPU with gloo: redirect its CUDA-only calls to the CPU.

megatron-core assumes a GPU in a few dozen places: ``torch.cuda.current_device()`` as a
device, ``device="cuda"`` literals, CUDA RNG states in the tensor-parallel RNG tracker,
CUDA streams/events/synchronize, ``Tensor.cuda()`` and asserts on
``tensor.type() == 'torch.cuda.FloatTensor'``. This module redirects them without editing
the installed package, and does nothing else (the speed substitutions made on CPU live
with the others in ``models.overrides``):

* every loaded ``megatron.core`` module gets a ``torch`` proxy whose factory functions map a
  CUDA device to the CPU and whose ``cuda`` namespace maps RNG calls to the CPU generator
  and streams/events/synchronize to no-ops;
* the tensor-parallel RNG helpers are pointed at the CPU generator;
* the few functions that compare ``tensor.type()`` with CUDA type names run with CPU type
  names reported as their CUDA counterparts.

``apply_cpu_patches()`` is idempotent, refuses to run when CUDA is available (the GPU path
must stay untouched) and logs once what it changed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

_APPLIED = False

# megatron.core modules imported before patching, so their ``torch`` is redirected.
_MODULES_TO_LOAD = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.module",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.mlp",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
)

_FACTORIES = (
    "empty",
    "zeros",
    "ones",
    "full",
    "tensor",
    "as_tensor",
    "arange",
    "rand",
    "randn",
    "randint",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
)

_CPU = torch.device("cpu")


def _to_cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:0"``, an int, a cuda device) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _cpu_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stands in for ``torch.cuda.Stream`` / ``Event``: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _noop(*args, **kwargs):
    return None


def _cpu_get_rng_state(device: Any = None) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(state: torch.Tensor, device: Any = None) -> None:
    torch.set_rng_state(state)


def _make_cuda_namespace() -> types.SimpleNamespace:
    """A ``torch.cuda`` look-alike for megatron modules: CPU RNG, no-op streams."""
    real = torch.cuda
    ns = types.SimpleNamespace()
    for name in dir(real):
        if not name.startswith("__"):
            with contextlib.suppress(Exception):
                setattr(ns, name, getattr(real, name))
    ns.current_device = lambda: _CPU
    ns.get_rng_state = _cpu_get_rng_state
    ns.set_rng_state = _cpu_set_rng_state
    ns.manual_seed = lambda seed: torch.manual_seed(seed)
    ns.manual_seed_all = lambda seed: torch.manual_seed(seed)
    ns.random = types.SimpleNamespace(
        get_rng_state=_cpu_get_rng_state, set_rng_state=_cpu_set_rng_state
    )
    ns.synchronize = _noop
    ns.empty_cache = _noop
    ns.Stream = _NullStream
    ns.Event = _NullStream
    ns.current_stream = lambda *a, **k: _NullStream()
    ns.default_stream = lambda *a, **k: _NullStream()
    ns.stream = lambda *a, **k: contextlib.nullcontext()
    ns.nvtx = types.SimpleNamespace(range_push=_noop, range_pop=_noop, mark=_noop)
    ns.memory_allocated = lambda *a, **k: 0
    ns.max_memory_allocated = lambda *a, **k: 0
    return ns


class _CpuTorch(types.ModuleType):
    """``torch`` as megatron modules see it on CPU: CUDA devices become the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _make_cuda_namespace()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))
        self.autocast = self._autocast

    @staticmethod
    def _autocast(device_type: str = "cpu", *args, **kwargs):
        if device_type == "cuda":
            device_type = "cpu"
        return torch.autocast(device_type, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        setattr(self, name, value)  # cache: later look-ups skip __getattr__
        return value


@contextlib.contextmanager
def _cuda_type_names():
    """Report CPU tensor type names as CUDA ones (``torch.FloatTensor`` -> ``torch.cuda...``)."""
    original = torch.Tensor.type
    if getattr(original, "_hpc_rlhf_cuda_names", False):  # already inside: re-entrant
        yield
        return

    def type_as_cuda(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = original(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        return original(self, dtype, non_blocking, **kwargs)

    type_as_cuda._hpc_rlhf_cuda_names = True  # type: ignore[attr-defined]
    torch.Tensor.type = type_as_cuda  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


def _with_cuda_type_names(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper._hpc_rlhf_cpu_patched = True  # type: ignore[attr-defined]
    return wrapper


def _patch_type_checks() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    targets = [
        (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
        (distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups"),
        (distrib_optimizer.DistributedOptimizer, "__init__"),
    ]
    for owner, name in targets:
        raw = owner.__dict__[name]
        if isinstance(raw, classmethod):
            setattr(owner, name, classmethod(_with_cuda_type_names(raw.__func__)))
        elif isinstance(raw, staticmethod):
            setattr(owner, name, staticmethod(_with_cuda_type_names(raw.__func__)))
        else:
            setattr(owner, name, _with_cuda_type_names(raw))
    clip_grads.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(
        clip_grads.clip_grad_by_total_norm_fp32
    )
    # Modules that imported the function by name keep the old reference: update them too.
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("megatron.core") and hasattr(
            module, "clip_grad_by_total_norm_fp32"
        ):
            module.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32  # type: ignore[attr-defined]


def _patch_rng_helpers() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    tp_random._get_cuda_rng_state = get_state
    tp_random._set_cuda_rng_state = set_state


def _tensor_cuda_on_cpu(self, device=None, non_blocking=False, **kwargs):
    """``Tensor.cuda()`` without CUDA: megatron moves freshly built CPU tensors; keep them."""
    return self


def apply_cpu_patches() -> list[str]:
    """Redirect megatron-core's CUDA-only calls to the CPU. Returns the patched module names.

    Raises ``RuntimeError`` when CUDA is available: on a GPU megatron-core runs unmodified.
    """
    global _APPLIED
    if torch.cuda.is_available():
        raise RuntimeError("apply_cpu_patches() is for CPU-only machines; CUDA is available")
    if _APPLIED:
        return []
    for name in _MODULES_TO_LOAD:
        importlib.import_module(name)
    proxy = _CpuTorch()
    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = proxy  # type: ignore[attr-defined]
            patched.append(name)
    _patch_rng_helpers()
    _patch_type_checks()
    torch.Tensor.cuda = _tensor_cuda_on_cpu  # type: ignore[assignment]
    _APPLIED = True
    logger.info(
        "no CUDA device: megatron-core runs on CPU (%d modules redirected, CPU RNG for the "
        "tensor-parallel tracker, no-op streams)",
        len(patched),
    )
    return patched
