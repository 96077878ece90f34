"""Regenerate the tiny conversation set shipped for SFT (``hpc_rlhf/assets/tiny_sft.jsonl``).

Deterministic: rows are built from the shipped corpus, three sentences per line. Most rows
are one exchange (``prompt`` / ``response``: continue the story); every fourth is a
two-turn ``messages`` conversation, every eighth with a system turn, so the multi-turn
path is exercised too.

    python tools/make_tiny_data.py
"""

from __future__ import annotations

import json
import os

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


def main() -> None:
    with open(os.path.join(ASSETS, "tiny_corpus.txt")) as fh:
        lines = [sentences(line) for line in fh if line.strip()]
    rows = [sft_row(i, parts) for i, parts in enumerate(p for p in lines if len(p) >= 3)]
    with open(os.path.join(ASSETS, "tiny_sft.jsonl"), "w") as fh:
        for row in rows[:ROWS]:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
