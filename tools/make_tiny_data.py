"""Regenerate the tiny SFT and preference sets shipped in ``hpc_rlhf/assets/``.

Deterministic, built from the shipped corpus (three sentences per line):

* ``tiny_sft.jsonl``: mostly one exchange (``prompt`` / ``response``: continue the story);
  every fourth row a two-turn ``messages`` conversation, every eighth with a system turn;
* ``tiny_preferences.jsonl``: a preference the tiny model can learn: a well-formed
  sentence over the same words scrambled (seeded). Pairs carry Llama-2 margin labels (more
  scrambled, larger margin); every fourth row is a 3-way ranking (intact, two words
  swapped, scrambled);
* ``tiny_story_prompts.jsonl``: PPO prompts of the SFT and preference sets' kind
  ("Continue the story: ..."), from corpus lines neither of them uses;
* ``tiny_safety.jsonl``: a cost model's data: a response's harm is how many of the words
  "broken" and "storm" it holds (unsafe when any). Pairs of a safer and an unsafer
  response with their safety labels; every fourth row a 3-way ranking (harm 0, 1, 2);
* ``tiny_kto.jsonl``: KTO's unpaired completions ``{prompt, completion, label}`` of the
  preference set's kind: on even rows the intact sentence (desirable), on odd rows a
  scrambled one (undesirable), from the preference set's corpus lines;
* verifiable-reward sets: ``tiny_repeat_prompts.jsonl`` (a toy task the tiny model can
  learn: each prompt names a word, ``answer``, to repeat), ``tiny_gsm8k.jsonl`` (arithmetic
  word problems in GSM8K's layout) and ``tiny_mbpp.jsonl`` (small functions in MBPP's
  layout with assertion tests; the reference ``code`` passes them).

    python tools/make_tiny_data.py
"""

from __future__ import annotations

import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "hpc_rlhf", "assets")
ROWS = 600


def sentences(line: str) -> list[str]:
    """The line's sentences, each with its full stop."""
    return [s.strip() + "." for s in line.split(".") if s.strip()]


def sft_row(index: int, parts: list[str]) -> dict:
    """One row of either layout (see the module docstring)."""
    if index % 4 != 3:
        return {"prompt": f"Continue the story: {parts[0]}", "response": " ".join(parts[1:])}
    messages = [
        {"role": "user", "content": f"Continue the story: {parts[0]}"},
        {"role": "assistant", "content": parts[1]},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": parts[2]},
    ]
    if index % 8 == 7:
        messages.insert(0, {"role": "system", "content": "You tell short stories."})
    return {"messages": messages}


def scrambled(sentence: str, rng: random.Random, swaps: int | None = None) -> str:
    """``sentence`` with its words shuffled (or ``swaps`` random swaps), never unchanged."""
    words = sentence.rstrip(".").split()
    for _ in range(100):
        out = list(words)
        if swaps is None:
            rng.shuffle(out)
        else:
            for _ in range(swaps):
                i, j = rng.sample(range(len(out)), 2)
                out[i], out[j] = out[j], out[i]
        if out != words:
            return " ".join(out) + "."
    raise ValueError(f"cannot scramble {sentence!r}")


LABELS = ("significantly_better", "better", "slightly_better")


def preference_row(index: int, parts: list[str], rng: random.Random) -> dict:
    """One pair (with a margin label) or, every fourth row, a 3-way ranking."""
    prompt, answer = f"Continue the story: {parts[0]}", parts[1]
    if index % 4 == 3:
        responses = [scrambled(answer, rng), answer, scrambled(answer, rng, swaps=1)]
        return {"prompt": prompt, "responses": responses, "ranking": [1, 2, 0]}
    label = LABELS[index % 3]
    swaps = {"significantly_better": None, "better": 3, "slightly_better": 1}[label]
    return {
        "prompt": prompt,
        "chosen": answer,
        "rejected": scrambled(answer, rng, swaps),
        "margin": label,
    }


HARMFUL = ("broken", "storm")


def harm(text: str) -> int:
    """How many harmful words ``text`` holds (the toy safety property)."""
    return sum(text.count(word) for word in HARMFUL)


def safety_row(index: int, by_harm: dict[int, list[str]], rng: random.Random) -> dict:
    """A pair (safer first) with safety labels or, every fourth row, a ranking."""
    prompt = f"Tell me about {rng.choice(by_harm[0]).split(' ', 2)[1]}."
    if index % 4 == 3:
        responses = [rng.choice(by_harm[h]) for h in (2, 0, 1)]
        return {
            "prompt": prompt,
            "responses": responses,
            "ranking": [1, 2, 0],
            "safe": [False, True, False],
        }
    low, high = sorted(rng.sample([0, 1, 2], 2))
    chosen, rejected = rng.choice(by_harm[low]), rng.choice(by_harm[high])
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_safe": low == 0,
        "rejected_safe": False,
    }


def kto_row(index: int, parts: list[str], rng: random.Random) -> dict:
    """A desirable (intact) or, on odd rows, an undesirable (scrambled) completion."""
    prompt, answer = f"Continue the story: {parts[0]}", parts[1]
    desirable = index % 2 == 0
    completion = answer if desirable else scrambled(answer, rng)
    return {"prompt": prompt, "completion": completion, "label": desirable}


REPEAT_WORDS = ("red", "book")  # one token each in the tiny tokenizer ("\u2581red", ...)
REPEAT_FORMS = (
    "Repeat the word {w}.",
    "Say {w} again and again.",
    "Write {w} many times.",
    "Only the word {w}, please.",
)


def repeat_rows() -> list[dict]:
    """The verifiable toy task: each prompt names a word, its reference ``answer``."""
    return [
        {"prompt": form.format(w=word), "answer": word}
        for _ in range(8)
        for form in REPEAT_FORMS
        for word in REPEAT_WORDS
    ]


def gsm8k_rows(rng: random.Random, n: int = 16) -> list[dict]:
    """Arithmetic word problems in GSM8K's layout (``question``, ``answer`` ending with
    ``#### <number>``)."""
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
        total = (a + b) * c
        rows.append(
            {
                "question": f"A shelf holds {a} red books and {b} blue books. There are {c} "
                "such shelves. How many books are there?",
                "answer": f"Each shelf holds {a} + {b} = {a + b} books.\n"
                f"So {c} shelves hold {a + b} * {c} = {total} books.\n#### {total:,}",
            }
        )
    return rows


MBPP_TASKS = (
    ("add", "a, b", "return a + b", [(1, 2), (-3, 3), (10, 5)]),
    ("square", "x", "return x * x", [(3,), (-4,), (0,)]),
    ("biggest", "a, b", "return max(a, b)", [(1, 2), (7, -7), (4, 4)]),
    ("count_a", "s", "return s.count('a')", [("banana",), ("xyz",), ("aaa",)]),
)


def mbpp_rows() -> list[dict]:
    """Small programming tasks in MBPP's layout (``text``, ``code``, ``test_list``): the
    reference ``code`` passes every test."""
    rows = []
    for name, params, body, cases in MBPP_TASKS:
        code = f"def {name}({params}):\n    {body}\n"
        scope: dict = {}
        exec(code, scope)  # the expected values come from the reference code itself
        tests = [f"assert {name}{case!r} == {scope[name](*case)!r}" for case in cases]
        tests = [t.replace(",)", ")") for t in tests]
        rows.append(
            {"text": f"Write a function {name}({params}).", "code": code, "test_list": tests}
        )
    return rows


def write_rows(name: str, rows: list[dict]) -> None:
    with open(os.path.join(ASSETS, name), "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def main() -> None:
    with open(os.path.join(ASSETS, "tiny_corpus.txt")) as fh:
        lines = [sentences(line) for line in fh if line.strip()]
    rows = [sft_row(i, parts) for i, parts in enumerate(p for p in lines if len(p) >= 3)]
    with open(os.path.join(ASSETS, "tiny_sft.jsonl"), "w") as fh:
        for row in rows[:ROWS]:
            fh.write(json.dumps(row) + "\n")
    rng = random.Random(1234)
    usable = [p for p in lines if len(p) >= 3][ROWS : 2 * ROWS]  # not the SFT lines
    with open(os.path.join(ASSETS, "tiny_preferences.jsonl"), "w") as fh:
        for i, parts in enumerate(usable):
            fh.write(json.dumps(preference_row(i, parts, rng)) + "\n")
    with open(os.path.join(ASSETS, "tiny_story_prompts.jsonl"), "w") as fh:
        for parts in [p for p in lines if len(p) >= 3][2 * ROWS : 2 * ROWS + 256]:
            fh.write(json.dumps({"prompt": f"Continue the story: {parts[0]}"}) + "\n")
    by_harm: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for parts in lines:
        for a, b in zip(parts, parts[1:]):
            response = f"{a} {b}"
            if harm(response) <= 2:
                by_harm[harm(response)].append(response)
    with open(os.path.join(ASSETS, "tiny_safety.jsonl"), "w") as fh:
        for i in range(ROWS):
            fh.write(json.dumps(safety_row(i, by_harm, rng)) + "\n")
    write_rows("tiny_repeat_prompts.jsonl", repeat_rows())
    write_rows("tiny_gsm8k.jsonl", gsm8k_rows(random.Random(8)))
    write_rows("tiny_mbpp.jsonl", mbpp_rows())
    kto_rng = random.Random(4321)
    with open(os.path.join(ASSETS, "tiny_kto.jsonl"), "w") as fh:
        for i, parts in enumerate(usable):
            fh.write(json.dumps(kto_row(i, parts, kto_rng)) + "\n")


if __name__ == "__main__":
    main()
