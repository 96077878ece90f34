"""Where data enters: numbered lines of UTF-8 text files, and token ids checked against the
model's vocabulary. Errors name the file and line, before any training step."""

from __future__ import annotations

import os
from collections.abc import Iterator

from hpc_rlhf.config import InputError


def numbered_lines(path: str, what: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line of ``path`` (1-based, newline stripped).

    Raises ``FileNotFoundError`` naming ``what`` and the path, and ``ValueError`` naming
    ``path:line`` and the byte offset of text that is not UTF-8."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(
                    f"{path}:{number}: not valid UTF-8 ({err.reason} at byte {err.start} of "
                    "the line); re-encode the file as UTF-8"
                ) from err
            yield number, text.rstrip("\r\n")


def check_token_ids(ids: list[int], vocab_size: int | None, where: str, tokenizer) -> None:
    """Raise ``ValueError`` naming ``where`` (``path:line``) when a token id is outside
    ``[0, vocab_size)`` (the model's embedding table); ``vocab_size=None`` skips the check."""
    if vocab_size is None or not ids:
        return
    low, high = min(ids), max(ids)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InputError(
            f"{where}: token id {bad} is outside the model's vocabulary [0, {vocab_size}) "
            f"(model.vocab_size={vocab_size}; tokenizer {getattr(tokenizer, 'path', '?')} "
            f"has {tokenizer.vocab_size} tokens): use the actor's tokenizer or a matching model"
        )
