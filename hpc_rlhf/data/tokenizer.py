"""Tokenizers from local files: a sentencepiece model or an HF ``tokenizer.json``.

``load_tokenizer(path)`` picks by file name; both expose the same small interface:
``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``bos_id``,
``eos_id``, ``pad_id``. The tiny tokenizer the demo and tests use ships as
``hpc_rlhf/assets/tiny_sp.model`` (``default_tokenizer_path()``).
"""

from __future__ import annotations

import os
from typing import Protocol

from hpc_rlhf.config import InputError


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")


def default_tokenizer_path() -> str:
    """The tiny sentencepiece model shipped with the package."""
    return os.path.join(ASSETS_DIR, "tiny_sp.model")


class SentencePieceTokenizer:
    """A sentencepiece ``.model`` file."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int:
        return int(self._sp.piece_to_id(piece))


class JsonTokenizer:
    """An HF ``tokenizer.json`` (via the ``tokenizers`` library, no hub access)."""

    def __init__(self, path: str, bos: str = "<s>", eos: str = "</s>", pad: str | None = None):
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = path
        self._tok = _HFTokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()
        self.bos_id = self._special(bos)
        self.eos_id = self._special(eos)
        self.pad_id = self._special(pad) if pad else self.eos_id

    def _special(self, token: str) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise InputError(f"tokenizer {self.path} has no token {token!r}")
        return idx

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int:
        idx = self._tok.token_to_id(piece)
        return -1 if idx is None else idx


def load_tokenizer(path: str | None = None) -> SentencePieceTokenizer | JsonTokenizer:
    """Load a tokenizer from ``path`` (``.model`` or ``tokenizer.json`` or a directory
    holding one); None gives the shipped tiny tokenizer."""
    path = path or default_tokenizer_path()
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.exists(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {path}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if path.endswith(".json"):
        return JsonTokenizer(path)
    return SentencePieceTokenizer(path)
