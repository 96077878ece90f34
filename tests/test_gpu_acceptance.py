"""``tools/gpu_acceptance.sh`` without a GPU: its arguments, its step runner and summary on
commands that stand in for the GPU steps (pass, fail, time out, out of budget), and that
every test file, script and config override it names exists and is valid here."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from hpc_rlhf.config import PPORunConfig, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import gpu_acceptance as ga  # noqa: E402


def _args(tmp_path, *extra: str):
    return ga.parse_args(["--skip-install", "--out", str(tmp_path), *extra])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--only", "gpu_tests,warp_drive"], "unknown step(s) ['warp_drive']"),
        ([], "--wheels DIR is needed"),
        (["--wheels", "/nonexistent/wheels"], "is not a folder"),
        (["--skip-install", "--budget-seconds", "0"], "must be positive"),
        (["--skip-install", "--cuda-archs", "sm_90"], "--cuda-archs must look like"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ga.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_step_selection(tmp_path):
    assert [s.name for s in ga.selected_steps(_args(tmp_path))] == list(ga.STEP_NAMES[1:])
    only = _args(tmp_path, "--only", "ppo_steps_bf16,gpu_tests")
    assert [s.name for s in ga.selected_steps(only)] == ["gpu_tests", "ppo_steps_bf16"]
    wheels = ga.parse_args(["--wheels", str(tmp_path)])
    assert ga.selected_steps(wheels)[0].name == "install"
    assert ga.STEPS[0].timeout_s + sum(s.timeout_s for s in ga.STEPS[1:]) > 520  # budget binds


def _python_step(name: str, code: str, timeout_s: int = 20, numbers=None) -> ga.Step:
    return ga.Step(name, lambda args: [[sys.executable, "-c", code]], timeout_s, numbers or {})


PYTEST_LIKE = (
    "print('SKIPPED [2] tests/ops/test_gpu.py:50: needs flash-attn');"
    "print('SKIPPED [1] tests/x.py:9: no nvcc');"
    "print('3 passed, 3 skipped in 1.2s')"
)


def test_steps_are_run_recorded_and_summarised(tmp_path):
    args = _args(tmp_path, "--budget-seconds", "60")
    lines: list[str] = []
    steps = [
        _python_step("tests", PYTEST_LIKE, numbers={"passed": r"(\d+) passed"}),
        _python_step(
            "bench",
            "print('ratio engine / transformers: 4.20x')",
            numbers={"vs HF": r"ratio engine / transformers: ([\d.]+x)"},
        ),
        _python_step("broken", "import sys; print('boom'); sys.exit(3)"),
        _python_step("hangs", "import time; time.sleep(30)", timeout_s=2),
    ]

    deadline = time.monotonic() + 60
    statuses = [ga.run_step(step, args, deadline, lines.append) for step in steps]
    assert statuses == ["PASS", "PASS", "FAIL", "FAIL"]
    late = _python_step("late", "print('never runs')")
    assert ga.run_step(late, args, time.monotonic() + 5, lines.append) == "SKIP"
    assert not (tmp_path / "late.log").exists()
    assert "boom" in (tmp_path / "broken.log").read_text()
    text, ok = ga.summarize("\n".join(["# GPU NVIDIA H100 80GB HBM3 (sm_90)", *lines]))
    assert not ok and text.splitlines()[-1] == "NOT ACCEPTED: a step failed"
    assert "GPU NVIDIA H100 80GB HBM3 (sm_90)" in text
    rows = {
        line.split()[1]: line for line in text.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")
    }
    assert rows["tests"].startswith("PASS") and "passed = 3" in text
    assert "skipped: needs flash-attn" in text and "skipped: no nvcc" in text
    assert "vs HF = 4.20x" in text
    assert rows["broken"].startswith("FAIL") and "exit 3" in rows["broken"]
    assert rows["hangs"].startswith("FAIL") and "timed out after 2 s" in rows["hangs"]
    assert rows["late"].startswith("SKIP") and "out of budget (60 s in all)" in rows["late"]


def test_summary_of_a_recorded_log_and_its_exit_status(tmp_path):
    log = tmp_path / "acceptance.log"
    log.write_text(
        "# python 3.12.3, torch 2.13.0, CUDA 12.8, GPU NVIDIA H100 (sm_90)\n"
        "== install: PASS 41s\n"
        "== gpu_tests: PASS 95s\n"
        "-- gpu_tests: passed = 57\n"
        "-- gpu_tests: skipped: needs a CUDA GPU and flash-attn\n"
        "== ppo_steps_bf16: SKIP 0s out of budget (520 s in all)\n"
    )
    assert ga.main(["--summary", str(log)]) == 0
    log.write_text(log.read_text() + "== bench_kernels: FAIL 3s exit 1: see k.log\n")
    assert ga.main(["--summary", str(log)]) == 1


def test_the_named_gpu_tests_exist_and_are_marked_gpu():
    for path in (*ga.GPU_TESTS, *ga.COMPILE_TESTS):
        assert os.path.isfile(os.path.join(ROOT, path)), path
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", *ga.GPU_TESTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    files = {line.split("::")[0] for line in collected.stdout.splitlines() if "::" in line}
    assert files == set(ga.GPU_TESTS), collected.stdout[-2000:]


def test_the_scripts_and_config_it_runs_exist_and_accept_its_arguments(tmp_path):
    (tmp_path / "megatron_core-0.16.1-py3-none-any.whl").write_bytes(b"")
    args = ga.parse_args(["--wheels", str(tmp_path), "--out", str(tmp_path / "out")])
    install = ga.STEPS[0].command(args)
    assert install[0][-1].endswith("megatron_core-0.16.1-py3-none-any.whl")
    assert "--no-index" in install[1] and install[1][-1] == ga.ROOT
    for step in ga.STEPS:
        for command in step.command(args):
            for word in command:
                if word.endswith((".py", ".yaml")) and not word.startswith("-"):
                    assert os.path.isfile(os.path.join(ROOT, word)), (step.name, word)
    cfg = load_config(
        os.path.join(ROOT, "examples/configs/ppo_tiny_cpu_bf16.yaml"),
        list(ga.PPO_OVERRIDES),
        cls=PPORunConfig,
    )
    assert cfg.parallel.tensor_model_parallel_size == 1 and cfg.ppo.steps == 3
    assert cfg.model.params_dtype == "bf16"
