"""Sampling parameters, completions and the batched, per-sequence-seeded token sampler.

Legend: ``B`` running sequences, ``V`` full vocabulary, ``C`` candidate tokens of a truncated
distribution (the top-k, or the whole vocabulary sorted for top-p).

What the two log-probs of a ``Completion`` mean (``T`` = temperature, 1 for greedy):

* ``logprobs[t]`` = ``log_softmax(logits_t / T)[token_t]``: the log-prob of the sampled token
  under the *policy* (the model's full softmax at temperature ``T``), whatever top-k / top-p
  did. This is what PPO's importance ratio and KL need; it matches a teacher-forced forward of
  the actor (``log_softmax(logits / T)``) on the same tokens.
* ``sampling_logprobs[t]``: the log-prob under the distribution actually sampled from: the
  softmax at temperature ``T`` restricted to the top-k tokens, then to the top-p nucleus of
  that, renormalised. It equals ``logprobs[t]`` when neither top-k nor top-p is active, is
  ``>= logprobs[t]`` otherwise, and is 0 for greedy decoding (a point mass).

Top-k keeps the ``k`` largest logits (ties at the boundary broken by ``torch.topk``). Top-p is
applied after top-k, on the renormalised top-k distribution: tokens sorted by probability are
kept while the probability mass *before* them is ``< top_p`` (so the most likely token is
always kept and the kept mass is the smallest prefix reaching ``top_p``).

Reproducibility: every sequence owns a ``torch.Generator`` seeded from
``(seed, prompt index, sample index)``; it is advanced exactly once per sampled token (one
uniform draw, inverse-CDF sampling), so a sequence's tokens do not depend on which other
sequences share its batch or on preemption (up to floating-point rounding differences of the
logits between batch shapes, which only matter on exact probability ties).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hpc_rlhf.ops import token_logprobs

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``greedy=True`` ignores temperature/top-k/top-p/seed."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1  # samples per prompt (share the prompt's prefill and KV blocks)
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for impossible values."""
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"SamplingParams.temperature={self.temperature} must be > 0")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n={self.n} must be >= 1")

    @property
    def effective_temperature(self) -> float:
        """The temperature the policy log-probs are computed at (1 for greedy)."""
        return 1.0 if self.greedy else float(self.temperature)


@dataclass
class Completion:
    """One generated sample: new tokens, their log-probs and why generation stopped."""

    prompt_index: int
    sample_index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # policy: log_softmax(logits / T)
    sampling_logprobs: list[float] = field(default_factory=list)  # truncated distribution
    finish_reason: str | None = None  # "stop" | "length"


def sequence_generator(seed: int, prompt_index: int, sample_index: int) -> torch.Generator:
    """The CPU generator of one sequence, seeded from ``(seed, prompt, sample)`` only."""
    mixed = (seed * 1_000_003 + prompt_index) * 1_000_033 + sample_index
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


def draw_uniforms(
    generators: list[torch.Generator | None], device: torch.device | None = None
) -> torch.Tensor:
    """One uniform in [0, 1) per sequence, each from its own (CPU) generator, float64 [B],
    placed on ``device`` (the logits' device): the draws are the same on every device."""
    u_B = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    return u_B if device is None else u_B.to(device)


def candidate_distribution(
    scaled_BV: torch.Tensor, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The truncated sampling distribution: (probs ``[B, C]``, token ids ``[B, C]``), the
    candidates in descending order of probability, renormalised over the kept tokens.
    (Untruncated sampling never comes here: ``sample_tokens`` samples the softmax directly.)
    """
    V = scaled_BV.shape[-1]
    if top_k and top_k < V:
        vals_BC, ids_BC = torch.topk(scaled_BV, top_k, dim=-1)  # sorted, descending
    else:
        vals_BC, ids_BC = torch.sort(scaled_BV, dim=-1, descending=True)
    probs_BC = torch.softmax(vals_BC, dim=-1)
    if top_p < 1.0:
        mass_before_BC = torch.cumsum(probs_BC, dim=-1) - probs_BC
        probs_BC = probs_BC * (mass_before_BC < top_p)
        probs_BC = probs_BC / probs_BC.sum(dim=-1, keepdim=True)
    return probs_BC, ids_BC


# Column block of the two-level search (a [B, 1024] float64 scan per step instead of [B, V]).
_CDF_BLOCK = 1024


def inverse_cdf(weights_BC: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Index ``i`` of each row with ``cdf[i-1] <= u * total < cdf[i]`` over non-negative,
    not necessarily normalised ``weights_BC``; never a zero-weight index.

    Wide rows (a full vocabulary) are searched in two levels: float64 totals of blocks of
    ``_CDF_BLOCK`` columns pick the block holding the threshold, then a cumulative sum over
    that block alone finds the index, instead of a float64 copy and scan of the whole
    ``[B, V]`` matrix at every decoding step."""
    B, C = weights_BC.shape
    if C <= 2 * _CDF_BLOCK:
        return _search_cdf(weights_BC, u_B=u_B)
    nb, full = -(-C // _CDF_BLOCK), (C // _CDF_BLOCK) * _CDF_BLOCK
    block_sums_BN = weights_BC.new_zeros(B, nb, dtype=torch.float64)
    block_sums_BN[:, : C // _CDF_BLOCK] = (
        weights_BC[:, :full].view(B, -1, _CDF_BLOCK).sum(dim=-1, dtype=torch.float64)
    )
    if full < C:
        block_sums_BN[:, -1] = weights_BC[:, full:].sum(dim=-1, dtype=torch.float64)
    block_cdf_BN = torch.cumsum(block_sums_BN, dim=-1)
    threshold_B = u_B * block_cdf_BN[:, -1]
    block_B = torch.searchsorted(block_cdf_BN, threshold_B[:, None], right=True)[:, 0]
    block_B = _clamp_to_last_positive(block_B, block_sums_BN)  # threshold rounded past the end
    # mass before the block, exactly the entry searchsorted compared (so threshold >= it)
    before_BN = torch.cat([block_cdf_BN.new_zeros(B, 1), block_cdf_BN[:, :-1]], dim=1)
    before_B = before_BN.gather(1, block_B[:, None])[:, 0]
    cols_BK = block_B[:, None] * _CDF_BLOCK + torch.arange(_CDF_BLOCK)  # [B, K]
    inside_BK = cols_BK < C
    block_w_BK = weights_BC.gather(1, cols_BK.clamp(max=C - 1)) * inside_BK
    local_B = _search_cdf(block_w_BK, threshold_B=threshold_B - before_B)
    return block_B * _CDF_BLOCK + local_B


def _search_cdf(weights_BC, u_B=None, threshold_B=None) -> torch.Tensor:
    """First index whose float64 running sum exceeds ``threshold_B`` (or ``u_B`` times the
    row total), clamped to the row's last positive weight."""
    cdf_BC = torch.cumsum(weights_BC, dim=-1, dtype=torch.float64)
    threshold_B1 = (u_B * cdf_BC[:, -1] if threshold_B is None else threshold_B).unsqueeze(-1)
    choice_B = torch.searchsorted(cdf_BC, threshold_B1, right=True).squeeze(-1)
    # A zero weight never holds the first cdf entry above the threshold, except when rounding
    # puts the threshold at the very end (choice == C): take the last token with mass then.
    if bool((choice_B >= weights_BC.shape[-1]).any()):
        choice_B = _clamp_to_last_positive(choice_B, weights_BC)
    return choice_B


def _clamp_to_last_positive(choice_B: torch.Tensor, weights_BC: torch.Tensor) -> torch.Tensor:
    """``choice_B`` capped at each row's last column with positive weight."""
    cols_C = torch.arange(weights_BC.shape[-1])
    return torch.minimum(choice_B, torch.where(weights_BC > 0, cols_C, -1).amax(dim=-1))


def sample_tokens(
    logits_BV: torch.Tensor, params: SamplingParams, generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick one token per row: (tokens ``[B]``, policy log-probs ``[B]``, sampling log-probs).

    ``logits_BV`` are the full-vocabulary logits (fp32). See the module docstring for what
    the two log-probs mean. Every non-greedy row consumes exactly one draw of its generator.
    Policy log-probs come from the fused ``hpc_rlhf.ops.token_logprobs`` (no [B, V]
    log-softmax).
    """
    logits_BV = logits_BV.float()
    if params.greedy:
        tokens_B = logits_BV.argmax(dim=-1)
        return tokens_B, token_logprobs(logits_BV, tokens_B), logits_BV.new_zeros(len(tokens_B))
    T = params.temperature
    scaled_BV = logits_BV if T == 1.0 else logits_BV / T
    truncated = (params.top_k and params.top_k < scaled_BV.shape[-1]) or params.top_p < 1.0
    if not truncated:  # sample from exp(x - max) directly: the policy is the sampling law
        max_B1 = scaled_BV.amax(dim=-1, keepdim=True)
        weights_BV = (scaled_BV - max_B1).exp_()
        tokens_B = inverse_cdf(weights_BV, draw_uniforms(generators, logits_BV.device))
        logp_B = token_logprobs(scaled_BV, tokens_B)
        return tokens_B, logp_B, logp_B.clone()
    probs_BC, ids_BC = candidate_distribution(scaled_BV, params.top_k, params.top_p)
    choice_B = inverse_cdf(probs_BC, draw_uniforms(generators, logits_BV.device))
    sampling_logp_B = probs_BC.gather(1, choice_B[:, None])[:, 0].log()
    tokens_B = ids_BC.gather(1, choice_B[:, None])[:, 0]
    return tokens_B, token_logprobs(scaled_BV, tokens_B), sampling_logp_B
