"""Prompt rows with references for verifiable rewards: ``data.reference_fields`` kept per
prompt (every row must have them, the error names the row), the public sets' layouts
(``data.preset``: gsm8k, math, mbpp) read from JSON Lines and Parquet into a prompt and its
``answer`` / ``tests``, and the tiny shipped sets in those layouts."""

from __future__ import annotations

import json
import os

import pytest

from hpc_rlhf.config import ConfigError, InputError, PPORunConfig, config_from_dict
from hpc_rlhf.data.prompt_presets import prompt_row
from hpc_rlhf.data.prompts import PromptDataset, default_prompts_path, read_prompt_rows
from hpc_rlhf.data.tokenizer import load_tokenizer

ASSETS = os.path.dirname(default_prompts_path())


def _write(path, rows) -> str:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return str(path)


def test_reference_fields_travel_with_their_prompt(tmp_path):
    rows = [
        {"prompt": "Say red.", "answer": "red", "tests": ["assert 1"], "extra": 5},
        {"prompt": "Say book.", "answer": "book", "tests": []},
    ]
    path = _write(tmp_path / "p.jsonl", rows)
    prompts = PromptDataset(
        path, load_tokenizer(None), 32, reference_fields=("answer", "tests"), shuffle=False
    )
    assert prompts.references == [
        {"answer": "red", "tests": ["assert 1"]},
        {"answer": "book", "tests": []},
    ]
    assert [row.where for row in read_prompt_rows(path)] == [f"{path}:1", f"{path}:2"]


def test_a_row_without_a_reference_field_is_named(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(InputError, match=r"p.jsonl:2: no 'answer' \(data.reference_fields"):
        read_prompt_rows(path, reference_fields=("answer",))


@pytest.mark.parametrize(
    "data,message",
    [
        ({"reference_fields": ["tokenizer"]}, r"'tokenizer' must be a field name usable"),
        ({"reference_fields": ["not an identifier"]}, r"must be a field name usable"),
        ({"reference_fields": ["answer", "answer"]}, r"names must be distinct"),
        ({"preset": "gsm9k", "prompts": "x.jsonl"}, r"data.preset='gsm9k': expected one of"),
        ({"preset": "gsm8k"}, r"needs data.prompts"),
    ],
)
def test_bad_reference_settings_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        rules = [{"function": "hpc_rlhf.algorithms.rule_rewards:id_range_fraction"}]
        config_from_dict({"data": data, "reward": {"rules": rules}}, PPORunConfig).validate()


def test_a_preset_fills_the_reference_fields_by_default():
    data = config_from_dict({"data": {"preset": "mbpp", "prompts": "x"}}, PPORunConfig).data
    assert data.rule_fields == ("tests",)
    own = {"preset": "gsm8k", "prompts": "x", "reference_fields": ["answer", "id"]}
    assert config_from_dict({"data": own}, PPORunConfig).data.rule_fields == ("answer", "id")


def test_gsm8k_math_and_mbpp_layouts():
    gsm8k = {"question": "How many?", "answer": "2 + 3 = 5 then 5 * 200\n#### 1,000"}
    assert prompt_row("gsm8k", gsm8k, "w") == {"prompt": "How many?", "answer": "1000"}
    math = {"problem": "Half?", "solution": r"It is $\boxed{\frac{1}{2}}$ since \boxed{x}."}
    assert prompt_row("math", math, "w") == {"prompt": "Half?", "answer": "x"}  # the last box
    math500 = {"problem": "Half?", "solution": r"\boxed{2}", "answer": r"\frac12"}
    assert prompt_row("math", math500, "w")["answer"] == r"\frac12"  # a given answer wins
    mbpp = {"text": "Add.", "test_list": ["assert f(1) == 2"], "test_setup_code": "import os"}
    assert prompt_row("mbpp", mbpp, "w") == {
        "prompt": "Add.\nYour code should pass this test:\nassert f(1) == 2",
        "tests": ["import os\nassert f(1) == 2"],
    }


@pytest.mark.parametrize(
    "preset,row,message",
    [
        ("gsm8k", {"question": "q", "answer": "5"}, r"w: field 'answer' has no '#### <answer>'"),
        ("gsm8k", {"question": "q", "answer": "####  "}, r"nothing after '####'"),
        ("gsm8k", {"answer": "#### 5"}, r"w: expected a string field 'question'"),
        ("math", {"problem": "p", "solution": "no box"}, r"has no \\boxed\{...\} answer"),
        ("mbpp", {"text": "t", "test_list": []}, r"'test_list' must be a non-empty list"),
        ("mbpp", {"text": "t", "test_list": ["a"], "test_setup_code": 3}, r"must be a string"),
        ("mbpp", ["not", "a", "row"], r"w: expected a JSON object, got list"),
    ],
)
def test_rows_that_do_not_fit_their_layout_are_named(preset, row, message):
    with pytest.raises(InputError, match=message):
        prompt_row(preset, row, "w")


def test_a_parquet_file_of_a_public_layout_is_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(os.path.join(ASSETS, "tiny_gsm8k.jsonl"))]
    path = str(tmp_path / "gsm8k.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    read = read_prompt_rows(path, reference_fields=("answer",), preset="gsm8k")
    assert [r.text for r in read] == [row["question"] for row in rows]
    assert [r.references["answer"] for r in read] == [
        row["answer"].rsplit("#### ", 1)[1].replace(",", "") for row in rows
    ]
    assert read[2].where == f"{path}:row 3"


def test_the_shipped_verifiable_sets():
    repeat = read_prompt_rows(
        os.path.join(ASSETS, "tiny_repeat_prompts.jsonl"), reference_fields=("answer",)
    )
    tok = load_tokenizer(None)
    for row in repeat:  # the answer is named in the prompt and is one token of the vocabulary
        assert row.references["answer"] in row.text.replace(",", " ").rstrip(".").split(" ")
        assert tok.token_id("\u2581" + row.references["answer"]) >= 0
    assert {r.references["answer"] for r in repeat} == {"red", "book"}
    math = read_prompt_rows(
        os.path.join(ASSETS, "tiny_gsm8k.jsonl"), reference_fields=("answer",), preset="gsm8k"
    )
    assert len(math) == 16 and all(r.references["answer"].isdigit() for r in math)
    code = read_prompt_rows(
        os.path.join(ASSETS, "tiny_mbpp.jsonl"), reference_fields=("tests",), preset="mbpp"
    )
    assert len(code) == 4 and all(r.references["tests"][0].startswith("assert ") for r in code)
