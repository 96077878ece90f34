"""Per-prompt length limits (benchmarks replay fixed response lengths with them)."""

from __future__ import annotations

from hpc_rlhf.config import ParallelConfig
from tests.dist import run_world
from tests.inference.common import CFG, build_actor, hf_causal_lm, hf_state, make_prompts


def _world(rank, world_size, weights, prompts):
    from hpc_rlhf.inference.engine import GenerationEngine
    from hpc_rlhf.inference.sampling import SamplingParams

    state, actor = build_actor(CFG, ParallelConfig(), weights)
    engine = GenerationEngine(actor, CFG, state)
    engine.sync_weights(0)
    sampling = SamplingParams(max_new_tokens=6, seed=3, n=2)
    limits = [3, 6, 1][: len(prompts)]
    outs = engine.generate(prompts, sampling, max_new_tokens=limits)
    full = engine.generate(prompts, sampling)
    errors = []
    for bad in ([1] * (len(prompts) + 1), [0] * len(prompts), [7] * len(prompts)):
        try:
            engine.generate(prompts, sampling, max_new_tokens=bad)
        except ValueError as err:
            errors.append(str(err))
    by_key = {(c.prompt_index, c.sample_index): c for c in full}
    return (
        [
            (
                c.prompt_index,
                list(c.token_ids),
                c.finish_reason,
                by_key[(c.prompt_index, c.sample_index)].token_ids,
            )
            for c in outs
        ],
        limits,
        errors,
    )


def test_each_prompt_stops_at_its_own_limit_with_the_same_tokens():
    model = hf_causal_lm(CFG)
    prompts = make_prompts()[:3]
    outs, limits, errors = run_world(_world, 1, hf_state(model), prompts)[0]
    for prompt_index, tokens, reason, unlimited in outs:
        assert len(tokens) == limits[prompt_index] and reason == "length"
        assert tokens == unlimited[: len(tokens)]  # seeded: a prefix of the longer run
    assert len(errors) == 3 and all("one limit per prompt" in e for e in errors)
