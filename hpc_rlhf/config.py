"""One frozen configuration tree, loaded from YAML with dotted command-line overrides.

Every section is a frozen dataclass. ``load_config(path, overrides)`` reads a YAML file,
applies overrides such as ``model.num_layers=4`` and builds the tree; unknown keys, values
of the wrong type and impossible layouts raise ``ConfigError`` naming the key. Values that
follow from others are properties, never mutated fields.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from hpc_rlhf.inference.config import (
    CacheShape,
    CacheTooSmallError,
    EngineConfigError,
    GenerationConfig,
    require_at_least,
    require_capacity,
)


class InputError(ValueError):
    """Bad user input (a config value, a data or model file, a rule reward), named in the
    message: the CLI prints it as one line, without a traceback."""


class ConfigError(InputError):
    """A configuration value is unknown, of the wrong type, or impossible."""


DTYPES = ("fp32", "bf16", "fp16")
# decoder families (HF architectures, see models/hf_config.py) and RoPE scalings
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
ROPE_SCALINGS = ("none", "llama3")
TRUNCATION_SIDES = ("left", "right")  # see DataConfig.truncation_side
# what megatron-core's OptimizerParamScheduler accepts without extra settings ("WSD" needs
# wsd_decay_steps, which this config does not carry)
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


def _positive(section: object, prefix: str, names: tuple[str, ...]) -> None:
    """``ConfigError`` naming ``prefix + name`` for the first of ``names`` below 1."""
    require_at_least(section, prefix, names, 1, ConfigError)


def _non_negative(section: object, prefix: str, names: tuple[str, ...]) -> None:
    """``ConfigError`` naming ``prefix + name`` for the first of ``names`` below 0."""
    require_at_least(section, prefix, names, 0, ConfigError)


HOST_ALLOCATORS = ("caching", "system")  # see parallel/host_allocator.py


# data.chat_template value: the tokenizer directory's own template (apply_chat_template)
TOKENIZER_CHAT_TEMPLATE = "tokenizer"


def _check_chat_template(data: Any) -> None:
    template = data.chat_template
    if template not in (None, TOKENIZER_CHAT_TEMPLATE) and "{prompt}" not in template:
        raise ConfigError(
            f"data.chat_template={template!r} must contain '{{prompt}}' (or be "
            f"{TOKENIZER_CHAT_TEMPLATE!r}: the tokenizer's own chat template)"
        )


# layouts of public prompt sets with references (data.prompt_presets), and the reference
# fields each fills (a PPO run's data.reference_fields default to them)
PROMPT_PRESETS = ("gsm8k", "math", "mbpp")
PRESET_REFERENCES = {"gsm8k": ("answer",), "math": ("answer",), "mbpp": ("tests",)}
# keyword arguments every rule receives already, so no prompt field may take their name
RULE_ARGUMENTS = ("prompt_ids", "response_ids", "tokenizer")


def _check_reference_fields(fields: tuple[str, ...]) -> None:
    names = list(fields)
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or name in RULE_ARGUMENTS:
            raise ConfigError(
                f"data.reference_fields: {name!r} must be a field name usable as a keyword "
                f"argument, not one of {RULE_ARGUMENTS}"
            )
    if len(set(names)) != len(names) or "prompt" in names:
        raise ConfigError(f"data.reference_fields={names}: names must be distinct and not 'prompt'")


def _check_truncation_side(data: Any) -> None:
    if data.truncation_side not in TRUNCATION_SIDES:
        raise ConfigError(
            f"data.truncation_side={data.truncation_side!r}: expected one of {TRUNCATION_SIDES}"
        )


def _check_training_data(data: Any) -> None:
    """The held-out split and preset of an SFT or preference ``data`` section."""
    if not 0.0 <= data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={data.eval_fraction} must be in [0, 1)")
    if data.preset is not None and data.preset not in data.PRESETS:
        raise ConfigError(f"data.preset={data.preset!r}: expected one of {data.PRESETS}")
    if data.preset is not None and data.path is None:
        raise ConfigError(
            f"data.preset={data.preset!r} needs data.path (the shipped set has our layout)"
        )


@dataclass(frozen=True)
class MegatronOverrides:
    """Which of hpc_rlhf's substitutions in megatron-core are on (``models.overrides``
    lists and applies them); all on by default, each off runs megatron-core's own code."""

    swiglu_mlp: bool = True  # local spec: fused SwiGLU MLP
    core_attention: bool = True  # local spec: fused causal attention, packed THD batches
    fused_rmsnorm: bool = True  # local spec: RMSNorm as one fused op (ops.rms_norm)
    selective_outputs: bool = True  # LM head and last layer's MLP on the rows read only
    onednn_gemm: bool = True  # CPU: linear layers' GEMMs on oneDNN
    sparse_embedding_grad: bool = True  # CPU: sparse embedding weight gradients
    rope_kernel: bool = True  # CPU: one-pass RoPE kernel


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention, and the
    families built on it. ``family`` is the HF architecture (``LlamaForCausalLM``,
    ``Qwen2ForCausalLM``, ...) and fixes what that architecture always has: ``qwen2``
    biases on the query, key and value projections (``qkv_bias``), ``qwen3`` RMSNorm over
    each head's queries and keys before RoPE (``qk_norm``). The options a checkpoint's
    config.json sets:

    * ``kv_channels``: the head dimension when it is not ``hidden_size / heads`` (Qwen3);
    * ``rope_scaling: llama3`` with its factor, low/high frequency factors and original
      context length (Llama-3.1 / 3.2; ``llama`` family only);
    * ``sliding_window``: each token attends to at most this many latest positions, itself
      included (``mistral`` family only).

    Each maps onto a megatron-core ``TransformerConfig`` field (``kv_channels``,
    ``add_qkv_bias``, ``qk_layernorm``) or, for RoPE, onto its rotary frequencies.
    """

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: as many as heads (multi-head attention)
    ffn_hidden_size: int = 176
    vocab_size: int = 256
    max_position_embeddings: int = 512
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    params_dtype: str = "fp32"
    init_method_std: float = 0.02
    transformer_impl: str = "local"  # "local" (torch) or "transformer_engine" (GPU, when installed)
    family: str = "llama"  # one of FAMILIES
    kv_channels: int | None = None  # None: hidden_size // num_attention_heads
    rope_scaling: str = "none"  # one of ROPE_SCALINGS
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    sliding_window: int | None = None
    overrides: MegatronOverrides = field(default_factory=MegatronOverrides)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        """Biases on the query, key and value projections (Qwen2 / Qwen2.5)."""
        return self.family == "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Per-head RMSNorm of queries and keys before RoPE (Qwen3)."""
        return self.family == "qwen3"

    @property
    def torch_dtype(self):
        """The ``torch.dtype`` of ``params_dtype``."""
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            self.params_dtype
        ]

    def validate(self) -> None:
        """Raise ``ConfigError`` for shapes no model can have."""
        sizes = (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "ffn_hidden_size",
            "vocab_size",
            "max_position_embeddings",
            "kv_channels",
            "sliding_window",
            "rope_original_max_positions",
        )
        _positive(self, "model.", sizes)
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads} (set model.kv_channels "
                "for a head dimension of its own)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model head dimension {self.head_dim} must be even (RoPE pairs)")
        if self.num_attention_heads % self.query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={self.query_groups}"
            )
        for name, allowed in (
            ("params_dtype", DTYPES),
            ("family", FAMILIES),
            ("rope_scaling", ROPE_SCALINGS),
            ("transformer_impl", ("local", "transformer_engine")),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"model.{name}={getattr(self, name)!r}: expected one of {allowed}"
                )
        for name, family in (("rope_scaling", "llama"), ("sliding_window", "mistral")):
            if getattr(self, name) not in (None, "none") and self.family != family:
                raise ConfigError(
                    f"model.{name}={getattr(self, name)!r} is a {family!r} option; "
                    f"model.family is {self.family!r}"
                )
        if (
            self.sliding_window is not None
            and self.transformer_impl == "local"
            and not self.overrides.core_attention
        ):
            raise ConfigError(
                "model.sliding_window needs model.overrides.core_attention (megatron-core's "
                "local attention replaces the padding mask by the window mask)"
            )
        if self.rope_scaling == "llama3" and not (
            self.rope_scaling_factor >= 1
            and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
        ):
            raise ConfigError(
                "model.rope_scaling=llama3 needs rope_scaling_factor >= 1 and "
                "0 < rope_low_freq_factor < rope_high_freq_factor, got "
                f"{self.rope_scaling_factor}, {self.rope_low_freq_factor}, "
                f"{self.rope_high_freq_factor}"
            )


@dataclass(frozen=True)
class ParallelConfig:
    """How ranks are laid out: TP x PP (x virtual stages) x DP = world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # CPU runs: "caching" keeps freed large blocks in the heap (no page faults on reuse),
    # "system" keeps the C library's defaults (see parallel/host_allocator.py)
    host_allocator: str = "caching"

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size for ``world_size`` ranks (raises if it does not divide)."""
        if world_size % self.model_parallel_size:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size x "
                f"pipeline_model_parallel_size = {self.tensor_model_parallel_size} x "
                f"{self.pipeline_model_parallel_size}"
            )
        return world_size // self.model_parallel_size

    def validate(self, model: ModelConfig, world_size: int | None = None) -> None:
        """Raise ``ConfigError`` naming the key when ``model`` cannot be laid out this way."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        vpp = self.virtual_pipeline_model_parallel_size or 1
        if tp < 1 or pp < 1 or vpp < 1:
            raise ConfigError("parallel sizes must be >= 1")
        if self.host_allocator not in HOST_ALLOCATORS:
            raise ConfigError(
                f"parallel.host_allocator={self.host_allocator!r}: expected one of "
                f"{HOST_ALLOCATORS}"
            )
        checks = [
            (
                model.num_attention_heads,
                tp,
                "model.num_attention_heads",
                "parallel.tensor_model_parallel_size",
            ),
            (
                model.query_groups,
                tp,
                "model.num_query_groups",
                "parallel.tensor_model_parallel_size",
            ),
            (
                model.ffn_hidden_size,
                tp,
                "model.ffn_hidden_size",
                "parallel.tensor_model_parallel_size",
            ),
            (model.vocab_size, tp, "model.vocab_size", "parallel.tensor_model_parallel_size"),
            (
                model.num_layers,
                pp * vpp,
                "model.num_layers",
                "parallel.pipeline_model_parallel_size x virtual_pipeline_model_parallel_size",
            ),
        ]
        for value, divisor, key, by in checks:
            if value % divisor:
                raise ConfigError(f"{key}={value} is not divisible by {by}={divisor}")
        if self.virtual_pipeline_model_parallel_size is not None and pp < 2:
            raise ConfigError(
                "parallel.virtual_pipeline_model_parallel_size needs "
                "pipeline_model_parallel_size >= 2"
            )
        if self.sequence_parallel and tp < 2:
            raise ConfigError("parallel.sequence_parallel needs tensor_model_parallel_size >= 2")
        if world_size is not None:
            self.data_parallel_size(world_size)


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam with decoupled weight decay, warmup then cosine (or constant) learning rate."""

    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    lr_decay_style: str = "cosine"  # "cosine" | "constant" | "linear" | "inverse-square-root"
    # fp16 only (model.params_dtype: fp16): dynamic loss scaling. The scale starts at
    # initial_loss_scale, halves after `hysteresis` overflowing steps in a row (those steps
    # are skipped) and doubles after loss_scale_window clean ones. 2^16 as DeepSpeed and
    # apex start (megatron-core's 2^32 costs 2 x 16 more skipped steps at hysteresis 2).
    initial_loss_scale: float = 65536.0
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2

    def validate(self, prefix: str = "optimizer.") -> None:
        """Raise ``ConfigError`` naming ``prefix + key`` for values megatron-core's
        optimizer or ``OptimizerParamScheduler`` would reject (or assert on mid-run)."""
        _non_negative(self, prefix, ("warmup_steps",))
        for name in ("lr", "min_lr", "weight_decay", "clip_grad"):
            if not getattr(self, name) >= 0:  # NaN fails too
                raise ConfigError(f"{prefix}{name} must be >= 0, got {getattr(self, name)}")
        if self.min_lr > self.lr:
            raise ConfigError(f"{prefix}min_lr={self.min_lr} must not exceed {prefix}lr={self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{prefix}{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_eps > 0:
            raise ConfigError(f"{prefix}adam_eps must be > 0, got {self.adam_eps}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(
                f"{prefix}lr_decay_style={self.lr_decay_style!r}: expected one of {LR_DECAY_STYLES}"
            )
        _positive(self, prefix, ("loss_scale_window", "hysteresis"))
        if not 0 < self.min_loss_scale <= self.initial_loss_scale < math.inf:
            raise ConfigError(
                f"{prefix}initial_loss_scale={self.initial_loss_scale} and min_loss_scale="
                f"{self.min_loss_scale} must satisfy 0 < min_loss_scale <= initial_loss_scale "
                "(finite)"
            )


# algorithms.advantages' estimators; the group ones compare a prompt's samples
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "drgrpo", "reinforce_pp", "reinforce_pp_baseline")
GROUP_ESTIMATORS = ("grpo", "rloo", "drgrpo", "reinforce_pp_baseline")
TRACKERS = ("wandb", "mlflow")
WANDB_MODES = ("offline", "online")


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment trackers besides the always-written JSONL and TensorBoard (rank 0 only,
    ``utils.trackers``): ``backends`` among ``wandb`` and ``mlflow``, the run's config
    recorded with it. ``project`` is the W&B project and the MLflow experiment."""

    backends: tuple[str, ...] = ()
    project: str = "hpc_rlhf"
    run_name: str | None = None
    wandb_mode: str = "offline"  # "online" needs a W&B login and network
    mlflow_tracking_uri: str | None = None  # None: a file store under OUT_DIR/mlruns

    def validate(self) -> None:
        """``ConfigError`` naming an unknown backend or mode, or one not installed."""
        import importlib.util

        for name in self.backends:
            if name not in TRACKERS:
                raise ConfigError(f"tracking.backends: {name!r} is not one of {TRACKERS}")
            if importlib.util.find_spec(name) is None:  # each backend is its package's name
                raise ConfigError(
                    f"tracking.backends has {name!r} but the {name} package is not "
                    "installed (pip install hpc_rlhf[trackers])"
                )
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(
                f"tracking.wandb_mode={self.wandb_mode!r}: expected one of {WANDB_MODES}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """A supervised run's step loop (pre-training and SFT): batches, checkpoints, eval."""

    steps: int = 20
    seq_length: int = 32  # pre-training: window length; SFT: longest sample (tokens)
    micro_batch_size_per_rank: int = 2
    global_batch_size: int = 8
    seed: int = 1234
    log_interval: int = 1
    save_dir: str | None = None
    save_interval: int = 0  # 0: no periodic checkpoints (the last step is still saved)
    # resume from the previous complete checkpoint when the newest cannot be read
    resume_fallback: bool = False
    eval_interval: int = 0  # held-out loss every N steps and at the end (0: at the end only)
    # run padded micro-batches as one packed row of their real tokens (THD format)
    pack_sequences: bool = True
    # packed rows whose first 16+ tokens equal an earlier row's (a pair's prompt, a
    # group's prompt) run those tokens once (models.packing, shared prefixes)
    share_prefixes: bool = True
    hf_export_dir: str | None = None  # write the trained model in HF format here

    def validate(self, model: ModelConfig) -> None:
        """Raise ``ConfigError`` naming the ``train.`` key of an impossible value."""
        _positive(
            self,
            "train.",
            (
                "steps",
                "seq_length",
                "micro_batch_size_per_rank",
                "global_batch_size",
                "log_interval",
            ),
        )
        _non_negative(self, "train.", ("save_interval", "eval_interval"))
        check_packing_runs(model, self.pack_sequences, "train.pack_sequences")
        if self.seq_length > model.max_position_embeddings:
            raise ConfigError(
                f"train.seq_length={self.seq_length} exceeds "
                f"model.max_position_embeddings={model.max_position_embeddings}"
            )


@dataclass(frozen=True)
class Config:
    """The whole tree. Sections are added here as stages land (PPO, generation, data)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self, world_size: int | None = None) -> Config:
        """Check every section and the layout; return self for chaining."""
        self.model.validate()
        self.tracking.validate()
        self.parallel.validate(self.model, world_size)
        self.optimizer.validate("optimizer.")
        self.train.validate(self.model)
        if world_size is not None:
            dp = self.parallel.data_parallel_size(world_size)
            per_step = self.train.micro_batch_size_per_rank * dp
            if self.train.global_batch_size % per_step:
                raise ConfigError(
                    f"train.global_batch_size={self.train.global_batch_size} is not divisible "
                    f"by micro_batch_size_per_rank x data-parallel size = {per_step}"
                )
        return self


@dataclass(frozen=True)
class SFTDataConfig:
    """Supervised fine-tuning data: rows ``{prompt_key: ..., response_key: ...}`` or
    ``{messages_key: [{role_key: ..., content_key: ...}, ...]}`` of a local .jsonl, .json,
    .parquet or .arrow file, or the ``chosen`` dialogues of a public preference set's layout
    (``preset``, ``data.presets``); the loss reads the assistant turns (and their EOS) only."""

    # Anthropic HH-RLHF, UltraFeedback binarized
    PRESETS: typing.ClassVar[tuple[str, ...]] = ("hh_rlhf", "ultrafeedback")

    path: str | None = None  # None: the shipped tiny set
    preset: str | None = None  # a row layout of PRESETS; None: the keys below
    eval_path: str | None = None  # None: hold out eval_fraction of path's rows
    eval_fraction: float = 0.05
    tokenizer: str | None = None  # None: the shipped tiny sentencepiece model
    chat_template: str | None = "<|user|> {prompt} <|assistant|>"  # wraps each user turn
    prompt_key: str = "prompt"
    response_key: str = "response"
    messages_key: str = "messages"
    role_key: str = "role"
    content_key: str = "content"
    truncation_side: str = "right"  # which end of a too long sample is cut
    shuffle: bool = True

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the ``data.`` key of an impossible value."""
        _check_training_data(self)
        _check_truncation_side(self)
        _check_chat_template(self)


@dataclass(frozen=True)
class SFTRunConfig(Config):
    """Everything an SFT run needs (``hpc-rlhf sft --config FILE``): the supervised step
    loop of ``Config`` with conversation data and optional initial weights."""

    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    init: str | None = None  # HF checkpoint to fine-tune; None: seeded random weights

    def validate(self, world_size: int | None = None) -> SFTRunConfig:
        """Check every section and the layout; return self for chaining."""
        super().validate(world_size)
        self.data.validate()
        return self


@dataclass(frozen=True)
class PreferenceDataConfig:
    """Preference data for reward models, rows of a local .jsonl, .json, .parquet or .arrow
    file: pairs ``{prompt_key, chosen_key, rejected_key[, margin_key]}`` or K-wise rankings
    ``{prompt_key, responses_key: [...], ranking_key: [best response index, ..., worst]}``,
    or the layout of a public preference set (``preset``, ``data.presets``)."""

    # Anthropic HH-RLHF, PKU-SafeRLHF (the one with safety labels), UltraFeedback binarized
    PRESETS: typing.ClassVar[tuple[str, ...]] = ("hh_rlhf", "pku_saferlhf", "ultrafeedback")

    path: str | None = None  # None: the shipped tiny preference set
    preset: str | None = None  # a row layout of PRESETS; None: the keys below
    eval_path: str | None = None  # None: hold out eval_fraction of path's rows
    eval_fraction: float = 0.1
    tokenizer: str | None = None  # None: the shipped tiny sentencepiece model
    chat_template: str | None = "<|user|> {prompt} <|assistant|>"
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    responses_key: str = "responses"
    ranking_key: str = "ranking"
    margin_key: str = "margin"  # a label of rm.margins, or a number; absent: margin 0
    # safety labels (true = safe) a cost model needs: of a pair's responses, or one per
    # response of a ranking
    chosen_safe_key: str = "chosen_safe"
    rejected_safe_key: str = "rejected_safe"
    safe_key: str = "safe"
    # KTO's unpaired rows {prompt_key, completion_key, label_key (true: desirable)}
    completion_key: str = "completion"
    label_key: str = "label"
    shuffle: bool = True

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the ``data.`` key of an impossible value."""
        _check_training_data(self)
        _check_chat_template(self)


@dataclass(frozen=True)
class RankingLossConfig:
    """The reward model's ranking loss: ``-log sigmoid(r_chosen - r_rejected - margin)``
    over every ordered pair of a sample, each sample weighted equally (InstructGPT), plus
    ``regularization`` x the mean squared end score (Safe-RLHF)."""

    # Llama-2's margin labels -> margin (its "large" variant); rows name a label or a number
    margins: dict = field(
        default_factory=lambda: {
            "significantly_better": 3.0,
            "better": 2.0,
            "slightly_better": 1.0,
            "negligibly_better": 0.0,
        }
    )
    regularization: float = 0.0
    # "reward": the ranking loss above; "cost": Safe-RLHF's cost model (the less safe
    # response costs more, costs have the sign of the safety labels; margins unused)
    objective: str = "reward"
    # after training, store (mean, std) of the end scores over the held-out responses with
    # the HF export, so PPO and eval read (score - mean) / std: mean 0, std 1
    normalize_scores: bool = False

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the ``rm.`` key of an impossible value."""
        if self.objective not in ("reward", "cost"):
            raise ConfigError(f"rm.objective={self.objective!r}: expected 'reward' or 'cost'")
        for label, value in self.margins.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(f"rm.margins[{label!r}]={value!r}: expected a number")
        if self.regularization < 0:
            raise ConfigError(f"rm.regularization={self.regularization} must be >= 0")
        if self.objective == "cost" and self.normalize_scores:
            raise ConfigError(
                "rm.normalize_scores with rm.objective=cost: a cost's sign is its safety verdict "
                "(> 0: unsafe), and centring the scores would move that zero"
            )


@dataclass(frozen=True)
class RMRunConfig(Config):
    """Everything a reward-model run needs (``hpc-rlhf rm --config FILE``): the supervised
    step loop of ``Config`` (``train.global_batch_size`` counts samples, each with its
    responses) on preference data, the ranking loss, optional initial weights."""

    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    rm: RankingLossConfig = field(default_factory=RankingLossConfig)
    init: str | None = None  # HF checkpoint (e.g. the SFT model); None: seeded random weights

    def validate(self, world_size: int | None = None) -> RMRunConfig:
        """Check every section and the layout; return self for chaining."""
        super().validate(world_size)
        self.data.validate()
        self.rm.validate()
        if self.rm.normalize_scores and not self.train.hf_export_dir:
            raise ConfigError(
                "rm.normalize_scores stores the statistics with the HF export: set train.hf_export_dir"
            )
        return self


# the DPO family's losses (``algorithms.preference``) and their published beta
DPO_LOSSES = ("sigmoid", "ipo", "simpo", "orpo", "kto")
DPO_DEFAULT_BETA = {"sigmoid": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}


@dataclass(frozen=True)
class DPOConfig:
    """Offline preference optimisation (``hpc-rlhf dpo``): ``loss`` names a loss of
    ``algorithms.preference`` (``sigmoid`` DPO, conservative DPO with ``label_smoothing``,
    ``ipo``, ``simpo`` and ``orpo`` without a reference, ``kto`` on unpaired completions).
    ``beta`` (ORPO's lambda) defaults to the method's published value
    (``DPO_DEFAULT_BETA``); SimPO's ``simpo_gamma`` to its Llama-3-Base recipe (beta 2,
    gamma 1)."""

    loss: str = "sigmoid"
    beta: float | None = None
    label_smoothing: float = 0.0  # conservative DPO (sigmoid) and SimPO
    simpo_gamma: float = 1.0
    desirable_weight: float = 1.0  # KTO
    undesirable_weight: float = 1.0
    reference: str | None = None  # HF checkpoint of the frozen reference; None: init's weights
    # one reference pass over the data before training (cached in train.save_dir), then no
    # reference model in memory; else a reference pass per step
    precompute_reference: bool = False
    # online / iterative DPO: each step's pairs are sampled from the policy being trained
    # (``sampling``, ``generation``) and judged by the ``reward`` section: per prompt the
    # best-scored response is chosen, the worst rejected
    online: bool = False

    @property
    def reference_free(self) -> bool:
        return self.loss in ("simpo", "orpo")

    def effective_beta(self) -> float:
        return self.beta if self.beta is not None else DPO_DEFAULT_BETA[self.loss]

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the ``dpo.`` key of an impossible value."""
        if self.loss not in DPO_LOSSES:
            raise ConfigError(f"dpo.loss={self.loss!r}: expected one of {DPO_LOSSES}")
        if self.beta is not None and not self.beta > 0:
            raise ConfigError(f"dpo.beta={self.beta} must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss not in ("sigmoid", "simpo"):
            raise ConfigError(
                f"dpo.label_smoothing applies to the sigmoid and simpo losses, not {self.loss!r}"
            )
        for key in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"dpo.{key}={getattr(self, key)} must be > 0")
        if self.reference_free and (self.reference or self.precompute_reference):
            raise ConfigError(
                f"dpo.loss={self.loss!r} is reference-free: dpo.reference and "
                "dpo.precompute_reference do not apply"
            )
        if self.online and (self.loss == "kto" or self.precompute_reference):
            raise ConfigError(
                "dpo.online samples new pairs each step: it takes a paired loss (not kto) "
                "and a reference pass per step (not dpo.precompute_reference)"
            )


@dataclass(frozen=True)
class SamplingConfig:
    """Prompts for trainers that learn from their own samples (online DPO, rejection
    sampling): a prompt file as PPO reads it (``data.chat_template`` applied, BOS first, cut
    to ``max_prompt_length`` tokens on ``truncation_side``) and how many responses the
    policy samples per prompt."""

    prompts: str | None = None  # None: the shipped tiny story prompts
    max_prompt_length: int = 64
    truncation_side: str = "left"
    samples_per_prompt: int = 2
    shuffle: bool = True

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the ``sampling.`` key of an impossible value."""
        _positive(self, "sampling.", ("max_prompt_length",))
        if self.samples_per_prompt < 2:
            raise ConfigError(
                f"sampling.samples_per_prompt={self.samples_per_prompt} must be >= 2 (a pair, "
                "or a best of several)"
            )
        _check_truncation_side(self)


@dataclass(frozen=True)
class DPORunConfig(Config):
    """Everything a DPO-family run needs (``hpc-rlhf dpo --config FILE``): the supervised
    step loop of ``Config`` (``train.global_batch_size`` counts samples: pairs, rankings or,
    for KTO, completions) on preference data, the loss, the initial policy (``init``, e.g.
    the SFT model) and the frozen reference (``dpo.reference``, default ``init``)."""

    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    init: str | None = None  # HF checkpoint (e.g. the SFT model); None: seeded random weights
    # online DPO only (dpo.online): prompts, sampling and the judge
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    generation: RolloutConfig = field(default_factory=lambda: RolloutConfig())
    reward: RewardConfig = field(default_factory=lambda: RewardConfig())

    def validate(self, world_size: int | None = None) -> DPORunConfig:
        """Check every section and the layout; return self for chaining."""
        super().validate(world_size)
        self.data.validate()
        self.dpo.validate()
        if self.dpo.online:
            check_self_sampling(self, "dpo.online")
        return self


def check_self_sampling(cfg: Any, what: str) -> None:
    """The sections of a trainer that samples from its policy: ``sampling``,
    ``generation`` (the engine's KV budget against the longest sequence) and a ``reward``
    with at least one model or rule."""
    cfg.sampling.validate()
    cfg.generation.validate()
    try:
        cfg.reward.validate()
    except ConfigError as err:
        raise ConfigError(f"{what} needs a judge: {err}") from err
    check_sequence_fits(cfg, "sampling")


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling for rollouts, and the generation engine's settings (``engine``, the
    engine's own ``inference.config.GenerationConfig``)."""

    max_new_tokens: int = 32
    temperature: float = 1.0  # > 0: PPO learns from sampled responses (no greedy rollouts)
    top_k: int = 0  # 0: off; k >= 1 samples among the k most likely tokens
    top_p: float = 1.0  # in (0, 1]; 1: off
    stop_at_eos: bool = True
    offload_training_state: bool = True  # release optimizer state/grads while generating
    engine: GenerationConfig = field(default_factory=GenerationConfig)

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the ``generation.`` key of an impossible value."""
        _positive(self, "generation.", ("max_new_tokens",))
        _non_negative(self, "generation.", ("top_k",))
        if not self.temperature > 0:
            # temperature 0 would be greedy decoding: n identical samples per prompt, and the
            # trainer's log-probs at temperature T divide the logits by T
            raise ConfigError(
                f"generation.temperature={self.temperature} must be > 0 (PPO needs sampled "
                "rollouts; use a small temperature such as 0.1 for nearly greedy ones)"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generation.top_p={self.top_p} must be in (0, 1]")
        try:
            self.engine.validate("generation.engine.")
        except EngineConfigError as err:
            raise ConfigError(str(err)) from err


@dataclass(frozen=True)
class RewardModelSpec:
    """A reward (or cost) model: an HF checkpoint directory with a score head, and its
    weight. ``role`` names a reward model's part in ``reward.combine: llama2_safety``
    ("helpfulness" or "safety")."""

    path: str
    weight: float = 1.0
    role: str | None = None


@dataclass(frozen=True)
class RuleRewardSpec:
    """A rule-based reward: ``module:function(prompt_ids, response_ids, tokenizer) -> float``."""

    function: str
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)


REWARD_COMBINES = ("sum", "llama2_safety")


@dataclass(frozen=True)
class RewardConfig:
    """Reward models and rule-based rewards. ``combine: sum`` (the default) adds their
    weighted scores; ``combine: llama2_safety`` takes a helpfulness and a safety reward model
    (``role``) and uses the safety score where the prompt is tagged unsafe
    (``data.safety_field``) or ``sigmoid(safety score) < safety_threshold``, the helpfulness
    score elsewhere, whitened over the batch (Llama-2, section 3.2.2); rules are added to
    it with their weights. The same section type lists PPO-Lagrangian's costs (``cost``)."""

    models: tuple[RewardModelSpec, ...] = ()
    rules: tuple[RuleRewardSpec, ...] = ()
    score_clip: float | None = None
    normalize: bool = False  # running mean/std of the combined score
    combine: str = "sum"
    safety_threshold: float = 0.15  # on sigmoid(safety score), llama2_safety only

    def validate(self, prefix: str = "reward.") -> None:
        """Raise ``ConfigError`` naming the ``reward.`` key of an impossible value (rules are
        imported when the trainer starts, ``rule_rewards.load_rule``)."""
        if not self.models and not self.rules:
            raise ConfigError(
                f"{prefix[:-1]}: give at least one of {prefix}models or {prefix}rules"
            )
        for i, rule in enumerate(self.rules):
            module, _, function = rule.function.partition(":")
            if not module or not function:
                raise ConfigError(
                    f"{prefix}rules[{i}].function={rule.function!r}: expected 'module:function'"
                )
        if self.score_clip is not None and not self.score_clip > 0:
            raise ConfigError(f"{prefix}score_clip={self.score_clip} must be > 0 (or null: off)")
        if self.combine not in REWARD_COMBINES:
            raise ConfigError(
                f"{prefix}combine={self.combine!r}: expected one of {REWARD_COMBINES}"
            )
        roles = [m.role for m in self.models]
        if self.combine == "llama2_safety":
            if sorted(r for r in roles if r) != ["helpfulness", "safety"]:
                raise ConfigError(
                    f"{prefix}combine=llama2_safety needs one {prefix}models entry with "
                    f"role: helpfulness and one with role: safety (got roles {roles})"
                )
            if not 0 < self.safety_threshold < 1:
                raise ConfigError(
                    f"{prefix}safety_threshold={self.safety_threshold} must be in (0, 1) "
                    "(it is compared with sigmoid(safety score))"
                )
        elif any(roles):
            raise ConfigError(
                f"{prefix}models[].role is read only with {prefix}combine=llama2_safety"
            )

    def model_index(self, role: str) -> int:
        """Position in ``models`` of the model with ``role``."""
        return [m.role for m in self.models].index(role)


@dataclass(frozen=True)
class LagrangianConfig:
    """PPO-Lagrangian's multiplier (Safe-RLHF's arguments): ``log lambda`` is learned by SGD
    on ``-(J_c - threshold) * lambda``, ``J_c`` the mean cost of the last
    ``episode_cost_window_size`` episodes over all data-parallel ranks, once per PPO step
    from step ``lambda_update_delay_steps`` on; ``lambda_max`` caps it. ``lambda_lr: 0``
    keeps lambda fixed (``lambda_init: 0`` then ignores the cost)."""

    threshold: float = 0.0
    lambda_init: float = 1.0
    lambda_lr: float = 0.1
    lambda_max: float | None = None
    lambda_update_delay_steps: int = 0
    episode_cost_window_size: int = 128

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the ``lagrangian.`` key of an impossible value."""
        _positive(self, "lagrangian.", ("episode_cost_window_size",))
        _non_negative(self, "lagrangian.", ("lambda_lr", "lambda_update_delay_steps"))
        if not math.isfinite(self.threshold):
            raise ConfigError(f"lagrangian.threshold={self.threshold} must be finite")
        if self.lambda_init < 0 or (self.lambda_init == 0 and self.lambda_lr):
            raise ConfigError(
                f"lagrangian.lambda_init={self.lambda_init} must be > 0 for a learned multiplier "
                "(log lambda is learned; 0 only with lagrangian.lambda_lr: 0)"
            )
        if self.lambda_max is not None and not self.lambda_max >= self.lambda_init:
            raise ConfigError(
                f"lagrangian.lambda_max={self.lambda_max} must be >= lagrangian.lambda_init="
                f"{self.lambda_init} (or null: no cap)"
            )


@dataclass(frozen=True)
class DataConfig:
    """Prompt data (JSONL ``{"prompt": ...}``), tokenizer, chat template, optional ptx text."""

    prompts: str | None = None  # None: the shipped tiny prompt set
    tokenizer: str | None = None  # None: the shipped tiny sentencepiece model
    chat_template: str | None = "<|user|> {prompt} <|assistant|>"
    max_prompt_length: int = 64  # tokens, BOS and chat template included
    # which end of a too long prompt's *text* is cut; BOS and the chat template around the
    # text are always kept. "left" keeps the end of the text (where the question usually
    # is), as TRL's PPO/GRPO and vLLM's truncate_prompt_tokens do.
    truncation_side: str = "left"
    ptx_data: str | None = None  # text file for the ptx (pre-training) loss
    shuffle: bool = True
    # a boolean field of the prompt rows: true tags an unsafe (adversarial) prompt, which
    # reward.combine=llama2_safety scores with the safety model; None: no tags
    safety_field: str | None = None
    # fields of the prompt rows handed to the rule rewards as keyword arguments (a math
    # verifier's reference "answer", a code verifier's "tests"); every row must have them
    reference_fields: tuple[str, ...] = ()
    # the row layout of a public prompt set (PROMPT_PRESETS: gsm8k, math, mbpp) read into
    # a prompt and its references; None: our rows {"prompt": ..., <reference fields>}
    preset: str | None = None

    @property
    def rule_fields(self) -> tuple[str, ...]:
        """The prompt fields the rules receive: ``reference_fields``, else the preset's."""
        if self.reference_fields or self.preset is None:
            return tuple(self.reference_fields)
        return PRESET_REFERENCES[self.preset]

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the ``data.`` key of an impossible value."""
        _positive(self, "data.", ("max_prompt_length",))
        _check_truncation_side(self)
        _check_chat_template(self)
        _check_reference_fields(self.reference_fields)
        if self.preset is not None and self.preset not in PROMPT_PRESETS:
            raise ConfigError(f"data.preset={self.preset!r}: expected one of {PROMPT_PRESETS}")
        if self.preset is not None and self.prompts is None:
            raise ConfigError(
                f"data.preset={self.preset!r} needs data.prompts (the shipped set has our layout)"
            )


@dataclass(frozen=True)
class PPOConfig:
    """PPO (and its GRPO / RLOO variants) hyper-parameters. ``algorithm: ppo_lag`` is
    Safe-RLHF's PPO-Lagrangian: costs (the run's ``cost`` section) learned by a cost critic,
    the actor's advantage ``(A_reward - lambda * A_cost) / (1 + lambda)`` with the
    multiplier of the ``lagrangian`` section."""

    algorithm: str = "ppo"  # "ppo" | "ppo_lag"
    steps: int = 10
    rollout_batch_size: int = 16  # prompts per step, over all data-parallel ranks
    n_samples_per_prompt: int = 1
    micro_batch_size_per_rank: int = 8
    # forward-only scoring keeps no activations, so it can take bigger micro-batches than
    # the updates; None: micro_batch_size_per_rank
    score_micro_batch_size_per_rank: int | None = None
    mini_batches_per_rollout: int = 1
    ppo_epochs: int = 1
    # "gae" | "grpo" | "rloo" | "drgrpo" | "reinforce_pp" | "reinforce_pp_baseline"
    advantage: str = "gae"
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_target: float | None = None  # set for the adaptive controller
    kl_horizon: int = 10000
    # GRPO's KL in the loss (verl's use_kl_loss, TRL's beta): coef * KL(pi || pi_ref) per
    # action token by kl_loss_estimator, reduced as the policy loss; 0: off. Independent of
    # kl_coef (the KL penalty in the reward): GRPO runs set kl_coef 0 and this instead
    kl_loss_coef: float = 0.0
    kl_loss_estimator: str = "k3"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    entropy_coef: float = 0.0
    ptx_coef: float = 0.0
    # "token_mean" | "seq_mean" | "token_sum" (Dr.GRPO: summed over tokens, divided by
    # sequences x generation.max_new_tokens, a constant: no per-response length normalisation)
    loss_reduction: str = "token_mean"
    policy_loss: str = "ppo"  # "ppo" (token ratios) | "gspo" (sequence ratio; seq_mean)
    # truncated importance sampling against the engine's log-probs: the cap C of
    # min(pi_trainer / pi_engine, C); None: off. Recomputes the old log-probs.
    tis_cap: float | None = None
    # DAPO: a soft length penalty over the last overlong_buffer tokens before
    # generation.max_new_tokens (0 -> -overlong_penalty); overlong_filter drops the loss of
    # responses cut at max_new_tokens
    overlong_buffer: int | None = None
    overlong_penalty: float = 1.0
    overlong_filter: bool = False
    # DAPO: drop prompt groups whose rewards are all equal and sample more prompts until
    # the batch is full, at most dynamic_sampling_max_rounds extra rounds (then the batch
    # is completed with equal-reward groups and a warning says so)
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 4
    whiten_advantages: bool = True
    critic_init: str = "actor"  # "actor" | "reward" (the first reward model) | "random"
    # ppo_lag: "cost" (the first cost model, Safe-RLHF's default) | "actor" | "random";
    # None: "cost" when cost.models are given, else "actor"
    cost_critic_init: str | None = None
    recompute_old_logprobs: bool = False  # else reuse the engine's (identical) log-probs
    # run padded micro-batches as one packed row of their real tokens (THD format)
    pack_sequences: bool = True
    # packed rows whose first 16+ tokens equal an earlier row's (a pair's prompt, a
    # group's prompt) run those tokens once (models.packing, shared prefixes)
    share_prefixes: bool = True
    seed: int = 1234
    log_interval: int = 1
    save_dir: str | None = None
    save_interval: int = 0  # 0: no periodic checkpoints (the last step is still saved)
    resume_fallback: bool = False  # the previous complete checkpoint if the newest is bad
    hf_export_dir: str | None = None  # write the final actor in HF format here

    @property
    def groups_prompts(self) -> bool:
        """Whether micro-batches keep a prompt's samples together: they share its tokens
        when packed with ``share_prefixes``."""
        return self.pack_sequences and self.share_prefixes

    @property
    def score_micro_batch(self) -> int:
        """Rows per forward-only scoring micro-batch."""
        return self.score_micro_batch_size_per_rank or self.micro_batch_size_per_rank

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the ``ppo.`` key of an impossible value."""
        positive = (
            "steps",
            "rollout_batch_size",
            "n_samples_per_prompt",
            "micro_batch_size_per_rank",
            "score_micro_batch_size_per_rank",
            "mini_batches_per_rollout",
            "ppo_epochs",
            "kl_horizon",
            "log_interval",
        )
        _positive(self, "ppo.", positive)
        _non_negative(self, "ppo.", ("save_interval",))
        if self.advantage not in ADVANTAGE_ESTIMATORS:
            raise ConfigError(
                f"ppo.advantage={self.advantage!r}: expected one of {ADVANTAGE_ESTIMATORS}"
            )
        if self.advantage in GROUP_ESTIMATORS and self.n_samples_per_prompt < 2:
            raise ConfigError(f"ppo.advantage={self.advantage} needs ppo.n_samples_per_prompt >= 2")
        if self.advantage.startswith("reinforce_pp") and not self.whiten_advantages:
            raise ConfigError(
                f"ppo.advantage={self.advantage} normalises over the batch: it needs "
                "ppo.whiten_advantages=true"
            )
        _non_negative(self, "ppo.", ("dynamic_sampling_max_rounds", "kl_loss_coef"))
        if self.dynamic_sampling and self.advantage not in GROUP_ESTIMATORS:
            raise ConfigError(
                f"ppo.dynamic_sampling drops groups of equal rewards, which only a group "
                f"estimator ignores: ppo.advantage={self.advantage} is not one of "
                f"{GROUP_ESTIMATORS}"
            )
        if self.policy_loss not in ("ppo", "gspo"):
            raise ConfigError(f"ppo.policy_loss={self.policy_loss!r}: expected ppo or gspo")
        if self.policy_loss == "gspo" and (self.loss_reduction != "seq_mean" or self.dual_clip):
            raise ConfigError(
                "ppo.policy_loss=gspo is a mean over sequences with no dual clip: set "
                "ppo.loss_reduction=seq_mean and leave ppo.dual_clip unset"
            )
        _positive(self, "ppo.", ("overlong_buffer",))
        if not self.overlong_penalty >= 0:
            raise ConfigError(f"ppo.overlong_penalty={self.overlong_penalty} must be >= 0")
        if self.tis_cap is not None and not self.tis_cap >= 1:
            raise ConfigError(f"ppo.tis_cap={self.tis_cap} must be >= 1")
        for key in ("kl_estimator", "kl_loss_estimator"):
            if getattr(self, key) not in ("k1", "k2", "k3"):
                raise ConfigError(f"ppo.{key}={getattr(self, key)!r}: expected k1, k2 or k3")
        if self.loss_reduction not in ("token_mean", "seq_mean", "token_sum"):
            raise ConfigError(f"ppo.loss_reduction={self.loss_reduction!r}")
        if self.critic_init not in ("actor", "reward", "random"):
            raise ConfigError(f"ppo.critic_init={self.critic_init!r}")
        if self.algorithm not in ("ppo", "ppo_lag"):
            raise ConfigError(f"ppo.algorithm={self.algorithm!r}: expected ppo or ppo_lag")
        if self.algorithm == "ppo_lag" and self.advantage != "gae":
            raise ConfigError(
                f"ppo.algorithm=ppo_lag learns reward and cost critics: it needs ppo.advantage=gae "
                f"(got {self.advantage})"
            )
        if self.cost_critic_init not in (None, "cost", "actor", "random"):
            raise ConfigError(f"ppo.cost_critic_init={self.cost_critic_init!r}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"ppo.dual_clip={self.dual_clip} must be > 1")

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"

    @property
    def constrained(self) -> bool:
        """PPO-Lagrangian: a cost critic and a learned multiplier."""
        return self.algorithm == "ppo_lag"


def check_packing_runs(model: ModelConfig, pack: bool, key: str) -> None:
    """Packed micro-batches (THD rows) need an attention that takes them: transformer-
    engine's, or the local spec's with ``model.overrides.core_attention`` (megatron-core's
    own ``DotProductAttention`` asserts on them at the first forward)."""
    if pack and model.transformer_impl == "local" and not model.overrides.core_attention:
        raise ConfigError(
            f"{key}=true needs model.overrides.core_attention (megatron-core's local "
            f"DotProductAttention takes no packed batches): set {key}=false or turn it on"
        )


def check_sequence_fits(cfg: Any, prompt_section: str = "data") -> None:
    """For a run that generates (``cfg`` with ``model``, ``parallel``, ``generation`` and
    a ``prompt_section`` with ``max_prompt_length``): the longest sequence (prompt +
    response) fits the model's positions and one sequence fits the KV cache of
    ``generation.engine`` (else a later, longer batch would fail mid-run)."""
    prompt_length = getattr(cfg, prompt_section).max_prompt_length
    longest = prompt_length + cfg.generation.max_new_tokens
    where = (
        f"{prompt_section}.max_prompt_length + generation.max_new_tokens = "
        f"{prompt_length} + {cfg.generation.max_new_tokens} = {longest}"
    )
    if longest > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"{where} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}"
        )
    engine = cfg.generation.engine
    shape = CacheShape.for_model(
        cfg.model,
        cfg.parallel.tensor_model_parallel_size,
        engine.block_size,
        engine.kv_dtype(cfg.model.torch_dtype),
    )
    try:
        require_capacity(shape, engine, longest)
    except CacheTooSmallError as err:
        key = "cache_budget_blocks" if engine.cache_budget_blocks else "cache_budget_bytes"
        raise ConfigError(f"generation.engine.{key} is too small: {where}; {err}") from err


@dataclass(frozen=True)
class PPORunConfig:
    """Everything a PPO run needs (``hpc-rlhf ppo --config FILE``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    actor_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    critic_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    generation: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    actor_init: str | None = None  # HF checkpoint directory; None: random weights
    # ppo.algorithm=ppo_lag: cost models / rule costs (> 0: unsafe), the cost critic's
    # optimizer and the multiplier
    cost: RewardConfig | None = None
    cost_critic_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lagrangian: LagrangianConfig = field(default_factory=LagrangianConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def cost_critic_init(self) -> str:
        """Where the cost critic starts: ``ppo.cost_critic_init`` or its default."""
        if self.ppo.cost_critic_init:
            return self.ppo.cost_critic_init
        return "cost" if self.cost is not None and self.cost.models else "actor"

    def _validate_constraint(self) -> None:
        """The ``cost`` / ``lagrangian`` sections against ``ppo.algorithm``."""
        if not self.ppo.constrained:
            if self.cost is not None:
                raise ConfigError("cost is read only with ppo.algorithm=ppo_lag")
            return
        if self.cost is None:
            raise ConfigError(
                "ppo.algorithm=ppo_lag needs a cost section (cost.models or cost.rules)"
            )
        self.cost.validate("cost.")
        if self.cost.combine != "sum" or self.cost.normalize:
            raise ConfigError(
                "cost: costs combine as a weighted sum, unnormalised (their sign is "
                "the safety verdict); remove cost.combine / cost.normalize"
            )
        self.cost_critic_optimizer.validate("cost_critic_optimizer.")
        self.lagrangian.validate()
        if self.cost_critic_init == "cost" and not self.cost.models:
            raise ConfigError("ppo.cost_critic_init='cost' needs at least one cost.models entry")

    def validate(self, world_size: int | None = None) -> PPORunConfig:
        """Check every section and the layout; return self for chaining."""
        self.model.validate()
        self.tracking.validate()
        self.parallel.validate(self.model, world_size)
        self.actor_optimizer.validate("actor_optimizer.")
        self.critic_optimizer.validate("critic_optimizer.")
        self.ppo.validate()
        check_packing_runs(self.model, self.ppo.pack_sequences, "ppo.pack_sequences")
        self.generation.validate()
        self.reward.validate()
        self.data.validate()
        check_sequence_fits(self)
        buffer = self.ppo.overlong_buffer
        if buffer is not None and buffer > self.generation.max_new_tokens:
            raise ConfigError(
                f"ppo.overlong_buffer={buffer} exceeds generation.max_new_tokens="
                f"{self.generation.max_new_tokens}"
            )
        if self.ppo.critic_init == "reward" and not self.reward.models:
            raise ConfigError("ppo.critic_init='reward' needs at least one reward.models entry")
        self._validate_constraint()
        if world_size is not None:
            dp = self.parallel.data_parallel_size(world_size)
            if self.ppo.rollout_batch_size % dp:
                raise ConfigError(
                    f"ppo.rollout_batch_size={self.ppo.rollout_batch_size} is not divisible by "
                    f"the data-parallel size {dp}"
                )
            samples = self.ppo.rollout_batch_size * self.ppo.n_samples_per_prompt // dp
            per_mini = samples // self.ppo.mini_batches_per_rollout
            if (
                samples % self.ppo.mini_batches_per_rollout
                or per_mini % self.ppo.micro_batch_size_per_rank
            ):
                raise ConfigError(
                    f"{samples} samples per rank do not split into ppo.mini_batches_per_rollout="
                    f"{self.ppo.mini_batches_per_rollout} mini-batches of whole "
                    f"ppo.micro_batch_size_per_rank={self.ppo.micro_batch_size_per_rank} micro-batches"
                )
        return self


@dataclass(frozen=True)
class ScorerSpec:
    """A model that scores responses in ``hpc-rlhf eval``: an HF checkpoint with a
    ``score`` head, read as a reward (higher is better) or a cost (> 0: unsafe)."""

    path: str
    kind: str = "reward"  # "reward" | "cost"
    name: str | None = None  # None: the directory's name


@dataclass(frozen=True)
class EvalConfig:
    """What ``hpc-rlhf eval`` measures."""

    prompts: int = 64  # the first N prompts of data.prompts (over all data-parallel ranks)
    samples_per_prompt: int = 1
    seed: int = 1234
    micro_batch_size_per_rank: int = 8  # rows per scoring micro-batch


@dataclass(frozen=True)
class EvalRunConfig:
    """Everything ``hpc-rlhf eval --config FILE`` needs: a policy (and optionally a baseline
    to compare it with, Safe-RLHF's arena) generating on a prompt set, scored by reward
    and cost models."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    policy: str | None = None  # HF checkpoint (required)
    baseline: str | None = None  # HF checkpoint to compare with (win rates)
    scorers: tuple[ScorerSpec, ...] = ()
    generation: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self, world_size: int | None = None) -> EvalRunConfig:
        """Check every section and the layout; return self for chaining."""
        self.model.validate()
        self.tracking.validate()
        self.parallel.validate(self.model, world_size)
        self.generation.validate()
        self.data.validate()
        check_sequence_fits(self)
        if not self.policy:
            raise ConfigError("policy: give the HF checkpoint of the policy to evaluate")
        if not self.scorers:
            raise ConfigError("scorers: give at least one reward or cost model")
        for i, scorer in enumerate(self.scorers):
            if scorer.kind not in ("reward", "cost"):
                raise ConfigError(f"scorers[{i}].kind={scorer.kind!r}: expected reward or cost")
        _positive(
            self.eval, "eval.", ("prompts", "samples_per_prompt", "micro_batch_size_per_rank")
        )
        if world_size is not None:
            dp = self.parallel.data_parallel_size(world_size)
            if self.eval.prompts % dp:
                raise ConfigError(
                    f"eval.prompts={self.eval.prompts} is not divisible by the data-parallel size {dp}"
                )
        return self


PIPELINE_STAGES = ("sft", "rm", "cost", "ppo")


@dataclass(frozen=True)
class RejectionSamplingConfig:
    """Rejection-sampling fine-tuning (Llama-2, ReST): ``rounds`` rounds, each sampling
    ``samples_per_prompt`` responses for ``prompts_per_round`` prompts with the current
    policy, keeping per prompt the ``best`` one, the ``top_k``, or every one scoring at least
    ``threshold``, then ``train.steps / rounds`` SFT steps on the kept set."""

    KEEP: typing.ClassVar[tuple[str, ...]] = ("best", "top_k", "threshold")

    rounds: int = 3
    prompts_per_round: int = 64  # over all data-parallel ranks
    samples_per_prompt: int = 4
    keep: str = "best"
    top_k: int = 2
    threshold: float = 0.0

    def validate(self, steps: int, dp_size: int) -> None:
        """Raise ``ConfigError`` naming the ``rs.`` key of an impossible value."""
        _positive(self, "rs.", ("rounds", "prompts_per_round", "samples_per_prompt"))
        if self.keep not in self.KEEP:
            raise ConfigError(f"rs.keep={self.keep!r}: expected one of {self.KEEP}")
        if self.keep == "top_k" and not 1 <= self.top_k <= self.samples_per_prompt:
            raise ConfigError(
                f"rs.top_k={self.top_k} must be in [1, rs.samples_per_prompt={self.samples_per_prompt}]"
            )
        if steps % self.rounds:
            raise ConfigError(f"train.steps={steps} must be a multiple of rs.rounds={self.rounds}")
        if self.prompts_per_round % dp_size:
            raise ConfigError(
                f"rs.prompts_per_round={self.prompts_per_round} is not divisible by the "
                f"{dp_size} data-parallel ranks"
            )


@dataclass(frozen=True)
class RejectionSamplingRunConfig(Config):
    """Everything a rejection-sampling run needs (``hpc-rlhf rejection-sampling --config
    FILE``): the supervised step loop of ``Config`` on the kept samples (``train.steps``
    over all rounds), prompts as PPO reads them (``data``), sampling (``generation``), the
    judge (``reward``: models and rules), the rounds (``rs``) and the initial policy."""

    data: DataConfig = field(default_factory=lambda: DataConfig())
    generation: RolloutConfig = field(default_factory=lambda: RolloutConfig())
    reward: RewardConfig = field(default_factory=lambda: RewardConfig())
    rs: RejectionSamplingConfig = field(default_factory=RejectionSamplingConfig)
    init: str | None = None  # HF checkpoint (e.g. the SFT model); None: seeded random weights

    def validate(self, world_size: int | None = None) -> RejectionSamplingRunConfig:
        """Check every section and the layout; return self for chaining."""
        super().validate(world_size)
        self.data.validate()
        if self.data.ptx_data is not None:
            raise ConfigError("data.ptx_data is PPO's: rejection sampling trains on its samples")
        dp = (world_size or self.parallel.model_parallel_size) // self.parallel.model_parallel_size
        self.rs.validate(self.train.steps, max(dp, 1))
        self.generation.validate()
        try:
            self.reward.validate()
        except ConfigError as err:
            raise ConfigError(f"rejection sampling needs a judge: {err}") from err
        check_sequence_fits(self)
        longest = self.data.max_prompt_length + self.generation.max_new_tokens
        if self.train.seq_length + 1 < longest:
            raise ConfigError(
                f"train.seq_length={self.train.seq_length} cannot hold a kept sample of up to "
                f"{longest} tokens (data.max_prompt_length + generation.max_new_tokens): set "
                f"it to at least {longest - 1}"
            )
        return self


@dataclass(frozen=True)
class PipelineConfig:
    """``hpc-rlhf pipeline``: SFT -> reward model (-> cost model) -> PPO on one model and
    layout. Each stage section holds that stage's own sections (``sft``: optimizer, train,
    data; ``rm`` / ``cost``: optimizer, train, data, rm; ``ppo``: actor_optimizer,
    critic_optimizer, ppo, generation, reward, data); the pipeline wires the stages through
    ``out_dir/<stage>/`` (``stage_config``): the reward and cost models and the PPO actor
    start from the SFT model, PPO's critic and first reward model from the reward model;
    with ``ppo: {ppo: {algorithm: ppo_lag}}`` the cost model is PPO's first cost model
    (and, by default, its cost critic's start)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    out_dir: str = "outputs/pipeline"
    init: str | None = None  # the base model (HF checkpoint); None: seeded random weights
    sft: dict = field(default_factory=dict)
    rm: dict = field(default_factory=dict)
    cost: dict | None = None  # a Safe-RLHF cost model too when given
    ppo: dict = field(default_factory=dict)

    def stages(self) -> tuple[str, ...]:
        """The stages this pipeline runs, in order."""
        return tuple(s for s in PIPELINE_STAGES if s != "cost" or self.cost is not None)

    def stage_dir(self, stage: str) -> str:
        """Where ``stage`` keeps its checkpoints, metrics and HF export."""
        return os.path.join(self.out_dir, stage)

    def export_dir(self, stage: str) -> str:
        """The HF checkpoint ``stage`` produces."""
        return os.path.join(self.stage_dir(stage), "hf")

    def stage_config(self, stage: str) -> Any:
        """The typed config of ``stage`` with the pipeline's wiring (keys the pipeline sets
        may not be given in the stage's section)."""
        section = getattr(self, stage) or {}
        data = {**section, "model": dataclasses.asdict(self.model)}
        data["parallel"] = dataclasses.asdict(self.parallel)
        loop = "ppo" if stage == "ppo" else "train"
        wired = {"save_dir": os.path.join(self.stage_dir(stage), "ckpt")}
        wired["hf_export_dir"] = self.export_dir(stage)
        data[loop] = _wire(stage, loop, data.get(loop), wired)
        if stage == "ppo":
            data["actor_init"] = self.export_dir("sft")
            reward = dict(data.get("reward") or {})
            models = [{"path": self.export_dir("rm")}, *reward.get("models", [])]
            data["reward"] = {**reward, "models": models}
            data["ppo"].setdefault("critic_init", "reward")
            if self.cost is not None and data["ppo"].get("algorithm") == "ppo_lag":
                cost = dict(data.get("cost") or {})
                cost_models = [{"path": self.export_dir("cost")}, *cost.get("models", [])]
                data["cost"] = {**cost, "models": cost_models}
            return config_from_dict(data, PPORunConfig, "ppo.")
        data["init"] = self.init if stage == "sft" else self.export_dir("sft")
        if stage == "sft":
            return config_from_dict(data, SFTRunConfig, "sft.")
        data["rm"] = _wire(stage, "rm", data.get("rm"), {"objective": stage_objective(stage)})
        return config_from_dict(data, RMRunConfig, f"{stage}.")

    def validate(self, world_size: int | None = None) -> PipelineConfig:
        """Every stage's config, wired and checked (errors name the stage)."""
        for stage in self.stages():
            try:
                self.stage_config(stage).validate(world_size)
            except ConfigError as err:
                raise ConfigError(f"pipeline stage {stage}: {err}") from err
        return self


def stage_objective(stage: str) -> str:
    """The ranking objective of a reward-model stage (``rm`` or ``cost``)."""
    return "cost" if stage == "cost" else "reward"


def _wire(stage: str, key: str, section: Any, wired: dict) -> dict:
    """``section`` (a stage's sub-section, a mapping) with the pipeline's keys set."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{stage}.{key}: expected a mapping, got {type(section).__name__}")
    given = sorted(set(section) & set(wired))
    if given:
        raise ConfigError(f"{stage}.{key}.{given[0]} is set by the pipeline; remove it")
    return {**section, **wired}


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML reads exponent forms without a dot ("1e-2") as strings (YAML 1.1).
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got bool {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(
                f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(names))})"
            )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def config_from_dict(data: dict | None, cls: type = Config, prefix: str = "") -> Any:
    """Build a config tree of type ``cls`` from a nested dict (unknown keys raise, named
    with ``prefix``)."""
    return _build(cls, data or {}, prefix)


def load_config(path: str | None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Read ``path`` (YAML; None for defaults), apply dotted overrides, build and validate."""
    data: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as fh:
            try:
                loaded = yaml.safe_load(fh)
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
    apply_overrides(data, overrides or [])
    config = config_from_dict(data, cls)
    if hasattr(config, "validate"):
        config.validate()
    return config


def config_to_dict(config: Any) -> dict:
    """The plain-dict form of a config tree (for logs and checkpoints)."""
    return dataclasses.asdict(config)
