"""The DPO family end to end (``hpc-rlhf dpo``).

* The first step's loss and implicit rewards of every loss (DPO, conservative DPO, IPO,
  SimPO, ORPO, KTO) equal float64 plain-Python formulas on transformers' Llama log-probs
  of the same micro-batches, with a policy and a reference of different weights.
* A policy micro-batch's loss positions are exactly each response's tokens.
* Learning on the shipped toy preference (intact sentences over scrambled ones): DPO's and
  SimPO's held-out implicit-reward accuracy rises well above a coin flip, and KTO raises
  the desirable completions' log-probs over the reference's, at 1 process and at
  TP=2 x DP=2 (whose first steps equal the single process's).
* Precomputed reference log-probs equal the per-step ones (the run is the same), are
  cached with the checkpoints and ignored when they are for other data; a resumed run
  reproduces the uninterrupted one.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from hpc_rlhf.config import DPORunConfig, config_from_dict
from tests.dist import run_world
from tests.trainer.tiny import TINY_MODEL

MODEL = dict(TINY_MODEL)


def make_cfg(parallel: dict | None = None, dpo: dict | None = None, **train) -> DPORunConfig:
    init = train.pop("init", None)
    data = train.pop("data", {})
    online = train.pop("online", {})
    return config_from_dict(
        {
            "model": MODEL,
            "parallel": parallel or {},
            "optimizer": {"lr": 2e-3, "lr_decay_style": "constant"},
            "train": {
                "steps": 12,
                "seq_length": 64,
                "micro_batch_size_per_rank": 2,
                "global_batch_size": 8,
                "eval_interval": 6,
                **train,
            },
            "data": {"eval_fraction": 0.1, **data},
            "dpo": dpo or {},
            "init": init,
            **online,
        },
        DPORunConfig,
    )


def _runs(rank, world, cfgs):
    from hpc_rlhf.trainer.dpo import run_dpo

    return [run_dpo(cfg) for cfg in cfgs]


# ----------------------------------------------------------------------------- float64 oracle


def _hf_models(tmp_path) -> tuple[str, str, dict, dict]:
    """Two random HF Llama checkpoints (policy init and reference) and their states."""
    from hpc_rlhf.config import ModelConfig
    from hpc_rlhf.models.hf_io import save_hf_checkpoint
    from hpc_rlhf.models.init import random_hf_state

    model_cfg = ModelConfig(**MODEL)
    paths, states = [], []
    for name, seed in (("policy", 11), ("reference", 12)):
        state = random_hf_state(model_cfg, seed=seed, std=0.08)
        path = str(tmp_path / name)
        save_hf_checkpoint(path, model_cfg, state)
        paths.append(path)
        states.append(state)
    return paths[0], paths[1], states[0], states[1]


def _llama(state: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hpc_rlhf.config import ModelConfig
    from hpc_rlhf.models.hf_config import hf_config_from_model

    hf_cfg = hf_config_from_model(ModelConfig(**MODEL), "lm")
    hf_cfg = {k: v for k, v in hf_cfg.items() if k != "architectures"}
    model = LlamaForCausalLM(LlamaConfig(**hf_cfg)).double().eval()
    model.load_state_dict({k: v.double() for k, v in state.items()}, strict=True)
    return model


def _row_logps(model, mb) -> list[tuple[float, int]]:
    """``(summed log-prob, tokens)`` of each row's loss positions, in float64."""
    out = []
    with torch.no_grad():
        for b in range(mb.shape[0]):
            n = int(mb.attention_mask_BS[b].sum())
            logits = model(mb.input_ids_BS[b : b + 1, :n]).logits[0].log_softmax(-1)
            total, count = 0.0, 0
            for t in range(n):
                if mb.loss_mask_BS[b, t] > 0:
                    total += float(logits[t, int(mb.labels_BS[b, t])])
                    count += 1
            out.append((total, count))
    return out


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _pair_loss(name: str, beta: float, smoothing: float, gamma: float, c, r) -> float:
    """One pair's loss from the papers; ``c``/``r``: ``(policy, reference, tokens)``."""
    (pc, rc, nc), (pr, rr, nr) = c, r
    if name == "sigmoid":
        h = beta * ((pc - rc) - (pr - rr))
        return -(1 - smoothing) * _log_sigmoid(h) - smoothing * _log_sigmoid(-h)
    if name == "ipo":
        h = (pc - rc) / nc - (pr - rr) / nr
        return (h - 1 / (2 * beta)) ** 2
    if name == "simpo":
        return -_log_sigmoid(beta * (pc / nc - pr / nr) - gamma)
    assert name == "orpo"

    def log_odds(a: float) -> float:
        return a - math.log(1 - math.exp(a))

    return -pc / nc - beta * _log_sigmoid(log_odds(pc / nc) - log_odds(pr / nr))


def _first_step(rank, world, cfgs):
    from hpc_rlhf.data.tokenizer import load_tokenizer
    from hpc_rlhf.trainer.dpo import preference_data, run_dpo
    from hpc_rlhf.trainer.kto import completion_data

    out = []
    for cfg in cfgs:
        first = run_dpo(cfg)[0]
        t, tok = cfg.train, load_tokenizer()
        data = (completion_data if cfg.dpo.loss == "kto" else preference_data)(cfg, tok)
        n_micro = t.global_batch_size // t.micro_batch_size_per_rank
        out.append((first, data.step_microbatches(0, n_micro, t.micro_batch_size_per_rank, 0, 1)))
    return out


LOSSES = [
    ("sigmoid", {}),
    ("sigmoid", {"label_smoothing": 0.2}),
    ("ipo", {"beta": 0.5}),
    ("simpo", {}),
    ("orpo", {}),
]


def test_first_step_of_every_paired_loss_is_the_papers_formula_on_transformers_logprobs(
    tmp_path,
):
    policy_path, ref_path, policy_state, ref_state = _hf_models(tmp_path)
    cfgs = []
    for name, extra in LOSSES:
        dpo = {"loss": name, **extra}
        if name in ("sigmoid", "ipo"):
            dpo["reference"] = ref_path
        cfgs.append(make_cfg(dpo=dpo, steps=1, init=policy_path, data={"shuffle": False}))
    results = run_world(_first_step, 1, cfgs)[0]
    policy, reference = _llama(policy_state), _llama(ref_state)
    for cfg, (first, microbatches) in zip(cfgs, results):
        d = cfg.dpo
        beta = d.effective_beta()
        total = chosen = accurate = magnitude = 0.0
        samples = 0
        for mb in microbatches:
            pol, ref = _row_logps(policy, mb), _row_logps(reference, mb)
            for (better, worse), weight in zip(mb.pairs_P2.tolist(), mb.pair_weights_P.tolist()):
                c = (pol[better][0], ref[better][0], pol[better][1])
                r = (pol[worse][0], ref[worse][0], pol[worse][1])
                total += weight * _pair_loss(d.loss, beta, d.label_smoothing, d.simpo_gamma, c, r)
                if d.loss in ("simpo", "orpo"):  # implicit rewards: beta x mean log-prob
                    rc, rr = beta * c[0] / c[2], beta * r[0] / r[2]
                else:
                    rc, rr = beta * (c[0] - c[1]), beta * (r[0] - r[1])
                chosen += weight * rc
                accurate += weight * (rc > rr)
                magnitude += weight * beta * (abs(c[0]) + abs(c[1]))
            samples += mb.n_samples
        label = f"{d.loss} {d.label_smoothing}"
        assert first["loss"] == pytest.approx(total / samples, rel=1e-5), label
        # rewards/chosen is beta x a difference of two summed log-probs (each from its own
        # fp32 kernels here and in transformers): its error scales with the terms, not with
        # their (small, at step 0) difference
        scale = magnitude / samples
        assert first["rewards/chosen"] == pytest.approx(chosen / samples, abs=1e-6 * scale), label
        assert first["rewards/accuracies"] == pytest.approx(accurate / samples, abs=1e-6), label


def test_first_step_of_kto_is_the_papers_formula_with_its_reference_point(tmp_path):
    policy_path, ref_path, policy_state, ref_state = _hf_models(tmp_path)
    dpo = {"loss": "kto", "reference": ref_path, "desirable_weight": 1.3}
    cfg = make_cfg(dpo=dpo, steps=1, init=policy_path, data={"shuffle": False})
    first, microbatches = run_world(_first_step, 1, [cfg])[0][0]
    policy, reference = _llama(policy_state), _llama(ref_state)
    beta, total, count, z0_seen = cfg.dpo.effective_beta(), 0.0, 0, []
    for mb in microbatches:
        kl_pol, kl_ref = _row_logps(policy, mb.kl), _row_logps(reference, mb.kl)
        z0 = max(0.0, sum(p[0] - q[0] for p, q in zip(kl_pol, kl_ref)) / len(kl_pol))
        z0_seen.append(z0)
        pol, ref = _row_logps(policy, mb), _row_logps(reference, mb)
        for b, desirable in enumerate(mb.desirable_B.tolist()):
            reward = pol[b][0] - ref[b][0]
            if desirable:
                total += 1.3 * (1 - 1 / (1 + math.exp(-beta * (reward - z0))))
            else:
                total += 1 - 1 / (1 + math.exp(-beta * (z0 - reward)))
            count += 1
    assert max(z0_seen) > 0 and min(z0_seen) == 0  # the estimate and its clamp both occur
    assert first["loss"] == pytest.approx(total / count, rel=1e-5)
    assert first["kl"] == pytest.approx(sum(z0_seen) / len(z0_seen), abs=1e-4)


def test_policy_micro_batch_reads_each_response_token_once():
    from hpc_rlhf.data.tokenizer import load_tokenizer
    from hpc_rlhf.trainer.dpo import preference_data

    tok = load_tokenizer()
    data = preference_data(make_cfg(data={"shuffle": False}), tok)
    samples = data.train[:6]
    mb = data.collate(samples)
    rows = [(seq, start) for s in samples for seq, start in zip(s.sequences, s.response_starts)]
    for b, (seq, start) in enumerate(rows):
        read = mb.labels_BS[b][mb.loss_mask_BS[b] > 0].tolist()
        assert read == seq[start:], b  # the response and its EOS, nothing of the prompt
        assert seq[start - 1] != tok.eos_id and seq[-1] == tok.eos_id
    assert torch.equal(mb.head_mask_BS, mb.loss_mask_BS > 0)


# ----------------------------------------------------------------------------- learning

LEARNERS = [("sigmoid", {}), ("simpo", {}), ("kto", {"desirable_weight": 1.0})]


def _learning_cfgs(parallel: dict | None = None) -> list[DPORunConfig]:
    return [make_cfg(parallel, dpo={"loss": name, **extra}) for name, extra in LEARNERS]


@pytest.fixture(scope="module")
def single():
    return run_world(_runs, 1, _learning_cfgs())[0]


def _check_learned(name: str, history: list[dict]) -> None:
    first, last = history[0], history[-1]
    if name == "kto":
        # the desirable completions' log-probs rise over the reference's (reward > 0) and
        # more than the undesirable ones'
        assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
        assert last["eval_rewards/chosen"] > 0.05, last
        assert last["eval_rewards/chosen"] > last["eval_rewards/rejected"] + 0.1, last
        assert last["loss"] < first["loss"]
        return
    assert last["eval_rewards/accuracies"] > 0.8, last
    assert last["eval_rewards/margins"] > 0, last
    assert last["loss"] < first["loss"]
    if name == "sigmoid":  # the policy starts as the reference: every implicit reward is 0
        assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)
        assert first["rewards/accuracies"] == 0.0


@pytest.mark.parametrize("world", [1, 4], ids=["1proc", "tp2_dp2"])
def test_dpo_simpo_and_kto_learn_the_toy_preference(single, world):
    parallel = {"tensor_model_parallel_size": 2} if world == 4 else None
    histories = single if world == 1 else run_world(_runs, 4, _learning_cfgs(parallel))[0]
    for (name, _), history, reference in zip(LEARNERS, histories, single):
        _check_learned(name, history)
        assert history[0]["loss"] == pytest.approx(reference[0]["loss"], rel=1e-5), name


# ----------------------------------------------------------------------------- reference, resume


def _precompute_and_resume(rank, world, cfgs, save_dirs):
    import os

    from hpc_rlhf.trainer.checkpoint_files import load_file
    from hpc_rlhf.trainer.dpo import run_dpo
    from hpc_rlhf.trainer.reference import REFERENCE_CACHE

    out = {name: run_dpo(cfgs[name]) for name in ("per_step", "precomputed", "half", "resumed")}
    cache = load_file(os.path.join(save_dirs["precomputed"], REFERENCE_CACHE))
    for name, fingerprint, shift in (("other", "other data", 0.0), ("shifted", None, 1.0)):
        os.makedirs(save_dirs[name], exist_ok=True)
        planted = {
            "fingerprint": fingerprint or cache["fingerprint"],
            "train": cache["train"] + shift,
            "eval": cache["eval"] + shift,
        }
        torch.save(planted, os.path.join(save_dirs[name], REFERENCE_CACHE))
        out[name] = run_dpo(cfgs[name])
    return out


def test_precomputed_reference_equals_the_per_step_pass_is_cached_and_resumes_exactly(tmp_path):
    common = {"steps": 4, "eval_interval": 2, "save_interval": 2}
    dpo = {"loss": "sigmoid", "beta": 0.2}
    pre = {**dpo, "precompute_reference": True}
    dirs = {name: str(tmp_path / name) for name in ("precomputed", "b", "other", "shifted")}
    dirs["half"] = dirs["resumed"] = dirs["b"]
    cfgs = {
        "per_step": make_cfg(dpo=dpo, **common),
        "precomputed": make_cfg(dpo=pre, save_dir=dirs["precomputed"], **common),
        "half": make_cfg(dpo=pre, save_dir=dirs["b"], **{**common, "steps": 2}),
        "resumed": make_cfg(dpo=pre, save_dir=dirs["b"], **common),
        "other": make_cfg(dpo=pre, save_dir=dirs["other"], **common),
        "shifted": make_cfg(dpo=pre, save_dir=dirs["shifted"], **common),
    }
    out = run_world(_precompute_and_resume, 1, cfgs, dirs)[0]
    whole = out["precomputed"]
    # one reference pass before training gives the per-step reference passes' run
    for ours, theirs in zip(whole, out["per_step"]):
        for key, value in theirs.items():
            if key == "rewards/accuracies" and theirs["step"] == 1:
                continue  # policy == reference: every margin's sign is rounding noise
            # rewards are beta x differences of sequence log-probs summed in fp32 in other
            # orders (|log-prob| ~ 100: an ulp is ~1e-5)
            tol = 2e-5 if key.startswith("rewards/") else 1e-7
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=tol), key
    # stopped after step 2 and resumed (reading the cache): the uninterrupted run, exactly
    assert [h["step"] for h in out["resumed"]] == [3, 4]
    assert out["half"] + out["resumed"] == whole
    # a cache for other data is recomputed; one that matches is read (here planted with
    # every reference log-prob shifted by 1: chosen and rejected rewards move by -beta)
    assert out["other"] == whole
    for ours, theirs in zip(out["shifted"], whole):
        assert ours["rewards/chosen"] == pytest.approx(theirs["rewards/chosen"] - 0.2, abs=1e-5)
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)


@pytest.mark.parametrize("preset", ["hh_rlhf", "pku_saferlhf", "ultrafeedback"])
def test_dpo_trains_on_the_public_preference_layouts(preset):
    """The reward model's data presets feed DPO unchanged (synthetic rows of each public
    layout): the first step is log 2 (policy == reference on every pair) and the pairs'
    chosen and rejected log-probs differ (two different responses were read)."""
    fixture = os.path.join(os.path.dirname(__file__), "..", "data", "fixtures", f"{preset}.jsonl")
    data = {"path": fixture, "preset": preset, "eval_fraction": 0.0}
    cfg = make_cfg(
        steps=2, global_batch_size=2, micro_batch_size_per_rank=1, eval_interval=0, data=data
    )
    (history,) = run_world(_runs, 1, [cfg])[0]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(h["logps/chosen"] != h["logps/rejected"] for h in history)


# ----------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "dpo,message",
    [
        ({"loss": "dpo"}, "dpo.loss='dpo'"),
        ({"beta": 0.0}, "dpo.beta=0.0 must be > 0"),
        ({"loss": "ipo", "label_smoothing": 0.1}, "dpo.label_smoothing applies"),
        ({"label_smoothing": 0.5}, "dpo.label_smoothing=0.5"),
        ({"loss": "simpo", "precompute_reference": True}, "reference-free"),
        ({"loss": "kto", "undesirable_weight": -1.0}, "dpo.undesirable_weight=-1.0"),
    ],
)
def test_impossible_dpo_settings_are_named(dpo, message):
    from hpc_rlhf.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        make_cfg(dpo=dpo).validate()


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "a", "completion": "b"}, "expected a true/false field 'label'"),
        ({"prompt": "a", "completion": "b", "label": "yes"}, "'label'"),
        ({"prompt": "a", "responses": ["b", "c"], "ranking": [0, 1]}, "not rankings"),
        ({"prompt": "a", "chosen": "b"}, "'rejected'"),
    ],
)
def test_bad_kto_rows_are_named_with_their_line(tmp_path, row, message):
    import json

    from hpc_rlhf.config import InputError
    from hpc_rlhf.data.tokenizer import load_tokenizer
    from hpc_rlhf.trainer.kto import completion_data

    path = tmp_path / "kto.jsonl"
    good = {"prompt": "x", "completion": "y", "label": True}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    cfg = make_cfg(dpo={"loss": "kto"}, data={"path": str(path), "eval_fraction": 0.0})
    with pytest.raises(InputError, match=f"kto.jsonl:2: .*{message}"):
        completion_data(cfg, load_tokenizer())


def test_a_response_cut_away_by_seq_length_is_named(tmp_path):
    import json

    from hpc_rlhf.config import InputError
    from hpc_rlhf.data.tokenizer import load_tokenizer
    from hpc_rlhf.trainer.dpo import preference_data

    path = tmp_path / "pairs.jsonl"
    row = {"prompt": "word " * 80, "chosen": "yes", "rejected": "no"}
    path.write_text(json.dumps(row) + "\n")
    cfg = make_cfg(data={"path": str(path), "eval_fraction": 0.0})
    with pytest.raises(InputError, match="pairs.jsonl:1: no response token within"):
        preference_data(cfg, load_tokenizer())


def test_dpo_command_under_torchrun_reports_held_out_accuracy(tmp_path):
    import re

    from tests.dist import torchrun_cli

    result = torchrun_cli(
        "dpo",
        "examples/configs/dpo_tiny_cpu.yaml",
        "--out-dir",
        str(tmp_path / "out"),
        "train.steps=10",
        f"train.hf_export_dir={tmp_path / 'hf'}",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    accuracy = re.search(r"held-out implicit-reward accuracy ([0-9.]+)", result.stdout)
    assert accuracy is not None and float(accuracy.group(1)) > 0.7, result.stdout[-1000:]
    assert (tmp_path / "hf" / "config.json").exists()


# ----------------------------------------------------------------------------- online DPO

ID_RANGE = "hpc_rlhf.algorithms.rule_rewards:id_range_fraction"
ONLINE = {
    "sampling": {"max_prompt_length": 24, "samples_per_prompt": 4},
    "generation": {
        "max_new_tokens": 12,
        "stop_at_eos": False,
        "engine": {"cache_budget_bytes": 8 << 20},
    },
    # the judge: the fraction of response ids below 256 (a random policy scores 0.5)
    "reward": {"rules": [{"function": ID_RANGE, "kwargs": {"low": 0, "high": 256}}]},
}


def online_cfg(parallel: dict | None = None, reward: dict | None = None, **train):
    online = {**ONLINE, "reward": reward or ONLINE["reward"]}
    online["optimizer"] = {"lr": 1e-2, "lr_decay_style": "constant"}
    dpo = {"online": True, "beta": 0.1}
    return make_cfg(parallel, dpo=dpo, online=online, **{"steps": 16, **train})


@pytest.mark.parametrize("world", [1, 4], ids=["1proc", "tp2_dp2"])
def test_online_dpo_raises_the_judges_reward(world):
    parallel = {"tensor_model_parallel_size": 2} if world == 4 else None
    history = run_world(_runs, world, [online_cfg(parallel)])[0][0]
    first = sum(h["reward_mean"] for h in history[:2]) / 2
    last = sum(h["reward_mean"] for h in history[-3:]) / 3
    assert 0.4 < first < 0.6, history[0]
    assert last > first + 0.2, [h["reward_mean"] for h in history]
    for h in history:  # the pair is each prompt's best and worst sample
        assert h["reward_chosen"] >= h["reward_mean"] >= h["reward_rejected"], h


def test_online_dpo_raises_a_reward_models_score(tmp_path):
    """The judge is a (random) reward model: the policy learns what it scores highly."""
    from tests.trainer.test_ppo import write_random_reward_model

    rm_dir, _ = write_random_reward_model(str(tmp_path / "rm"), seed=5)
    cfg = online_cfg(reward={"models": [{"path": rm_dir}]}, steps=24)
    rewards = [h["reward_mean"] for h in run_world(_runs, 1, [cfg])[0][0]]
    # per-step means scatter by ~0.5 around the trend; observed rise ~1.8
    assert sum(rewards[-6:]) / 6 > sum(rewards[:6]) / 6 + 1.0, rewards


def _online_pairs_of_step(rank, world, cfg):
    """The sampler's step-0 samples and scores, and the step source's pairs."""
    from hpc_rlhf.trainer.dpo import online_pairs
    from hpc_rlhf.trainer.run import Run, RunSettings
    from hpc_rlhf.trainer.sft import initial_state
    from hpc_rlhf.trainer.supervised import build_trained_model

    run = Run(cfg, RunSettings.of(cfg.train, "train"))
    policy = build_trained_model(cfg, run, initial_state(cfg))
    source = online_pairs(cfg, run, policy)
    mbs = source.step_microbatches(0, 4, 2, 0, 1)
    prompts = [source.prompts.token_ids[i] for i in source.prompts.step_indices(0, 8, 0, 1)]
    rollout, score_B = source.sampler.sample(prompts, 4, cfg.train.seed * 1_000_003)
    sequences = [p + r for p, r in zip(rollout.prompt_ids, rollout.response_ids)]
    pairs = []
    for mb in mbs:
        for b in range(mb.shape[0]):
            n = int(mb.attention_mask_BS[b].sum())
            pairs.append(mb.input_ids_BS[b, :n].tolist() + [int(mb.labels_BS[b, n - 1])])
    return sequences, rollout.prompt_index, score_B.tolist(), pairs, source.step_metrics()


def test_online_pairs_are_each_prompts_best_and_worst_by_the_reward_model(tmp_path):
    from tests.trainer.test_ppo import hf_end_scores, write_random_reward_model

    rm_dir, rm_state = write_random_reward_model(str(tmp_path / "rm"), seed=5)
    cfg = online_cfg(reward={"models": [{"path": rm_dir}]})
    sequences, prompt_index, scores, pairs, metrics = run_world(_online_pairs_of_step, 1, cfg)[0]
    # the judge's scores are transformers' end scores of the sampled sequences
    expected = hf_end_scores(rm_state, sequences)
    assert scores == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # the source sampled the same (seeded) responses and kept each prompt's extremes
    for p in range(8):
        rows = [b for b, i in enumerate(prompt_index) if i == p]
        best = max(rows, key=lambda b: expected[b])
        worst = min(rows, key=lambda b: expected[b])
        assert pairs[2 * p] == sequences[best] and pairs[2 * p + 1] == sequences[worst], p
    assert metrics["reward_mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_online_dpo_resumes_exactly(tmp_path):
    common = {"steps": 4, "save_interval": 2}
    whole = online_cfg(save_dir=str(tmp_path / "a"), **common)
    half = online_cfg(save_dir=str(tmp_path / "b"), **{**common, "steps": 2})
    resumed = online_cfg(save_dir=str(tmp_path / "b"), **common)
    a, b, c = run_world(_runs, 1, [whole, half, resumed])[0]
    assert [h["step"] for h in c] == [3, 4]
    assert b + c == a
