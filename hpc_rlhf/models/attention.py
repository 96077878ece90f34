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

``SharedPrefixSelfAttention`` is megatron's ``SelfAttention`` for packed rows whose rows
share leading tokens (``models.packing``): right after the query/key/value projection it
lays q, k and v out as the attention stream (every row whole), so RoPE and the core
attention (this module's, or transformer-engine's THD attention) see each row as without
sharing, and right after the core attention it takes each packed position's output back
out of the stream, before the output projection. Without ``SharedPrefixSeqParams`` it is
``SelfAttention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention
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


@dataclass
class SharedPrefixSeqParams(PackedSeqParams):
    """``PackedSeqParams`` of a packed row with shared prefixes (``models.packing``):
    ``cu_seqlens_*`` / ``max_seqlen_*`` describe the attention stream (every row whole, then
    the tail), ``expand_index`` ``[T_stream]`` is the packed position of each stream token
    and ``collapse_index`` ``[T]`` the stream position that computes each packed one."""

    expand_index: torch.Tensor | None = None
    collapse_index: torch.Tensor | None = None


class SharedPrefixSelfAttention(SelfAttention):
    """``SelfAttention`` that runs packed rows with shared prefixes (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stream: SharedPrefixSeqParams | None = None
        # a hook, not a wrapper module: the core attention's state-dict keys stay megatron's;
        # it reads the call's own packed_seq_params, so a recomputed core attention (megatron's
        # selective recompute, after this forward returned) collapses the same way
        self.core_attention.register_forward_hook(_collapse_stream, with_kwargs=True)

    def forward(self, hidden_states, attention_mask, *args, packed_seq_params=None, **kwargs):
        """``SelfAttention.forward``; q/k/v and the core attention's output go through the
        attention stream of ``SharedPrefixSeqParams``."""
        if isinstance(packed_seq_params, SharedPrefixSeqParams):
            if self.config.context_parallel_size > 1:
                raise NotImplementedError("shared prefixes with context parallelism")
            self._stream = packed_seq_params
        try:
            return super().forward(
                hidden_states, attention_mask, *args, packed_seq_params=packed_seq_params, **kwargs
            )
        finally:
            self._stream = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        """q, k, v ``[T, 1, heads, D]`` in the attention stream ``[T_stream, ...]`` (an
        output gate, when the model has one, stays per packed position)."""
        qkv = super().get_query_key_value_tensors(*args, **kwargs)
        if self._stream is None:
            return qkv
        index = self._stream.expand_index
        return (*(t.index_select(0, index) for t in qkv[:3]), *qkv[3:])


def _collapse_stream(module, args, kwargs, output):
    """The core attention's output ``[T_stream, ...]`` -> ``[T, ...]`` (each packed
    position's row of the attention stream) for a call with ``SharedPrefixSeqParams``."""
    params = kwargs.get("packed_seq_params")
    if not isinstance(params, SharedPrefixSeqParams):
        return output
    return output.index_select(0, params.collapse_index)
