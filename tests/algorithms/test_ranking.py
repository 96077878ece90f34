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
            term += regularization * (rb * rb + rw * rw) / 2
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
    margin = sum(
        w * (scores[b] - scores[c]) for (b, c), w in zip(mb.pairs_P2.tolist(), mb.pair_weights_P)
    )
    assert float(sums["margin"]) == pytest.approx(float(margin), rel=1e-12)
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


def _cost_reference(costs, pairs, unsafe, weights, regularization):
    """Safe-RLHF's sequence-wise cost loss, summed with the pair weights, in floats."""

    def softplus_neg(x):  # -log sigmoid(x)
        return math.log1p(math.exp(-x))

    loss = acc = sign_acc = 0.0
    for (better, worse), w in zip(pairs, weights):
        cb, cw = costs[better], costs[worse]
        sb, sw = (1.0 if unsafe[better] else -1.0), (1.0 if unsafe[worse] else -1.0)
        term = softplus_neg(cw - cb) + softplus_neg(sb * cb) + softplus_neg(sw * cw)
        term += regularization * (cb * cb + cw * cw) / 2
        loss += w * term
        acc += w * (1.0 if cw > cb else 0.5 if cw == cb else 0.0)
        sign_acc += w * ((sb * cb > 0) + (sw * cw > 0)) / 2
    return loss, acc, sign_acc


@pytest.mark.parametrize("regularization", [0.0, 0.05])
def test_cost_loss_matches_safe_rlhf_sequence_wise_objective(regularization):
    from hpc_rlhf.algorithms.ranking import cost_ranking_loss

    gen = torch.Generator().manual_seed(3)
    costs = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    pairs = [(0, 1), (2, 3), (4, 5), (4, 6), (5, 6)]
    unsafe = [False, True, True, True, False, True, True]
    weights = [1.0, 1.0, 1 / 3, 1 / 3, 1 / 3]
    loss, sums = cost_ranking_loss(
        costs,
        torch.tensor(pairs),
        torch.tensor(unsafe),
        torch.tensor(weights, dtype=torch.float64),
        regularization,
    )
    values = costs.detach().tolist()
    want, acc, sign_acc = _cost_reference(values, pairs, unsafe, weights, regularization)
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert float(sums["accuracy"]) == pytest.approx(acc, rel=1e-12)
    assert float(sums["sign_accuracy"]) == pytest.approx(sign_acc, rel=1e-12)
    loss.backward()
    for b in range(len(values)):
        up, down = list(values), list(values)
        up[b] += 1e-6
        down[b] -= 1e-6
        numeric = (
            _cost_reference(up, pairs, unsafe, weights, regularization)[0]
            - _cost_reference(down, pairs, unsafe, weights, regularization)[0]
        ) / 2e-6
        assert float(costs.grad[b]) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_safety_labels_are_read_per_response_and_named_when_missing():
    from hpc_rlhf.config import InputError
    from hpc_rlhf.data.preference import row_safety

    cfg = PreferenceDataConfig()
    pair = {"chosen_safe": True, "rejected_safe": False}
    assert row_safety(pair, cfg, 2, "r") == [True, False]
    ranking = {"responses": ["a", "b", "c"], "safe": [False, True, False]}
    assert row_safety(ranking, cfg, 3, "r") == [False, True, False]
    with pytest.raises(InputError, match=r"r: expected a true/false field 'rejected_safe'"):
        row_safety({"chosen_safe": True}, cfg, 2, "r")
    with pytest.raises(InputError, match=r"field 'safe' must list 3 safety labels"):
        row_safety({"responses": ["a", "b", "c"], "safe": [True]}, cfg, 3, "r")
