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


# ---------------------------------------------------------------- rounding-error bounds
# The GPU kernels compute in fp32 whatever the storage dtype; the bounds below are
# element-wise (float64) bounds of the error of fp32 math against a float64 oracle on the
# same (already rounded) inputs, from the magnitudes of the intermediate values. Relative
# errors are counted in units of eps32: one per rounding, ``2 + 1.2 |arg|`` for CUDA's fast
# ``__expf`` (its documented ulp bound; an exact exp has 1), ``sqrt(n)`` for a sum of ``n``
# terms (the rounding errors of a sum grow as a random walk). ``ROUNDING_FACTOR`` is the
# safety factor over these first-order estimates; a wrong kernel (a lost term, a wrong
# index, a missing rescale) is off by O(1) relative, orders of magnitude outside.
ROUNDING_FACTOR = 4.0


def assert_within(got: torch.Tensor, want64: torch.Tensor, bound64: torch.Tensor, what: str):
    """``|got - want| <= bound`` element-wise; the message names the worst element."""
    err = (got.detach().double().cpu() - want64.cpu()).abs()
    ratio = (err / bound64.cpu().clamp(min=1e-300)).reshape(-1)
    if ratio.numel() == 0:
        return
    worst = int(ratio.argmax())
    assert float(ratio[worst]) <= 1.0, (
        f"{what}: error {float(err.reshape(-1)[worst]):.3g} at flat index {worst} is "
        f"{float(ratio[worst]):.3g}x its rounding bound {float(bound64.reshape(-1)[worst]):.3g}"
    )


def stored_rounding(want64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Error of storing a result in ``dtype``: one rounding (half an ulp, eps/2 relative;
    eps allowed) plus the spacing of ``dtype``'s subnormals (results below its normal range)."""
    fi = torch.finfo(dtype)
    return fi.eps * want64.abs() + fi.smallest_normal * fi.eps


def logprob_error_bounds(logits, labels, g_lp, g_ent):
    """Bounds of the fp32-math errors of ``token_logprobs`` (log-prob ``[N]``, entropy
    ``[N]``, gradient of ``sum g_lp logp + g_ent H`` ``[N, V]``), before the gradient is
    stored in the logits' dtype (add ``stored_rounding``). Inputs flattened to rows."""
    V = logits.shape[-1]
    x = logits.detach().double().cpu().reshape(-1, V)
    lab = labels.cpu().reshape(-1, 1)
    glp = g_lp.detach().double().cpu().reshape(-1, 1).abs()
    gent = g_ent.detach().double().cpu().reshape(-1, 1).abs()
    m = x.amax(-1, keepdim=True)
    lse = torch.logsumexp(x, -1, keepdim=True)
    logp = x - lse
    p = logp.exp()
    H = -(p * logp).sum(-1, keepdim=True)
    # relative error of each probability exp(x - m) / sum: the exp's argument and result,
    # the sum over V, the log-sum-exp's own rounding
    rel_p = 2 + 1.2 * (x - m).abs() + V**0.5 + (lse - m).abs() + lse.abs()
    b_logp = rel_p.gather(1, lab) + x.gather(1, lab).abs()
    b_ent = (p * rel_p * x.abs()).sum(-1, keepdim=True) + lse.abs() + H.abs()
    onehot = torch.zeros_like(x).scatter_(1, lab, 1.0)
    b_grad = glp * (p * rel_p + onehot) + gent * p * (rel_p * ((logp + H).abs() + 1) + b_ent)
    k = ROUNDING_FACTOR * FP32_EPS
    return k * b_logp[:, 0], k * b_ent[:, 0], k * b_grad


def gae_error_bounds(rewards, values, mask, gamma, lam):
    """Bounds of the fp32 errors of GAE advantages and returns ``[B, T]``: each step's
    roundings (of delta = r + gamma v' - v and of a = delta + gamma lam a') plus the error
    carried from the next valid step, damped by gamma lam."""
    b, t_len = rewards.shape
    r, v, msk = rewards.double().tolist(), values.double().tolist(), mask.bool().tolist()
    gl = gamma * lam
    b_adv = [[0.0] * t_len for _ in range(b)]
    b_ret = [[0.0] * t_len for _ in range(b)]
    for i in range(b):
        next_v = next_a = next_e = 0.0
        for t in reversed([t for t in range(t_len) if msk[i][t]]):
            delta = r[i][t] + gamma * next_v - v[i][t]
            a = delta + gl * next_a
            local = abs(r[i][t]) + gamma * abs(next_v) + abs(v[i][t]) + abs(delta)
            e = local + gl * abs(next_a) + abs(a) + gl * next_e
            b_adv[i][t], b_ret[i][t] = e, e + abs(a + v[i][t])
            next_v, next_a, next_e = v[i][t], a, e
    k = ROUNDING_FACTOR * FP32_EPS
    return k * torch.tensor(b_adv, dtype=torch.float64), k * torch.tensor(
        b_ret, dtype=torch.float64
    )


def mean_weights(mask, reduction) -> torch.Tensor:
    """d(masked mean)/d(token) ``[B, T]`` (float64): 1 / valid tokens for token_mean, 1 /
    (valid rows x the row's valid tokens) for seq_mean; 0 at masked tokens."""
    m = mask.bool().cpu().double()
    if reduction == "token_mean":
        return m / m.sum().clamp(min=1)
    rows = m.sum(1, keepdim=True)
    return m / rows.clamp(min=1) / (rows > 0).sum().clamp(min=1)


def ppo_loss_error_bounds(logp, old, adv, mask, clip_high, dual_clip, reduction):
    """Bounds of the fp32 errors of ``ppo_policy_loss`` (loss, d loss / d logp ``[B, T]``):
    per token, ratio = exp(logp - old) (the argument's rounding, the exp) times the
    advantage; the loss adds a masked sum over the valid tokens."""
    lp, o, a = (t.detach().double().cpu() for t in (logp, old, adv))
    ratio = torch.exp(lp - o)
    rel = 4 + 1.2 * (lp.abs() + o.abs())
    mag = torch.clamp(ratio, min=1 + clip_high, max=None) * a.abs()
    if dual_clip is not None:
        mag = torch.maximum(mag, dual_clip * a.abs())
    w = mean_weights(mask, reduction)
    n = int(mask.bool().sum())
    k = ROUNDING_FACTOR * FP32_EPS
    b_loss = k * ((w * mag * rel).sum() + n**0.5 * (w * mag).sum()) + 1e-30
    return b_loss, k * rel * ratio * a.abs() * w + 1e-30


def value_loss_error_bounds(values, old, returns, mask, clip, reduction):
    """Bounds of the fp32 errors of ``value_loss`` (loss, d loss / d values ``[B, T]``):
    the differences v - R and clamp(v, old +- clip) - R, squared, and the masked sum."""
    v, o, r = (t.detach().double().cpu() for t in (values, old, returns))
    mag = v.abs() + r.abs() + o.abs() + (clip or 0.0)
    w = mean_weights(mask, reduction)
    n = int(mask.bool().sum())
    k = ROUNDING_FACTOR * FP32_EPS
    b_loss = k * (3 + n**0.5) * 0.5 * (w * mag**2).sum() + 1e-30
    return b_loss, k * 2 * mag * w + 1e-30


def swiglu_error_bounds(x, g):
    """Bounds of the fp32-math errors of ``swiglu`` (``silu(a) b`` and the gradient w.r.t.
    ``x = [a | b]`` of ``sum g y``), before they are stored in the input dtype: the sigmoid's
    exp (``2 + 1.2 |a|`` ulps) and a few products."""
    a64, b64 = x.detach().double().cpu().chunk(2, dim=-1)
    g64 = g.detach().double().cpu()
    s = torch.sigmoid(a64)
    rel = 4 + 1.2 * a64.abs()
    k = ROUNDING_FACTOR * FP32_EPS
    b_y = k * rel * (a64 * s * b64).abs()
    b_da = k * (rel + 2) * (g64 * b64).abs() * (s + a64.abs() * s * (1 - s))
    b_db = k * rel * (g64 * a64 * s).abs()
    return b_y, torch.cat([b_da, b_db], dim=-1)
