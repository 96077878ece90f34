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


def test_bad_config_key_is_named_and_exits_2():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpc_rlhf.cli",
            "ppo",
            "--config",
            "examples/configs/ppo_tiny_cpu.yaml",
            "ppo.stepz=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "unknown config key 'ppo.stepz'" in result.stderr
