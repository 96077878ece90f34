"""KTO's pieces of the DPO trainer (``hpc-rlhf dpo`` with ``dpo.loss: kto``,
``trainer.dpo.run_dpo``): its data (unpaired completions, ``data.kto``), its loss and its
reference point.

Before each step's loss (and each held-out evaluation), ``KTOReferencePoint`` sets every
micro-batch's reference point ``z0``: the current policy's and the reference's log-probs
of its mismatched rows, ``kto_reference_point`` over them (forward only, as the paper's
estimate is not back-propagated). ``z0`` is per micro-batch, like TRL's per-device batch
(a data-parallel rank's micro-batch has the same samples in every layout). The reference's
log-probs come per step or precomputed, as DPO's (``trainer.dpo``).
"""

from __future__ import annotations

from hpc_rlhf.algorithms.preference import kto_reference_point
from hpc_rlhf.config import DPORunConfig
from hpc_rlhf.data.kto import KTODataset
from hpc_rlhf.data.preference import check_response_tokens
from hpc_rlhf.trainer.losses import kto_loss_fn, sequence_logps_fn
from hpc_rlhf.trainer.reference import ReferencePass
from hpc_rlhf.trainer.trainable_model import TrainableModel

__all__ = ["PROGRESS_KEYS", "KTOReferencePoint", "completion_data", "kto_loss_fn"]

PROGRESS_KEYS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "lr", "grad_norm")


class KTOReferencePoint:
    """``train_supervised``'s ``prepare`` for KTO: the reference's log-probs where missing
    (``reference_pass``; ``None`` when precomputed), then each micro-batch's ``z0`` from
    the policy's log-probs of its mismatched rows."""

    def __init__(self, policy: TrainableModel, reference_pass: ReferencePass | None):
        self.policy = policy
        self.reference_pass = reference_pass
        self.fn = sequence_logps_fn(policy.state.tp_group)

    def __call__(self, microbatches: list) -> None:
        if self.reference_pass is not None:
            self.reference_pass(microbatches)
        kls = [mb.kl for mb in microbatches]
        for mb, out in zip(microbatches, self.policy.infer(kls, self.fn)):
            mb.reference_point = kto_reference_point(out["logps"], mb.kl.ref_logps_B)


def completion_data(cfg: DPORunConfig, tokenizer) -> KTODataset:
    """The run's labelled completions as ``KTOMicroBatch``es, each completion checked to
    keep a token within ``train.seq_length``."""
    t = cfg.train
    data = KTODataset(cfg.data, tokenizer, t.seq_length + 1, t.seed, cfg.model.vocab_size)
    check_response_tokens(data.train + data.eval, t.seq_length)
    return data
