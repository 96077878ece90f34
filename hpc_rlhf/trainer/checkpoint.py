"""Save and resume training: models, optimizers, schedulers, RNG states, trainer state.

Layout of a checkpoint root::

    root/
      latest                  text file: name of the newest complete checkpoint
      step_000010/            one complete checkpoint
        meta.json             step, layout (tp, pp, dp, vpp), config, names of the models
        <model>/tp01_pp000_dp000.pt   per-rank model chunks, optimizer and scheduler state
        rng/rank00003.pt      per-rank RNG states
        trainer.pt            trainer state (data position, KL controller, metrics...)

Crash safety: a checkpoint is written into ``step_N.tmp-<nonce>/``; only after every rank
has finished writing does rank 0 rename it to ``step_N/`` and then replace ``latest``
(write a temporary file, fsync, ``os.replace``). A crash or Ctrl-C at any point leaves the
previous checkpoint and ``latest`` untouched; stale temporary directories are removed by
the next successful save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from hpc_rlhf.parallel.comm import barrier, broadcast_object, world
from hpc_rlhf.parallel.state import ParallelState


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the current layout."""


def _rank_file(state: ParallelState) -> str:
    return f"tp{state.tp_rank:02d}_pp{state.pp_rank:03d}_dp{state.dp_rank:03d}.pt"


def _layout(state: ParallelState) -> dict:
    return {"tp": state.tp_size, "pp": state.pp_size, "dp": state.dp_size, "vpp": state.vpp_size}


def rng_state() -> dict:
    """The Python, NumPy, torch and megatron tensor-parallel RNG states of this process."""
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(saved: dict) -> None:
    """Restore what ``rng_state`` returned."""
    from megatron.core import tensor_parallel

    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
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
                opt.get_parameter_state_dp_reshardable() for opt in _sub_optimizers(model)
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
        subs = _sub_optimizers(model)
        if len(subs) != len(saved["optimizer_param_state"]):
            raise CheckpointError("checkpoint and run have different optimizer groupings")
        for opt, param_state in zip(subs, saved["optimizer_param_state"]):
            _mark_no_padding(param_state)
            opt.load_parameter_state_from_dp_reshardable(param_state)
    model.scheduler.num_steps = 0  # megatron's loader adds the saved count to the current one
    model.scheduler.load_state_dict(saved["scheduler"])
    # Megatron's optimizers keep fp32 main params: make the model params follow them.
    if hasattr(model.optimizer, "reload_model_params"):
        model.optimizer.reload_model_params()


def _own_optimizer_state(model) -> None:
    """Give every optimizer-state tensor its own fresh storage after a load.

    megatron's DistributedOptimizer.load_state_dict gives every parameter's torch-Adam state
    the *same* ``step`` tensor, which torch Adam then increments once per parameter, so the
    bias correction drifts after a resume (megatron-core 0.16.1 without apex/TE). And
    tensors that come out of ``torch.load`` sit in storages that cannot be resized, which
    the generation time-sharing (``inference.memory``) needs to release them.
    """
    for opt in _sub_optimizers(model):
        inner = getattr(opt, "optimizer", None)
        for param_state in getattr(inner, "state", {}).values():
            for key, value in list(param_state.items()):
                if isinstance(value, torch.Tensor):
                    param_state[key] = value.clone()


def _sub_optimizers(model) -> list:
    """The per-group optimizers inside megatron's ``ChainedOptimizer`` (or the one)."""
    return list(getattr(model.optimizer, "chained_optimizers", [model.optimizer]))


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


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    root: str,
    step: int,
    state: ParallelState,
    models: Mapping[str, Any],
    trainer_state: dict | None = None,
    config: dict | None = None,
) -> str:
    """Save every rank's part of ``models`` (name -> TrainableModel); return the directory."""
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
        torch.save(model_checkpoint_state(model), os.path.join(tmp, model_name, _rank_file(state)))
    torch.save(rng_state(), os.path.join(tmp, "rng", f"rank{state.rank:05d}.pt"))
    if state.rank == 0:
        torch.save(trainer_state or {}, os.path.join(tmp, "trainer.pt"))
        meta = {
            "step": step,
            "layout": _layout(state),
            "models": sorted(models),
            "world_size": state.world_size,
            "config": config or {},
        }
        _atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
    barrier()
    if state.rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(os.path.join(root, "latest"), name + "\n")
        _remove_stale_tmp(root)
    barrier()
    return final


def _remove_stale_tmp(root: str) -> None:
    for entry in os.listdir(root):
        if ".tmp-" in entry:
            path = os.path.join(root, entry)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint directory under ``root``, or None."""
    pointer = os.path.join(root, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as fh:
        name = fh.read().strip()
    path = os.path.join(root, name)
    if not os.path.exists(os.path.join(path, "meta.json")):
        raise CheckpointError(f"{pointer} names {name}, which is incomplete or missing")
    return path


def load_checkpoint(path: str, state: ParallelState, models: Mapping[str, Any]) -> dict:
    """Load this rank's part of a checkpoint into ``models``; return the trainer state."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
    with open(meta_path) as fh:
        meta = json.load(fh)
    if meta["layout"] != _layout(state):
        raise CheckpointError(
            f"checkpoint {path} was saved with layout {meta['layout']}, this run is "
            f"{_layout(state)}; convert it with tools/convert_checkpoint.py"
        )
    missing = set(models) - set(meta["models"])
    if missing:
        raise CheckpointError(f"checkpoint {path} has no state for {sorted(missing)}")
    for model_name, model in models.items():
        saved = torch.load(os.path.join(path, model_name, _rank_file(state)), weights_only=False)
        load_model_checkpoint_state(model, saved)
    set_rng_state(
        torch.load(os.path.join(path, "rng", f"rank{state.rank:05d}.pt"), weights_only=False)
    )
    trainer_state = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)
    trainer_state["step"] = meta["step"]
    return trainer_state
