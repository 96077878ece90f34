"""SFT end to end: the loss is transformers' Llama NLL over the assistant tokens (a global
token mean), packed micro-batches give the padded ones' loss and gradients, the loss and
the held-out loss fall at 1 process, TP=2 x DP=2 and PP=2 (whose first steps equal the
single process's), and a resumed run reproduces the uninterrupted one and exports an HF
checkpoint PPO's ``actor_init`` reads."""

from __future__ import annotations

import math

import pytest
import torch

from hpc_rlhf.config import SFTRunConfig, config_from_dict
from tests.dist import run_world
from tests.parallel.common import gather_grads_hf, max_rel_diff

MODEL = {
    "num_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 176,
    "vocab_size": 512,
    "max_position_embeddings": 128,
}


def make_cfg(parallel: dict | None = None, **train) -> SFTRunConfig:
    return config_from_dict(
        {
            "model": MODEL,
            "parallel": parallel or {},
            "optimizer": {"lr": 3e-3, "lr_decay_style": "constant"},
            "train": {
                "steps": 12,
                "seq_length": 96,
                "micro_batch_size_per_rank": 2,
                "global_batch_size": 8,
                "eval_interval": 4,
                **train,
            },
            "data": {"eval_fraction": 0.04},
        },
        SFTRunConfig,
    )


def _sft(rank, world, cfg):
    from hpc_rlhf.trainer.sft import run_sft

    return run_sft(cfg)


def _falls(history, key: str) -> tuple[float, float]:
    values = [h[key] for h in history if key in h]
    return values[0], values[-1]


@pytest.fixture(scope="module")
def single():
    return run_world(_sft, 1, make_cfg())[0]


@pytest.mark.parametrize(
    "world,parallel",
    [(1, None), (4, {"tensor_model_parallel_size": 2}), (2, {"pipeline_model_parallel_size": 2})],
    ids=["1proc", "tp2_dp2", "pp2"],
)
def test_sft_loss_and_held_out_loss_fall(single, world, parallel):
    history = single if world == 1 else run_world(_sft, world, make_cfg(parallel))[0]
    first, last = _falls(history, "loss")
    assert last < first - 1.0, f"loss {first:.3f} -> {last:.3f}"
    eval_first, eval_last = _falls(history, "eval_loss")
    assert eval_last < eval_first - 0.3 and history[-1]["eval_ppl"] == pytest.approx(
        math.exp(eval_last)
    )
    assert [h["step"] for h in history] == list(range(1, 13))
    # the same global batch in every layout: the first step is the single process's
    assert history[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-6)


def _first_loss_and_batches(rank, world, cfg, init_dir):
    from hpc_rlhf.data.sft import SFTDataset
    from hpc_rlhf.data.tokenizer import load_tokenizer
    from hpc_rlhf.trainer.sft import run_sft

    history = run_sft(cfg)
    t = cfg.train
    data = SFTDataset(cfg.data, load_tokenizer(), t.seq_length, t.seed, 512)
    n_micro = t.global_batch_size // t.micro_batch_size_per_rank
    return history[0]["loss"], data.step_microbatches(0, n_micro, t.micro_batch_size_per_rank, 0, 1)


def test_sft_loss_is_transformers_llama_nll_over_assistant_tokens(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hpc_rlhf.models.hf_config import hf_config_from_model
    from hpc_rlhf.models.hf_io import save_hf_checkpoint
    from hpc_rlhf.models.init import random_hf_state

    cfg0 = make_cfg()
    hf_state = random_hf_state(cfg0.model, seed=11)
    init_dir = str(tmp_path / "init")
    save_hf_checkpoint(init_dir, cfg0.model, hf_state)
    cfg = make_cfg(steps=1)
    cfg = config_from_dict({**_as_dict(cfg), "init": init_dir}, SFTRunConfig)
    loss, microbatches = run_world(_first_loss_and_batches, 1, cfg, init_dir)[0]
    hf_cfg = {k: v for k, v in hf_config_from_model(cfg.model).items() if k != "architectures"}
    llama = LlamaForCausalLM(LlamaConfig(**hf_cfg)).double().eval()
    llama.load_state_dict({k: v.double() for k, v in hf_state.items()}, strict=True)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for mb in microbatches:
            for b in range(mb.shape[0]):
                n = int(mb.attention_mask_BS[b].sum())
                logp = llama(mb.input_ids_BS[b : b + 1, :n]).logits[0].log_softmax(-1)
                for t in range(n):
                    if mb.loss_mask_BS[b, t]:
                        nll -= float(logp[t, mb.labels_BS[b, t]])
                        tokens += 1
    assert tokens > 0
    assert loss == pytest.approx(nll / tokens, rel=1e-5)


def _as_dict(cfg) -> dict:
    from hpc_rlhf.config import config_to_dict

    return config_to_dict(cfg)


def _packed_vs_padded(rank, world):
    from hpc_rlhf.config import ModelConfig, ParallelConfig
    from hpc_rlhf.data.sft import SFTDataset
    from hpc_rlhf.data.tokenizer import load_tokenizer
    from hpc_rlhf.models.init import random_hf_state
    from hpc_rlhf.parallel.state import initialize_parallel
    from hpc_rlhf.trainer.losses import lm_loss_fn
    from hpc_rlhf.trainer.trainable_model import TrainableModel

    cfg = make_cfg()
    model_cfg = ModelConfig(**MODEL)
    state = initialize_parallel(ParallelConfig(), model_cfg, seed=1)
    data = SFTDataset(cfg.data, load_tokenizer(), 96, 1, 512)
    mbs = data.step_microbatches(0, 3, 4, 0, 1)
    out = {}
    for packed in (False, True):
        model = TrainableModel(model_cfg, cfg.optimizer, state, "actor", pack_sequences=packed)
        model.load_hf_state(random_hf_state(model_cfg, seed=2))
        for chunk in model.model:
            chunk.zero_grad_buffer()
        metrics = model.reduce_metrics(model.forward_backward(mbs, lm_loss_fn(None)))
        out[packed] = (metrics["loss"], gather_grads_hf(model, state))
    return out


def test_packed_sft_micro_batches_give_the_padded_loss_and_gradients():
    out = run_world(_packed_vs_padded, 1)[0]
    (padded_loss, padded_grads), (packed_loss, packed_grads) = out[False], out[True]
    assert packed_loss == pytest.approx(padded_loss, rel=1e-6)
    for name, grad in padded_grads.items():
        assert max_rel_diff(packed_grads[name], grad) < 1e-5, name


def _resume(rank, world, full, half, resumed):
    from hpc_rlhf.models.hf_io import load_hf_checkpoint_for
    from hpc_rlhf.trainer.sft import run_sft

    whole = run_sft(full)
    first = run_sft(half)
    second = run_sft(resumed)
    exported = load_hf_checkpoint_for(full.model, full.train.hf_export_dir)
    return whole, first, second, exported


def test_resumed_sft_reproduces_the_uninterrupted_run_and_exports_hf(tmp_path):
    common = {"steps": 4, "eval_interval": 2}
    full = make_cfg(**common, save_dir=str(tmp_path / "a"), hf_export_dir=str(tmp_path / "hf"))
    half = make_cfg(**{**common, "steps": 2}, save_dir=str(tmp_path / "b"))
    resumed = make_cfg(**common, save_dir=str(tmp_path / "b"))
    whole, first, second, exported = run_world(_resume, 1, full, half, resumed)[0]
    assert [h["step"] for h in second] == [3, 4]
    for ours, theirs in zip(first + second, whole):
        for key, value in theirs.items():
            assert ours[key] == value, key
    assert exported["model.embed_tokens.weight"].shape == (512, 64)


def test_sft_command_under_torchrun_reports_falling_losses(tmp_path):
    from tests.dist import torchrun_cli

    result = torchrun_cli(
        "sft",
        "examples/configs/sft_tiny_cpu.yaml",
        "--out-dir",
        str(tmp_path / "out"),
        "train.steps=10",
        f"train.hf_export_dir={tmp_path / 'hf'}",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "over 10 steps (falling)" in result.stdout
    assert "held-out loss" in result.stdout
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 10 and (tmp_path / "hf" / "config.json").exists()
