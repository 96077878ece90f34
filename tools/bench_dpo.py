"""DPO training two ways, in one run: hpc_rlhf vs TRL's own ``DPOTrainer``.

Same random weights (Llama-style, 4 layers, hidden 512, vocab 32000, fp32, saved as an HF
checkpoint; the frozen reference is a second copy of them), the same seeded pairs (prompts
of 32-256 tokens, each response 16-256), the same pairs per optimizer step in the same
order and micro-batches, beta 0.1, AdamW with the same hyper-parameters and gradient
clipping at a constant learning rate, the sigmoid DPO loss averaged over the step's pairs:

* **TRL** (``tools/trl_dpo_peer.py``): ``trl.DPOTrainer`` 1.16 itself (installed by
  ``tools/install_trl.sh`` into ``tools/.peer-packages``), fed the token ids; per
  micro-batch a reference forward and a policy forward and backward on the chosen and
  rejected rows padded to the longest, gradient accumulation, ``torch`` fused AdamW;
* **hpc_rlhf**: the ``hpc-rlhf dpo`` step (``Run``, the policy as ``TrainableModel``, the
  frozen reference's pass per step, ``trainer.losses.preference_loss_fn``) on micro-batches
  from ``data.preference.collate_policy_preferences`` (both responses of a pair packed in
  one micro-batch, the LM head on response positions only).

Each system runs in its own subprocess (peak RSS is its own). Step 0 is a warm-up (not
timed; both losses on it are printed: same weights and pairs, so they must agree to 1e-4);
the next ``--steps`` steps are timed, including the reference pass, collation and (TRL) the
data loader's fetch. Tokens/s counts real tokens (prompt + response of every sequence) per
second of training step. Where each system's time goes is printed after the table.

    tools/install_trl.sh                # once: TRL into tools/.peer-packages
    python tools/bench_dpo.py           # 8 pairs per step, micro-batches of 4, 4 timed steps
    python tools/bench_dpo.py --quick   # 4 pairs per step, lengths / 8, 2 timed steps
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_common import (  # noqa: E402
    OPTIMIZER,
    PAD_ID,
    ours_model,
    preference_workload,
    step_items,
    supervised_args,
    supervised_main,
    supervised_report,
)

TARGETS = (3.0, 0.5)  # tokens/s at least 3x TRL's, peak memory at most 1/2
BETA = 0.1


def step_samples(args, step: int):
    """The pairs of step ``step`` (seeded, shared by both systems)."""
    return step_items(args, preference_workload, step)


def _real_tokens(args, step: int) -> int:
    return sum(2 * len(p) + len(c) + len(r) for p, c, r in step_samples(args, step))


def run_ours(args) -> dict:
    """hpc_rlhf's DPO step: set up as ``hpc-rlhf dpo`` does, the reference's log-probs of
    the step's micro-batches, then the policy's ``train_step``."""
    from hpc_rlhf.algorithms.preference import PreferenceParams
    from hpc_rlhf.config import DPORunConfig
    from hpc_rlhf.data.preference import PreferenceSample, collate_policy_preferences
    from hpc_rlhf.trainer.losses import preference_loss_fn
    from hpc_rlhf.trainer.reference import ReferencePass, frozen_reference
    from hpc_rlhf.trainer.sft import initial_state

    cfg, run, model = ours_model(args, DPORunConfig, "actor")
    reference_pass = ReferencePass(frozen_reference(cfg, run, initial_state(cfg)))
    loss_fn = preference_loss_fn("sigmoid", PreferenceParams(beta=BETA), run.state.tp_group)
    mb, positions, logs = args.micro_batch, [], []
    phases: dict[str, list[float]] = {"reference": [], "train": []}

    def step(i: int) -> float:
        samples = [
            PreferenceSample([p + c, p + r], [(0, 1, 0.0)], "bench", response_starts=[len(p)] * 2)
            for p, c, r in step_samples(args, i)
        ]
        batches = [
            collate_policy_preferences(samples[j : j + mb], PAD_ID)
            for j in range(0, len(samples), mb)
        ]
        t0 = time.perf_counter()
        reference_pass(batches)
        t1 = time.perf_counter()
        before = model.work["train_tokens"]
        metrics = model.train_step(batches, loss_fn).metrics
        logs.append(metrics)
        loss = metrics["loss"]
        phases["reference"].append(t1 - t0)
        phases["train"].append(time.perf_counter() - t1)
        positions.append(model.work["train_tokens"] - before)
        return loss

    report = supervised_report(args, step, positions, lambda i: _real_tokens(args, i))
    report["breakdown"] = {k: v[1 : args.steps + 1] for k, v in phases.items()}
    report["checks"] = _checks(logs)
    return report


def _checks(logs: list[dict]) -> dict:
    """What must agree between the systems beyond step 0's loss (log 2 whatever the
    weights, as the policy starts as the reference): step 0's summed log-probs and the
    loss of step 1, after one update."""
    return {
        "step 0 logps/chosen": logs[0]["logps/chosen"],
        "step 0 logps/rejected": logs[0]["logps/rejected"],
        "step 1 loss (after one update)": logs[1]["loss"],
        "step 1 rewards/margins": logs[1]["rewards/margins"],
    }


def _trl_positions(pairs: list, micro_batch: int) -> int:
    """Token positions TRL runs for these pairs: per micro-batch, the chosen and rejected
    rows padded to the longest of them."""
    total = 0
    for j in range(0, len(pairs), micro_batch):
        chunk = pairs[j : j + micro_batch]
        longest = max(len(p) + max(len(c), len(r)) for p, c, r in chunk)
        total += 2 * len(chunk) * longest
    return total


def run_baseline(args) -> dict:
    """TRL's ``DPOTrainer`` on the same checkpoint and pairs (``trl_dpo_peer``)."""
    from trl_dpo_peer import run_trl_dpo

    steps = [step_samples(args, i) for i in range(args.steps + 1)]
    out = run_trl_dpo(os.path.join(args.workdir, "actor"), steps, BETA, OPTIMIZER, args.micro_batch)
    fetch = out["breakdown"]["data_and_logging"]
    seconds = [s + f for s, f in zip(out["step_seconds"], fetch)]  # as ours: batches included
    breakdown = {k: v[1:] for k, v in out["breakdown"].items()}
    return {
        "first_loss": out["losses"][0],
        "warmup_seconds": seconds[0],
        "step_seconds": seconds[1:],
        "real_tokens": [_real_tokens(args, i) for i in range(1, args.steps + 1)],
        "positions": [_trl_positions(s, args.micro_batch) for s in steps[1:]],
        "breakdown": breakdown,
        "checks": _checks(out["logs"]),
        "versions": out["versions"],
    }


def print_breakdown(reports: dict) -> None:
    """The agreement checks (relative differences) and the mean seconds per timed step of
    each system's phases."""
    ours, base = reports["ours"]["checks"], reports["baseline"]["checks"]
    for name, theirs in base.items():
        diff = abs(ours[name] - theirs)
        rel = diff / max(abs(theirs), 1e-12)
        verdict = "agree" if rel <= 1e-4 or diff <= 1e-5 else "DIFFER"  # near 0: absolute
        print(
            f"{name}: TRL {theirs:.6f}, hpc_rlhf {ours[name]:.6f} (difference {diff:.1e}, "
            f"relative {rel:.1e}: {verdict})"
        )
    for name, report in (("TRL", reports["baseline"]), ("hpc_rlhf", reports["ours"])):
        parts = ", ".join(
            f"{phase} {sum(v) / max(len(v), 1):.2f}" for phase, v in report["breakdown"].items()
        )
        print(f"where the time goes, {name} (s per step): {parts}")
    versions = reports["baseline"].get("versions", {})
    print("TRL side: " + ", ".join(f"{k} {v}" for k, v in versions.items()))


def main() -> None:
    args = parse_args()
    script = os.path.abspath(__file__)
    reports = supervised_main(
        args,
        script,
        "DPO: hpc_rlhf vs TRL DPOTrainer (baseline column: TRL)",
        f"DPO: {args.batch} pairs",
        TARGETS,
        run_ours,
        run_baseline,
    )
    if reports:
        print_breakdown(reports)


def parse_args():
    return supervised_args(__doc__.split("\n")[0], "--pairs", "pairs")


if __name__ == "__main__":
    main()
