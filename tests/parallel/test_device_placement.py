"""The host/device boundary of training and generation (no GPU here: ``meta`` stands in
for the accelerator where a tensor only has to be *placed*, not computed on).

Models compute on ``comm.compute_device()`` (the rank's CUDA device under nccl); micro-batches
are built on the host and moved there whole in the schedule's forward step; sampling's
uniforms come from CPU generators (the same draws on every device) and are placed beside
the logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hpc_rlhf.data.kto import KTOMicroBatch
from hpc_rlhf.data.preference import PreferenceMicroBatch
from hpc_rlhf.inference.sampling import draw_uniforms, sequence_generator
from hpc_rlhf.parallel import comm
from hpc_rlhf.trainer.losses import RolloutMicroBatch

META = torch.device("meta")


def _rollout_batch() -> RolloutMicroBatch:
    B, S = 2, 5
    gen = torch.Generator().manual_seed(0)
    mask_BS = torch.ones(B, S, dtype=torch.bool)
    return RolloutMicroBatch(
        input_ids_BS=torch.randint(0, 9, (B, S), generator=gen),
        attention_mask_BS=mask_BS,
        loss_mask_BS=mask_BS,
        old_logp_BS=torch.randn(B, S, generator=gen),
        advantages_BS=torch.randn(B, S, generator=gen),
        returns_BS=torch.randn(B, S, generator=gen),
    )


def test_every_tensor_field_of_a_subclass_moves_and_none_stays_none():
    mb = _rollout_batch()
    moved = mb.to(META)
    assert type(moved) is RolloutMicroBatch
    for f in dataclasses.fields(mb):
        before, after = getattr(mb, f.name), getattr(moved, f.name)
        if before is None:
            assert after is None, f.name
        else:
            assert after.device == META and after.shape == before.shape, f.name
            assert after.dtype == before.dtype, f.name
    assert mb.input_ids_BS.device.type == "cpu"  # the host copy is untouched


def test_nested_micro_batches_move_with_their_parent():
    B, S = 2, 3
    ids_BS = torch.zeros(B, S, dtype=torch.long)
    none_P2 = torch.zeros(0, 2, dtype=torch.long)
    kl = PreferenceMicroBatch.unpadded(
        ids_BS,
        pairs_P2=none_P2,
        margins_P=torch.zeros(0),
        pair_weights_P=torch.zeros(0),
        n_samples=B,
    )
    mb = KTOMicroBatch.unpadded(ids_BS, desirable_B=torch.ones(B, dtype=torch.bool), kl=kl)
    moved = mb.to(META)
    assert moved.desirable_B.device == META
    assert moved.kl.input_ids_BS.device == META and moved.kl.attention_mask_BS.device == META


def test_a_batch_already_on_the_device_is_not_copied():
    mb = _rollout_batch()
    assert mb.to(torch.device("cpu")) is mb
    assert mb.to("cpu") is mb


def test_uniforms_are_drawn_on_the_host_and_placed_beside_the_logits():
    on_host = draw_uniforms([sequence_generator(3, p, 0) for p in range(4)])
    placed = draw_uniforms([sequence_generator(3, p, 0) for p in range(4)], META)
    assert placed.device == META and placed.dtype == torch.float64 == on_host.dtype
    again = draw_uniforms([sequence_generator(3, p, 0) for p in range(4)], torch.device("cpu"))
    assert torch.equal(again, on_host)


def test_models_and_collectives_stay_on_the_host_without_nccl():
    assert comm.compute_device() == torch.device("cpu")


def _train_step_and_greedy(rank, world_size, hf_weights, prompts):
    from hpc_rlhf.config import ParallelConfig
    from hpc_rlhf.inference.engine import GenerationConfig, GenerationEngine
    from hpc_rlhf.inference.sampling import SamplingParams
    from hpc_rlhf.models.runner import MicroBatch
    from hpc_rlhf.trainer.losses import lm_loss_fn
    from tests.inference.common import CFG, build_actor

    state, actor = build_actor(CFG, ParallelConfig(), hf_weights, trainable=True)
    engine = GenerationEngine(actor, CFG, state, GenerationConfig(block_size=16))
    engine.sync_weights(0)
    greedy = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=8))
    engine.release_weights()
    ids_BS = torch.tensor([p[:6] for p in prompts if len(p) >= 6])
    mb = MicroBatch.unpadded(
        ids_BS[:, :-1], labels_BS=ids_BS[:, 1:], loss_mask_BS=torch.ones_like(ids_BS[:, 1:])
    )
    losses = [actor.train_step([mb], lm_loss_fn(state.tp_group)).metrics["loss"] for _ in (0, 1)]
    devices = {p.device.type for chunk in actor.model for p in chunk.parameters()}
    return [o.token_ids for o in greedy], losses, devices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_nccl_rank_trains_and_generates_on_its_gpu_as_the_host_does():
    """Two train steps and greedy generation in a one-rank nccl world (models on the GPU,
    micro-batches moved there, metrics and tokens back on the host) against the same in a
    gloo world on the CPU: fp32 losses within 1e-4 relative, the same greedy tokens."""
    from tests.dist import run_world, run_world_on
    from tests.inference.common import CFG, hf_causal_lm, hf_state, make_prompts

    weights, prompts = hf_state(hf_causal_lm(CFG)), make_prompts()
    (gpu,) = run_world_on("nccl", _train_step_and_greedy, 1, weights, prompts)
    (cpu,) = run_world(_train_step_and_greedy, 1, weights, prompts)
    assert gpu[2] == {"cuda"} and cpu[2] == {"cpu"}
    assert gpu[0] == cpu[0]
    torch.testing.assert_close(torch.tensor(gpu[1]), torch.tensor(cpu[1]), rtol=1e-4, atol=0)


def _on_host(value):
    """``value`` (nested dicts of tensors) with every tensor copied to the host."""
    if isinstance(value, dict):
        return {key: _on_host(v) for key, v in value.items()}
    return value.cpu() if isinstance(value, torch.Tensor) else value


def _packed_and_shared_on_host(rank, world_size, parallel):
    from tests.models.test_packing import _packed_vs_padded

    return _on_host(_packed_vs_padded(rank, world_size, parallel))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_rows_with_shared_prefixes_match_the_padded_run_on_a_gpu():
    """The packed and shared-prefix paths on the GPU's own attention (SDPA on the attention
    stream) against the padded run there: log-probs, values, end scores and gradients, as
    tests/models/test_packing.py checks them on the CPU."""
    from tests.dist import run_world_on
    from tests.models.test_packing import _assert_same
    from tests.parallel.common import layout_parallel_config

    parallel = layout_parallel_config(1, 1, None, False)
    (out,) = run_world_on("nccl", _packed_and_shared_on_host, 1, parallel)
    _assert_same(out)
