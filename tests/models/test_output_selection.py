"""Outputs at selected positions only (``models.overrides.selective``): the last decoder
layer's MLP, the final norm and the head run on the read rows (actor/critic: response
positions; reward model: each row's last token), and the read outputs and every gradient
equal those of the dense model that computes all positions. Padded and packed
micro-batches, at 1 process, TP=2, TP=2 with sequence parallelism (where the final layer
stays dense), PP=2 and PP=2 x virtual PP=2."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hpc_rlhf.models.runner import last_token_mask
from tests.dist import run_world
from tests.models.test_packing import _batches, _local_grads
from tests.parallel.common import TINY, layout_parallel_config, random_hf_state

ROLES = {  # role: positions its callers read
    "actor": "head_mask",
    "critic": "head_mask",
    "reward": "last_token",
}


def _read_mask(role: str, batch) -> torch.Tensor:
    if ROLES[role] == "last_token":
        return last_token_mask(batch.attention_mask_BS)
    return batch.head_mask_BS


def _loss(role: str, tp_group, dense: bool):
    """Weighted sum of the read outputs; ``dense``: the model returned every position."""
    from hpc_rlhf.models.runner import logprobs_from_output

    def fn(batch, output):
        read_BS = _read_mask(role, batch)
        if role == "actor":
            view = dataclasses.replace(batch, head_mask_BS=None) if dense else batch
            out_BS = logprobs_from_output(view, output, tp_group)
        else:
            out_BS = output.squeeze(-1)
        weights_BS = torch.linspace(0.5, 1.5, out_BS.numel()).view_as(out_BS)
        loss = (out_BS * weights_BS * read_BS).sum()
        return loss, read_BS.sum(), {"out": out_BS.detach()}

    return fn


def _mlp_rows_seen(model) -> list[int]:
    """Records the rows each chunk's last-layer MLP receives (on the last stage)."""
    seen: list[int] = []
    for chunk in model.parameters_by_chunk():
        if chunk.post_process:
            chunk.decoder.layers[-1].mlp.register_forward_hook(
                lambda mod, args, out: seen.append(args[0].shape[0] * args[0].shape[1])
            )
    return seen


def _selected_vs_dense(rank, world_size, parallel):
    from hpc_rlhf.config import OptimizerConfig
    from hpc_rlhf.parallel.state import initialize_parallel
    from hpc_rlhf.trainer.trainable_model import TrainableModel

    state = initialize_parallel(parallel, TINY, seed=0)
    lm_state = random_hf_state(TINY)
    scalar_state = {k: v for k, v in lm_state.items() if k != "lm_head.weight"}
    scalar_state["score.weight"] = 0.1 * torch.randn(1, TINY.hidden_size)
    batches = _batches(4, 12, TINY.vocab_size, seed=5)
    out = {}
    for role, positions in ROLES.items():
        for pack in (False, True):
            for dense in (True, False):
                model = TrainableModel(
                    TINY,
                    OptimizerConfig(lr=1e-2),
                    state,
                    role,
                    1,
                    pack,
                    output_positions="all" if dense else positions,
                )
                model.load_hf_state(lm_state if role == "actor" else scalar_state)
                seen = _mlp_rows_seen(model)
                for chunk in model.model:
                    chunk.zero_grad_buffer()
                results = model.forward_backward(
                    batches, _loss(role, state.tp_group, dense), keep_tensors=True
                )
                read = [_read_mask(role, b) for b in batches]
                out[(role, pack, dense)] = {  # outputs on the last pipeline stage only
                    "out": torch.cat([r["out"][m] for r, m in zip(results, read)])
                    if results
                    else None,
                    "grads": _local_grads(model),
                    "mlp_rows": sum(seen),
                    "read_rows": sum(int(m.sum()) for m in read),
                }
    return out


LAYOUTS = {  # name: (world size, tensor, pipeline, virtual pipeline, sequence parallel)
    "tp1": (1, 1, 1, None, False),
    "tp2": (2, 2, 1, None, False),
    "tp2_sp": (2, 2, 1, None, True),
    "pp2": (2, 1, 2, None, False),
    "pp2_vpp2": (2, 1, 2, 2, False),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_selected_outputs_and_grads_match_dense(layout):
    world, tp, pp, vpp, sp = LAYOUTS[layout]
    parallel = layout_parallel_config(tp, pp, vpp, sp)
    for out in run_world(_selected_vs_dense, world, parallel):
        _assert_same(out, sequence_parallel=sp)


def _assert_same(out: dict, sequence_parallel: bool) -> None:
    for role in ROLES:
        for pack in (False, True):
            dense, selected = out[(role, pack, True)], out[(role, pack, False)]
            if dense["out"] is not None:  # the last stage
                assert dense["out"].abs().max() > 0
                torch.testing.assert_close(selected["out"], dense["out"], atol=2e-5, rtol=1e-4)
                # the final MLP ran on the read rows only (dense under sequence parallelism)
                if sequence_parallel:
                    assert selected["mlp_rows"] == dense["mlp_rows"]
                else:
                    assert dense["mlp_rows"] > dense["read_rows"]
                    assert selected["mlp_rows"] == selected["read_rows"]
            assert dense["grads"].keys() == selected["grads"].keys()
            for name, grad in dense["grads"].items():
                assert grad.abs().max() > 0, (role, name)
                torch.testing.assert_close(
                    selected["grads"][name], grad, atol=2e-5, rtol=1e-4, msg=f"{role} {name}"
                )


def test_last_token_mask_marks_each_rows_last_real_token():
    mask_BS = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    expected = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(last_token_mask(mask_BS), expected)
    with pytest.raises(ValueError, match="no non-pad token"):
        last_token_mask(torch.tensor([[1, 0], [0, 0]], dtype=torch.bool))


def test_output_positions_is_checked():
    from hpc_rlhf.trainer.trainable_model import TrainableModel

    with pytest.raises(ValueError, match="output_positions"):  # checked before building
        TrainableModel(TINY, None, None, "reward", output_positions="first_token")
