"""Tokenizers from local files and the resumable prompt / LM datasets."""

from __future__ import annotations

import json

import pytest

from hpc_rlhf.data.lm import LMWindows, default_corpus_path
from hpc_rlhf.data.prompts import PromptDataset, read_prompts
from hpc_rlhf.data.tokenizer import load_tokenizer


def test_shipped_sentencepiece_tokenizer_round_trips_text():
    tok = load_tokenizer()
    text = "The old sailor reads a red book by the sea."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size == 512 and {tok.bos_id, tok.eos_id, tok.pad_id} == {2, 3, 0}
    assert tok.token_id("<|assistant|>") >= 0


def test_tokenizer_json_is_loaded_without_a_hub(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = load_tokenizer(str(tmp_path))  # a directory holding tokenizer.json
    assert tok.encode("hello world") == [2, 3]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(str(tmp_path / "nope.model"))


def test_prompt_file_errors_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r'p.jsonl:2: expected an object with a "prompt" string'):
        read_prompts(str(path))
    path.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not valid JSON"):
        read_prompts(str(path))
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompts(str(tmp_path / "missing.jsonl"))


def test_prompt_batches_split_over_dp_ranks_and_resume_exactly(tmp_path):
    path = tmp_path / "p.jsonl"
    words = [
        "cat",
        "robot",
        "sailor",
        "student",
        "gardener",
        "teacher",
        "baker",
        "child",
        "engineer",
        "neighbour",
    ]  # in the tiny vocabulary (digits are not)
    path.write_text("".join(json.dumps({"prompt": f"about the {w}"}) + "\n" for w in words))
    tok = load_tokenizer()
    make = lambda: PromptDataset(str(path), tok, 16, "<|user|> {prompt} <|assistant|>", seed=3)  # noqa: E731
    ranks = [make(), make()]  # every data-parallel rank holds its own dataset object
    steps = [[ranks[r].next_batch(4, r, 2) for r in (0, 1)] for _ in range(4)]
    for batch in steps:  # no prompt twice within an epoch-sized window, ranks disjoint
        assert batch[0] != batch[1] and len(batch[0]) == 2
    first = [p for rank_batches in steps[:2] for b in rank_batches for p in b]
    assert len({tuple(p) for p in first}) == 8
    assert all(p[0] == tok.bos_id and p[-1] == tok.token_id("<|assistant|>") for p in first)
    resumed = [make(), make()]
    for r in (0, 1):
        resumed[r].load_state_dict(ranks[r].state_dict() | {"position": 8})  # after 2 steps
    assert [resumed[r].next_batch(4, r, 2) for r in (0, 1)] == steps[2]


def test_lm_windows_cover_the_corpus_in_a_seeded_order():
    tok = load_tokenizer()
    data = LMWindows(default_corpus_path(), tok, seq_length=32, seed=1)
    mb = data.microbatch(0, 4)
    assert mb.input_ids_BS.shape == (4, 32)
    assert (mb.labels_BS[:, :-1] == mb.input_ids_BS[:, 1:]).all()
    again = LMWindows(default_corpus_path(), tok, seq_length=32, seed=1).microbatch(0, 4)
    assert (again.input_ids_BS == mb.input_ids_BS).all()
