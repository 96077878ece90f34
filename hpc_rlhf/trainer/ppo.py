"""PPO over an actor, a critic, a frozen reference and reward models (+ rule rewards).

``PPOTrainer.step()`` is the six stages of one iteration, in order, each timed:

1. ``prompts``     this data-parallel rank's prompts;
2. ``generate``    the colocated engine samples responses with the actor's current weights
                   (optimizer state and gradients released meanwhile);
3. ``score``       reward models' end scores, rule rewards; reference log-probs and critic
                   values (fused vocab-parallel log-probs); the actor's log-probs come from
                   the engine (or are recomputed, ``ppo.recompute_old_logprobs``);
4. ``advantages``  KL-penalised token rewards, GAE (or GRPO / RLOO), whitening across DP;
5. ``train``       critic then actor updates over epochs x mini-batches x micro-batches;
6. ``handoff``     the updated weights go to the engine, stamped with a new policy version.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

import torch

from hpc_rlhf.algorithms.advantages import compute_advantages, masked_mean_var, whiten
from hpc_rlhf.algorithms.kl import make_kl_controller
from hpc_rlhf.algorithms.rewards import RunningMoments, combine_scores, token_rewards
from hpc_rlhf.algorithms.rule_rewards import load_rule, rule_score
from hpc_rlhf.config import PPORunConfig
from hpc_rlhf.models.runner import MicroBatch
from hpc_rlhf.parallel.comm import all_gather_cat, group_sum
from hpc_rlhf.parallel.state import ParallelState
from hpc_rlhf.trainer.experience import (
    ExperienceBatch,
    Rollout,
    build_experience,
    generate_rollout,
)
from hpc_rlhf.trainer.losses import (
    GlobalCounts,
    actor_loss_fn,
    calibrated_end_score_fn,
    critic_loss_fn,
    logprobs_fn,
    values_fn,
)
from hpc_rlhf.trainer.trainable_model import NonFiniteLossError, TrainableModel, is_max_metric

logger = logging.getLogger(__name__)


class NonFiniteRewardError(NonFiniteLossError):
    """A reward model or rule reward scored samples NaN/inf; nothing was trained on them
    (a ``NonFiniteLossError``, so a run stops as for a NaN loss, checkpoint intact)."""


class StageTimer:
    """Wall-clock seconds per named stage of one step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
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
        # rules first: a rule that does not import fails before the models are built
        self.rules = [(spec, load_rule(spec.function)) for spec in cfg.reward.rules]
        models = build_models(cfg, state, tokenizer)
        self.actor, self.reference, self.critic = models.actor, models.reference, models.critic
        self.reward_models, self.engine = models.reward_models, models.engine
        self.reward_fns = [calibrated_end_score_fn(c) for c in models.reward_calibrations]
        self.kl_ctl = make_kl_controller(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        self.reward_moments = RunningMoments()
        self.step_count = 0
        self.policy_version = 0
        self.engine.sync_weights(self.policy_version)

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
        timer = StageTimer()
        with timer("prompts"):
            if prompt_ids is None and rollout is None:
                prompt_ids = self.prompts.next_batch(
                    self.cfg.ppo.rollout_batch_size, self.state.dp_rank, self.state.dp_size
                )
        with timer("generate"):
            if rollout is None:
                assert prompt_ids is not None
                rollout = self.generate(prompt_ids, max_new_tokens)
        with timer("score"):
            exp = self.score(rollout)
        with timer("advantages"):
            exp, adv_metrics = self.compute_advantages(exp)
        with timer("train"):
            train_metrics = self.update(exp)
        with timer("handoff"):
            self.policy_version += 1
            self.engine.sync_weights(self.policy_version)
        self.step_count += 1
        metrics = self._step_metrics(rollout, exp, adv_metrics, train_metrics, timer)
        return Iteration(rollout, exp, metrics, dict(timer.seconds))

    # ------------------------------------------------------------------ stage 2
    def generate(
        self, prompt_ids: list[list[int]], max_new_tokens: list[int] | None = None
    ) -> Rollout:
        """Sample ``n`` responses per prompt with the engine (seeded per step and DP rank).

        ``max_new_tokens`` optionally limits each prompt's responses (benchmarks replay
        fixed response lengths this way)."""
        seed = self.cfg.ppo.seed * 1_000_003 + self.step_count * 1009 + self.state.dp_rank
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

    @contextmanager
    def _training_memory_released(self):
        """Optimizer state and gradient buffers off the accelerator while generating."""
        if not self.cfg.generation.offload_training_state:
            yield
            return
        from hpc_rlhf.inference.memory import training_memory_released

        with ExitStack() as stack:
            for model in (self.actor, self.critic):
                if model is not None:
                    stack.enter_context(training_memory_released(model))
            yield

    # ------------------------------------------------------------------ stage 3
    def score(self, rollout: Rollout) -> ExperienceBatch:
        """Reward scores, reference log-probs, critic values (and old log-probs if asked)."""
        exp = build_experience(rollout, self.tokenizer.pad_id, self.state.sequence_multiple)
        order = exp.length_order()
        mbs = exp.microbatches(self.cfg.ppo.score_micro_batch, order, self._trim())
        temperature = self.cfg.generation.temperature

        def run(model, fn, key: str) -> torch.Tensor:
            parts = [out[key] for out in model.infer(mbs, fn)]
            if parts[0].dim() == 1:  # one value per row
                return torch.cat(parts)[torch.argsort(order)]
            return exp.gather_rows(parts, order) * exp.action_mask_BS

        exp.ref_logp_BS = run(self.reference, logprobs_fn(self.state.tp_group, temperature), "logp")
        if self.cfg.ppo.recompute_old_logprobs:
            exp.old_logp_BS = run(self.actor, logprobs_fn(self.state.tp_group, temperature), "logp")
        if self.critic is not None:
            exp.values_BS = run(self.critic, values_fn, "values")
        scores = [run(m, fn, "score") for m, fn in zip(self.reward_models, self.reward_fns)]
        exp.score_B = self._scores(rollout, scores)
        return exp

    def _trim(self) -> int | None:
        """Per-microbatch lengths need PP=1 (pipeline p2p shapes are fixed per schedule)."""
        return self.state.sequence_multiple if self.state.pp_size == 1 else None

    def _scores(self, rollout: Rollout, model_scores: list[torch.Tensor]) -> torch.Tensor:
        """Reward models' end scores and rule rewards, combined with their weights.

        A rule returning something other than a number raises ``TypeError`` naming it; NaN
        or inf scores raise ``NonFiniteRewardError`` naming each source (``_check_finite``)
        before they reach the advantages and the loss."""
        scores = list(model_scores)
        weights = [spec.weight for spec in self.cfg.reward.models]
        sources = [f"reward model {spec.path}" for spec in self.cfg.reward.models]
        for spec, fn in self.rules:
            values = [
                rule_score(spec.function, fn(p, r, self.tokenizer, **spec.kwargs))
                for p, r in zip(rollout.prompt_ids, rollout.response_ids)
            ]
            scores.append(torch.tensor(values))
            weights.append(spec.weight)
            sources.append(f"reward rule {spec.function}")
        self._check_finite(sources, scores)
        return combine_scores(scores, weights)

    def _check_finite(self, sources: list[str], scores: list[torch.Tensor]) -> None:
        """Raise ``NonFiniteRewardError`` on every rank when a source scored any sample
        NaN/inf on any data-parallel rank (counts summed over DP: one small all-reduce)."""
        counts = [float((~torch.isfinite(s)).sum()) for s in scores]
        counts_K = torch.tensor([*counts, float(len(scores[0]))], dtype=torch.float64)
        group_sum(counts_K, self.state.dp_group)
        total = int(counts_K[-1])
        bad = [
            f"{source} gave NaN/inf for {int(n)} of {total} samples"
            for source, n in zip(sources, counts_K[:-1].tolist())
            if n
        ]
        if bad:
            raise NonFiniteRewardError("non-finite reward scores: " + "; ".join(bad))

    # ------------------------------------------------------------------ stage 4
    def compute_advantages(self, exp: ExperienceBatch) -> tuple[ExperienceBatch, dict]:
        """Token rewards (KL penalty + score), advantages and returns; whitened across DP."""
        p = self.cfg.ppo
        if exp.score_B is None or exp.ref_logp_BS is None:
            raise ValueError("compute_advantages needs a scored batch: run score() first")
        raw_score_B = exp.score_B
        score_B = raw_score_B
        if self.cfg.reward.normalize:
            self.reward_moments.update(all_gather_cat(raw_score_B, self.state.dp_group))
            score_B = self.reward_moments.normalize(raw_score_B)
        mask_BS = exp.action_mask_BS
        exp.rewards_BS, exp.kl_BS = token_rewards(
            score_B,
            exp.old_logp_BS,
            exp.ref_logp_BS,
            mask_BS,
            self.kl_ctl.value,
            p.kl_estimator,
            self.cfg.reward.score_clip,
        )
        adv_BS, ret_BS = compute_advantages(
            p.advantage,
            exp.rewards_BS,
            mask_BS,
            exp.values_BS,
            gamma=p.gamma,
            lam=p.lam,
            group_size=p.n_samples_per_prompt,
        )
        exp.returns_BS = ret_BS
        exp.advantages_BS = (
            whiten(adv_BS, mask_BS, self.state.dp_group) if p.whiten_advantages else adv_BS
        )
        kl_mean, _ = masked_mean_var(exp.kl_BS, mask_BS, self.state.dp_group)
        adv_mean, adv_var = masked_mean_var(adv_BS, mask_BS, self.state.dp_group)
        n_samples = p.rollout_batch_size * p.n_samples_per_prompt
        self.kl_ctl.update(self._sequence_kl(exp), n_samples)
        return exp, {
            "kl": float(kl_mean),
            "advantage_mean": float(adv_mean),
            "advantage_std": float(adv_var.sqrt()),
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
        mbs = mini.microbatches(p.micro_batch_size_per_rank, mini.length_order(), self._trim())
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
        return GlobalCounts(
            max(float(counts[0]), 1.0), max(float(counts[1]), 1.0), float(counts[2])
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
        }

    def load_trainer_state(self, saved: dict) -> None:
        self.step_count = saved["step"]
        self.policy_version = saved["policy_version"]
        self.prompts.load_state_dict(saved["prompts"])
        self.kl_ctl.load_state_dict(saved["kl_ctl"])
        self.reward_moments.load_state_dict(saved["reward_moments"])
        self.engine.sync_weights(self.policy_version)

    def trainable_models(self) -> dict[str, TrainableModel]:
        models = {"actor": self.actor}
        if self.critic is not None:
            models["critic"] = self.critic
        return models
