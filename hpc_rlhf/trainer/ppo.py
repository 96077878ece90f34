"""PPO over an actor, a critic, a frozen reference and reward models (+ rule rewards);
with ``ppo.algorithm: ppo_lag``, Safe-RLHF's PPO-Lagrangian: cost models (+ rule costs), a
cost critic and a learned Lagrange multiplier beside them.

``PPOTrainer.step()`` is the six stages of one iteration, in order, each timed:

1. ``prompts``     this data-parallel rank's prompts;
2. ``generate``    the colocated engine samples responses with the actor's current weights
                   (optimizer state and gradients released meanwhile);
3. ``score``       reward models' end scores, rule rewards; reference log-probs and critic
                   values (fused vocab-parallel log-probs); the actor's log-probs come from
                   the engine (or are recomputed, ``ppo.recompute_old_logprobs``); costs
                   and cost values likewise;
   With ``ppo.dynamic_sampling`` (DAPO), stages 1-3's prompts, generation and reward
   scores repeat until the batch holds enough groups whose rewards differ
   (``dynamic_sampling``);
4. ``advantages``  KL-penalised token rewards, GAE (or GRPO / RLOO), whitening across DP;
                   the multiplier's update and ``(A_r - lambda A_c) / (1 + lambda)``;
5. ``train``       critic (and cost critic) then actor updates over epochs x mini-batches
                   x micro-batches;
6. ``handoff``     the updated weights go to the engine, stamped with a new policy version.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

import torch

from hpc_rlhf.algorithms.advantages import compute_advantages, masked_mean_var, whiten
from hpc_rlhf.algorithms.kl import make_kl_controller
from hpc_rlhf.algorithms.lagrange import LagrangeMultiplier, combined_advantage
from hpc_rlhf.algorithms.rewards import (
    RunningMoments,
    lagrangian_token_signals,
    token_rewards,
)
from hpc_rlhf.config import PPORunConfig
from hpc_rlhf.models.runner import MicroBatch
from hpc_rlhf.parallel.comm import all_gather_cat, group_sum
from hpc_rlhf.parallel.host_allocator import release_free_memory
from hpc_rlhf.parallel.state import ParallelState
from hpc_rlhf.trainer.dynamic_sampling import (
    SampledGroups,
    fill_batch,
    group_rows,
    varied_groups,
)
from hpc_rlhf.trainer.experience import (
    ExperienceBatch,
    Rollout,
    generate_rollout,
)
from hpc_rlhf.trainer.losses import (
    GlobalCounts,
    actor_loss_fn,
    critic_loss_fn,
)
from hpc_rlhf.trainer.ppo_scoring import ExperienceScorer
from hpc_rlhf.trainer.score_sources import NonFiniteRewardError, load_rules_first
from hpc_rlhf.trainer.self_sampling import row_trim, sampling_seed
from hpc_rlhf.trainer.trainable_model import TrainableModel, is_max_metric

logger = logging.getLogger(__name__)

__all__ = ["Iteration", "NonFiniteRewardError", "PPOTrainer", "StageTimer"]


class StageTimer:
    """Wall-clock seconds per named stage of one step; ``after_each`` runs at the end of
    every stage, inside its time."""

    def __init__(self, after_each: Callable[[], object] | None = None):
        self.seconds: dict[str, float] = {}
        self.after_each = after_each

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.after_each is not None:
                self.after_each()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Iteration:
    """What one PPO iteration produced: its rollout, the scored experience, the metrics
    and each stage's seconds."""

    rollout: Rollout
    experience: ExperienceBatch
    metrics: dict[str, float]
    stage_seconds: dict[str, float]


class PPOTrainer:
    """Holds the models, the engine, the data and the RL state of a PPO run."""

    def __init__(self, cfg: PPORunConfig, state: ParallelState, tokenizer, prompts, ptx=None):
        from hpc_rlhf.trainer.ppo_setup import build_models

        self.cfg = cfg
        self.state = state
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.ptx = ptx
        load_rules_first(cfg)
        models = build_models(cfg, state, tokenizer)
        self.actor, self.reference, self.critic = models.actor, models.reference, models.critic
        self.rewards, self.engine = models.rewards, models.engine
        self.costs, self.cost_critic = models.costs, models.cost_critic
        self.scorer = ExperienceScorer(cfg, state, tokenizer, models)
        self.multiplier = None
        if cfg.ppo.constrained:
            lag = cfg.lagrangian
            self.multiplier = LagrangeMultiplier(
                lag.lambda_init,
                lag.lambda_lr,
                lag.threshold,
                lag.episode_cost_window_size,
                lag.lambda_max,
                lag.lambda_update_delay_steps,
            )
        self.kl_ctl = make_kl_controller(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        self.reward_moments = RunningMoments()
        self.step_count = 0
        self.policy_version = 0
        self.engine.sync_weights(self.policy_version)
        for model in self.trainable_models().values():  # one model's gradients at a time
            model.release_grads_between_steps()

    # ------------------------------------------------------------------ the iteration
    def step(self) -> dict[str, float]:
        """One PPO iteration on the dataset's next prompts; its metrics (the same on
        every rank)."""
        return self.iterate().metrics

    def iterate(
        self,
        prompt_ids: list[list[int]] | None = None,
        max_new_tokens: list[int] | None = None,
        rollout: Rollout | None = None,
    ) -> Iteration:
        """The six stages, each timed: on this rank's ``prompt_ids`` instead of the
        dataset's when given, each prompt's responses limited to ``max_new_tokens`` (the
        benchmark replays fixed response lengths this way); with ``rollout``, this rank's
        samples are given and nothing is generated (layout-parity tests replay one)."""
        # the stages' tensors differ in size: freed host pages go back between them
        timer = StageTimer(after_each=release_free_memory)
        reward_B: torch.Tensor | None = None
        sampling_metrics: dict[str, float] = {}
        if prompt_ids is None and rollout is None and self.cfg.ppo.dynamic_sampling:
            rollout, reward_B, sampling_metrics = self._dynamic_batch(timer)
        if rollout is None:
            with timer("prompts"):
                indices = None
                if prompt_ids is None:
                    indices = self._next_prompts()
                    prompt_ids = [self.prompts.token_ids[i] for i in indices]
            with timer("generate"):
                rollout = self.generate(prompt_ids, max_new_tokens)
                if indices is not None:
                    self._tag_samples(rollout, indices)
        with timer("score"):
            exp = self.score(rollout, reward_B)
        with timer("advantages"):
            exp, adv_metrics = self.compute_advantages(exp)
            adv_metrics.update(sampling_metrics)
        with timer("train"):
            train_metrics = self.update(exp)
        with timer("handoff"):
            self.policy_version += 1
            self.engine.sync_weights(self.policy_version)
        self.step_count += 1
        metrics = self._step_metrics(rollout, exp, adv_metrics, train_metrics, timer)
        return Iteration(rollout, exp, metrics, dict(timer.seconds))

    # ------------------------------------------------------------------ stages 1-2
    def _next_prompts(self) -> list[int]:
        """Indices of this rank's share of the next global batch of prompts."""
        p, state = self.cfg.ppo, self.state
        return self.prompts.next_indices(p.rollout_batch_size, state.dp_rank, state.dp_size)

    def _dynamic_batch(self, timer: StageTimer) -> tuple[Rollout, torch.Tensor, dict]:
        """DAPO's dynamic sampling (``ppo.dynamic_sampling``): rounds of prompts,
        generation and reward scores until this rank holds its share of groups whose rewards
        differ; each part timed under its stage."""
        p = self.cfg.ppo

        def sample_round(round_index: int) -> SampledGroups:
            with timer("prompts"):
                indices = self._next_prompts()
            with timer("generate"):
                prompts = [self.prompts.token_ids[i] for i in indices]
                rollout = self.generate(prompts, round_index=round_index)
                self._tag_samples(rollout, indices)
            with timer("score"):
                score_B = self.scorer.reward_scores(rollout)
            groups = group_rows(rollout)
            return SampledGroups(rollout, score_B, groups, varied_groups(score_B, groups))

        per_rank = p.rollout_batch_size // self.state.dp_size
        return fill_batch(
            sample_round, per_rank, p.dynamic_sampling_max_rounds, self.state.dp_group
        )

    def generate(
        self,
        prompt_ids: list[list[int]],
        max_new_tokens: list[int] | None = None,
        round_index: int = 0,
    ) -> Rollout:
        """Sample ``n`` responses per prompt with the engine (seeded per step, DP rank and
        dynamic-sampling round).

        ``max_new_tokens`` optionally limits each prompt's responses (benchmarks replay
        fixed response lengths this way)."""
        seed = sampling_seed(
            self.cfg.ppo.seed + 7919 * round_index, self.step_count, self.state.dp_rank
        )
        with self._training_memory_released():
            return generate_rollout(
                self.engine,
                self.tokenizer,
                prompt_ids,
                self.cfg.generation,
                self.cfg.ppo.n_samples_per_prompt,
                seed,
                self.policy_version,
                max_new_tokens,
            )

    def _tag_samples(self, rollout: Rollout, indices: list[int]) -> None:
        """Each sample's prompt tags: safety (``data.safety_field``) and the reference
        fields the rule rewards read (``data.reference_fields``)."""
        rows = [indices[i] for i in rollout.prompt_index]
        rollout.unsafe_prompt = [self.prompts.unsafe(i) for i in rows]
        rollout.references = [self.prompts.references[i] for i in rows]

    @contextmanager
    def _training_memory_released(self):
        """Optimizer state and gradient buffers off the accelerator while generating."""
        if not self.cfg.generation.offload_training_state:
            yield
            return
        from hpc_rlhf.inference.memory import training_memory_released

        with ExitStack() as stack:
            for model in (self.actor, self.critic, self.cost_critic):
                if model is not None:
                    stack.enter_context(training_memory_released(model))
            yield

    # ------------------------------------------------------------------ stage 3
    def score(self, rollout: Rollout, reward_B: torch.Tensor | None = None) -> ExperienceBatch:
        """Stage 3 (``ppo_scoring.ExperienceScorer.score``)."""
        return self.scorer.score(rollout, reward_B)

    # ------------------------------------------------------------------ stage 4
    def compute_advantages(self, exp: ExperienceBatch) -> tuple[ExperienceBatch, dict]:
        """Token rewards (KL penalty + score), advantages and returns; whitened across DP.
        PPO-Lagrangian: the KL penalty shared with the cost signal, cost advantages and
        returns beside them, the multiplier updated and the advantages combined."""
        p = self.cfg.ppo
        if exp.score_B is None or exp.ref_logp_BS is None:
            raise ValueError("compute_advantages needs a scored batch: run score() first")
        score_B = exp.score_B
        if self.cfg.reward.normalize:
            self.reward_moments.update(all_gather_cat(score_B, self.state.dp_group))
            score_B = self.reward_moments.normalize(score_B)
        mask_BS = exp.action_mask_BS
        kl_args = (exp.old_logp_BS, exp.ref_logp_BS, mask_BS, self.kl_ctl.value, p.kl_estimator)
        if self.multiplier is None:
            exp.rewards_BS, exp.kl_BS = token_rewards(score_B, *kl_args, self.cfg.reward.score_clip)
        else:
            assert exp.cost_B is not None and self.cfg.cost is not None
            exp.rewards_BS, exp.costs_BS, exp.kl_BS = lagrangian_token_signals(
                score_B, exp.cost_B, *kl_args, self.cfg.reward.score_clip, self.cfg.cost.score_clip
            )
        adv_BS, exp.returns_BS = self._advantages(p.advantage, exp.rewards_BS, exp.values_BS, exp)
        if exp.truncated_B is not None:  # DAPO's overlong filter: out of the loss from here
            exp.action_mask_BS = mask_BS = mask_BS & ~exp.truncated_B[:, None]
            adv_BS = adv_BS * mask_BS
        exp.advantages_BS = self._whitened(adv_BS, mask_BS)
        if exp.tis_weights_BS is not None:  # min(r w A, clip(r) w A) = w min(r A, clip(r) A)
            exp.advantages_BS = exp.advantages_BS * exp.tis_weights_BS
        kl_mean, _ = masked_mean_var(exp.kl_BS, mask_BS, self.state.dp_group)
        adv_mean, adv_var = masked_mean_var(adv_BS, mask_BS, self.state.dp_group)
        n_samples = p.rollout_batch_size * p.n_samples_per_prompt
        self.kl_ctl.update(self._sequence_kl(exp), n_samples)
        metrics = {
            "kl": float(kl_mean),
            "advantage_mean": float(adv_mean),
            "advantage_std": float(adv_var.sqrt()),
        }
        if self.multiplier is not None:
            metrics.update(self._constrain(exp))
        if exp.mismatch is not None:
            metrics.update(exp.mismatch)
        return exp, metrics

    def _advantages(self, estimator: str, rewards_BS, values_BS, exp: ExperienceBatch):
        """``(advantages_BS, returns_BS)`` of one token signal (``ppo.gamma`` / ``lam``)."""
        p = self.cfg.ppo
        return compute_advantages(
            estimator,
            rewards_BS,
            exp.action_mask_BS,
            values_BS,
            gamma=p.gamma,
            lam=p.lam,
            group_size=p.n_samples_per_prompt,
        )

    def _whitened(self, adv_BS: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
        if not self.cfg.ppo.whiten_advantages:
            return adv_BS
        return whiten(adv_BS, mask_BS, self.state.dp_group)

    def _constrain(self, exp: ExperienceBatch) -> dict[str, float]:
        """PPO-Lagrangian's part of stage 4: cost advantages (GAE on the cost critic), the
        episode costs of every data-parallel rank into the multiplier's window, one
        multiplier update, then the actor's ``(A_r - lambda A_c) / (1 + lambda)``."""
        assert self.multiplier is not None and exp.cost_B is not None
        mask_BS = exp.action_mask_BS
        cost_adv_BS, exp.cost_returns_BS = self._advantages(
            "gae", exp.costs_BS, exp.cost_values_BS, exp
        )
        costs_N = all_gather_cat(exp.cost_B.double(), self.state.dp_group)
        self.multiplier.observe(costs_N)
        multiplier = self.multiplier.update(self.step_count)
        reward_adv_BS = exp.advantages_BS
        assert reward_adv_BS is not None
        exp.advantages_BS = combined_advantage(
            reward_adv_BS, self._whitened(cost_adv_BS, mask_BS), multiplier
        )
        cost_adv_mean, cost_adv_var = masked_mean_var(cost_adv_BS, mask_BS, self.state.dp_group)
        return {
            "lambda": multiplier,
            "episode_cost": self.multiplier.episode_cost,
            "cost_mean": float(costs_N.mean()),
            "cost_positive_frac": float((costs_N > 0).double().mean()),
            "cost_advantage_mean": float(cost_adv_mean),
            "cost_advantage_std": float(cost_adv_var.sqrt()),
        }

    def _sequence_kl(self, exp: ExperienceBatch) -> float:
        """The KL controller's observation: the summed KL of a sample, averaged over every
        sample of every data-parallel rank (a rank-local mean would move each rank's
        coefficient differently)."""
        assert exp.kl_BS is not None
        totals = torch.tensor(
            [float((exp.kl_BS * exp.action_mask_BS).sum()), float(exp.size)], dtype=torch.float64
        )
        group_sum(totals, self.state.dp_group)
        return float(totals[0] / totals[1].clamp(min=1.0))

    # ------------------------------------------------------------------ stage 5
    def update(self, exp: ExperienceBatch) -> dict[str, float]:
        """Critic and actor updates over PPO epochs x mini-batches (micro-batches inside)."""
        p = self.cfg.ppo
        gen = torch.Generator().manual_seed(p.seed + 7919 * self.step_count + self.state.dp_rank)
        per_mini = exp.size // p.mini_batches_per_rollout
        sums: dict[str, float] = {}
        maxima: dict[str, float] = {}
        n_updates = 0
        for _ in range(p.ppo_epochs):
            order = torch.randperm(exp.size, generator=gen)
            for m in range(p.mini_batches_per_rollout):
                mini = exp.rows(order[m * per_mini : (m + 1) * per_mini])
                for key, value in self._update_minibatch(mini).items():
                    if is_max_metric(key):
                        maxima[key] = max(maxima.get(key, -math.inf), value)
                    else:
                        sums[key] = sums.get(key, 0.0) + value
                n_updates += 1
        return {**{key: value / n_updates for key, value in sums.items()}, **maxima}

    def _update_minibatch(self, mini: ExperienceBatch) -> dict[str, float]:
        p = self.cfg.ppo
        mbs = mini.microbatches(
            p.micro_batch_size_per_rank, mini.length_order(p.groups_prompts), row_trim(self.state)
        )
        ptx_mbs = self._ptx_microbatches(len(mbs), mini.input_ids_BS.shape[1])
        if self.state.pp_size > 1 and ptx_mbs:  # a pipeline's micro-batches share one shape
            S = max(mb.shape[1] for mb in mbs + ptx_mbs)
            mbs = [mb.padded(S, self.tokenizer.pad_id) for mb in mbs]
            ptx_mbs = [mb.padded(S, self.tokenizer.pad_id) for mb in ptx_mbs]
        counts = self._global_counts(mini, ptx_mbs)
        metrics: dict[str, float] = {}
        if self.critic is not None:
            result = self.critic.train_step(mbs, critic_loss_fn(p, counts), normalize="none")
            metrics.update(result.metrics)
            metrics["critic_grad_norm"] = result.grad_norm or 0.0
        if self.cost_critic is not None:
            loss_fn = critic_loss_fn(p, counts, signal="cost")
            result = self.cost_critic.train_step(mbs, loss_fn, normalize="none")
            metrics.update(result.metrics)
            metrics["cost_critic_grad_norm"] = result.grad_norm or 0.0
        loss_fn = actor_loss_fn(p, self.state.tp_group, counts, self.cfg.generation.temperature)
        result = self.actor.train_step(mbs + ptx_mbs, loss_fn, normalize="none")
        metrics.update(result.metrics)
        metrics["actor_grad_norm"] = result.grad_norm or 0.0
        metrics["actor_lr"] = result.lr
        return metrics

    def _global_counts(self, mini: ExperienceBatch, ptx_mbs: list[MicroBatch]) -> GlobalCounts:
        """Valid tokens, sequences and ptx tokens of the mini-batch over all DP ranks."""
        counts = torch.tensor(
            [
                float(mini.action_mask_BS.sum()),
                float(mini.action_mask_BS.any(dim=1).sum()),
                sum(float(mb.loss_mask_BS.sum()) for mb in ptx_mbs if mb.loss_mask_BS is not None),
            ],
            dtype=torch.float64,
        )
        group_sum(counts, self.state.dp_group)
        sequences = max(float(counts[1]), 1.0)
        return GlobalCounts(
            max(float(counts[0]), 1.0),
            sequences,
            float(counts[2]),
            norm_tokens=sequences * self.cfg.generation.max_new_tokens,
        )

    def _ptx_microbatches(self, n_micro: int, seq_len: int) -> list[MicroBatch]:
        """As many ptx micro-batches as PPO ones, whole windows padded to at least
        ``seq_len`` positions: their content does not depend on how the rollout is split
        over ranks or padded (layout parity), only their padding does."""
        if self.ptx is None or not self.cfg.ppo.ptx_coef:
            return []
        out = []
        b = self.cfg.ppo.micro_batch_size_per_rank
        base = self.step_count * n_micro * self.state.dp_size
        for i in range(n_micro):
            mb = self.ptx.microbatch(base + i * self.state.dp_size + self.state.dp_rank, b)
            if mb.loss_mask_BS is None:
                raise ValueError("a ptx micro-batch needs a loss_mask_BS")
            mb = replace(mb, head_mask_BS=mb.loss_mask_BS.bool())
            out.append(mb.padded(max(seq_len, mb.shape[1]), self.tokenizer.pad_id))
        return out

    # ------------------------------------------------------------------ metrics
    def _step_metrics(self, rollout, exp, adv_metrics, train_metrics, timer) -> dict[str, float]:
        lengths = torch.tensor([len(r) for r in rollout.response_ids], dtype=torch.float64)
        score = all_gather_cat(exp.score_B.double(), self.state.dp_group)
        length_all = all_gather_cat(lengths, self.state.dp_group)
        total = sum(timer.seconds.values())
        metrics = {
            "reward_mean": float(score.mean()),
            "reward_std": float(score.std()) if score.numel() > 1 else 0.0,
            "response_length": float(length_all.mean()),
            "kl_coef": float(self.kl_ctl.value),
            **adv_metrics,
            **train_metrics,
            **{f"time_{k}": v for k, v in timer.seconds.items()},
            "time_step": total,
            "tokens_per_s": float(length_all.sum()) / max(total, 1e-9),
        }
        return metrics

    # ------------------------------------------------------------------ state
    def trainer_state(self) -> dict:
        """What a checkpoint needs beyond models and optimizers."""
        return {
            "step": self.step_count,
            "policy_version": self.policy_version,
            "prompts": self.prompts.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "reward_moments": self.reward_moments.state_dict(),
            **({"multiplier": self.multiplier.state_dict()} if self.multiplier else {}),
        }

    def load_trainer_state(self, saved: dict) -> None:
        self.step_count = saved["step"]
        self.policy_version = saved["policy_version"]
        self.prompts.load_state_dict(saved["prompts"])
        self.kl_ctl.load_state_dict(saved["kl_ctl"])
        self.reward_moments.load_state_dict(saved["reward_moments"])
        if self.multiplier is not None:
            if "multiplier" not in saved:
                raise ValueError(
                    "this checkpoint holds no Lagrange multiplier: it was not written by a "
                    "ppo.algorithm=ppo_lag run"
                )
            self.multiplier.load_state_dict(saved["multiplier"])
        self.engine.sync_weights(self.policy_version)

    def trainable_models(self) -> dict[str, TrainableModel]:
        models = {"actor": self.actor}
        if self.critic is not None:
            models["critic"] = self.critic
        if self.cost_critic is not None:
            models["cost_critic"] = self.cost_critic
        return models
