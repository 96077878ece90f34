"""Generalised advantage estimation over masked sequences.

Shapes: B sequences, T time steps. Only positions with ``mask`` true take part: for a valid
t, t' is the next valid position after it (none: next value and advantage are 0),
``delta_t = r_t + gamma * V_t' - V_t``, ``A_t = delta_t + gamma * lam * A_t'``,
``returns_t = A_t + V_t``. Masked positions get 0 and are skipped by the recursion, so left
padding, right padding and holes inside a response all work.
"""

from __future__ import annotations

import torch

from hpc_rlhf.ops import _backend


def _gae_torch(rewards, values, mask, gamma: float, lam: float):
    """Reference: reverse loop over T, vectorised over B, fp32. mask [B, T] uint8."""
    b, t_len = rewards.shape
    valid = mask.bool()  # [B, T]
    adv = torch.zeros(b, t_len, dtype=torch.float32, device=rewards.device)
    next_v = torch.zeros(b, dtype=torch.float32, device=rewards.device)  # [B]
    next_a = torch.zeros_like(next_v)  # [B]
    for t in range(t_len - 1, -1, -1):
        ok = valid[:, t]
        v_t = values[:, t]
        a_t = rewards[:, t] + gamma * next_v - v_t + (gamma * lam) * next_a
        adv[:, t] = torch.where(ok, a_t, 0.0)
        next_v = torch.where(ok, v_t, next_v)
        next_a = torch.where(ok, a_t, next_a)
    returns = torch.where(valid, adv + values, 0.0)
    return adv, returns


def _impl(backend: str):
    if backend == "triton":
        return _backend.kernels("gae").gae_fwd
    return _backend.implementation(backend, _gae_torch, "gae", "gae")


@torch.no_grad()
def masked_gae(rewards, values, mask, *, gamma=1.0, lam=0.95, backend="auto"):
    """Advantages and returns of GAE(gamma, lam) over the valid positions of each sequence.

    Args:
        rewards: ``[B, T]`` per-token rewards.
        values: ``[B, T]`` critic values.
        mask: ``[B, T]`` bool (or 0/1) of valid positions; any padding pattern.
        gamma, lam: discount and GAE lambda.
        backend: "auto", "torch", "cpp", "cuda" or "triton".

    Returns:
        ``(advantages, returns)``, fp32 ``[B, T]``, 0 at masked positions. No gradient.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
            f"{tuple(mask.shape)} must all be [B, T]"
        )
    chosen = _backend.resolve("masked_gae", backend, rewards.device)
    r = rewards.float().contiguous()  # [B, T]
    v = values.float().contiguous()  # [B, T]
    m = mask.to(torch.bool).contiguous().view(torch.uint8)  # [B, T]
    return _impl(chosen)(r, v, m, float(gamma), float(lam))
