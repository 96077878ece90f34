"""CPU fp32 GEMMs of the PPO benchmark's model: torch's MKL path vs ops.cpu_gemm (oneDNN).

For each shape (M x K x N, the linear ``x[M, K] @ W[N, K]^T``) it times the forward product
(MKL, oneDNN, and oneDNN with the weight prepacked once as generation does:
``cpu_gemm.prepack``) and the input gradient ``g[M, N] @ W[N, K]`` on MKL and oneDNN, interleaved round by round (this
machine's speed drifts by up to 2x over minutes, so only same-window comparisons mean
anything), and prints the best GFLOP/s of each and the ratio.

Usage: python tools/bench_gemm.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import time

import torch

from hpc_rlhf.ops import cpu_gemm

# decode (64 rows), prefill/scoring/training blocks of the bench model (hidden 512,
# fused QKV 1536, fc1 2816, fc2 1408 -> 512, vocabulary 32000)
SHAPES = [
    (8, 512, 2816),
    (8, 512, 32000),
    (64, 512, 1536),
    (64, 512, 2816),
    (64, 1408, 512),
    (64, 512, 32000),
    (1536, 512, 1536),
    (1536, 512, 2816),
    (1536, 1408, 512),
    (1024, 512, 32000),
]


def _seconds(fn, calls: int = 3) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def bench_shape(m: int, k: int, n: int, rounds: int) -> dict[str, float]:
    """Best GFLOP/s of each variant over interleaved rounds."""
    x, w, g = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
    packed = cpu_gemm.prepack(w)
    variants = {
        "fwd torch": lambda: x @ w.t(),
        "fwd onednn": lambda: cpu_gemm.linear(x, w),
        "fwd packed": lambda: cpu_gemm.linear(x, packed),
        "dgrad torch": lambda: g @ w,
        "dgrad onednn": lambda: cpu_gemm.matmul(g, w),
    }
    best = {name: float("inf") for name in variants}
    for fn in variants.values():
        fn()  # primitive creation, thread pool
    for _ in range(rounds):
        for name, fn in variants.items():
            best[name] = min(best[name], _seconds(fn))
    return {name: 2 * m * k * n / s / 1e9 for name, s in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if not cpu_gemm.onednn_available():
        raise SystemExit("this torch build has no oneDNN linear: nothing to compare")
    cpu_gemm.set_backend("onednn")
    print(f"threads: {torch.get_num_threads()}, GFLOP/s (best of {args.rounds} rounds)")
    print(
        f"{'M x K x N':>18}  fwd torch  fwd onednn  ratio  packed  ratio"
        "  dgrad torch  dgrad onednn  ratio"
    )
    for m, k, n in SHAPES:
        r = bench_shape(m, k, n, args.rounds)
        print(
            f"{f'{m} x {k} x {n}':>18}  {r['fwd torch']:9.0f}  {r['fwd onednn']:10.0f}"
            f"  {r['fwd onednn'] / r['fwd torch']:5.2f}  {r['fwd packed']:6.0f}"
            f"  {r['fwd packed'] / r['fwd torch']:5.2f}  {r['dgrad torch']:11.0f}"
            f"  {r['dgrad onednn']:12.0f}  {r['dgrad onednn'] / r['dgrad torch']:5.2f}"
        )


if __name__ == "__main__":
    main()
