"""GPU acceptance in one call: install offline, build the CUDA extension, run the GPU tests,
the kernel and bf16 generation benchmarks and a few bf16 PPO steps, then print one screen.

Written for a GPU that is available for a few minutes at a time (one H100/H200, Python 3.12,
a CUDA torch and Triton preinstalled, no network). Every step runs as a subprocess with its
own time limit under one overall budget (default 520 s, under 9 minutes); a step that
cannot start in the time left is skipped and says so. Each step's output goes to
``OUT/<step>.log``; ``OUT/acceptance.log`` records one line per step and the numbers read
from the outputs, and the summary is printed from that file (``--summary LOG`` reprints it).

    tools/gpu_acceptance.sh --wheels /data/wheels          # the whole run
    tools/gpu_acceptance.sh --skip-install --only gpu_tests,ppo_steps
    tools/gpu_acceptance.sh --summary out/gpu_acceptance/acceptance.log

Exit status: 0 when no step failed (skips allowed), 1 when one did, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

# the GPU-only tests this script runs (``tests/test_gpu_acceptance.py`` checks they exist
# and are marked ``gpu``), plus the compile tests that need nvcc
GPU_TESTS = (
    "tests/ops/test_gpu.py",
    "tests/inference/test_cuda_graphs.py",
    "tests/parallel/test_device_placement.py",
)
COMPILE_TESTS = ("tests/ops/test_cuda_compile.py", "tests/ops/test_triton_compile.py")

PPO_OVERRIDES = (
    "parallel.tensor_model_parallel_size=1",
    "parallel.sequence_parallel=false",
    "ppo.steps=3",
    "ppo.log_interval=1",
)


@dataclasses.dataclass(frozen=True)
class Step:
    """One acceptance step: its command (built from the arguments), its time limit and the
    numbers worth reading out of its output (``name -> regex with one group``)."""

    name: str
    command: Callable[[argparse.Namespace], list[list[str]]]
    timeout_s: int
    numbers: dict[str, str] = dataclasses.field(default_factory=dict)


def _install(args) -> list[list[str]]:
    pip = [PY, "-m", "pip", "install", "-q", "--no-index", "--find-links", args.wheels]
    extras = sorted(glob.glob(os.path.join(args.wheels, "*.whl")))
    commands = [[*pip, "--no-deps", *extras]] if extras else []
    # the package itself without its C++/CUDA extension (built by the next step)
    commands.append(["env", "HPC_RLHF_NO_EXT=1", *pip, "--no-build-isolation", "-e", ROOT])
    return commands


def _build_extension(args) -> list[list[str]]:
    archs = ["env", f"HPC_RLHF_CUDA_ARCHS={args.cuda_archs}"]
    return [[*archs, PY, "setup.py", "-q", "build_ext", "--inplace"]]


def _gpu_tests(args) -> list[list[str]]:
    return [[PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *GPU_TESTS, *COMPILE_TESTS]]


def _bench_kernels(args) -> list[list[str]]:
    return [[PY, "tools/bench_kernels.py"]]


def _bench_generate(args) -> list[list[str]]:
    return [[PY, "tools/bench_generate.py", "--dtype", "bf16", "--device", "cuda"]]


def _ppo_steps(args) -> list[list[str]]:
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    config = "examples/configs/ppo_tiny_cpu_bf16.yaml"
    out_dir = os.path.join(args.out, "ppo_run")
    show_metrics = "import sys; print(open(sys.argv[1]).read())"
    return [
        [*torchrun, "-m", "hpc_rlhf.cli", "ppo", "--config", config, "--out-dir", out_dir]
        + list(PPO_OVERRIDES),
        [PY, "-c", show_metrics, os.path.join(out_dir, "metrics.jsonl")],
    ]


STEPS = (
    Step("install", _install, 150),
    Step("cuda_extension", _build_extension, 240),
    Step(
        "gpu_tests",
        _gpu_tests,
        150,
        {"passed": r"(\d+) passed", "skipped": r"(\d+) skipped", "failed": r"(\d+) failed"},
    ),
    Step("bench_kernels", _bench_kernels, 120, {"first speedup": r"speedup (x\s*[\d.]+)"}),
    Step(
        "bench_generate_bf16",
        _bench_generate,
        150,
        {
            "engine tokens/s": r"engine: [\d.]+ s, ([\d.]+) tokens/s",
            "vs HF": r"ratio engine / transformers: ([\d.]+x)",
        },
    ),
    Step(
        "ppo_steps_bf16",
        _ppo_steps,
        150,
        {"last reward_mean": r'"reward_mean": ([-\d.e]+)', "last step s": r'"time_step": ([\d.]+)'},
    ),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; exits with status 2 and a usage line on bad arguments."""
    p = argparse.ArgumentParser(prog="gpu_acceptance.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", help="folder of wheels to install offline (megatron-core, ...)")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "gpu_acceptance"))
    p.add_argument("--skip-install", action="store_true", help="the project is installed")
    p.add_argument("--only", help=f"comma-separated steps of {','.join(STEP_NAMES)}")
    p.add_argument("--budget-seconds", type=int, default=520, help="for all steps together")
    p.add_argument("--cuda-archs", default="90", help="nvcc targets, e.g. 90 or 80,90")
    p.add_argument("--summary", metavar="LOG", help="only print the summary of a recorded run")
    args = p.parse_args(argv)
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(STEP_NAMES))
        if unknown:
            p.error(f"unknown step(s) {unknown}; the steps are {list(STEP_NAMES)}")
    if args.budget_seconds <= 0:
        p.error(f"--budget-seconds must be positive, got {args.budget_seconds}")
    if not re.fullmatch(r"\d{2,3}(,\d{2,3})*", args.cuda_archs):
        p.error(f"--cuda-archs must look like 90 or 80,90, got {args.cuda_archs!r}")
    wants_install = not args.skip_install and (not args.only or "install" in args.only)
    if args.summary is None and wants_install:
        if not args.wheels:
            p.error("--wheels DIR is needed to install (or pass --skip-install)")
        if not os.path.isdir(args.wheels):
            p.error(f"--wheels {args.wheels!r} is not a folder")
    return args


def selected_steps(args: argparse.Namespace) -> list[Step]:
    """The steps this run performs, in order."""
    wanted = set(args.only.split(",")) if args.only else set(STEP_NAMES)
    if args.skip_install:
        wanted.discard("install")
    return [s for s in STEPS if s.name in wanted]


def read_numbers(step: Step, output: str) -> dict[str, str]:
    """The last match of each of the step's number patterns in its output."""
    found = {}
    for label, pattern in step.numbers.items():
        matches = re.findall(pattern, output)
        if matches:
            found[label] = matches[-1].replace(" ", "")
    return found


def skip_reasons(output: str, limit: int = 6) -> list[str]:
    """pytest's ``SKIPPED [n] file:line: reason`` lines, shortened, at most ``limit``."""
    lines = re.findall(r"^SKIPPED \[\d+\] ([^\n]+)$", output, flags=re.M)
    return [re.sub(r"^\S+:\d+: ", "", line) for line in lines[:limit]]


def run_step(step: Step, args, deadline: float, record) -> str:
    """Run one step within its limit and the overall deadline; record and return its status."""
    left = deadline - time.monotonic()
    if left < 10:
        record(f"== {step.name}: SKIP 0s out of budget ({args.budget_seconds} s in all)")
        return "SKIP"
    log_path = os.path.join(args.out, f"{step.name}.log")
    start, status, why = time.monotonic(), "PASS", ""
    with open(log_path, "w") as log:
        for command in step.command(args):
            remaining = min(
                step.timeout_s - (time.monotonic() - start), deadline - time.monotonic()
            )
            try:
                done = subprocess.run(
                    command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=remaining
                )
            except subprocess.TimeoutExpired:
                status, why = "FAIL", f"timed out after {int(time.monotonic() - start)} s"
                break
            if done.returncode != 0:
                status, why = "FAIL", f"exit {done.returncode}: see {log_path}"
                break
    with open(log_path) as log:
        output = log.read()
    record(f"== {step.name}: {status} {int(time.monotonic() - start)}s {why}".rstrip())
    for label, value in read_numbers(step, output).items():
        record(f"-- {step.name}: {label} = {value}")
    for reason in skip_reasons(output):
        record(f"-- {step.name}: skipped: {reason}")
    return status


def summarize(log_text: str) -> tuple[str, bool]:
    """One screen from an ``acceptance.log``: a line per step with its numbers and skip
    reasons beneath; and whether every step passed or was skipped."""
    lines, ok = [], True
    for raw in log_text.splitlines():
        head = re.match(r"^== (\S+): (PASS|FAIL|SKIP) (\d+)s ?(.*)$", raw)
        if head:
            name, status, seconds, why = head.groups()
            ok &= status != "FAIL"
            lines.append(f"{status:4s} {name:22s} {int(seconds):4d} s  {why}".rstrip())
            continue
        detail = re.match(r"^-- (\S+): (.*)$", raw)
        if detail:
            lines.append(f"       {detail.group(2)}")
        elif raw.startswith("# "):
            lines.append(raw[2:])
    verdict = "ACCEPTED: no step failed" if ok else "NOT ACCEPTED: a step failed"
    return "\n".join([*lines, verdict]), ok


def _environment_lines() -> list[str]:
    probe = (
        "import sys, torch; c = torch.cuda.is_available(); "
        "print(f'python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, '"
        "+ (f'GPU {torch.cuda.get_device_name(0)} (sm_{\"\".join(map(str, torch.cuda.get_device_capability(0)))})' if c else 'no CUDA device'))"
    )
    done = subprocess.run([PY, "-c", probe], capture_output=True, text=True)
    return [f"# {(done.stdout or done.stderr).strip().splitlines()[-1]}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary:
        with open(args.summary) as fh:
            text, ok = summarize(fh.read())
        print(text)
        return 0 if ok else 1
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "acceptance.log")
    with open(log_path, "w") as log:

        def record(line: str) -> None:
            log.write(line + "\n")
            log.flush()
            print(line, flush=True)

        for line in _environment_lines():
            record(line)
        deadline = time.monotonic() + args.budget_seconds
        for step in selected_steps(args):
            if run_step(step, args, deadline, record) == "FAIL" and step.name == "install":
                break  # nothing after it can import the project
    with open(log_path) as fh:
        text, ok = summarize(fh.read())
    print("\n" + text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
