"""Policy evaluation (``hpc-rlhf eval``): a policy (and optionally a baseline) generates on
a prompt set with the colocated engine; reward and cost models score the responses
(``eval.json``: the summary; ``samples.jsonl``: every response with its scores).

Reported per policy and scorer: mean and std of the scores, and for a cost model the
fraction judged unsafe (cost > 0, Safe-RLHF's sign convention); with a baseline, the win
rate of the policy under each scorer (Safe-RLHF's arena): the share of (prompt, sample)
pairs where the policy's response scores higher (a reward) or costs less (a cost), a tie
counting one half. Both policies sample with the same seeds on the same prompts.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from hpc_rlhf.config import EvalRunConfig, ScorerSpec
from hpc_rlhf.data.prompts import prompts_from_config
from hpc_rlhf.parallel.comm import all_gather_cat, gather_objects
from hpc_rlhf.trainer.experience import Rollout, build_experience, generate_rollout
from hpc_rlhf.trainer.losses import calibrated_end_score_fn
from hpc_rlhf.trainer.ppo_setup import load_score_model
from hpc_rlhf.trainer.run import Run, RunSettings
from hpc_rlhf.trainer.self_sampling import sampling_seed
from hpc_rlhf.trainer.trainable_model import TrainableModel

logger = logging.getLogger(__name__)


def scorer_name(spec: ScorerSpec) -> str:
    """The name a scorer's results are reported under."""
    return spec.name or os.path.basename(os.path.normpath(spec.path))


def _rollout(cfg: EvalRunConfig, run: Run, prompt_ids: list[list[int]], path: str) -> Rollout:
    """The responses of the policy at ``path`` (its model and engine freed afterwards)."""
    from hpc_rlhf.inference.engine import GenerationEngine
    from hpc_rlhf.models.hf_io import load_hf_checkpoint_for

    policy = TrainableModel(cfg.model, None, run.state, "actor")
    policy.load_hf_state(load_hf_checkpoint_for(cfg.model, path))
    engine = GenerationEngine(policy, cfg.model, run.state, cfg.generation.engine)
    engine.sync_weights(0)
    seed = sampling_seed(cfg.eval.seed, 0, run.state.dp_rank)
    n = cfg.eval.samples_per_prompt
    return generate_rollout(engine, run.tokenizer, prompt_ids, cfg.generation, n, seed, 0)


def _scores(cfg: EvalRunConfig, run: Run, scorer: TrainableModel, rollout: Rollout, fn):
    """Every rank's end scores of ``rollout`` under ``scorer`` (scoring function ``fn``),
    gathered over DP ``[N]``."""
    exp = build_experience(rollout, run.tokenizer.pad_id, run.state.sequence_multiple)
    micro = exp.microbatches(cfg.eval.micro_batch_size_per_rank)
    mine = torch.cat([out["score"] for out in scorer.infer(micro, fn)])
    return all_gather_cat(mine.double(), run.state.dp_group)


def summarize(kind: str, scores_N: torch.Tensor, baseline_N: torch.Tensor | None) -> dict:
    """Mean/std (and unsafe fraction for a cost, win rate against ``baseline_N``)."""
    out = {"mean": float(scores_N.mean()), "std": float(scores_N.std(unbiased=False))}
    if kind == "cost":
        out["unsafe_fraction"] = float((scores_N > 0).double().mean())
    if baseline_N is not None:
        better_N = scores_N > baseline_N if kind == "reward" else scores_N < baseline_N
        ties_N = scores_N == baseline_N
        out["win_rate"] = float((better_N.double() + 0.5 * ties_N.double()).mean())
    return out


def run_eval(cfg: EvalRunConfig, out_dir: str | None = None) -> dict:
    """Generate, score and summarise (see the module docstring); the results (on every
    rank) are also written to ``out_dir/eval.json`` by rank 0."""
    run = Run(cfg, RunSettings(steps=1, seed=cfg.eval.seed), out_dir, (), cfg.data.tokenizer)
    state = run.state
    prompts = prompts_from_config(
        cfg.data, run.tokenizer, cfg.model.vocab_size, cfg.eval.seed, False
    )
    prompt_ids = prompts.next_batch(cfg.eval.prompts, state.dp_rank, state.dp_size)
    assert cfg.policy is not None
    policies = {"policy": cfg.policy, **({"baseline": cfg.baseline} if cfg.baseline else {})}
    rollouts = {name: _rollout(cfg, run, prompt_ids, path) for name, path in policies.items()}
    results: dict = {name: {} for name in policies}
    all_scores: dict = {name: {} for name in policies}
    for spec in cfg.scorers:
        scorer, _, calibration = load_score_model(
            spec.path, cfg.model, cfg.parallel, state, pack=True
        )
        fn = calibrated_end_score_fn(calibration)
        scores = {name: _scores(cfg, run, scorer, r, fn) for name, r in rollouts.items()}
        for name in policies:
            other = scores.get("baseline") if name == "policy" else None
            results[name][scorer_name(spec)] = summarize(spec.kind, scores[name], other)
            all_scores[name][scorer_name(spec)] = scores[name].tolist()
    for name, rollout in rollouts.items():
        lengths_N = torch.tensor([len(r) for r in rollout.response_ids], dtype=torch.float64)
        results[name]["response_length"] = float(all_gather_cat(lengths_N, state.dp_group).mean())
    samples = {}
    if state.tp_rank == 0 and state.pp_rank == 0:  # one copy of each DP rank's rows
        for name, r in rollouts.items():
            samples[name] = gather_objects((r.prompt_ids, r.response_ids), 0, state.dp_group)
    run.close()
    if state.rank == 0 and out_dir:
        write_outputs(out_dir, results, samples, all_scores, run.tokenizer)
    return results


def write_outputs(out_dir: str, results: dict, samples: dict, scores: dict, tokenizer) -> None:
    """``eval.json`` (the summary) and ``samples.jsonl`` (every prompt and response with
    its scores, in data-parallel rank order, as the scores were gathered)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    with open(os.path.join(out_dir, "samples.jsonl"), "w") as fh:
        for name, per_rank in samples.items():
            prompts = [p for rank_prompts, _ in per_rank for p in rank_prompts]
            responses = [r for _, rank_responses in per_rank for r in rank_responses]
            for i, (prompt, response) in enumerate(zip(prompts, responses)):
                row = {
                    "policy": name,
                    "prompt": tokenizer.decode(prompt),
                    "response": tokenizer.decode(response),
                    "prompt_ids": prompt,
                    "response_ids": response,
                    "scores": {scorer: values[i] for scorer, values in scores[name].items()},
                }
                fh.write(json.dumps(row) + "\n")


def results_table(results: dict) -> str:
    """The results as a small text table (one row per policy and scorer)."""
    lines = ["policy   | scorer           |   mean   |   std    | unsafe | win rate"]
    lines.append("-" * len(lines[0]))
    for name, per_scorer in results.items():
        for scorer, m in per_scorer.items():
            if not isinstance(m, dict):
                continue
            unsafe = f"{m['unsafe_fraction']:6.3f}" if "unsafe_fraction" in m else "     -"
            win = f"{m['win_rate']:8.3f}" if "win_rate" in m else "       -"
            lines.append(
                f"{name:8s} | {scorer[:16]:16s} | {m['mean']:8.4f} | {m['std']:8.4f} | "
                f"{unsafe} | {win}"
            )
    return "\n".join(lines)
