"""Tokenizers from local files: a sentencepiece model, an HF ``tokenizer.json``, or a whole
HF tokenizer directory (a checkpoint's: ``tokenizer.json`` + ``tokenizer_config.json`` with
its chat template).

``load_tokenizer(path)`` picks by file name; all expose the same small interface:
``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``bos_id``,
``eos_id``, ``pad_id`` and ``stop_ids`` (the tokens that end a generated response: EOS,
and for a checkpoint's tokenizer its end-of-turn tokens such as Llama-3's ``<|eot_id|>`` or
Qwen's ``<|im_end|>``). ``HFTokenizer.render`` applies the checkpoint's own chat template
(``data.chat_template: tokenizer``). The tiny tokenizer the demo and tests use ships as
``hpc_rlhf/assets/tiny_sp.model`` (``default_tokenizer_path()``).
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from hpc_rlhf.config import InputError


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def stop_ids(self) -> tuple[int, ...]: ...

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

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.eos_id,)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int:
        """The id of ``piece``; -1 when it is not in the vocabulary (as the other
        tokenizers say, rather than the id of ``<unk>``)."""
        idx = int(self._sp.piece_to_id(piece))
        return -1 if idx == self._sp.unk_id() and piece != self._sp.id_to_piece(idx) else idx


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

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.eos_id,)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int:
        idx = self._tok.token_to_id(piece)
        return -1 if idx is None else idx


# end-of-turn tokens of common chat templates: a stop token when the vocabulary has it
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")


class HFTokenizer:
    """A checkpoint's tokenizer directory through ``transformers.AutoTokenizer`` (fast
    tokenizer, local files only), with its chat template and special tokens."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.path = path
        try:
            self._tok: Any = AutoTokenizer.from_pretrained(
                path, local_files_only=True, use_fast=True
            )
        except (OSError, ValueError) as err:
            raise InputError(f"tokenizer directory {path} cannot be loaded: {err}") from err
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        if eos is None:
            raise InputError(f"tokenizer {path} has no eos_token (tokenizer_config.json)")
        self.eos_id = int(eos)
        bos = self._tok.bos_token_id
        self.bos_id = self.eos_id if bos is None else int(bos)  # only a fallback pad/separator
        pad = self._tok.pad_token_id
        self.pad_id = self.eos_id if pad is None else int(pad)
        self.has_chat_template = bool(getattr(self._tok, "chat_template", None))
        self._stop_ids = self._find_stop_ids()

    def _find_stop_ids(self) -> tuple[int, ...]:
        """EOS, the ``eos_token_id`` list of a ``generation_config.json`` beside the
        tokenizer, and the end-of-turn tokens the vocabulary has."""
        import json

        ids = [self.eos_id]
        gen_path = os.path.join(self.path, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path, encoding="utf-8") as fh:
                listed = json.load(fh).get("eos_token_id")
            ids += listed if isinstance(listed, list) else [listed] if listed is not None else []
        for token in END_OF_TURN_TOKENS:
            idx = self._tok.convert_tokens_to_ids(token)
            if isinstance(idx, int) and idx != self._tok.unk_token_id and idx >= 0:
                ids.append(idx)
        return tuple(dict.fromkeys(int(i) for i in ids))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self._stop_ids

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int:
        idx = self._tok.convert_tokens_to_ids(piece)
        return -1 if idx is None or idx == self._tok.unk_token_id else int(idx)

    def render(self, messages: list[tuple[str, str]], add_generation_prompt: bool) -> list[int]:
        """Token ids of ``messages`` (``(role, content)`` pairs) through the checkpoint's own
        chat template (``apply_chat_template``), as the model was tuned to read them."""
        if not self.has_chat_template:
            raise InputError(
                f"data.chat_template is 'tokenizer' but {self.path} has no chat template "
                "(tokenizer_config.json 'chat_template')"
            )
        out = self._tok.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages],
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
        )
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return [int(i) for i in ids]


def load_tokenizer(path: str | None = None) -> SentencePieceTokenizer | JsonTokenizer | HFTokenizer:
    """Load a tokenizer from ``path``: a checkpoint's tokenizer directory (with
    ``tokenizer_config.json``: ``HFTokenizer``), a ``.model`` or ``tokenizer.json`` file or
    a directory holding one; None gives the shipped tiny tokenizer."""
    path = path or default_tokenizer_path()
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer_config.json")):
        return HFTokenizer(path)
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
