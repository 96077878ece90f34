"""The collective helpers every package uses, written once.

Each takes its process group explicitly (DESIGN.md convention 2). A ``None`` group, or a
group of one rank, makes every helper a local no-op, so the same code runs in a
single-process test and in a distributed run.

Tensor collectives run on the group's device: a host tensor handed to a collective of an
nccl group (metrics, counts and statistics the trainer keeps on the host) is staged
through this rank's CUDA device and the result copied back, so callers never need to know
the backend. On gloo (CPU) nothing is copied.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world() -> Any:
    """The group of every rank (``None`` when no distributed world is initialised)."""
    return dist.group.WORLD if dist.is_initialized() else None


def group_size(group: Any) -> int:
    """Ranks in ``group`` (1 for ``None`` or when no world is initialised)."""
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def collective_device(group: Any) -> torch.device:
    """Where ``group``'s tensor collectives run: this rank's current CUDA device for an
    nccl group, the host otherwise."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def compute_device() -> torch.device:
    """Where this rank's models compute: its CUDA device when the world runs on nccl, the
    host otherwise (``collective_device`` of the world)."""
    return collective_device(world())


def _in_place_on_device(tensor: torch.Tensor, group: Any, collective) -> torch.Tensor:
    """``collective(t)`` on ``tensor`` placed on ``group``'s device; the result is written
    back into ``tensor`` when it had to be staged there."""
    device = collective_device(group)
    if tensor.device == device:
        collective(tensor)
        return tensor
    staged = tensor.to(device)
    collective(staged)
    tensor.copy_(staged)
    return tensor


def group_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """All-reduce SUM over ``group`` in place; returns ``tensor``."""
    if group_size(group) > 1:
        _in_place_on_device(tensor, group, lambda t: dist.all_reduce(t, group=group))
    return tensor


def group_max(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """All-reduce MAX over ``group`` in place; returns ``tensor``."""
    if group_size(group) > 1:
        _in_place_on_device(
            tensor, group, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        )
    return tensor


def all_gather_cat(x_N: torch.Tensor, group: Any) -> torch.Tensor:
    """The 1-D tensors of every rank of ``group`` concatenated in rank order (lengths may
    differ between ranks)."""
    size = group_size(group)
    if size == 1:
        return x_N
    parts: list[Any] = [None] * size
    dist.all_gather_object(parts, x_N.cpu(), group=group)
    return torch.cat(parts)


def all_gather_tensors(x: torch.Tensor, group: Any) -> list[torch.Tensor]:
    """Every rank's ``x`` (the same shape on all ranks of ``group``), in rank order."""
    size = group_size(group)
    if size == 1:
        return [x]
    device = collective_device(group)
    staged = x.contiguous().to(device)
    parts = [torch.empty_like(staged) for _ in range(size)]
    dist.all_gather(parts, staged, group=group)
    return [part.to(x.device) for part in parts]


def gather_objects(obj: Any, dst: int, group: Any) -> list[Any] | None:
    """Every rank's picklable ``obj`` on global rank ``dst`` (in the rank order of
    ``group``); ``None`` on the other ranks."""
    size = group_size(group)
    if size == 1:
        return [obj]
    is_dst = dist.get_rank() == dst
    gathered: list[Any] | None = [None] * size if is_dst else None
    dist.gather_object(obj, gathered, dst=dst, group=group)
    return gathered


def all_gather_objects(obj: Any, group: Any) -> list[Any]:
    """Every rank's picklable ``obj``, on every rank of ``group`` (in its rank order)."""
    size = group_size(group)
    if size == 1:
        return [obj]
    parts: list[Any] = [None] * size
    dist.all_gather_object(parts, obj, group=group)
    return parts


def broadcast_object(obj: Any, src_rank_in_group: int, group: Any) -> Any:
    """``obj`` of the rank at position ``src_rank_in_group`` of ``group``, on every rank
    (picklable objects; use tensor collectives for large tensors)."""
    if group_size(group) == 1:
        return obj
    holder = [obj]
    src = dist.get_global_rank(group, src_rank_in_group) if group is not None else src_rank_in_group
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def broadcast_from_last_stage(items: Any, pp_group: Any) -> Any:
    """The last pipeline stage's ``items`` on every stage of ``pp_group``."""
    return broadcast_object(items, group_size(pp_group) - 1, pp_group)


def broadcast_tensor(tensor: torch.Tensor, src_rank_in_group: int, group: Any) -> torch.Tensor:
    """Broadcast ``tensor`` in place from position ``src_rank_in_group`` of ``group``."""
    if group_size(group) > 1:
        src = dist.get_global_rank(group, src_rank_in_group)
        _in_place_on_device(tensor, group, lambda t: dist.broadcast(t, src=src, group=group))
    return tensor


def barrier() -> None:
    """A barrier over the world when one is initialised."""
    if dist.is_initialized():
        dist.barrier()
