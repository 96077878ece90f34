"""The one backend resolver (``_backend.resolve``), table-driven over every op's declared
kernels and faked capabilities: ``auto``'s choice per op, the refusals and their reasons."""

from __future__ import annotations

import importlib
import logging
from types import SimpleNamespace

import pytest
import torch

from hpc_rlhf.inference.attention import GENERATION_KERNELS, select_backend
from hpc_rlhf.inference.config import ATTENTION_BACKENDS
from hpc_rlhf.ops import _backend

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
CPU, CUDA, META = torch.device("cpu"), torch.device("cuda"), torch.device("meta")


def _kernels(module: str, name: str):
    return getattr(importlib.import_module(f"hpc_rlhf.ops.{module}"), name)


# op -> (name, kernels) as the op passes them to the resolver
OPS = {
    "generic": ("token_logprobs", _backend.EVERY_BACKEND),
    "rope": ("rope", _kernels("rope", "ROPE_KERNELS")),
    "swiglu": ("swiglu", _kernels("swiglu", "SWIGLU_KERNELS")),
    "causal": ("causal_attention", _kernels("causal_attention", "CAUSAL_ATTENTION_KERNELS")),
}


@pytest.fixture
def caps(monkeypatch):
    """Fake this process's capabilities: ``caps(ext=None|"cpu"|"cuda", triton=, interpret=,
    flash=, capability=)``; also clears the log-once memory."""
    monkeypatch.setattr(_backend, "_LOGGED", set())

    def set_caps(ext="cpu", triton=False, interpret=False, flash=False, capability=8):
        module = None if ext is None else SimpleNamespace(WITH_CUDA=ext == "cuda")
        monkeypatch.setattr(_backend, "extension", lambda: module)
        monkeypatch.setattr(_backend, "triton_installed", lambda: triton)
        monkeypatch.setattr(_backend, "triton_interpret", lambda: interpret)
        monkeypatch.setattr(_backend, "flash_attn_installed", lambda: flash)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (capability, 0))

    return set_caps


def _resolve(op: str, backend: str, device, dtype=F32, head_dim=64, dropout_p=0.0) -> str:
    name, kernels = OPS[op]
    if op == "causal":
        return _backend.resolve(
            name, backend, device, kernels, dtype=dtype, head_dim=head_dim, dropout_p=dropout_p
        )
    if op == "generic":
        return _backend.resolve(name, backend, device)
    return _backend.resolve(name, backend, device, kernels, dtype=dtype)


AUTO = [
    # (op, device, dtype, call facts, capabilities, auto's choice)
    ("generic", CPU, F32, {}, {}, "cpp"),
    ("generic", CPU, BF16, {}, {}, "cpp"),
    ("generic", CPU, F32, {}, {"ext": None}, "torch"),
    ("generic", CPU, F32, {}, {"triton": True, "interpret": True}, "cpp"),
    ("generic", CPU, F32, {}, {"ext": None, "triton": True, "interpret": True}, "torch"),
    ("generic", CUDA, F32, {}, {"ext": "cuda", "triton": True}, "cuda"),
    ("generic", CUDA, F32, {}, {"triton": True}, "triton"),
    ("generic", CUDA, F32, {}, {}, "torch"),
    ("generic", META, F32, {}, {}, "torch"),
    ("rope", CPU, F32, {}, {}, "cpp"),
    ("rope", CPU, BF16, {}, {}, "cpp"),  # bf16 storage, fp32 math
    ("rope", CPU, F16, {}, {}, "torch"),
    ("rope", CPU, F64, {}, {}, "torch"),
    ("rope", CPU, F32, {}, {"ext": None}, "torch"),
    ("rope", CUDA, F32, {}, {"ext": "cuda", "triton": True}, "torch"),
    ("swiglu", CPU, F32, {}, {}, "cpp"),
    ("swiglu", CPU, BF16, {}, {"triton": True, "interpret": True}, "cpp"),
    ("swiglu", CPU, F16, {}, {"triton": True, "interpret": True}, "torch"),
    ("swiglu", CPU, F32, {}, {"ext": None}, "torch"),
    ("swiglu", CUDA, BF16, {}, {"ext": "cuda", "triton": True}, "cuda"),
    ("swiglu", CUDA, F64, {}, {"triton": True}, "triton"),
    ("swiglu", CUDA, BF16, {}, {}, "torch"),
    ("causal", CPU, F32, {"head_dim": 16}, {}, "cpp"),
    ("causal", CPU, F32, {"head_dim": 24}, {}, "torch"),
    ("causal", CPU, F32, {"head_dim": 64, "dropout_p": 0.1}, {}, "torch"),
    ("causal", CPU, F64, {"head_dim": 64}, {}, "torch"),
    ("causal", CPU, F32, {"head_dim": 64}, {"ext": None}, "torch"),
    ("causal", CUDA, F32, {"head_dim": 64}, {"ext": "cuda", "triton": True}, "torch"),
]


@pytest.mark.parametrize("op,device,dtype,facts,capabilities,choice", AUTO, ids=str)
def test_auto_choice_per_op(caps, op, device, dtype, facts, capabilities, choice):
    caps(**capabilities)
    assert _resolve(op, "auto", device, dtype, **facts) == choice


ENGINE_AUTO = [
    # (device, cache dtype, capabilities, auto's choice)
    (CUDA, BF16, {"flash": True, "capability": 8}, "flash_attn"),
    (CUDA, BF16, {"flash": True, "capability": 7}, "torch"),
    (CUDA, F32, {"ext": "cuda", "triton": True}, "torch"),
    (CPU, F32, {"flash": True}, "cpp"),
    (CPU, BF16, {}, "cpp"),  # a bf16 cache is read in place by the C++ decode kernel
    (CPU, F16, {}, "torch"),
    (CPU, F32, {"ext": None}, "torch"),
    (META, F32, {}, "torch"),
]


@pytest.mark.parametrize("device,dtype,capabilities,choice", ENGINE_AUTO, ids=str)
def test_generation_attention_auto_choice(caps, device, dtype, capabilities, choice):
    caps(**capabilities)
    assert select_backend("auto", device, 256, dtype) == choice


REFUSED = [
    # (op, backend, device, dtype, call facts, capabilities, error, reason in the message)
    ("generic", "fast", CPU, F32, {}, {}, ValueError, "unknown backend 'fast'"),
    ("generic", "cpp", CPU, F32, {}, {"ext": None}, RuntimeError, "needs hpc_rlhf._C"),
    ("generic", "cuda", CPU, F32, {}, {}, RuntimeError, "built with CUDA and CUDA tensors"),
    ("generic", "triton", CPU, F32, {}, {"triton": True}, RuntimeError, "TRITON_INTERPRET=1"),
    ("generic", "triton", CUDA, F32, {}, {}, RuntimeError, "triton package"),
    ("rope", "cpp", CPU, F64, {}, {}, RuntimeError, "fp32 or bf16 CPU tensors, got torch.float64"),
    ("rope", "cpp", CUDA, F32, {}, {}, RuntimeError, "runs on CPU tensors"),
    ("rope", "cuda", CUDA, F32, {}, {"ext": "cuda"}, ValueError, "expected one of"),
    ("swiglu", "cpp", CPU, F16, {}, {}, RuntimeError, "needs hpc_rlhf._C and fp32 or bf16 CPU"),
    ("swiglu", "cuda", CPU, F32, {}, {}, RuntimeError, "backend 'cuda' needs"),
    ("causal", "cpp", CPU, F32, {"head_dim": 24}, {}, RuntimeError, "multiple of 16, got 24"),
    ("causal", "cpp", CPU, F32, {"dropout_p": 0.1}, {}, RuntimeError, "no attention dropout"),
    ("causal", "cpp", CPU, F64, {}, {}, RuntimeError, "fp32 or bf16 CPU tensors"),
    ("causal", "triton", CPU, F32, {}, {"triton": True}, ValueError, "expected one of"),
]


@pytest.mark.parametrize("op,backend,device,dtype,facts,capabilities,error,reason", REFUSED)
def test_refusals_name_the_reason(
    caps, op, backend, device, dtype, facts, capabilities, error, reason
):
    caps(**capabilities)
    with pytest.raises(error, match=reason):
        _resolve(op, backend, device, dtype, **facts)


def test_generation_attention_refusals(caps):
    caps(flash=True, capability=7)
    with pytest.raises(RuntimeError, match="compute capability >= 8.0"):
        select_backend("flash_attn", CUDA, 256, BF16)
    with pytest.raises(RuntimeError, match="fp32 or bf16 CPU tensors, got torch.float16"):
        select_backend("cpp", CPU, 16, F16)
    with pytest.raises(ValueError, match="expected one of"):
        select_backend("xformers", CPU, 16)
    caps(flash=True, capability=8)
    with pytest.raises(ValueError, match="block_size % 256 == 0, got 16"):
        select_backend("auto", CUDA, 16, BF16)
    assert select_backend("torch", CUDA, 16, BF16) == "torch"


def test_generation_attention_names_are_the_config_list():
    names = ("auto", *(k.name for k in GENERATION_KERNELS))
    assert names == ATTENTION_BACKENDS


def test_auto_logs_its_fallback_reason_once_per_reason(caps, caplog):
    caps()
    with caplog.at_level(logging.INFO, logger="hpc_rlhf.ops"):
        for _ in range(3):
            _resolve("causal", "auto", CPU, head_dim=24)
        _resolve("causal", "auto", CPU, head_dim=64, dropout_p=0.1)
        _resolve("causal", "auto", CPU, head_dim=64)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert "chose 'torch'" in messages[0] and "multiple of 16, got 24" in messages[0]
    assert "no attention dropout" in messages[1]
    assert "chose 'cpp'" in messages[2]


def test_a_dtype_limited_kernel_needs_the_dtype(caps):
    caps()
    name, kernels = OPS["rope"]
    with pytest.raises(TypeError, match="pass dtype="):
        _backend.resolve(name, "auto", CPU, kernels)
