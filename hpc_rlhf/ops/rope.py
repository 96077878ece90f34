"""Rotate-half rotary position embedding (Llama / megatron-core's non-interleaved RoPE).

Shapes: ``t`` ``[S, B, H, D]`` (megatron's ``sbhd``; a packed ``thd`` row is ``B = 1``),
``cos``/``sin`` ``[P, D]`` tables of the angles of ``P`` positions, ``pos`` ``[S]`` (int64)
the table row of each sequence index (``arange(S)`` for a plain batch, restarting at 0 at
every packed segment). Result ``[S, B, H, D]``:
``t * cos[pos] + rotate_half(t) * sin[pos]`` with ``rotate_half(t) = [-t[D/2:], t[:D/2]]``.

Backends: ``"torch"`` (the reference, that formula; any dtype and device), ``"cpp"``
(``csrc/rope_cpu.cpp``, fp32 or bf16 CPU tensors with fp32 math: one pass over the rows
forward and one backward, the backward being the same kernel transposed, nothing saved but
the tables) and ``"auto"``: ``cpp`` for fp32 / bf16 CPU tensors when ``hpc_rlhf._C`` is
built, else the reference
(``hpc_rlhf.ops._backend.resolve``).
GPUs take the reference here; megatron's own fused RoPE (``apply_rope_fusion``, transformer-
engine) serves them. ``parallel.cpu`` routes megatron-core's unfused RoPE through this op.
"""

from __future__ import annotations

import torch

from hpc_rlhf.ops import _backend

# the backends of this op: the reference, and the C++ kernel for fp32 and bf16 tensors
ROPE_KERNELS = (_backend.TORCH, _backend.Kernel("cpp", dtypes=_backend.FP32_BF16))


def rope_reference(
    t_SBHD: torch.Tensor, cos_PD: torch.Tensor, sin_PD: torch.Tensor, pos_S: torch.Tensor
) -> torch.Tensor:
    """``t cos + rotate_half(t) sin`` at each sequence index's table row."""
    half = t_SBHD.shape[-1] // 2
    rotated = torch.cat([-t_SBHD[..., half:], t_SBHD[..., :half]], dim=-1)
    cos_S11D = cos_PD[pos_S][:, None, None].to(t_SBHD.dtype)
    sin_S11D = sin_PD[pos_S][:, None, None].to(t_SBHD.dtype)
    return t_SBHD * cos_S11D + rotated * sin_S11D


class _RopeCpp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t_SBHD, cos_PD, sin_PD, pos_S):
        ctx.save_for_backward(cos_PD, sin_PD, pos_S)
        return _backend.built_extension().rope_cpu(t_SBHD, cos_PD, sin_PD, pos_S, False)

    @staticmethod
    def backward(ctx, grad_SBHD):
        cos_PD, sin_PD, pos_S = ctx.saved_tensors
        if grad_SBHD.stride(-1) != 1:
            grad_SBHD = grad_SBHD.contiguous()
        grad_t = _backend.built_extension().rope_cpu(grad_SBHD, cos_PD, sin_PD, pos_S, True)
        return grad_t, None, None, None


def rope(
    t_SBHD: torch.Tensor,
    cos_PD: torch.Tensor,
    sin_PD: torch.Tensor,
    pos_S: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Rotate-half RoPE of ``t`` at table rows ``pos`` (see the module docstring);
    differentiable in ``t`` (the tables are constants)."""
    if t_SBHD.dim() != 4 or t_SBHD.shape[-1] % 2:
        raise ValueError(f"rope: t must be [S, B, H, D] with an even D, got {tuple(t_SBHD.shape)}")
    if cos_PD.shape != sin_PD.shape or cos_PD.shape[-1] != t_SBHD.shape[-1]:
        raise ValueError(
            f"rope: cos {tuple(cos_PD.shape)} and sin {tuple(sin_PD.shape)} must be [P, D] "
            f"with D = {t_SBHD.shape[-1]}"
        )
    if pos_S.shape != (t_SBHD.shape[0],):
        raise ValueError(f"rope: pos must be [S] = [{t_SBHD.shape[0]}], got {tuple(pos_S.shape)}")
    chosen = _backend.resolve("rope", backend, t_SBHD.device, ROPE_KERNELS, dtype=t_SBHD.dtype)
    if chosen == "torch":
        return rope_reference(t_SBHD, cos_PD, sin_PD, pos_S)
    if t_SBHD.stride(-1) != 1:
        t_SBHD = t_SBHD.contiguous()
    tables = [x.float().contiguous() for x in (cos_PD, sin_PD)]
    return _RopeCpp.apply(t_SBHD, *tables, pos_S.long().contiguous())


def segment_positions(lengths) -> torch.Tensor:
    """``[T]`` (int64, CPU): each packed token's index within its segment, for segment
    ``lengths`` (a list or 1-D tensor) laid end to end: positions restart at every one."""
    lengths_N = torch.as_tensor(lengths, dtype=torch.long).cpu()
    starts_N = lengths_N.cumsum(0) - lengths_N
    return torch.arange(int(lengths_N.sum())) - torch.repeat_interleave(starts_N, lengths_N)
