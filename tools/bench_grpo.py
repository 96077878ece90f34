"""One GRPO iteration two ways, in one run: hpc_rlhf vs TRL's own ``GRPOTrainer``.

A whole iteration, generation included: sample 8 responses per prompt, score them (a rule
reward and the frozen reference's log-probs), GRPO advantages, one PPO-clip optimizer step.
Both systems start from the same random weights (``bench_common.BENCH_MODEL``: Llama-style, 4
layers, hidden 512, vocab 32000, fp32, the HF checkpoint ``write_checkpoints`` saves; the
reference is a second copy of it) and run the same prompts (``workload``: ``varied``, lengths
32-256, by default; ``fixed``, 128 each) with the same forced response lengths (``varied``:
16-256 per prompt, every sample of a prompt ending at its length; ``fixed``: 256).

* **TRL** (``tools/trl_grpo_peer.py``): ``trl.GRPOTrainer`` 1.16 itself (installed by
  ``tools/install_trl.sh`` into ``tools/.peer-packages``) on its default generation path,
  transformers ``generate`` (vLLM needs a GPU); the lengths are forced by a logits processor
  handed to ``generate`` (EOS forbidden before a row's length, forced at it) and checked;
* **hpc_rlhf**: ``PPOTrainer.iterate`` with ``ppo.advantage: grpo`` (its colocated paged
  engine generates; ``iterate``'s per-prompt ``max_new_tokens`` with
  ``generation.stop_at_eos: false`` gives the lengths), set up as every run is (``Run``).

The settings, TRL ``GRPOConfig`` -> hpc_rlhf config (both: temperature 1, no top-k / top-p;
AdamW lr 1e-5, weight decay 0.01, betas (0.9, 0.95), eps 1e-8, gradient norm clipped at 1,
constant learning rate):

* samples per prompt: ``num_generations=8`` -> ``ppo.n_samples_per_prompt: 8``;
* one optimizer step per iteration: ``gradient_accumulation_steps`` = samples / micro-batch
  (``steps_per_generation`` defaults to it, so one generation batch per step) and
  ``num_iterations=1`` -> ``ppo.mini_batches_per_rollout: 1``, ``ppo.ppo_epochs: 1``;
* micro-batch (rows per forward / backward, the reference's forward too):
  ``per_device_train_batch_size`` -> ``ppo.micro_batch_size_per_rank`` and
  ``ppo.score_micro_batch_size_per_rank``;
* advantage: ``scale_rewards="group"``, (r - group mean) / (group std + 1e-4) ->
  ``ppo.advantage: grpo``, ``ppo.whiten_advantages: false``, (r - mean) / (std + 1e-6); the
  std unbiased in both;
* clip: ``epsilon=0.2``, ``epsilon_high=0.2`` -> ``ppo.clip_low: 0.2``, ``ppo.clip_high: 0.2``;
* loss reduction: ``loss_type="dapo"`` (token sum over the tokens of the whole optimizer
  step) -> ``ppo.loss_reduction: token_mean`` (the same mean);
* KL: ``beta=0.04``, the k3 estimator per token in the loss (times the ratio: TRL's default
  ``use_bias_correction_kl``; 1 on this on-policy step) -> ``ppo.kl_loss_coef: 0.04``,
  ``ppo.kl_loss_estimator: k3`` (GRPO's KL in the loss, reduced as the policy loss) and no
  KL in the reward (``ppo.kl_coef: 0``);
* old log-probs: TRL computes none (on-policy, it uses the detached current ones) ->
  hpc_rlhf reuses the engine's sampling log-probs (``ppo.recompute_old_logprobs: false``);
  neither runs an extra forward;
* reward: a Python ``reward_funcs`` callable on ``completion_ids`` -> the rule
  ``hpc_rlhf.algorithms.rule_rewards:id_range_fraction``: the fraction of response tokens
  with an id below 16000, the same function (TRL's completions end with the forced EOS, which
  the reward leaves out);
* generation: ``max_completion_length`` -> ``generation.max_new_tokens`` (the longest forced
  length); TRL generates all rows as one padded batch, hpc_rlhf's engine with its default
  512 MiB paged KV cache.

Both compute the same reference log-probs; the policy starts as the reference, so the KL is
small here wherever it goes. The two systems sample with different random streams, so their
rewards agree only roughly.

Each system runs in its own subprocess (its own peak RSS, model loading included). Iteration
0 is a warm-up (not timed); the next ``--steps`` are timed, each the whole iteration (TRL: its
optimizer step with the data loader's fetch before it; hpc_rlhf: ``iterate``). Tokens/s counts
prompt + response tokens of every sample per second of iteration. The CPU model and the
measured fp32 / bf16 matmul rates are printed first; where each system's time goes after the
table.

    tools/install_trl.sh                 # once: TRL into tools/.peer-packages
    python tools/bench_grpo.py           # varied, 6 prompts x 8 samples, 2 timed iterations
    python tools/bench_grpo.py --quick   # 2 prompts x 8 samples, lengths / 8: a smoke run
    python tools/bench_grpo.py --shape both   # fixed too
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_common import (  # noqa: E402
    BENCH_MODEL,
    EOS_ID,
    OPTIMIZER,
    cpu_model,
    environment_line,
    matmul_gflops,
    model_dict,
    peak_rss_gb,
    run_bench_child,
    timed_steps,
    workload,
    write_checkpoints,
)

TARGETS = (3.0, 0.5)  # tokens/s at least 3x TRL's, peak memory at most 1/2
SAMPLES = 8  # responses per prompt
KL_COEF = 0.04
CLIP = 0.2
REWARD_BELOW = BENCH_MODEL.vocab_size // 2  # the reward: fraction of response ids below this
RULE = "hpc_rlhf.algorithms.rule_rewards:id_range_fraction"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=["varied", "fixed", "both"], default="varied")
    p.add_argument("--prompts", type=int, default=6, help=f"prompts per iteration (x{SAMPLES})")
    p.add_argument(
        "--micro-batch", type=int, default=8, help="rows per forward / backward, both systems"
    )
    p.add_argument("--steps", type=int, default=2, help="timed iterations after the warm-up")
    p.add_argument(
        "--quick", action="store_true", help="2 prompts, micro-batches of 4, lengths / 8"
    )
    p.add_argument("--baseline-first", action="store_true", help="run TRL's process first")
    p.add_argument("--system", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.prompts, args.micro_batch = 2, 4
    return args


def ours_config(args, prompts: list[list[int]], lengths: list[int]):
    """hpc_rlhf's GRPO run config for this workload (see the module docstring's table)."""
    from hpc_rlhf.config import PPORunConfig, config_from_dict

    return config_from_dict(
        {
            "model": model_dict(),
            "actor_init": os.path.join(args.workdir, "actor"),
            "actor_optimizer": {**OPTIMIZER, "lr_decay_style": "constant"},
            "ppo": {
                "steps": args.steps + 1,
                "rollout_batch_size": len(prompts),
                "n_samples_per_prompt": SAMPLES,
                "micro_batch_size_per_rank": args.micro_batch,
                "score_micro_batch_size_per_rank": args.micro_batch,
                "mini_batches_per_rollout": 1,
                "ppo_epochs": 1,
                "advantage": "grpo",
                "whiten_advantages": False,
                "kl_coef": 0.0,
                "kl_loss_coef": KL_COEF,
                "kl_loss_estimator": "k3",
                "clip_low": CLIP,
                "clip_high": CLIP,
                "loss_reduction": "token_mean",
                "seed": 0,
            },
            "generation": {
                "max_new_tokens": max(lengths),
                "temperature": 1.0,
                "stop_at_eos": False,
            },
            "reward": {"rules": [{"function": RULE, "kwargs": {"high": REWARD_BELOW}}]},
            "data": {"max_prompt_length": max(len(p) for p in prompts)},
        },
        PPORunConfig,
    )


def iteration_tokens(prompts: list[list[int]], lengths: list[int]) -> int:
    """Prompt + response tokens of every sample of one iteration."""
    return SAMPLES * sum(len(p) + n for p, n in zip(prompts, lengths))


def run_ours(args) -> dict:
    """hpc_rlhf's GRPO iterations (``PPOTrainer.iterate`` on the workload's prompts with its
    response lengths); per timed iteration: seconds and the stages' seconds."""
    from bench_systems import _BenchTokenizer, _FixedPrompts

    from hpc_rlhf.trainer.ppo import PPOTrainer
    from hpc_rlhf.trainer.run import Run, RunSettings

    prompts, lengths = workload(args.shape, args.prompts, args.quick)
    cfg = ours_config(args, prompts, lengths)
    run = Run(cfg, RunSettings.of(cfg.ppo), tokenizer=_BenchTokenizer())
    trainer = PPOTrainer(cfg, run.state, run.tokenizer, _FixedPrompts(prompts))
    want = [n for n in lengths for _ in range(SAMPLES)]
    stages: list[dict[str, float]] = []

    def iteration(i: int) -> float:
        it = trainer.iterate(prompts, max_new_tokens=lengths)
        made = [len(r) for r in it.rollout.response_ids]
        if made != want:
            raise RuntimeError(f"hpc_rlhf's response lengths {made} differ from {want}")
        stages.append(dict(it.stage_seconds))
        return it.metrics["reward_mean"]

    reward, seconds, warmup = timed_steps(iteration, args.steps)
    breakdown = {k: [s.get(k, 0.0) for s in stages[1:]] for k in stages[0] if k != "prompts"}
    breakdown["other"] = [t - sum(s.values()) for t, s in zip(seconds, stages[1:])]
    return {
        "iteration_seconds": seconds,
        "warmup_seconds": warmup,
        "warmup_reward": reward,
        "breakdown": breakdown,
        "tokens": iteration_tokens(prompts, lengths),
        "mean_length": sum(want) / len(want),
    }


def fraction_below(completion_ids, **_) -> list[float]:
    """TRL's reward function: hpc_rlhf's rule on each completion's sampled tokens (the
    forced EOS at the end left out)."""
    from hpc_rlhf.algorithms.rule_rewards import id_range_fraction

    return [
        id_range_fraction(None, ids[:-1] if ids[-1:] == [EOS_ID] else ids, high=REWARD_BELOW)
        for ids in completion_ids
    ]


def run_baseline(args) -> dict:
    """TRL's ``GRPOTrainer`` on the same checkpoint, prompts and lengths (``trl_grpo_peer``)."""
    from trl_grpo_peer import run_trl_grpo

    prompts, lengths = workload(args.shape, args.prompts, args.quick)
    out = run_trl_grpo(
        os.path.join(args.workdir, "actor"),
        prompts,
        lengths,
        args.steps + 1,
        fraction_below,
        OPTIMIZER,
        args.micro_batch,
        num_generations=SAMPLES,
        beta=KL_COEF,
        epsilon=CLIP,
        epsilon_high=CLIP,
        num_iterations=1,
        loss_type="dapo",
        scale_rewards="group",
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    )
    made = [n for step in out["completion_lengths"] for n in step]
    return {
        "iteration_seconds": out["step_seconds"][1:],
        "warmup_seconds": out["step_seconds"][0],
        "warmup_reward": out["logs"][0]["reward"],
        "breakdown": {k: v[1:] for k, v in out["breakdown"].items()},
        "tokens": iteration_tokens(prompts, lengths),
        "mean_length": sum(made) / len(made),
        "logged_mean_length": [log["completions/mean_length"] for log in out["logs"]],
        "versions": out["versions"],
    }


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _row(label: str, values, note: str = "") -> None:
    """One table row: ``label``, TRL's and hpc_rlhf's values (two strings), a note."""
    trl, ours = values
    print(f"{label:<32} {trl:>10} {ours:>10} {note}".rstrip())


def print_shape(shape: str, args, ours: dict, base: dict) -> str:
    """The comparison table of one shape, then where each system's time goes; returns its
    summary: hpc_rlhf's tokens/s and peak RSS against TRL's, each with its verdict."""
    speed_target, memory_target = TARGETS
    mean = {k: sum(r["iteration_seconds"]) / args.steps for k, r in (("trl", base), ("ours", ours))}
    speed = mean["trl"] / mean["ours"]
    mem = ours["peak_rss_gb"] / base["peak_rss_gb"]
    print(
        f"\n=== GRPO {shape}: {args.prompts} prompts x {SAMPLES} samples, {ours['tokens']} "
        f"prompt + response tokens per iteration (mean response {ours['mean_length']:.1f}) ==="
    )
    _row("", ("TRL", "hpc_rlhf"), "  ratio")
    _row("warm-up iteration s (untimed)", [f"{r['warmup_seconds']:.2f}" for r in (base, ours)])
    for name, report in (("TRL", base), ("hpc_rlhf", ours)):
        print(
            f"{f'timed iterations s, {name}':<32} "
            + " ".join(f"{s:.2f}" for s in report["iteration_seconds"])
        )
    seconds = (f"{mean[k]:.2f}" for k in ("trl", "ours"))
    _row("seconds per iteration (mean)", list(seconds), f"{speed:6.3f}x  (TRL / hpc_rlhf)")
    tokens = [f"{r['tokens'] / mean[k]:.0f}" for k, r in (("trl", base), ("ours", ours))]
    ok = _verdict(speed >= speed_target)
    _row("tokens/s", list(tokens), f"{speed:6.3f}x  (target >= {speed_target}x: {ok})")
    ok = _verdict(mem <= memory_target)
    memory = (f"{r['peak_rss_gb']:.3f}" for r in (base, ours))
    _row(
        "peak RSS GB",
        list(memory),
        f"{mem:6.3f}x  (hpc_rlhf / TRL; target <= {memory_target}: {ok})",
    )
    rates = (f"{r['matmul_gflops']:.0f}" for r in (base, ours))
    _row("fp32 matmul GF/s around run", list(rates), "  (torch.mm 1024^3 before and after)")
    rewards = (f"{r['warmup_reward']:.4f}" for r in (base, ours))
    _row("warm-up mean reward", list(rewards), "  (each system's own samples: roughly equal)")
    print("tokens/s: prompt + response tokens of every sample per second of iteration")
    logged = ", ".join(f"{x:.1f}" for x in base["logged_mean_length"])
    print(
        f"response lengths: both systems' responses had exactly the forced lengths in every "
        f"iteration (mean {ours['mean_length']:.1f}; TRL's logged completions/mean_length {logged})"
    )
    for name, report in (("TRL", base), ("hpc_rlhf", ours)):
        parts = ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in report["breakdown"].items())
        print(f"where the time goes, {name} (s per iteration): {parts}")
    return (
        f"{shape} {speed:.3f}x TRL's tokens/s ({_verdict(speed >= speed_target)}), "
        f"{mem:.3f}x its peak RSS ({_verdict(mem <= memory_target)})"
    )


def child_main(args) -> None:
    """Inside a system's subprocess: run it and write its report."""
    import json

    report = run_ours(args) if args.system == "ours" else run_baseline(args)
    report["peak_rss_gb"] = peak_rss_gb()
    with open(args.out, "w") as fh:
        json.dump(report, fh)


def print_header(args) -> None:
    """The CPU, its measured matmul rates, the processes' environment and the workload."""
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"CPU: {cpu_model()}, {threads} cores, OMP_NUM_THREADS={threads} each")
    print(
        f"matmul now: torch.mm 1024^3 on {threads} threads, best of 5: fp32 "
        f"{matmul_gflops():.0f} GFLOP/s, bf16 {matmul_gflops(dtype=torch.bfloat16):.0f} GFLOP/s "
        "(both systems run fp32)"
    )
    print(environment_line())
    print(
        f"GRPO: {args.prompts} prompts x {SAMPLES} samples per iteration, one optimizer step in "
        f"micro-batches of {args.micro_batch}, {args.steps} timed iterations after 1 warm-up"
        + (" (--quick: lengths / 8)" if args.quick else "")
    )


def main() -> None:
    args = parse_args()
    if args.system:
        child_main(args)
        return
    print_header(args)
    shapes = ["varied", "fixed"] if args.shape == "both" else [args.shape]
    argv = ["--prompts", str(args.prompts), "--micro-batch", str(args.micro_batch)]
    argv += ["--steps", str(args.steps)] + (["--quick"] if args.quick else [])
    order = ("baseline", "ours") if args.baseline_first else ("ours", "baseline")
    script, lines = os.path.abspath(__file__), []
    with tempfile.TemporaryDirectory() as workdir:
        write_checkpoints(workdir)
        for shape in shapes:
            reports = {
                system: run_bench_child(script, system, [*argv, "--shape", shape], workdir)
                for system in order
            }
            lines.append(print_shape(shape, args, reports["ours"], reports["baseline"]))
    versions = reports["baseline"]["versions"]
    print("TRL side: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    targets = f"targets >= {TARGETS[0]}x tokens/s, <= {TARGETS[1]}x peak RSS"
    print(f"\nsummary ({targets}): " + "; ".join(lines))


if __name__ == "__main__":
    main()
