"""Regenerate the tiny assets shipped in hpc_rlhf/assets/ (run once; the outputs are committed).

* ``tiny_corpus.txt``: a small English-like corpus written by templates (our own text),
  used for the LM demo and SFT/ptx data;
* ``tiny_prompts.jsonl``: prompts for the PPO demo (``{"prompt": ...}`` per line);
* ``tiny_sp.model``: a sentencepiece BPE tokenizer (vocab 512) trained on the corpus.

Deterministic (fixed seed); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random

ASSETS = os.path.join(os.path.dirname(__file__), "..", "hpc_rlhf", "assets")

SUBJECTS = [
    "the cat",
    "a small robot",
    "my neighbour",
    "the old sailor",
    "a young student",
    "the gardener",
    "our teacher",
    "the baker",
    "a quiet child",
    "the engineer",
]
VERBS = [
    "reads",
    "builds",
    "paints",
    "finds",
    "carries",
    "cleans",
    "writes",
    "opens",
    "watches",
    "fixes",
]
OBJECTS = [
    "a red book",
    "the wooden boat",
    "a bright lamp",
    "the heavy box",
    "a long letter",
    "the broken clock",
    "a green garden",
    "the tall tower",
    "a warm bowl of soup",
    "the blue door",
]
PLACES = [
    "in the morning",
    "near the river",
    "after lunch",
    "under the bridge",
    "before the storm",
    "at the market",
    "in the library",
    "by the sea",
    "on a cold day",
    "with great care",
]
QUESTIONS = [
    "What does {s} do {p}?",
    "Tell me a short story about {s}.",
    "Why does {s} like {o}?",
    "Describe {o} in one sentence.",
    "Where can {s} find {o}?",
    "Write a kind message to {s}.",
]


def sentence(rng: random.Random) -> str:
    s, v, o, p = (rng.choice(x) for x in (SUBJECTS, VERBS, OBJECTS, PLACES))
    return f"{s.capitalize()} {v} {o} {p}."


def main() -> None:
    import sentencepiece as spm

    rng = random.Random(20261122)
    os.makedirs(ASSETS, exist_ok=True)
    corpus = os.path.join(ASSETS, "tiny_corpus.txt")
    with open(corpus, "w") as fh:
        for _ in range(3000):
            fh.write(" ".join(sentence(rng) for _ in range(rng.randint(2, 5))) + "\n")
    with open(os.path.join(ASSETS, "tiny_prompts.jsonl"), "w") as fh:
        for _ in range(256):
            q = rng.choice(QUESTIONS).format(
                s=rng.choice(SUBJECTS), o=rng.choice(OBJECTS), p=rng.choice(PLACES)
            )
            fh.write(json.dumps({"prompt": q}) + "\n")
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=os.path.join(ASSETS, "tiny_sp"),
        vocab_size=512,
        model_type="bpe",
        character_coverage=1.0,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        user_defined_symbols=["<|user|>", "<|assistant|>"],
        minloglevel=2,
    )
    os.remove(os.path.join(ASSETS, "tiny_sp.vocab"))


if __name__ == "__main__":
    main()
