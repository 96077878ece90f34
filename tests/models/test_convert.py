"""HF <-> megatron resharding: bit-exact round trips, layouts, files, CLI and bad inputs.

Pure tensor code, no process group. Model-level checks (the converted weights give the same
logits as transformers' Llama) are in ``test_hf_parity.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from hpc_rlhf.config import ConfigError, ModelConfig, ParallelConfig
from hpc_rlhf.models import hf_config, hf_io, param_layout, rank_state, reshard
from hpc_rlhf.models.hf_names import ConversionError

ROOT = Path(__file__).resolve().parents[2]

TINY = ModelConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=128,
)


def random_hf_state(model_cfg: ModelConfig, head: str = "lm", seed: int = 0) -> dict:
    """Random HF tensors of the right names and shapes (every value distinct)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=gen)
        for name, shape in param_layout.hf_shapes(model_cfg, head).items()
    }


def assert_states_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


# ----------------------------------------------------------------------------- round trips

LAYOUTS = [  # (tp, pp, vpp, model overrides)
    (1, 1, None, {}),
    (2, 2, None, {}),
    (2, 1, None, {}),
    (1, 4, None, {}),
    (4, 1, None, {"num_attention_heads": 8, "num_query_groups": 4}),
    (2, 2, 2, {}),
    (1, 2, 2, {}),
]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tp,pp,vpp,overrides", LAYOUTS)
def test_round_trip_is_bit_exact(tp, pp, vpp, overrides, tied):
    model_cfg = dataclasses.replace(TINY, tie_word_embeddings=tied, **overrides)
    hf = random_hf_state(model_cfg)
    shards = reshard.hf_to_megatron(hf, model_cfg, tp, pp, vpp)
    assert sorted(shards) == [(p, t) for p in range(pp) for t in range(tp)]
    layout = param_layout.Layout(model_cfg, tp, pp, vpp)
    for (p, _), chunks in shards.items():
        assert len(chunks) == (vpp or 1)
        for c, chunk in enumerate(chunks):
            want = param_layout.mcore_chunk_shapes(layout, p, c)
            assert {n: tuple(t.shape) for n, t in chunk.items()} == want
    assert_states_equal(reshard.megatron_to_hf(shards, model_cfg, tp, pp, vpp), hf)


def test_round_trip_bf16_keeps_dtype():
    model_cfg = dataclasses.replace(TINY, params_dtype="bf16")
    hf = {n: t.to(torch.bfloat16) for n, t in random_hf_state(model_cfg).items()}
    shards = reshard.hf_to_megatron(hf, model_cfg, 2, 2)
    assert_states_equal(reshard.megatron_to_hf(shards, model_cfg, 2, 2), hf)


def test_tied_output_layer_only_with_pipeline():
    model_cfg = dataclasses.replace(TINY, tie_word_embeddings=True)
    hf = random_hf_state(model_cfg)
    assert "output_layer.weight" not in reshard.hf_to_megatron(hf, model_cfg, 2, 1)[(0, 0)][0]
    shards = reshard.hf_to_megatron(hf, model_cfg, 2, 2)
    out_VH = torch.cat([shards[(1, t)][0]["output_layer.weight"] for t in range(2)])
    assert torch.equal(out_VH, hf["model.embed_tokens.weight"])
    # A tied HF state may carry lm_head.weight (HF's state_dict() does): accepted if equal.
    with_head = dict(hf, **{"lm_head.weight": hf["model.embed_tokens.weight"].clone()})
    reshard.hf_to_megatron(with_head, model_cfg, 2, 2)
    with_head["lm_head.weight"] += 1
    with pytest.raises(ConversionError, match="lm_head.weight' differs"):
        reshard.hf_to_megatron(with_head, model_cfg, 2, 2)


def test_qkv_and_fc1_layout_by_hand():
    """TP rank r holds whole query groups [q heads; k; v] and [gate shard; up shard]."""
    m = TINY
    hf = random_hf_state(m)
    d, H, F = m.head_dim, m.hidden_size, m.ffn_hidden_size
    shards = reshard.hf_to_megatron(hf, m, 2, 1)
    q = hf["model.layers.3.self_attn.q_proj.weight"]  # 4 heads, 2 groups: 2 heads per group
    k = hf["model.layers.3.self_attn.k_proj.weight"]
    v = hf["model.layers.3.self_attn.v_proj.weight"]
    qkv_rank1 = shards[(0, 1)][0]["decoder.layers.3.self_attention.linear_qkv.weight"]
    want = torch.cat([q[2 * d : 4 * d], k[d : 2 * d], v[d : 2 * d]])  # group 1
    assert qkv_rank1.shape == (4 * d, H) and torch.equal(qkv_rank1, want)
    fc1_rank1 = shards[(0, 1)][0]["decoder.layers.3.mlp.linear_fc1.weight"]
    gate = hf["model.layers.3.mlp.gate_proj.weight"]
    up = hf["model.layers.3.mlp.up_proj.weight"]
    assert torch.equal(fc1_rank1, torch.cat([gate[F // 2 :], up[F // 2 :]]))


@pytest.mark.parametrize("pp,vpp", [(2, None), (4, None), (2, 2), (2, 4), (4, 2)])
def test_layer_offsets_match_megatron(pp, vpp):
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from hpc_rlhf.models.build import transformer_config

    model_cfg = dataclasses.replace(TINY, num_layers=16)
    parallel = ParallelConfig(
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp
    )
    config = transformer_config(model_cfg, parallel)
    layout = param_layout.Layout(model_cfg, 1, pp, vpp)
    for p in range(pp):
        for c in range(vpp or 1):
            want = get_transformer_layer_offset(config, vp_stage=c if vpp else None, pp_rank=p)
            assert layout.layer_offset(p, c) == want


def test_vpp_chunks_hold_interleaved_layers():
    hf = random_hf_state(TINY)
    shards = reshard.hf_to_megatron(hf, TINY, 1, 2, vpp=2)  # 4 layers: 1 per chunk
    for (p, _), chunks in shards.items():
        for c, chunk in enumerate(chunks):
            layer = c * 2 + p
            want = hf[f"model.layers.{layer}.input_layernorm.weight"]
            assert torch.equal(chunk["decoder.layers.0.input_layernorm.weight"], want)
    assert "embedding.word_embeddings.weight" in shards[(0, 0)][0]
    assert "embedding.word_embeddings.weight" not in shards[(0, 0)][1]
    assert "output_layer.weight" in shards[(1, 0)][1]
    assert "output_layer.weight" not in shards[(1, 0)][0]


def test_transformer_engine_names():
    model_cfg = dataclasses.replace(TINY, transformer_impl="transformer_engine")
    hf = random_hf_state(model_cfg)
    shards = reshard.hf_to_megatron(hf, model_cfg, 2, 2)
    names = set(shards[(0, 0)][0])
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)
    assert torch.equal(
        shards[(1, 1)][0]["decoder.layers.1.mlp.linear_fc1.layer_norm_weight"],
        hf["model.layers.3.post_attention_layernorm.weight"],
    )
    assert_states_equal(reshard.megatron_to_hf(shards, model_cfg, 2, 2), hf)


def test_score_head_round_trip_and_bias():
    hf = random_hf_state(TINY, head="score")
    shards = reshard.hf_to_megatron(hf, TINY, 2, 2)
    last = shards[(1, 1)][0]
    assert torch.equal(last["output_layer.linear.weight"], hf["score.weight"])
    assert "output_layer.linear.bias" not in last  # HF has none; a critic's starts at zero
    assert "output_layer.weight" not in last
    assert_states_equal(reshard.megatron_to_hf(shards, TINY, 2, 2), hf)
    for t in range(2):
        shards[(1, t)][0]["output_layer.linear.bias"] = torch.tensor([0.5])
    with pytest.raises(ConversionError, match="score head bias is .* not zero"):
        reshard.megatron_to_hf(shards, TINY, 2, 2)


def test_extra_state_is_ignored():
    hf = random_hf_state(TINY)
    shards = reshard.hf_to_megatron(hf, TINY, 2, 2)
    shards[(0, 0)][0]["decoder.layers.0.mlp.linear_fc1._extra_state"] = None
    assert_states_equal(reshard.megatron_to_hf(shards, TINY, 2, 2), hf)


# ----------------------------------------------------------------------------- config


def test_config_round_trip_and_transformers_reads_it():
    from transformers import LlamaConfig

    model_cfg = dataclasses.replace(TINY, rotary_base=500000.0, norm_epsilon=1e-6)
    hf_cfg = hf_config.hf_config_from_model(model_cfg)
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"]
    assert hf_config.model_config_from_hf(hf_cfg) == model_cfg
    llama = LlamaConfig(**hf_cfg)
    assert llama.rope_parameters["rope_theta"] == 500000.0
    assert llama.num_key_value_heads == 2 and llama.head_dim == 16
    # transformers' own serialisation (rope_parameters, dtype) parses back to the same config
    assert hf_config.model_config_from_hf(llama.to_dict()) == model_cfg


def test_config_from_transformers4_style_dict():
    hf_cfg = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 256,
        "rope_theta": 20000.0,
        "rope_scaling": None,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": True,
    }
    cfg = hf_config.model_config_from_hf(hf_cfg, transformer_impl="transformer_engine")
    assert cfg.rotary_base == 20000.0 and cfg.num_query_groups is None
    assert cfg.params_dtype == "bf16" and cfg.tie_word_embeddings
    assert cfg.transformer_impl == "transformer_engine"


LLAMA3_ROPE = dict(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'rope_scaling'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope_type"),
        ({"attention_bias": True}, "'attention_bias'"),
        ({"mlp_bias": True}, "'mlp_bias'"),
        ({"hidden_act": "gelu"}, "'hidden_act'"),
        ({"model_type": "gemma"}, "model_type 'gemma' is not supported .*'qwen3'"),
        ({"head_dim": 0}, "'head_dim'"),
        ({"model_type": "qwen3", "attention_bias": True}, "'attention_bias'"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "'use_sliding_window'"),
        ({"model_type": "mistral", "sliding_window": -4}, "'sliding_window'"),
        (
            {
                "model_type": "qwen2",
                "rope_parameters": dict(LLAMA3_ROPE, rope_type="llama3", rope_theta=1e4),
            },
            "not supported for 'qwen2'",
        ),
        ({"num_hidden_layers": None}, "'num_hidden_layers'"),
    ],
)
def test_config_rejects_unsupported_fields(change, match):
    hf_cfg = dict(hf_config.hf_config_from_model(TINY), **change)
    with pytest.raises(ConversionError, match=match):
        hf_config.model_config_from_hf(hf_cfg)


# ----------------------------------------------------------------------------- files and CLI


def _load_cli():
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("max_shard_bytes", [10**9, 200_000], ids=["single", "sharded"])
def test_hf_files_round_trip(tmp_path, max_shard_bytes):
    hf = random_hf_state(TINY)
    hf_io.save_hf_checkpoint(str(tmp_path), TINY, hf, max_shard_bytes=max_shard_bytes)
    index = tmp_path / hf_io.INDEX_NAME
    assert index.exists() == (max_shard_bytes < 10**9)
    if index.exists():
        files = set(json.loads(index.read_text())["weight_map"].values())
        assert len(files) > 1 and all((tmp_path / f).exists() for f in files)
    model_cfg, state = hf_io.load_hf_checkpoint(str(tmp_path))
    assert model_cfg == TINY
    assert_states_equal({n: state[n] for n in hf}, hf)


def test_saved_checkpoint_loads_in_transformers(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_cfg = dataclasses.replace(TINY, tie_word_embeddings=True)
    hf = random_hf_state(model_cfg)
    hf_io.save_hf_checkpoint(str(tmp_path), model_cfg, hf, max_shard_bytes=200_000)
    model = LlamaForCausalLM.from_pretrained(str(tmp_path))
    loaded = model.state_dict()
    for name, tensor in hf.items():
        assert torch.equal(loaded[name], tensor), name
    assert torch.equal(loaded["lm_head.weight"], hf["model.embed_tokens.weight"])


@pytest.mark.parametrize("tp,pp,vpp", [(2, 2, None), (1, 2, 2), (2, 1, None)])
def test_cli_round_trip(tmp_path, tp, pp, vpp):
    cli = _load_cli()
    model_cfg = dataclasses.replace(TINY, tie_word_embeddings=vpp is not None)
    hf = random_hf_state(model_cfg)
    src, mcore, out = tmp_path / "hf", tmp_path / "mcore", tmp_path / "out"
    hf_io.save_hf_checkpoint(str(src), model_cfg, hf, extra_config={"pad_token_id": 0})
    argv = ["hf-to-mcore", "--hf", str(src), "--out", str(mcore), "--tp", str(tp)]
    argv += ["--pp", str(pp)] + (["--vpp", str(vpp)] if vpp else [])
    assert cli.main(argv) == 0
    for p in range(pp):
        for t in range(tp):
            payload = torch.load(mcore / cli.mcore_rank_dir(t, p, pp) / "model.pt")
            assert ("model0" in payload) == (vpp is not None)
    layout = json.loads((mcore / cli.LAYOUT_NAME).read_text())
    assert (layout["tp"], layout["pp"], layout["vpp"]) == (tp, pp, vpp)
    assert cli.main(["mcore-to-hf", "--mcore", str(mcore), "--out", str(out)]) == 0
    model_cfg_back, state = hf_io.load_hf_checkpoint(str(out))
    assert model_cfg_back == model_cfg
    assert_states_equal(state, hf)
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 0


def test_cli_reports_bad_input(tmp_path, capsys):
    cli = _load_cli()
    src = tmp_path / "hf"
    hf_io.save_hf_checkpoint(str(src), TINY, random_hf_state(TINY))
    argv = ["hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "o"), "--tp", "3"]
    assert cli.main(argv) == 2
    assert "num_attention_heads=4 is not divisible by" in capsys.readouterr().err
    assert cli.main(["mcore-to-hf", "--mcore", str(tmp_path / "nope"), "--out", "x"]) == 2
    assert "layout.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "tp,pp,overrides,match",
    [
        (3, 1, {}, "num_attention_heads=4 is not divisible by .*tensor_model_parallel_size=3"),
        (4, 1, {}, "num_query_groups=2 is not divisible by .*tensor_model_parallel_size=4"),
        (2, 1, {"ffn_hidden_size": 129}, "ffn_hidden_size=129 is not divisible"),
        (2, 1, {"vocab_size": 127}, "vocab_size=127 is not divisible"),
        (1, 3, {}, "num_layers=4 is not divisible by .*pipeline_model_parallel_size"),
    ],
)
def test_layout_that_does_not_divide(tp, pp, overrides, match):
    model_cfg = dataclasses.replace(TINY, **overrides)
    hf = random_hf_state(model_cfg)
    with pytest.raises(ConfigError, match=match):
        reshard.hf_to_megatron(hf, model_cfg, tp, pp)


def test_vpp_that_does_not_divide():
    with pytest.raises(ConfigError, match="num_layers=4 is not divisible by .*virtual"):
        reshard.hf_to_megatron(random_hf_state(TINY), TINY, 1, 2, vpp=4)


def test_bad_hf_tensors():
    hf = random_hf_state(TINY)
    missing = {n: t for n, t in hf.items() if n != "model.layers.2.mlp.up_proj.weight"}
    with pytest.raises(ConversionError, match=r"missing tensor.*layers\.2\.mlp\.up_proj"):
        reshard.hf_to_megatron(missing, TINY, 2, 2)
    bad_shape = dict(hf, **{"model.layers.1.self_attn.k_proj.weight": torch.zeros(64, 64)})
    with pytest.raises(ConversionError, match=r"k_proj.weight' has shape \(64, 64\), expected"):
        reshard.hf_to_megatron(bad_shape, TINY, 2, 2)
    extra = dict(hf, **{"model.layers.4.input_layernorm.weight": torch.ones(64)})
    with pytest.raises(ConversionError, match=r"layers\.4\.input_layernorm.*num_layers=4"):
        reshard.hf_to_megatron(extra, TINY, 2, 2)


def test_bad_shards():
    shards = reshard.hf_to_megatron(random_hf_state(TINY), TINY, 2, 2)
    with pytest.raises(ConversionError, match=r"expected \(pp_rank, tp_rank\)"):
        reshard.megatron_to_hf({k: v for k, v in shards.items() if k != (1, 1)}, TINY, 2, 2)
    with pytest.raises(ConversionError, match="has 1 chunk"):
        reshard.megatron_to_hf(shards, TINY, 2, 2, vpp=2)
    del shards[(0, 1)][0]["decoder.layers.1.mlp.linear_fc2.weight"]
    with pytest.raises(ConversionError, match=r"tp=1\) chunk 0 is missing .*layers\.1\.mlp"):
        reshard.megatron_to_hf(shards, TINY, 2, 2)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory not found"):
        hf_io.load_hf_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf_io.load_hf_checkpoint(str(tmp_path))
    hf_io.save_hf_checkpoint(str(tmp_path), TINY, random_hf_state(TINY), max_shard_bytes=200_000)
    os.remove(tmp_path / "model-00002-of-00004.safetensors")  # 658 kB in 4 shards
    with pytest.raises(FileNotFoundError, match="model-00002-of-00004.safetensors"):
        hf_io.load_hf_checkpoint(str(tmp_path))
    for name in os.listdir(tmp_path):
        if name != "config.json":
            os.remove(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        hf_io.load_hf_checkpoint(str(tmp_path))


def test_missing_mcore_rank_file(tmp_path):
    cli = _load_cli()
    shards = reshard.hf_to_megatron(random_hf_state(TINY), TINY, 2, 2)
    cli.save_mcore_checkpoint(str(tmp_path), shards, TINY, 2, 2)
    os.remove(tmp_path / "mp_rank_01_001" / "model.pt")
    with pytest.raises(FileNotFoundError, match="mp_rank_01_001"):
        cli.load_mcore_checkpoint(str(tmp_path))


class _Chunk(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3, bias=False)


def test_load_into_model_chunks_errors():
    chunk = _Chunk()
    rank_state.load_into_model_chunks([chunk], [{"lin.weight": torch.ones(3, 4)}])
    assert torch.equal(chunk.lin.weight, torch.ones(3, 4))
    with pytest.raises(ConversionError, match=r"2 chunk state\(s\) for 1 model chunk"):
        rank_state.load_into_model_chunks([chunk], [{}, {}])
    with pytest.raises(ConversionError, match=r"missing tensor\(s\) \['lin.weight'\]"):
        rank_state.load_into_model_chunks([chunk], [{"lin._extra_state": None}])
    with pytest.raises(ConversionError, match=r"unexpected \['other'\]"):
        rank_state.load_into_model_chunks(
            [chunk], [{"lin.weight": torch.ones(3, 4), "other": torch.ones(1)}]
        )
    with pytest.raises(ConversionError, match=r"'lin.weight' has shape \(4, 3\)"):
        rank_state.load_into_model_chunks([chunk], [{"lin.weight": torch.ones(4, 3)}])
    assert rank_state.state_from_model_chunks([chunk])[0].keys() == {"lin.weight"}
