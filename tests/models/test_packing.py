"""Packed (THD) micro-batches: the layout's bookkeeping (shared prefixes included), and a
packed forward/backward, with and without shared prefixes, that matches the padded one
(log-probs, values, end scores, gradients) at 1 process, TP=2 (with and without sequence
parallelism), and under pipelining (PP=2, virtual PP, TP=2 x PP=2)."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.models.packing import PackedLayout, packed_length, row_sharing
from hpc_rlhf.models.runner import MicroBatch
from hpc_rlhf.ops.rope import segment_positions
from tests.dist import run_world
from tests.parallel.common import TINY, layout_parallel_config, random_hf_state


def _mask(lengths: list[int], S: int) -> torch.Tensor:
    return torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]


def test_layout_packs_real_tokens_end_to_end_and_back():
    mask_BS = _mask([3, 5, 1], 6)
    x_BS = torch.arange(18).view(3, 6)
    layout = PackedLayout.from_mask(mask_BS)
    assert layout.packed_length == 9
    assert layout.pack(x_BS).tolist() == [[0, 1, 2, 6, 7, 8, 9, 10, 12]]
    assert layout.positions_1T.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0]]
    assert layout.cu_seqlens.tolist() == [0, 3, 8, 9]
    assert layout.max_seqlen == 5
    back_BS = layout.unpack(layout.pack(x_BS))
    assert torch.equal(back_BS, torch.where(mask_BS, x_BS, 0))


def test_layout_tail_rounds_to_multiple():
    layout = PackedLayout.from_mask(_mask([3, 5, 1], 6), multiple=4)
    assert layout.packed_length == 12
    assert layout.cu_seqlens.tolist() == [0, 3, 8, 9, 12]
    assert layout.pack(torch.ones(3, 6, dtype=torch.long), fill=7)[0, 9:].tolist() == [7, 7, 7]


def test_layout_selected_index_matches_padded_head_order():
    mask_BS = _mask([4, 6, 2], 6)
    select_BS = mask_BS.clone()
    select_BS[:, 0] = False  # e.g. response positions only
    layout = PackedLayout.from_mask(mask_BS)
    hidden_BS = torch.randn(3, 6)
    padded_order_N = hidden_BS.t()[select_BS.t()]  # the padded path's selection
    packed_T = layout.pack(hidden_BS)[0]
    assert torch.equal(packed_T[layout.selected_index(select_BS)], padded_order_N)


@pytest.mark.parametrize(
    "mask_BS",
    [
        _mask([4, 4], 4),  # no padding: nothing to save
        torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool),  # left padding
        _mask([0, 3], 3),  # an empty row
    ],
)
def test_layout_declines(mask_BS):
    assert PackedLayout.from_mask(mask_BS) is None


def test_shared_prefix_layout_runs_equal_leading_tokens_once():
    # rows 0 and 2 share 3 leading tokens, row 3 shares 4 with row 1; row 4 equals row 0's
    # first 3 tokens exactly and so keeps its last token
    ids = [[5, 6, 7, 1, 2], [8, 9, 4, 4, 0], [5, 6, 7, 3, 0], [8, 9, 4, 4, 6], [5, 6, 7, 0, 0]]
    ids_BS = torch.tensor(ids)
    mask_BS = _mask([5, 4, 4, 5, 3], 5)
    sharing = row_sharing(mask_BS, ids_BS, min_shared=2)
    assert sharing.root == [0, 1, 0, 1, 0] and sharing.shared == [0, 0, 3, 4, 2]
    layout = PackedLayout.from_mask(mask_BS, multiple=8, ids_BS=ids_BS, min_shared=2)
    packed = [5, 6, 7, 1, 2, 8, 9, 4, 4, 3, 6, 7]
    assert layout.pack(ids_BS)[0].tolist() == packed + [0] * 4  # the tail rounds to 8
    assert packed_length(mask_BS, 8, True, ids_BS, 2) == layout.packed_length == 16
    assert layout.positions_1T[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 3, 4, 2, 0, 1, 2, 3]
    # every real token's output is read where a token equal to it, in the same context, sits
    packed_T = torch.tensor(packed + [0] * 4)
    assert torch.equal(packed_T[layout.packed_pos_BS.clamp(min=0)] * mask_BS, ids_BS * mask_BS)
    back_BS = layout.unpack(layout.pack(ids_BS))
    assert torch.equal(back_BS, ids_BS * mask_BS)
    select_BS = mask_BS.clone()
    select_BS[:, 0] = False
    assert torch.equal(packed_T[layout.selected_index(select_BS)], ids_BS.t()[select_BS.t()])
    # the attention stream: each row whole, then the tail
    rows = [r[:n] for r, n in zip(ids, [5, 4, 4, 5, 3])]
    assert packed_T[layout.expand_index].tolist() == sum(rows, []) + [0] * 4
    assert layout.expand_index[21:].tolist() == [12, 13, 14, 15]
    assert layout.cu_seqlens.tolist() == [0, 5, 9, 13, 18, 21, 25]
    assert layout.max_seqlen == 5
    # each packed position is computed at a stream position holding it, in its own row
    assert torch.equal(layout.expand_index[layout.collapse_index], torch.arange(16))
    assert layout.collapse_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 17, 20, 21, 22, 23, 24]


def test_shared_prefix_needs_min_tokens_and_unshared_roots():
    ids_BS = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 6], [1, 9, 9, 9]])
    mask_BS = torch.ones(4, 4, dtype=torch.bool)
    assert row_sharing(mask_BS, ids_BS, min_shared=3).shared == [0, 3, 3, 0]
    assert row_sharing(mask_BS, ids_BS, min_shared=3).root == [0, 0, 0, 3]
    assert row_sharing(mask_BS, ids_BS, min_shared=4).shared == [0, 0, 0, 0]
    assert row_sharing(mask_BS, ids_BS).shared == [0, 0, 0, 0]  # off without min_shared
    # no padding and no sharing: packing saves nothing; with sharing it does
    assert PackedLayout.from_mask(mask_BS) is None
    assert PackedLayout.from_mask(mask_BS, ids_BS=ids_BS, min_shared=3).packed_length == 10
    unshared = PackedLayout.from_mask(_mask([4, 2], 4), ids_BS=ids_BS[:2], min_shared=3)
    assert unshared.expand_index is None and unshared.collapse_index is None


def _batches(B: int, S: int, vocab: int, seed: int) -> list[MicroBatch]:
    """Right-padded micro-batches with response (head) positions, lengths 3..S."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        lengths = torch.randint(3, S + 1, (B,), generator=gen)
        lengths[0] = S
        mask_BS = torch.arange(S)[None, :] < lengths[:, None]
        ids_BS = torch.randint(1, vocab, (B, S), generator=gen)
        for row, root, k in ((1, 0, 6), (3, 2, 5)):  # rows beginning as an earlier row does
            k = min(k, int(lengths[row]) - 1, int(lengths[root]))
            ids_BS[row, :k] = ids_BS[root, :k]
        ids_BS = ids_BS * mask_BS
        head_BS = mask_BS.clone()
        head_BS[:, :2] = False
        head_BS[torch.arange(B), lengths - 1] = False  # the last token has no label
        labels_BS = torch.roll(ids_BS, -1, dims=1)
        out.append(
            MicroBatch(
                input_ids_BS=ids_BS,
                attention_mask_BS=mask_BS,
                labels_BS=labels_BS,
                head_mask_BS=head_BS,
            )
        )
    return out


def _logp_loss(tp_group):
    from hpc_rlhf.models.runner import logprobs_from_output

    def fn(batch, logits):
        logp_BS = logprobs_from_output(batch, logits, tp_group)
        n = logp_BS.numel()
        weights_BS = torch.linspace(0.5, 1.5, n, device=logp_BS.device).view_as(logp_BS)
        loss = -(logp_BS * weights_BS * batch.head_mask_BS).sum()
        return loss, batch.head_mask_BS.sum(), {"logp": logp_BS.detach()}

    return fn


def _value_loss(batch, values_BS1):
    values_BS = values_BS1.squeeze(-1)
    mask_BS = batch.attention_mask_BS
    return (values_BS * values_BS * mask_BS).sum(), mask_BS.sum(), {"v": values_BS.detach()}


def _end_score_loss(batch, scores_BS1):
    from hpc_rlhf.models.runner import last_token_mask

    end_B = scores_BS1.squeeze(-1)[last_token_mask(batch.attention_mask_BS)]
    count = torch.tensor(end_B.numel(), device=end_B.device)
    return (end_B * end_B).sum(), count, {"end": end_B.detach()}


def _local_grads(model) -> dict[str, torch.Tensor]:
    """This rank's gradient shards (megatron's fp32 ``main_grad``) by parameter name."""
    return {
        f"{i}.{name}": p.main_grad.detach().clone()
        for i, chunk in enumerate(model.parameters_by_chunk())
        for name, p in chunk.named_parameters()
    }


def _packed_vs_padded(rank, world_size, parallel):
    from hpc_rlhf.config import OptimizerConfig
    from hpc_rlhf.parallel.state import initialize_parallel
    from hpc_rlhf.trainer.trainable_model import TrainableModel

    state = initialize_parallel(parallel, TINY, seed=0)
    actor_state = random_hf_state(TINY)
    critic_state = {k: v for k, v in actor_state.items() if k != "lm_head.weight"}
    critic_state["score.weight"] = 0.1 * torch.randn(1, TINY.hidden_size)
    hf_states = {"actor": actor_state, "critic": critic_state}
    hf_states["reward"] = critic_state
    batches = _batches(4, 12, TINY.vocab_size, seed=3)  # S divisible by TP (SP)
    roles = {  # role: (loss, output name, positions read)
        "actor": (_logp_loss(state.tp_group), "logp", "head_mask"),
        "critic": (_value_loss, "v", "all"),
        "reward": (_end_score_loss, "end", "last_token"),
    }
    out = {}
    for role, (loss_fn, key, positions) in roles.items():
        for mode in ("padded", "packed", "shared"):
            model = TrainableModel(
                TINY, OptimizerConfig(lr=1e-2), state, role, 1, mode != "padded", positions
            )
            model.min_shared_prefix = 3 if mode == "shared" else None
            model.load_hf_state(hf_states[role])
            for chunk in model.model:
                chunk.zero_grad_buffer()
            results = model.forward_backward(batches, loss_fn, keep_tensors=True)
            masks = [b.head_mask_BS if role == "actor" else b.attention_mask_BS for b in batches]
            if role == "reward":
                outputs = [r[key] for r in results]
            else:
                outputs = [r[key][m] for r, m in zip(results, masks)]
            out[(role, mode)] = {  # outputs on the last pipeline stage only
                "out": torch.cat(outputs) if results else None,
                "grads": _local_grads(model),
                "tokens": model.work["train_tokens"],
            }
    return out


LAYOUTS = {  # name: (world size, tensor, pipeline, virtual pipeline, sequence parallel)
    "tp1": (1, 1, 1, None, False),
    "tp2": (2, 2, 1, None, False),
    "tp2_sp": (2, 2, 1, None, True),
    "pp2": (2, 1, 2, None, False),  # one packed length for all micro-batches
    "pp2_vpp2": (2, 1, 2, 2, False),
    "tp2_pp2_sp": (4, 2, 2, None, True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_forward_backward_matches_padded(layout):
    world, tp, pp, vpp, sp = LAYOUTS[layout]
    parallel = layout_parallel_config(tp, pp, vpp, sp)
    for out in run_world(_packed_vs_padded, world, parallel):
        _assert_same(out)


def _assert_same(out: dict) -> None:
    for role in ("actor", "critic", "reward"):
        padded = out[(role, "padded")]
        for mode in ("packed", "shared"):
            packed = out[(role, mode)]
            if padded["out"] is not None:
                assert padded["out"].abs().max() > 0
                torch.testing.assert_close(packed["out"], padded["out"], atol=2e-5, rtol=1e-4)
            assert padded["grads"].keys() == packed["grads"].keys()
            for name, grad in padded["grads"].items():
                assert grad.abs().max() > 0 or "score" in name, name
                torch.testing.assert_close(packed["grads"][name], grad, atol=2e-5, rtol=1e-4)
        # the padding was not run, and with shared prefixes fewer positions still (a
        # pipeline runs every micro-batch at its schedule's longest packed length)
        assert out[(role, "shared")]["tokens"] < out[(role, "packed")]["tokens"]
        assert out[(role, "packed")]["tokens"] < padded["tokens"]


def test_segment_positions_restart_at_every_segment():
    assert segment_positions([3, 0, 2, 1]).tolist() == [0, 1, 2, 0, 1, 0]
    assert segment_positions(torch.tensor([4])).tolist() == [0, 1, 2, 3]
    assert segment_positions([]).numel() == 0
