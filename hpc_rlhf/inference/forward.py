"""The decoder's math for generation on this TP rank, reading ``GenerationWeights``.

Legend: ``T`` tokens (packed prefill tokens or one per decoding sequence), ``H`` hidden,
``Hq``/``G`` query/KV heads of this TP rank, ``g = Hq / G``, ``D`` head dim, ``V``/``v`` full
vocabulary / this rank's share.

Llama-style, as megatron-core's local spec computes it: RMSNorm (``torch.nn.RMSNorm``),
fused QKV whose rows are grouped per query group ``[q of the group's heads; k; v]``, RoPE
rotate-half at each token's *real* position (megatron's GPTModel ignores position ids for
RoPE; here a prompt starts at 0 and generated token ``i`` sits at ``prompt_len + i``),
SwiGLU with ``fc1 = [gate; up]``, no biases but the family options: a QKV bias (Qwen2),
per-head query/key RMSNorm before RoPE (Qwen3), scaled RoPE frequencies (Llama-3). Tensor parallelism as megatron: column-parallel
QKV / fc1 shards, row-parallel proj / fc2 followed by an all-reduce over the TP group, a
vocab-parallel embedding (masked lookup + all-reduce) and LM head (``[T, v]`` shards
all-gathered to ``[T, V]``: small, since only one position per sequence gets logits).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hpc_rlhf.config import ModelConfig
from hpc_rlhf.inference.weights import GenerationWeights, LayerWeights
from hpc_rlhf.models import rotary
from hpc_rlhf.ops import cpu_gemm
from hpc_rlhf.ops.rope import rope
from hpc_rlhf.ops.swiglu import swiglu
from hpc_rlhf.parallel.comm import all_gather_tensors, group_sum


@dataclass(frozen=True)
class TPComm:
    """The tensor-parallel group of this rank (size 1: no communication)."""

    group: Any
    size: int
    rank: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return group_sum(x, self.group)

    def all_gather_last(self, x_Tv: torch.Tensor) -> torch.Tensor:
        """``[T, v]`` shards -> ``[T, V]`` in TP-rank order."""
        if self.size == 1:
            return x_Tv
        return torch.cat(all_gather_tensors(x_Tv, self.group), dim=-1)


class Rope:
    """cos/sin tables of rotate-half RoPE (megatron's/HF's formula) at the inverse
    frequencies ``inv_freq`` (``models.rotary``), grown on demand."""

    def __init__(self, inv_freq: torch.Tensor, device=None):
        self.inv_freq = inv_freq
        self.device = device
        self.cos_PD = self.sin_PD = torch.empty(0, 2 * inv_freq.numel())
        self._grow(512)

    def _grow(self, length: int) -> None:
        pos = torch.arange(length, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos_PD, self.sin_PD = emb.cos().to(self.device), emb.sin().to(self.device)

    def ensure(self, length: int) -> None:
        """Make the tables cover positions ``0 .. length-1``."""
        if length > self.cos_PD.shape[0]:
            self._grow(max(length, 2 * self.cos_PD.shape[0]))

    def tables(
        self, positions_T: torch.Tensor, dtype, check: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[T, 1, D]`` at these positions (``check=False``: no host sync,
        the caller has ``ensure``d the length, e.g. inside a CUDA graph)."""
        if check:
            self.ensure(int(positions_T.max()) + 1)
        cos = self.cos_PD[positions_T].to(dtype)[:, None]
        sin = self.sin_PD[positions_T].to(dtype)[:, None]
        return cos, sin


def apply_rope(x_TND: torch.Tensor, cos_T1D: torch.Tensor, sin_T1D: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE ``x cos + rotate_half(x) sin`` through ``ops.rope``, each token its
    own table row (fp32 on CPU: the one-pass kernel; elsewhere the op's torch formula)."""
    T, _, D = x_TND.shape
    pos_T = torch.arange(T, device=x_TND.device)
    table = (cos_T1D.reshape(T, D), sin_T1D.reshape(T, D))
    return rope(x_TND.unsqueeze(1), *table, pos_T).squeeze(1)


# attention(layer, q [T, Hq, D], k [T, G, D], v [T, G, D]) -> [T, Hq*D]; it stores k/v too
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DecoderRunner:
    """Runs embeddings, layers and the LM head of this TP shard on packed tokens."""

    def __init__(self, weights: GenerationWeights, model_cfg: ModelConfig, comm: TPComm):
        self.weights = weights
        self.cfg = model_cfg
        self.comm = comm
        self.heads = model_cfg.num_attention_heads // comm.size
        self.groups = model_cfg.query_groups // comm.size
        self.head_dim = model_cfg.head_dim
        device = weights.embedding_vH.device
        self.rope = Rope(rotary.inv_freq(model_cfg), device)
        # The linear weights in oneDNN's blocked layout on the CPU fp32 path (the tensors
        # themselves elsewhere): decode GEMMs of few rows no longer reorder each weight at
        # every call (ops.cpu_gemm.prepack). A copy, taken when the engine syncs weights
        # (every sync builds a new runner); embeddings and norms are read in place.
        self.layers = [prepacked_layer(w) for w in weights.layers]
        self.output_vH = cpu_gemm.prepack(weights.output_vH)

    def embed(self, ids_T: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel embedding lookup ``[T, H]``."""
        table_vH = self.weights.embedding_vH
        if self.comm.size == 1:
            return F.embedding(ids_T, table_vH)
        v = table_vH.shape[0]
        local_T = ids_T - self.comm.rank * v
        outside_T = (local_T < 0) | (local_T >= v)
        x_TH = F.embedding(local_T.masked_fill(outside_T, 0), table_vH)
        x_TH = x_TH.masked_fill(outside_T[:, None], 0.0)
        return self.comm.all_reduce(x_TH)

    def layer(self, index: int, w: LayerWeights, x_TH, rope_cs, attention: AttentionFn, rows=None):
        """One decoder layer (attention + MLP, residuals), in place of nothing. With
        ``rows`` the MLP runs on those token rows only and only they are returned (the last
        layer of a prefill: nothing reads the other positions' outputs)."""
        eps = self.cfg.norm_epsilon
        T, H = x_TH.shape
        g, G, D = self.heads // self.groups, self.groups, self.head_dim
        h_TH = F.rms_norm(x_TH, (H,), w.in_norm_H, eps)
        qkv_TR = cpu_gemm.linear(h_TH, w.qkv_RH)
        if w.qkv_bias_R is not None:
            qkv_TR = qkv_TR + w.qkv_bias_R
        qkv_TGRD = qkv_TR.view(T, G, g + 2, D)
        q_THD, k_TGD = qkv_TGRD[:, :, :g].reshape(T, G * g, D), qkv_TGRD[:, :, g]
        if w.q_norm_D is not None and w.k_norm_D is not None:  # per head, before RoPE
            q_THD, k_TGD = (
                F.rms_norm(q_THD, (D,), w.q_norm_D, eps),
                F.rms_norm(k_TGD, (D,), w.k_norm_D, eps),
            )
        q_THD, k_TGD = apply_rope(q_THD, *rope_cs), apply_rope(k_TGD, *rope_cs)
        v_TGD = qkv_TGRD[:, :, g + 1]
        attn_TQ = attention(index, q_THD, k_TGD, v_TGD)
        x_TH = x_TH + self.comm.all_reduce(cpu_gemm.linear(attn_TQ, w.proj_HQ))
        if rows is not None:
            x_TH = x_TH[rows]
        h_TH = F.rms_norm(x_TH, (H,), w.mlp_norm_H, eps)
        mlp_TH = cpu_gemm.linear(swiglu(cpu_gemm.linear(h_TH, w.fc1_FH)), w.fc2_HF)
        return x_TH + self.comm.all_reduce(mlp_TH)

    def forward(
        self,
        ids_T: torch.Tensor,
        positions_T: torch.Tensor,
        attention: AttentionFn,
        logit_rows,
        sync_free: bool = False,
    ) -> torch.Tensor:
        """Full-vocabulary fp32 logits ``[R, V]`` at token rows ``logit_rows`` only."""
        x_TH = self.embed(ids_T)
        rope_cs = self.rope.tables(positions_T, x_TH.dtype, check=not sync_free)
        layers = self.layers
        for index, w in enumerate(layers):
            rows = logit_rows if index == len(layers) - 1 else None
            x_TH = self.layer(index, w, x_TH, rope_cs, attention, rows)
        last_RH = x_TH if layers else x_TH[logit_rows]
        h_RH = F.rms_norm(
            last_RH, (last_RH.shape[-1],), self.weights.final_norm_H, self.cfg.norm_epsilon
        )
        logits_Rv = lm_head(h_RH, self.output_vH)
        return self.comm.all_gather_last(logits_Rv).float()


def prepacked_layer(w: LayerWeights) -> LayerWeights:
    """``w`` with its four linear weights through ``cpu_gemm.prepack``."""
    return dataclasses.replace(
        w,
        qkv_RH=cpu_gemm.prepack(w.qkv_RH),
        proj_HQ=cpu_gemm.prepack(w.proj_HQ),
        fc1_FH=cpu_gemm.prepack(w.fc1_FH),
        fc2_HF=cpu_gemm.prepack(w.fc2_HF),
    )


# Below this many rows MKL is faster as weight @ hidden^T (the decode LM head's skinny
# GEMMs). oneDNN (ops.cpu_gemm) beats both forms at every row count, so the trick is only
# for the torch GEMM backend; GPUs take the plain form.
_SKINNY_HEAD_ROWS = 64


def lm_head(h_RH: torch.Tensor, w_vH: torch.Tensor) -> torch.Tensor:
    """Logits ``[R, v]`` of this shard: ``h @ w^T`` (oneDNN on CPU when chosen), computed
    as ``(w @ h^T)^T`` for few rows on the CPU's torch GEMM path (small decode batches)."""
    if (
        h_RH.device.type == "cpu"
        and h_RH.shape[0] < _SKINNY_HEAD_ROWS
        and not cpu_gemm.uses_onednn(h_RH, w_vH)
    ):
        return (w_vH @ h_RH.t()).t().contiguous()
    return cpu_gemm.linear(h_RH, w_vH)
