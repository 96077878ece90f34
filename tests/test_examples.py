"""The launch script CI runs: tiny PPO with 4 gloo processes, end to end."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_cpu_launch_script_runs_ppo_end_to_end(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        [
            "bash",
            "examples/launch/ppo_tiny_cpu.sh",
            "ppo.steps=2",
            f"ppo.save_dir={tmp_path / 'ckpt'}",
            "ppo.save_interval=2",
            f"ppo.hf_export_dir={tmp_path / 'hf'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step | reward mean" in result.stdout
    assert "mean reward" in result.stdout
    assert (tmp_path / "ckpt" / "step_000002" / "meta.json").exists()
    assert (tmp_path / "hf" / "config.json").exists()
    # understood library warnings are filtered (models.overrides.spec)
    assert "Unknown MLP type" not in result.stdout + result.stderr


def _torchrun_cli(*overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "hpc_rlhf.cli",
            "ppo",
            "--config",
            "examples/configs/ppo_tiny_cpu.yaml",
            *overrides,
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bad_config_key_is_named_once_and_exits_nonzero():
    """A config error is the same on every rank: rank 0 alone prints it, without a
    traceback of ours, and the launch fails."""
    result = _torchrun_cli("ppo.stepz=3")
    assert result.returncode != 0
    lines = [x for x in result.stderr.splitlines() if x.startswith("hpc-rlhf: error")]
    assert lines == [
        "hpc-rlhf: error: unknown config key 'ppo.stepz' (known: " + lines[0].split("(known: ")[1]
    ]
    assert "hpc_rlhf/" not in result.stderr  # no traceback through our code


def test_missing_file_error_is_one_line_per_rank_that_has_it(tmp_path):
    missing = tmp_path / "missing.jsonl"
    result = _torchrun_cli("ppo.steps=1", f"data.prompts={missing}")
    assert result.returncode != 0
    lines = sorted(x for x in result.stderr.splitlines() if x.startswith("hpc-rlhf: error"))
    assert lines == [
        f"hpc-rlhf: error on rank 1: prompt file not found: {missing}",
        f"hpc-rlhf: error: prompt file not found: {missing}",
    ]
    assert "hpc_rlhf/" not in result.stderr  # no traceback through our code
