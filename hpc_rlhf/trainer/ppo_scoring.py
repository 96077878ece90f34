"""PPO's stage 3: the rollout scored into an experience batch.

``ExperienceScorer.score`` runs, over length-ordered forward-only micro-batches: the
reference's token log-probs, the actor's when asked (``ppo.recompute_old_logprobs``, or
truncated importance sampling against the engine's, ``ppo.tis_cap``), the critic's values,
the reward sources' combined end scores (models and rules; DAPO's overlong penalty and
filter applied to them) and, for PPO-Lagrangian, the cost critic's values and the cost
sources' scores. ``reward_scores`` is the reward sources alone (dynamic sampling keeps or
drops groups on them before the rest is scored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hpc_rlhf.algorithms.policy_losses import truncated_is_weights
from hpc_rlhf.algorithms.rewards import overlong_penalty
from hpc_rlhf.config import PPORunConfig
from hpc_rlhf.parallel.comm import group_max, group_sum
from hpc_rlhf.parallel.state import ParallelState
from hpc_rlhf.trainer.experience import ExperienceBatch, Rollout
from hpc_rlhf.trainer.losses import logprobs_fn, values_fn
from hpc_rlhf.trainer.ppo_setup import PPOModels
from hpc_rlhf.trainer.self_sampling import infer_rows, score_rollout, scoring_microbatches


@dataclass
class ExperienceScorer:
    """The forward-only passes and score sources of PPO's stage 3, over ``models``."""

    cfg: PPORunConfig
    state: ParallelState
    tokenizer: Any
    models: PPOModels = field(repr=False)

    def _scoring_batch(self, rollout: Rollout) -> tuple[ExperienceBatch, torch.Tensor, list]:
        p = self.cfg.ppo
        return scoring_microbatches(
            rollout, self.tokenizer.pad_id, self.state, p.score_micro_batch, p.groups_prompts
        )

    def reward_scores(self, rollout: Rollout) -> torch.Tensor:
        """``[B]``: the reward sources' combined scores of ``rollout`` alone."""
        exp, order, mbs = self._scoring_batch(rollout)
        return score_rollout(self.models.rewards, *self._score_args(rollout, exp, mbs, order))

    def _score_args(self, rollout: Rollout, exp: ExperienceBatch, mbs: list, order) -> tuple:
        """``score_rollout``'s arguments after the sources."""
        unsafe_B = None
        if rollout.unsafe_prompt is not None:
            unsafe_B = torch.tensor(rollout.unsafe_prompt, dtype=torch.bool)
        return (rollout, exp, mbs, order, self.tokenizer, self.state.dp_group, unsafe_B)

    def score(self, rollout: Rollout, reward_B: torch.Tensor | None = None) -> ExperienceBatch:
        """Reward scores (unless given as ``reward_B``), reference log-probs, critic values
        (and old log-probs if asked)."""
        exp, order, mbs = self._scoring_batch(rollout)
        logp_fn = logprobs_fn(self.state.tp_group, self.cfg.generation.temperature)

        def run(model, fn, key: str) -> torch.Tensor:
            return infer_rows(model, fn, key, exp, mbs, order)

        exp.ref_logp_BS = run(self.models.reference, logp_fn, "logp")
        tis_cap = self.cfg.ppo.tis_cap
        if self.cfg.ppo.recompute_old_logprobs or tis_cap is not None:
            engine_logp_BS = exp.old_logp_BS
            exp.old_logp_BS = run(self.models.actor, logp_fn, "logp")
            if tis_cap is not None:
                exp.tis_weights_BS, stats = truncated_is_weights(
                    exp.old_logp_BS, engine_logp_BS, exp.action_mask_BS, tis_cap
                )
                exp.mismatch = self._mismatch_metrics(stats)
        if self.models.critic is not None:
            exp.values_BS = run(self.models.critic, values_fn, "values")
        args = self._score_args(rollout, exp, mbs, order)
        if reward_B is None:
            reward_B = score_rollout(self.models.rewards, *args)
        exp.score_B = self._overlong(rollout, exp, reward_B)
        if self.models.costs is not None:
            assert self.models.cost_critic is not None
            exp.cost_values_BS = run(self.models.cost_critic, values_fn, "values")
            exp.cost_B = score_rollout(self.models.costs, *args)
        return exp

    def _overlong(self, rollout: Rollout, exp: ExperienceBatch, score_B: torch.Tensor):
        """DAPO's overlong handling: the soft length penalty added to the scores
        (``ppo.overlong_buffer``); with ``ppo.overlong_filter`` the responses cut at
        ``generation.max_new_tokens`` are marked (``exp.truncated_B``) to leave the loss
        once the advantages are computed (their scores still count in their group's)."""
        p = self.cfg.ppo
        if p.overlong_buffer is not None:
            lengths_B = torch.tensor([len(r) for r in rollout.response_ids])
            max_new = self.cfg.generation.max_new_tokens
            score_B = score_B + overlong_penalty(
                lengths_B, max_new, p.overlong_buffer, p.overlong_penalty
            ).to(score_B.dtype)
        if p.overlong_filter:
            exp.truncated_B = torch.tensor([r == "length" for r in rollout.finish_reasons])
        return score_B

    def _mismatch_metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """Train/inference mismatch over every DP rank's tokens: KL(engine || trainer) (k1
        and k3 estimates), the largest ratio and the fraction of truncated TIS weights."""
        sums = torch.stack(
            [stats["kl_k1_sum"], stats["kl_k3_sum"], stats["clipped_sum"], stats["tokens"]]
        )
        group_sum(sums, self.state.dp_group)
        top = group_max(stats["ratio_max"].clone(), self.state.dp_group)
        tokens = max(float(sums[3]), 1.0)
        return {
            "mismatch_kl_k1": float(sums[0]) / tokens,
            "mismatch_kl_k3": float(sums[1]) / tokens,
            "mismatch_ratio_max": float(top),
            "tis_clipped_fraction": float(sums[2]) / tokens,
        }
