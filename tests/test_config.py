"""The config tree: YAML + dotted overrides; unknown keys, wrong types and impossible
layouts raise errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest

from hpc_rlhf.config import (
    Config,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    config_to_dict,
    load_config,
)


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_and_overrides_build_a_frozen_tree(tmp_path):
    path = write(tmp_path, "model:\n  num_layers: 2\n  hidden_size: 64\noptimizer:\n  lr: 1\n")
    cfg = load_config(path, ["model.num_layers=4", "parallel.tensor_model_parallel_size=2"])
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 64
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.parallel.tensor_model_parallel_size == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.num_layers = 3  # type: ignore[misc]
    assert config_to_dict(cfg)["model"]["num_layers"] == 4


WORLD_SIZES = {  # the cluster each shipped config is written for
    "ppo_tiny_cpu.yaml": 4,
    "ppo_llama2_7b_a100_2x8.yaml": 16,
    "ppo_llama2_13b_h100_2x8.yaml": 16,
    "ppo_llama2_70b_h100_8x8.yaml": 64,
    "tiny_cpu.yaml": 4,
}


def test_shipped_example_configs_load_and_fit_their_clusters():
    import glob
    import os

    from hpc_rlhf.config import PPORunConfig

    paths = sorted(glob.glob("examples/configs/*.yaml"))
    assert {os.path.basename(p) for p in paths} == set(WORLD_SIZES)
    for path in paths:
        name = os.path.basename(path)
        cls = PPORunConfig if name.startswith("ppo_") else Config
        cfg = load_config(path, cls=cls)
        cfg.validate(WORLD_SIZES[name])


@pytest.mark.parametrize(
    "text,overrides,match",
    [
        ("model:\n  num_layerz: 2\n", [], r"unknown config key 'model.num_layerz'"),
        ("modle: {}\n", [], r"unknown config key 'modle'"),
        ("", ["train.stepz=3"], r"unknown config key 'train.stepz'"),
        ("model:\n  num_layers: two\n", [], r"model.num_layers: expected int, got str"),
        ("model:\n  tie_word_embeddings: 3\n", [], r"model.tie_word_embeddings: expected bool"),
        ("model:\n  num_layers: true\n", [], r"model.num_layers: expected int, got bool"),
        ("model: 3\n", [], r"model: expected a mapping"),
        ("- 1\n- 2\n", [], r"must hold a mapping"),
        ("model: [unclosed\n", [], r"not valid YAML"),
        ("", ["model.num_layers"], r"not of the form dotted.key=value"),
        (
            "",
            ["model.hidden_size=65"],
            r"model.hidden_size=65 is not divisible by model.num_attention_heads",
        ),
        ("", ["model.params_dtype=fp8"], r"model.params_dtype='fp8'"),
        (
            "",
            [
                "model.num_attention_heads=6",
                "parallel.tensor_model_parallel_size=4",
                "model.hidden_size=96",
            ],
            r"model.num_attention_heads=6 is not divisible by parallel.tensor_model_parallel_size=4",
        ),
        (
            "",
            ["model.num_layers=3", "parallel.pipeline_model_parallel_size=2"],
            r"model.num_layers=3 is not divisible by parallel.pipeline_model_parallel_size",
        ),
        (
            "",
            ["parallel.virtual_pipeline_model_parallel_size=2"],
            r"needs pipeline_model_parallel_size >= 2",
        ),
        (
            "",
            ["parallel.sequence_parallel=true"],
            r"sequence_parallel needs tensor_model_parallel_size >= 2",
        ),
        ("", ["parallel.host_allocator=tcmalloc"], r"parallel.host_allocator='tcmalloc'"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text), overrides)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_layout_checks_against_world_size():
    model = ModelConfig(num_attention_heads=4, num_query_groups=2, hidden_size=64)
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).validate(
            model, 6
        )
    with pytest.raises(ConfigError, match="model.num_query_groups=2 is not divisible"):
        ParallelConfig(tensor_model_parallel_size=4).validate(model, 4)
    assert ParallelConfig(tensor_model_parallel_size=2).data_parallel_size(8) == 4
    cfg = Config(model=model, parallel=ParallelConfig(tensor_model_parallel_size=2))
    with pytest.raises(ConfigError, match="train.global_batch_size=8 is not divisible"):
        dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, micro_batch_size_per_rank=3)
        ).validate(4)


def test_score_micro_batch_defaults_to_the_training_one_and_is_checked(tmp_path):
    from hpc_rlhf.config import PPORunConfig

    rules = "reward:\n  rules:\n    - function: hpc_rlhf.algorithms.rule_rewards:target_token_fraction\n"
    path = write(tmp_path, rules)
    cfg = load_config(path, ["ppo.micro_batch_size_per_rank=4"], PPORunConfig)
    assert cfg.ppo.score_micro_batch == 4
    cfg = load_config(path, ["ppo.score_micro_batch_size_per_rank=16"], PPORunConfig)
    assert cfg.ppo.score_micro_batch == 16
    with pytest.raises(ConfigError, match="ppo.score_micro_batch_size_per_rank must be >= 1"):
        load_config(path, ["ppo.score_micro_batch_size_per_rank=-2"], PPORunConfig)


def test_generation_section_reaches_every_engine_setting(tmp_path):
    """The run's ``generation.engine`` is the engine's own config: every engine knob is
    settable from a run's YAML and checked with a named error."""
    from hpc_rlhf.config import PPORunConfig
    from hpc_rlhf.inference.engine import GenerationConfig

    rules = "reward:\n  rules:\n    - function: hpc_rlhf.algorithms.rule_rewards:target_token_fraction\n"
    path = write(tmp_path, rules)
    overrides = [
        "generation.engine.cache_budget_bytes=123456",
        "generation.engine.cache_budget_blocks=64",
        "generation.engine.block_size=32",
        "generation.engine.max_running_seqs=7",
        "generation.engine.max_prefill_tokens=99",
        "generation.engine.attention_backend=flash_attn",
        "generation.engine.cuda_graphs=true",
        "generation.engine.keep_cache=true",
    ]
    engine = load_config(path, overrides, PPORunConfig).generation.engine
    assert isinstance(engine, GenerationConfig)
    default = GenerationConfig()
    changed = {
        f.name
        for f in dataclasses.fields(GenerationConfig)
        if getattr(engine, f.name) != getattr(default, f.name)
    }
    assert changed == {f.name for f in dataclasses.fields(GenerationConfig)}
    assert (engine.block_size, engine.max_running_seqs, engine.attention_backend) == (
        32,
        7,
        "flash_attn",
    )
    with pytest.raises(ConfigError, match="generation.engine.attention_backend='xformers'"):
        load_config(path, ["generation.engine.attention_backend=xformers"], PPORunConfig)
    with pytest.raises(ConfigError, match="generation.engine.block_size must be >= 1"):
        load_config(path, ["generation.engine.block_size=0"], PPORunConfig)
