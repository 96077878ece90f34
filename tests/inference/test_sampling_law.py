"""``sample_tokens`` draws from the truncated, renormalised distribution it claims to.

For each setting, many seeded draws from one row of logits are compared with a reference
law computed here independently, in float64 Python (sort, softmax, keep the top-k, keep the
top-p prefix whose mass *before* each token is below ``top_p``, renormalise):

* no draw falls outside the kept set (exact);
* the frequencies pass Pearson's chi-square goodness-of-fit test at ``P_MIN`` (categories
  with a small expected count are merged with their neighbours in probability order, so
  every bin expects at least ``MIN_EXPECTED`` draws);
* the returned log-probs are the policy's (full softmax at the temperature) and the
  sampling log-probs the reference law's, within fp32 rounding.

The wide settings (5000-token vocabulary) have more than 2 x 1024 candidates, so
``inverse_cdf`` takes its two-level path (block totals, then a search inside one block):
a nucleus of thousands of tokens spanning several blocks, a top-k of 3000 (a partial last
block) and untruncated sampling over the raw vocabulary order.
"""

from __future__ import annotations

import math

import pytest
import torch

from hpc_rlhf.inference.sampling import _CDF_BLOCK, SamplingParams, sample_tokens

P_MIN = 1e-3  # reject the sampler when the chi-square p-value is below this
MIN_EXPECTED = 20  # draws expected per chi-square bin
EPS32 = torch.finfo(torch.float32).eps

# name: (vocabulary, logit scale, temperature, top_k, top_p target, draws); the wide
# vocabularies have flat logits so that thousands of tokens make the nucleus
CASES = {
    "top_k": (64, 2.0, 0.7, 10, 1.0, 20000),
    "top_p": (64, 2.0, 1.0, 0, 0.8, 20000),
    "top_k_top_p": (64, 2.0, 1.3, 20, 0.7, 20000),
    "wide_top_p": (5000, 0.3, 1.0, 0, 0.9, 12000),
    "wide_top_k_top_p": (5000, 0.3, 0.8, 3000, 0.95, 12000),
    "wide_untruncated": (5000, 2.0, 1.0, 0, 1.0, 12000),
}


def _top_k_law(logits: list[float], temperature: float, top_k: int) -> list[tuple[int, float]]:
    """(token, probability) of the top-k tokens, renormalised, by decreasing probability."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    if top_k:
        order = order[:top_k]
    top = scaled[order[0]]
    weights = [math.exp(scaled[i] - top) for i in order]
    total = math.fsum(weights)
    return [(token, w / total) for token, w in zip(order, weights)]


def reference_law(logits: list[float], temperature: float, top_k: int, top_p: float):
    """{token: probability} of the truncated, renormalised distribution (float64): keep
    tokens in decreasing probability while the mass before them is below ``top_p``."""
    kept, mass = [], 0.0
    for token, p in _top_k_law(logits, temperature, top_k):
        if mass >= top_p:
            break
        kept.append((token, p))
        mass += p
    z = math.fsum(p for _, p in kept)
    return {token: p / z for token, p in kept}


def centred_top_p(logits: list[float], temperature: float, top_k: int, target: float):
    """A ``top_p`` near ``target`` in the middle of a boundary token's mass (the last kept
    token's cumulative mass interval), so rounding of the cumulative sum cannot move the
    cut; returns (top_p, its distance to the nearest cumulative mass)."""
    if target >= 1.0:
        return 1.0, math.inf
    before = 0.0
    for _, p in _top_k_law(logits, temperature, top_k):
        if before + p >= target:
            return before + p / 2, p / 2
        before += p
    raise AssertionError("target mass not reached")


def chi_square_p_value(counts: dict, law: dict, draws: int) -> tuple[float, int]:
    """Pearson's chi-square p-value of the counts of the kept tokens against ``law``, with
    neighbouring categories (in decreasing probability) merged until each bin expects
    ``MIN_EXPECTED`` draws; returns (p-value, bins)."""
    observed, expected = [], []
    obs = exp = 0.0
    for token, p in sorted(law.items(), key=lambda kv: -kv[1]):
        obs += counts.get(token, 0)
        exp += p * draws
        if exp >= MIN_EXPECTED:
            observed.append(obs)
            expected.append(exp)
            obs = exp = 0.0
    if exp > 0:  # a small tail joins the last bin
        observed[-1] += obs
        expected[-1] += exp
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    dof = len(observed) - 1
    p_value = torch.special.gammaincc(
        torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)
    )
    return float(p_value), len(observed)


def fp32_bound(terms: int, magnitude: float) -> float:
    """Rounding error of an fp32 log-prob from a sum of ``terms`` positive values (relative
    error ~ eps32 x sqrt(terms), a random walk, x4 for margin) plus the rounding of values of
    ``magnitude`` (the scaled logits and the log-sum-exp)."""
    return 4 * EPS32 * (math.sqrt(terms) + 2 * magnitude)


def _draw(logits_V: torch.Tensor, params: SamplingParams, draws: int, chunk: int = 2000):
    """``draws`` samples of one row (in batches of ``chunk`` rows sharing one generator)."""
    gen = torch.Generator().manual_seed(params.seed)
    outs = []
    for start in range(0, draws, chunk):
        rows = min(chunk, draws - start)
        outs.append(sample_tokens(logits_V.expand(rows, -1), params, [gen] * rows))
    return [torch.cat(parts) for parts in zip(*outs)]


@pytest.mark.parametrize("name", list(CASES))
def test_sampling_frequencies_follow_the_truncated_law(name):
    V, scale, temperature, top_k, top_p, draws = CASES[name]
    seed = 1000 + list(CASES).index(name)
    logits_V = scale * torch.randn(V, generator=torch.Generator().manual_seed(seed))
    logits = logits_V.double().tolist()
    top_p, margin = centred_top_p(logits, temperature, top_k, top_p)
    # beyond fp32 rounding of the cumulative mass (a random walk: ~eps32 x sqrt(candidates))
    assert margin > 4 * EPS32 * math.sqrt(V), (name, margin)
    law = reference_law(logits, temperature, top_k, top_p)
    if V > 2 * _CDF_BLOCK:  # the two-level search with a threshold past the first block
        assert len(law) > 2 * _CDF_BLOCK, len(law)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    tokens, logp, slogp = _draw(logits_V, params, draws)
    ids = tokens.tolist()
    counts: dict[int, int] = {}
    for t in ids:
        counts[t] = counts.get(t, 0) + 1
    assert set(counts) <= set(law), (name, seed, sorted(set(counts) - set(law))[:10])
    p_value, bins = chi_square_p_value(counts, law, draws)
    assert bins > 5 and p_value > P_MIN, (name, seed, p_value, bins)
    # Log-probs within fp32 rounding (``fp32_bound``): the policy's log_softmax (logit minus
    # log-sum-exp over V), the sampling law's log of a renormalised probability (a sum over
    # the candidates, then a division).
    policy_V = torch.log_softmax(logits_V.double() / temperature, dim=-1)
    err = (logp.double() - policy_V[tokens]).abs().max().item()
    assert err <= fp32_bound(V, policy_V.abs().max().item()), (name, err)
    want = torch.tensor([math.log(law[t]) for t in ids], dtype=torch.float64)
    err = (slogp.double() - want).abs().max().item()
    assert err <= fp32_bound(len(law), 1.0), (name, err)
