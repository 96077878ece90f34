"""PPO-Lagrangian (Safe-RLHF): the learned Lagrange multiplier and the combined advantage.

The constrained problem ``max J_r  s.t.  J_c <= d`` is solved as the saddle point of
``J_r - lambda * (J_c - d)``: the policy ascends ``(A_r - lambda * A_c) / (1 + lambda)``
(divided by ``1 + lambda`` so the advantage's scale stays bounded as lambda grows), and
``lambda`` ascends ``J_c - d``. As Safe-RLHF does, ``log lambda`` is the learned variable
(lambda stays > 0) and plain SGD minimises ``-(J_c - d) * lambda``, whose gradient in
``log lambda`` is ``-(J_c - d) * lambda``; ``J_c`` is the mean episode cost over a window
of recent episodes.

That step is proportional to lambda itself, so a large rate grows lambda geometrically
while the cost stays above the threshold (Safe-RLHF then overflows to inf and its actor
loss to NaN), and shrinks it geometrically below the threshold (to exactly 0 in floating
point, from which it never returns). Here a learned ``log lambda`` stays within
``[-LOG_LAMBDA_BOUND, LOG_LAMBDA_BOUND]`` (lambda in ~[2e-9, 4.9e8]: at the top the
reward's weight ``1 / (1 + lambda)`` is ~2e-9 and the actor minimises the cost alone; at
the bottom the cost's is), and the advantage's weights are computed as sigmoids of
``log lambda``, finite for any value.
"""

from __future__ import annotations

import math
from collections import deque

import torch

LOG_LAMBDA_BOUND = 20.0


def combined_advantage(
    reward_adv_BS: torch.Tensor, cost_adv_BS: torch.Tensor, multiplier: float
) -> torch.Tensor:
    """``(A_reward - lambda * A_cost) / (1 + lambda)``, the actor's PPO-Lagrangian advantage,
    as ``sigmoid(-log lambda) A_reward - sigmoid(log lambda) A_cost`` (the same weights,
    finite for every lambda >= 0)."""
    if multiplier == 0.0:
        return reward_adv_BS.clone()
    log_lambda = math.log(multiplier)
    cost_weight = 1.0 / (1.0 + math.exp(-log_lambda)) if log_lambda > -700 else 0.0
    return (1.0 - cost_weight) * reward_adv_BS - cost_weight * cost_adv_BS


class LagrangeMultiplier:
    """``lambda = exp(log_lambda)``, learned from a window of episode costs.

    Every rank must feed it the same costs (the trainer gathers them over data-parallel
    ranks first) so every rank holds the same lambda without a broadcast. With ``lr == 0``
    lambda stays at its initial value (which may then be 0: the cost is ignored).
    """

    def __init__(
        self,
        init: float,
        lr: float,
        threshold: float,
        window: int,
        max_value: float | None = None,
        delay_steps: int = 0,
    ):
        self.log_lambda = torch.nn.Parameter(
            torch.tensor(math.log(init) if init > 0 else -math.inf, dtype=torch.float64)
        )
        self.optimizer = torch.optim.SGD([self.log_lambda], lr=lr)
        self.lr = lr
        self.threshold = threshold
        self.log_max = math.log(max_value) if max_value is not None else None
        self.delay_steps = delay_steps
        self.episode_costs: deque[float] = deque(maxlen=window)

    @property
    def value(self) -> float:
        """The current multiplier lambda."""
        return float(self.log_lambda.detach().exp())

    def observe(self, costs_N: torch.Tensor) -> None:
        """Append the episode costs of one step (all data-parallel ranks) to the window."""
        self.episode_costs.extend(costs_N.double().flatten().tolist())

    @property
    def episode_cost(self) -> float:
        """Mean cost of the episodes in the window (``J_c``); 0 before any is observed."""
        return sum(self.episode_costs) / len(self.episode_costs) if self.episode_costs else 0.0

    def update(self, step: int) -> float:
        """One SGD step on ``-(J_c - threshold) * lambda`` when ``step`` (0-based PPO step)
        is at least the update delay; returns the new lambda."""
        if step < self.delay_steps or not self.lr or not self.episode_costs:
            return self.value
        self.optimizer.zero_grad()
        loss = -(self.episode_cost - self.threshold) * self.log_lambda.exp()
        loss.backward()
        self.optimizer.step()
        top = LOG_LAMBDA_BOUND if self.log_max is None else min(self.log_max, LOG_LAMBDA_BOUND)
        with torch.no_grad():
            self.log_lambda.clamp_(min=-LOG_LAMBDA_BOUND, max=top)
        return self.value

    def state_dict(self) -> dict:
        """Everything exact resume needs: log lambda, the optimizer and the window."""
        return {
            "log_lambda": float(self.log_lambda.detach()),
            "optimizer": self.optimizer.state_dict(),
            "episode_costs": list(self.episode_costs),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.log_lambda.fill_(state["log_lambda"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.episode_costs.clear()
        self.episode_costs.extend(state["episode_costs"])
