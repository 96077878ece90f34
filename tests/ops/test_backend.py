"""Backend selection: explicit capability checks, errors that say why, "auto" logged once."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from hpc_rlhf.ops import _backend, masked_gae, token_logprobs
from tests.ops._common import INTERPRET


def _small():
    return torch.randn(3, 11), torch.tensor([0, 5, 10])


def test_unknown_backend_raises():
    logits, labels = _small()
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        token_logprobs(logits, labels, backend="fast")


def test_cuda_backend_on_cpu_says_why():
    logits, labels = _small()
    with pytest.raises(RuntimeError, match="needs hpc_rlhf._C built with CUDA and CUDA tensors"):
        token_logprobs(logits, labels, backend="cuda")


@pytest.mark.skipif(INTERPRET, reason="this process runs Triton in the interpreter")
def test_triton_on_cpu_needs_interpreter():
    r = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        masked_gae(r, r, r.bool(), backend="triton")


def test_cpp_unavailable_is_reported_and_auto_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(_backend, "extension", lambda: None)
    monkeypatch.setattr(_backend, "_LOGGED", set())
    logits, labels = _small()
    with pytest.raises(RuntimeError, match="needs hpc_rlhf._C"):
        token_logprobs(logits, labels, backend="cpp")
    with caplog.at_level(logging.INFO, logger="hpc_rlhf.ops"):
        token_logprobs(logits, labels)
    assert "chose 'torch'" in caplog.text


@pytest.mark.skipif(_backend.extension() is None, reason="hpc_rlhf._C is not built")
def test_auto_picks_cpp_on_cpu_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(_backend, "_LOGGED", set())
    logits, labels = _small()
    with caplog.at_level(logging.INFO, logger="hpc_rlhf.ops"):
        for _ in range(3):
            out = token_logprobs(logits, labels)
    records = [r for r in caplog.records if "token_logprobs" in r.getMessage()]
    assert len(records) == 1 and "chose 'cpp'" in records[0].getMessage()
    assert _backend.resolve("masked_gae", "auto", torch.device("cpu")) == "cpp"
    torch.testing.assert_close(out, token_logprobs(logits, labels, backend="torch"))


def test_import_is_light():
    code = (
        "import sys, hpc_rlhf.ops\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('triton', 'megatron')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
