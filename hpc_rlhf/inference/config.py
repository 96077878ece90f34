"""The generation engine's settings (a frozen config section; imports nothing heavy).

A run nests it as ``generation.engine`` (``config.RolloutConfig``); tools and tests build
it directly for ``GenerationEngine``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATTENTION_BACKENDS = ("auto", "torch", "cpp", "flash_attn")
# the KV cache's dtype: "auto" is the weights' (a bf16 model gets a bf16 cache)
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class EngineConfigError(ValueError):
    """An engine setting is impossible (the run config reports it as a ``ConfigError``)."""


def require_at_least(
    section: object,
    prefix: str,
    names: tuple[str, ...],
    minimum: int,
    error: type[ValueError] = EngineConfigError,
) -> None:
    """Raise ``error`` naming ``prefix + name`` for the first field of ``section`` in
    ``names`` whose value is below ``minimum`` (``None``, an unset optional field, passes).

    The one check of every integer setting that must be positive (``minimum=1``) or
    non-negative (``minimum=0``), for every config section."""
    for name in names:
        value = getattr(section, name)
        if value is not None and value < minimum:
            raise error(f"{prefix}{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class GenerationConfig:
    """Engine settings. Give the KV budget in bytes or blocks (blocks win when both)."""

    block_size: int = 16  # token slots per KV-cache block
    cache_budget_bytes: int = 512 * 2**20
    cache_budget_blocks: int | None = None
    max_running_seqs: int = 256  # sequences decoded together (continuous batching)
    max_prefill_tokens: int = 8192  # prompt tokens per prefill batch
    attention_backend: str = "auto"  # "auto" | "torch" | "cpp" | "flash_attn"
    cuda_graphs: bool = False  # capture decode steps (CUDA + flash-attn only)
    keep_cache: bool = False  # keep the KV pool allocated between generate() calls
    cache_dtype: str = "auto"  # "auto" (the weights' dtype) | "fp32" | "bf16" | "fp16"

    def validate(self, prefix: str = "") -> None:
        """Raise ``EngineConfigError`` naming the key (``prefix`` + field) of a bad value."""
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise EngineConfigError(
                f"{prefix}attention_backend={self.attention_backend!r}: expected one of "
                f"{ATTENTION_BACKENDS}"
            )
        if self.cache_dtype != "auto" and self.cache_dtype not in CACHE_DTYPES:
            raise EngineConfigError(
                f"{prefix}cache_dtype={self.cache_dtype!r}: expected 'auto' or one of "
                f"{tuple(CACHE_DTYPES)}"
            )
        positive = (
            "cache_budget_bytes",
            "cache_budget_blocks",
            "block_size",
            "max_running_seqs",
            "max_prefill_tokens",
        )
        require_at_least(self, prefix, positive, 1)

    def kv_dtype(self, weights_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype for a model whose weights are ``weights_dtype``."""
        return weights_dtype if self.cache_dtype == "auto" else CACHE_DTYPES[self.cache_dtype]


# ----------------------------------------------------------------------------- pool geometry


class CacheTooSmallError(RuntimeError):
    """The KV-cache budget cannot hold even one sequence of the request."""


@dataclass(frozen=True)
class CacheShape:
    """Geometry of the pool of one TP rank."""

    num_layers: int
    num_kv_heads: int  # of this TP rank
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def for_model(cls, model_cfg, tp_size: int, block_size: int, dtype: torch.dtype) -> CacheShape:
        """The pool geometry of one TP rank for a ``config.ModelConfig``."""
        return cls(
            num_layers=model_cfg.num_layers,
            num_kv_heads=model_cfg.query_groups // tp_size,
            head_dim=model_cfg.head_dim,
            block_size=block_size,
            dtype=dtype,
        )

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block over all layers."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.block_size * self.head_dim * elem

    def blocks_for_budget(self, budget_bytes: int) -> int:
        """How many blocks fit in ``budget_bytes``."""
        return budget_bytes // self.bytes_per_block

    def blocks_for_tokens(self, tokens: int) -> int:
        """Blocks needed to hold ``tokens`` tokens of one sequence."""
        return -(-tokens // self.block_size)


def pool_blocks(shape: CacheShape, config: GenerationConfig) -> int:
    """Blocks of the KV pool ``config`` asks for (``cache_budget_blocks`` wins over bytes)."""
    if config.cache_budget_blocks is not None:
        return config.cache_budget_blocks
    return shape.blocks_for_budget(config.cache_budget_bytes)


def require_capacity(shape: CacheShape, config: GenerationConfig, tokens: int) -> None:
    """Raise ``CacheTooSmallError`` when the pool of ``config`` cannot hold one sequence of
    ``tokens`` tokens (the engine checks each request; a run checks its longest possible
    sequence at start)."""
    need = shape.blocks_for_tokens(tokens)
    usable = pool_blocks(shape, config) - (1 if config.cuda_graphs else 0)  # scratch block
    if need > usable:
        raise CacheTooSmallError(
            f"KV-cache budget of {usable} blocks ({config.block_size} tokens each, "
            f"{shape.bytes_per_block} bytes per block) cannot hold one sequence of {tokens} "
            f"tokens ({need} blocks)"
        )
