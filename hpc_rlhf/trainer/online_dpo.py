"""Online (iterative) DPO (``hpc-rlhf dpo`` with ``dpo.online: true``): each step's pairs
come from the policy being trained.

``OnlinePairs`` is the supervised loop's data source: for step ``s`` it takes the step's
prompts (``PromptDataset.step_indices``: ``train.global_batch_size`` prompts over all
data-parallel ranks, one pair each), hands the policy's current weights to the engine,
samples ``sampling.samples_per_prompt`` responses per prompt (seeded by step and rank),
scores them with the ``reward`` section (``self_sampling.PolicySampler``: PPO's generate,
score and handoff stages) and makes each prompt's best-scored response the chosen one and
its worst the rejected one (the first of equal scores; a prompt whose responses all score
alike gives a pair of zero preference signal, kept so every step has the same size). The
pairs are then policy micro-batches as offline DPO's (``collate_policy_preferences``),
scored by the reference per step. The step's sampled rewards are metrics: ``reward_mean``
(every sample), ``reward_chosen`` and ``reward_rejected``.
"""

from __future__ import annotations

import torch

from hpc_rlhf.data.preference import PreferenceSample, collate_policy_preferences
from hpc_rlhf.parallel.comm import group_sum
from hpc_rlhf.trainer.self_sampling import PolicySampler, sampling_seed


class OnlinePairs:
    """The step source of online DPO (see the module docstring)."""

    def __init__(self, sampler: PolicySampler, prompts, samples_per_prompt: int, seed: int):
        self.sampler = sampler
        self.prompts = prompts
        self.n = samples_per_prompt
        self.seed = seed
        self.metrics: dict[str, float] = {}

    def step_microbatches(
        self, step: int, n_micro: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list:
        """This rank's pairs of step ``step``, sampled now, as ``n_micro`` micro-batches."""
        per_step = n_micro * micro_batch_size * dp_size
        indices = self.prompts.step_indices(step, per_step, dp_rank, dp_size)
        prompt_ids = [self.prompts.token_ids[i] for i in indices]
        seed = sampling_seed(self.seed, step, dp_rank)
        rollout, score_B = self.sampler.sample(prompt_ids, self.n, seed)
        samples, chosen, rejected = [], [], []
        for p, (prompt, rows) in enumerate(
            zip(prompt_ids, rollout.rows_by_prompt(len(prompt_ids)))
        ):
            scores = score_B[rows]
            best, worst = rows[int(scores.argmax())], rows[int(scores.argmin())]
            sequences = [prompt + rollout.response_ids[b] for b in (best, worst)]
            samples.append(
                PreferenceSample(
                    sequences,
                    [(0, 1, 0.0)],
                    f"step {step} prompt {indices[p]}",
                    response_starts=[len(prompt)] * 2,
                )
            )
            chosen.append(float(score_B[best]))
            rejected.append(float(score_B[worst]))
        self._record(score_B, chosen, rejected)
        pad = self.sampler.tokenizer.pad_id
        return [
            collate_policy_preferences(
                samples[m * micro_batch_size : (m + 1) * micro_batch_size], pad
            )
            for m in range(n_micro)
        ]

    def _record(self, score_B: torch.Tensor, chosen: list[float], rejected: list[float]) -> None:
        """The step's reward metrics, summed over every data-parallel rank."""
        sums = torch.tensor(
            [float(score_B.sum()), len(score_B), sum(chosen), sum(rejected), len(chosen)],
            dtype=torch.float64,
        )
        group_sum(sums, self.sampler.state.dp_group)
        self.metrics = {
            "reward_mean": float(sums[0] / sums[1]),
            "reward_chosen": float(sums[2] / sums[4]),
            "reward_rejected": float(sums[3] / sums[4]),
        }

    def step_metrics(self) -> dict[str, float]:
        """The metrics of the last sampled step."""
        return dict(self.metrics)
