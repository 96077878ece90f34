"""TRL's own ``DPOTrainer`` as the peer of the DPO benchmark (``tools/bench_dpo.py``).

``run_trl_dpo`` trains an HF Llama checkpoint with TRL's real ``trl.DPOTrainer`` (installed by
``tools/install_trl.sh`` into ``tools/.peer-packages``, outside the venv) on given, already
tokenized preference pairs, one list of pairs per optimizer step, and returns TRL's logged loss
of each step, the wall time of each step, the process's peak RSS and where the time goes.

Pre-tokenized input: TRL 1.16's ``DPOTrainer`` has no public way to take token ids (its
maintainers declined one, trl#2368); its ``_prepare_dataset`` always extracts, EOS-terminates
and tokenizes text columns into ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``, the columns
its ``DataCollatorForPreference`` and its loss then consume. ``_TokenIdsDPOTrainer`` overrides
only that preparation step to hand TRL a dataset that already has those three columns, so
everything after it (collator, reference and policy forwards, loss, metrics, optimizer) is
TRL's own code. The tokenizer TRL requires is a word-level stand-in over the model's vocabulary
that supplies the pad token id (padding is masked out of the loss) and never tokenizes.

Self-check (not a test)::

    PYTHONPATH=tools/.peer-packages .venv/bin/python tools/trl_dpo_peer.py
"""

from __future__ import annotations

import importlib.util
import math
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PEER_PACKAGES = Path(__file__).resolve().parent / ".peer-packages"

Pair = tuple[list[int], list[int], list[int]]  # (prompt_ids, chosen_ids, rejected_ids)


def _use_peer_packages() -> None:
    """Make ``tools/.peer-packages`` (``tools/install_trl.sh``) importable when ``trl`` is not
    already, after the venv's own packages so it shadows none of them; work offline, with
    Hugging Face's telemetry off. Run when this module is imported: transformers decides once,
    when first imported, whether accelerate is there, so import this module before
    transformers (or set ``PYTHONPATH=tools/.peer-packages``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if importlib.util.find_spec("trl") is None and str(PEER_PACKAGES) not in sys.path:
        sys.path.append(str(PEER_PACKAGES))


_use_peer_packages()


def _import_trl():
    """``trl``, or an error saying how to install it."""
    try:
        import trl
    except ImportError as err:
        raise ImportError(f"trl not found: run tools/install_trl.sh ({err})") from err
    return trl


def _token_id_tokenizer(config):
    """A word-level tokenizer whose token ``<i>`` is id ``i`` over the model's vocabulary:
    ``DPOTrainer`` needs a tokenizer for its pad (and EOS) token id; it never tokenizes here."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(config.vocab_size)}
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else 2
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    bos = config.bos_token_id if config.bos_token_id is not None else 1
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token=f"<{pad}>")),
        pad_token=f"<{pad}>",
        eos_token=f"<{eos}>",
        bos_token=f"<{bos}>",
    )


def _pairs_dataset(steps_pairs: list[list[Pair]], micro_batch: int):
    """The pairs of all steps, in order, as a ``datasets.Dataset`` with TRL's tokenized
    columns; checks that every step has the same number of pairs, a multiple of
    ``micro_batch`` (TRL's loss is a mean of micro-batch means: equal micro-batches make it
    the mean over the step's pairs). Returns (dataset, gradient accumulation steps)."""
    from datasets import Dataset

    n_pairs = len(steps_pairs[0]) if steps_pairs else 0
    if not n_pairs or n_pairs % micro_batch or any(len(p) != n_pairs for p in steps_pairs):
        raise ValueError(f"each step needs the same number of pairs, a multiple of {micro_batch}")
    columns: dict[str, list[list[int]]] = defaultdict(list)
    for pairs in steps_pairs:
        for prompt, chosen, rejected in pairs:
            if not prompt or not chosen or not rejected:
                raise ValueError("empty prompt, chosen or rejected token ids")
            columns["prompt_ids"].append(list(prompt))
            columns["chosen_ids"].append(list(chosen))
            columns["rejected_ids"].append(list(rejected))
    return Dataset.from_dict(dict(columns)), n_pairs // micro_batch


def _dpo_config(out_dir: str, optimizer: dict, micro_batch: int, accum: int, n_steps: int, **dpo):
    """TRL's ``DPOConfig``: fp32 on the CPU, AdamW with ``optimizer``'s hyper-parameters at a
    constant learning rate, ``n_steps`` steps of ``micro_batch`` x ``accum`` pairs taken in
    order, no truncation, no gradient checkpointing, logging every step, no saving or eval.
    ``dpo``: ``beta`` and ``loss_type``."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=out_dir,
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16
        fp16=False,
        gradient_checkpointing=False,  # TRL defaults to True
        model_init_kwargs={"dtype": "float32"},
        learning_rate=optimizer["lr"],
        weight_decay=optimizer["weight_decay"],
        adam_beta1=optimizer["adam_beta1"],
        adam_beta2=optimizer["adam_beta2"],
        adam_epsilon=optimizer["adam_eps"],
        max_grad_norm=optimizer["clip_grad"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accum,
        max_steps=n_steps,
        train_sampling_strategy="sequential",
        max_length=None,
        precompute_ref_log_probs=False,
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=True,  # keeps TRL's signature columns: the three id lists
        seed=0,
        data_seed=0,
        **dpo,
    )


def _trainer_class():
    """``DPOTrainer`` taking pre-tokenized pairs (see the module docstring), without telemetry."""
    from trl import DPOTrainer

    class _TokenIdsDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            missing = {"prompt_ids", "chosen_ids", "rejected_ids"} - set(dataset.column_names)
            if missing:
                raise ValueError(f"{dataset_name} dataset lacks the columns {sorted(missing)}")
            return dataset

        def _send_telemetry(self):
            pass

    return _TokenIdsDPOTrainer


class _StepClock:
    """Wall times of each optimizer step and of its phases, fed by a ``TrainerCallback``
    (``callback``), forward hooks on the policy and reference models and a timed
    ``accelerator.backward`` (``attach``). Per step: ``ref_forward`` and ``policy_forward``
    (TRL's fused LM head, log-prob and metric outputs included), ``backward``, ``clip_grad``
    (gradient norm and clipping), ``optimizer`` (``optimizer.step``), ``other`` (the rest of
    the step: loss and metrics, zero_grad, scheduler) and, outside the step's time,
    ``data_and_logging`` (the previous step's logging, then fetching and collating this step's
    micro-batches, which the Trainer does before ``on_step_begin``)."""

    IN_STEP: tuple[str, ...] = (
        "ref_forward",
        "policy_forward",
        "backward",
        "clip_grad",
        "optimizer",
    )

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.phases: dict[str, list[float]] = defaultdict(list)
        self.logs: list[dict[str, float]] = []
        self._now: dict[str, float] = {}
        self._step: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self._now[name] = time.perf_counter()

    def add(self, phase: str, since: str) -> None:
        """Add the time since ``mark(since)`` to this step's ``phase`` (if in a step)."""
        if phase in self._step:
            self._step[phase] += time.perf_counter() - self._now[since]

    def step_begin(self) -> None:
        self.mark("step_begin")
        gap = self._now["step_begin"] - self._now.get("step_end", self._now["train_begin"])
        self.phases["data_and_logging"].append(gap)
        self._step = dict.fromkeys(self.IN_STEP, 0.0)

    def step_end(self) -> None:
        self.mark("step_end")
        total = self._now["step_end"] - self._now["step_begin"]
        self.step_seconds.append(total)
        for phase in self.IN_STEP:
            self.phases[phase].append(self._step[phase])
        self.phases["other"].append(total - sum(self._step.values()))
        self._step = {}

    def callback(self):
        """The ``TrainerCallback`` feeding this clock and collecting TRL's logs."""
        from transformers import TrainerCallback

        clock = self

        class _ClockCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.mark("train_begin")

            def on_step_begin(self, args, state, control, **kwargs):
                clock.step_begin()

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                clock.add("clip_grad", since="backward_end")
                clock.mark("optimizer")

            def on_optimizer_step(self, args, state, control, **kwargs):
                clock.add("optimizer", since="optimizer")

            def on_step_end(self, args, state, control, **kwargs):
                clock.step_end()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    clock.logs.append(dict(logs))

        return _ClockCallback()

    def attach(self, trainer) -> None:
        """Time ``trainer``'s policy and reference forwards and its backward passes."""
        for phase, module in (
            ("policy_forward", trainer.model),
            ("ref_forward", trainer.ref_model),
        ):
            module.register_forward_pre_hook(lambda *_, p=phase: self.mark(p))
            module.register_forward_hook(lambda *_, p=phase: self.add(p, since=p))
        backward = trainer.accelerator.backward

        def timed_backward(loss, **kwargs):
            self.mark("backward")
            backward(loss, **kwargs)
            self.add("backward", since="backward")
            self.mark("backward_end")

        trainer.accelerator.backward = timed_backward


def run_trl_dpo(
    model_dir: str,
    steps_pairs: list[list[Pair]],
    beta: float,
    optimizer: dict,
    micro_batch: int,
    loss_type: str = "sigmoid",
) -> dict:
    """Train ``model_dir`` (an HF Llama checkpoint, fp32; the reference model is TRL's second
    copy of the same weights) with TRL's ``DPOTrainer`` for ``len(steps_pairs)`` optimizer
    steps, step ``i`` on exactly the pairs ``steps_pairs[i]`` (``(prompt_ids, chosen_ids,
    rejected_ids)`` token ids, fed untruncated and in order) in micro-batches of
    ``micro_batch`` pairs with gradient accumulation (every step the same number of pairs, a
    multiple of ``micro_batch``). ``optimizer``: ``bench_common.OPTIMIZER`` (AdamW: ``lr``,
    ``weight_decay``, ``adam_beta1``, ``adam_beta2``, ``adam_eps``, ``clip_grad``), at a
    constant learning rate. ``loss_type``: a TRL ``loss_type``.

    Returns ``losses`` (TRL's logged loss of each step, computed before that step's update),
    ``step_seconds`` (each step's wall time, ``on_step_begin`` to ``on_step_end``),
    ``peak_rss_gb`` (this process's peak RSS, model loading included: run it in a fresh
    process), ``breakdown`` (per-step lists of seconds, see ``_StepClock``), ``logs`` (TRL's
    log of each step: ``logps/chosen``, ``rewards/margins``, ``grad_norm``, ...) and
    ``versions``."""
    trl = _import_trl()
    import torch
    import transformers
    from transformers import AutoConfig, PrinterCallback

    dataset, accum = _pairs_dataset(steps_pairs, micro_batch)
    clock = _StepClock()
    with tempfile.TemporaryDirectory(prefix="trl_dpo_peer_") as out_dir:
        args = _dpo_config(
            out_dir,
            optimizer,
            micro_batch,
            accum,
            len(steps_pairs),
            beta=beta,
            loss_type=[loss_type],
        )
        trainer = _trainer_class()(
            model=model_dir,
            args=args,
            train_dataset=dataset,
            processing_class=_token_id_tokenizer(AutoConfig.from_pretrained(model_dir)),
            callbacks=[clock.callback()],
        )
        trainer.remove_callback(PrinterCallback)  # no log lines on stdout (tqdm is off)
        clock.attach(trainer)
        trainer.train()
    if len(clock.logs) != len(steps_pairs):
        raise RuntimeError(f"TRL logged {len(clock.logs)} steps, expected {len(steps_pairs)}")
    return {
        "losses": [log["loss"] for log in clock.logs],
        "step_seconds": clock.step_seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "breakdown": dict(clock.phases),
        "logs": clock.logs,
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }


# ----------------------------------------------------------------------------- self-check


def _write_tiny_llama(path: str) -> None:
    """A random Llama (2 layers, hidden 64, vocab 256; BOS 1, EOS 2, pad 0) saved at ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.float().save_pretrained(path)


def _random_pairs(n_steps: int, n_pairs: int, seed: int = 0) -> list[list[Pair]]:
    """Random pairs of varied lengths: prompts start with BOS (1), responses end with EOS (2)."""
    import random

    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(3, 256) for _ in range(rng.randint(lo, hi))]

    return [
        [([1, *ids(2, 12)], [*ids(1, 10), 2], [*ids(1, 10), 2]) for _ in range(n_pairs)]
        for _ in range(n_steps)
    ]


def _independent_logps(model_dir: str, pairs: list[Pair]) -> tuple[list[float], list[float]]:
    """Sums of the response tokens' log-probabilities under ``model_dir`` (plain transformers
    forward of each sequence alone, no padding; log-softmax in float64): chosen, rejected."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: tuple[list[float], list[float]] = ([], [])
    with torch.no_grad():
        for prompt, *responses in pairs:
            for out, response in zip(sums, responses):
                ids = torch.tensor([prompt + response])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
                token_logp = logp.gather(1, ids[0, 1:, None])[:, 0]
                out.append(token_logp[-len(response) :].sum().item())
    return sums


def _self_check() -> bool:
    """Run 2 steps of 4 pairs (micro-batch 2) on a tiny random Llama and check step 0 against
    plain torch: loss log(2) (policy = reference) and TRL's ``logps/chosen`` and
    ``logps/rejected`` against the mean of independently computed log-prob sums."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import OPTIMIZER

    steps_pairs = _random_pairs(n_steps=2, n_pairs=4)
    with tempfile.TemporaryDirectory(prefix="trl_dpo_peer_check_") as model_dir:
        _write_tiny_llama(model_dir)
        result = run_trl_dpo(model_dir, steps_pairs, beta=0.1, optimizer=OPTIMIZER, micro_batch=2)
        chosen, rejected = _independent_logps(model_dir, steps_pairs[0])
    log0 = result["logs"][0]
    checks = [
        ("step-0 loss = log 2", result["losses"][0], math.log(2), 1e-6),
        ("step-0 logps/chosen", log0["logps/chosen"], sum(chosen) / len(chosen), 1e-4),
        ("step-0 logps/rejected", log0["logps/rejected"], sum(rejected) / len(rejected), 1e-4),
    ]
    ok = True
    for name, got, want, tol in checks:
        good = abs(got - want) <= tol
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} {name}: TRL {got:.8f}, plain torch {want:.8f}")
    print(f"TRL {result['versions']['trl']}: losses {result['losses']}")
    print(f"step seconds {[round(s, 4) for s in result['step_seconds']]}")
    for phase, seconds in result["breakdown"].items():
        print(f"  {phase}: {[round(s, 4) for s in seconds]}")
    print(f"peak RSS {result['peak_rss_gb']:.3f} GB; {'PASS' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if _self_check() else 1)
