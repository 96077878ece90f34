"""Presets (``data.preset``): the row layouts of the public preference sets, read into our
conversations and pairs. A field that does not fit its layout is an ``InputError`` naming
the row (``where``) and the field.

* ``hh_rlhf`` (Anthropic HH-RLHF): ``chosen`` / ``rejected`` are whole transcripts
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` that share every turn but the last Assistant
  reply. Pair: the shared turns, then the two last replies. SFT: the ``chosen`` dialogue.
* ``pku_saferlhf`` (PKU-SafeRLHF): ``prompt``, ``response_0`` / ``response_1``,
  ``better_response_id``, ``safer_response_id``, ``is_response_0_safe`` /
  ``is_response_1_safe``. A reward model's pair is ordered by ``better_response_id``, a cost
  model's by ``safer_response_id`` (the safer response first) with the two safety labels
  (Safe-RLHF's reward and cost data). No SFT layout: no response is marked as the one to
  imitate.
* ``ultrafeedback`` (UltraFeedback binarized): ``prompt`` and ``chosen`` / ``rejected``
  message lists ``[{"role": "user", "content": ...}, {"role": "assistant", ...}]`` that
  share every message but the last (the assistant's response). Pair: the shared messages
  (or ``prompt`` as the user turn when there are none), then the two responses. SFT: the
  ``chosen`` messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hpc_rlhf.config import InputError, PreferenceDataConfig, SFTDataConfig

ROLES = ("system", "user", "assistant")
PRESETS = PreferenceDataConfig.PRESETS
SFT_PRESETS = SFTDataConfig.PRESETS
SAFETY_PRESETS = ("pku_saferlhf",)  # the layouts with safety labels (cost models)

Turn = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class Preference:
    """A pair of a preset row: the conversation before the responses (``context``), the
    better and the worse response, and their safety labels (true = safe) when read."""

    context: list[Turn]
    chosen: str
    rejected: str
    safe: tuple[bool, bool] | None = None


def preference_row(preset: str, row: object, where: str, safety: bool) -> Preference:
    """The pair of a ``preset`` row; ``safety``: ordered by safety, with the labels (a
    cost model's data), else ordered by helpfulness."""
    row = _object(row, where)
    if safety and preset not in SAFETY_PRESETS:
        raise InputError(
            f"{where}: data.preset={preset!r} has no safety labels, which a cost model "
            f"(rm.objective: cost) needs: use a layout of {SAFETY_PRESETS} or our own rows"
        )
    if preset == "hh_rlhf":
        return _hh_rlhf_pair(row, where)
    if preset == "pku_saferlhf":
        return _pku_saferlhf_pair(row, where, safety)
    if preset == "ultrafeedback":
        return _ultrafeedback_pair(row, where)
    raise ValueError(f"unknown data.preset {preset!r}: expected one of {PRESETS}")


def sft_row(preset: str, row: object, where: str) -> list[Turn]:
    """The conversation of a ``preset`` row to fine-tune on (its chosen dialogue)."""
    row = _object(row, where)
    if preset == "hh_rlhf":
        return _ends_with_reply(row, "chosen", where)
    if preset == "ultrafeedback":
        return message_list(row.get("chosen"), "chosen", where)
    raise ValueError(f"data.preset {preset!r} has no SFT layout: expected one of {SFT_PRESETS}")


# ----------------------------------------------------------------------------- fields


def _object(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def string_field(row: dict, key: str, where: str) -> str:
    """``row[key]``, which must be a string."""
    value = row.get(key)
    if not isinstance(value, str):
        raise InputError(f"{where}: expected a string field {key!r}")
    return value


def flag_field(row: dict, key: str, where: str) -> bool:
    """``row[key]``, which must be a safety label (true/false)."""
    value = row.get(key)
    if not isinstance(value, bool):
        raise InputError(f"{where}: expected a true/false field {key!r} (safety label)")
    return value


def _response_id(row: dict, key: str, where: str) -> int:
    value = row.get(key)
    if isinstance(value, bool) or value not in (0, 1):
        raise InputError(f"{where}: field {key!r}={value!r}: expected 0 or 1 (a response index)")
    return int(value)


def message_list(
    value: object, field: str, where: str, role_key: str = "role", content_key: str = "content"
) -> list[Turn]:
    """``[(role, content), ...]`` of a message list ``[{role_key: ..., content_key: ...}]``
    (the value of ``field``); roles are ``ROLES``."""
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: field {field!r} must be a non-empty list")
    out = []
    for i, turn in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise InputError(f"{where}: field {name} must be an object")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in ROLES:
            raise InputError(f"{where}: field {name}.{role_key}={role!r}: expected {ROLES}")
        if not isinstance(content, str):
            raise InputError(f"{where}: field {name}.{content_key} must be a string")
        out.append((role, content))
    return out


# ----------------------------------------------------------------------------- HH-RLHF

# a turn header: at the start or after a blank line; its one space belongs to the header
_HH_HEADER = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def transcript_turns(text: str, field: str, where: str) -> list[Turn]:
    """``[(role, content), ...]`` of an HH-RLHF transcript ``"\\n\\nHuman: ...\\n\\nAssistant:
    ..."`` (the value of ``field``); a turn's content runs to the next header."""
    parts = _HH_HEADER.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise InputError(
            f"{where}: field {field!r} is not a Human/Assistant transcript: expected it to "
            f"start with '\\n\\nHuman: ', got {text[:40]!r}"
        )
    return [(_HH_ROLES[speaker], content) for speaker, content in zip(parts[1::2], parts[2::2])]


def _hh_rlhf_pair(row: dict, where: str) -> Preference:
    """The shared turns of ``chosen`` and ``rejected``, then their last Assistant replies."""
    chosen = _ends_with_reply(row, "chosen", where)
    rejected = _ends_with_reply(row, "rejected", where)
    _same_context(chosen, rejected, where)
    return Preference(chosen[:-1], chosen[-1][1], rejected[-1][1])


def _ends_with_reply(row: dict, field: str, where: str) -> list[Turn]:
    """The turns of transcript ``field``: at least one before a last Assistant reply."""
    turns = transcript_turns(string_field(row, field, where), field, where)
    if turns[-1][0] != "assistant":
        raise InputError(f"{where}: field {field!r} must end with an Assistant turn")
    if len(turns) < 2:
        raise InputError(f"{where}: field {field!r} has no turn before its Assistant reply")
    return turns


def _same_context(chosen: list[Turn], rejected: list[Turn], where: str) -> None:
    """Raise naming the first turn where ``rejected`` leaves ``chosen``'s dialogue before
    their last turns."""
    if chosen[:-1] == rejected[:-1]:
        return
    turn = next(
        (i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b),
        min(len(chosen), len(rejected)) - 1,
    )
    raise InputError(
        f"{where}: field 'rejected' differs from 'chosen' at turn {turn} (0-based), before "
        "the last one: a pair must share the conversation up to its two responses"
    )


# ----------------------------------------------------------------------------- PKU-SafeRLHF


def _pku_saferlhf_pair(row: dict, where: str, safety: bool) -> Preference:
    """``response_0`` / ``response_1`` ordered by ``better_response_id``, or with ``safety``
    by ``safer_response_id`` with their ``is_response_*_safe`` labels."""
    prompt = string_field(row, "prompt", where)
    responses = [string_field(row, "response_0", where), string_field(row, "response_1", where)]
    first = _response_id(row, "safer_response_id" if safety else "better_response_id", where)
    second = 1 - first
    safe = None
    if safety:
        labels = [flag_field(row, f"is_response_{i}_safe", where) for i in (0, 1)]
        safe = (labels[first], labels[second])
    return Preference([("user", prompt)], responses[first], responses[second], safe)


# ----------------------------------------------------------------------------- UltraFeedback


def _ultrafeedback_pair(row: dict, where: str) -> Preference:
    """The shared messages of ``chosen`` and ``rejected`` (or ``prompt`` as the user turn
    when there are none), then their last (assistant) messages."""
    lists = {}
    for field in ("chosen", "rejected"):
        messages = message_list(row.get(field), field, where)
        if messages[-1][0] != "assistant":
            raise InputError(
                f"{where}: field {field}[{len(messages) - 1}].role={messages[-1][0]!r}: the "
                "last message must be the assistant's response"
            )
        lists[field] = messages
    chosen, rejected = lists["chosen"], lists["rejected"]
    _same_context(chosen, rejected, where)
    context = chosen[:-1] or [("user", string_field(row, "prompt", where))]
    return Preference(context, chosen[-1][1], rejected[-1][1])
