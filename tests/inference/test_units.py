"""Pieces of the engine without a process group: decode attention, allocator, sampler."""

from __future__ import annotations

import math

import pytest
import torch

from hpc_rlhf.inference.attention import (
    build_decode_meta,
    decode_attention_cpp,
    decode_attention_torch,
    prefill_attention_cpp,
    prefill_attention_torch,
)
from hpc_rlhf.inference.kv_cache import BlockAllocator
from hpc_rlhf.inference.sampling import (
    SamplingParams,
    candidate_distribution,
    inverse_cdf,
    sample_tokens,
)
from hpc_rlhf.ops import _backend


def _dense_reference(q_BHD, k_pool, v_pool, tables, lens, S, window=None):
    """Gather each sequence's history (its latest ``window`` positions with a sliding
    window) and attend with plain softmax (fp64)."""
    out = []
    B, Hq, D = q_BHD.shape
    G = k_pool.shape[1]
    for b, (table, n) in enumerate(zip(tables, lens)):
        first = 0 if window is None else max(0, n - window)
        k_GLD = torch.cat([k_pool[blk] for blk in table], dim=1)[:, first:n].double()
        v_GLD = torch.cat([v_pool[blk] for blk in table], dim=1)[:, first:n].double()
        k_HLD = k_GLD.repeat_interleave(Hq // G, dim=0)
        v_HLD = v_GLD.repeat_interleave(Hq // G, dim=0)
        q_H1D = q_BHD[b].double()[:, None]
        p_H1L = torch.softmax(q_H1D @ k_HLD.transpose(-1, -2) / math.sqrt(D), dim=-1)
        out.append((p_H1L @ v_HLD)[:, 0].reshape(-1))
    return torch.stack(out)


DECODE_FNS = {"torch": decode_attention_torch, "cpp": decode_attention_cpp}
DECODE_BACKENDS = ["torch"] + (["cpp"] if _backend.extension() is not None else [])


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
@pytest.mark.parametrize("G,g", [(2, 1), (2, 3)])
def test_decode_attention_matches_dense_with_shared_blocks(backend, G, g):
    torch.manual_seed(0)
    S, D, N = 4, 8, 12
    k_pool = torch.randn(N, G, S, D)
    v_pool = torch.randn(N, G, S, D)
    # Sequences 0-2 share blocks 0 and 1 (a prompt's samples); 3 is alone, out of order.
    tables = [[0, 1, 2], [0, 1, 5], [0, 1], [9, 3, 7, 4]]
    lens = [11, 9, 6, 14]
    q_BHD = 4.0 * torch.randn(len(tables), G * g, D)  # peaked scores: block maxima move
    meta = build_decode_meta(tables, lens, S)
    assert meta.max_owners == 3 and meta.num_blocks_used == 10
    if backend == "cpp":  # slots past a sequence's length are never read: NaN there is fine
        for pool in (k_pool, v_pool):
            pool[2, :, 3:] = float("nan")
            pool[5, :, 1:] = float("nan")
            pool[4, :, 2:] = float("nan")
    if backend != "torch":  # the paged kernel reads the tables only, as the engine builds it
        meta = build_decode_meta(tables, lens, S, block_rows=False)
        assert meta.q_source_NO is None
    got = DECODE_FNS[backend](q_BHD, k_pool, v_pool, meta)
    want = _dense_reference(q_BHD, k_pool, v_pool, tables, lens, S)
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()


@pytest.mark.skipif(_backend.extension() is None, reason="hpc_rlhf._C not built")
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
def test_cpp_decode_attention_reads_a_bf16_pool_in_place(q_dtype):
    """A bf16 pool (as a bf16 engine's cache) read in place with fp32 math: against fp64
    math on the same bf16 values, the output is off by its own rounding to the query's
    dtype (bf16: 2^-8 relative at worst) plus fp32 accumulation."""
    torch.manual_seed(1)
    S, D, N, G, g = 4, 32, 12, 2, 3
    k_pool = torch.randn(N, G, S, D).bfloat16()
    v_pool = torch.randn(N, G, S, D).bfloat16()
    tables = [[0, 1, 2], [0, 1, 5], [9, 3, 7, 4]]
    lens = [11, 9, 14]
    q_BHD = (2.0 * torch.randn(len(tables), G * g, D)).to(q_dtype)
    meta = build_decode_meta(tables, lens, S, block_rows=False)
    got = decode_attention_cpp(q_BHD, k_pool, v_pool, meta)
    assert got.dtype == q_dtype
    want = _dense_reference(q_BHD, k_pool, v_pool, tables, lens, S)
    rel = 2**-8 if q_dtype == torch.bfloat16 else 1e-5
    bound = rel * (want.abs() + 0.01 * want.abs().max())
    assert bool(((got.double() - want).abs() <= bound).all()), (got.double() - want).abs().max()


@pytest.mark.parametrize("window", [1, 5, 13])
def test_decode_attention_with_a_sliding_window_reads_the_latest_positions(window):
    """Mistral's window in the torch paged decode (shared blocks, windows shorter than a
    block, across blocks, longer than some sequences); the C++ kernel refuses one."""
    torch.manual_seed(1)
    S, D, N, G, g = 4, 8, 12, 2, 2
    k_pool, v_pool = torch.randn(N, G, S, D), torch.randn(N, G, S, D)
    tables = [[0, 1, 2], [0, 1, 5], [0, 1], [9, 3, 7, 4]]
    lens = [11, 9, 6, 14]
    q_BHD = 4.0 * torch.randn(len(tables), G * g, D)
    meta = build_decode_meta(tables, lens, S, window=window)
    got = decode_attention_torch(q_BHD, k_pool, v_pool, meta)
    want = _dense_reference(q_BHD, k_pool, v_pool, tables, lens, S, window)
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()
    if _backend.extension() is not None:
        with pytest.raises(ValueError, match="no sliding window"):
            decode_attention_cpp(q_BHD, k_pool, v_pool, meta)


@pytest.mark.skipif(_backend.extension() is None, reason="hpc_rlhf._C not built")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B", [1, 3, 9])
def test_cpp_decode_attention_per_sequence_and_per_head_tasks(threads, B):
    """The kernel runs one task per sequence when B >= 2 x threads, else one per (sequence,
    KV head): both must give the dense answer, with GQA and ragged lengths."""
    gen = torch.Generator().manual_seed(B)
    G, g, S, D, N = 3, 2, 4, 16, 40
    k_pool, v_pool = torch.randn(2, N, G, S, D, generator=gen)
    perm = torch.randperm(N, generator=gen).tolist()
    tables = [perm[4 * b : 4 * b + 4] for b in range(B)]
    lens = [1 + (5 * b + 3) % 16 for b in range(B)]
    q_BHD = 3.0 * torch.randn(B, G * g, D, generator=gen)
    meta = build_decode_meta(tables, lens, S, block_rows=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = decode_attention_cpp(q_BHD, k_pool, v_pool, meta)
    finally:
        torch.set_num_threads(previous)
    want = _dense_reference(q_BHD, k_pool, v_pool, tables, lens, S)
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()


def test_allocator_lowest_first_refcounts():
    alloc = BlockAllocator(4)
    a, b = alloc.allocate(), alloc.allocate()
    assert (a, b) == (0, 1)
    alloc.share(a)
    alloc.free(a)
    assert alloc.refcount(a) == 1 and alloc.num_free == 2
    alloc.free(a)
    assert alloc.allocate() == 0 and alloc.used_range() == 2
    with pytest.raises(RuntimeError):
        alloc.free(3)


def test_top_k_top_p_candidates_and_logprobs():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    probs, ids = candidate_distribution(logits, top_k=3, top_p=1.0)
    assert ids[0].tolist() == [5, 0, 1]
    assert torch.allclose(probs.sum(-1), torch.ones(1))
    probs, ids = candidate_distribution(logits, top_k=0, top_p=0.5)
    kept = ids[0][probs[0] > 0].tolist()
    assert kept == [5]  # p(5) = 0.63 >= 0.5 on its own
    params = SamplingParams(temperature=0.7, top_k=3, seed=1)
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    tokens, logp, slogp = sample_tokens(logits.expand(200, -1), params, gens)
    assert set(tokens.tolist()) <= {5, 0, 1} and len(set(tokens.tolist())) == 3
    assert torch.allclose(logp, torch.log_softmax(logits[0] / 0.7, -1)[tokens])
    assert bool((slogp > logp).all())


def test_full_vocabulary_sampling_follows_softmax():
    logits = torch.tensor([[1.5, 0.0, -0.5, 2.0, -30.0]])
    params = SamplingParams(temperature=0.8, seed=0)
    n = 4000
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    tokens, logp, slogp = sample_tokens(logits.expand(n, -1), params, gens)
    want = torch.softmax(logits[0] / 0.8, -1)
    freq = torch.bincount(tokens, minlength=5).double() / n
    # binomial standard error of each frequency is below 0.008 at n = 4000
    assert torch.allclose(freq, want.double(), atol=0.03), (freq, want)
    assert torch.allclose(logp, torch.log_softmax(logits[0] / 0.8, -1)[tokens], atol=1e-6)
    assert torch.equal(slogp, logp)  # untruncated: the sampling law is the policy


def test_inverse_cdf_never_picks_a_zero_weight():
    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0, 0.0]] * 3, dtype=torch.float32)
    u = torch.tensor([0.0, 0.5, 1.0 - 1e-17], dtype=torch.float64)  # last: rounds to the end
    assert inverse_cdf(weights, u).tolist() == [1, 1, 3]


@pytest.mark.parametrize("C", [32000, 5000, 2049])
def test_two_level_inverse_cdf_equals_the_flat_search(C):
    """Wide rows search block totals first; the pick must be the flat float64 scan's."""
    from hpc_rlhf.inference.sampling import _search_cdf

    gen = torch.Generator().manual_seed(C)
    B = 256
    weights = torch.rand(B, C, generator=gen) ** 8  # peaked, many near-zero
    weights[weights < 0.05] = 0.0  # exact zeros, whole zero blocks in some rows
    weights[: B // 4, 1024:4096] = 0.0
    weights[B // 4 : B // 2, : C - 7] = 0.0  # all mass in the last columns
    weights[:, -1] += 0.01  # (every row has some mass, as softmax weights do)
    u = torch.rand(B, generator=gen, dtype=torch.float64)
    u[:3] = torch.tensor([0.0, 1.0 - 1e-17, 0.5])
    got = inverse_cdf(weights, u)
    assert torch.equal(got, _search_cdf(weights, u_B=u))
    assert bool((weights.gather(1, got[:, None]) > 0).all())


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0).validate()
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0.0).validate()
    SamplingParams(greedy=True, temperature=0.0).validate()


@pytest.mark.parametrize("gemm", ["torch", "auto"])
def test_lm_head_forms_agree_for_every_row_count(gemm):
    """The torch GEMM path switches to (w h^T)^T below 64 rows; oneDNN (auto) never does."""
    from hpc_rlhf.inference.forward import lm_head
    from hpc_rlhf.ops import cpu_gemm

    previous = cpu_gemm.get_backend()
    cpu_gemm.set_backend(gemm)
    try:
        _check_lm_head_rows(lm_head)
    finally:
        cpu_gemm.set_backend(previous)


def _check_lm_head_rows(lm_head):
    gen = torch.Generator().manual_seed(0)
    w_vH = torch.randn(1000, 64, generator=gen)
    for rows in (1, 5, 63, 64, 130):
        h_RH = torch.randn(rows, 64, generator=gen)
        got = lm_head(h_RH, w_vH)
        assert got.shape == (rows, 1000) and got.is_contiguous()
        torch.testing.assert_close(got, h_RH.double().matmul(w_vH.double().t()).float())


@pytest.mark.skipif(_backend.extension() is None, reason="hpc_rlhf._C not built")
def test_cpp_decode_attention_refuses_lengths_past_the_table():
    k_pool = torch.zeros(3, 1, 4, 8)
    meta = build_decode_meta([[0, 1]], [9], 4)  # 9 tokens need 3 blocks of 4
    with pytest.raises(RuntimeError, match="exceeds its block table"):
        decode_attention_cpp(torch.zeros(1, 2, 8), k_pool, k_pool, meta)


@pytest.mark.parametrize("prefill", [prefill_attention_torch, prefill_attention_cpp])
@pytest.mark.parametrize("window", [None, 6])
def test_prefill_attention_matches_per_sequence_float64(prefill, window):
    """Packed prompts of 5, 1 and 40 tokens, 4 query heads over 2 KV heads (and a sliding
    window of 6: the C++ path then runs the reference)."""
    gen = torch.Generator().manual_seed(11)
    lens, Hq, G, D = [5, 1, 40], 4, 2, 16
    q, k, v = (torch.randn(sum(lens), h, D, generator=gen) for h in (Hq, G, G))
    out = prefill(q, k, v, lens, window)
    start = 0
    for n in lens:
        qs = q[start : start + n].double().transpose(0, 1)  # [Hq, n, D]
        ks = k[start : start + n].double().transpose(0, 1).repeat_interleave(Hq // G, 0)
        vs = v[start : start + n].double().transpose(0, 1).repeat_interleave(Hq // G, 0)
        scores = qs @ ks.transpose(1, 2) / math.sqrt(D)
        above = torch.ones(n, n, dtype=torch.bool).triu(1)
        if window is not None:
            above |= torch.ones(n, n, dtype=torch.bool).tril(-window)
        want = (scores.masked_fill(above, float("-inf")).softmax(-1) @ vs).transpose(0, 1)
        got = out[start : start + n].view(n, Hq, D).double()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        start += n
