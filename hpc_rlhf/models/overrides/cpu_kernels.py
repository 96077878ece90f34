"""megatron-core's CPU hot spots routed to hpc_rlhf's kernels (CPU runs only).

* ``onednn_gemm``: the column/row-parallel layers' trainable GEMM function
  (``linear_with_grad_accumulation_and_async_allreduce``) runs forward and input gradient
  on oneDNN (``ops.cpu_gemm``) when no GPU-only feature (sequence parallelism, fused
  gradient accumulation, deferred weight gradients) is on; the layers' plain
  ``torch.matmul`` too. Any other case goes to megatron's own function unchanged.
* ``sparse_embedding_grad``: the vocabulary-parallel embedding's weight gradient is sparse
  (the batch's rows), not a zero-filled ``[vocab, hidden]`` tensor added in full to
  ``main_grad`` every micro-batch; megatron's DDP hook adds either kind the same way.
* ``rope_kernel``: megatron's unfused rotate-half RoPE runs as the one-pass ``ops.rope``
  for fp32 tensors without context parallelism, in the ``sbhd`` and the packed ``thd``
  layout; anything else (interleaved or partial rotary dims, multi-latent attention,
  context parallelism) runs megatron's function.

Each is applied at most once per process, after ``parallel.cpu`` made megatron-core run
on the CPU.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch

from hpc_rlhf.ops import cpu_gemm


def route_linear_gemms() -> None:
    """The tensor-parallel linear layers' GEMMs on oneDNN (``ops.cpu_gemm``)."""
    from megatron.core.tensor_parallel import layers
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    megatron_linear = layers.linear_with_grad_accumulation_and_async_allreduce
    signature = inspect.signature(megatron_linear)

    def linear_on_cpu(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
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

    # megatron's function keeps its warn-once flag on whatever the module name points to
    linear_on_cpu.warned = megatron_linear.warned  # type: ignore[attr-defined]
    layers.linear_with_grad_accumulation_and_async_allreduce = linear_on_cpu
    if layers.torch is torch:
        raise RuntimeError("route_linear_gemms needs megatron-core's CPU torch (parallel.cpu)")
    layers.torch.matmul = cpu_gemm.matmul  # megatron modules' torch on CPU: the layers' GEMM


class _SparseEmbeddingFunctional(types.ModuleType):
    """``torch.nn.functional`` as megatron's embedding layer sees it on CPU: the lookup's
    weight gradient is sparse (the batch's rows only)."""

    def __init__(self):
        super().__init__("torch.nn.functional")

    @staticmethod
    def embedding(input, weight, *args, **kwargs):
        if not args and "sparse" not in kwargs:
            kwargs["sparse"] = weight.device.type == "cpu"
        return torch.nn.functional.embedding(input, weight, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.nn.functional, name)


def sparse_embedding_grads() -> None:
    """megatron's vocabulary-parallel embedding takes sparse weight gradients on CPU."""
    from megatron.core.tensor_parallel import layers

    layers.F = _SparseEmbeddingFunctional()  # its only use there: VocabParallelEmbedding


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


def _plain_rope(t: torch.Tensor, freqs: torch.Tensor, config, cp) -> bool:
    """Whether ``ops.rope`` computes what megatron's unfused RoPE would: exactly in fp32; in
    bf16 within its rounding (the kernel rounds each output once from fp32 math and fp32
    tables, megatron's formula rounds the tables and each product in bf16)."""
    return (
        not config.apply_rope_fusion
        and not config.rotary_interleaved
        and not config.multi_latent_attention
        and t.dtype in (torch.float32, torch.bfloat16)
        and (cp is None or cp.size() == 1)
        and freqs.dim() == 4
        and freqs.shape[1:3] == (1, 1)
        and freqs.shape[-1] == t.shape[-1]
    )


def route_rope() -> None:
    """megatron-core's unfused RoPE (``apply_rope_fusion`` off) as ``ops.rope`` where it
    applies: ``sbhd`` with one ``freqs`` row per position, or packed ``thd`` with positions
    restarting at each segment (``freqs`` one row per position of the longest segment)."""
    from megatron.core import parallel_state
    from megatron.core.transformer import attention

    from hpc_rlhf.ops.rope import rope, segment_positions

    megatron_rope = attention.apply_rotary_pos_emb
    tables = _RopeTables()

    def rope_on_cpu(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
        cp = cp_group or parallel_state.get_context_parallel_group(check_initialized=False)
        rows = t.shape[0]
        plain = _plain_rope(t, freqs, config, cp)
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
