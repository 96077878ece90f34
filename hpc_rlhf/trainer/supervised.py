"""The supervised step loop shared by pre-training, SFT and reward models.

``train_supervised`` trains one model on the micro-batches a data source gives per step
(``step_microbatches(step, n_micro, micro_batch_size, dp_rank, dp_size)``) with a loss
function (default: the masked next-token NLL, a global token mean over every micro-batch
and data-parallel rank). Around the steps, ``trainer.run.Run`` resumes, records and saves;
held-out metrics (``eval_microbatches``; perplexity for the language-model loss) are
measured every ``train.eval_interval`` steps and at the end, and the model is exported in
HF format to ``train.hf_export_dir`` at the end.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from hpc_rlhf.config import Config, InputError
from hpc_rlhf.models.runner import MicroBatch
from hpc_rlhf.trainer.losses import lm_loss_fn
from hpc_rlhf.trainer.run import Run
from hpc_rlhf.trainer.trainable_model import TrainableModel

logger = logging.getLogger(__name__)


class SupervisedData(Protocol):
    def step_microbatches(
        self, step: int, n_micro: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list[MicroBatch]: ...


def build_trained_model(
    cfg: Config, run: Run, init_state: dict | None = None, role: str = "actor"
) -> TrainableModel:
    """The trained model (an LM ``"actor"``, or a ``"reward"`` model read at each row's
    last token), from HF-format ``init_state`` when given (else its random init)."""
    t = cfg.train
    model = TrainableModel(
        cfg.model,
        cfg.optimizer,
        run.state,
        role,
        t.steps,
        pack_sequences=t.pack_sequences,
        share_prefixes=t.share_prefixes,
        output_positions="last_token" if role == "reward" else "head_mask",
    )
    if init_state is not None:
        model.load_hf_state(init_state)
    return model


def require_eval_share(data: Any, dp_size: int, what: str) -> None:
    """``InputError`` unless every data-parallel rank gets a held-out sample (or there are
    none): the held-out metrics are means over every rank."""
    if 0 < len(data.eval) < dp_size:
        raise InputError(
            f"{len(data.eval)} held-out {what} samples for {dp_size} data-parallel ranks: "
            "raise data.eval_fraction or give a larger data.eval_path"
        )


def evaluate(model: TrainableModel, microbatches: Sequence[Any], loss_fn: Any) -> dict:
    """Held-out metrics: ``loss_fn``'s metrics over every rank's micro-batches (global
    count-weighted means), forward only, named ``eval_<name>``."""
    outputs = model.forward_backward(microbatches, loss_fn, forward_only=True)
    return {f"eval_{k}": v for k, v in model.reduce_metrics(outputs).items()}


def train_supervised(
    cfg: Config,
    run: Run,
    data: SupervisedData,
    model: TrainableModel,
    eval_data: Any = None,
    loss_fn: Any = None,
    prepare: Callable[[list], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` for ``cfg.train.steps`` steps (resuming from ``train.save_dir``) with
    ``loss_fn`` (default: the language-model loss, whose held-out ``eval_loss`` also gives
    ``eval_ppl``); return the per-step metrics (``step`` included) on every rank.
    ``prepare(microbatches)``: completes the micro-batches before the loss reads them
    (e.g. a frozen reference's log-probs), each step's and, before each evaluation, the
    held-out ones."""
    t, state = cfg.train, run.state
    models = {model.role: model}
    lm = loss_fn is None
    loss_fn = lm_loss_fn(state.tp_group) if lm else loss_fn
    n_micro = t.global_batch_size // (t.micro_batch_size_per_rank * state.dp_size)
    eval_mbs = []
    if eval_data is not None:
        eval_mbs = eval_data.eval_microbatches(
            t.micro_batch_size_per_rank, state.dp_rank, state.dp_size
        )
    saved = run.resume(models)
    history = []
    try:
        for step in range(saved["step"] if saved else 0, t.steps):
            batches = data.step_microbatches(
                step, n_micro, t.micro_batch_size_per_rank, state.dp_rank, state.dp_size
            )
            if prepare is not None:
                prepare(batches)
            result = model.train_step(batches, loss_fn)
            metrics = {**result.metrics, "lr": result.lr, "grad_norm": result.grad_norm or 0.0}
            if hasattr(data, "step_metrics"):  # a source that samples: what it sampled
                metrics.update(data.step_metrics())
            last = step + 1 == t.steps
            if eval_mbs and (last or (t.eval_interval and (step + 1) % t.eval_interval == 0)):
                if prepare is not None:
                    prepare(eval_mbs)
                metrics.update(evaluate(model, eval_mbs, loss_fn))
                if lm:
                    metrics["eval_ppl"] = math.exp(min(metrics["eval_loss"], 50.0))
            history.append({"step": step + 1, **metrics})
            run.end_step(step + 1, metrics, models)
    finally:
        run.close()
    if t.hf_export_dir:
        export_hf(model, t.hf_export_dir)
    return history


def export_hf(model: TrainableModel, path: str) -> None:
    """Write ``model`` as an HF Llama checkpoint (collective; rank 0 writes)."""
    from hpc_rlhf.models.hf_io import save_hf_checkpoint

    hf_state = model.gather_hf_state()
    if hf_state is not None:
        save_hf_checkpoint(path, model.model_cfg, hf_state)
        logger.info("%s exported to %s (HF format)", model.role, path)
