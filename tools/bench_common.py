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


def matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    """Best-of fp32 ``torch.mm`` rate at ``n^3`` (GFLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


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


def write_checkpoints(workdir: str) -> None:
    """Random actor (LM) and reward (score head) HF checkpoints under ``workdir``."""
    from hpc_rlhf.models.hf_io import save_hf_checkpoint
    from hpc_rlhf.models.init import random_hf_state

    actor = random_hf_state(BENCH_MODEL, seed=1)
    save_hf_checkpoint(os.path.join(workdir, "actor"), BENCH_MODEL, actor)
    reward = random_hf_state(BENCH_MODEL, seed=2)
    reward.pop("lm_head.weight")
    gen = torch.Generator().manual_seed(3)
    reward["score.weight"] = 0.02 * torch.randn(1, BENCH_MODEL.hidden_size, generator=gen)
    save_hf_checkpoint(os.path.join(workdir, "reward"), BENCH_MODEL, reward)


def _model_sizes(m: ModelConfig) -> tuple[int, int, float]:
    """(decoder matmul params, LM-head params, attention FLOPs per query per key)."""
    d = m.head_dim
    per_layer = m.hidden_size * d * (2 * m.num_attention_heads + 2 * m.query_groups)
    per_layer += 3 * m.hidden_size * m.ffn_hidden_size
    attn = 4.0 * m.num_attention_heads * d * m.num_layers  # QK^T and PV
    return per_layer * m.num_layers, m.vocab_size * m.hidden_size, attn


def ppo_flops(system: str, m: ModelConfig, prompts, lengths, report: dict) -> float:
    """Executed model matmul FLOPs of one iteration (forward = 2 x params x tokens, backward
    twice that; attention counted over the keys each query sees)."""
    dec, head, attn = _model_sizes(m)
    B, S = report["padded_shape"]
    if system == "baseline":
        P = max(len(p) for p in prompts)
        steps = max(lengths)
        gen = 2 * dec * B * P + 2 * head * B + attn * B * P * P / 2
        gen += steps * B * 2 * (dec + head) + attn * B * sum(P + t for t in range(steps))
        full = 2 * dec * B * S + attn * B * S * S / 2
        score = 2 * (full + 2 * head * B * S) + 2 * full
        train = 3 * (full + 2 * head * B * S) + 3 * full
        return gen + score + train
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
