"""Reward-model training two ways, in one run: hpc_rlhf vs a Safe-RLHF-style trainer.

Same random weights (Llama-style, 4 layers, hidden 512, vocab 32000, fp32, a linear score
head), the same seeded preference pairs (prompts of 32-256 tokens, each response 16-256),
the same pairs per optimizer step, AdamW with the same hyper-parameters and gradient
clipping, loss ``-log sigmoid(r_chosen - r_rejected)`` averaged over the step's pairs:

* **baseline** (Safe-RLHF's ``RewardTrainer`` design): a ``transformers`` Llama decoder with
  a per-token linear score head (Safe-RLHF's ``ScoreModel``), chosen and rejected
  concatenated into one right-padded batch of 2B rows, the end score read at each row's
  last real token, one full forward and backward per step, ``torch.optim.AdamW``;
* **hpc_rlhf**: the reward-model stage's training step (``TrainableModel`` with role
  ``reward``, ``output_positions="last_token"``, ``train.pack_sequences``) on micro-batches
  from ``data.preference.collate_preferences`` (both responses of a sample in one
  micro-batch), gradient accumulation over the step's micro-batches, the ranking loss of
  ``hpc-rlhf rm``.

Each system runs in its own subprocess (peak RSS is its own). Step 0 is a warm-up (not
timed; both systems' losses on it are printed: same weights and samples, so they must
agree); the next ``--steps`` steps are timed. Tokens/s counts real tokens (prompt +
response of every sequence, no padding) per second of training step (collation included).

    python tools/bench_rm.py            # 8 pairs per step, 4 timed steps
    python tools/bench_rm.py --quick    # 4 pairs per step, lengths / 8, 2 timed steps
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_common import (  # noqa: E402
    OPTIMIZER,
    PAD_ID,
    baseline_adamw,
    ours_model,
    ours_step,
    preference_workload,
    step_items,
    supervised_args,
    supervised_main,
    supervised_report,
)

TARGETS = (3.0, 0.5)  # tokens/s at least 3x the baseline's, peak memory at most 1/2


def parse_args():
    return supervised_args(__doc__.split("\n")[0], "--pairs", "pairs")


def step_samples(args, step: int):
    """The pairs of step ``step`` (seeded, shared by both systems)."""
    return step_items(args, preference_workload, step)


def run_ours(args) -> dict:
    """hpc_rlhf's reward-model step: set up as ``hpc-rlhf rm`` does (``Run``, the trained
    model from the HF checkpoint, the ranking loss), stepped on collated micro-batches."""
    from hpc_rlhf.config import RMRunConfig
    from hpc_rlhf.data.preference import PreferenceSample, collate_preferences
    from hpc_rlhf.trainer.losses import ranking_loss_fn

    cfg, _, model = ours_model(args, RMRunConfig, "reward", role="reward")
    mb = args.micro_batch

    def microbatches(i: int) -> list:
        samples = [
            PreferenceSample([p + c, p + r], [(0, 1, 0.0)], "bench")
            for p, c, r in step_samples(args, i)
        ]
        return [
            collate_preferences(samples[j : j + mb], PAD_ID) for j in range(0, len(samples), mb)
        ]

    positions: list[int] = []
    loss_fn = ranking_loss_fn(cfg.rm.regularization, cfg.rm.objective)
    return _report(args, ours_step(model, loss_fn, microbatches, positions), positions)


def run_baseline(args) -> dict:
    """Safe-RLHF's reward-model step on a ``transformers`` model with the same weights."""
    import torch.nn.functional as F
    from ppo_baseline import ScoreModel
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    hf = LlamaForSequenceClassification.from_pretrained(
        os.path.join(args.workdir, "reward"), attn_implementation="sdpa"
    )
    model = ScoreModel(hf.model, hf.score.weight.detach()).train()
    del hf
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = baseline_adamw(params)
    positions = []

    def step(i: int) -> float:
        pairs = step_samples(args, i)
        rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]  # 2B rows
        B2, S = len(rows), max(len(r) for r in rows)
        ids_BS = torch.full((B2, S), PAD_ID, dtype=torch.long)
        mask_BS = torch.zeros(B2, S, dtype=torch.long)
        for b, row in enumerate(rows):
            ids_BS[b, : len(row)] = torch.tensor(row)
            mask_BS[b, : len(row)] = 1
        positions.append(B2 * S)
        scores_BS = model(ids_BS, mask_BS)
        last_B = mask_BS.sum(1) - 1
        end_B = scores_BS.gather(1, last_B[:, None]).squeeze(1)
        higher, lower = end_B.chunk(2)
        loss = -F.logsigmoid(higher - lower).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, OPTIMIZER["clip_grad"])
        optimizer.step()
        return float(loss.detach())

    return _report(args, step, positions)


def _report(args, step, positions: list[int]) -> dict:
    """The timed steps' report; real tokens: prompt + response of every sequence."""
    return supervised_report(
        args,
        step,
        positions,
        lambda i: sum(2 * len(p) + len(c) + len(r) for p, c, r in step_samples(args, i)),
    )


def main() -> None:
    args = parse_args()
    script = os.path.abspath(__file__)
    what = f"reward model: {args.batch} pairs"
    supervised_main(
        args,
        script,
        "reward model: hpc_rlhf vs Safe-RLHF-style",
        what,
        TARGETS,
        run_ours,
        run_baseline,
    )


if __name__ == "__main__":
    main()
