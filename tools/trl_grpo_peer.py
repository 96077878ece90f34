"""TRL's own ``GRPOTrainer`` as the peer of the GRPO benchmark (``tools/bench_grpo.py``).

``run_trl_grpo`` trains an HF Llama checkpoint with TRL's real ``trl.GRPOTrainer`` (installed by
``tools/install_trl.sh`` into ``tools/.peer-packages``, outside the venv) for a number of
optimizer steps, each one generation batch: every prompt sampled ``num_generations`` times with
plain transformers ``generate`` (TRL's default path: no vLLM, no continuous batching), scored by
a Python reward function, the frozen reference's log-probs, then one PPO-clip update. It returns
the wall time of each step, where that time goes, TRL's logged metrics of each step, the
completion lengths TRL produced and the process's peak RSS.

Token ids in, without touching TRL's data path: each prompt is the text of its token ids under
a word-level stand-in tokenizer whose token ``<i>`` is id ``i`` (split on spaces), so TRL's own
``_tokenize_prompts`` turns the text back into exactly those ids; nothing of the trainer is
overridden but its telemetry.

Forced response lengths: each prompt's samples must end at a given length (the benchmark
replays a length distribution). ``model.generate`` gets one extra transformers logits processor
(``_ForcedLengths``, passed by a thin wrapper around the policy's ``generate``, which also times
it): EOS is forbidden before a row's target length and forced at it, so the completion TRL keeps
(up to and including the first EOS) has exactly the target length. The wrapper checks the
lengths of every generated row against the targets.

Self-check (not a test)::

    PYTHONPATH=tools/.peer-packages .venv/bin/python tools/trl_grpo_peer.py
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trl_dpo_peer import (  # noqa: E402  (importing it puts tools/.peer-packages on the path)
    _import_trl,
    _StepClock,
    _token_id_tokenizer,
    _write_tiny_llama,
)


def prompt_text(ids: list[int]) -> str:
    """The text of ``ids`` under the stand-in tokenizer (``"<17> <4021> ..."``)."""
    return " ".join(f"<{i}>" for i in ids)


def _grpo_tokenizer(config):
    """The word-level stand-in tokenizer (``trl_dpo_peer``) splitting text on spaces, so that
    TRL's own prompt tokenization maps ``prompt_text(ids)`` back to ``ids``."""
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tokenizer = _token_id_tokenizer(config)
    tokenizer.backend_tokenizer.pre_tokenizer = WhitespaceSplit()
    return tokenizer


def _forced_lengths(eos_id: int, targets: dict[tuple[int, ...], int]):
    """A transformers ``LogitsProcessor``: each row's completion ends with EOS exactly at the
    target length of its prompt (``targets``, keyed by the prompt's token ids)."""
    import torch
    from transformers import LogitsProcessor

    class _ForcedLengths(LogitsProcessor):
        def begin(self, input_ids, attention_mask) -> None:
            """Rows' targets from the left-padded prompts ``generate`` is about to extend."""
            self.start = input_ids.shape[1]
            self.rows = torch.tensor(
                [
                    targets[tuple(ids[m.bool()].tolist())]
                    for ids, m in zip(input_ids, attention_mask)
                ]
            )

        def __call__(self, input_ids, scores):
            made = input_ids.shape[1] - self.start  # tokens generated so far in every row
            early, last = self.rows > made + 1, self.rows == made + 1
            scores[early, eos_id] = -float("inf")
            scores[last] = -float("inf")
            scores[last, eos_id] = 0.0
            return scores

        def lengths(self, sequences) -> list[int]:
            """Each row's completion length up to and including its first EOS."""
            new = sequences[:, self.start :] == eos_id
            first = torch.where(new.any(dim=1), new.int().argmax(dim=1) + 1, new.shape[1])
            return first.tolist()

    return _ForcedLengths()


class _IterationClock(_StepClock):
    """``trl_dpo_peer._StepClock`` plus a ``generate`` phase (the policy's forwards inside
    ``generate`` count there, not in ``policy_forward``)."""

    IN_STEP = ("generate", *_StepClock.IN_STEP)

    def __init__(self) -> None:
        super().__init__()
        self.generating = False

    def add(self, phase: str, since: str) -> None:
        if not (self.generating and phase == "policy_forward"):
            super().add(phase, since)


def _wrap_generate(model, clock: _IterationClock, forcer, lengths: list[list[int]]) -> None:
    """Make ``model.generate`` (what TRL's generation calls) force the lengths, time itself
    and record each row's completion length (one list per call in ``lengths``)."""
    from transformers import LogitsProcessorList

    generate = model.generate

    def forced_generate(**kwargs):
        forcer.begin(kwargs["input_ids"], kwargs["attention_mask"])
        clock.generating = True
        clock.mark("generate")
        try:
            out = generate(**kwargs, logits_processor=LogitsProcessorList([forcer]))
        finally:
            clock.generating = False
        clock.add("generate", since="generate")
        made = forcer.lengths(out)
        if made != forcer.rows.tolist():
            raise RuntimeError(f"completion lengths {made} differ from the targets")
        lengths.append(made)
        return out

    model.generate = forced_generate


def _grpo_config(out_dir: str, optimizer: dict, n_rows: int, micro_batch: int, **grpo):
    """TRL's ``GRPOConfig``: fp32 on the CPU, no gradient checkpointing, AdamW with
    ``optimizer``'s hyper-parameters at a constant learning rate, one optimizer step per
    generation batch of ``n_rows`` completions in micro-batches of ``micro_batch`` (gradient
    accumulation over the rest), prompts in dataset order, logging every step, no saving or
    eval. ``grpo``: the GRPO settings (``num_generations``, ``beta``, ``loss_type``, ...)."""
    from trl import GRPOConfig

    if n_rows % micro_batch:
        raise ValueError(f"{n_rows} completions per step is not a multiple of {micro_batch}")
    hyper = {
        "learning_rate": "lr",
        "weight_decay": "weight_decay",
        "adam_beta1": "adam_beta1",
        "adam_beta2": "adam_beta2",
        "adam_epsilon": "adam_eps",
        "max_grad_norm": "clip_grad",
    }
    return GRPOConfig(
        output_dir=out_dir,
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16
        gradient_checkpointing=False,  # TRL defaults to True
        model_init_kwargs={"dtype": "float32"},
        lr_scheduler_type="constant",
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=n_rows // micro_batch,  # = steps_per_generation
        shuffle_dataset=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
        **{key: optimizer[ours] for key, ours in hyper.items()},
        **grpo,
    )


def run_trl_grpo(
    model_dir: str,
    prompts: list[list[int]],
    lengths: list[int],
    n_steps: int,
    reward_fn: Callable,
    optimizer: dict,
    micro_batch: int,
    **grpo,
) -> dict:
    """Run ``n_steps`` GRPO iterations of TRL's ``GRPOTrainer`` on ``model_dir`` (an HF Llama
    checkpoint, fp32; the reference is TRL's second copy of it), every iteration on all
    ``prompts`` (token ids, in order), each sampled ``grpo["num_generations"]`` times with
    completions of exactly ``lengths[i]`` tokens (the last one EOS), scored by ``reward_fn``
    (a TRL reward function). ``optimizer``: ``bench_common.OPTIMIZER``. ``grpo``: further
    ``GRPOConfig`` fields (``num_generations``, ``beta``, ``epsilon``, ``loss_type``, ...).

    Returns ``step_seconds`` (each optimizer step's wall time, the data loader's fetch
    before it included), ``breakdown`` (per-step seconds of ``_IterationClock``'s phases),
    ``logs`` (TRL's log of each step: ``reward``, ``kl``, ``completions/mean_length``, ...),
    ``completion_lengths`` (each step's generated rows' lengths), ``peak_rss_gb`` (this
    process, model loading included: run it in a fresh process) and ``versions``."""
    trl = _import_trl()
    import resource

    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoConfig, PrinterCallback

    if len(set(map(tuple, prompts))) != len(prompts) or len(lengths) != len(prompts):
        raise ValueError("give distinct prompts, one length each")
    tokenizer = _grpo_tokenizer(AutoConfig.from_pretrained(model_dir))
    forcer = _forced_lengths(tokenizer.eos_token_id, dict(zip(map(tuple, prompts), lengths)))
    clock = _IterationClock()
    made: list = []
    n_rows = len(prompts) * grpo.get("num_generations", 8)
    with tempfile.TemporaryDirectory(prefix="trl_grpo_peer_") as out_dir:
        trainer = trl.GRPOTrainer(
            model=model_dir,
            reward_funcs=reward_fn,
            args=_grpo_config(
                out_dir,
                optimizer,
                n_rows,
                micro_batch,
                max_completion_length=max(lengths),
                max_steps=n_steps,
                **grpo,
            ),
            train_dataset=Dataset.from_dict({"prompt": [prompt_text(p) for p in prompts]}),
            processing_class=tokenizer,
            callbacks=[clock.callback()],
        )
        trainer.remove_callback(PrinterCallback)  # no log lines on stdout (tqdm is off)
        clock.attach(trainer)
        _wrap_generate(trainer.model, clock, forcer, made)
        trainer.train()
    if len(clock.logs) != n_steps or len(made) != n_steps:
        raise RuntimeError(f"TRL ran {len(clock.logs)} steps, {len(made)} generations")
    fetch = clock.phases.pop("data_and_logging")
    return {
        "step_seconds": [s + f for s, f in zip(clock.step_seconds, fetch)],
        "breakdown": {"data_fetch": fetch, **clock.phases},
        "logs": clock.logs,
        "completion_lengths": made,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }


# ----------------------------------------------------------------------------- self-check


def _fraction_below(completion_ids, **_) -> list[float]:
    """A toy reward: the fraction of completion tokens below id 128."""
    return [sum(t < 128 for t in ids) / len(ids) for ids in completion_ids]


def _self_check() -> bool:
    """Two steps of 3 prompts x 4 samples (micro-batches of 4) on a tiny random Llama: the
    completions have the forced lengths, TRL logs their mean, the KL of step 0 is 0 (the
    policy is the reference) and every logged loss is finite."""
    import math
    import random

    from bench_common import OPTIMIZER

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (3, 9, 6)]
    lengths = [5, 1, 12]
    with tempfile.TemporaryDirectory(prefix="trl_grpo_peer_check_") as model_dir:
        _write_tiny_llama(model_dir)
        out = run_trl_grpo(
            model_dir,
            prompts,
            lengths,
            2,
            _fraction_below,
            OPTIMIZER,
            4,
            num_generations=4,
            beta=0.04,
        )
    want = sum(lengths) / len(lengths)
    checks = [
        (
            "forced lengths",
            all(sorted(m) == sorted(lengths * 4) for m in out["completion_lengths"]),
        ),
        (
            "logged mean length",
            all(abs(g["completions/mean_length"] - want) < 1e-6 for g in out["logs"]),
        ),
        ("step-0 KL is 0", abs(out["logs"][0]["kl"]) < 1e-6),
        ("finite losses", all(math.isfinite(g["loss"]) for g in out["logs"])),
    ]
    for name, good in checks:
        print(f"{'PASS' if good else 'FAIL'} {name}")
    print(
        f"TRL {out['versions']['trl']}: step seconds {[round(s, 3) for s in out['step_seconds']]}"
    )
    for phase, seconds in out["breakdown"].items():
        print(f"  {phase}: {[round(s, 4) for s in seconds]}")
    return all(good for _, good in checks)


if __name__ == "__main__":
    sys.exit(0 if _self_check() else 1)
