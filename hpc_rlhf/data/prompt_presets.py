"""Prompt presets (``data.preset`` of a PPO run): the row layouts of the public
verifiable-reward sets, read into a prompt and its reference fields.

* ``gsm8k``: ``question`` and ``answer``, a worked solution ending ``#### <number>``: the
  prompt is the question, the reference ``answer`` the number after ``####``.
* ``math`` (MATH / Hendrycks, and sets of its layout): ``problem`` and ``solution`` with
  the final answer in ``\\boxed{...}``: the prompt is the problem, ``answer`` the last boxed
  expression (a row may give ``answer`` directly, as MATH-500 does; it wins).
* ``mbpp``: ``text`` (the task), ``test_list`` (assertion strings) and an optional
  ``test_setup_code``: the prompt is the task followed by its first test as an example of
  the expected signature, ``tests`` the assertions (each preceded by the setup code).

Rows in our own layout (``{"prompt": ..., <reference fields>}``) need no preset.
"""

from __future__ import annotations

from hpc_rlhf.config import PROMPT_PRESETS, InputError
from hpc_rlhf.data.presets import string_field


def prompt_row(preset: str, row: object, where: str) -> dict:
    """``{"prompt": ..., <the preset's reference fields>}`` of a ``preset`` row; a field
    that does not fit the layout raises ``InputError`` naming ``where`` and the field."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if preset == "gsm8k":
        return {"prompt": string_field(row, "question", where), "answer": _final(row, where)}
    if preset == "math":
        if isinstance(row.get("answer"), str):
            answer = row["answer"]
        else:
            answer = _boxed(string_field(row, "solution", where), where)
        return {"prompt": string_field(row, "problem", where), "answer": answer}
    if preset == "mbpp":
        return _mbpp(row, where)
    raise ValueError(f"unknown prompt preset {preset!r}: expected one of {PROMPT_PRESETS}")


def _final(row: dict, where: str) -> str:
    """The number after GSM8K's ``####`` marker."""
    solution = string_field(row, "answer", where)
    if "####" not in solution:
        raise InputError(f"{where}: field 'answer' has no '#### <answer>' line (gsm8k layout)")
    answer = solution.rsplit("####", 1)[1].strip()
    if not answer:
        raise InputError(f"{where}: field 'answer' has nothing after '####'")
    return answer.replace(",", "")


def _boxed(solution: str, where: str) -> str:
    from hpc_rlhf.rewards.math_answers import reference_answer

    answer = reference_answer(solution) if "boxed" in solution else None
    if answer is None:
        raise InputError(f"{where}: field 'solution' has no \\boxed{{...}} answer (math layout)")
    return answer


def _mbpp(row: dict, where: str) -> dict:
    task = string_field(row, "text", where)
    tests = row.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise InputError(f"{where}: field 'test_list' must be a non-empty list of strings")
    setup = row.get("test_setup_code") or ""
    if not isinstance(setup, str):
        raise InputError(f"{where}: field 'test_setup_code' must be a string")
    prompt = f"{task}\nYour code should pass this test:\n{tests[0]}"
    return {"prompt": prompt, "tests": [f"{setup}\n{t}" if setup else t for t in tests]}
