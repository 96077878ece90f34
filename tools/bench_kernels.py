"""Benchmark the fused ops against the eager torch code peers use, in the same run.

For each op and each backend available on this machine (``torch`` = our fp32 reference,
``cpp`` = hpc_rlhf._C; ``cuda``/``triton`` when a GPU is present) and for the eager baseline
(``log_softmax`` + ``gather``; GAE as a Python loop over time; the usual masked-mean loss
formulas under autograd; PyTorch's SDPA once per segment for the packed causal attention) it prints the median wall time, the peak extra memory, and the
ratios baseline / ours. It also prints, for an H100, the bytes each op must move and the
resulting floor time at 3.35 TB/s.

How memory is measured (CPU): the torch CPU allocator keeps no statistics, and tracemalloc
does not see tensor storage, so every (op, implementation, mode) runs in a fresh child
process started with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every allocation of
64 KiB or more (all tensor data that matters) with its own mmap and returns it to the OS on
free, so resident memory follows live tensor bytes. The child builds the inputs, runs the op
once (lazy initialisation, thread pools), records its resident set (VmRSS), resets the
kernel's peak counter (``echo 5 > /proc/self/clear_refs``), runs the op again and reports
``VmHWM - VmRSS``: the peak extra resident bytes of one steady-state call, including
outputs, temporaries, saved tensors and gradients. Page granularity (4 KiB) and allocations
below 64 KiB make it slightly approximate for tiny ops. On CUDA, torch.cuda.max_memory_allocated
is used instead. Timing uses all cores (torch.get_num_threads()); it prints the median and the
minimum of repeated calls (the minimum is the better estimate when other processes share the
cores: the load average is printed at start and end).

Usage: python tools/bench_kernels.py [--quick] [--ops causal_attention ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

H100_BYTES_PER_S = 3.35e12


# ----------------------------------------------------------------------------- workloads
def _sizes(quick: bool) -> dict:
    if quick:
        return {
            "N": 512,
            "V": 32000,
            "B": 16,
            "T": 256,
            "LB": 64,
            "LT": 512,
            "SEG": [40, 90],
            "F": 1408,
            "H": 8,
        }
    # SEG: segment lengths of one packed row (8 heads of 64), a training micro-batch's spread
    return {
        "N": 4096,
        "V": 32000,
        "B": 64,
        "T": 1024,
        "LB": 256,
        "LT": 2048,
        "SEG": [300, 120, 384, 250],
        "F": 1408,  # the benchmark model's FFN width (SwiGLU rows [N, 2F])
        "H": 8,  # its heads (RoPE rows [N, 1, H, 64])
    }


def _logprob_inputs(s, dtype, device, grad):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(s["N"], s["V"], generator=gen) * 3).to(dtype).to(device)  # [N, V]
    labels = torch.randint(0, s["V"], (s["N"],), generator=gen).to(device)  # [N]
    return logits.requires_grad_(grad), labels


def _gae_inputs(s, device):
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(s["B"], s["T"], generator=gen).to(device)  # [B, T]
    v = torch.randn(s["B"], s["T"], generator=gen).to(device)  # [B, T]
    ends = torch.randint(s["T"] // 2, s["T"] + 1, (s["B"],), generator=gen)
    mask = (torch.arange(s["T"])[None] < ends[:, None]).to(device)  # right padding
    return r, v, mask


def _loss_inputs(s, device):
    gen = torch.Generator().manual_seed(2)
    shape = (s["LB"], s["LT"])
    a = torch.randn(shape, generator=gen)
    b = a + 0.3 * torch.randn(shape, generator=gen)
    c = torch.randn(shape, generator=gen)
    mask = torch.rand(shape, generator=gen) > 0.2
    return [t.to(device) for t in (a, b, c, mask)]


def _attention_inputs(s, device, grad, dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    rows = sum(s["SEG"])
    q, k, v, g = (torch.randn(rows, 1, 8, 64, generator=gen).to(dtype).to(device) for _ in range(4))
    cu = torch.tensor([0, *itertools.accumulate(s["SEG"])], dtype=torch.int32)  # [n + 1]
    return [t.requires_grad_(grad) for t in (q, k, v)], g, cu  # q, k, v, grad: [T, 1, 8, 64]


def eager_logprobs(logits, labels):
    """What peers do: full log-softmax, then gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None])[:, 0]


def eager_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """TRL/OpenRLHF-style Python loop over time (no holes: mask only zeroes the ends)."""
    from ppo_baseline import gae_python_loop  # tools/ is on sys.path when run as a script

    return gae_python_loop(rewards * mask, values * mask, gamma, lam)


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def eager_ppo(logp, old, adv, mask):
    ratio = torch.exp(logp - old)
    loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
    return _masked_mean(loss, mask)


def eager_value(v, old, ret, mask):
    v_clip = old + torch.clamp(v - old, -0.2, 0.2)
    return 0.5 * _masked_mean(torch.max((v - ret) ** 2, (v_clip - ret) ** 2), mask)


def make_call(op: str, impl: str, mode: str, s: dict, device: str):
    """Build inputs and return a zero-argument callable running one measured call."""
    from hpc_rlhf import ops

    grad = mode == "fwd+bwd"
    if op.startswith("token_logprobs"):
        dtype = torch.bfloat16 if op.endswith("bf16") else torch.float32
        logits, labels = _logprob_inputs(s, dtype, device, grad)

        def run():
            if impl == "eager":
                out = eager_logprobs(logits, labels)
            else:
                out = ops.token_logprobs(logits, labels, backend=impl)
            if grad:
                out.sum().backward()
                logits.grad = None
            return out

        return run
    if op == "masked_gae":
        r, v, mask = _gae_inputs(s, device)
        if impl == "eager":
            return lambda: eager_gae(r, v, mask)
        return lambda: ops.masked_gae(r, v, mask, backend=impl)
    if op.startswith("causal_attention"):
        return _attention_call(op, impl, grad, s, device)
    if op.startswith(("swiglu", "rope", "rmsnorm")):
        return _elementwise_call(op, impl, grad, s, device)
    a, b, c, mask = _loss_inputs(s, device)
    x = a.clone().requires_grad_(grad)

    def run_loss():
        if op == "ppo_policy_loss":
            out = eager_ppo(x, b, c, mask) if impl == "eager" else None
            if out is None:
                out, _ = ops.ppo_policy_loss(x, b, c, mask, backend=impl)
        else:
            out = eager_value(x, b, c, mask) if impl == "eager" else None
            if out is None:
                out, _ = ops.value_loss(x, b, c, mask, backend=impl)
        if grad:
            out.backward()
            x.grad = None
        return out

    return run_loss


def _elementwise_call(op: str, impl: str, grad: bool, s: dict, device: str):
    """SwiGLU over [N, 2F] rows, RoPE over [N, 1, H, 64] or RMSNorm over [N, 64 H] (an
    MLP's, an attention's and a layer's activations of one micro-batch) in fp32 or bf16; the
    eager baseline is megatron-core's unfused formula (``torch.nn.RMSNorm``'s
    ``F.rms_norm`` for the norm, what the local spec ran before)."""
    from hpc_rlhf.ops.rmsnorm import rms_norm
    from hpc_rlhf.ops.rope import rope, rope_reference
    from hpc_rlhf.ops.swiglu import swiglu, swiglu_reference

    dtype = torch.bfloat16 if op.endswith("bf16") else torch.float32
    gen = torch.Generator().manual_seed(3)
    fn: Callable[..., torch.Tensor]
    if op.startswith("swiglu"):
        x = torch.randn(s["N"], 2 * s["F"], generator=gen).to(dtype).to(device)
        tables: tuple = ()
        fn = swiglu_reference if impl == "eager" else partial(swiglu, backend=impl)
    elif op.startswith("rmsnorm"):
        width = 64 * s["H"]
        x = torch.randn(s["N"], width, generator=gen).to(dtype).to(device)
        weight = (1.0 + 0.1 * torch.randn(width, generator=gen)).to(dtype).to(device)
        tables = (weight.requires_grad_(grad),)
        if impl == "eager":
            fn = partial(_eager_rms_norm, eps=1e-5)
        else:
            fn = partial(rms_norm, eps=1e-5, backend=impl)
    else:
        x = torch.randn(s["N"], 1, s["H"], 64, generator=gen).to(dtype).to(device)
        angles = torch.rand(s["N"], 64, generator=gen) * 6.0
        pos = torch.arange(s["N"])
        tables = (angles.cos().to(device), angles.sin().to(device), pos.to(device))
        fn = rope_reference if impl == "eager" else partial(rope, backend=impl)
    x.requires_grad_(grad)

    def run():
        out = fn(x, *tables)
        if grad:
            out.backward(torch.ones_like(out))
            x.grad = None
        return out

    return run


def _eager_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


def _attention_call(op: str, impl: str, grad: bool, s: dict, device: str):
    """One packed row's causal attention in fp32 or bf16; the eager baseline is torch SDPA
    per segment (in the inputs' dtype)."""
    from hpc_rlhf.ops.causal_attention import causal_attention, causal_attention_reference

    dtype = torch.bfloat16 if op.endswith("bf16") else torch.float32
    (q, k, v), g, cu = _attention_inputs(s, device, grad, dtype)

    def run():
        if impl == "eager":
            out = causal_attention_reference(q, k, v, cu)
        else:
            out = causal_attention(q, k, v, cu, backend=impl)
        if grad:
            out.backward(g)
            for t in (q, k, v):
                t.grad = None
        return out

    return run


# ----------------------------------------------------------------------------- measuring
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, reps: int, budget_s: float = 20.0) -> tuple[float, float]:
    """(median, min) seconds of ``reps`` calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return statistics.median(times), min(times)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def child_measure(op, impl, mode, s, device) -> int:
    """Peak extra bytes of one steady-state call (see the module docstring)."""
    fn = make_call(op, impl, mode, s, device)
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base_kb = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    fn()
    return (_status_kb("VmHWM") - base_kb) * 1024


def peak_memory(op, impl, mode, quick, device) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--child", json.dumps([op, impl, mode, quick, device])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory child failed for {op}/{impl}/{mode}:\n{res.stderr}")
    return int(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- reporting
def available_backends(device: str) -> list[str]:
    from hpc_rlhf.ops import _backend

    dev = torch.device(device)
    out = [
        b for b in ("cpp", "cuda", "triton", "torch") if _backend.unavailable_reason(b, dev) is None
    ]
    if device == "cpu" and "triton" in out:
        out.remove("triton")  # the CPU interpreter is a correctness tool, not a backend to time
    return out


def floor_bytes(op: str, s: dict) -> dict[str, int] | None:
    """Bytes an op must move (read inputs once, write outputs once) per mode; None for a
    compute-bound op (attention), which has no meaningful bandwidth floor."""
    if op.startswith("causal_attention"):
        return None
    if op.startswith("token_logprobs"):
        b = 2 if op.endswith("bf16") else 4
        nv = s["N"] * s["V"]
        fwd = nv * b + s["N"] * (8 + 4)
        return {"fwd": fwd, "fwd+bwd": fwd + 2 * nv * b + s["N"] * 16}
    if op == "masked_gae":
        return {"fwd": s["B"] * s["T"] * (4 + 4 + 1 + 4 + 4)}
    if op.startswith(("swiglu", "rope")):
        b = 2 if op.endswith("bf16") else 4
        if op.startswith("swiglu"):  # x [N, 2F] in, out [N, F]; backward: x, g in, dx out
            n = s["N"] * s["F"]
            return {"fwd": 3 * n * b, "fwd+bwd": 3 * n * b + 5 * n * b}
        n = s["N"] * s["H"] * 64  # t in, out; backward: g in, dt out (tables are small)
        return {"fwd": 2 * n * b, "fwd+bwd": 4 * n * b}
    if op.startswith("rmsnorm"):  # x in, y out; backward: x, g in, dx out (weight small)
        n = s["N"] * s["H"] * 64
        b = 2 if op.endswith("bf16") else 4
        return {"fwd": 2 * n * b, "fwd+bwd": 5 * n * b}
    per = s["LB"] * s["LT"] * (4 * 3 + 1 + 4)  # three fp32 inputs, mask, dcoef
    return {"fwd": per, "fwd+bwd": per + s["LB"] * s["LT"] * 8}


PLAN = [
    ("token_logprobs fp32", ("fwd", "fwd+bwd"), 7),
    ("token_logprobs bf16", ("fwd", "fwd+bwd"), 5),
    ("masked_gae", ("fwd",), 5),
    ("ppo_policy_loss", ("fwd", "fwd+bwd"), 20),
    ("value_loss", ("fwd", "fwd+bwd"), 20),
    ("causal_attention fp32", ("fwd", "fwd+bwd"), 10),
    ("causal_attention bf16", ("fwd", "fwd+bwd"), 10),
    ("swiglu fp32", ("fwd", "fwd+bwd"), 10),
    ("swiglu bf16", ("fwd", "fwd+bwd"), 10),
    ("rope fp32", ("fwd", "fwd+bwd"), 10),
    ("rope bf16", ("fwd", "fwd+bwd"), 10),
    ("rmsnorm fp32", ("fwd", "fwd+bwd"), 10),
    ("rmsnorm bf16", ("fwd", "fwd+bwd"), 10),
]
# ops with a narrower backend set
OP_BACKENDS = {
    "causal_attention": ("cpp", "torch"),
    "rope": ("cpp", "torch"),
    "rmsnorm": ("cpp", "torch"),
}


def _fmt_mb(n: int) -> str:
    return f"{n / 2**20:9.1f} MiB"


def _mem_ratio(ours: int, base: int) -> str:
    """ours / baseline as a fraction; below one page either way it is not meaningful."""
    if base < 4096:
        return "(baseline < 4 KiB: n/a)"
    if ours < 4096:
        return "ours < 4 KiB"
    return f"1/{base / ours:.1f} of baseline"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument(
        "--ops", nargs="+", metavar="OP", help="only these ops (e.g. causal_attention)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        op, impl, mode, quick, device = json.loads(args.child)
        print(child_measure(op, impl, mode, _sizes(quick), device))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = _sizes(args.quick)
    backends = available_backends(device)
    from bench_common import cpu_model  # tools/ is on sys.path when run as a script

    print(f"CPU: {cpu_model()}")
    print(f"device={device} threads={torch.get_num_threads()} backends={backends} sizes={s}")
    if device == "cpu":
        print("triton on CPU: not timed (it only runs in the interpreter there)")
    print(f"host load average at start: {os.getloadavg()}")
    plan = [row for row in PLAN if not args.ops or row[0].split()[0] in args.ops]
    for op, modes, reps in plan:
        floors = floor_bytes(op, s)
        for mode in modes:
            print(f"\n== {op} [{mode}]")
            rows = {}
            impls = [b for b in backends if b in OP_BACKENDS.get(op.split()[0], backends)]
            for impl in ["eager", *impls]:
                t, t_min = time_call(make_call(op, impl, mode, s, device), device, reps)
                mem = peak_memory(op, impl, mode, args.quick, device)
                rows[impl] = (t, t_min, mem)
            base_t, base_min, base_m = rows["eager"]
            for impl, (t, t_min, mem) in rows.items():
                ratio = ""
                if impl != "eager":
                    ratio = (
                        f"  speedup x{base_t / t:6.1f} (min x{base_min / t_min:6.1f})"
                        f"  memory {_mem_ratio(mem, base_m)}"
                    )
                print(
                    f"  {impl:7s} median {t * 1e3:9.3f} ms (min {t_min * 1e3:9.3f})"
                    f"  peak extra {_fmt_mb(mem)}{ratio}"
                )
            if floors is None:
                continue
            nbytes = floors.get(mode, floors["fwd"])
            print(
                f"  H100 floor: {nbytes / 1e6:.1f} MB moved -> "
                f"{nbytes / H100_BYTES_PER_S * 1e6:.1f} us at 3.35 TB/s"
            )
    print(f"\nhost load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
