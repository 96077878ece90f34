"""Shared pieces of the distributed tests: a tiny model, HF-format weights, LM batches."""

from __future__ import annotations

import torch

from hpc_rlhf.config import ModelConfig, OptimizerConfig, ParallelConfig
from hpc_rlhf.models.runner import MicroBatch

TINY = ModelConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=128,
)


def random_hf_state(model: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random Llama weights in HF naming, from the converter's own shape table."""
    from hpc_rlhf.models.param_layout import hf_shapes

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in hf_shapes(model).items():
        if name.endswith("norm.weight") or "layernorm" in name:
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[name] = 0.02 * torch.randn(shape, generator=gen)  # the usual init scale
    return state


def lm_microbatches(n: int, batch: int, seq: int, vocab: int, seed: int = 1) -> list:
    """``n`` microbatches of random tokens with a few masked-out label positions."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        loss_mask = (torch.rand(batch, seq, generator=gen) > 0.2).float()
        out.append(
            MicroBatch.unpadded(tokens[:, :-1], labels_BS=tokens[:, 1:], loss_mask_BS=loss_mask)
        )
    return out


def build_trainable(model: ModelConfig, parallel: ParallelConfig, hf_state, lr=1e-2, steps=10):
    """Parallel groups + an actor ``TrainableModel`` loaded with ``hf_state``."""
    from hpc_rlhf.parallel.state import initialize_parallel
    from hpc_rlhf.trainer.trainable_model import TrainableModel

    state = initialize_parallel(parallel, model)
    trainable = TrainableModel(model, OptimizerConfig(lr=lr, clip_grad=1.0), state, "actor", steps)
    trainable.load_hf_state(hf_state)
    return state, trainable


def dp_share(microbatches: list, dp_rank: int, dp_size: int) -> list:
    """This data-parallel rank's microbatches (round robin)."""
    return microbatches[dp_rank::dp_size]


def gather_grads_hf(trainable, state) -> dict[str, torch.Tensor] | None:
    """Every gradient, in HF naming and full shapes, on global rank 0 (None elsewhere)."""
    import torch.distributed as dist

    from hpc_rlhf.models.reshard import megatron_to_hf

    mine = None
    if state.dp_rank == 0:
        chunks = []
        for chunk in trainable.parameters_by_chunk():
            chunks.append(
                {name: p.main_grad.detach().clone() for name, p in chunk.named_parameters()}
            )
        mine = ((state.pp_rank, state.tp_rank), chunks)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    shards = dict(item for item in gathered if item is not None)
    return megatron_to_hf(shards, trainable.model_cfg, state.tp_size, state.pp_size, state.vpp_size)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``||a - b|| / ||b||`` (Frobenius; the tolerance measure of the parity
    tests: robust to the fp32 rounding of single elements under another reduction order)."""
    diff = (a.double() - b.double()).norm()
    return float(diff / b.double().norm().clamp(min=1e-30))


def layout_parallel_config(tp: int, pp: int, vpp: int | None, sp: bool) -> ParallelConfig:
    """The ParallelConfig of a test layout (tensor, pipeline, virtual pipeline, SP)."""
    return ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sp,
    )
