"""Core attention for the local (non-transformer-engine) layer spec.

megatron-core's ``DotProductAttention`` materialises ``[b, n, s, s]`` scores with
``baddbmm``, masks and soft-maxes them in separate passes, and repeats K/V heads for
grouped-query attention. ``SDPAttention`` keeps its constructor (partition sizes, softmax
scale, dropout) and runs fused attention instead: causal batches and packed micro-batches
(``packed_seq_params`` in ``thd`` format, see ``models.packing``: each segment attends only
to itself, no padding computed) go through ``hpc_rlhf.ops.causal_attention`` (the C++ CPU
kernel for fp32 on CPU, torch SDPA otherwise); batches with a padding mask through
``torch.nn.functional.scaled_dot_product_attention`` with that mask. A sliding window
(``TransformerConfig.window_size``, Mistral) limits every path the same way.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention

from hpc_rlhf.ops.causal_attention import causal_attention, repeat_kv_heads, window_mask


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
        dropout = self.attention_dropout.p if self.training else 0.0
        window_size = self.config.window_size  # megatron's (left, right): (W - 1, 0)
        window = None if window_size is None else int(window_size[0]) + 1
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise NotImplementedError(
                    f"SDPAttention: packed format {packed_seq_params.qkv_format!r} (only 'thd')"
                )
            T, n_heads, d = query.shape  # [T, N, D]: one packed row
            ctx_T1ND = causal_attention(
                query.unsqueeze(1),
                key.unsqueeze(1),
                value.unsqueeze(1),
                packed_seq_params.cu_seqlens_q,
                self.softmax_scale,
                dropout,
                window=window,
            )
            return ctx_T1ND.reshape(T, n_heads * d)
        sq, b, n_heads, d = query.shape
        if attention_mask is None:  # plain causal
            ctx_SBND = causal_attention(
                query, key, value, None, self.softmax_scale, dropout, window=window
            )
            return ctx_SBND.reshape(sq, b, n_heads * d)
        q_BNSD = query.permute(1, 2, 0, 3)
        k_BNSD, v_BNSD = repeat_kv_heads(
            key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), n_heads
        )
        # megatron's mask: True = masked out; SDPA's boolean mask: True = attend. Padding
        # leaves each row's real tokens contiguous, so a window over indices is one over
        # positions.
        attend = ~attention_mask
        if window is not None:
            attend = attend & window_mask(sq, window, query.device)
        ctx_BNSD = F.scaled_dot_product_attention(
            q_BNSD,
            k_BNSD,
            v_BNSD,
            attn_mask=attend,
            dropout_p=dropout,
            scale=self.softmax_scale,
        )
        return ctx_BNSD.permute(2, 0, 1, 3).reshape(sq, b, n_heads * d)
