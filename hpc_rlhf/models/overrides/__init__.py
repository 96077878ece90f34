"""Every change hpc_rlhf makes to megatron-core, in one place (DESIGN.md convention 13).

=======================  =========  ==================================================  ==========
substitution             scope      what it replaces                                    module
=======================  =========  ==================================================  ==========
torch RMSNorm            spec       ``WrappedTorchNorm`` (refuses sequence parallel)    ``spec``
``fused_rmsnorm``        spec       that norm, as one fused op (``ops.rms_norm``)       ``spec``
``swiglu_mlp``           spec       the local MLP's activation (``ops.swiglu``)         ``spec``
``core_attention``       spec       ``DotProductAttention`` (fused, packed THD), and    ``spec``
                                    ``SelfAttention`` (packed rows sharing prefixes;
                                    also in transformer-engine's spec)
``selective_outputs``    model      the LM head's and the last layer's forward: only    ``selective``
                                    the rows a caller reads
``onednn_gemm``          process    the TP linear layers' GEMM function (oneDNN)        ``cpu_kernels``
``sparse_embedding_grad`` process   the embedding's dense weight gradient               ``cpu_kernels``
``rope_kernel``          process    megatron's unfused RoPE (``ops.rope``)              ``cpu_kernels``
=======================  =========  ==================================================  ==========

Spec substitutions apply to the local layer spec only (``model.transformer_impl='local'``;
transformer-engine's spec brings its own fused modules); model ones to each built chunk;
process ones once per process, on CPU-only machines, after ``parallel.cpu`` made
megatron-core run there (what that module changes is not a speed substitution but what
megatron-core needs to run at all). Each is switched by a flag of ``model.overrides``
(``config.MegatronOverrides``, all on by default); ``tests/models/test_overrides.py``
checks the loss and every gradient with all of them on against megatron-core's own modules
(all off). ``core_attention`` is what runs packed micro-batches: with it
off, use ``ppo.pack_sequences: false``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

import torch

from hpc_rlhf.config import MegatronOverrides
from hpc_rlhf.models.overrides.selective import (
    OutputRows,
    install_selective_final_layer,
    install_selective_head,
)

logger = logging.getLogger(__name__)

_process_applied: tuple[str, ...] | None = None  # the process-scope ones, once applied


def layer_spec(flags: MegatronOverrides, qk_norm: bool = False):
    """The local layer spec with the spec substitutions ``flags`` switch on (and per-head
    query/key RMSNorm with ``qk_norm``)."""
    from hpc_rlhf.models.overrides.spec import local_layer_spec

    return local_layer_spec(
        swiglu_mlp=flags.swiglu_mlp,
        core_attention=flags.core_attention,
        qk_norm=qk_norm,
        fused_rmsnorm=flags.fused_rmsnorm,
    )


def final_norm(flags: MegatronOverrides):
    """The local spec's final norm class (``fused_rmsnorm`` or torch's)."""
    from hpc_rlhf.models.overrides.spec import norm_spec

    return norm_spec(flags.fused_rmsnorm)


def install_model_overrides(gpt: Any, flags: MegatronOverrides) -> OutputRows:
    """Apply the model-scope substitutions to a freshly built ``GPTModel`` chunk and return
    its ``OutputRows`` (kept on the chunk as ``gpt.output_rows``, the one attribute the
    runner reads). The chunk's head must already be in place."""
    from hpc_rlhf.models.heads import ScalarHead

    head = getattr(gpt, "output_layer", None) if gpt.post_process else None
    selection = OutputRows(scalar_head=isinstance(head, ScalarHead))
    config = gpt.config
    if head is not None and flags.selective_outputs:
        layers = gpt.decoder.layers
        if not config.sequence_parallel and len(layers) > 0:
            install_selective_final_layer(layers[-1], selection)
        if not selection.scalar_head:
            install_selective_head(head, selection, config.sequence_parallel)
    gpt.output_rows = selection
    gpt.shares_prefixes = _runs_shared_prefixes(gpt)
    return selection


def _runs_shared_prefixes(gpt: Any) -> bool:
    """Whether every attention layer of the chunk runs packed rows with shared prefixes
    (``models.attention.SharedPrefixSelfAttention``); a runner must not share otherwise."""
    from hpc_rlhf.models.attention import SharedPrefixSelfAttention

    layers = gpt.decoder.layers
    return all(isinstance(layer.self_attention, SharedPrefixSelfAttention) for layer in layers)


def apply_process_overrides(flags: MegatronOverrides) -> list[str]:
    """Apply the process-scope substitutions ``flags`` switch on, once per process and
    only without CUDA (on a GPU megatron-core's own kernels run). Returns those applied
    (by the first call; later calls with other flags raise)."""
    from hpc_rlhf.models.overrides import cpu_kernels

    global _process_applied
    wanted = tuple(
        name
        for name in ("onednn_gemm", "sparse_embedding_grad", "rope_kernel")
        if getattr(flags, name)
    )
    if torch.cuda.is_available():
        return []
    if _process_applied is not None:
        if _process_applied != wanted:
            raise RuntimeError(
                f"megatron-core overrides already applied as {list(_process_applied)}; "
                f"cannot switch to {list(wanted)} in the same process"
            )
        return list(wanted)
    steps = {
        "onednn_gemm": cpu_kernels.route_linear_gemms,
        "sparse_embedding_grad": cpu_kernels.sparse_embedding_grads,
        "rope_kernel": cpu_kernels.route_rope,
    }
    for name in wanted:
        steps[name]()
    _process_applied = wanted
    logger.info("megatron-core CPU overrides: %s", ", ".join(wanted) or "none")
    return list(wanted)


@contextmanager
def output_rows(model: torch.nn.Module, rows: torch.Tensor | None):
    """Within the block the chunk (possibly DDP-wrapped) computes its outputs at ``rows``
    only; yields the output kind (see ``OutputRows.active``), ``None`` when dense."""
    module = getattr(model, "module", model)
    selection = getattr(module, "output_rows", None)
    if selection is None or rows is None:
        yield None
        return
    with selection.active(rows) as kind:
        yield kind
