"""Offline preference losses (the DPO family), registered by name like the advantage
estimators: pure tensor functions of sequence log-probabilities, testable without a model.

Legend: ``P`` preference pairs, ``N`` unpaired completions (KTO). Inputs are each
response's *summed* token log-probs under the policy (and the frozen reference) and its
number of response tokens; length-normalised losses divide by it themselves.

Paired losses (``preference_loss(name, logps, params)`` -> ``(loss_P, chosen_reward_P,
rejected_reward_P)``; the rewards are the implicit ones TRL logs as ``rewards/chosen`` and
``rewards/rejected``, detached):

* ``sigmoid`` DPO (Rafailov et al. 2023): ``-log sigmoid(beta h)``, ``h = (pi_c - ref_c) -
  (pi_r - ref_r)`` on summed log-probs; with ``label_smoothing`` eps, conservative DPO
  (Mitchell 2023): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
* ``ipo`` IPO (Azar et al. 2023): ``(h - 1 / (2 beta))^2`` with ``h`` on length-averaged
  log-probs, as TRL computes it.
* ``simpo`` SimPO (Meng et al. 2024), reference-free: ``-log sigmoid(beta (a_c - a_r) -
  gamma)``, ``a`` the length-averaged log-prob; rewards ``beta * a``.
* ``orpo`` ORPO (Hong et al. 2024), reference-free: ``NLL_c - lambda log sigmoid(log
  odds(a_c) - log odds(a_r))``, ``odds(a) = p / (1 - p)`` with ``p = exp(a)``, the NLL the
  chosen response's mean token NLL; rewards ``lambda * a`` (TRL's ``beta`` is lambda).

``kto_loss``: KTO (Ethayarajh et al. 2024) on unpaired completions: desirable ones
``w_D (1 - sigmoid(beta (r - z0)))``, undesirable ``w_U (1 - sigmoid(beta (z0 - r)))``,
``r = pi - ref`` and ``z0`` the reference point (a batch KL estimate clamped at 0, not
back-propagated).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """Summed response log-probs of a batch of pairs and their response lengths."""

    policy_chosen_P: torch.Tensor
    policy_rejected_P: torch.Tensor
    chosen_tokens_P: torch.Tensor
    rejected_tokens_P: torch.Tensor
    ref_chosen_P: torch.Tensor | None = None  # None for reference-free losses
    ref_rejected_P: torch.Tensor | None = None

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's length-averaged log-probs ``(a_c, a_r)``."""
        return (
            self.policy_chosen_P / self.chosen_tokens_P.clamp(min=1),
            self.policy_rejected_P / self.rejected_tokens_P.clamp(min=1),
        )

    def reference_margin(self, averaged: bool = False) -> torch.Tensor:
        """``(pi_c - ref_c) - (pi_r - ref_r)``, on summed or length-averaged log-probs."""
        if self.ref_chosen_P is None or self.ref_rejected_P is None:
            raise ValueError("this loss needs the reference model's log-probs")
        chosen = self.policy_chosen_P - self.ref_chosen_P
        rejected = self.policy_rejected_P - self.ref_rejected_P
        if averaged:
            chosen = chosen / self.chosen_tokens_P.clamp(min=1)
            rejected = rejected / self.rejected_tokens_P.clamp(min=1)
        return chosen - rejected


@dataclass(frozen=True)
class PreferenceParams:
    """Each loss's parameters; the defaults are the papers' (and TRL's)."""

    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO's eps
    simpo_gamma: float = 0.5  # SimPO's target margin (TRL's simpo_gamma)
    desirable_weight: float = 1.0  # KTO
    undesirable_weight: float = 1.0


PREFERENCE_LOSSES: dict[str, Callable] = {}
REFERENCE_FREE = {"simpo", "orpo"}


def register(name: str):
    def deco(fn):
        PREFERENCE_LOSSES[name] = fn
        return fn

    return deco


def preference_loss(
    name: str, logps: PairLogps, params: PreferenceParams
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss_P, chosen_reward_P, rejected_reward_P)`` of the loss registered as ``name``."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}: expected {sorted(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[name](logps, params)


def _implicit_rewards(logps: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    assert logps.ref_chosen_P is not None and logps.ref_rejected_P is not None
    chosen = beta * (logps.policy_chosen_P - logps.ref_chosen_P).detach()
    return chosen, beta * (logps.policy_rejected_P - logps.ref_rejected_P).detach()


@register("sigmoid")
def dpo_loss(logps: PairLogps, params: PreferenceParams):
    """DPO, or conservative DPO with ``label_smoothing``."""
    logits_P = params.beta * logps.reference_margin()
    eps = params.label_smoothing
    loss_P = -(1.0 - eps) * F.logsigmoid(logits_P) - eps * F.logsigmoid(-logits_P)
    return (loss_P, *_implicit_rewards(logps, params.beta))


@register("ipo")
def ipo_loss(logps: PairLogps, params: PreferenceParams):
    """IPO's squared distance of the (length-averaged) margin from ``1 / (2 beta)``."""
    margin_P = logps.reference_margin(averaged=True)
    loss_P = (margin_P - 1.0 / (2.0 * params.beta)) ** 2
    return (loss_P, *_implicit_rewards(logps, params.beta))


@register("simpo")
def simpo_loss(logps: PairLogps, params: PreferenceParams):
    """SimPO: reference-free, length-normalised, with a target margin ``gamma``."""
    avg_chosen_P, avg_rejected_P = logps.averaged()
    logits_P = params.beta * (avg_chosen_P - avg_rejected_P) - params.simpo_gamma
    eps = params.label_smoothing
    loss_P = -(1.0 - eps) * F.logsigmoid(logits_P) - eps * F.logsigmoid(-logits_P)
    return loss_P, params.beta * avg_chosen_P.detach(), params.beta * avg_rejected_P.detach()


def _log_odds(avg_logp_P: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` with ``p = exp(a)``, ``a < 0`` (log1p of -exp: stable)."""
    return avg_logp_P - torch.log1p(-torch.exp(avg_logp_P))


@register("orpo")
def orpo_loss(logps: PairLogps, params: PreferenceParams):
    """ORPO: the chosen response's mean NLL minus ``beta`` (ORPO's lambda) x the log
    sigmoid of the log odds ratio."""
    avg_chosen_P, avg_rejected_P = logps.averaged()
    log_odds_P = _log_odds(avg_chosen_P) - _log_odds(avg_rejected_P)
    loss_P = -avg_chosen_P - params.beta * F.logsigmoid(log_odds_P)
    return loss_P, params.beta * avg_chosen_P.detach(), params.beta * avg_rejected_P.detach()


def kto_loss(
    policy_logp_N: torch.Tensor,
    ref_logp_N: torch.Tensor,
    desirable_N: torch.Tensor,
    reference_point: torch.Tensor,
    params: PreferenceParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_N, reward_N)``: KTO on unpaired completions; ``reference_point`` is ``z0``
    (``kto_reference_point``), used as a constant."""
    reward_N = policy_logp_N - ref_logp_N
    z0 = reference_point.detach()
    desirable_N = desirable_N.bool()
    beta = params.beta
    loss_N = torch.where(
        desirable_N,
        params.desirable_weight * (1.0 - torch.sigmoid(beta * (reward_N - z0))),
        params.undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - reward_N))),
    )
    return loss_N, beta * reward_N.detach()


def kto_reference_point(policy_mismatched_N: torch.Tensor, ref_mismatched_N: torch.Tensor):
    """KTO's ``z0``: the mean of ``pi - ref`` over mismatched (prompt, completion) pairs of
    the batch (an estimate of KL(pi || ref)), clamped at 0, detached."""
    return (policy_mismatched_N - ref_mismatched_N).mean().clamp(min=0.0).detach()
