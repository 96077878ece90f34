"""Shared pieces of the benchmarks: the small model, workloads, weights, FLOP counting and
the machine's measured matmul rate."""

from __future__ import annotations

import os
import random
import time

import torch

from hpc_rlhf.config import ModelConfig

BENCH_MODEL = ModelConfig(
    num_layers=4,
    hidden_size=512,
    num_attention_heads=8,
    ffn_hidden_size=1408,
    vocab_size=32000,
    max_position_embeddings=1024,
)
STAGES = ("generate", "score", "advantages", "train", "handoff")
EOS_ID, PAD_ID = 2, 0


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo``) and its matrix extensions: benchmark results
    depend on the CPU kind (AMD Zen 4 or Intel Xeon with AMX, say), so every run names it."""
    name, flags = "unknown CPU", set[str]()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    extensions = [flag for flag in wanted if flag in flags]
    return f"{name} ({', '.join(extensions) or 'no AVX-512/AMX'})"


def matmul_gflops(
    n: int = 1024, reps: int = 5, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> float:
    """Best-of ``torch.mm`` rate at ``n^3`` in ``dtype`` on ``device`` (GFLOP/s; fp32 on
    the CPU unless asked; a GPU is timed at 4096^3 after a synchronize)."""
    if device != "cpu":
        n = max(n, 4096)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        _synchronize(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize(device)


def workload(shape: str, n_prompts: int, quick: bool = False, seed: int = 0):
    """Prompt token ids and response lengths of a benchmark shape (seeded)."""
    rng = random.Random(seed)
    if quick:
        n_prompts = min(n_prompts, 8)
    scale = 8 if quick else 1
    if shape == "fixed":
        p_lens = [128 // scale] * n_prompts
        r_lens = [256 // scale] * n_prompts
    else:
        p_lens = [rng.randint(32 // scale, 256 // scale) for _ in range(n_prompts)]
        r_lens = [rng.randint(16 // scale, 256 // scale) for _ in range(n_prompts)]
    vocab = BENCH_MODEL.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in p_lens]
    return prompts, r_lens


def write_checkpoints(workdir: str, cost: bool = False) -> None:
    """Random actor (LM) and reward (score head) HF checkpoints under ``workdir``; with
    ``cost``, a cost model (``workdir/cost``) too, built as the reward model is."""
    from hpc_rlhf.models.hf_io import save_hf_checkpoint
    from hpc_rlhf.models.init import random_hf_state

    actor = random_hf_state(BENCH_MODEL, seed=1)
    save_hf_checkpoint(os.path.join(workdir, "actor"), BENCH_MODEL, actor)
    for name, seed in (("reward", 2), ("cost", 4))[: 2 if cost else 1]:
        scorer = random_hf_state(BENCH_MODEL, seed=seed)
        scorer.pop("lm_head.weight")
        gen = torch.Generator().manual_seed(seed + 1)
        scorer["score.weight"] = 0.02 * torch.randn(1, BENCH_MODEL.hidden_size, generator=gen)
        save_hf_checkpoint(os.path.join(workdir, name), BENCH_MODEL, scorer)


def _model_sizes(m: ModelConfig) -> tuple[int, int, float]:
    """(decoder matmul params, LM-head params, attention FLOPs per query per key)."""
    d = m.head_dim
    per_layer = m.hidden_size * d * (2 * m.num_attention_heads + 2 * m.query_groups)
    per_layer += 3 * m.hidden_size * m.ffn_hidden_size
    attn = 4.0 * m.num_attention_heads * d * m.num_layers  # QK^T and PV
    return per_layer * m.num_layers, m.vocab_size * m.hidden_size, attn


def _baseline_flops(m: ModelConfig, prompts, lengths, report: dict) -> float:
    """The baseline's executed matmul FLOPs: per rollout micro-batch, generation, the
    experience forwards and the update on its padded ``[B, S]``; with the ppo.sh profile,
    one more forward per backward (gradient checkpointing) and the ptx rows' steps."""
    dec, head, attn = _model_sizes(m)
    critics, n = report["critics"], report["rollout_batch"]
    passes = 4 if report["profile"] == "ppo_sh" else 3  # forward, backward (x2), recompute
    total = 0.0
    for g, (B, S) in enumerate(report["padded_shapes"]):
        group_prompts, group_lengths = prompts[g * n : (g + 1) * n], lengths[g * n : (g + 1) * n]
        P, steps = max(len(p) for p in group_prompts), max(group_lengths)
        gen = 2 * dec * B * P + 2 * head * B + attn * B * P * P / 2
        gen += steps * B * 2 * (dec + head) + attn * B * sum(P + t for t in range(steps))
        full = 2 * dec * B * S + attn * B * S * S / 2
        score = 2 * (full + 2 * head * B * S) + 2 * critics * full
        train = passes * (full + 2 * head * B * S) + passes * critics * full
        if report["profile"] == "ppo_sh":  # B pre-training rows of PTX length, LM loss
            L = report["ptx_length"]
            train += passes * (2 * (dec + head) * B * L + attn * B * L * L / 2)
        total += gen + score + train
    return total


def ppo_flops(system: str, m: ModelConfig, prompts, lengths, report: dict) -> float:
    """Executed model matmul FLOPs of one iteration (forward = 2 x params x tokens, backward
    twice that; attention counted over the keys each query sees). ``report["critics"]``:
    trained value models, 1 (PPO) or 2 (PPO-Lagrangian's cost critic too), each with a
    frozen score model beside it in the baseline's experience stage."""
    if system == "baseline":
        return _baseline_flops(m, prompts, lengths, report)
    dec, head, attn = _model_sizes(m)
    resp = sum(lengths)
    prefill = sum(len(p) for p in prompts)
    gen = 2 * dec * prefill + 2 * head * len(prompts) + sum(attn * len(p) ** 2 / 2 for p in prompts)
    gen += 2 * (dec + head) * (resp - len(prompts))
    gen += sum(attn * sum(len(p) + t for t in range(1, n)) for p, n in zip(prompts, lengths))
    S_mean = report["mean_padded_length"]  # attention per token ~ S / 2 keys
    mlp = 3 * m.hidden_size * m.ffn_hidden_size  # one layer's MLP matmul params
    forward = {"infer": 0.0, "train": 0.0}
    for role, work in report["work"].items():
        lm = role in ("actor", "reference")
        for kind in forward:
            forward[kind] += (2 * dec + attn * S_mean / 2) * work[f"{kind}_tokens"]
            forward[kind] += 2 * head * work[f"{kind}_head_rows"] if lm else 0.0
            # the last layer's MLP skips the rows nothing reads (models.overrides.selective)
            forward[kind] -= 2 * mlp * (work[f"{kind}_tokens"] - work[f"{kind}_final_mlp_rows"])
    score, train = forward["infer"], 3 * forward["train"]
    return gen + score + train


# ----------------------------------------------------------------------------- supervised
# Shared by bench_rm.py and bench_sft.py: one training step loop per system, each system in
# its own subprocess, the same seeded samples for both.

OPTIMIZER = {  # both systems: AdamW, these hyper-parameters, gradient norm clipped at 1
    "lr": 1e-5,
    "weight_decay": 0.01,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "adam_eps": 1e-8,
    "clip_grad": 1.0,
}


def model_dict(m: ModelConfig = BENCH_MODEL) -> dict:
    """The ``model`` section of a run config for ``m``."""
    keys = (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "ffn_hidden_size",
        "vocab_size",
        "max_position_embeddings",
    )
    return {k: getattr(m, k) for k in keys}


def _lengths(rng: random.Random, lo: int, hi: int, scale: int) -> int:
    return rng.randint(lo // scale, hi // scale)


def preference_workload(n_pairs: int, quick: bool = False, seed: int = 0):
    """``n_pairs`` seeded ``(prompt, chosen, rejected)`` token lists: prompt lengths 32-256,
    each response 16-256 (both / 8 with ``quick``); a response ends with EOS."""
    rng, scale, vocab = random.Random(seed), 8 if quick else 1, BENCH_MODEL.vocab_size
    out = []
    for _ in range(n_pairs):
        prompt = [rng.randrange(3, vocab) for _ in range(_lengths(rng, 32, 256, scale))]
        responses = []
        for _ in range(2):
            n = _lengths(rng, 16, 256, scale)
            responses.append([rng.randrange(3, vocab) for _ in range(n - 1)] + [EOS_ID])
        out.append((prompt, responses[0], responses[1]))
    return out


def sft_workload(n: int, quick: bool = False, seed: int = 0):
    """``n`` seeded ``(prompt, response)`` token lists: prompt lengths 32-256, responses
    16-256 (both / 8 with ``quick``) ending with EOS; the loss reads the response tokens."""
    return [(p, r) for p, r, _ in preference_workload(n, quick, seed)]


def bench_child_env() -> dict:
    """Every system's process environment in the supervised benchmarks: PyTorch's defaults
    and one OpenMP thread per core (hpc_rlhf's run set-up then applies its own launch
    environment inside its process, as every hpc_rlhf run does)."""
    return {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}


def environment_line() -> str:
    """One line on the process environment of the supervised benchmarks' systems."""
    from hpc_rlhf.parallel.host_allocator import launch_env

    ours = " ".join(f"{k}={v}" for k, v in launch_env().items())
    return (
        f"process environment: OMP_NUM_THREADS={os.cpu_count() or 1} for both; hpc_rlhf adds "
        f"{ours} and its caching host allocator (its run set-up); baseline PyTorch defaults"
    )


def run_bench_child(script: str, system: str, argv: list[str], workdir: str) -> dict:
    """Run ``script --system SYSTEM argv`` in a fresh process (its own peak RSS), the
    machine's matmul rate sampled just before and after; return its JSON report."""
    import json
    import subprocess
    import sys

    out = os.path.join(workdir, f"{system}.json")
    cmd = [sys.executable, script, "--system", system, "--workdir", workdir, "--out", out]
    before = matmul_gflops()
    subprocess.run([*cmd, *argv], check=True, env=bench_child_env())
    after = matmul_gflops()
    with open(out) as fh:
        report = json.load(fh)
    report["matmul_gflops"] = (before + after) / 2
    return report


def peak_rss_gb() -> float:
    """This process's peak resident set size (GB; Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_steps(step_fn, n_steps: int, profile: bool = False) -> tuple[float, list[float], float]:
    """Call ``step_fn(i)`` (returning its loss) for ``i`` in ``0..n_steps``: step 0 is the
    warm-up, untimed in the result's list. Returns (first loss, timed seconds, warm-up s).
    ``profile``: one more step, ``step_fn(n_steps + 1)`` under ``torch.profiler`` (untimed),
    and its table of operators by self CPU time printed."""
    times, first = [], float("nan")
    for i in range(n_steps + 1):
        t = time.perf_counter()
        loss = step_fn(i)
        times.append(time.perf_counter() - t)
        if i == 0:
            first = float(loss)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step_fn(n_steps + 1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return first, times[1:], times[0]


def print_supervised(
    title: str, ours: dict, base: dict, targets: tuple[float, float]
) -> dict[str, float]:
    """The comparison table of a supervised benchmark (reports of ``timed_steps`` runs with
    per-step ``real_tokens`` and ``positions``); returns its ratios."""
    speed_target, memory_target = targets
    assert ours["real_tokens"] == base["real_tokens"], "the systems ran different samples"
    tokens = sum(ours["real_tokens"])
    n = len(ours["step_seconds"])
    tb, to = sum(base["step_seconds"]), sum(ours["step_seconds"])
    rel = abs(ours["first_loss"] - base["first_loss"]) / max(abs(base["first_loss"]), 1e-12)
    same = "same computation" if rel <= 1e-4 else "MISMATCH"
    print(f"\n=== {title} ===")
    print(f"{'':<30} {'baseline':>10} {'hpc_rlhf':>10} {'ratio':>7}")
    print(
        f"{'first-step loss':<30} {base['first_loss']:10.6f} {ours['first_loss']:10.6f}"
        f"   relative difference {rel:.1e} ({same})"
    )
    print(
        f"{'warm-up step s (untimed)':<30} {base['warmup_seconds']:10.2f} {ours['warmup_seconds']:10.2f}"
    )
    for name, report in (("baseline", base), ("hpc_rlhf", ours)):
        each = " ".join(f"{s:.2f}" for s in report["step_seconds"])
        print(f"{f'timed steps s, {name}':<30} {each}")
    print(f"{'seconds per step (mean)':<30} {tb / n:10.2f} {to / n:10.2f} {tb / to:7.2f}")
    speed = tb / to
    ok = "met" if speed >= speed_target else "NOT met"
    print(
        f"{'real tokens/s':<30} {tokens / tb:10.0f} {tokens / to:10.0f} {speed:6.2f}x"
        f"  (target >= {speed_target}x: {ok})"
    )
    pb, po = sum(base["positions"]) / n, sum(ours["positions"]) / n
    print(
        f"{'positions run per step':<30} {pb:10.0f} {po:10.0f}"
        f"   (real tokens per step {tokens / n:.0f})"
    )
    mem_b, mem_o = base["peak_rss_gb"], ours["peak_rss_gb"]
    mem = mem_o / mem_b
    ok = "met" if mem <= memory_target else "NOT met"
    print(
        f"{'peak RSS GB':<30} {mem_b:10.2f} {mem_o:10.2f} {mem:6.2f}x"
        f"  (ours / baseline; target <= {memory_target}: {ok})"
    )
    rb, ro = base["matmul_gflops"], ours["matmul_gflops"]
    print(f"{'fp32 matmul GF/s around run':<30} {rb:10.0f} {ro:10.0f}   (torch.mm 1024^3)")
    print(
        "tokens/s: real (non-padding) tokens of the step's sequences per second of step; "
        "positions: token positions run through the decoder (the baseline's padded batch, "
        "hpc_rlhf's packed rows)"
    )
    return {"speedup": speed, "memory_ratio": mem}


# ------------------------------------------------------------------ supervised benchmarks


def supervised_args(description: str, flag: str, unit: str):
    """The command line of a supervised benchmark (``bench_rm``, ``bench_sft``); ``flag``
    (e.g. ``--pairs``) sets ``args.batch``, the ``unit``s per optimizer step."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        flag, dest="batch", type=int, default=8, help=f"{unit} per optimizer step, both systems"
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=4,
        help=f"hpc_rlhf's {unit} per packed micro-batch (gradient accumulation over the rest)",
    )
    p.add_argument("--steps", type=int, default=4, help="timed steps after the warm-up step")
    p.add_argument("--quick", action="store_true", help=f"4 {unit} per step, lengths / 8")
    p.add_argument(
        "--profile",
        choices=["ours", "baseline"],
        help="print a torch.profiler table of this system's last step (an extra, untimed step)",
    )
    p.add_argument("--baseline-first", action="store_true", help="run the baseline's process first")
    p.add_argument("--system", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.flag = flag
    if args.quick:
        args.batch, args.micro_batch, args.steps = 4, 2, 2
    return args


_WORKLOADS: dict = {}


def step_items(args, workload_fn, step: int) -> list:
    """The samples of step ``step`` (0: the warm-up; a profiled extra step reuses step 1's)
    from ``workload_fn(n, quick)``, built once per process (seeded)."""
    key = (workload_fn, args.batch * (args.steps + 1), args.quick)
    if key not in _WORKLOADS:
        _WORKLOADS[key] = workload_fn(key[1], args.quick)
    step = step if step <= args.steps else 1
    return _WORKLOADS[key][step * args.batch : (step + 1) * args.batch]


def supervised_report(args, step_fn, positions: list[int], real_tokens) -> dict:
    """Run the warm-up and timed steps of ``step_fn``; per timed step: seconds, real tokens
    (``real_tokens(step)``) and positions the model ran (with padding)."""
    first, times, warmup = timed_steps(step_fn, args.steps, profile=args.profile == args.system)
    return {
        "first_loss": first,
        "warmup_seconds": warmup,
        "step_seconds": times,
        "real_tokens": [real_tokens(i) for i in range(1, args.steps + 1)],
        "positions": positions[1 : args.steps + 1],
    }


def supervised_main(
    args, script: str, title: str, what: str, targets, run_ours, run_baseline
) -> dict | None:
    """A supervised benchmark: as a child (``--system``) run one system and write its report;
    else run both systems' processes, print the comparison and return their reports
    (``{"ours": ..., "baseline": ...}``). ``what``: the workload, as "reward model: N pairs"
    reads."""
    import json
    import tempfile

    if args.system:
        report = run_ours(args) if args.system == "ours" else run_baseline(args)
        report["peak_rss_gb"] = peak_rss_gb()
        with open(args.out, "w") as fh:
            json.dump(report, fh)
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.cpu_count()} each")
    print(f"fp32 matmul: torch.mm 1024^3 best of 5 now: {matmul_gflops():.0f} GFLOP/s")
    print(environment_line())
    print(
        f"{what} per optimizer step, {args.steps} timed steps after 1 warm-up; hpc_rlhf in "
        f"packed micro-batches of {args.micro_batch}"
        + (" (--quick: lengths / 8)" if args.quick else "")
    )
    argv = [args.flag, str(args.batch), "--micro-batch", str(args.micro_batch)]
    argv += ["--steps", str(args.steps)]
    argv += ["--quick"] if args.quick else []
    argv += ["--profile", args.profile] if args.profile else []
    with tempfile.TemporaryDirectory() as workdir:
        write_checkpoints(workdir)
        order = ("baseline", "ours") if args.baseline_first else ("ours", "baseline")
        reports = {system: run_bench_child(script, system, argv, workdir) for system in order}
    print_supervised(title, reports["ours"], reports["baseline"], targets)
    return reports


def ours_model(args, cls: type, init: str, role: str = "actor"):
    """hpc_rlhf's trained model set up as its stage command does (``Run``, the stage config
    ``cls``, the trained model from the HF checkpoint ``workdir/init``); returns
    ``(cfg, run, model)``."""
    from bench_systems import _BenchTokenizer

    from hpc_rlhf.config import config_from_dict
    from hpc_rlhf.trainer.run import Run, RunSettings
    from hpc_rlhf.trainer.sft import initial_state
    from hpc_rlhf.trainer.supervised import build_trained_model

    cfg = config_from_dict(
        {
            "model": model_dict(),
            "init": os.path.join(args.workdir, init),
            "optimizer": {**OPTIMIZER, "lr_decay_style": "constant"},
            "train": {
                "steps": args.steps + 1,
                "seq_length": 512,
                "micro_batch_size_per_rank": args.micro_batch,
                "global_batch_size": args.batch,
                "pack_sequences": True,
                "seed": 0,
            },
        },
        cls,
    )
    run = Run(cfg, RunSettings.of(cfg.train, "train"), tokenizer=_BenchTokenizer())
    return cfg, run, build_trained_model(cfg, run, initial_state(cfg), role=role)


def ours_step(model, loss_fn, microbatches_of, positions: list[int]):
    """The step function of ``supervised_report`` for hpc_rlhf: ``train_step`` on step
    ``i``'s micro-batches (``microbatches_of(i)``), recording the positions it ran."""

    def step(i: int) -> float:
        before = model.work["train_tokens"]
        loss = model.train_step(microbatches_of(i), loss_fn).metrics["loss"]
        positions.append(model.work["train_tokens"] - before)
        return loss

    return step


def baseline_adamw(params: list) -> torch.optim.AdamW:
    """The baselines' AdamW (no weight decay on 1-D parameters, as HF's Trainer does)."""
    return torch.optim.AdamW(
        [
            {
                "params": [p for p in params if p.ndim >= 2],
                "weight_decay": OPTIMIZER["weight_decay"],
            },
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=OPTIMIZER["lr"],
        betas=(OPTIMIZER["adam_beta1"], OPTIMIZER["adam_beta2"]),
        eps=OPTIMIZER["adam_eps"],
    )
