"""Compile every csrc/*.cu with nvcc for sm_80 and sm_90 (no GPU needed), print registers
and spills per kernel from ``-Xptxas -v`` and require no spills; and type-check the CUDA
half of csrc/bindings.cpp (HPC_RLHF_WITH_CUDA) against torch's and CUDA's headers.

All compiler runs start together in a module fixture (two cores: they overlap).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
ARCHS = (80, 90)
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(
    NVCC is None, reason="nvcc is not on PATH: CUDA sources not checked"
)


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include dir (nvcc may be a wrapper script outside the toolkit)."""
    candidates = [Path(NVCC).resolve().parent.parent / "include"]
    candidates += [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"]
    candidates += sorted(Path("/usr/local").glob("cuda*/include"), reverse=True)
    return next((c for c in candidates if (c / "cuda_runtime.h").exists()), None)


def _bindings_cmd(tmp: Path) -> list[str]:
    import torch.utils.cpp_extension as ce

    # The CPU torch wheel ships c10/cuda headers but not this generated one.
    stub = tmp / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cuda_include = _cuda_include()
    cmd = [
        "g++",
        "-std=c++17",
        "-fsyntax-only",
        "-DHPC_RLHF_WITH_CUDA",
        "-DTORCH_EXTENSION_NAME=_C",
    ]
    cmd += [f"-I{tmp / 'stub'}", f"-I{cuda_include}", f"-I{sysconfig.get_paths()['include']}"]
    cmd += [f"-I{p}" for p in ce.include_paths()]
    return cmd + [str(CSRC / "bindings.cpp")]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nvcc")
    procs = {}
    for cu in CU_FILES:
        for arch in ARCHS:
            out = tmp / f"{cu.stem}_sm{arch}.o"
            cmd = [NVCC, "-c", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v", str(cu), "-o", str(out)]
            procs[(cu.name, arch)] = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
    if _cuda_include() is not None:
        procs["bindings"] = subprocess.Popen(
            _bindings_cmd(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    results = {}
    for key, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        results[key] = (proc.returncode, out)
    return results


def _kernels(log: str):
    """[(kernel, registers, spill bytes)] from ptxas -v output."""
    out = []
    for block in re.split(r"Compiling entry function '", log)[1:]:
        name = block.split("'", 1)[0]
        regs = int(re.search(r"Used (\d+) registers", block).group(1))
        spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", block))
        out.append((name, regs, spills))
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", [p.name for p in CU_FILES])
def test_cu_compiles_without_spills(compiled, cu, arch):
    code, log = compiled[(cu, arch)]
    assert code == 0, log
    assert "#include <torch" not in (CSRC / cu).read_text(), "keep .cu files free of torch headers"
    kernels = _kernels(log)
    assert kernels, f"no kernel found in {cu}:\n{log}"
    for name, regs, spills in kernels:
        print(f"nvcc {cu} sm_{arch} {name}: {regs} registers, {spills} bytes spilled")
        assert spills == 0, f"{name} spills {spills} bytes on sm_{arch}"


@pytest.mark.skipif(sys.platform != "linux", reason="header check written for Linux g++")
@pytest.mark.skipif(NVCC and _cuda_include() is None, reason="CUDA headers not found")
def test_cuda_bindings_typecheck(compiled):
    code, log = compiled["bindings"]
    assert code == 0, log
