"""The generation engine's settings (a frozen config section; imports nothing heavy).

A run nests it as ``generation.engine`` (``config.RolloutConfig``); tools and tests build
it directly for ``GenerationEngine``.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_BACKENDS = ("auto", "torch", "cpp", "flash_attn")


class EngineConfigError(ValueError):
    """An engine setting is impossible (the run config reports it as a ``ConfigError``)."""


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

    def validate(self, prefix: str = "") -> None:
        """Raise ``EngineConfigError`` naming the key (``prefix`` + field) of a bad value."""
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise EngineConfigError(
                f"{prefix}attention_backend={self.attention_backend!r}: expected one of "
                f"{ATTENTION_BACKENDS}"
            )
        for name in ("cache_budget_bytes", "block_size", "max_running_seqs", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{prefix}{name} must be >= 1, got {getattr(self, name)}")
        if self.cache_budget_blocks is not None and self.cache_budget_blocks < 1:
            raise EngineConfigError(
                f"{prefix}cache_budget_blocks must be >= 1, got {self.cache_budget_blocks}"
            )
