"""Rejection-sampling fine-tuning (``hpc-rlhf rejection-sampling``): Llama-2's and ReST's
loop on the supervised step loop.

``train.steps`` are split into ``rs.rounds`` rounds. At a round's first step the step
source (``KeptSamples``) hands the policy's current weights to the engine, samples
``rs.samples_per_prompt`` responses for each of the round's ``rs.prompts_per_round``
prompts (``self_sampling.PolicySampler``: PPO's generate, score and handoff stages; each
data-parallel rank its share), keeps per prompt the best one, the ``top_k`` or every one
scoring at least ``threshold``, and writes the round's kept set (every rank's, in rank
order) to ``<train.save_dir or out_dir>/kept/round_NNN.jsonl``: prompt, response (text and
token ids) and score, then a line with the round's metrics. The round's steps fine-tune on
the kept set with the SFT loss on response tokens (``data.sft.collate``), in a seeded
order. A run resumed within a round reads the round's file back instead of sampling again,
so it continues as the uninterrupted run; a round's first step always samples.

Metrics per step: ``reward_mean`` (every sample of the round: the policy at the round's
start), ``kept_reward_mean``, ``kept`` (samples kept) and the SFT ``loss``.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from hpc_rlhf.config import InputError, RejectionSamplingRunConfig
from hpc_rlhf.data.prompts import prompts_from_config
from hpc_rlhf.data.sft import Sample, collate
from hpc_rlhf.parallel.comm import all_gather_objects
from hpc_rlhf.trainer.checkpoint_files import atomic_write_text
from hpc_rlhf.trainer.run import Run, RunSettings
from hpc_rlhf.trainer.self_sampling import PolicySampler, sampling_seed
from hpc_rlhf.trainer.sft import initial_state
from hpc_rlhf.trainer.supervised import build_trained_model, train_supervised

logger = logging.getLogger(__name__)

PROGRESS_KEYS = ("loss", "reward_mean", "kept_reward_mean", "kept", "lr")


def keep(scores: list[float], rule: str, top_k: int, threshold: float) -> list[int]:
    """Which of one prompt's samples (by index) ``rule`` keeps: ``best`` the highest
    scored (the first of equal ones), ``top_k`` the ``top_k`` highest, ``threshold`` every
    one scoring at least ``threshold``."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if rule == "best":
        return ranked[:1]
    if rule == "top_k":
        return sorted(ranked[:top_k])
    return [i for i, s in enumerate(scores) if s >= threshold]


class KeptSamples:
    """The step source of rejection sampling (see the module docstring)."""

    def __init__(self, cfg: RejectionSamplingRunConfig, sampler: PolicySampler, prompts, kept_dir):
        self.cfg, self.sampler, self.prompts, self.kept_dir = cfg, sampler, prompts, kept_dir
        self.steps_per_round = cfg.train.steps // cfg.rs.rounds
        self.round = -1
        self.kept: list[dict] = []
        self.metrics: dict[str, float] = {}

    def step_microbatches(
        self, step: int, n_micro: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list:
        """This rank's SFT micro-batches of step ``step`` from its round's kept set."""
        r = step // self.steps_per_round
        if r != self.round:  # a round's start, or a run resumed within round r
            self._start_round(r, dp_rank, dp_size, resumed=step % self.steps_per_round != 0)
        per_step = n_micro * micro_batch_size * dp_size
        within = (step % self.steps_per_round) * per_step
        gen = torch.Generator().manual_seed(self.cfg.train.seed + 7919 * (r + 1))
        order = torch.randperm(len(self.kept), generator=gen).tolist()
        pad = self.sampler.tokenizer.pad_id
        out = []
        for m in range(n_micro):
            first = within + (m * dp_size + dp_rank) * micro_batch_size
            rows = [self.kept[order[(first + i) % len(order)]] for i in range(micro_batch_size)]
            samples = [
                Sample(
                    row["prompt_ids"] + row["response_ids"],
                    [False] * len(row["prompt_ids"]) + [True] * len(row["response_ids"]),
                    f"round {r}",
                )
                for row in rows
            ]
            out.append(collate(samples, pad))
        return out

    def _path(self, r: int) -> str:
        return os.path.join(self.kept_dir, f"round_{r:03d}.jsonl")

    def _start_round(self, r: int, dp_rank: int, dp_size: int, resumed: bool) -> None:
        """Sample round ``r``'s kept set and write it; a run ``resumed`` within the round
        reads the set the interrupted run wrote (a fresh round never reads old files)."""
        self.round = r
        path = self._path(r)
        found = all_gather_objects(os.path.exists(path), self.sampler.state.dp_group)
        if resumed and not all(found):
            logger.warning(
                "resumed within round %d but %s is missing: sampling the round again with the "
                "resumed weights (the run departs from the interrupted one)",
                r,
                path,
            )
        if resumed and all(found):
            with open(path) as fh:
                rows = [json.loads(line) for line in fh]
            self.kept = [row for row in rows if "response_ids" in row]
            self.metrics = rows[-1]["round_metrics"]
            logger.info("round %d: %d kept samples read from %s", r, len(self.kept), path)
            return
        self.kept, self.metrics = self._sample_round(r, dp_rank, dp_size)
        if self.sampler.state.rank == 0:
            self._write(path, r)

    def _sample_round(self, r: int, dp_rank: int, dp_size: int):
        rs, tok = self.cfg.rs, self.sampler.tokenizer
        indices = self.prompts.step_indices(r, rs.prompts_per_round, dp_rank, dp_size)
        prompt_ids = [self.prompts.token_ids[i] for i in indices]
        seed = sampling_seed(self.cfg.train.seed, r, dp_rank)
        rollout, score_B = self.sampler.sample(prompt_ids, rs.samples_per_prompt, seed)
        mine = []
        for p, rows in enumerate(rollout.rows_by_prompt(len(prompt_ids))):
            scores = [float(score_B[b]) for b in rows]
            for k in keep(scores, rs.keep, rs.top_k, rs.threshold):
                b = rows[k]
                mine.append(
                    {
                        "prompt": tok.decode(prompt_ids[p]),
                        "response": tok.decode(rollout.response_ids[b]),
                        "score": scores[k],
                        "prompt_ids": prompt_ids[p],
                        "response_ids": rollout.response_ids[b],
                    }
                )
        everyone = all_gather_objects((mine, score_B.tolist()), self.sampler.state.dp_group)
        kept = [row for rows, _ in everyone for row in rows]
        sampled = [s for _, scores in everyone for s in scores]
        if not kept:
            raise InputError(
                f"rejection sampling round {r}: no sample scored rs.threshold="
                f"{rs.threshold} or more (sampled scores {min(sampled):.4f} .. {max(sampled):.4f})"
            )
        metrics = {
            "reward_mean": sum(sampled) / len(sampled),
            "kept_reward_mean": sum(row["score"] for row in kept) / len(kept),
            "kept": float(len(kept)),
        }
        return kept, metrics

    def _write(self, path: str, r: int) -> None:
        lines = [json.dumps(row) for row in self.kept]
        lines.append(json.dumps({"round": r, "round_metrics": self.metrics}))
        os.makedirs(self.kept_dir, exist_ok=True)
        atomic_write_text(path, "\n".join(lines) + "\n")

    def step_metrics(self) -> dict[str, float]:
        """The current round's sampling metrics."""
        return dict(self.metrics)


def run_rejection_sampling(
    cfg: RejectionSamplingRunConfig, out_dir: str | None = None
) -> list[dict[str, float]]:
    """Run ``cfg.rs.rounds`` rounds of sampling, selection and SFT (``cfg.train.steps``
    steps in all, from ``cfg.init``, resuming from ``train.save_dir``); return the per-step
    metrics on every rank."""
    t = cfg.train
    run = Run(cfg, RunSettings.of(t, "train"), out_dir, PROGRESS_KEYS, cfg.data.tokenizer)
    policy = build_trained_model(cfg, run, initial_state(cfg))
    prompts = prompts_from_config(
        cfg.data, run.tokenizer, cfg.model.vocab_size, t.seed, cfg.data.shuffle
    )
    sampler = PolicySampler.for_run(cfg, run, policy, cfg.rs.samples_per_prompt)
    kept_dir = os.path.join(t.save_dir or out_dir or "outputs/rejection_sampling", "kept")
    source = KeptSamples(cfg, sampler, prompts, kept_dir)
    return train_supervised(cfg, run, source, policy)
