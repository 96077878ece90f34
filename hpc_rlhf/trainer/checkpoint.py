"""Save and resume training: models, optimizers, schedulers, RNG states, trainer state.

Layout of a checkpoint root::

    root/
      latest                  text file: name of the newest complete checkpoint
      step_000010/            one complete checkpoint
        meta.json             step, layout (tp, pp, dp, vpp), config, names of the models
        <model>/tp01_pp000_dp000.pt   per-rank model chunks, optimizer and scheduler state
        rng/rank00003.pt      per-rank RNG states
        trainer.pt            trainer state (data position, KL controller, metrics...)

Crash safety: a checkpoint is written into ``step_N.tmp-<nonce>/``; every file is fsynced
by the rank that wrote it, then rank 0 fsyncs the directories, renames the temporary
directory to ``step_N/``, fsyncs the root and replaces ``latest`` (write a temporary file,
fsync, ``os.replace``). A crash or Ctrl-C at any point leaves the previous checkpoint and
``latest`` untouched; stale temporary directories are removed by the next successful save.
An existing ``step_N/`` is never deleted: it is renamed to ``step_N.replaced-<time>-<pid>/``
(a run that resumed from an older checkpoint reaches a step an earlier run also saved).

Shared filesystem: every rank writes its own files into the same directory and rank 0
publishes it, so a multi-node run needs ``save_dir`` on a filesystem every node sees
(NFS, Lustre, GPFS...). ``check_shared_directory`` (called by ``trainer.run.Run`` at start)
finds ranks that do not see rank 0's directory and names them with their host.

Resume (``load_latest_checkpoint``): the checkpoint ``latest`` names, or, when ``latest`` is
missing, the newest complete ``step_N/`` (one with ``meta.json``; a warning names it). Every
file is read with ``torch.load(weights_only=True)``: a checkpoint cannot run code. A file
that cannot be read raises ``CheckpointError`` naming it and listing the older complete
checkpoints; with ``fallback=True`` the next older one is loaded instead. All ranks agree:
every rank reads its files first, the outcomes are exchanged, and either every rank loads
the same checkpoint or every rank raises.

Layout changes: the same TP/PP/VPP with a different DP size resumes directly when the
optimizer is not distributed (model and optimizer state are replicated over DP: every rank
reads the ``dp000`` file of its TP/PP position); the per-rank RNG streams cannot be mapped
to the new ranks, so they keep this run's fresh seeding (a warning says so). Any other
change is refused with a ``CheckpointError`` saying what is supported.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from hpc_rlhf.parallel.comm import barrier, broadcast_object, world
from hpc_rlhf.parallel.state import ParallelState
from hpc_rlhf.trainer.checkpoint_files import (
    CheckpointError,
    atomic_write_text,
    fsync_dir,
    load_file,
    on_every_rank,
    save_synced,
)
from hpc_rlhf.trainer.trainable_model import sub_optimizers

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _rank_file(state: ParallelState, dp_rank: int | None = None) -> str:
    dp = state.dp_rank if dp_rank is None else dp_rank
    return f"tp{state.tp_rank:02d}_pp{state.pp_rank:03d}_dp{dp:03d}.pt"


def _layout(state: ParallelState) -> dict:
    return {"tp": state.tp_size, "pp": state.pp_size, "dp": state.dp_size, "vpp": state.vpp_size}


def _distributed_optimizer(state: ParallelState) -> bool:
    return bool(getattr(getattr(state, "config", None), "use_distributed_optimizer", False))


def rng_state() -> dict:
    """The Python, NumPy, torch and megatron tensor-parallel RNG states of this process
    (tensors and plain Python values only, loadable with ``weights_only=True``)."""
    from megatron.core import tensor_parallel

    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(saved: dict) -> None:
    """Restore what ``rng_state`` returned (or the older form with a NumPy state tuple)."""
    from megatron.core import tensor_parallel

    random.setstate(saved["python"])
    np_state = saved["numpy"]
    if isinstance(np_state, dict):
        np_state = (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    np.random.set_state(np_state)
    torch.set_rng_state(saved["torch"])
    if saved.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(saved["tracker"])


def model_checkpoint_state(model) -> dict:
    """This rank's state of a ``TrainableModel``: chunks, optimizer and scheduler."""
    out: dict[str, Any] = {
        "chunks": [chunk.state_dict() for chunk in model.parameters_by_chunk()],
    }
    if model.optimizer is not None:
        out["optimizer"] = model.optimizer.state_dict()
        if model.state.config.use_distributed_optimizer:
            out["optimizer_param_state"] = [
                opt.get_parameter_state_dp_reshardable() for opt in sub_optimizers(model.optimizer)
            ]
        out["scheduler"] = model.scheduler.state_dict()
    return out


@torch.no_grad()
def load_model_checkpoint_state(model, saved: Mapping) -> None:
    """Inverse of ``model_checkpoint_state`` (same layout)."""
    chunks = model.parameters_by_chunk()
    if len(saved["chunks"]) != len(chunks):
        raise CheckpointError(
            f"checkpoint has {len(saved['chunks'])} model chunks, this run has {len(chunks)}"
        )
    for chunk, chunk_state in zip(chunks, saved["chunks"]):
        chunk.load_state_dict(chunk_state, strict=True)
    if model.optimizer is None:
        return
    if "optimizer" not in saved:
        raise CheckpointError(f"checkpoint of {model.role} has no optimizer state")
    model.optimizer.load_state_dict(saved["optimizer"])
    _own_optimizer_state(model)
    if "optimizer_param_state" in saved:
        subs = sub_optimizers(model.optimizer)
        if len(subs) != len(saved["optimizer_param_state"]):
            raise CheckpointError("checkpoint and run have different optimizer groupings")
        for opt, param_state in zip(subs, saved["optimizer_param_state"]):
            _mark_no_padding(param_state)
            opt.load_parameter_state_from_dp_reshardable(param_state)
    model.scheduler.num_steps = 0  # megatron's loader adds the saved count to the current one
    model.scheduler.load_state_dict(saved["scheduler"])
    # No reload_model_params() here: in megatron it copies the (bf16) model parameters INTO
    # the fp32 main parameters, which would overwrite the main parameters just restored
    # with their bf16 rounding and make a resumed bf16 run depart from the uninterrupted
    # one. The saved chunks already hold the bf16 rounding of the saved main parameters.


def _own_optimizer_state(model) -> None:
    """Give every optimizer-state tensor its own fresh storage after a load.

    megatron's DistributedOptimizer.load_state_dict gives every parameter's torch-Adam state
    the *same* ``step`` tensor, which torch Adam then increments once per parameter, so the
    bias correction drifts after a resume (megatron-core 0.16.1 without apex/TE). And
    tensors that come out of ``torch.load`` sit in storages that cannot be resized, which
    the generation time-sharing (``inference.memory``) needs to release them.
    """
    for opt in sub_optimizers(model.optimizer):
        inner = getattr(opt, "optimizer", None)
        for param_state in getattr(inner, "state", {}).values():
            for key, value in list(param_state.items()):
                if isinstance(value, torch.Tensor):
                    param_state[key] = value.clone()


def _mark_no_padding(param_state: dict) -> None:
    """megatron's reshardable loader expects a 'padding' flag its saver does not write."""
    for key, dtype_state in param_state.items():
        if not isinstance(key, int):
            continue
        for buckets in dtype_state.values():
            for bucket in buckets:
                for entry in bucket:
                    entry.setdefault("padding", False)


def _broadcast_str(value: str | None) -> str:
    """Rank 0's ``value`` on every rank."""
    value = broadcast_object(value, 0, world())
    if value is None:
        raise RuntimeError("_broadcast_str: rank 0 sent no value")
    return value


def save_checkpoint(
    root: str,
    step: int,
    state: ParallelState,
    models: Mapping[str, Any],
    trainer_state: dict | None = None,
    config: dict | None = None,
) -> str:
    """Save every rank's part of ``models`` (name -> TrainableModel); return the directory.

    Collective. Each rank fsyncs its files; rank 0 publishes the directory (see the module
    docstring), moving an existing ``step_N/`` aside instead of deleting it."""
    name = f"step_{step:06d}"
    final = os.path.join(root, name)
    tmp = _broadcast_str(
        os.path.join(root, f"{name}.tmp-{os.getpid()}") if state.rank == 0 else None
    )
    if state.rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
        for model_name in models:
            os.makedirs(os.path.join(tmp, model_name))
    barrier()
    for model_name, model in models.items():
        save_synced(model_checkpoint_state(model), os.path.join(tmp, model_name, _rank_file(state)))
    save_synced(rng_state(), os.path.join(tmp, "rng", f"rank{state.rank:05d}.pt"))
    if state.rank == 0:
        save_synced(trainer_state or {}, os.path.join(tmp, "trainer.pt"))
        meta = {
            "step": step,
            "layout": _layout(state),
            "distributed_optimizer": _distributed_optimizer(state),
            "models": sorted(models),
            "world_size": state.world_size,
            "config": config or {},
        }
        atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
    barrier()
    if state.rank == 0:
        _publish(root, tmp, final, [*models, "rng"])
    barrier()
    return final


def _publish(root: str, tmp: str, final: str, subdirs: list[str]) -> None:
    """Rank 0: make ``tmp`` durable, rename it to ``final``, point ``latest`` at it."""
    for sub in subdirs:
        fsync_dir(os.path.join(tmp, sub))
    fsync_dir(tmp)
    if os.path.exists(final):
        aside = f"{final}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        os.replace(final, aside)
        logger.warning(
            "%s already existed (not written by this run: a run resumed from an older "
            "checkpoint reached its step again); kept as %s",
            final,
            aside,
        )
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(os.path.join(root, "latest"), os.path.basename(final) + "\n")
    fsync_dir(root)
    _remove_stale_tmp(root)


def _remove_stale_tmp(root: str) -> None:
    for entry in os.listdir(root):
        if ".tmp-" in entry:
            path = os.path.join(root, entry)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def _step_of(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def complete_checkpoints(root: str) -> list[str]:
    """The complete checkpoint directories under ``root`` (``step_N/`` with ``meta.json``),
    newest step first."""
    if not os.path.isdir(root):
        return []
    found = []
    for entry in os.listdir(root):
        step = _step_of(entry)
        if step is not None and os.path.exists(os.path.join(root, entry, "meta.json")):
            found.append((step, os.path.join(root, entry)))
    return [path for _, path in sorted(found, reverse=True)]


def _resume_plan(root: str) -> list[str]:
    """The checkpoints a resume tries, in order: the one ``latest`` names (complete or not),
    or the newest complete one when ``latest`` is missing; then the older complete ones."""
    complete = complete_checkpoints(root)
    pointer = os.path.join(root, "latest")
    if not os.path.exists(pointer):
        return complete
    with open(pointer) as fh:
        name = fh.read().strip()
    step = _step_of(name)
    older = [p for p in complete if step is None or (_step_of(os.path.basename(p)) or 0) < step]
    return [os.path.join(root, name), *older]


def latest_checkpoint(root: str) -> str | None:
    """The checkpoint a resume starts from: the one ``root/latest`` names, or the newest
    complete ``step_N/`` when ``latest`` is missing; ``None`` when there is none. Raises
    ``CheckpointError`` when ``latest`` names an incomplete or missing directory."""
    plan = _resume_plan(root)
    if not plan:
        return None
    if not os.path.exists(os.path.join(plan[0], "meta.json")):
        raise CheckpointError(
            f"{os.path.join(root, 'latest')} names {os.path.basename(plan[0])}, which is "
            f"incomplete or missing{_older_hint(plan[1:], fallback=False)}"
        )
    return plan[0]


def _older_hint(older: list[str], fallback: bool) -> str:
    if not older:
        return "\nno older complete checkpoint to fall back to"
    listed = "\n  ".join(older)
    hint = f"\nolder complete checkpoints (newest first):\n  {listed}"
    if not fallback:
        hint += (
            f"\nset resume_fallback=true in the run's section (ppo.resume_fallback=true, "
            f"train.resume_fallback=true) to load {older[0]} instead, or move the broken "
            "directory away"
        )
    return hint


def _read_meta(path: str) -> dict:
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {meta_path}: {err}") from err
    if not isinstance(meta, dict) or not {"step", "layout", "models"} <= set(meta):
        raise CheckpointError(f"{meta_path} lacks step, layout or models")
    return meta


def _dp_source(meta: dict, path: str, state: ParallelState) -> int | None:
    """``None`` when the checkpoint has this run's layout; ``0`` (read the ``dp000`` files)
    for a DP-only change without a distributed optimizer; else ``CheckpointError``."""
    saved, now = meta["layout"], _layout(state)
    if saved == now:
        return None
    same_model_parallel = all(saved.get(k) == now[k] for k in ("tp", "pp", "vpp"))
    if same_model_parallel and not (
        meta.get("distributed_optimizer") or _distributed_optimizer(state)
    ):
        return 0
    raise CheckpointError(
        f"checkpoint {path} was saved with layout {saved}, this run is {now}. Resuming "
        "supports the same tp/pp/vpp with any dp when neither run uses the distributed "
        "optimizer (parallel.use_distributed_optimizer); other layout changes cannot "
        "resume. To continue in another layout, export the actor in HF format "
        "(ppo.hf_export_dir) and start a new run from it (actor_init); "
        "tools/convert_checkpoint.py converts HF checkpoints to megatron rank files and "
        "back, not training checkpoints"
    )


def _load_dict(path: str, required: tuple[str, ...] = ()) -> dict:
    """``load_file`` of a file that must hold a dict with the ``required`` keys."""
    obj = load_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint file {path} holds a {type(obj).__name__}, not a dict")
    missing = [key for key in required if key not in obj]
    if missing:
        raise CheckpointError(f"checkpoint file {path} lacks {missing}")
    return obj


def read_checkpoint(path: str, state: ParallelState, models: Mapping[str, Any]) -> dict:
    """Read (not apply) this rank's files of checkpoint ``path``: ``meta``, ``models`` (name
    -> saved state), ``rng`` (``None`` after a DP change) and ``trainer``. Raises
    ``CheckpointError`` naming the file that is missing or unreadable."""
    meta = _read_meta(path)
    dp_source = _dp_source(meta, path, state)
    missing = set(models) - set(meta["models"])
    if missing:
        raise CheckpointError(f"checkpoint {path} has no state for {sorted(missing)}")
    saved_models = {}
    for model_name in models:
        file = os.path.join(path, model_name, _rank_file(state, dp_source))
        has_optimizer = getattr(models[model_name], "optimizer", None) is not None
        required = ("chunks", "optimizer", "scheduler") if has_optimizer else ("chunks",)
        saved_models[model_name] = _load_dict(file, required)
        if dp_source is not None and "optimizer_param_state" in saved_models[model_name]:
            raise CheckpointError(
                f"{file} holds distributed-optimizer state (sharded over dp): it cannot "
                f"resume with dp={state.dp_size} instead of dp={meta['layout']['dp']}"
            )
    rng = None
    if dp_source is None:
        rng_file = os.path.join(path, "rng", f"rank{state.rank:05d}.pt")
        rng = _load_dict(rng_file, ("python", "numpy", "torch", "tracker"))
    trainer = _load_dict(os.path.join(path, "trainer.pt"))
    return {"meta": meta, "models": saved_models, "rng": rng, "trainer": trainer}


def apply_checkpoint(loaded: dict, state: ParallelState, models: Mapping[str, Any]) -> dict:
    """Load what ``read_checkpoint`` returned into ``models`` and the RNGs; return the
    trainer state (``"step"`` included)."""
    for model_name, model in models.items():
        load_model_checkpoint_state(model, loaded["models"][model_name])
    meta = loaded["meta"]
    if loaded["rng"] is not None:
        set_rng_state(loaded["rng"])
    elif state.rank == 0:
        logger.warning(
            "checkpoint saved with dp=%d, this run has dp=%d: models and optimizers come from "
            "the dp000 files; the per-rank RNG states cannot be mapped to the new ranks, so "
            "they keep this run's fresh seeding (the run continues but will not reproduce "
            "an uninterrupted run bit for bit)",
            meta["layout"]["dp"],
            state.dp_size,
        )
    trainer_state = dict(loaded["trainer"])
    trainer_state["step"] = meta["step"]
    return trainer_state


def load_checkpoint(path: str, state: ParallelState, models: Mapping[str, Any]) -> dict:
    """Load this rank's part of checkpoint ``path`` into ``models``; return the trainer state.
    Not collective (no agreement between ranks: see ``load_latest_checkpoint``)."""
    return apply_checkpoint(read_checkpoint(path, state, models), state, models)


def _failures(errors: list[str | None]) -> str | None:
    """The ranks' error messages, ranks with the same message grouped; ``None`` if none."""
    by_message: dict[str, list[int]] = {}
    for rank, error in enumerate(errors):
        if error is not None:
            by_message.setdefault(error, []).append(rank)
    if not by_message:
        return None
    return "\n".join(
        f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {msg}"
        for msg, r in by_message.items()
    )


def _read_everywhere(path: str, state: ParallelState, models: Mapping[str, Any]):
    """Every rank reads its files of ``path``; returns (this rank's files, the failures of
    all ranks or ``None``), the same failures on every rank."""
    try:
        loaded, error = read_checkpoint(path, state, models), None
    except CheckpointError as err:
        loaded, error = None, str(err)
    return loaded, _failures(on_every_rank(error))


def _apply_everywhere(path: str, loaded: dict, state: ParallelState, models) -> dict:
    """Every rank applies its files; raises on every rank when any rank failed."""
    caught: Exception | None = None
    try:
        trainer_state = apply_checkpoint(loaded, state, models)
    except Exception as err:  # noqa: BLE001 - re-raised below once every rank knows
        caught, trainer_state = err, {}
    failed = _failures(on_every_rank(None if caught is None else f"{caught!r}"))
    if failed is not None:
        raise CheckpointError(
            f"loading {path} into the models failed (they are partly loaded):\n{failed}"
        ) from caught
    return trainer_state


def load_latest_checkpoint(
    root: str, state: ParallelState, models: Mapping[str, Any], fallback: bool = False
) -> tuple[str, dict] | None:
    """Collective: load the newest complete checkpoint of ``root`` into ``models``; return
    (its directory, the trainer state with ``"step"``), or ``None`` when there is none.

    Every rank reads its files before any rank applies them, and the outcomes are shared:
    all ranks load the same checkpoint or all raise. A checkpoint that cannot be read raises
    ``CheckpointError`` naming the files and listing the older complete checkpoints; with
    ``fallback=True`` the next older one is tried instead (a warning names both)."""
    plan = broadcast_object(_resume_plan(root) if state.rank == 0 else None, 0, world())
    if not plan:
        return None
    if state.rank == 0 and not os.path.exists(os.path.join(root, "latest")):
        logger.warning(
            "%s has no 'latest' file: resuming from its newest complete checkpoint %s",
            root,
            plan[0],
        )
    for i, path in enumerate(plan):
        loaded, failed = _read_everywhere(path, state, models)
        if failed is None and loaded is not None:
            return path, _apply_everywhere(path, loaded, state, models)
        older = plan[i + 1 :]
        if not fallback or not older:
            raise CheckpointError(
                f"cannot resume from {path}:\n{failed}{_older_hint(older, fallback)}"
            )
        if state.rank == 0:
            logger.warning("cannot resume from %s:\n%s\nfalling back to %s", path, failed, older[0])
    return None  # not reached: the last plan entry returns or raises
