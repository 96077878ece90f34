"""The DPO family's losses and their gradients against plain-Python float64 references
written from the papers' formulas (DPO, conservative DPO, IPO as TRL computes it on
length-averaged log-probs, SimPO, ORPO, KTO), on an odd number of pairs. Gradients are
checked against central finite differences of the plain-Python loss (not autograd)."""

from __future__ import annotations

import math

import pytest
import torch

from hpc_rlhf.algorithms.preference import (
    PairLogps,
    PreferenceParams,
    kto_loss,
    kto_reference_point,
    preference_loss,
)

P = 7


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _reference(name: str, pc, pr, rc, rr, nc, nr, prm: PreferenceParams) -> float:
    """One pair's loss, from the papers (plain Python, float64)."""
    beta, eps = prm.beta, prm.label_smoothing
    if name == "sigmoid":
        h = (pc - rc) - (pr - rr)
        return -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
    if name == "ipo":
        h = (pc - rc) / nc - (pr - rr) / nr
        return (h - 1 / (2 * beta)) ** 2
    ac, ar = pc / nc, pr / nr
    if name == "simpo":
        z = beta * (ac - ar) - prm.simpo_gamma
        return -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
    assert name == "orpo"
    odds = lambda a: math.exp(a) / (1 - math.exp(a))  # noqa: E731
    return -ac - beta * _log_sigmoid(math.log(odds(ac) / odds(ar)))


def _pairs(seed: int) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(seed)
    nc = torch.randint(1, 40, (P,), generator=gen).double()
    nr = torch.randint(1, 40, (P,), generator=gen).double()
    # summed log-probs: about -0.2 .. -3 nats a token, the reference nearby
    pc = -nc * (0.2 + 2.8 * torch.rand(P, generator=gen, dtype=torch.float64))
    pr = -nr * (0.2 + 2.8 * torch.rand(P, generator=gen, dtype=torch.float64))
    rc = pc + torch.randn(P, generator=gen, dtype=torch.float64)
    rr = pr + torch.randn(P, generator=gen, dtype=torch.float64)
    return {k: v.tolist() for k, v in dict(pc=pc, pr=pr, rc=rc, rr=rr, nc=nc, nr=nr).items()}


CASES = [
    ("sigmoid", PreferenceParams(beta=0.1)),
    ("sigmoid", PreferenceParams(beta=0.5, label_smoothing=0.2)),
    ("ipo", PreferenceParams(beta=0.1)),
    ("simpo", PreferenceParams(beta=2.0, simpo_gamma=1.0)),
    ("orpo", PreferenceParams(beta=0.1)),
]


@pytest.mark.parametrize("name,prm", CASES, ids=["dpo", "cdpo", "ipo", "simpo", "orpo"])
def test_loss_and_gradient_match_the_papers(name, prm):
    d = _pairs(seed=len(name) + int(10 * prm.beta))
    t = {
        k: torch.tensor(v, dtype=torch.float64, requires_grad=k in ("pc", "pr"))
        for k, v in d.items()
    }
    logps = PairLogps(t["pc"], t["pr"], t["nc"], t["nr"], t["rc"], t["rr"])
    loss_P, chosen_P, rejected_P = preference_loss(name, logps, prm)
    loss_P.sum().backward()
    h = 1e-6
    for i in range(P):
        args = [d[k][i] for k in ("pc", "pr", "rc", "rr", "nc", "nr")]
        want = _reference(name, *args, prm)
        assert float(loss_P[i]) == pytest.approx(want, rel=1e-10, abs=1e-12), f"pair {i}"
        for slot, key in ((0, "pc"), (1, "pr")):
            up, down = list(args), list(args)
            up[slot] += h
            down[slot] -= h
            fd = (_reference(name, *up, prm) - _reference(name, *down, prm)) / (2 * h)
            assert float(t[key].grad[i]) == pytest.approx(fd, rel=1e-6, abs=1e-8), f"d/d{key} {i}"
    if name in ("sigmoid", "ipo"):  # the implicit rewards TRL logs
        want_chosen = [prm.beta * (a - b) for a, b in zip(d["pc"], d["rc"])]
        assert chosen_P.tolist() == pytest.approx(want_chosen, rel=1e-12)
        want_rejected = [prm.beta * (a - b) for a, b in zip(d["pr"], d["rr"])]
        assert rejected_P.tolist() == pytest.approx(want_rejected, rel=1e-12)
    else:
        assert chosen_P.tolist() == pytest.approx(
            [prm.beta * a / n for a, n in zip(d["pc"], d["nc"])], rel=1e-12
        )


def test_dpo_is_log_two_at_the_reference_and_reference_free_losses_need_no_reference():
    zeros = torch.zeros(3, dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    at_ref = PairLogps(-ones, -2 * ones, ones, ones, -ones, -2 * ones)
    loss_P, _, _ = preference_loss("sigmoid", at_ref, PreferenceParams())
    assert loss_P.tolist() == pytest.approx([math.log(2)] * 3)
    no_ref = PairLogps(-ones, -2 * ones, ones, ones)
    for name in ("simpo", "orpo"):
        assert torch.isfinite(preference_loss(name, no_ref, PreferenceParams())[0]).all()
    with pytest.raises(ValueError, match="reference model's log-probs"):
        preference_loss("sigmoid", no_ref, PreferenceParams())
    with pytest.raises(ValueError, match="unknown preference loss 'dpo2'"):
        preference_loss("dpo2", at_ref, PreferenceParams())
    assert zeros.sum() == 0


def _kto_reference(pi, ref, desirable, z0, prm) -> float:
    r = pi - ref
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    if desirable:
        return prm.desirable_weight * (1 - sig(prm.beta * (r - z0)))
    return prm.undesirable_weight * (1 - sig(prm.beta * (z0 - r)))


def test_kto_loss_reference_point_and_gradient():
    gen = torch.Generator().manual_seed(3)
    n = 9
    pi = (-30 * torch.rand(n, generator=gen, dtype=torch.float64)).requires_grad_()
    ref = pi.detach() + 2 * torch.randn(n, generator=gen, dtype=torch.float64)
    desirable = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    mismatched_pi = -20 * torch.rand(n, generator=gen, dtype=torch.float64)
    mismatched_ref = mismatched_pi - torch.rand(n, generator=gen, dtype=torch.float64)
    z0 = kto_reference_point(mismatched_pi, mismatched_ref)
    want_z0 = max(
        0.0, sum((a - b) for a, b in zip(mismatched_pi.tolist(), mismatched_ref.tolist())) / n
    )
    assert float(z0) == pytest.approx(want_z0) and want_z0 > 0
    assert float(kto_reference_point(mismatched_ref, mismatched_pi)) == 0.0  # clamped at 0
    prm = PreferenceParams(beta=0.5, desirable_weight=1.0, undesirable_weight=1.33)
    loss_N, reward_N = kto_loss(pi, ref, desirable, z0, prm)
    loss_N.sum().backward()
    h = 1e-6
    for i in range(n):
        args = (float(pi[i]), float(ref[i]), bool(desirable[i]), want_z0, prm)
        assert float(loss_N[i]) == pytest.approx(_kto_reference(*args), rel=1e-10)
        fd = (_kto_reference(args[0] + h, *args[1:]) - _kto_reference(args[0] - h, *args[1:])) / (
            2 * h
        )
        assert float(pi.grad[i]) == pytest.approx(fd, rel=1e-6, abs=1e-10)
    assert reward_N.tolist() == pytest.approx((0.5 * (pi - ref)).tolist())
