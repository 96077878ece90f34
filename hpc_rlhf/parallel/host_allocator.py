"""Host (CPU) memory allocation policy for runs without a GPU.

On a GPU, PyTorch's caching allocator hands freed device blocks to the next tensor of a
similar size. On the CPU, tensors come from the C library's ``malloc``: glibc serves every
block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it with
``munmap`` when freed, so each large activation, logit or gradient tensor is paid for again
in page faults (the kernel zeroes every 4 KiB page on first touch).

``"caching"`` makes glibc behave like a caching allocator: no ``mmap`` for large blocks
(``M_MMAP_MAX = 0``) and the heap top is only returned to the OS beyond 2 GiB of free space
(``M_TRIM_THRESHOLD``). A freed block stays mapped and the next tensor that fits in it
reuses it without faults (glibc best-fit, with coalescing of neighbours; an exactly equal
request may still miss by the alignment padding of ``posix_memalign``). ``"system"`` leaves the C
library's defaults. Applied once per process, CPU runs only, and logged.

A cache only pays within a phase whose tensors repeat: between phases (PPO's generation,
scoring and training, or two optimizer steps) the next phase's tensors have other sizes,
land on pages no freed block covered, and the process's resident memory grows beyond what
is live (measured on bench_ppo's fixed shape: 3.0 GB resident at ~2.1 GB live).
``release_free_memory()`` (glibc ``malloc_trim(0)``: every free page in the heap, not only
its top, goes back to the OS) is called at those boundaries; it costs the next phase one
fault per page it touches afresh (2 MiB pages for large tensors).

Huge pages: PyTorch backs CPU tensors of 2 MiB and more with transparent huge pages when
``THP_MEM_ALLOC_ENABLE=1`` is in the environment when it first allocates, so a fresh block
costs one fault per 2 MiB instead of 512. ``LAUNCH_ENV`` holds that setting; a run applies
it when it starts (``apply_launch_env`` in ``trainer.run.Run``, a default the user's
environment overrides) and ``launch_env()`` gives it to processes the engine starts.
PyTorch reads it at the process's first CPU tensor allocation (not at import), so it must
be applied before any tensor is made.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

from hpc_rlhf.config import HOST_ALLOCATORS

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int
_APPLIED: list[str] = []
LAUNCH_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def launch_env() -> dict[str, str]:
    """The engine's host-memory environment for a process it starts (user values win)."""
    return {key: os.environ.get(key, value) for key, value in LAUNCH_ENV.items()}


def apply_launch_env() -> None:
    """Set ``LAUNCH_ENV`` defaults in this process (values the user set win). PyTorch reads
    them at its first CPU tensor allocation: call this before any tensor is made."""
    for key, value in LAUNCH_ENV.items():
        os.environ.setdefault(key, value)


def huge_pages_requested() -> bool:
    """Whether ``THP_MEM_ALLOC_ENABLE`` asks PyTorch for huge pages in this process."""
    return os.environ.get("THP_MEM_ALLOC_ENABLE", "0") not in ("0", "")


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (the only one whose ``mallopt`` we know), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None
    return libc


def release_free_memory() -> bool:
    """Give the heap's free pages back to the OS (``malloc_trim(0)``) when this process runs
    the ``"caching"`` policy; call it between phases. Returns whether it did."""
    if not _APPLIED or _APPLIED[1] != "caching":
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def configure_host_allocator(mode: str) -> str:
    """Apply ``mode`` (``"caching"`` or ``"system"``) to this process's ``malloc``.

    Returns the policy in effect: ``"caching"``, or ``"system"`` when requested or when the
    C library is not glibc (logged). A second call with another mode raises, since the
    first one already shaped the heap.
    """
    if mode not in HOST_ALLOCATORS:
        raise ValueError(f"host allocator {mode!r}: expected one of {HOST_ALLOCATORS}")
    if _APPLIED:
        if _APPLIED[0] != mode:
            raise RuntimeError(
                f"host allocator already set to {_APPLIED[0]!r} in this process; "
                f"cannot switch to {mode!r}"
            )
        return _APPLIED[1]
    in_effect = mode
    if mode == "caching":
        libc = _glibc()
        if libc is None:
            in_effect = "system"
            logger.info("host allocator: system (C library is not glibc; 'caching' skipped)")
        else:
            ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
            ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1
            if not ok:
                raise RuntimeError("glibc mallopt refused the caching host-allocator settings")
            logger.info(
                "host allocator: caching (glibc: no mmap for large blocks, trim > 2 GiB; "
                "huge pages for tensors >= 2 MiB: %s)",
                "on" if huge_pages_requested() else "off (THP_MEM_ALLOC_ENABLE unset or 0)",
            )
    else:
        logger.info("host allocator: system (C library defaults)")
    _APPLIED[:] = [mode, in_effect]
    return in_effect
