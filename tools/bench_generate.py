"""Generation throughput: the colocated engine vs ``transformers`` ``generate`` (same run).

Both use the same random Llama weights (fp32, or both bf16 with ``--dtype bf16``: the engine
then keeps a bf16 KV cache unless ``--cache-dtype fp32``), the same prompts and the same
sampling settings, and produce exactly ``--new-tokens`` tokens per prompt (no stop token). HF runs in
batches of ``--hf-batch-size`` with left padding and its default KV cache (prompts sorted by
length first, which helps it). Prints tokens/s of both, their ratio, the machine's measured
matmul rate in the run's dtype (and fp32's) and the engine's share of it (model FLOPs = 2 x matmul params x tokens,
LM head only where logits are computed, plus attention).

    python tools/bench_generate.py              # 64 prompts of 32-256 tokens, 256 new tokens
    python tools/bench_generate.py --quick      # a short smoke run
    python tools/bench_generate.py --dtype bf16 # bf16 weights and KV cache, both systems
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import BENCH_MODEL, cpu_model, matmul_gflops  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

from hpc_rlhf.config import ParallelConfig  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--cache-mb", type=int, default=1024)
    p.add_argument("--skip-hf", action="store_true", help="engine only")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="alternate engine and HF runs this many times and keep each one's best time "
        "(the machine may be shared: load changes between runs skew a single ratio)",
    )
    p.add_argument("--quick", action="store_true", help="8 prompts, 32 new tokens")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where both systems run (auto: the GPU when there is one)",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights, both systems")
    p.add_argument(
        "--cache-dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="the engine's KV cache (auto: the weights' dtype)",
    )
    args = p.parse_args()
    if args.quick:
        args.prompts, args.new_tokens = min(args.prompts, 8), min(args.new_tokens, 32)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device")
    return args


def make_prompts(args) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.prompts,), generator=gen)
    return [
        torch.randint(1, BENCH_MODEL.vocab_size, (int(n),), generator=gen).tolist() for n in lens
    ]


def hf_model(dtype: torch.dtype, device: str = "cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hpc_rlhf.models.hf_config import hf_config_from_model

    cfg = LlamaConfig(**{**hf_config_from_model(BENCH_MODEL), "attn_implementation": "eager"})
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = 0, None, None
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval().to(dtype).to(device)


def run_hf(model, prompts, args) -> float:
    """Seconds for HF ``generate`` over all prompts (left padding, sorted batches)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    t0 = time.perf_counter()
    for start in range(0, len(order), args.hf_batch_size):
        batch = [prompts[i] for i in order[start : start + args.hf_batch_size]]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=args.device)
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device
        )
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                do_sample=True,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=0,
            )
        assert out.shape[1] == width + args.new_tokens
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def init_single_rank(model_cfg, device: str):
    """A one-rank world (nccl on the GPU: models then compute there, gloo on the CPU) and
    its megatron groups."""
    import torch.distributed as dist

    from hpc_rlhf.parallel.state import initialize_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    return initialize_parallel(ParallelConfig(), model_cfg)


def machine_line(args, gflops: float) -> str:
    """The processor this run measured on, its matmul rates and the run's dtypes."""
    if args.device == "cuda":
        where = f"GPU {torch.cuda.get_device_name(0)}; torch.mm 4096^3 = {gflops:.0f} GFLOP/s {args.dtype}"
    else:
        where = (
            f"{cpu_model()}; torch.mm 1024^3 = {matmul_gflops():.1f} GFLOP/s fp32, "
            f"{matmul_gflops(dtype=torch.bfloat16):.1f} bf16; {torch.get_num_threads()} threads"
        )
    return f"machine: {where}; this run: {args.dtype} weights, KV cache {args.cache_dtype}"


def engine_flops(stats_prompts: list[int], new_tokens: int) -> float:
    """Model FLOPs of the engine's work (no preemption recompute counted)."""
    m = BENCH_MODEL
    H, F, L, V = m.hidden_size, m.ffn_hidden_size, m.num_layers, m.vocab_size
    kv = m.query_groups * m.head_dim
    layer_params = H * (H + 2 * kv) + H * H + 3 * H * F
    flops = 0.0
    for P in stats_prompts:
        tokens = P + new_tokens - 1  # the last sampled token is never fed back
        flops += 2 * L * layer_params * tokens
        flops += 2 * V * H * new_tokens  # one logit row per sampled token
        flops += L * 2 * P * P * H  # causal prefill attention (QK^T and PV, half the square)
        flops += L * 4 * H * sum(P + t for t in range(1, new_tokens))  # decode attention
    return flops


def report(args, prompts, engine, gflops, t_engine, t_hf, total_new) -> None:
    """Print tokens/s, the ratio and the engine's share of the matmul rate."""
    flops = engine_flops([len(p) for p in prompts], args.new_tokens)
    s = engine.stats
    print(
        f"requests: {args.prompts} prompts of {args.min_len}-{args.max_len} tokens "
        f"(total {sum(map(len, prompts))}), {args.new_tokens} new tokens each, sampling "
        f"T={args.temperature} top_k={args.top_k} top_p={args.top_p}"
    )
    print(
        f"engine: {t_engine:.2f} s, {total_new / t_engine:.1f} tokens/s, "
        f"{flops / t_engine / 1e9:.1f} GFLOP/s = {100 * flops / t_engine / 1e9 / gflops:.0f}% of "
        f"the {args.dtype} matmul rate ({flops / 1e12:.3f} TFLOP); prefill {s.prefill_tokens} tokens in "
        f"{s.prefill_batches} batches, {s.decode_steps} decode steps, {s.preemptions} "
        f"preemptions, peak {s.peak_blocks} KV blocks (counters summed over runs)"
    )
    if not args.skip_hf:
        print(
            f"transformers generate (batch {args.hf_batch_size}, left padding): {t_hf:.2f} s, "
            f"{total_new / t_hf:.1f} tokens/s"
        )
        print(f"ratio engine / transformers: {t_hf / t_engine:.2f}x")


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    from hpc_rlhf.inference.engine import GenerationConfig, GenerationEngine
    from hpc_rlhf.inference.sampling import SamplingParams
    from hpc_rlhf.trainer.trainable_model import TrainableModel

    prompts = make_prompts(args)
    dtype = DTYPES[args.dtype]
    gflops = matmul_gflops(dtype=dtype, device=args.device)
    print(machine_line(args, gflops))
    model_cfg = dataclasses.replace(BENCH_MODEL, params_dtype=args.dtype)
    model = hf_model(dtype, args.device)
    state = init_single_rank(model_cfg, args.device)
    actor = TrainableModel(model_cfg, None, state, "actor")
    actor.load_hf_state({n: t.detach().cpu().clone() for n, t in model.state_dict().items()})
    config = GenerationConfig(
        block_size=args.block_size,
        cache_budget_bytes=args.cache_mb * 2**20,
        cache_dtype=args.cache_dtype,
    )
    engine = GenerationEngine(actor, model_cfg, state, config)
    engine.sync_weights(0)
    sampling = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.new_tokens,
        seed=1,
    )
    total_new = args.prompts * args.new_tokens
    t_engine, t_hf = float("inf"), float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outs = engine.generate(prompts, sampling)
        t_engine = min(t_engine, time.perf_counter() - t0)
        assert sum(len(o.token_ids) for o in outs) == total_new
        print(f"  engine run: {time.perf_counter() - t0:.2f} s", flush=True)
        if not args.skip_hf:
            t_run = run_hf(model, prompts, args)
            t_hf = min(t_hf, t_run)
            print(f"  transformers run: {t_run:.2f} s", flush=True)
    report(args, prompts, engine, gflops, t_engine, t_hf, total_new)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS: {peak:.2f} GB")


if __name__ == "__main__":
    main()
