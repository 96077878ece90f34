"""The sources of one PPO score (the reward, or PPO-Lagrangian's cost): frozen score models
and rule functions, checked finite and combined as their config section says.

A ``reward:`` or ``cost:`` section (``config.RewardConfig``) lists models (HF checkpoints
with a score head, read at each response's last token, their stored calibration applied)
and rules (``module:function(prompt_ids, response_ids, tokenizer, **kwargs) -> float``).
``combine: sum`` adds their weighted scores; ``combine: llama2_safety`` gates a helpfulness
and a safety model (``algorithms.rewards.llama2_safety_gate``), whitens the result over
every data-parallel rank's samples and adds the rules' weighted scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hpc_rlhf.algorithms.advantages import whiten
from hpc_rlhf.algorithms.rewards import combine_scores, llama2_safety_gate
from hpc_rlhf.algorithms.rule_rewards import (
    RuleRewardError,
    check_rule_arguments,
    load_rule,
    rule_score,
)
from hpc_rlhf.config import RewardConfig
from hpc_rlhf.parallel.comm import broadcast_object, group_size, group_sum
from hpc_rlhf.rewards import is_batched
from hpc_rlhf.trainer.losses import calibrated_end_score_fn
from hpc_rlhf.trainer.trainable_model import NonFiniteLossError


class NonFiniteRewardError(NonFiniteLossError):
    """A reward (or cost) model or rule scored samples NaN/inf; nothing was trained on
    them (a ``NonFiniteLossError``, so a run stops as for a NaN loss, checkpoint intact)."""


@dataclass
class ScoreSources:
    """The models and rules of one score (``kind``: "reward" or "cost")."""

    section: RewardConfig
    kind: str
    models: list  # frozen TrainableModels with a score head, in section.models order
    calibrations: list[tuple[float, float] | None]
    # the rules run on this group's first rank, the others receive its scores (see rule_scores)
    mp_group: Any = None

    def __post_init__(self):
        # rules first: a rule that does not import fails before any step runs
        self.rules = [(spec, load_rule(spec.function)) for spec in self.section.rules]
        self.score_fns = [calibrated_end_score_fn(c) for c in self.calibrations]

    def combined(
        self,
        rollout,
        model_scores: list[torch.Tensor],
        tokenizer,
        dp_group,
        unsafe_prompt_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B]``: the models' end scores (``model_scores``, one ``[B]`` each) and the
        rules' scores of ``rollout``, combined. A rule returning something other than a
        number raises ``TypeError`` naming it; NaN or inf scores raise
        ``NonFiniteRewardError`` naming each source before they reach the advantages."""
        scores = list(model_scores)
        weights = [spec.weight for spec in self.section.models]
        sources = [f"{self.kind} model {spec.path}" for spec in self.section.models]
        if self.rules:
            scores.extend(self.rule_scores(rollout, tokenizer).unbind(0))
            weights.extend(spec.weight for spec, _ in self.rules)
            sources.extend(f"{self.kind} rule {spec.function}" for spec, _ in self.rules)
        check_finite(sources, scores, dp_group)
        if self.section.combine == "sum":
            return combine_scores(scores, weights)
        return self._safety_gated(scores, weights, unsafe_prompt_B, dp_group)

    def rule_scores(self, rollout, tokenizer) -> torch.Tensor:
        """``[R, B]``: each rule's score of each sample. The first rank of the
        model-parallel group ``mp_group`` runs the rules and hands the scores (or the error
        a rule raised) to the others: every rank of a data-parallel replica trains on the same scores even when a rule is
        not deterministic (a program that times out on one rank only), and programs run
        once per replica."""
        mp_group = self.mp_group
        if group_size(mp_group) == 1:
            return self._run_rules(rollout, tokenizer)
        outcome: torch.Tensor | Exception | None = None
        if dist.get_rank(mp_group) == 0:
            try:
                outcome = self._run_rules(rollout, tokenizer)
            except Exception as err:  # raised on every rank of the group below
                outcome = err
        outcome = broadcast_object(outcome, 0, mp_group)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _run_rules(self, rollout, tokenizer) -> torch.Tensor:
        """``[R, B]`` float64: the rules called here (batched rules once, others per sample),
        the prompts' reference fields as keyword arguments."""
        n = len(rollout.response_ids)
        references = rollout.references or [{} for _ in range(n)]
        rows = []
        for spec, fn in self.rules:
            if is_batched(fn):
                fields = {k: [r[k] for r in references] for k in references[0]} if n else {}
                values = fn(
                    rollout.prompt_ids, rollout.response_ids, tokenizer, **fields, **spec.kwargs
                )
                if len(values) != n:
                    raise RuleRewardError(
                        f"batched rule reward {spec.function!r} returned {len(values)} scores "
                        f"for {n} samples"
                    )
            else:
                values = [
                    fn(p, r, tokenizer, **refs, **spec.kwargs)
                    for p, r, refs in zip(rollout.prompt_ids, rollout.response_ids, references)
                ]
            rows.append([rule_score(spec.function, v) for v in values])
        return torch.tensor(rows, dtype=torch.float64).reshape(len(self.rules), n)

    def _safety_gated(self, scores, weights, unsafe_prompt_B, dp_group) -> torch.Tensor:
        """Llama-2's gate over the helpfulness and safety models, whitened over DP, plus
        the rules' weighted scores."""
        section = self.section
        helpful_B = scores[section.model_index("helpfulness")]
        safety_B = scores[section.model_index("safety")]
        if unsafe_prompt_B is None:
            unsafe_prompt_B = torch.zeros_like(safety_B, dtype=torch.bool)
        gated_B = llama2_safety_gate(helpful_B, safety_B, unsafe_prompt_B, section.safety_threshold)
        ones_B1 = torch.ones(gated_B.shape[0], 1, dtype=torch.bool)
        total_B = whiten(gated_B[:, None], ones_B1, dp_group)[:, 0]
        n_models = len(section.models)
        if len(scores) > n_models:
            total_B = total_B + combine_scores(scores[n_models:], weights[n_models:])
        return total_B


def load_rules_first(cfg) -> None:
    """Import every reward and cost rule of a ``PPORunConfig`` and check it can be called
    with its kwargs and the prompts' reference fields (a rule that does not import or
    lacks an argument fails at once, before minutes of model loading)."""
    for section in (cfg.reward, cfg.cost):
        for spec in section.rules if section is not None else ():
            fn = load_rule(spec.function)
            check_rule_arguments(spec.function, fn, spec.kwargs, cfg.data.rule_fields)


def check_finite(sources: list[str], scores: list[torch.Tensor], dp_group) -> None:
    """Raise ``NonFiniteRewardError`` on every rank when a source scored any sample NaN/inf
    on any data-parallel rank (counts summed over DP: one small all-reduce)."""
    counts = [float((~torch.isfinite(s)).sum()) for s in scores]
    counts_K = torch.tensor([*counts, float(len(scores[0]))], dtype=torch.float64)
    group_sum(counts_K, dp_group)
    total = int(counts_K[-1])
    bad = [
        f"{source} gave NaN/inf for {int(n)} of {total} samples"
        for source, n in zip(sources, counts_K[:-1].tolist())
        if n
    ]
    if bad:
        raise NonFiniteRewardError("non-finite reward scores: " + "; ".join(bad))
