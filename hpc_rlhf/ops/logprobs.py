"""Token log-probabilities (and entropy) from logits, vocab-parallel aware.

Shapes: N = number of rows (all leading dims of ``logits`` flattened), V = vocabulary slice
held by this rank (``V_local``), the global vocabulary being ``V_local * tp_size``.

Every backend reduces one row of logits to four fp32 numbers in a single pass:
``m`` (row max), ``s = sum exp(x - m)``, ``t = sum exp(x - m) * (x - m)`` (only for entropy)
and ``xl`` (the label's logit when this rank owns it, else 0). ``_combine`` merges them
across the tensor-parallel group (all_reduce MAX of m, then SUM of the rescaled s, t, xl),
so no rank ever holds a [N, V_global] log-softmax. Then
``logp = (xl - m) - log s`` and ``entropy = log s - t / s``; m and log s stay separate (never
``lse = m + log s``) so that logits of magnitude 1e4 keep fp32 accuracy.

Backward recomputes ``log p = (x - m) - log s`` from the saved per-row m and log s (and the
entropy H): ``dx = -p * (g_logp + g_ent * (log p + H)) + g_logp * onehot(label)``; no
collective is needed because m, log s and H are already global.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hpc_rlhf.ops import _backend
from hpc_rlhf.parallel.comm import group_max, group_size, group_sum

_ROW_CHUNK_ELEMS = 1 << 24  # torch reference: rows per chunk * V stays below 64 MiB fp32


def _group_rank_size(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _row_chunks(n: int, v: int, elems: int = _ROW_CHUNK_ELEMS):
    step = max(1, elems // max(v, 1))
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def _fwd_torch(x, labels, vocab_start: int, entropy: bool):
    """Reference row statistics: x [N, V] any float, labels [N] int64 -> m, s, t|None, xl [N]."""
    n, v = x.shape
    m = torch.empty(n, dtype=torch.float32, device=x.device)
    s, xl = torch.empty_like(m), torch.empty_like(m)
    t = torch.empty_like(m) if entropy else None
    local = labels - vocab_start  # [N]
    owned = (local >= 0) & (local < v)  # [N]
    for r0, r1 in _row_chunks(n, v):
        xf = x[r0:r1].float()  # [n_chunk, V]
        m[r0:r1] = xf.amax(dim=-1)
        d = xf - m[r0:r1, None]
        e = d.exp()
        s[r0:r1] = e.sum(dim=-1)
        if t is not None:
            t[r0:r1] = (e * d).sum(dim=-1)
        idx = local[r0:r1].clamp(0, v - 1)[:, None]
        xl[r0:r1] = torch.where(owned[r0:r1], xf.gather(1, idx)[:, 0], 0.0)
    return m, s, t, xl


def _bwd_torch(x, labels, vocab_start: int, m, log_s, ent, g_lp, g_ent):
    """Reference gradient w.r.t. x [N, V] (x's dtype) from per-row m, log s, entropy, grads."""
    n, v = x.shape
    grad = torch.empty_like(x)
    local = labels - vocab_start
    owned = (local >= 0) & (local < v)
    for r0, r1 in _row_chunks(n, v):
        xf = x[r0:r1].float()  # [n_chunk, V]
        shifted = (xf - m[r0:r1, None]) - log_s[r0:r1, None]  # log p
        p = shifted.exp()
        coef = g_lp[r0:r1, None].expand_as(p)
        if g_ent is not None:
            coef = coef + g_ent[r0:r1, None] * (shifted + ent[r0:r1, None])
        g = -p * coef
        rows = torch.arange(r1 - r0, device=x.device)[owned[r0:r1]]
        cols = local[r0:r1][owned[r0:r1]]
        g[rows, cols] += g_lp[r0:r1][owned[r0:r1]]
        grad[r0:r1] = g.to(x.dtype)
    return grad


def _impl(backend: str):
    """(fwd, bwd) callables of a concrete backend, same signatures as the torch ones."""
    if backend == "torch":
        return _fwd_torch, _bwd_torch
    if backend == "triton":
        mod = _backend.kernels("logprobs")
        return mod.logprobs_fwd, mod.logprobs_bwd
    ext = _backend.built_extension()
    if backend == "cpp":
        return _wrap_ext(ext.logprobs_fwd_cpu), ext.logprobs_bwd_cpu
    return _wrap_ext(ext.logprobs_fwd_cuda), ext.logprobs_bwd_cuda


def _wrap_ext(fn):
    def fwd(x, labels, vocab_start, entropy):
        m, s, t, xl = fn(x, labels, vocab_start, entropy)
        return m, s, (t if entropy else None), xl

    return fwd


def _combine(m, s, t, xl, tp_group):
    """Merge per-rank row statistics -> (logp, m, log s, entropy|None), all fp32 [N]."""
    if group_size(tp_group) > 1:
        gm = group_max(m.clone(), tp_group)
        alpha = torch.exp(m - gm)
        parts = [s * alpha, xl]
        if t is not None:
            parts.append(alpha * (t + (m - gm) * s))
        stacked = torch.stack(parts)  # [2 or 3, N]
        group_sum(stacked, tp_group)
        m, s, xl = gm, stacked[0], stacked[1]
        t = stacked[2] if t is not None else None
    log_s = torch.log(s)
    ent = log_s - t / s if t is not None else None
    return (xl - m) - log_s, m, log_s, ent


_INPLACE_CHUNK_ELEMS = 1 << 22  # in-place backward: rows per chunk * V stays below 16 MiB fp32


def _bwd_into_logits(bwd, x, lab, vocab_start, m, log_s, ent, g_lp, g_ent):
    """The backward written over ``x`` [N, V] chunk by chunk: only a chunk-sized buffer
    besides the logits instead of a second [N, V] tensor."""
    n, v = x.shape
    for r0, r1 in _row_chunks(n, v, _INPLACE_CHUNK_ELEMS):
        rows = slice(r0, r1)
        part = bwd(
            x[rows],
            lab[rows],
            vocab_start,
            m[rows],
            log_s[rows],
            ent[rows] if ent is not None else None,
            g_lp[rows],
            g_ent[rows] if g_ent is not None else None,
        )
        x[rows].copy_(part)
    return x


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, tp_group, entropy, backend, inplace_grad):
        v = logits.shape[-1]
        x = logits.reshape(-1, v).contiguous()  # [N, V]
        lab = labels.reshape(-1).to(torch.int64).contiguous()  # [N]
        rank, _ = _group_rank_size(tp_group)
        fwd, bwd = _impl(backend)
        m, s, t, xl = fwd(x, lab, rank * v, entropy)
        logp, m, log_s, ent = _combine(m, s, t, xl, tp_group)
        ctx.save_for_backward(x, lab, m, log_s, ent)
        ctx.meta = (bwd, rank * v, logits.shape, inplace_grad)
        ctx.set_materialize_grads(False)
        out_shape = labels.shape
        if entropy:
            return logp.view(out_shape), ent.view(out_shape)
        return logp.view(out_shape)

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        x, lab, m, log_s, ent = ctx.saved_tensors
        bwd, vocab_start, shape, inplace = ctx.meta
        if g_lp is None and g_ent is None:
            return None, None, None, None, None, None
        g_lp = torch.zeros_like(m) if g_lp is None else g_lp.reshape(-1).float().contiguous()
        if g_ent is not None:
            g_ent = g_ent.reshape(-1).float().contiguous()
        ent = ent if g_ent is not None else None
        if inplace:
            grad = _bwd_into_logits(bwd, x, lab, vocab_start, m, log_s, ent, g_lp, g_ent)
        else:
            grad = bwd(x, lab, vocab_start, m, log_s, ent, g_lp, g_ent)
        return grad.view(shape), None, None, None, None, None


def _check_label_range(labels: torch.Tensor, vocab: int) -> None:
    """``ValueError`` naming the range of ``labels`` when one is outside ``[0, vocab)``
    (one min/max pass over the labels)."""
    if labels.numel() == 0:
        return
    low, high = (int(x) for x in torch.aminmax(labels))
    if low < 0 or high >= vocab:
        raise ValueError(
            f"token_logprobs: labels must be token ids in [0, {vocab}) (the vocabulary), got "
            f"ids in [{low}, {high}]"
        )


def token_logprobs(
    logits, labels, *, tp_group=None, return_entropy=False, backend="auto", inplace_grad=False
):
    """Log-probability of each label under ``softmax(logits)``, optionally with entropy.

    Args:
        logits: ``[..., V_local]`` fp32/bf16/fp16. With ``tp_group`` this rank holds the
            contiguous vocabulary shard ``[rank * V_local, (rank + 1) * V_local)``.
        labels: ``[...]`` int64 ids in the global vocabulary (``0 <= label < V``).
        tp_group: tensor-parallel process group the vocabulary is split over, or None.
        return_entropy: also return the entropy of each row's distribution.
        backend: "auto", "torch", "cpp", "cuda" or "triton" (see ``hpc_rlhf.ops._backend``).
        inplace_grad: the backward overwrites ``logits`` with their gradient (one [N, V]
            buffer less at the memory peak of an LM-head micro-batch). Only for logits that
            nothing else reads in backward: autograd raises if a later backward needs them.

    Returns:
        fp32 ``[...]`` log-probs, or ``(logp, entropy)`` when ``return_entropy``. Both are
        differentiable w.r.t. ``logits`` (gradient in the logits' dtype). The result equals
        the unsharded computation; only per-row max and sums cross ranks.

    Raises:
        ValueError: a label outside the global vocabulary ``[0, V_local * tp_size)`` (the
            backends would return a silent, wrong value for it). Callers pass real token ids
            everywhere, padding positions included (the pad id, masked afterwards).
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match logits[:-1] {tuple(logits.shape)}"
        )
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"logits must be fp32, bf16 or fp16, got {logits.dtype}")
    _check_label_range(labels, logits.shape[-1] * group_size(tp_group))
    chosen = _backend.resolve("token_logprobs", backend, logits.device)
    return _TokenLogprobs.apply(
        logits, labels, tp_group, bool(return_entropy), chosen, bool(inplace_grad)
    )
