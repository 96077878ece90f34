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
    "ppo_tiny_cpu_bf16.yaml": 4,
    "ppo_dapo_tiny_cpu.yaml": 4,
    "ppo_dapo_qwen2.5_math_7b_h100_2x8.yaml": 16,
    "ppo_llama2_7b_a100_2x8.yaml": 16,
    "ppo_lag_llama2_7b_a100_2x8.yaml": 16,
    "ppo_llama2_13b_h100_2x8.yaml": 16,
    "ppo_llama2_70b_h100_8x8.yaml": 64,
    "tiny_cpu.yaml": 4,
    "sft_tiny_cpu.yaml": 2,
    "rm_tiny_cpu.yaml": 2,
    "dpo_tiny_cpu.yaml": 2,
    "online_dpo_tiny_cpu.yaml": 4,
    "rejection_sampling_tiny_cpu.yaml": 2,
    "dpo_llama2_7b_a100_2x8.yaml": 16,
    "pipeline_tiny_cpu.yaml": 4,
    "eval_tiny_cpu.yaml": 4,
    "sft_llama2_7b_a100_2x8.yaml": 16,
    "rm_llama2_7b_a100_2x8.yaml": 16,
}


def test_shipped_example_configs_load_and_fit_their_clusters():
    import glob
    import os

    from hpc_rlhf.config import (
        DPORunConfig,
        EvalRunConfig,
        PipelineConfig,
        PPORunConfig,
        RejectionSamplingRunConfig,
        RMRunConfig,
        SFTRunConfig,
    )

    paths = sorted(glob.glob("examples/configs/*.yaml"))
    assert {os.path.basename(p) for p in paths} == set(WORLD_SIZES)
    for path in paths:
        name = os.path.basename(path)
        classes = {
            "ppo": PPORunConfig,
            "sft": SFTRunConfig,
            "rm": RMRunConfig,
            "dpo": DPORunConfig,
            "online": DPORunConfig,
            "rejection": RejectionSamplingRunConfig,
            "pipeline": PipelineConfig,
            "eval": EvalRunConfig,
        }
        cls = classes.get(name.split("_")[0], Config)
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
        (
            "",
            ["optimizer.initial_loss_scale=0.5"],
            r"optimizer.initial_loss_scale=0.5 and min_loss_scale=1.0 must satisfy",
        ),
        ("", ["optimizer.initial_loss_scale=inf"], r"optimizer.initial_loss_scale=inf"),
        ("", ["optimizer.hysteresis=0"], r"optimizer.hysteresis"),
        (
            "",
            ["model.overrides.core_attention=false"],
            r"train.pack_sequences=true needs model.overrides.core_attention",
        ),
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


def test_packing_without_an_attention_that_takes_it_is_refused_before_the_run(tmp_path):
    """megatron-core's local DotProductAttention asserts on packed batches at the first
    forward: the config names the two keys instead."""
    from hpc_rlhf.config import PPORunConfig

    rules = "reward:\n  rules:\n    - function: hpc_rlhf.algorithms.rule_rewards:target_token_fraction\n"
    path = write(tmp_path, rules)
    off = ["model.overrides.core_attention=false"]
    with pytest.raises(ConfigError, match="ppo.pack_sequences=true needs model.overrides"):
        load_config(path, off, PPORunConfig)
    cfg = load_config(path, [*off, "ppo.pack_sequences=false"], PPORunConfig)
    assert not cfg.ppo.pack_sequences


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
        "generation.engine.cache_dtype=fp32",
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
    with pytest.raises(ConfigError, match="generation.engine.cache_dtype='fp8'"):
        load_config(path, ["generation.engine.cache_dtype=fp8"], PPORunConfig)


# ----------------------------------------------------------------------------- value ranges

RULE = "hpc_rlhf.algorithms.rule_rewards:target_token_fraction"


# (section.key, the smallest value accepted): every integer count, size and interval of
# every section; the value below it must be refused with the key named.
INT_FIELDS = [
    ("train.steps", 1),
    ("train.seq_length", 1),
    ("train.micro_batch_size_per_rank", 1),
    ("train.global_batch_size", 1),
    ("train.log_interval", 1),
    ("train.save_interval", 0),
    ("optimizer.warmup_steps", 0),
    ("model.num_layers", 1),
    ("model.hidden_size", 1),
    ("model.num_attention_heads", 1),
    ("model.num_query_groups", 1),
    ("model.ffn_hidden_size", 1),
    ("model.vocab_size", 1),
    ("model.max_position_embeddings", 1),
    ("ppo.steps", 1),
    ("ppo.rollout_batch_size", 1),
    ("ppo.n_samples_per_prompt", 1),
    ("ppo.micro_batch_size_per_rank", 1),
    ("ppo.score_micro_batch_size_per_rank", 1),
    ("ppo.mini_batches_per_rollout", 1),
    ("ppo.ppo_epochs", 1),
    ("ppo.kl_horizon", 1),
    ("ppo.log_interval", 1),
    ("ppo.save_interval", 0),
    ("generation.max_new_tokens", 1),
    ("generation.top_k", 0),
    ("generation.engine.block_size", 1),
    ("generation.engine.cache_budget_bytes", 1),
    ("generation.engine.cache_budget_blocks", 1),
    ("generation.engine.max_running_seqs", 1),
    ("generation.engine.max_prefill_tokens", 1),
    ("data.max_prompt_length", 1),
    ("actor_optimizer.warmup_steps", 0),
    ("critic_optimizer.warmup_steps", 0),
]
PPO_SECTIONS = ("ppo", "generation", "data", "actor_optimizer", "critic_optimizer")


@pytest.mark.parametrize("key,minimum", INT_FIELDS, ids=[k for k, _ in INT_FIELDS])
@pytest.mark.parametrize("below", [1, 9], ids=["just_below", "far_below"])
def test_integer_settings_below_their_minimum_name_the_key(tmp_path, key, minimum, below):
    from hpc_rlhf.config import PPORunConfig

    section = key.split(".")[0]
    cls = PPORunConfig if section in PPO_SECTIONS else Config
    text = f"reward:\n  rules:\n    - function: {RULE}\n" if cls is PPORunConfig else ""
    bad = minimum - below
    with pytest.raises(ConfigError, match=rf"^{key} must be >= {minimum}, got {bad}$"):
        load_config(write(tmp_path, text), [f"{key}={bad}"], cls).validate(world_size=4)


def test_integer_settings_at_their_minimum_are_accepted(tmp_path):
    from hpc_rlhf.config import PPORunConfig

    load_config(None, ["train.save_interval=0", "optimizer.warmup_steps=0"]).validate(1)
    text = f"reward:\n  rules:\n    - function: {RULE}\n"
    cfg = load_config(
        write(tmp_path, text),
        [
            "ppo.rollout_batch_size=1",
            "ppo.micro_batch_size_per_rank=1",
            "ppo.ppo_epochs=1",
            "ppo.steps=1",
            "generation.top_k=0",
            "data.max_prompt_length=1",
        ],
        PPORunConfig,
    )
    assert cfg.validate(1) is cfg


def _ppo(tmp_path, overrides: list[str]):
    from hpc_rlhf.config import PPORunConfig

    text = f"reward:\n  rules:\n    - function: {RULE}\n"
    return load_config(write(tmp_path, text), overrides, PPORunConfig)


@pytest.mark.parametrize(
    "overrides,match",
    [
        # sampling: the engine's SamplingParams refused these only at the first generate()
        (["generation.temperature=0"], r"generation.temperature=0.0 must be > 0"),
        (["generation.temperature=-1"], r"generation.temperature=-1.0 must be > 0"),
        (["generation.top_p=0"], r"generation.top_p=0.0 must be in \(0, 1\]"),
        (["generation.top_p=1.5"], r"generation.top_p=1.5 must be in \(0, 1\]"),
        (["generation.top_k=-1"], r"generation.top_k must be >= 0, got -1"),
        # learning rates and schedules megatron-core would reject (or assert on mid-run)
        (["actor_optimizer.lr=-1e-3"], r"actor_optimizer.lr must be >= 0"),
        (["critic_optimizer.min_lr=-1"], r"critic_optimizer.min_lr must be >= 0"),
        (
            ["actor_optimizer.lr=1e-5", "actor_optimizer.min_lr=1e-4"],
            r"actor_optimizer.min_lr=0.0001 must not exceed actor_optimizer.lr=1e-05",
        ),
        (["critic_optimizer.lr_decay_style=WSD"], r"critic_optimizer.lr_decay_style='WSD'"),
        (["actor_optimizer.lr_decay_style=exp"], r"actor_optimizer.lr_decay_style='exp'"),
        (["actor_optimizer.clip_grad=-1"], r"actor_optimizer.clip_grad must be >= 0"),
        (["actor_optimizer.adam_beta1=1.0"], r"actor_optimizer.adam_beta1 must be in \[0, 1\)"),
        (["critic_optimizer.adam_beta2=-0.1"], r"critic_optimizer.adam_beta2 must be in"),
        (["actor_optimizer.adam_eps=0"], r"actor_optimizer.adam_eps must be > 0"),
        (["critic_optimizer.weight_decay=-0.01"], r"critic_optimizer.weight_decay must be >= 0"),
        # data
        (["data.truncation_side=middle"], r"data.truncation_side='middle'"),
        (["data.chat_template=no slot"], r"data.chat_template='no slot' must contain"),
        # rewards
        (["reward.rules=[{function: mymodule.score}]"], r"reward.rules\[0\].function='mymodule"),
        (["reward.score_clip=0"], r"reward.score_clip=0.0 must be > 0"),
        # lengths: prompt + response beyond the model's positions
        (
            ["data.max_prompt_length=500", "generation.max_new_tokens=13"],
            r"data.max_prompt_length \+ generation.max_new_tokens = 500 \+ 13 = 513 exceeds "
            r"model.max_position_embeddings=512",
        ),
    ],
)
def test_ppo_values_that_would_fail_mid_run_are_refused_at_load(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _ppo(tmp_path, overrides)


@pytest.mark.parametrize(
    "key", ["optimizer.lr=-1", "optimizer.adam_eps=-1e-8", "optimizer.lr_decay_style=step"]
)
def test_pretraining_optimizer_section_is_checked_too(key):
    with pytest.raises(ConfigError, match=rf"^{key.split('=')[0]}"):
        load_config(None, [key])


def test_pretraining_sequences_must_fit_the_model_positions():
    with pytest.raises(ConfigError, match="train.seq_length=600 exceeds model.max_position"):
        load_config(None, ["train.seq_length=600"])
    load_config(None, ["train.seq_length=512"])


def test_kv_cache_budget_must_hold_the_longest_sequence_at_load(tmp_path):
    """Default model (2 layers, 4 query groups of head dim 16, fp32): one 16-token block is
    2 x 2 x 4 x 16 x 16 x 4 B = 16 KiB; the longest sequence, 64 + 32 = 96 tokens, needs 6
    blocks. The TP split divides the heads, so TP=2 halves the bytes per block."""
    block = 2 * 2 * 4 * 16 * 16 * 4
    assert _ppo(tmp_path, [f"generation.engine.cache_budget_bytes={6 * block}"])
    with pytest.raises(
        ConfigError,
        match=r"generation.engine.cache_budget_bytes is too small: data.max_prompt_length \+ "
        r"generation.max_new_tokens = 64 \+ 32 = 96; KV-cache budget of 5 blocks",
    ):
        _ppo(tmp_path, [f"generation.engine.cache_budget_bytes={6 * block - 1}"])
    tp2 = ["parallel.tensor_model_parallel_size=2"]
    assert _ppo(tmp_path, [*tp2, f"generation.engine.cache_budget_bytes={3 * block}"])
    with pytest.raises(ConfigError, match="cache_budget_bytes is too small"):
        _ppo(tmp_path, [*tp2, f"generation.engine.cache_budget_bytes={3 * block - 1}"])
    with pytest.raises(ConfigError, match=r"cache_budget_blocks is too small.*96 tokens \(6"):
        _ppo(tmp_path, ["generation.engine.cache_budget_blocks=5"])
    with pytest.raises(ConfigError, match=r"cache_budget_bytes is too small.*\(2 blocks\)"):
        _ppo(
            tmp_path,
            [
                "model.params_dtype=bf16",  # 2-byte elements: half the bytes per block
                "data.max_prompt_length=20",
                "generation.max_new_tokens=12",
                f"generation.engine.cache_budget_bytes={block // 2 * 2 - 1}",
            ],
        )
