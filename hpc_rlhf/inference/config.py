"""The generation engine's settings (a frozen config section; imports nothing heavy).

A run nests it as ``generation.engine`` (``config.RolloutConfig``); tools and tests build
it directly for ``GenerationEngine``.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_BACKENDS = ("auto", "torch", "cpp", "flash_attn")


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

    def validate(self, prefix: str = "") -> None:
        """Raise ``EngineConfigError`` naming the key (``prefix`` + field) of a bad value."""
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise EngineConfigError(
                f"{prefix}attention_backend={self.attention_backend!r}: expected one of "
                f"{ATTENTION_BACKENDS}"
            )
        positive = (
            "cache_budget_bytes",
            "cache_budget_blocks",
            "block_size",
            "max_running_seqs",
            "max_prefill_tokens",
        )
        require_at_least(self, prefix, positive, 1)
