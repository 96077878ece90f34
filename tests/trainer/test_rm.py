"""Reward-model training end to end: the first step's loss is the ranking loss of
transformers' ``LlamaForSequenceClassification`` end scores (packed and padded micro-batches,
whose gradients agree), held-out accuracy rises from a coin flip to well above it at 1
process, TP=2 x DP=2 and PP=2 (whose first step equals the single process's), and the
exported checkpoint is an HF sequence classifier giving the trained model's scores."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from hpc_rlhf.config import RMRunConfig, config_from_dict, config_to_dict
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


def make_cfg(parallel: dict | None = None, init: str | None = None, **train) -> RMRunConfig:
    return config_from_dict(
        {
            "model": MODEL,
            "parallel": parallel or {},
            "optimizer": {"lr": 2e-3, "lr_decay_style": "constant"},
            "train": {
                "steps": 16,
                "seq_length": 64,
                "micro_batch_size_per_rank": 2,
                "global_batch_size": 8,
                "eval_interval": 8,
                **train,
            },
            "data": {"eval_fraction": 0.1},
            "rm": {"regularization": 0.001},
            "init": init,
        },
        RMRunConfig,
    )


def _rm(rank, world, cfg):
    from hpc_rlhf.trainer.rm import run_rm

    return run_rm(cfg)


@pytest.fixture(scope="module")
def single():
    return run_world(_rm, 1, make_cfg())[0]


@pytest.mark.parametrize(
    "world,parallel",
    [(1, None), (4, {"tensor_model_parallel_size": 2}), (2, {"pipeline_model_parallel_size": 2})],
    ids=["1proc", "tp2_dp2", "pp2"],
)
def test_held_out_accuracy_rises_well_above_a_coin_flip(single, world, parallel):
    history = single if world == 1 else run_world(_rm, world, make_cfg(parallel))[0]
    # a zero-initialised score head ties every pair: accuracy 0.5 before training
    assert history[0]["accuracy"] == pytest.approx(0.5)
    assert history[-1]["eval_accuracy"] > 0.8, history[-1]
    assert history[-1]["eval_better_score"] > history[-1]["eval_worse_score"]
    assert history[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-6)


def _cost_cfg(parallel: dict | None = None) -> RMRunConfig:
    cfg = make_cfg(parallel, seq_length=96)
    return config_from_dict(
        {**config_to_dict(cfg), "rm": {"objective": "cost", "regularization": 0.001}},
        RMRunConfig,
    )


@pytest.mark.parametrize(
    "world,parallel", [(1, None), (4, {"tensor_model_parallel_size": 2})], ids=["1proc", "tp2_dp2"]
)
def test_cost_model_ranks_harm_and_separates_safe_from_unsafe(world, parallel):
    history = run_world(_rm, world, _cost_cfg(parallel))[0]
    assert history[0]["sign_accuracy"] == 0.0  # zero costs have no sign yet
    last = history[-1]
    assert last["eval_accuracy"] > 0.8 and last["eval_sign_accuracy"] > 0.8, last
    assert last["eval_worse_cost"] > 0 > last["eval_better_cost"]


def _hf_rm_state(tmp_path) -> tuple[str, dict]:
    from hpc_rlhf.models.hf_io import save_hf_checkpoint
    from hpc_rlhf.models.init import random_hf_state

    cfg = make_cfg()
    state = random_hf_state(cfg.model, seed=5)
    state.pop("lm_head.weight")
    gen = torch.Generator().manual_seed(6)
    state["score.weight"] = 0.5 * torch.randn(1, cfg.model.hidden_size, generator=gen)
    path = str(tmp_path / "rm_init")
    save_hf_checkpoint(path, cfg.model, state)
    return path, state


def _first_step(rank, world, cfg):
    from hpc_rlhf.data.preference import PreferenceDataset
    from hpc_rlhf.data.tokenizer import load_tokenizer
    from hpc_rlhf.trainer.rm import run_rm

    loss = run_rm(cfg)[0]["loss"]
    t = cfg.train
    data = PreferenceDataset(cfg.data, cfg.rm.margins, load_tokenizer(), t.seq_length, t.seed, 512)
    n_micro = t.global_batch_size // t.micro_batch_size_per_rank
    return loss, data.step_microbatches(0, n_micro, t.micro_batch_size_per_rank, 0, 1)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_first_loss_is_the_ranking_loss_of_transformers_end_scores(tmp_path, packed):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from hpc_rlhf.models.hf_config import hf_config_from_model

    init, state = _hf_rm_state(tmp_path)
    cfg = make_cfg(init=init, steps=1, pack_sequences=packed)
    loss, microbatches = run_world(_first_step, 1, cfg)[0]
    hf_cfg = {
        k: v for k, v in hf_config_from_model(cfg.model, "score").items() if k != "architectures"
    }
    hf = LlamaForSequenceClassification(LlamaConfig(**hf_cfg)).double().eval()
    hf.load_state_dict({k: v.double() for k, v in state.items()}, strict=True)
    total, samples, reg = 0.0, 0, cfg.rm.regularization
    with torch.no_grad():
        for mb in microbatches:
            scores = []
            for b in range(mb.shape[0]):
                n = int(mb.attention_mask_BS[b].sum())
                hidden = hf.model(mb.input_ids_BS[b : b + 1, :n]).last_hidden_state
                scores.append(float(hf.score(hidden)[0, n - 1, 0]))
            for (better, worse), margin, weight in zip(
                mb.pairs_P2.tolist(), mb.margins_P.tolist(), mb.pair_weights_P.tolist()
            ):
                diff = scores[better] - scores[worse] - margin
                squares = scores[better] ** 2 + scores[worse] ** 2
                term = math.log1p(math.exp(-diff)) + reg * squares / 2
                total += weight * term
            samples += mb.n_samples
    assert loss == pytest.approx(total / samples, rel=1e-5)


def _gradients(rank, world):
    from hpc_rlhf.config import ModelConfig, ParallelConfig
    from hpc_rlhf.data.preference import PreferenceDataset
    from hpc_rlhf.data.tokenizer import load_tokenizer
    from hpc_rlhf.models.init import random_hf_state
    from hpc_rlhf.parallel.state import initialize_parallel
    from hpc_rlhf.trainer.losses import ranking_loss_fn
    from hpc_rlhf.trainer.trainable_model import TrainableModel

    cfg = make_cfg()
    model_cfg = ModelConfig(**MODEL)
    state = initialize_parallel(ParallelConfig(), model_cfg, seed=1)
    data = PreferenceDataset(cfg.data, cfg.rm.margins, load_tokenizer(), 64, 1, 512)
    mbs = data.step_microbatches(0, 3, 3, 0, 1)
    hf_state = random_hf_state(model_cfg, seed=2)
    hf_state.pop("lm_head.weight")
    hf_state["score.weight"] = 0.3 * torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    out = {}
    for packed in (False, True):
        model = TrainableModel(
            model_cfg,
            cfg.optimizer,
            state,
            "reward",
            pack_sequences=packed,
            output_positions="last_token",
        )
        model.load_hf_state(hf_state)
        for chunk in model.model:
            chunk.zero_grad_buffer()
        outputs = model.forward_backward(mbs, ranking_loss_fn(0.01))
        out[packed] = (model.reduce_metrics(outputs)["loss"], gather_grads_hf(model, state))
    return out


def test_packed_preference_micro_batches_give_the_padded_gradients():
    out = run_world(_gradients, 1)[0]
    (padded_loss, padded_grads), (packed_loss, packed_grads) = out[False], out[True]
    assert packed_loss == pytest.approx(padded_loss, rel=1e-6)
    for name, grad in padded_grads.items():
        assert max_rel_diff(packed_grads[name], grad) < 1e-5, name
    assert padded_grads["score.weight"].abs().sum() > 0


def _export(rank, world, cfg):
    from hpc_rlhf.data.preference import PreferenceDataset
    from hpc_rlhf.data.tokenizer import load_tokenizer
    from hpc_rlhf.trainer.rm import run_rm

    history = run_rm(cfg)
    data = PreferenceDataset(cfg.data, cfg.rm.margins, load_tokenizer(), 64, cfg.train.seed, 512)
    return history, data.eval


def test_exported_reward_model_is_an_hf_sequence_classifier(tmp_path):
    from transformers import AutoConfig, LlamaForSequenceClassification

    cfg = make_cfg(steps=4, hf_export_dir=str(tmp_path / "hf"))
    cfg = config_from_dict(
        {**config_to_dict(cfg), "rm": {"regularization": 0.001, "normalize_scores": True}},
        RMRunConfig,
    )
    history, samples = run_world(_export, 1, cfg)[0]
    path = str(tmp_path / "hf")
    assert AutoConfig.from_pretrained(path).architectures == ["LlamaForSequenceClassification"]
    hf = LlamaForSequenceClassification.from_pretrained(path).double().eval()
    accuracy, every_score = 0.0, []
    with torch.no_grad():
        for sample in samples:
            scores = [float(hf(torch.tensor([seq])).logits[0, 0]) for seq in sample.sequences]
            every_score += scores
            for better, worse, _ in sample.pairs:
                win = 1.0 if scores[better] > scores[worse] else 0.0
                accuracy += win / len(sample.pairs)
    # the calibration stored with the export: mean / population std of the held-out scores
    stored = json.load(open(os.path.join(path, "score_normalization.json")))
    mean = sum(every_score) / len(every_score)
    std = math.sqrt(sum((x - mean) ** 2 for x in every_score) / len(every_score))
    assert stored["mean"] == pytest.approx(mean, abs=1e-4)
    assert stored["std"] == pytest.approx(std, rel=1e-4)
    # the held-out accuracy the run reported, recomputed from the exported HF model
    assert accuracy / len(samples) == pytest.approx(history[-1]["eval_accuracy"], abs=1e-6)
    assert history[-1]["eval_accuracy"] > 0.6  # a trained head, not the tied initial one


def test_rm_command_under_torchrun_reports_held_out_accuracy(tmp_path):
    import re

    from tests.dist import torchrun_cli

    result = torchrun_cli(
        "rm",
        "examples/configs/rm_tiny_cpu.yaml",
        "--out-dir",
        str(tmp_path / "out"),
        "train.steps=12",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    accuracy = re.search(r"held-out accuracy ([0-9.]+)", result.stdout)
    assert accuracy is not None and float(accuracy.group(1)) > 0.7, result.stdout[-1000:]
