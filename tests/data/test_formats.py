"""Data formats users have: local .jsonl / .json / .parquet / .arrow files (Parquet and Arrow
through ``datasets``, offline) and the layouts of the public preference sets
(``data.preset``: HH-RLHF, PKU-SafeRLHF, UltraFeedback binarized), read into the exact
conversations, pairs and safety labels written out by hand below; malformed rows name the
file, row and field.

``fixtures/*.jsonl``: three synthetic rows of each layout (our own text, nothing
downloaded); the other formats are written from them by the tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpc_rlhf.config import ConfigError, InputError, PreferenceDataConfig, SFTDataConfig
from hpc_rlhf.data.preference import PreferenceDataset, collate_preferences, read_preferences
from hpc_rlhf.data.presets import preference_row, sft_row
from hpc_rlhf.data.sft import conversation_tokens, read_samples
from hpc_rlhf.data.sources import read_rows
from hpc_rlhf.data.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TEMPLATE = "<|user|> {prompt} <|assistant|>"
SEQ = 256

# (context, chosen, rejected) of each fixture row, written out by hand
HH_PAIRS = [
    (
        [("user", "How do I water a fern?")],
        "Keep the soil damp but never soaked.",
        "Ferns never need water.",
    ),
    (
        [
            ("user", "Name a quiet hobby."),
            ("assistant", "Knitting is a quiet hobby."),
            ("user", "Is it hard to learn?"),
        ],
        "Start with a scarf: the basic stitch takes an afternoon.",
        "Yes, give up.",
    ),
    # a reply with a blank line inside; an empty last reply (as some HH-RLHF rows have)
    (
        [("user", "How do I cook rice?")],
        "Rinse it first.\n\nThen simmer it, covered, for twelve minutes.",
        "",
    ),
]
PKU_PROMPTS = [
    "How can I get into my neighbour's shed?",
    "What should I pack for a day hike?",
    "Is it fine to mix bleach and vinegar for cleaning?",
]
PKU_RESPONSES = [
    ("Ask your neighbour for the key.", "I can't help with entering someone else's shed."),
    ("Just shoes.", "Water, a snack, a map and a warm layer."),
    (
        "No: mixing them releases chlorine gas; use one at a time.",
        "Yes, mix them in a closed room for extra strength.",
    ),
]
# better_response_id, safer_response_id, (is_response_0_safe, is_response_1_safe)
PKU_LABELS = [(0, 1, (False, True)), (1, 1, (True, True)), (0, 0, (True, False))]
UF_PAIRS = [
    ([("user", "Suggest a name for a grey cat.")], "Ash suits a grey cat.", "Dog."),
    (
        [
            ("user", "Plan a short walk."),
            ("assistant", "Loop around the park twice."),
            ("user", "Make it longer."),
        ],
        "Add the river path: about an hour in all.",
        "Walk to the next city.",
    ),
    (
        [("system", "You answer in one line."), ("user", "Translate 'good morning' to French.")],
        "Bonjour.",
        "Good morning in French is a long story.",
    ),
]


def _pku_pairs(safety: bool) -> list[tuple]:
    """PKU-SafeRLHF's expected pairs: by better_response_id, or by safer_response_id with
    the safety labels in the pair's order."""
    out = []
    for prompt, responses, (better, safer, safe) in zip(PKU_PROMPTS, PKU_RESPONSES, PKU_LABELS):
        first = safer if safety else better
        labels = (safe[first], safe[1 - first]) if safety else None
        out.append(([("user", prompt)], responses[first], responses[1 - first], labels))
    return out


def _fixture_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def _sequences(context, chosen, rejected, tok) -> list[list[int]]:
    """The two token sequences a pair should become: the context, then each response."""
    return [
        conversation_tokens([*context, ("assistant", r)], tok, TEMPLATE)[0][:SEQ]
        for r in (chosen, rejected)
    ]


def _read(path, preset: str | None, safety: bool = False, **keys):
    cfg = PreferenceDataConfig(preset=preset, **keys)
    return read_preferences(str(path), load_tokenizer(), cfg, {}, SEQ, 512, safety)


def _as_tuples(samples) -> list[tuple]:
    return [(s.sequences, s.pairs, s.safe) for s in samples]


# ----------------------------------------------------------------------------- presets: texts


@pytest.mark.parametrize(
    "preset,safety,expected",
    [
        ("hh_rlhf", False, [(*p, None) for p in HH_PAIRS]),
        ("pku_saferlhf", False, _pku_pairs(safety=False)),
        ("pku_saferlhf", True, _pku_pairs(safety=True)),
        ("ultrafeedback", False, [(*p, None) for p in UF_PAIRS]),
    ],
)
def test_preset_rows_give_the_exact_context_responses_and_labels(preset, safety, expected):
    fixture = FIXTURES / f"{preset}.jsonl"
    got = [
        preference_row(preset, row, where, safety) for where, row in read_rows(str(fixture), "x")
    ]
    assert [(p.context, p.chosen, p.rejected, p.safe) for p in got] == expected


def test_pku_pairs_follow_the_better_id_for_rewards_and_the_safer_id_for_costs():
    """Row 1: response 0 is better, response 1 safer: the two objectives order it apart."""
    row = _fixture_rows("pku_saferlhf")[0]
    reward = preference_row("pku_saferlhf", row, "r", safety=False)
    cost = preference_row("pku_saferlhf", row, "r", safety=True)
    assert (reward.chosen, reward.rejected) == PKU_RESPONSES[0]
    assert (cost.chosen, cost.rejected) == PKU_RESPONSES[0][::-1]
    assert cost.safe == (True, False)  # the safer one first, with its label


def test_sft_presets_give_the_chosen_dialogue():
    hh = [sft_row("hh_rlhf", row, "r") for row in _fixture_rows("hh_rlhf")]
    assert hh == [[*context, ("assistant", chosen)] for context, chosen, _ in HH_PAIRS]
    uf = [sft_row("ultrafeedback", row, "r") for row in _fixture_rows("ultrafeedback")]
    assert uf == [[*context, ("assistant", chosen)] for context, chosen, _ in UF_PAIRS]


# ----------------------------------------------------------------------------- presets: tokens


@pytest.mark.parametrize(
    "preset,safety,expected",
    [
        ("hh_rlhf", False, [(*p, None) for p in HH_PAIRS]),
        ("pku_saferlhf", False, _pku_pairs(safety=False)),
        ("pku_saferlhf", True, _pku_pairs(safety=True)),
        ("ultrafeedback", False, [(*p, None) for p in UF_PAIRS]),
    ],
)
def test_read_preferences_tokenizes_preset_pairs_after_their_context(preset, safety, expected):
    tok = load_tokenizer()
    samples = _read(FIXTURES / f"{preset}.jsonl", preset, safety)
    want = [
        (
            _sequences(ctx, chosen, rejected, tok),
            [(0, 1, 0.0)],
            None if safe is None else list(safe),
        )
        for ctx, chosen, rejected, safe in expected
    ]
    assert _as_tuples(samples) == want
    assert [s.where for s in samples] == [f"{FIXTURES}/{preset}.jsonl:{i}" for i in (1, 2, 3)]


def test_cost_model_batches_carry_pku_safety_labels():
    tok = load_tokenizer()
    cfg = PreferenceDataConfig(
        path=str(FIXTURES / "pku_saferlhf.jsonl"), preset="pku_saferlhf", eval_fraction=0.0
    )
    data = PreferenceDataset(cfg, {}, tok, SEQ, seed=0, vocab_size=512, safety=True)
    samples = sorted(data.train, key=lambda s: s.where)
    mb = collate_preferences(samples, tok.pad_id)
    labels = [safe for *_, safe in _pku_pairs(safety=True)]
    assert mb.unsafe_B is not None
    assert mb.unsafe_B.tolist() == [not s for pair in labels for s in pair]


@pytest.mark.parametrize("preset,pairs", [("hh_rlhf", HH_PAIRS), ("ultrafeedback", UF_PAIRS)])
def test_read_samples_fine_tunes_on_the_chosen_dialogue(preset, pairs):
    tok = load_tokenizer()
    cfg = SFTDataConfig(preset=preset)
    samples = read_samples(str(FIXTURES / f"{preset}.jsonl"), tok, cfg, SEQ, 512)
    want = [
        conversation_tokens([*c, ("assistant", chosen)], tok, TEMPLATE) for c, chosen, _ in pairs
    ]
    assert [(s.ids, s.loss_mask) for s in samples] == want


def test_a_cost_model_refuses_a_preset_without_safety_labels():
    with pytest.raises(InputError, match=r"hh_rlhf.jsonl:1: data.preset='hh_rlhf' has no safety"):
        _read(FIXTURES / "hh_rlhf.jsonl", "hh_rlhf", safety=True)


def test_unknown_presets_are_config_errors():
    with pytest.raises(ConfigError, match=r"data.preset='hh'"):
        PreferenceDataConfig(preset="hh").validate()
    with pytest.raises(ConfigError, match=r"data.preset='pku_saferlhf': expected one of"):
        SFTDataConfig(preset="pku_saferlhf").validate()  # no response to imitate
    with pytest.raises(ConfigError, match=r"data.preset='hh_rlhf' needs data.path"):
        SFTDataConfig(preset="hh_rlhf").validate()
    PreferenceDataConfig(preset="pku_saferlhf", path="p.parquet").validate()
    SFTDataConfig(preset="ultrafeedback", path="u.jsonl").validate()


# ----------------------------------------------------------------------------- malformed rows

H, A = "\n\nHuman: ", "\n\nAssistant: "
PKU_OK = _fixture_rows("pku_saferlhf")[0]
UF_OK = _fixture_rows("ultrafeedback")[0]
USER, REPLY = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(
    "preset,safety,row,match",
    [
        (
            "hh_rlhf",
            False,
            {"chosen": "Hello", "rejected": H + "q" + A + "a"},
            r"field 'chosen' is not a Human/Assistant transcript",
        ),
        (
            "hh_rlhf",
            False,
            {"chosen": H + "q" + A + "a", "rejected": H + "q" + A + "a" + H + "more"},
            r"field 'rejected' must end with an Assistant turn",
        ),
        (
            "hh_rlhf",
            False,
            {"chosen": H + "q" + A + "a", "rejected": H + "other" + A + "b"},
            r"field 'rejected' differs from 'chosen' at turn 0",
        ),
        (
            "hh_rlhf",
            False,
            {"chosen": A + "a", "rejected": A + "b"},
            r"field 'chosen' has no turn before its Assistant reply",
        ),
        ("hh_rlhf", False, {"rejected": H + "q" + A + "a"}, r"expected a string field 'chosen'"),
        (
            "pku_saferlhf",
            False,
            {**PKU_OK, "better_response_id": 2},
            r"field 'better_response_id'=2: expected 0 or 1",
        ),
        (
            "pku_saferlhf",
            False,
            {**PKU_OK, "response_1": None},
            r"expected a string field 'response_1'",
        ),
        (
            "pku_saferlhf",
            True,
            {**PKU_OK, "safer_response_id": True},
            r"field 'safer_response_id'=True: expected 0 or 1",
        ),
        (
            "pku_saferlhf",
            True,
            {**PKU_OK, "is_response_1_safe": "yes"},
            r"expected a true/false field 'is_response_1_safe'",
        ),
        (
            "ultrafeedback",
            False,
            {**UF_OK, "chosen": [USER]},
            r"field chosen\[0\].role='user': the last message must be the assistant's",
        ),
        (
            "ultrafeedback",
            False,
            {**UF_OK, "rejected": [USER, {"role": "assistant", "content": 5}]},
            r"field rejected\[1\].content must be a string",
        ),
        (
            "ultrafeedback",
            False,
            {**UF_OK, "chosen": "Ash."},
            r"field 'chosen' must be a non-empty list",
        ),
        (
            "ultrafeedback",
            False,
            {**UF_OK, "rejected": [{"role": "user", "content": "?"}, REPLY]},
            r"field 'rejected' differs from 'chosen' at turn 0",
        ),
        (
            "ultrafeedback",
            False,
            {"chosen": [REPLY], "rejected": [REPLY]},
            r"expected a string field 'prompt'",
        ),
        ("ultrafeedback", False, ["a", "list"], r"expected a JSON object, got list"),
    ],
)
def test_malformed_preset_rows_name_file_row_and_field(tmp_path, preset, safety, row, match):
    good = _fixture_rows(preset)[0]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(InputError, match=r"p.jsonl:2: " + match):
        _read(path, preset, safety)


@pytest.mark.parametrize(
    "preset,row,match",
    [
        ("hh_rlhf", {"chosen": "Human: q Assistant: a"}, r"field 'chosen' must end with an Ass"),
        ("hh_rlhf", {"chosen": "q\n\nAssistant: a"}, r"field 'chosen' is not a Human/Assis"),
        (
            "ultrafeedback",
            {"chosen": [{"role": "bot", "content": "x"}]},
            r"field chosen\[0\].role='bot'",
        ),
    ],
)
def test_malformed_sft_preset_rows_name_file_row_and_field(tmp_path, preset, row, match):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(_fixture_rows(preset)[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(InputError, match=r"s.jsonl:2: " + match):
        read_samples(str(path), load_tokenizer(), SFTDataConfig(preset=preset), SEQ, 512)


def test_malformed_parquet_rows_name_the_row(tmp_path):
    rows = _fixture_rows("pku_saferlhf")
    rows[2]["safer_response_id"] = 7
    path = tmp_path / "p.parquet"
    pq.write_table(_table(rows), path)
    _read(path, "pku_saferlhf", safety=False)  # the better ids are fine
    with pytest.raises(InputError, match=r"p.parquet:row 3: field 'safer_response_id'=7"):
        _read(path, "pku_saferlhf", safety=True)


# ----------------------------------------------------------------------------- file formats


def _table(rows: list[dict]) -> pa.Table:
    """``rows`` as columns: every key of any row (None where a row lacks it)."""
    keys = dict.fromkeys(key for row in rows for key in row)
    return pa.table({key: [row.get(key) for row in rows] for key in keys})


def _write(rows: list[dict], path: Path) -> Path:
    """``rows`` as the file format of ``path``'s name (``.stream.arrow``: an IPC stream as
    ``datasets.save_to_disk`` writes; ``.lines.json``: JSON Lines named .json)."""
    name = path.name
    if name.endswith(".lines.json"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows, indent=1))
    elif name.endswith(".parquet"):
        pq.write_table(_table(rows), path)
    elif name.endswith(".stream.arrow"):
        table = _table(rows)
        with pa.OSFile(str(path), "wb") as fh, pa.ipc.new_stream(fh, table.schema) as writer:
            writer.write_table(table)
    else:
        table = _table(rows)
        with pa.OSFile(str(path), "wb") as fh, pa.ipc.new_file(fh, table.schema) as writer:
            writer.write_table(table)
    return path


NAMES = ["d.json", "d.lines.json", "d.parquet", "d.stream.arrow", "d.file.arrow"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("preset,safety", [("pku_saferlhf", True), ("ultrafeedback", False)])
def test_every_format_reads_equal_to_the_jsonl(tmp_path, name, preset, safety):
    want = _read(FIXTURES / f"{preset}.jsonl", preset, safety)
    path = _write(_fixture_rows(preset), tmp_path / name)
    got = _read(path, preset, safety)
    assert _as_tuples(got) == _as_tuples(want)
    rows = (
        [f"{path}:{i}" for i in (1, 2, 3)]
        if "lines" in name
        else [f"{path}:row {i}" for i in (1, 2, 3)]
    )
    assert [s.where for s in got] == rows


def test_hh_rlhf_parquet_fine_tunes_as_its_jsonl(tmp_path):
    tok, cfg = load_tokenizer(), SFTDataConfig(preset="hh_rlhf")
    path = _write(_fixture_rows("hh_rlhf"), tmp_path / "hh.parquet")
    got = read_samples(str(path), tok, cfg, SEQ, 512)
    want = read_samples(str(FIXTURES / "hh_rlhf.jsonl"), tok, cfg, SEQ, 512)
    assert [(s.ids, s.loss_mask) for s in got] == [(s.ids, s.loss_mask) for s in want]


def test_columnar_files_mixing_our_layouts_read_as_jsonl(tmp_path):
    """A Parquet column exists on every row (None where a row lacks it): a pair row's
    ``responses`` and a prompt/response row's ``messages`` are None, not a layout."""
    pairs = [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
    ]
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    parquet = _write(pairs, tmp_path / "r.parquet")
    assert _as_tuples(_read(parquet, None)) == _as_tuples(_read(jsonl, None))
    sft = [
        {"prompt": "p", "response": "r"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]},
    ]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in sft))
    parquet = _write(sft, tmp_path / "s.parquet")
    args = (load_tokenizer(), SFTDataConfig(), SEQ, 512)
    got, want = read_samples(str(parquet), *args), read_samples(str(jsonl), *args)
    assert [s.ids for s in got] == [s.ids for s in want]


def test_a_json_column_of_mixed_types_is_read_as_written(tmp_path):
    """datasets' JSON builder would turn every ``prompt`` into a JSON string ('"p"'); ours
    reads row 1 as written and names row 2's bad field."""
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"prompt": "p", "response": "r"}, {"prompt": 3, "response": "r"}]))
    rows = list(read_rows(str(path), "x"))
    assert rows[0] == (f"{path}:row 1", {"prompt": "p", "response": "r"})
    with pytest.raises(InputError, match=r"m.json:row 2: expected a string field 'prompt'"):
        read_samples(str(path), load_tokenizer(), SFTDataConfig(), SEQ, 512)


def test_unreadable_files_name_the_file_and_where(tmp_path):
    bad = {
        "d.csv": (b"prompt,response\n", r"d.csv: unknown SFT data file format '.csv': "),
        "d.jsonl.gz": (b"\x1f\x8b", r"format '.gz' \(decompress it first: gunzip\)"),
        "d.json": (b'[{"prompt": "a",\n "response": }]', r"d.json:2: not valid JSON"),
        "u.json": (b'[{"prompt": "a",\n "response": "\xff"}]', r"u.json:2: not valid UTF-8"),
        "u.jsonl": (
            b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff"}\n',
            r"u.jsonl:2: not valid UTF-8",
        ),
        "d.parquet": (b"not parquet", r"d.parquet: not a readable Parquet file"),
        "d.arrow": (b"not arrow", r"d.arrow: not a readable Arrow IPC file"),
    }
    for name, (content, match) in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match=match):
            read_samples(str(tmp_path / name), load_tokenizer(), SFTDataConfig(), SEQ, 512)
    with pytest.raises(FileNotFoundError, match=r"SFT data file not found: .*nope.parquet"):
        read_samples(str(tmp_path / "nope.parquet"), load_tokenizer(), SFTDataConfig(), SEQ, 512)


def test_a_truncated_arrow_stream_names_the_first_row_it_cannot_read(tmp_path):
    table = pa.table({"prompt": ["p" * 50] * 3, "response": ["r"] * 3})
    path = tmp_path / "t.arrow"
    with pa.OSFile(str(path), "wb") as fh, pa.ipc.new_stream(fh, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=1):
            writer.write_batch(batch)
    path.write_bytes(path.read_bytes()[:-60])  # into the last row's batch
    rows = read_rows(str(path), "x")
    assert [next(rows)[0], next(rows)[0]] == [f"{path}:row 1", f"{path}:row 2"]
    with pytest.raises(InputError, match=r"t.arrow:row 3: not a readable Arrow IPC file"):
        next(rows)


def test_a_path_with_glob_characters_reads_that_file_only(tmp_path):
    (tmp_path / "d[1]").mkdir()
    _write([{"prompt": "p", "response": "r"}], tmp_path / "d[1]" / "x*.parquet")
    _write([{"prompt": "q", "response": "s"}] * 2, tmp_path / "d[1]" / "xy.parquet")
    rows = list(read_rows(str(tmp_path / "d[1]" / "x*.parquet"), "x"))
    assert [row for _, row in rows] == [{"prompt": "p", "response": "r"}]


# ----------------------------------------------------------------------------- offline


def test_parquet_and_arrow_are_read_without_any_connection(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network connection attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    rows = _fixture_rows("ultrafeedback")
    for name in ("o.parquet", "o.stream.arrow", "o.file.arrow"):
        got = list(read_rows(str(_write(rows, tmp_path / name)), "x"))
        assert [row["prompt"] for _, row in got] == [r["prompt"] for r in rows]


def test_reading_works_with_the_hub_offline_and_caches_nothing(tmp_path):
    path = _write(_fixture_rows("hh_rlhf"), tmp_path / "o.parquet")
    cache = tmp_path / "hf"
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(cache),
        "HF_DATASETS_CACHE": str(cache / "datasets"),
    }
    code = (
        "import sys; from hpc_rlhf.data.sources import read_rows; "
        "print(len(list(read_rows(sys.argv[1], 'x'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"
    assert not [p for p in cache.rglob("*") if p.is_file()]  # streamed: no Arrow cache
