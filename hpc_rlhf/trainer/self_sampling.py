"""Trainers that learn from their own samples (online DPO, rejection sampling): PPO's
generate, score and handoff stages around a trained policy.

``PolicySampler`` holds the colocated engine over the policy's weights and the reward
sources (reward models and rules, ``ScoreSources``); ``sample(prompt_ids, n, seed)`` hands
the policy's current weights to the engine, samples ``n`` responses per prompt with the
policy's training state released (as PPO's generate stage), and scores every response as
PPO's score stage does (``score_rollout``).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from hpc_rlhf.config import ModelConfig, RewardConfig, RolloutConfig
from hpc_rlhf.parallel.state import ParallelState
from hpc_rlhf.trainer.experience import Rollout, build_experience, generate_rollout
from hpc_rlhf.trainer.score_sources import ScoreSources
from hpc_rlhf.trainer.trainable_model import TrainableModel


def row_trim(state: ParallelState) -> int | None:
    """Micro-batches trimmed to their own longest row (a multiple of this), which needs
    PP=1: pipeline p2p shapes are fixed per schedule."""
    return state.sequence_multiple if state.pp_size == 1 else None


def scoring_microbatches(
    rollout: Rollout, pad_id: int, state: ParallelState, rows: int, by_prompt: bool = False
):
    """``rollout`` as an experience batch, its length order (``by_prompt``: a prompt's
    samples together, see ``ExperienceBatch.length_order``) and its forward-only
    micro-batches of ``rows`` rows (what ``infer_rows`` and ``score_rollout`` read)."""
    exp = build_experience(rollout, pad_id, state.sequence_multiple)
    order = exp.length_order(by_prompt)
    return exp, order, exp.microbatches(rows, order, row_trim(state))


def infer_rows(model: TrainableModel, fn, key: str, exp, mbs: list, order: torch.Tensor):
    """``fn``'s ``key`` output of ``model`` over an experience batch's micro-batches (built
    in ``order``), back in the batch's row order: ``[B]`` for one value per row, else
    ``[B, S]`` masked to the action positions."""
    parts = [out[key] for out in model.infer(mbs, fn)]
    if parts[0].dim() == 1:
        return torch.cat(parts)[torch.argsort(order)]
    return exp.gather_rows(parts, order) * exp.action_mask_BS


def score_rollout(
    sources: ScoreSources,
    rollout: Rollout,
    exp,
    mbs: list,
    order: torch.Tensor,
    tokenizer,
    dp_group,
    unsafe_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B]``: each sample's combined score of ``sources`` (models' end scores on the
    micro-batches, then the rules, checked finite and combined)."""
    scores = [
        infer_rows(m, fn, "score", exp, mbs, order)
        for m, fn in zip(sources.models, sources.score_fns)
    ]
    return sources.combined(rollout, scores, tokenizer, dp_group, unsafe_B)


def sampling_seed(seed: int, step: int, dp_rank: int) -> int:
    """The generation seed of a step (or round) on one data-parallel rank: a run and its
    resumed continuation sample alike, and ranks differ."""
    return seed * 1_000_003 + step * 1009 + dp_rank


class PolicySampler:
    """Generate and score with the policy being trained (see the module docstring)."""

    def __init__(
        self,
        policy: TrainableModel,
        model_cfg: ModelConfig,
        generation: RolloutConfig,
        reward: RewardConfig,
        parallel,
        state: ParallelState,
        tokenizer,
        pack: bool,
        score_micro_batch: int,
        share_prefixes: bool = True,
    ):
        from hpc_rlhf.inference.engine import GenerationEngine
        from hpc_rlhf.trainer.ppo_setup import load_score_sources

        self.policy, self.generation, self.state, self.tokenizer = (
            policy,
            generation,
            state,
            tokenizer,
        )
        self.rewards, _ = load_score_sources(
            reward, "reward", model_cfg, parallel, state, pack, share_prefixes
        )
        self.engine = GenerationEngine(policy, model_cfg, state, generation.engine)
        self.score_micro_batch = score_micro_batch
        self.by_prompt = pack and share_prefixes  # a prompt's samples share a micro-batch
        self.version = 0

    @classmethod
    def for_run(cls, cfg, run, policy: TrainableModel, samples_per_prompt: int) -> PolicySampler:
        """The sampler of a supervised-loop run ``cfg`` (its ``model``, ``generation``,
        ``reward``, ``parallel`` and ``train`` sections) over ``policy``; rewards are scored
        in micro-batches of a training micro-batch's prompts' samples."""
        t = cfg.train
        return cls(
            policy,
            cfg.model,
            cfg.generation,
            cfg.reward,
            cfg.parallel,
            run.state,
            run.tokenizer,
            t.pack_sequences,
            t.micro_batch_size_per_rank * samples_per_prompt,
            t.share_prefixes,
        )

    def sample(
        self, prompt_ids: list[list[int]], n: int, seed: int
    ) -> tuple[Rollout, torch.Tensor]:
        """``n`` responses per prompt from the policy's current weights (in (prompt,
        sample) order) and their combined rewards ``[B]``."""
        from hpc_rlhf.inference.memory import training_memory_released

        self.version += 1
        self.engine.sync_weights(self.version)  # the handoff: the policy's weights, as now
        release = self.generation.offload_training_state
        with training_memory_released(self.policy) if release else nullcontext():
            rollout = generate_rollout(
                self.engine, self.tokenizer, prompt_ids, self.generation, n, seed, self.version
            )
        self.engine.release_weights()
        exp, order, mbs = scoring_microbatches(
            rollout, self.tokenizer.pad_id, self.state, self.score_micro_batch, self.by_prompt
        )
        score_B = score_rollout(
            self.rewards, rollout, exp, mbs, order, self.tokenizer, self.state.dp_group
        )
        return rollout, score_B
