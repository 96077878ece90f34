"""Run the backend-parametrised op tests for "triton" in the Triton CPU interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported and changes how every
``@triton.jit`` function in the process behaves, so the interpreter run happens in a child
pytest process (tiny shapes: the interpreter is 60-500x slower than torch).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_rlhf.ops import _backend
from tests.ops._common import INTERPRET

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not _backend.triton_installed(), reason="triton is not installed")
@pytest.mark.skipif(INTERPRET, reason="already the interpreter run")
def test_triton_backend_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    files = ["test_logprobs.py", "test_gae.py", "test_losses.py", "test_swiglu.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton"]
    cmd += [str(ROOT / "tests" / "ops" / f) for f in files]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(res.stdout[-4000:], res.stderr[-2000:])
    assert res.returncode == 0, res.stdout[-4000:]
    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) >= 100, "triton cases were not collected"
