"""Run megatron-core on CPU with gloo: redirect its CUDA-only calls to the CPU.

megatron-core assumes a GPU in a few dozen places: ``torch.cuda.current_device()`` as a
device, ``device="cuda"`` literals, CUDA RNG states in the tensor-parallel RNG tracker,
CUDA streams/events/synchronize, ``Tensor.cuda()`` and asserts on
``tensor.type() == 'torch.cuda.FloatTensor'``. This module redirects them without editing
the installed package, and sends the linear layers' GEMMs to ``hpc_rlhf.ops.cpu_gemm``
(oneDNN, faster than PyTorch's MKL path on these shapes):

* every loaded ``megatron.core`` module gets a ``torch`` proxy whose factory functions map a
  CUDA device to the CPU, whose ``cuda`` namespace maps RNG calls to the CPU generator and
  streams/events/synchronize to no-ops, and whose ``matmul`` is ``cpu_gemm.matmul``;
* the column/row-parallel layers' trainable GEMM function runs forward and input gradient
  on oneDNN when no GPU-only feature (sequence parallelism, fused accumulation) is on, and
  the vocabulary-parallel embedding's weight gradient is sparse;
* megatron's unfused RoPE runs as the one-pass ``ops.rope`` kernel where it applies;
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
import inspect
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

from hpc_rlhf.ops import cpu_gemm

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
        # The linear layers' forward GEMM (``torch.matmul(x, weight.t())``) on oneDNN.
        self.matmul = cpu_gemm.matmul

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


def _patch_tensor_parallel_layers() -> None:
    """Column/row-parallel layers' trainable GEMMs on oneDNN (forward and input gradient);
    sparse embedding gradients (``_SparseEmbeddingFunctional``).

    Their ``_forward_impl`` looks ``linear_with_grad_accumulation_and_async_allreduce`` up in
    the module at call time. The CPU version handles the case CPU runs take (no sequence
    parallelism, no gradient-accumulation fusion, no deferred weight gradients): the same
    math, and the input gradient all-reduced over the TP group when megatron asks for it.
    Any other case goes to megatron's own function unchanged."""
    from megatron.core.tensor_parallel import layers
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    megatron_linear = layers.linear_with_grad_accumulation_and_async_allreduce

    signature = inspect.signature(megatron_linear)

    def linear_on_cpu(*args, **kwargs):
        arg = signature.bind(*args, **kwargs)
        arg.apply_defaults()
        a = arg.arguments
        input, weight, bias = a["input"], a["weight"], a["bias"]
        if (
            a["sequence_parallel"]
            or a["gradient_accumulation_fusion"]
            or a["grad_output_buffer"] is not None
            or not cpu_gemm.uses_onednn(input, weight)
        ):
            return megatron_linear(*args, **kwargs)
        group = None
        if a["allreduce_dgrad"]:
            group = get_tensor_model_parallel_group_if_none(a["tp_group"])
        out = cpu_gemm.linear(input, weight, dgrad_group=group)
        return out if bias is None else out + bias

    layers.F = _SparseEmbeddingFunctional()  # its only use there: VocabParallelEmbedding
    # megatron's function keeps its warn-once flag on whatever the module name points to
    linear_on_cpu.warned = megatron_linear.warned  # type: ignore[attr-defined]
    layers.linear_with_grad_accumulation_and_async_allreduce = linear_on_cpu


class _SparseEmbeddingFunctional(types.ModuleType):
    """``torch.nn.functional`` as megatron's embedding layer sees it on CPU: the lookup's
    weight gradient is sparse (the batch's rows only). A dense one costs a zero-filled
    ``[vocab, hidden]`` tensor plus a full add into ``main_grad`` per micro-batch (14-35 ms
    at 32000 x 512 on 2 threads, vs 1.5-1.8 ms sparse); megatron's DDP hook adds either
    kind into ``main_grad`` the same way."""

    def __init__(self):
        super().__init__("torch.nn.functional")

    @staticmethod
    def embedding(input, weight, *args, **kwargs):
        if not args and "sparse" not in kwargs:
            kwargs["sparse"] = weight.device.type == "cpu"
        return torch.nn.functional.embedding(input, weight, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.nn.functional, name)


class _RopeTables:
    """cos/sin ``[P, D]`` of megatron's latest ``freqs`` ``[P, 1, 1, D]`` (the rotary
    embedding is computed once per forward and shared by every layer's query and key)."""

    def __init__(self):
        self.freqs: torch.Tensor | None = None  # held, so its storage cannot be reused
        self.key: tuple = ()
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, freqs: torch.Tensor, mscale: float) -> tuple[torch.Tensor, torch.Tensor]:
        key = (freqs._version, float(mscale))
        if freqs is not self.freqs or key != self.key or self.tables is None:
            angles_PD = freqs.detach().reshape(freqs.shape[0], freqs.shape[-1]).float()
            self.tables = (torch.cos(angles_PD) * mscale, torch.sin(angles_PD) * mscale)
            self.freqs, self.key = freqs, key
        return self.tables


def _patch_rope() -> None:
    """megatron-core's unfused rotate-half RoPE (``apply_rope_fusion`` off, as on CPU) runs
    as ``ops.rope`` (one pass each way instead of five) for fp32 tensors without context
    parallelism, in both the ``sbhd`` and the packed ``thd`` layout (positions restarting
    at each segment, megatron's mapping when ``freqs`` has one row per position of the
    longest segment). Anything else (interleaved or partial rotary dims, multi-latent
    attention, context parallelism, ``freqs`` with one row per packed token) runs
    megatron's own function."""
    from megatron.core import parallel_state
    from megatron.core.transformer import attention

    from hpc_rlhf.models.packing import segment_positions
    from hpc_rlhf.ops.rope import rope

    megatron_rope = attention.apply_rotary_pos_emb
    tables = _RopeTables()

    def rope_on_cpu(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
        cp = cp_group or parallel_state.get_context_parallel_group(check_initialized=False)
        rows = t.shape[0]
        plain = (
            not config.apply_rope_fusion
            and not config.rotary_interleaved
            and not config.multi_latent_attention
            and t.dtype == torch.float32
            and (cp is None or cp.size() == 1)
            and freqs.dim() == 4
            and freqs.shape[1:3] == (1, 1)
            and freqs.shape[-1] == t.shape[-1]
        )
        if plain and cu_seqlens is None and freqs.shape[0] == rows and t.dim() == 4:
            cos_PD, sin_PD = tables.get(freqs, mscale)
            return rope(t, cos_PD, sin_PD, torch.arange(rows))
        if plain and cu_seqlens is not None and t.dim() == 3 and freqs.shape[0] != rows:
            cu = cu_seqlens.long().cpu()
            pos_T = segment_positions(cu[1:] - cu[:-1])
            if int(pos_T.max()) < freqs.shape[0]:
                cos_PD, sin_PD = tables.get(freqs, mscale)
                return rope(t.unsqueeze(1), cos_PD, sin_PD, pos_T).squeeze(1)
        return megatron_rope(t, freqs, config, cu_seqlens, mscale=mscale, cp_group=cp_group)

    attention.apply_rotary_pos_emb = rope_on_cpu


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
    _patch_tensor_parallel_layers()
    _patch_rope()
    torch.Tensor.cuda = _tensor_cuda_on_cpu  # type: ignore[assignment]
    _APPLIED = True
    logger.info(
        "no CUDA device: megatron-core runs on CPU (%d modules redirected, CPU RNG for the "
        "tensor-parallel tracker, no-op streams)",
        len(patched),
    )
    return patched
