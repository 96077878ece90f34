"""The model families users bring, against transformers' own classes.

For each family a tiny random model is created with its transformers class
(``LlamaForCausalLM`` with llama3 RoPE scaling and tied embeddings, ``Qwen2ForCausalLM`` with
its QKV biases and tied embeddings, ``Qwen3ForCausalLM`` with per-head query/key norms and a
head dimension of its own, ``MistralForCausalLM`` with a sliding window shorter than the
test sequences), every bias and norm weight perturbed away from its
initialisation (zeros and ones would hide a missing or misplaced one), and saved by
``save_pretrained`` as sharded safetensors with an index. Then:

* ``hf_io.load_hf_checkpoint`` reads the family's ``ModelConfig`` from its config.json;
* the megatron model's logits equal transformers' within 1e-5 relative at TP=1 and at
  TP=2 x PP=2 (padded rows, fp32), and gathering the shards gives the HF state bit for bit;
  so do a reward model's per-token and end scores against the family's
  ``*ForSequenceClassification``;
* the generation engine's greedy tokens equal transformers' ``generate`` at TP=1 and TP=2;
* the state written back by ``save_hf_checkpoint`` loads in transformers (its own class
  from our config.json) and gives the original logits exactly.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from hpc_rlhf.config import ModelConfig
from hpc_rlhf.models import hf_config, hf_io, hf_names
from tests.dist import run_world
from tests.inference.common import hf_greedy, make_prompts
from tests.models.test_hf_parity import RTOL, check_role, make_batch, rel_err

BASE = ModelConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=256,
    max_position_embeddings=512,
)
CONFIGS = {
    # llama3 scaling on a 16-position original context: every wavelength of a 16-wide head
    # is past the high-frequency cut (4), most are scaled by 1/8, some interpolated
    "llama3": dataclasses.replace(
        BASE,
        family="llama",
        rotary_base=500000.0,
        rope_scaling="llama3",
        rope_scaling_factor=8.0,
        rope_original_max_positions=16,
        tie_word_embeddings=True,
    ),
    "qwen2": dataclasses.replace(
        BASE, family="qwen2", rotary_base=1000000.0, norm_epsilon=1e-6, tie_word_embeddings=True
    ),
    "qwen3": dataclasses.replace(BASE, family="qwen3", kv_channels=32, norm_epsilon=1e-6),
    # a window shorter than the test rows (8) and the prompts (3-24) plus generated tokens
    "mistral": dataclasses.replace(BASE, family="mistral", sliding_window=5),
}
GREEDY_TOKENS = 8


def transformers_model(model_cfg: ModelConfig, seed: int, head: str = hf_names.HEAD_LM):
    """The family's transformers ``*ForCausalLM`` (or ``*ForSequenceClassification`` for
    ``head="score"``; eager attention, fp32), random weights, biases and norm weights
    perturbed."""
    import transformers

    prefix = hf_config.FAMILY_CLASSES[model_cfg.family]
    config_cls = getattr(transformers, f"{prefix}Config")
    kind = "ForCausalLM" if head == hf_names.HEAD_LM else "ForSequenceClassification"
    model_cls = getattr(transformers, prefix + kind)
    hf_cfg = config_cls(**hf_config.hf_config_from_model(model_cfg, head))
    hf_cfg._attn_implementation = "eager"
    hf_cfg.pad_token_id, hf_cfg.eos_token_id, hf_cfg.bos_token_id = 0, None, None
    torch.manual_seed(seed)
    model = model_cls(hf_cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.2 * torch.randn_like(param))
            elif name.endswith(".bias") or name == "score.weight":
                param.normal_(0.0, 0.5)
            else:
                param.mul_(3.0)  # sharper distributions: fewer near-ties in greedy decoding
    return model


def reference(model, model_cfg: ModelConfig, seed: int) -> tuple:
    """(HF state, logits [B, S, V] or per-token scores [B, S, 1], pooled scores [B] or
    None, ids, mask) of ``model`` on a padded batch."""
    ids_BS, mask_BS = make_batch(model_cfg.vocab_size, seed)
    pos_BS = (mask_BS.cumsum(1) - 1).clamp(min=0)
    pooled_B = None
    with torch.no_grad():
        if hasattr(model, "score"):
            hidden_BSH = model.model(ids_BS, attention_mask=mask_BS, position_ids=pos_BS)
            out = model.score(hidden_BSH.last_hidden_state)
            pooled_B = model(ids_BS, attention_mask=mask_BS, position_ids=pos_BS).logits[:, 0]
        else:
            out = model(ids_BS, attention_mask=mask_BS, position_ids=pos_BS).logits
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    if model_cfg.tie_word_embeddings:
        state.pop(hf_names.HF_LM_HEAD, None)
    return state, out, pooled_B, ids_BS, mask_BS


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per family: the directory ``save_pretrained`` wrote, its reference and greedy tokens."""
    out = {}
    prompts = make_prompts(vocab=BASE.vocab_size)
    for seed, (name, cfg) in enumerate(CONFIGS.items(), start=1):
        model = transformers_model(cfg, seed)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(str(path), max_shard_size="100KB")
        scorer = transformers_model(cfg, seed + 10, hf_names.HEAD_SCORE)
        scorer.config.pad_token_id = 0
        out[name] = {
            "path": str(path),
            "ref": reference(model, cfg, seed),
            "score_ref": reference(scorer, cfg, seed),
            "greedy": hf_greedy(model, prompts, GREEDY_TOKENS),
            "prompts": prompts,
        }
    return out


def test_each_family_loads_from_its_sharded_checkpoint(checkpoints):
    for name, cfg in CONFIGS.items():
        path = checkpoints[name]["path"]
        assert os.path.exists(os.path.join(path, hf_io.INDEX_NAME)), "not sharded"
        loaded_cfg, state = hf_io.load_hf_checkpoint(path)
        assert loaded_cfg == cfg, name
        ref_state = checkpoints[name]["ref"][0]
        assert sorted(state) == sorted(ref_state), name
        assert all(torch.equal(state[k], ref_state[k]) for k in ref_state), name


def _greedy(model_cfg, parallel, hf_state, prompts) -> list[list[int]]:
    from hpc_rlhf.inference.engine import GenerationConfig, GenerationEngine
    from hpc_rlhf.inference.sampling import SamplingParams
    from tests.inference.common import build_actor

    state, actor = build_actor(model_cfg, parallel, hf_state)
    engine = GenerationEngine(actor, model_cfg, state, GenerationConfig(block_size=16))
    engine.sync_weights(0)
    outs = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=GREEDY_TOKENS))
    return [o.token_ids for o in outs]


def _world(rank, world_size, checkpoints, layout):
    from hpc_rlhf.config import ParallelConfig
    from hpc_rlhf.parallel.state import destroy_parallel

    tp, pp = layout
    results = {}
    for name, cfg in CONFIGS.items():
        ref = checkpoints[name]["ref"]
        par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        results[name] = check_role(cfg, par, "actor", ref)
        destroy_parallel()
        results[name]["reward"] = check_role(cfg, par, "reward", checkpoints[name]["score_ref"])
        destroy_parallel()
        engine_par = ParallelConfig(tensor_model_parallel_size=tp)  # the engine's layout
        if world_size % tp == 0:
            results[name]["greedy"] = _greedy(cfg, engine_par, ref[0], checkpoints[name]["prompts"])
        destroy_parallel()
    return results


@pytest.mark.parametrize("layout", [(1, 1), (2, 2)], ids=["tp1", "tp2_pp2"])
def test_logits_and_greedy_generation_equal_transformers(checkpoints, layout):
    tp, pp = layout
    ranks = run_world(_world, tp * pp, checkpoints, layout)
    for name in CONFIGS:
        result = ranks[0][name]
        assert result["gather_exact"] is True, (name, result)
        assert result["logits"] <= RTOL, (name, result["logits"])
        reward = result["reward"]  # the reward model (*ForSequenceClassification)
        assert reward["gather_exact"] is True, (name, reward)
        assert reward["scores"] <= RTOL and reward["end_scores"] <= RTOL, (name, reward)
        for rank_result in ranks:
            assert rank_result[name]["greedy"] == checkpoints[name]["greedy"], name


def test_export_loads_in_transformers_with_the_same_logits(checkpoints, tmp_path):
    import transformers

    for name, cfg in CONFIGS.items():
        state, want, _, ids_BS, mask_BS = checkpoints[name]["ref"]
        out = tmp_path / name
        hf_io.save_hf_checkpoint(str(out), cfg, state, max_shard_bytes=60_000)
        auto = transformers.AutoModelForCausalLM
        model = auto.from_pretrained(str(out), attn_implementation="eager").eval()
        prefix = hf_config.FAMILY_CLASSES[cfg.family]
        assert type(model).__name__ == f"{prefix}ForCausalLM", name
        pos_BS = (mask_BS.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            got = model(ids_BS, attention_mask=mask_BS, position_ids=pos_BS).logits
        assert rel_err(got, want, mask_BS) == 0.0, name


FAMILY_MODELS = {
    "llama3": {"rope_scaling": "llama3", "rope_original_max_positions": 16},
    "qwen2": {"family": "qwen2", "tie_word_embeddings": True},
    "qwen3": {"family": "qwen3", "kv_channels": 32},
    "mistral": {"family": "mistral", "sliding_window": 6},
}


def _ppo(rank, world_size, cfg):
    from hpc_rlhf.trainer.ppo_run import run_ppo

    return run_ppo(cfg)


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_ppo_steps_at_tp2_dp2_and_the_export_is_the_family(family, tmp_path):
    """Three PPO steps of the trainer tests' tiny model as each family (TP=2 x DP=2: the
    family's layers trained, generated from and exported); the export loads as the
    family's transformers class and as a ``ModelConfig`` of that family."""
    import math

    import transformers

    from tests.trainer.test_ppo import make_cfg
    from tests.trainer.tiny import TINY_MODEL

    hf = tmp_path / "hf"
    cfg = make_cfg(
        model={**TINY_MODEL, **FAMILY_MODELS[family]},
        parallel={"tensor_model_parallel_size": 2},
        ppo={"steps": 3, "micro_batch_size_per_rank": 4, "hf_export_dir": str(hf)},
    )
    records = run_world(_ppo, 4, cfg)[0]
    assert len(records) == 3 and all(
        math.isfinite(r["actor_grad_norm"]) and r["actor_grad_norm"] > 0 for r in records
    ), records
    exported, _ = hf_io.load_hf_checkpoint(str(hf))
    assert exported.family == cfg.model.family and exported.head_dim == cfg.model.head_dim
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf))
    assert type(model).__name__ == f"{hf_config.FAMILY_CLASSES[exported.family]}ForCausalLM"
