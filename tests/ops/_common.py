"""Shared helpers of the fused-op tests: which backends run here, and float64 oracles."""

from __future__ import annotations

import os
import zlib
from contextlib import contextmanager

import torch

from hpc_rlhf.ops import _backend

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors in this process (triton only under the interpreter)."""
    out = ["torch"]
    if _backend.extension() is not None:
        out.append("cpp")
    if INTERPRET and _backend.triton_installed():
        out.append("triton")
    return out


BACKENDS = cpu_backends()

# (forward atol, gradient atol/rtol) per logits dtype, against float64 math on the same values
TOL = {
    torch.float32: dict(fwd=3e-5, grad_atol=1e-6, grad_rtol=1e-4),
    torch.bfloat16: dict(fwd=1e-4, grad_atol=1e-4, grad_rtol=1.6e-2),
    torch.float16: dict(fwd=1e-4, grad_atol=1e-5, grad_rtol=2e-3),
}


FP32_EPS = torch.finfo(torch.float32).eps


def stable_seed(*parts, modulo: int = 2**31 - 1) -> int:
    """A seed derived from a test's parameters, equal in every process: the CRC-32 of their
    ``repr`` (``hash`` of a str, or of a tuple holding one, is salted per process, so seeds
    drawn from it change between runs)."""
    return zlib.crc32(repr(parts).encode()) % modulo


@contextmanager
def seed_in_failures(seed: int):
    """Re-raise an ``AssertionError`` of the block with the seed of its inputs appended."""
    try:
        yield seed
    except AssertionError as err:
        raise AssertionError(f"{err}\n(inputs drawn with seed {seed})") from err


def assert_matmul_close(got: torch.Tensor, want64: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """``got`` (an fp32 product ``a @ b``, summed over ``K = a.shape[-1]``) against the
    float64 ``want64`` within the standard rounding-error bound of an fp32 dot product:
    ``|got - want| <= K * eps32 * (|a| @ |b|)`` element-wise (Higham, Accuracy and
    Stability of Numerical Algorithms, 3.1), plus the rounding of the result itself.

    The bound holds for any summation order, so it does not depend on which kernels
    (blocking, vector width, AMX/AVX-512) a CPU's oneDNN or MKL picks, while a wrong
    result (a missing transpose, a wrong row) is off by O(|a| |b|), far outside it."""
    K = a.shape[-1]
    scale64 = a.double().abs() @ b.double().abs()
    bound = K * FP32_EPS * scale64 + FP32_EPS * want64.abs() + 1e-30
    err = (got.double() - want64).abs()
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"error {float(err.max()):.3g} exceeds the fp32 bound (ratio {worst:.3g})"


def oracle_logprobs(logits, labels, g_lp, g_ent):
    """float64 log_softmax + gather and entropy, and d(sum g_lp*logp + g_ent*H)/d logits."""
    x = logits.detach().double().requires_grad_(True)
    logsm = torch.log_softmax(x, dim=-1)
    logp = logsm.gather(-1, labels[..., None])[..., 0]
    ent = -(logsm.exp() * logsm).sum(-1)
    ((logp * g_lp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    return logp.detach(), ent.detach(), x.grad


def oracle_gae(rewards, values, mask, gamma, lam):
    """Plain Python loop over the valid positions of each row, in float64."""
    b, t_len = rewards.shape
    adv = [[0.0] * t_len for _ in range(b)]
    ret = [[0.0] * t_len for _ in range(b)]
    r, v, m = rewards.double().tolist(), values.double().tolist(), mask.bool().tolist()
    for i in range(b):
        valid = [t for t in range(t_len) if m[i][t]]
        next_v = next_a = 0.0
        for t in reversed(valid):
            delta = r[i][t] + gamma * next_v - v[i][t]
            next_a = delta + gamma * lam * next_a
            next_v = v[i][t]
            adv[i][t], ret[i][t] = next_a, next_a + v[i][t]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def masked_mean64(per_token, mask, reduction):
    """token_mean / seq_mean of a float64 [B, T] tensor over mask (0 when nothing is valid)."""
    m = mask.double()
    if reduction == "token_mean":
        return (per_token * m).sum() / m.sum().clamp(min=1)
    rows = m.sum(1)
    keep = rows > 0
    if not keep.any():
        return (per_token * m).sum() * 0
    return ((per_token * m).sum(1)[keep] / rows[keep]).mean()


def oracle_ppo_loss(logp, old, adv, mask, clip_low, clip_high, dual_clip, reduction):
    """float64 PPO clipped (and dual-clipped) loss, d loss / d logp and the stats."""
    lp = logp.detach().double().requires_grad_(True)
    ratio = torch.exp(lp - old.double())
    a = adv.double()
    per = -torch.min(ratio * a, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * a)
    if dual_clip is not None:
        per = torch.where(a < 0, torch.min(per, -dual_clip * a), per)
    loss = masked_mean64(per, mask, reduction)
    loss.backward()
    m = mask.bool()
    clipped = (torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * a < ratio * a)[m]
    r = ratio.detach()[m]
    stats = {
        "clip_frac": clipped.double().mean() if m.any() else torch.tensor(0.0),
        "approx_kl": (old.double() - lp.detach())[m].mean() if m.any() else torch.tensor(0.0),
        "ratio_mean": r.mean() if m.any() else torch.tensor(0.0),
        "ratio_max": r.max() if m.any() else torch.tensor(0.0),
    }
    return loss.detach(), lp.grad, stats


def oracle_value_loss(values, old, returns, mask, clip, reduction):
    """float64 clipped value loss, d loss / d values and the stats."""
    v = values.detach().double().requires_grad_(True)
    r, o = returns.double(), old.double()
    sq = (v - r) ** 2
    per = sq
    if clip is not None:
        sq_clip = (torch.clamp(v, o - clip, o + clip) - r) ** 2
        per = torch.max(sq, sq_clip)
    loss = 0.5 * masked_mean64(per, mask, reduction)
    loss.backward()
    m = mask.bool()
    clipped = (per > sq).detach()[m]
    stats = {
        "clip_frac": clipped.double().mean() if m.any() else torch.tensor(0.0),
        "value_mean": v.detach()[m].mean() if m.any() else torch.tensor(0.0),
        "value_mse": sq.detach()[m].mean() if m.any() else torch.tensor(0.0),
    }
    return loss.detach(), v.grad, stats


def random_mask(b, t, gen, kind):
    """[B, T] bool masks: holes, left/right padding, a fully masked row, all valid."""
    if kind == "holes":
        mask = torch.rand(b, t, generator=gen) > 0.3
    elif kind == "left_pad":
        starts = torch.randint(0, t, (b,), generator=gen)
        mask = torch.arange(t)[None, :] >= starts[:, None]
    elif kind == "right_pad":
        ends = torch.randint(1, t + 1, (b,), generator=gen)
        mask = torch.arange(t)[None, :] < ends[:, None]
    else:
        mask = torch.ones(b, t, dtype=torch.bool)
    if b > 1:
        mask[1] = False  # one fully masked row
    return mask
