"""Compile every Triton kernel ahead of time for sm_80 and sm_90 (no GPU needed).

Catches what the interpreter accepts but the GPU compiler rejects (non-constexpr globals,
type mismatches in loop-carried values, ...). Registers and spills of each cubin are read
back with Triton's bundled ``ptxas -v`` and printed.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from hpc_rlhf.ops import _backend
from tests.ops._common import INTERPRET

pytestmark = [
    pytest.mark.skipif(not _backend.triton_installed(), reason="triton is not installed"),
    pytest.mark.skipif(INTERPRET, reason="@triton.jit functions are interpreted here"),
]

LOGITS_SIG = {"V": "i32", "vocab_start": "i32"}


def _cases():
    from hpc_rlhf.kernels import gae, logprobs, ppo_loss, swiglu, value_loss

    fwd = logprobs.logprobs_fwd_kernel
    bwd = logprobs.logprobs_bwd_kernel
    out = []
    for dtype, ent in (("bf16", True), ("fp32", False), ("fp16", True)):
        sig = {"x_ptr": f"*{dtype}", "labels_ptr": "*i64"}
        sig |= {k: "*fp32" for k in ("m_ptr", "s_ptr", "t_ptr", "xl_ptr")}
        sig |= LOGITS_SIG | {"ENTROPY": "constexpr", "BLOCK_V": "constexpr"}
        out.append((f"logprobs_fwd_{dtype}", fwd, sig, {"ENTROPY": ent, "BLOCK_V": 4096}, 8))
        sig = {"x_ptr": f"*{dtype}", "labels_ptr": "*i64"}
        sig |= {k: "*fp32" for k in ("m_ptr", "log_s_ptr", "ent_ptr", "g_lp_ptr", "g_ent_ptr")}
        sig |= {"grad_ptr": f"*{dtype}"} | LOGITS_SIG
        sig |= {"HAS_ENT": "constexpr", "BLOCK_V": "constexpr"}
        out.append((f"logprobs_bwd_{dtype}", bwd, sig, {"HAS_ENT": ent, "BLOCK_V": 4096}, 8))
    sig = {"r_ptr": "*fp32", "v_ptr": "*fp32", "mask_ptr": "*u8", "adv_ptr": "*fp32"}
    sig |= {"ret_ptr": "*fp32", "B": "i32", "T": "i32", "gamma": "fp32", "gamma_lam": "fp32"}
    out.append(("gae", gae.gae_kernel, sig | {"BLOCK_B": "constexpr"}, {"BLOCK_B": 32}, 1))
    sig = {k: "*fp32" for k in ("logp_ptr", "old_ptr", "adv_ptr")} | {"mask_ptr": "*u8"}
    sig |= {"rows_ptr": "*fp32", "dcoef_ptr": "*fp32", "T": "i32"}
    sig |= {"lo": "fp32", "hi": "fp32", "dual": "fp32"}
    sig |= {k: "constexpr" for k in ("USE_DUAL", "NEED_GRAD", "BLOCK_T")}
    consts = {"USE_DUAL": True, "NEED_GRAD": True, "BLOCK_T": 1024}
    out.append(("ppo_rows", ppo_loss.ppo_rows_kernel, sig, consts, 4))
    sig = {k: "*fp32" for k in ("v_ptr", "old_ptr", "ret_ptr")} | {"mask_ptr": "*u8"}
    sig |= {"rows_ptr": "*fp32", "dcoef_ptr": "*fp32", "T": "i32", "clip": "fp32"}
    sig |= {k: "constexpr" for k in ("USE_CLIP", "NEED_GRAD", "BLOCK_T")}
    consts = {"USE_CLIP": True, "NEED_GRAD": True, "BLOCK_T": 1024}
    out.append(("value_rows", value_loss.value_rows_kernel, sig, consts, 4))
    for dtype in ("fp32", "bf16"):
        sig = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "F": "i32", "BLOCK_F": "constexpr"}
        out.append((f"swiglu_fwd_{dtype}", swiglu.swiglu_fwd_kernel, sig, {"BLOCK_F": 1024}, 4))
        sig = {"x_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "dx_ptr": f"*{dtype}", "F": "i32"}
        sig |= {"BLOCK_F": "constexpr"}
        out.append((f"swiglu_bwd_{dtype}", swiglu.swiglu_bwd_kernel, sig, {"BLOCK_F": 1024}, 4))
    return out


def _ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers, spill bytes) of a PTX module, from Triton's bundled ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)  # e.g. sm_90a
    ptxas = get_ptxas(int(re.sub(r"\D", "", arch))).path  # the ptxas Triton itself uses
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    assert res.returncode == 0, res.stderr
    regs = int(re.search(r"Used (\d+) registers", res.stderr).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", res.stderr))
    return regs, spills


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpu(arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for name, fn, sig, consts, warps in _cases():
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}
        )
        ptx = compiled.asm["ptx"]
        assert ".entry" in ptx and compiled.asm["cubin"], name
        regs, spills = _ptxas_report(ptx)
        print(f"triton {name:22s} sm_{arch}: {regs:3d} registers, {spills} bytes spilled")
        assert spills == 0, f"{name} spills {spills} bytes on sm_{arch}"
