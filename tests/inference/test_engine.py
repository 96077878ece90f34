"""The engine in a one-rank world against transformers, a teacher-forced megatron forward and
itself (seeds, preemption, stop tokens, shared prefill, cache budget errors).

The parent process computes ``LlamaForCausalLM.generate`` greedy references (eager, fp32)
from random weights; one spawned world runs every engine check and returns what it saw.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist import run_world
from tests.inference.common import (
    CFG,
    build_actor,
    hf_causal_lm,
    hf_greedy,
    hf_state,
    make_prompts,
)

MAX_NEW = 12
TIED = dataclasses.replace(CFG, tie_word_embeddings=True)
SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=MAX_NEW, seed=7)


def teacher_forced_logits(actor, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Megatron forward of the actor on prompt+tokens: logits predicting each token [N, V]."""
    from hpc_rlhf.models.runner import MicroBatch, model_forward

    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits_1SV = model_forward(actor.parameters_by_chunk()[0], MicroBatch.unpadded(ids))
    return logits_1SV[0, len(prompt) - 1 : -1].float()


def allowed_tokens(logits_V: torch.Tensor, temperature: float, top_k: int, top_p: float) -> set:
    """The top-k then top-p set, computed with a full sort (independent of the engine)."""
    scaled = (logits_V / temperature).double()
    order = torch.sort(scaled, descending=True).indices[:top_k].tolist()
    probs = torch.softmax(scaled[order], dim=0).tolist()
    kept, mass = [], 0.0
    for tok, p in zip(order, probs):
        if mass >= top_p:
            break
        kept.append(tok)
        mass += p
    return set(kept)


def _logprob_checks(actor, prompts, outs, temperature) -> dict:
    worst, outside, steps = 0.0, 0, 0
    for out in outs:
        logits_NV = teacher_forced_logits(actor, prompts[out.prompt_index], out.token_ids)
        logp_NV = torch.log_softmax(logits_NV / temperature, dim=-1)
        want = logp_NV.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        worst = max(worst, float((torch.tensor(out.logprobs) - want).abs().max()))
        for t, tok in enumerate(out.token_ids):
            steps += 1
            allowed = allowed_tokens(
                logits_NV[t], temperature, SAMPLING["top_k"], SAMPLING["top_p"]
            )
            outside += tok not in allowed
        assert all(s >= lp - 1e-6 for s, lp in zip(out.sampling_logprobs, out.logprobs))
    return {"logprob_err": worst, "outside_allowed": outside, "steps_checked": steps}


def _tied_greedy(tied_weights, prompts) -> list[list[int]]:
    """Greedy tokens of an actor with tied input/output embeddings (rebuilds the groups)."""
    from hpc_rlhf.config import ParallelConfig
    from hpc_rlhf.inference.engine import GenerationEngine
    from hpc_rlhf.inference.sampling import SamplingParams

    state, actor = build_actor(TIED, ParallelConfig(), tied_weights)
    engine = GenerationEngine(actor, TIED, state)
    engine.sync_weights(0)
    outs = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=MAX_NEW))
    return [o.token_ids for o in outs]


def _never_synced_checks(actor, state, prompts) -> dict:
    """``generate`` before any ``sync_weights`` raises ``StaleWeightsError`` up front (no KV
    pool allocated: ``keep_cache`` would keep one), with or without a policy version; so
    does asking for a version when the weights were synced without one."""
    from hpc_rlhf.inference.engine import GenerationConfig, GenerationEngine
    from hpc_rlhf.inference.sampling import SamplingParams
    from hpc_rlhf.inference.weights import StaleWeightsError

    config = GenerationConfig(block_size=4, cache_budget_blocks=100, keep_cache=True)
    engine = GenerationEngine(actor, CFG, state, config)
    greedy = SamplingParams(greedy=True, max_new_tokens=2)
    messages = []
    for version in (None, 0):
        with pytest.raises(StaleWeightsError) as err:
            engine.generate(prompts, greedy, policy_version=version)
        messages.append(str(err.value))
    out = {"never_synced_messages": messages, "never_synced_no_cache": engine.cache is None}
    engine.sync_weights()  # no version stamp
    with pytest.raises(StaleWeightsError, match="version None"):
        engine.generate(prompts, greedy, policy_version=0)
    out["unversioned_generates"] = len(engine.generate(prompts, greedy)) == len(prompts)
    return out


def _tp1_world(rank, world_size, hf_weights, prompts, greedy_ref, tied_weights):
    from hpc_rlhf.config import ParallelConfig
    from hpc_rlhf.inference.config import CacheTooSmallError
    from hpc_rlhf.inference.engine import GenerationConfig, GenerationEngine
    from hpc_rlhf.inference.sampling import SamplingParams
    from hpc_rlhf.inference.weights import StaleWeightsError

    state, actor = build_actor(CFG, ParallelConfig(), hf_weights)
    big = GenerationConfig(block_size=4, cache_budget_blocks=400)
    small = GenerationConfig(block_size=4, cache_budget_blocks=12)  # one sequence at a time
    engine = GenerationEngine(actor, CFG, state, big)
    engine.sync_weights(version=0)
    res: dict = {}
    chunk = actor.parameters_by_chunk()[0]
    res["in_place"] = engine.weights.in_place and all(
        any(t.data_ptr() == p.data_ptr() for p in chunk.parameters())
        for t in engine.weights.tensors()
    )
    greedy = SamplingParams(greedy=True, max_new_tokens=MAX_NEW)
    res["greedy"] = [o.token_ids for o in engine.generate(prompts, greedy, policy_version=0)]
    res["greedy_reasons"] = {o.finish_reason for o in engine.generate(prompts, greedy)}
    sampling = SamplingParams(**SAMPLING)
    outs = engine.generate(prompts, sampling)
    res.update(_logprob_checks(actor, prompts, outs, SAMPLING["temperature"]))
    res["sample_again_equal"] = [o.token_ids for o in engine.generate(prompts, sampling)] == [
        o.token_ids for o in outs
    ]
    # Preemption: a cache for one sequence at a time still finishes everything, unchanged.
    tight = GenerationEngine(actor, CFG, state, small)
    tight.sync_weights(0)
    res["tight_greedy"] = [o.token_ids for o in tight.generate(prompts, greedy)]
    tight_outs = tight.generate(prompts, sampling)
    res["tight_sampled_equal"] = [o.token_ids for o in tight_outs] == [o.token_ids for o in outs]
    res["tight_logprob_diff"] = max(
        abs(a - b) for o, t in zip(outs, tight_outs) for a, b in zip(o.logprobs, t.logprobs)
    )
    res["tight_preemptions"] = tight.stats.preemptions
    # Stop tokens: the 4th greedy token of prompt 0 stops every sequence that emits it.
    stop = res["greedy"][0][3]
    res["stop_token"] = stop
    res["stopped"] = [
        (o.token_ids, o.finish_reason)
        for o in engine.generate(
            prompts, SamplingParams(greedy=True, max_new_tokens=MAX_NEW, stop_token_ids=(stop,))
        )
    ]
    # n samples per prompt share one prefill (and its KV blocks, copied on write).
    before = (engine.stats.prefill_tokens, engine.stats.cow_copies)
    nouts = engine.generate(prompts, SamplingParams(**{**SAMPLING, "n": 4}))
    res["n_prefill_tokens"] = engine.stats.prefill_tokens - before[0]
    res["n_cow_copies"] = engine.stats.cow_copies - before[1]
    res["n_outs"] = [(o.prompt_index, o.sample_index, o.token_ids) for o in nouts]
    res["n_sample0_equal"] = [o.token_ids for o in nouts if o.sample_index == 0] == [
        o.token_ids for o in outs
    ]
    ngreedy = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=MAX_NEW, n=3))
    res["n_greedy"] = [o.token_ids for o in ngreedy]
    # Errors: a budget too small for one sequence, a stale policy version.
    tiny = GenerationEngine(
        actor, CFG, state, GenerationConfig(block_size=4, cache_budget_blocks=5)
    )
    tiny.sync_weights(0)
    with pytest.raises(CacheTooSmallError, match="cannot hold one sequence"):
        tiny.generate(prompts, greedy)
    res["too_small_raises"] = True
    with pytest.raises(StaleWeightsError, match="version 0"):
        engine.generate(prompts, greedy, policy_version=1)
    res["stale_raises"] = True
    res.update(_never_synced_checks(actor, state, prompts))
    res["cache_freed"] = engine.cache is None
    res["tied_greedy"] = _tied_greedy(tied_weights, prompts)
    return res


@pytest.fixture(scope="module")
def tp1():
    model = hf_causal_lm(CFG)
    prompts = make_prompts()
    ref = hf_greedy(model, prompts, MAX_NEW)
    tied = hf_causal_lm(TIED, seed=2)
    res_tied = hf_greedy(tied, prompts, MAX_NEW)
    (res,) = run_world(_tp1_world, 1, hf_state(model), prompts, ref, hf_state(tied))
    res["tied_ref"] = res_tied
    return prompts, ref, res


def test_greedy_matches_transformers_generate(tp1):
    prompts, ref, res = tp1
    assert res["greedy"] == ref
    assert res["greedy_reasons"] == {"length"}
    assert res["in_place"] is True
    assert res["cache_freed"] is True
    assert res["tied_greedy"] == res["tied_ref"]


def test_logprobs_match_teacher_forced_forward_and_topk_topp_sets(tp1):
    _, _, res = tp1
    assert res["logprob_err"] <= 1e-4
    assert res["steps_checked"] == 6 * MAX_NEW
    assert res["outside_allowed"] == 0


def test_seeded_sampling_reproducible_and_preemption_exact(tp1):
    _, ref, res = tp1
    assert res["sample_again_equal"] is True
    assert res["tight_preemptions"] > 0
    assert res["tight_greedy"] == ref
    assert res["tight_sampled_equal"] is True
    assert res["tight_logprob_diff"] <= 1e-5


def test_stop_tokens_end_sequences(tp1):
    _, ref, res = tp1
    stop = res["stop_token"]
    for want, (got, reason) in zip(ref, res["stopped"]):
        if stop in want:
            assert got == want[: want.index(stop) + 1] and reason == "stop"
        else:
            assert got == want and reason == "length"


def test_n_samples_share_prefill(tp1):
    prompts, ref, res = tp1
    assert res["n_prefill_tokens"] == sum(len(p) for p in prompts)
    assert res["n_cow_copies"] > 0
    assert [(p, k) for p, k, _ in res["n_outs"]] == [(p, k) for p in range(6) for k in range(4)]
    by_prompt = [[t for p, _, t in res["n_outs"] if p == i] for i in range(6)]
    assert any(len({tuple(t) for t in samples}) > 1 for samples in by_prompt)
    assert res["n_sample0_equal"] is True
    assert res["n_greedy"] == [r for r in ref for _ in range(3)]


def test_errors(tp1):
    _, _, res = tp1
    assert res["too_small_raises"] and res["stale_raises"]
    assert all("call sync_weights" in m for m in res["never_synced_messages"])
    assert res["never_synced_no_cache"] is True
    assert res["unversioned_generates"] is True
