"""Right-padded batches run as plain causal attention (fused kernel skips the upper
triangle); the result on real tokens equals the explicit padding mask's."""

from __future__ import annotations

import torch

from hpc_rlhf.config import ModelConfig
from hpc_rlhf.models.runner import attention_mask_for, causal_padding_mask
from tests.dist import run_world

CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176)


def test_mask_choice():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert attention_mask_for(right) is None
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(attention_mask_for(left), causal_padding_mask(left))
    holes = torch.tensor([[1, 0, 1, 0]])
    assert attention_mask_for(holes) is not None


def _world(rank, world_size):
    from hpc_rlhf.config import ParallelConfig
    from hpc_rlhf.models.build import build_model
    from hpc_rlhf.models.runner import position_ids_from_mask
    from hpc_rlhf.parallel.state import initialize_parallel

    state = initialize_parallel(ParallelConfig(), CFG, seed=0)
    model = build_model(CFG, state, "actor").eval()
    gen = torch.Generator().manual_seed(0)
    ids_BS = torch.randint(1, CFG.vocab_size, (3, 12), generator=gen)
    mask_BS = torch.ones(3, 12, dtype=torch.long)
    mask_BS[1, 7:] = 0
    mask_BS[2, 2:] = 0
    pos_BS = position_ids_from_mask(mask_BS)
    with torch.no_grad():
        plain = model(ids_BS, pos_BS, attention_mask_for(mask_BS))
        explicit = model(ids_BS, pos_BS, causal_padding_mask(mask_BS))
    keep = mask_BS.bool()
    return {"plain": plain[keep], "explicit": explicit[keep]}


def test_plain_causal_equals_explicit_mask_on_real_tokens():
    (out,) = run_world(_world, 1)
    assert out["plain"].abs().max() > 0
    torch.testing.assert_close(out["plain"], out["explicit"], atol=2e-6, rtol=1e-5)
