"""Build the four RLHF models on megatron-core's GPTModel from one model config.

Roles: ``actor`` (LM head, trainable), ``reference`` (LM head, frozen), ``critic`` (value
head: one value per token) and ``reward`` (score head: per-token scores; the end score is
read at each sequence's last real token, see ``heads.end_scores``).

Llama-style decoders: RMSNorm, SwiGLU, RoPE, grouped-query attention, tied or untied
embeddings, and the family options of ``ModelConfig`` on megatron-core's own fields (QKV
bias ``add_qkv_bias``, per-head query/key RMSNorm ``qk_layernorm``, head dimension
``kv_channels``); RoPE frequencies come from ``models.rotary`` (llama3 scaling). ``transformer_impl="local"`` uses megatron-core's local modules with the substitutions
of ``models.overrides`` (the CPU and fallback path); ``"transformer_engine"`` uses the TE spec and must be
installed (checked explicitly, never a silent fallback).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from hpc_rlhf.config import ModelConfig, ParallelConfig
from hpc_rlhf.models import overrides, rotary
from hpc_rlhf.models.heads import ScalarHead
from hpc_rlhf.parallel.state import ParallelState, set_virtual_stage

logger = logging.getLogger(__name__)

ROLES = ("actor", "reference", "critic", "reward")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(model: ModelConfig, parallel: ParallelConfig):
    """megatron-core ``TransformerConfig`` for a Llama-style decoder in this layout."""
    from megatron.core.transformer import TransformerConfig

    dtype = TORCH_DTYPES[model.params_dtype]
    vpp = parallel.virtual_pipeline_model_parallel_size
    # Interleaved schedules with PP=2 and batched p2p give wrong results upstream
    # (Megatron-LM issues 750/1450); overlapped, unbatched p2p is exact.
    safe_p2p = vpp is not None
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        qk_layernorm=model.qk_norm,
        # megatron's (left, right) window: W - 1 earlier positions and none later
        window_size=None if model.sliding_window is None else (model.sliding_window - 1, 0),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        overlap_p2p_comm=safe_p2p,
        batch_p2p_comm=not safe_p2p,
        deallocate_pipeline_outputs=False,
    )


def layer_spec(model: ModelConfig):
    """The transformer-layer spec for ``model.transformer_impl``: transformer-engine's (which
    must be installed: checked, never a silent fallback), or the local one with
    ``models.overrides``' substitutions."""
    if model.transformer_impl == "transformer_engine":
        if not _transformer_engine_available():
            raise RuntimeError(
                "model.transformer_impl='transformer_engine' but transformer-engine is not "
                "installed (pip install hpc_rlhf[gpu]); use transformer_impl='local'"
            )
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        from hpc_rlhf.models.overrides.spec import shared_prefix_attention

        return shared_prefix_attention(
            get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_norm)
        )
    return overrides.layer_spec(model.overrides, qk_norm=model.qk_norm)


def _transformer_engine_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def _block_spec(model: ModelConfig, config, vp_stage: int | None, pp_rank: int):
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer = layer_spec(model)
    if model.transformer_impl == "transformer_engine":
        return layer
    n_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * n_layers, layer_norm=overrides.final_norm(model.overrides)
    )


def build_model(
    model: ModelConfig, state: ParallelState, role: str, vp_stage: int | None = None
) -> torch.nn.Module:
    """One model chunk of ``role`` for this rank (``vp_stage`` with virtual pipelining)."""
    from megatron.core.models.gpt import GPTModel

    overrides.apply_process_overrides(model.overrides)
    if role not in ROLES:
        raise ValueError(f"unknown model role {role!r}; expected one of {ROLES}")
    config = transformer_config(model, state.config)
    pre, post = state.holds_embedding(vp_stage), state.holds_output_layer(vp_stage)
    lm_head = role in ("actor", "reference")
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=_block_spec(model, config, vp_stage, state.pp_rank),
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings and lm_head,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        vp_stage=vp_stage,
    )
    gpt.rotary_pos_emb.inv_freq = rotary.inv_freq(model)  # the one formula (llama3 scaling)
    if post and not lm_head:
        # a critic's value has a bias; a reward model's score head has none (HF's
        # LlamaForSequenceClassification), and a pairwise loss could not train one
        bias = role == "critic"
        gpt.output_layer = ScalarHead(model.hidden_size, state.sequence_parallel, bias).to(
            config.params_dtype
        )
    overrides.install_model_overrides(gpt, model.overrides)
    if role == "reference":
        gpt.requires_grad_(False)
        gpt.eval()
    return gpt


def build_model_chunks(model: ModelConfig, state: ParallelState, role: str) -> list:
    """All model chunks of this rank: one, or one per virtual pipeline stage."""
    if not state.vpp_size:
        return [build_model(model, state, role)]
    chunks = []
    for stage in range(state.vpp_size):
        set_virtual_stage(stage)
        chunks.append(build_model(model, state, role, vp_stage=stage))
    set_virtual_stage(0)
    return chunks
