"""Checkpoint files: read without running code, written durably, in a directory every
rank can see (``trainer.checkpoint`` builds saves and resumes on these).

* ``load_file``: ``torch.load(weights_only=True)``; any failure is a ``CheckpointError``
  naming the file;
* ``save_synced`` / ``atomic_write_text`` / ``fsync_dir``: bytes and directory entries on
  disk (fsync) before a checkpoint is published by a rename;
* ``writable_error`` / ``check_shared_directory``: a save directory checked at start, on
  every rank (a multi-node run needs one filesystem shared by all nodes).
"""

from __future__ import annotations

import importlib
import os
import socket
import uuid
from typing import Any

import numpy as np
import torch

from hpc_rlhf.parallel.comm import broadcast_object, gather_objects, world


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, unreadable, or does not match the layout."""


def _numpy_rng_globals() -> list:
    """What a pickled NumPy RNG state array needs (checkpoints written before the RNG state
    was stored as tensors)."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_file(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU: tensors and plain containers only, so a
    checkpoint cannot run code (only NumPy's array types are allowed besides, for old RNG
    files). Any failure raises ``CheckpointError`` naming ``path``."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file is missing: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(
            f"cannot read checkpoint file {path}: {type(err).__name__}: {err}"
        ) from err


def save_synced(obj: Any, path: str) -> None:
    """``torch.save`` then fsync, so the bytes are on disk before the checkpoint is published."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (created files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def on_every_rank(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank."""
    gathered = gather_objects(obj, 0, world())
    return broadcast_object(gathered, 0, world())


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (temporary file, fsync, ``os.replace``)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def writable_error(path: str) -> str | None:
    """Why ``path`` cannot take a checkpoint (create it, write and remove a probe file), or
    ``None`` when it can."""
    probe = os.path.join(path, f".write-probe-{uuid.uuid4().hex}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as fh:
            fh.write("probe")
        os.remove(probe)
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None


def check_shared_directory(path: str, rank: int, key: str = "save_dir") -> None:
    """Collective: check that every rank sees the directory rank 0 writes to.

    Rank 0 creates ``path`` and a probe file holding a random nonce there; every rank reads
    it at its own ``path`` (the same string in a run; tests pass different ones). Raises
    ``CheckpointError`` on every rank naming ``key``, ``path`` and the ranks (with their
    hosts) that do not see the probe, or naming ``key`` and ``path`` when rank 0 cannot
    write there. A multi-node run needs ``path`` on a filesystem shared by all nodes."""
    sent = None
    if rank == 0:
        nonce = uuid.uuid4().hex
        probe_name = f".shared-probe-{nonce}"
        error = writable_error(path)
        if error is None:
            atomic_write_text(os.path.join(path, probe_name), nonce)
        sent = (probe_name, nonce, error, socket.gethostname())
    probe_name, nonce, error, host0 = broadcast_object(sent, 0, world())
    if error is not None:
        raise CheckpointError(f"{key}={path!r} is not writable: {error}")
    probe = os.path.join(path, probe_name)
    try:
        with open(probe) as fh:
            seen = fh.read() == nonce
    except OSError:
        seen = False
    reports = on_every_rank((rank, socket.gethostname(), seen))  # every rank has read
    if rank == 0:
        os.remove(probe)
    blind = [f"rank {r} on {host}" for r, host, ok in reports if not ok]
    if blind:
        raise CheckpointError(
            f"{key}={path!r}: {', '.join(blind)} cannot see the file rank 0 (on {host0}) "
            "wrote there. Every rank writes its part of a checkpoint into this directory: "
            "a multi-node run needs it on a filesystem shared by all nodes"
        )
