"""KL estimators between the policy and the reference, and the KL coefficient controllers.

Per token, with ``log_ratio = logp - ref_logp`` (samples drawn from the policy):

* ``k1``: ``log_ratio`` (unbiased, can be negative);
* ``k2``: ``0.5 * log_ratio**2`` (biased, low variance);
* ``k3``: ``exp(-log_ratio) - 1 + log_ratio`` (unbiased, always >= 0; Schulman's estimator).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": lambda r: r,
    "k2": lambda r: 0.5 * r.square(),
    "k3": lambda r: torch.expm1(-r) + r,
}


def kl_estimate(logp_BS: torch.Tensor, ref_logp_BS: torch.Tensor, estimator: str = "k1"):
    """Per-token KL estimate ``[B, S]`` (fp32) of policy vs reference."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; expected one of {list(KL_ESTIMATORS)}"
        )
    return KL_ESTIMATORS[estimator](logp_BS.float() - ref_logp_BS.float())


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, observed_kl: float, n_samples: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


@dataclass
class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: steer the observed KL toward ``target``.

    ``value *= 1 + clip(observed / target - 1, -0.2, 0.2) * n_samples / horizon``.
    """

    value: float
    target: float
    horizon: int

    def update(self, observed_kl: float, n_samples: int) -> None:
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


def make_kl_controller(init: float, target: float | None = None, horizon: int = 10000):
    """Adaptive when ``target`` is given, else fixed."""
    if target is None:
        return FixedKLController(init)
    if target <= 0 or horizon <= 0:
        raise ValueError("adaptive KL needs target > 0 and horizon > 0")
    return AdaptiveKLController(init, target, horizon)
