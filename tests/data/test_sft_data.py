"""SFT data: conversations tokenized as PPO sees them, the loss mask on assistant tokens
(and their EOS) only, in every turn; next-token micro-batches; bad rows named."""

from __future__ import annotations

import json

import pytest
import torch

from hpc_rlhf.config import InputError, SFTDataConfig
from hpc_rlhf.data.sft import SFTDataset, collate, conversation_tokens, read_samples
from hpc_rlhf.data.tokenizer import load_tokenizer

TEMPLATE = "<|user|> {prompt} <|assistant|>"


def _expected(messages, tok) -> tuple[list[int], list[bool]]:
    """Plain-Python reference: BOS, then each turn's tokens; loss on assistant turns + EOS."""
    ids, mask = [tok.bos_id], [False]
    for role, text in messages:
        if role == "user":
            piece, loss = tok.encode(TEMPLATE.replace("{prompt}", text)), False
        elif role == "system":
            piece, loss = tok.encode(text), False
        else:
            piece, loss = tok.encode(text) + [tok.eos_id], True
        ids.extend(piece)
        mask.extend([loss] * len(piece))
    return ids, mask


def test_multi_turn_conversation_masks_every_assistant_turn_and_its_eos():
    tok = load_tokenizer()
    messages = [
        ("system", "You tell short stories."),
        ("user", "Continue: the cat reads."),
        ("assistant", "The baker opens the box."),
        ("user", "And then?"),
        ("assistant", "The cat sleeps."),
    ]
    ids, mask = conversation_tokens(messages, tok, TEMPLATE)
    assert (ids, mask) == _expected(messages, tok)
    assert (
        sum(mask)
        == len(tok.encode("The baker opens the box.")) + len(tok.encode("The cat sleeps.")) + 2
    )


def test_collate_shifts_labels_and_masks_the_predicted_assistant_tokens(tmp_path):
    tok = load_tokenizer()
    path = tmp_path / "sft.jsonl"
    rows = [
        {"prompt": "the cat", "response": "reads a book."},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples = read_samples(str(path), tok, SFTDataConfig(), 64, 512)
    mb = collate(samples, tok.pad_id)
    for b, sample in enumerate(samples):
        n = len(sample.ids)
        for t in range(mb.shape[1]):
            real = t < n - 1
            assert bool(mb.attention_mask_BS[b, t]) == real
            if real:
                assert int(mb.input_ids_BS[b, t]) == sample.ids[t]
                assert int(mb.labels_BS[b, t]) == sample.ids[t + 1]
            assert bool(mb.loss_mask_BS[b, t]) == (real and sample.loss_mask[t + 1])
    assert torch.equal(mb.head_mask_BS, mb.loss_mask_BS.bool())


@pytest.mark.parametrize(
    "row,match",
    [
        ('{"prompt": "a"}', r"sft.jsonl:2: expected a string field 'response'"),
        ('{"messages": []}', r"sft.jsonl:2: field 'messages' must be a non-empty list"),
        (
            '{"messages": [{"role": "bot", "content": "x"}]}',
            r"sft.jsonl:2: field messages\[0\].role='bot'",
        ),
        (
            '{"messages": [{"role": "user", "content": 3}]}',
            r"sft.jsonl:2: field messages\[0\].content must be a string",
        ),
        ('{"prompt": "a", "response": ', r"sft.jsonl:2: not valid JSON"),
        ('{"messages": [{"role": "user", "content": "only a question"}]}', r"no assistant token"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path, row, match):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n' + row + "\n")
    with pytest.raises(InputError, match=match):
        read_samples(str(path), load_tokenizer(), SFTDataConfig(), 64, 512)


def test_long_samples_are_cut_on_the_configured_side_and_field_names_are_configurable(
    tmp_path, caplog
):
    tok = load_tokenizer()
    path = tmp_path / "sft.jsonl"
    long_answer = " ".join(["the cat reads a book."] * 20)
    path.write_text(json.dumps({"q": "go", "a": long_answer}) + "\n")
    cfg = SFTDataConfig(prompt_key="q", response_key="a")
    full, _ = conversation_tokens([("user", "go"), ("assistant", long_answer)], tok, TEMPLATE)
    (right,) = read_samples(str(path), tok, cfg, 16, 512)
    assert right.ids == full[:17]
    (left,) = read_samples(str(path), tok, SFTDataConfig(**_keys(cfg, "left")), 16, 512)
    assert left.ids == full[-17:]
    assert "longer than train.seq_length + 1 = 17 tokens" in caplog.text


def _keys(cfg: SFTDataConfig, side: str) -> dict:
    return {"prompt_key": cfg.prompt_key, "response_key": cfg.response_key, "truncation_side": side}


def test_held_out_rows_are_disjoint_and_steps_cover_the_data_in_a_seeded_order():
    tok = load_tokenizer()
    data = SFTDataset(SFTDataConfig(eval_fraction=0.1), tok, 96, seed=3, vocab_size=512)
    assert len(data.eval) == 60 and len(data.train) == 540
    assert not {s.where for s in data.eval} & {s.where for s in data.train}
    seen = []
    for step in range(540 // 12):  # one epoch: 12 samples per step over 2 DP ranks
        for rank in range(2):
            for mb in data.step_microbatches(step, 2, 3, rank, 2):
                seen += [tuple(row[row != tok.pad_id].tolist()) for row in mb.input_ids_BS]
    assert len(set(seen)) == len({tuple(s.ids[:-1]) for s in data.train})
    again = SFTDataset(SFTDataConfig(eval_fraction=0.1), tok, 96, seed=3, vocab_size=512)
    assert torch.equal(
        again.step_microbatches(5, 2, 3, 1, 2)[1].input_ids_BS,
        data.step_microbatches(5, 2, 3, 1, 2)[1].input_ids_BS,
    )
