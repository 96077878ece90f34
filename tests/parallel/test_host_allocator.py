"""The caching host allocator: a freed large tensor's memory is reused without page faults,
while the C library's default policy faults every page in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hpc_rlhf.config import ConfigError, ParallelConfig
from hpc_rlhf.parallel import host_allocator

_PROBE = r"""
import json, resource, sys
import torch
from hpc_rlhf.parallel.host_allocator import configure_host_allocator
in_effect = configure_host_allocator(sys.argv[1])
def faults_of_one_fill(n):  # n bytes allocated, touched, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(n // 4, dtype=torch.float32).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_fill(96 << 20)  # the first block always faults its pages in
n = 64 << 20  # bytes: above glibc's largest mmap threshold (32 MiB), fits the freed block
print(json.dumps({"in_effect": in_effect, "faults": faults_of_one_fill(n), "pages": n // 4096}))
"""


def _probe(mode: str) -> dict:
    import os

    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}  # 4 KiB pages: glibc's policy alone
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_allocator._glibc() is None, reason="needs glibc")
def test_caching_reuses_freed_pages_system_faults_them_again():
    system, caching = _probe("system"), _probe("caching")
    assert system["in_effect"] == "system" and caching["in_effect"] == "caching"
    # glibc's default: the 64 MiB block is munmapped when freed, so every page faults again
    assert system["faults"] > 0.9 * system["pages"], system
    # caching: the block stays in the heap and is handed back without touching the kernel
    assert caching["faults"] < 0.05 * caching["pages"], caching


def test_unknown_policy_is_refused_by_config_and_function():
    with pytest.raises(ConfigError, match="parallel.host_allocator"):
        from hpc_rlhf.config import ModelConfig

        ParallelConfig(host_allocator="jemalloc").validate(ModelConfig())
    with pytest.raises(ValueError, match="expected one of"):
        host_allocator.configure_host_allocator("jemalloc")


_THP_PROBE = r"""
import json, os, resource
env_before = dict(os.environ)
import hpc_rlhf
import torch
assert dict(os.environ) == env_before, "importing hpc_rlhf changed os.environ"
from hpc_rlhf.parallel.host_allocator import apply_launch_env
apply_launch_env()  # what a run does when it starts, before torch's first allocation
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)  # 64 MiB, fresh
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"env": os.environ.get("THP_MEM_ALLOC_ENABLE"), "faults": faults}))
"""


def _thp_probe(env_value: str | None) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", _THP_PROBE], check=True, capture_output=True, text=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            return fh.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


@pytest.mark.skipif(_thp_mode() == "never", reason="transparent huge pages disabled")
def test_a_run_start_gives_large_tensors_huge_pages_unless_opted_out():
    default, opted_out = _thp_probe(None), _thp_probe("0")
    assert default["env"] == "1" and opted_out["env"] == "0"
    pages_4k = (64 << 20) // 4096
    assert default["faults"] < 0.05 * pages_4k, default  # one fault per 2 MiB page
    assert opted_out["faults"] > 0.9 * pages_4k, opted_out  # one per 4 KiB page


_RELEASE_PROBE = r"""
import json, sys
import torch
from hpc_rlhf.parallel.host_allocator import configure_host_allocator, release_free_memory
configure_host_allocator(sys.argv[1])
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) << 10
keep = torch.ones(1 << 20)  # allocated after the big block: the freed block is not the heap top
big = torch.empty(256 << 18)  # 256 MiB
big.fill_(1.0)
keep2 = torch.ones(1 << 20)
del big
held = rss()
released = release_free_memory()
print(json.dumps({"held": held, "after": rss(), "released": released}))
"""


@pytest.mark.skipif(host_allocator._glibc() is None, reason="needs glibc")
def test_release_gives_freed_pages_back_under_caching_only():
    """Under the caching policy a freed 256 MiB block stays resident until
    ``release_free_memory`` returns its pages; under the system policy it was never kept."""
    import os

    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}
    runs = {}
    for mode in ("caching", "system"):
        out = subprocess.run(
            [sys.executable, "-c", _RELEASE_PROBE, mode],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    caching, system = runs["caching"], runs["system"]
    assert caching["released"] and not system["released"]
    assert caching["held"] - caching["after"] > 200 << 20, caching  # the block's pages left
    assert system["held"] - system["after"] < 50 << 20, system  # nothing was held
