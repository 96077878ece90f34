"""Core attention for the local (non-transformer-engine) layer spec: torch SDPA.

megatron-core's ``DotProductAttention`` materialises ``[b, n, s, s]`` scores with
``baddbmm``, masks and soft-maxes them in separate passes, and repeats K/V heads for
grouped-query attention. ``SDPAttention`` keeps its constructor (partition sizes, softmax
scale, dropout) and runs ``torch.nn.functional.scaled_dot_product_attention`` instead: a
fused kernel on CPU and GPU, with grouped-query attention handled inside it.

Packed micro-batches (``packed_seq_params`` in ``thd`` format, see ``models.packing``) run
one causal SDPA per segment: the rows share no attention and no padding is computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SDPAttention(DotProductAttention):
    """Drop-in core attention: same inputs and output layout as ``DotProductAttention``."""

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention: attention bias needs transformer-engine")
        if packed_seq_params is not None:
            return self._packed_forward(query, key, value, packed_seq_params)
        sq, b, n_heads, d = query.shape
        q_BNSD = query.permute(1, 2, 0, 3)
        k_BGSD = key.permute(1, 2, 0, 3)
        v_BGSD = value.permute(1, 2, 0, 3)
        k_BNSD, v_BNSD = _repeat_kv_heads(k_BGSD, v_BGSD, n_heads)
        dropout = self.attention_dropout.p if self.training else 0.0
        if attention_mask is None:  # plain causal
            ctx_BNSD = F.scaled_dot_product_attention(
                q_BNSD, k_BNSD, v_BNSD, dropout_p=dropout, is_causal=True, scale=self.softmax_scale
            )
        else:  # megatron's mask: True = masked out; SDPA's boolean mask: True = attend
            ctx_BNSD = F.scaled_dot_product_attention(
                q_BNSD,
                k_BNSD,
                v_BNSD,
                attn_mask=~attention_mask,
                dropout_p=dropout,
                scale=self.softmax_scale,
            )
        return ctx_BNSD.permute(2, 0, 1, 3).reshape(sq, b, n_heads * d)

    def _packed_forward(self, query_THD, key_TGD, value_TGD, packed_seq_params):
        """Causal attention within each segment of a packed row -> ``[T, H*D]``."""
        from hpc_rlhf.models.packing import segment_bounds

        if packed_seq_params.qkv_format != "thd":
            raise NotImplementedError(
                f"SDPAttention: packed format {packed_seq_params.qkv_format!r} (only 'thd')"
            )
        T, n_heads, d = query_THD.shape
        dropout = self.attention_dropout.p if self.training else 0.0
        parts = []
        for start, end in segment_bounds(packed_seq_params):
            q_1NLD = query_THD[start:end].transpose(0, 1).unsqueeze(0)
            k_1GLD = key_TGD[start:end].transpose(0, 1).unsqueeze(0)
            v_1GLD = value_TGD[start:end].transpose(0, 1).unsqueeze(0)
            k_1NLD, v_1NLD = _repeat_kv_heads(k_1GLD, v_1GLD, n_heads)
            ctx_1NLD = F.scaled_dot_product_attention(
                q_1NLD, k_1NLD, v_1NLD, dropout_p=dropout, is_causal=True, scale=self.softmax_scale
            )
            parts.append(ctx_1NLD[0].transpose(0, 1))  # [L, N, D]
        return torch.cat(parts).reshape(T, n_heads * d)


def _repeat_kv_heads(k_BGSD, v_BGSD, n_heads: int):
    """K/V with each of the ``G`` query groups' heads repeated to ``n_heads`` (GQA)."""
    groups = k_BGSD.shape[1]
    if n_heads == groups:
        return k_BGSD, v_BGSD
    rep = n_heads // groups
    return k_BGSD.repeat_interleave(rep, dim=1), v_BGSD.repeat_interleave(rep, dim=1)
