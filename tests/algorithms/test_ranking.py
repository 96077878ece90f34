"""The reward model's ranking loss against a plain-Python float64 formula: Llama-2
margins, K-wise pair expansion with per-sample weights (InstructGPT), Safe-RLHF's
end-score regulariser, the statistics and the gradient."""

from __future__ import annotations

import math

import pytest
import torch

from hpc_rlhf.algorithms.ranking import pairwise_ranking_loss
from hpc_rlhf.config import PreferenceDataConfig
from hpc_rlhf.data.preference import PreferenceSample, collate_preferences, row_responses

MARGINS = {"better": 2.0, "slightly_better": 1.0}


def _reference(scores, samples, regularization):
    """sum over samples of the mean over its pairs of -log sigmoid(rb - rw - m) + reg."""
    loss, acc, offset = 0.0, 0.0, 0
    for n_rows, pairs in samples:
        for better, worse, margin in pairs:
            rb, rw = scores[offset + better], scores[offset + worse]
            term = math.log1p(math.exp(-(rb - rw - margin)))
            term += regularization * (rb * rb + rw * rw)
            loss += term / len(pairs)
            acc += (1.0 if rb > rw else 0.5 if rb == rw else 0.0) / len(pairs)
        offset += n_rows
    return loss, acc


@pytest.mark.parametrize("regularization", [0.0, 0.01])
def test_loss_statistics_and_gradient_match_the_formula(regularization):
    cfg = PreferenceDataConfig()
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "better"},
        {"prompt": "p", "responses": ["x", "y", "z", "w"], "ranking": [2, 0, 3, 1]},
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.5},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    parsed = [row_responses(r, cfg, MARGINS, f"row{i}") for i, r in enumerate(rows)]
    samples = [
        PreferenceSample([[1, 2]] * len(responses), pairs, "x") for _, responses, pairs in parsed
    ]
    assert parsed[1][2] == [
        (2, 0, 0.0),
        (2, 3, 0.0),
        (2, 1, 0.0),
        (0, 3, 0.0),
        (0, 1, 0.0),
        (3, 1, 0.0),
    ]
    mb = collate_preferences(samples, pad_id=0)
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(mb.shape[0], generator=gen, dtype=torch.float64)
    scores[4] = scores[5]  # one tie (rows of the ranking sample)
    scores.requires_grad_(True)
    loss, sums = pairwise_ranking_loss(
        scores, mb.pairs_P2, mb.margins_P.double(), mb.pair_weights_P.double(), regularization
    )
    spec = [(len(s.sequences), s.pairs) for s in samples]
    want, want_acc = _reference(scores.detach().tolist(), spec, regularization)
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert float(sums["accuracy"]) == pytest.approx(want_acc, rel=1e-12)
    loss.backward()
    eps = 1e-6
    for b in range(scores.shape[0]):
        bumped = scores.detach().tolist()
        bumped[b] += eps
        up, _ = _reference(bumped, spec, regularization)
        bumped[b] -= 2 * eps
        down, _ = _reference(bumped, spec, regularization)
        assert float(scores.grad[b]) == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    "row,match",
    [
        ({"prompt": "p", "chosen": "a"}, r"row: expected a string field 'rejected'"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "huge"}, r"'margin'='huge'"),
        ({"prompt": "p", "responses": ["a"], "ranking": [0]}, r"at least 2 responses"),
        ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}, r"must order the indices"),
        ({"responses": ["a", "b"], "ranking": [0, 1]}, r"expected a string field 'prompt'"),
    ],
)
def test_malformed_preference_rows_name_the_field(row, match):
    from hpc_rlhf.config import InputError

    with pytest.raises(InputError, match=match):
        row_responses(row, PreferenceDataConfig(), MARGINS, "row")
