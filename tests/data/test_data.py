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
    # the same windows given as token ids: the same seeded order, the same micro-batches
    given = LMWindows.of_windows(data.windows_NS1.clone(), seed=1).microbatch(3, 4)
    want = data.microbatch(3, 4)
    assert (given.input_ids_BS == want.input_ids_BS).all()
    assert (given.labels_BS == want.labels_BS).all() and given.loss_mask_BS.all()


TEMPLATE = "<|user|> {prompt} <|assistant|>"


def test_long_prompts_keep_bos_and_the_chat_template_and_are_counted_once(tmp_path, caplog):
    """A prompt longer than max_prompt_length loses text from the chosen side of its text
    only: BOS, the template head and the assistant tail stay; one warning gives the count."""
    tok = load_tokenizer()
    words = "the old sailor reads a red book by the sea and the cat sleeps"
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": words}) + "\n" + json.dumps({"prompt": "cat"}) + "\n")
    head = [tok.bos_id, *tok.encode("<|user|> ")]
    tail = tok.encode(" <|assistant|>")
    body = tok.encode(words)
    limit = len(head) + len(tail) + 5
    assert len(head) + len(body) + len(tail) > limit
    with caplog.at_level("WARNING", logger="hpc_rlhf.data.prompts"):
        left = PromptDataset(str(path), tok, limit, TEMPLATE, truncation_side="left")
    assert left.token_ids[0] == [*head, *body[-5:], *tail]
    short = left.token_ids[1]
    assert short == [tok.bos_id, *tok.encode(TEMPLATE.format(prompt="cat"))]  # untouched
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("1 of 2 prompts")
    assert "data.max_prompt_length=" + str(limit) in warnings[0]
    right = PromptDataset(str(path), tok, limit, TEMPLATE, truncation_side="right")
    assert right.token_ids[0] == [*head, *body[:5], *tail]
    assert right.token_ids[0][0] == tok.bos_id
    assert right.token_ids[0][-1] == tok.token_id("<|assistant|>")
    with pytest.raises(ValueError, match="leaves no room for the prompt text"):
        PromptDataset(str(path), tok, len(head) + len(tail), TEMPLATE)
    plain = PromptDataset(str(path), tok, 4, None, truncation_side="left")
    assert plain.token_ids[0] == [tok.bos_id, *body[-3:]]


def test_prompt_token_ids_outside_the_model_vocabulary_name_the_line(tmp_path):
    tok = load_tokenizer()
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "the old sailor"}\n')
    high = max(tok.encode("the old sailor"))
    assert max(tok.encode("a") + [tok.bos_id]) < high
    ok = PromptDataset(str(path), tok, 64, None, vocab_size=high + 1)
    assert len(ok) == 2
    with pytest.raises(
        ValueError, match=rf"p.jsonl:3: token id {high} is outside the model's vocab"
    ):
        PromptDataset(str(path), tok, 64, None, vocab_size=high)


def test_non_utf8_prompt_and_text_files_name_the_line(tmp_path):
    tok = load_tokenizer()
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')  # latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"p.jsonl:2: not valid UTF-8 .*at byte 15"):
        read_prompts(str(path))
    text = tmp_path / "t.txt"
    text.write_bytes(b"the cat\nthe dog\n\xff\xfe the sea\n")
    with pytest.raises(ValueError, match=r"t.txt:3: not valid UTF-8"):
        LMWindows(str(text), tok, seq_length=2)


def test_lm_text_token_ids_outside_the_model_vocabulary_name_the_line(tmp_path):
    tok = load_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text("a book\n\nthe cat\n")
    high = max(tok.encode("the cat"))
    assert max(tok.encode("a book") + [tok.eos_id]) < high
    LMWindows(str(text), tok, seq_length=2, vocab_size=high + 1)
    with pytest.raises(ValueError, match=rf"t.txt:3: token id {high} is outside"):
        LMWindows(str(text), tok, seq_length=2, vocab_size=high)
