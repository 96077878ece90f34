"""One PPO iteration two ways, in one run: hpc_rlhf vs a Safe-RLHF-style baseline.

Same weights (random Llama-style actor and reward model, fp32), same prompts, same response
lengths, same batch and PPO settings. ``--algorithm ppo_lag``: Safe-RLHF's PPO-Lagrangian on
both sides (``ppo.algorithm: ppo_lag`` for hpc_rlhf, ``PPOLagTrainer``'s steps for the
baseline), with a random cost model built as the reward model is (the same weights for
both) and a cost critic started from it. Two shapes:

* ``fixed``: every prompt 128 tokens, exactly 256 new tokens;
* ``varied``: prompt lengths drawn from 32-256, response lengths from 16-256 (a stop token
  forced at the drawn length, identically for both systems).

Each system runs in its own subprocess (so peak memory is its own, ``ru_maxrss``). Prints
per-stage seconds, tokens/s, peak memory, executed model FLOPs, the machine's fp32 matmul
rate, each system's share of it, and the ratios.

This machine's speed drifts (the 1024^3 matmul rate has been seen anywhere between 100 and
210 GFLOP/s within minutes), so the matmul rate is sampled just before and just after each
system's run and that system's share is taken against the mean of its two samples; and
``--repeat N`` runs the pair N times, alternating which system goes first, printing every
run and summarising with the median ratio (the lower middle one for even N; the range in
brackets).

    python tools/bench_ppo.py                  # both shapes, 64 prompts (several minutes)
    python tools/bench_ppo.py --quick          # 8 prompts, short lengths: a smoke run
    python tools/bench_ppo.py --plot ppo.png   # also a PNG of per-stage times side by side
    python tools/bench_ppo.py --repeat 2       # each pair twice, in both orders
    python tools/bench_ppo.py --algorithm ppo_lag   # PPO-Lagrangian (cost model + critic)
    python tools/bench_ppo.py --dtype bf16     # both systems in bf16 mixed precision

Targets, both algorithms: fixed >= 2.5x, varied >= 5x faster, peak memory <= 1/3; in bf16
(the baseline as Safe-RLHF's ``--bf16``: bf16 models, fp32 master weights, its eager
paths) fixed >= 3.5x, varied >= 7x, and at least 40% of the measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_common import (  # noqa: E402
    BENCH_MODEL,
    STAGES,
    cpu_model,
    matmul_gflops,
    ppo_flops,
    workload,
    write_checkpoints,
)
from bench_systems import PROFILES  # noqa: E402

# baseline seconds / hpc_rlhf seconds, per dtype; bf16 also asks for RATE_TARGET of the
# measured bf16 matmul rate over the whole iteration
SPEED_TARGETS = {"fp32": {"fixed": 2.5, "varied": 5.0}, "bf16": {"fixed": 3.5, "varied": 7.0}}
RATE_TARGET = {"fp32": None, "bf16": 0.40}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MEMORY_TARGET = 1 / 3  # hpc_rlhf peak RSS / baseline peak RSS
ALGORITHMS = {"ppo": "PPO", "ppo_lag": "PPO-Lagrangian (Safe-RLHF's PPOLagTrainer)"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=["fixed", "varied", "both"], default="both")
    p.add_argument(
        "--algorithm",
        choices=list(ALGORITHMS),
        default="ppo",
        help="ppo_lag: both systems also score a cost model and train a cost critic",
    )
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument(
        "--mini-batch",
        type=int,
        default=16,
        help="samples per optimizer step, both systems (Safe-RLHF's per-device batch)",
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=4,
        help="hpc_rlhf's gradient-accumulation split of a mini-batch",
    )
    p.add_argument(
        "--score-micro-batch",
        type=int,
        default=8,
        help="hpc_rlhf's rows per forward-only scoring micro-batch",
    )
    p.add_argument("--quick", action="store_true", help="8 prompts, lengths / 8")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: both systems in bf16 mixed precision (fp32 master weights)",
    )
    p.add_argument(
        "--baseline-huge-pages",
        action="store_true",
        help="start the baseline with hpc_rlhf's host-memory launch environment too "
        "(transparency check: how much of the gap is that environment)",
    )
    p.add_argument(
        "--baseline-profile",
        choices=["safe_rlhf", "ppo_sh", "both"],
        default="safe_rlhf",
        help="the baseline's settings: Safe-RLHF's defaults, its shipped scripts/ppo.sh "
        "(gradient checkpointing, the ptx loss; hpc_rlhf trains on the same ptx rows), or "
        "both, each against its own hpc_rlhf run",
    )
    p.add_argument("--plot", default=None, help="write a PNG of per-stage times here")
    p.add_argument(
        "--repeat", type=int, default=1, help="run each pair N times, alternating the order"
    )
    p.add_argument("--system", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


def run_child(system: str, shape: str, args, workdir: str, profile: str) -> dict:
    """Run one system's iteration in a fresh process; return its JSON report."""
    out = os.path.join(workdir, f"{system}_{shape}_{profile}.json")
    cmd = [
        sys.executable,
        __file__,
        "--system",
        system,
        "--shape",
        shape,
        "--workdir",
        workdir,
        "--out",
        out,
        "--prompts",
        str(args.prompts),
        "--micro-batch",
        str(args.micro_batch),
        "--mini-batch",
        str(args.mini_batch),
        "--score-micro-batch",
        str(args.score_micro_batch),
        "--algorithm",
        args.algorithm,
        "--dtype",
        args.dtype,
        "--baseline-profile",
        profile,
    ]
    if args.quick:
        cmd.append("--quick")
    subprocess.run(cmd, check=True, env=child_env(system, args))
    with open(out) as fh:
        return json.load(fh)


def environment_note(args) -> str:
    """One line on the process environment each system runs with."""
    from hpc_rlhf.parallel.host_allocator import launch_env

    ours = " ".join(f"{k}={v}" for k, v in launch_env().items())
    base = ours if args.baseline_huge_pages else "PyTorch defaults, as Safe-RLHF ships"
    return f"process environment: hpc_rlhf {ours} (set by its run set-up); baseline {base}"


def child_env(system: str, args) -> dict:
    """The process environment of a system's run: hpc_rlhf applies its own launch
    environment when its run starts (``trainer.run.Run``); the baseline runs with
    PyTorch's defaults unless ``--baseline-huge-pages``."""
    from hpc_rlhf.parallel.host_allocator import launch_env

    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    if system == "baseline" and args.baseline_huge_pages:
        env.update(launch_env())
    return env


def child_main(args) -> None:
    """Inside the subprocess: set up, run one iteration, write the report."""
    import resource

    from bench_systems import run_baseline, run_ours

    prompts, lengths = workload(args.shape, args.prompts, args.quick)
    if args.system == "ours":
        report = run_ours(
            args.workdir,
            prompts,
            lengths,
            args.mini_batch,
            args.micro_batch,
            args.score_micro_batch,
            args.algorithm,
            args.dtype,
            args.baseline_profile,
        )
    else:
        report = run_baseline(
            args.workdir,
            prompts,
            lengths,
            args.mini_batch,
            args.micro_batch,
            args.algorithm,
            args.dtype,
            args.baseline_profile,
        )
    report["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    report["flops"] = ppo_flops(args.system, BENCH_MODEL, prompts, lengths, report)
    with open(args.out, "w") as fh:
        json.dump(report, fh)


def print_shape(shape: str, ours: dict, base: dict, algorithm: str, dtype: str) -> dict:
    """The comparison table of one run of one shape; returns its ratios."""
    print(
        f"\n=== {algorithm} {shape} ({dtype}, baseline profile {base['profile']}): "
        f"{len(ours['prompt_lengths'])} prompts, {ours['response_tokens']:.0f} response tokens ==="
    )
    print(f"{'stage':<12} {'baseline s':>11} {'hpc_rlhf s':>11} {'ratio':>7}")
    for stage in STAGES:
        b, o = base["times"].get(stage, 0.0), ours["times"].get(stage, 0.0)
        ratio = f"{b / o:7.2f}" if o > 0 else "      -"
        print(f"{stage:<12} {b:11.2f} {o:11.2f} {ratio}")
    tb, to = base["total"], ours["total"]
    speed_target = SPEED_TARGETS[dtype][shape]
    met = "met" if tb / to >= speed_target else "NOT met"
    print(f"{'total':<12} {tb:11.2f} {to:11.2f} {tb / to:7.2f}  (target >= {speed_target}x: {met})")
    tok_b, tok_o = base["response_tokens"] / tb, ours["response_tokens"] / to
    print(f"tokens/s     {tok_b:11.1f} {tok_o:11.1f} {tok_o / tok_b:7.2f}")
    mem_b, mem_o = base["peak_rss_gb"], ours["peak_rss_gb"]
    met = "met" if mem_o / mem_b <= MEMORY_TARGET else "NOT met"
    print(
        f"peak RSS GB  {mem_b:11.2f} {mem_o:11.2f} {mem_o / mem_b:7.2f}"
        f"  (ours / baseline; target <= 1/3: {met})"
    )
    fb, fo = base["flops"] / 1e12, ours["flops"] / 1e12
    print(f"model TFLOP  {fb:11.2f} {fo:11.2f}   (executed matmul work)")
    rb, ro = base["matmul_gflops"], ours["matmul_gflops"]
    print(f"matmul GF/s  {rb:11.0f} {ro:11.0f}   ({dtype} torch.mm 1024^3 around each run)")
    share_b, share_o = fb * 1e3 / tb / rb, fo * 1e3 / to / ro
    target = RATE_TARGET[dtype]  # a bf16 target only
    note = ""
    if target is not None:
        note = f"  (target >= {target:.0%}: {'met' if share_o >= target else 'NOT met'})"
    print(f"matmul rate  {share_b:10.0%} {share_o:10.0%}   of that rate{note}")
    if "lambda" in ours:  # each system's own samples: close, not equal
        print(f"lambda       {base['lambda']:11.4f} {ours['lambda']:11.4f}   (after the update)")
    return {"speedup": tb / to, "memory_ratio": mem_o / mem_b, "rate_share": share_o}


def run_pair(shape: str, args, workdir: str, ours_first: bool, profile: str) -> dict:
    """Both systems on one shape; each report gets the matmul rate measured around it."""
    pair = {}
    dtype = DTYPES[args.dtype]
    for system in ("ours", "baseline") if ours_first else ("baseline", "ours"):
        before = matmul_gflops(dtype=dtype)
        report = run_child(system, shape, args, workdir, profile)
        report["matmul_gflops"] = (before + matmul_gflops(dtype=dtype)) / 2
        pair[system] = report
    return pair


def summary(shape: str, runs: list[dict]) -> tuple[str, int]:
    """Median-speedup line of a shape's runs, and the index of the median run."""
    order = sorted(range(len(runs)), key=lambda i: runs[i]["speedup"])
    mid = order[(len(order) - 1) // 2]
    r = runs[mid]
    line = f"{shape} {r['speedup']:.2f}x faster"
    if len(runs) > 1:
        lo, hi = runs[order[0]]["speedup"], runs[order[-1]]["speedup"]
        line += f" (median of {len(runs)}: {lo:.2f}-{hi:.2f})"
    line += f", {r['memory_ratio']:.2f}x the memory, {r['rate_share']:.0%} of matmul rate"
    return line, mid


def plot(results: dict, path: str, title: str, dtype: str) -> None:
    """Stacked per-stage seconds, baseline and hpc_rlhf side by side for each shape."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit(f"--plot needs matplotlib (pip install matplotlib): {err}") from err
    fig, ax = plt.subplots(figsize=(7, 4))
    labels, x = [], 0
    colors = dict(zip(STAGES, ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]))
    for shape, pair in results.items():
        for system in ("baseline", "ours"):
            bottom = 0.0
            for stage in STAGES:
                sec = pair[system]["times"].get(stage, 0.0)
                ax.bar(x, sec, bottom=bottom, color=colors[stage], label=stage if x == 0 else None)
                bottom += sec
            labels.append(f"{shape}\n{'Safe-RLHF-style' if system == 'baseline' else 'hpc_rlhf'}")
            x += 1
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("seconds per PPO iteration")
    ax.legend()
    ax.set_title(f"One {title} iteration on CPU (4 layers, hidden 512, vocab 32000, {dtype})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


def main() -> None:
    args = parse_args()
    if args.system:
        child_main(args)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores")
    print(
        f"matmul now: torch.mm 1024^3 on {torch.get_num_threads()} threads, best of 5: "
        f"fp32 {matmul_gflops():.0f} GFLOP/s, bf16 {matmul_gflops(dtype=torch.bfloat16):.0f}"
        f" GFLOP/s (both systems run {args.dtype}; its rate is sampled again around each run)"
    )
    print(f"algorithm: {args.algorithm}, {ALGORITHMS[args.algorithm]}")
    print(environment_note(args))
    shapes = ["fixed", "varied"] if args.shape == "both" else [args.shape]
    profiles = PROFILES if args.baseline_profile == "both" else (args.baseline_profile,)
    results: dict[str, dict] = {}
    lines: dict[str, list[str]] = {profile: [] for profile in profiles}
    with tempfile.TemporaryDirectory() as workdir:
        write_checkpoints(workdir, cost=args.algorithm == "ppo_lag")
        for profile in profiles:
            for shape in shapes:
                pairs, runs = [], []
                for rep in range(args.repeat):
                    pairs.append(run_pair(shape, args, workdir, rep % 2 == 1, profile))
                    if args.repeat > 1:
                        print(f"\n--- {shape}, run {rep + 1} of {args.repeat}")
                    pair = pairs[-1]
                    runs.append(
                        print_shape(
                            shape, pair["ours"], pair["baseline"], args.algorithm, args.dtype
                        )
                    )
                line, mid = summary(shape, runs)
                lines[profile].append(line)
                results.setdefault(shape, pairs[mid])  # the plot shows the first profile
    for profile in profiles:
        print(
            f"\nsummary ({args.algorithm}, {args.dtype}, baseline profile {profile}): "
            + "; ".join(lines[profile])
        )
    if args.plot:
        plot(results, args.plot, ALGORITHMS[args.algorithm].split(" (")[0], args.dtype)


if __name__ == "__main__":
    main()
