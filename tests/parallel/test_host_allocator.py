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
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True
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
