"""Supervised fine-tuning two ways, in one run: hpc_rlhf vs an HF-style training loop.

Same random weights (Llama-style, 4 layers, hidden 512, vocab 32000, fp32), the same
seeded conversations (a prompt of 32-256 tokens, a response of 16-256 ending with EOS; the
loss on the response tokens only), the same conversations per optimizer step, AdamW with
the same hyper-parameters and gradient clipping, loss the mean next-token cross entropy
over the step's response tokens:

* **baseline** (the ``transformers`` way, as HF's ``Trainer`` and Safe-RLHF's SFT trainer
  run it): ``LlamaForCausalLM`` on one right-padded batch per step, labels ``-100`` on
  prompt and padding, the model's own loss (the full-vocabulary logits of every position,
  cross entropy over all of them with the ignored ones masked), one forward and backward,
  ``torch.optim.AdamW``;
* **hpc_rlhf**: the SFT stage's training step (``TrainableModel`` with role ``actor``,
  ``train.pack_sequences``, the LM head only on loss positions, fused log-probs) on
  micro-batches from ``data.sft.collate``, gradient accumulation over the step's
  micro-batches, the loss of ``hpc-rlhf sft``.

Each system runs in its own subprocess (peak RSS is its own). Step 0 is a warm-up (not
timed; both systems' losses on it are printed: same weights and samples, so they must
agree); the next ``--steps`` steps are timed. Tokens/s counts real tokens (prompt +
response of every conversation, no padding) per second of training step (collation
included).

    python tools/bench_sft.py            # 8 conversations per step, 4 timed steps
    python tools/bench_sft.py --quick    # 4 per step, lengths / 8, 2 timed steps
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
    sft_workload,
    step_items,
    supervised_args,
    supervised_main,
    supervised_report,
)

TARGETS = (2.5, 0.5)  # tokens/s at least 2.5x the baseline's, peak memory at most 1/2


def parse_args():
    return supervised_args(__doc__.split("\n")[0], "--batch", "conversations")


def step_samples(args, step: int):
    """The conversations of step ``step`` (seeded, shared by both systems)."""
    return step_items(args, sft_workload, step)


def run_ours(args) -> dict:
    """hpc_rlhf's SFT step: set up as ``hpc-rlhf sft`` does (``Run``, the trained model
    from the HF checkpoint, the LM loss), stepped on collated micro-batches."""
    from hpc_rlhf.config import SFTRunConfig
    from hpc_rlhf.data.sft import Sample, collate
    from hpc_rlhf.trainer.losses import lm_loss_fn

    _, run, model = ours_model(args, SFTRunConfig, "actor")
    mb = args.micro_batch

    def microbatches(i: int) -> list:
        samples = [
            Sample(p + r, [False] * len(p) + [True] * len(r), "bench")
            for p, r in step_samples(args, i)
        ]
        return [collate(samples[j : j + mb], PAD_ID) for j in range(0, len(samples), mb)]

    positions: list[int] = []
    step = ours_step(model, lm_loss_fn(run.state.tp_group), microbatches, positions)
    return _report(args, step, positions)


def run_baseline(args) -> dict:
    """The HF-style SFT step on ``LlamaForCausalLM`` with the same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(
        os.path.join(args.workdir, "actor"), attn_implementation="sdpa"
    ).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = baseline_adamw(params)
    positions = []

    def step(i: int) -> float:
        convs = step_samples(args, i)
        B, S = len(convs), max(len(p) + len(r) for p, r in convs)
        ids_BS = torch.full((B, S), PAD_ID, dtype=torch.long)
        mask_BS = torch.zeros(B, S, dtype=torch.long)
        labels_BS = torch.full((B, S), -100, dtype=torch.long)
        for b, (p, r) in enumerate(convs):
            ids_BS[b, : len(p) + len(r)] = torch.tensor(p + r)
            mask_BS[b, : len(p) + len(r)] = 1
            labels_BS[b, len(p) : len(p) + len(r)] = torch.tensor(r)
        positions.append(B * S)
        loss = model(input_ids=ids_BS, attention_mask=mask_BS, labels=labels_BS).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, OPTIMIZER["clip_grad"])
        optimizer.step()
        return float(loss.detach())

    return _report(args, step, positions)


def _report(args, step, positions: list[int]) -> dict:
    """The timed steps' report; real tokens: prompt + response of every sequence."""
    return supervised_report(
        args, step, positions, lambda i: sum(len(p) + len(r) for p, r in step_samples(args, i))
    )


def main() -> None:
    args = parse_args()
    script = os.path.abspath(__file__)
    what = f"SFT: {args.batch} conversations"
    supervised_main(
        args, script, "SFT: hpc_rlhf vs HF-style loop", what, TARGETS, run_ours, run_baseline
    )


if __name__ == "__main__":
    main()
