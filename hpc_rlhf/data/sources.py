"""Rows of local data files, by extension: JSON Lines, JSON, Parquet and Arrow.

``read_rows`` yields ``(where, row)`` for every row of a file, ``where`` naming it in
errors: ``path:LINE`` for JSON Lines (1-based lines, as editors count; blank lines are
skipped) and ``path:row N`` for the others (1-based rows).

* ``.jsonl``: one JSON value a line, read here line by line (UTF-8 and JSON errors name the
  line).
* ``.json``: a JSON array of rows, or JSON Lines (what ``datasets.Dataset.to_json``
  writes), read here too: the ``datasets`` JSON builder turns every value of a column whose
  rows disagree on its type into a JSON string (``"x"`` becomes ``'"x"'``, seen with
  datasets 5.2), which would silently change the text we train on.
* ``.parquet`` / ``.arrow`` (Arrow IPC file or stream, as ``save_to_disk`` writes): through
  ``datasets.load_dataset`` streaming the local file, so no Arrow copy is cached on disk
  (its lock file goes to a temporary directory, not ``~/.cache``) and nothing is
  downloaded (``local_files_only``; no hub access even without ``HF_DATASETS_OFFLINE``).

Rows are whatever the file holds; the callers check their fields.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Iterator

from hpc_rlhf.config import InputError
from hpc_rlhf.data.text_files import numbered_lines

# extension -> the datasets builder reading it (None: read here)
FORMATS: dict[str, str | None] = {
    ".jsonl": None,
    ".json": None,
    ".parquet": "parquet",
    ".arrow": "arrow",
}

# how the public sets ship some files (HH-RLHF: .jsonl.gz; PKU-SafeRLHF's first round: .xz)
COMPRESSED = {".gz": "gunzip", ".xz": "unxz", ".bz2": "bunzip2", ".zst": "unzstd"}


def read_rows(path: str, what: str) -> Iterator[tuple[str, object]]:
    """``(where, row)`` of every row of ``path`` (see the module docstring).

    Raises ``FileNotFoundError`` naming ``what`` and the path, and ``InputError`` naming
    the file (and line or row) of an unknown extension or unreadable content."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        hint = f" (decompress it first: {COMPRESSED[ext]})" if ext in COMPRESSED else ""
        raise InputError(
            f"{path}: unknown {what} format {ext or '(no extension)'!r}{hint}: expected one "
            f"of {', '.join(FORMATS)} (JSON Lines, JSON, Parquet, Arrow)"
        )
    if ext == ".jsonl":
        yield from _json_lines(path, what)
    elif ext == ".json":
        yield from _json(path, what)
    else:
        builder = FORMATS[ext]
        assert builder is not None
        yield from _datasets_rows(path, builder)


def _json_lines(path: str, what: str) -> Iterator[tuple[str, object]]:
    """Rows of a JSON Lines file, ``where`` = ``path:line``."""
    for number, text in numbered_lines(path, what):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg})") from err


def _json(path: str, what: str) -> Iterator[tuple[str, object]]:
    """Rows of a ``.json`` file: a JSON array (``path:row N``) or JSON Lines."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if not raw.lstrip().startswith(b"["):
        yield from _json_lines(path, what)
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(
            f"{path}:{line}: not valid UTF-8 ({err.reason} at byte {err.start} of the file); "
            "re-encode the file as UTF-8"
        ) from err
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(
            f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
        ) from err
    for index, row in enumerate(rows):
        yield f"{path}:row {index + 1}", row


def _datasets_rows(path: str, builder: str) -> Iterator[tuple[str, object]]:
    """Rows of a Parquet or Arrow file through ``datasets`` (streamed: no cache written),
    ``where`` = ``path:row N``."""
    import datasets  # only Parquet/Arrow readers pay for importing it
    import pyarrow

    kind = "Parquet" if builder == "parquet" else "Arrow IPC"
    # streaming still takes a lock file in its cache dir: a private one, not ~/.cache
    with tempfile.TemporaryDirectory(prefix="hpc_rlhf-datasets-") as cache_dir:
        try:
            rows = iter(
                datasets.load_dataset(
                    builder,
                    data_files=glob.escape(os.path.abspath(path)),  # the file, never a pattern
                    split="train",
                    streaming=True,
                    cache_dir=cache_dir,
                    download_config=datasets.DownloadConfig(local_files_only=True),
                )
            )
        except (pyarrow.ArrowException, OSError) as err:  # the Parquet footer is read here
            raise InputError(f"{path}: not a readable {kind} file ({err})") from err
        yield from _numbered(rows, path, kind)


def _numbered(rows: Iterator, path: str, kind: str) -> Iterator[tuple[str, object]]:
    """``(path:row N, row)`` of a datasets row iterator; ``InputError`` naming the row
    where the file stops being readable."""
    import pyarrow

    index = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except (pyarrow.ArrowException, OSError) as err:  # e.g. a truncated file
            where = f"{path}:row {index + 1}" if index else path
            raise InputError(f"{where}: not a readable {kind} file ({err})") from err
        index += 1
        yield f"{path}:row {index}", row
