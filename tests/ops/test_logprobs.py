"""token_logprobs (+ entropy, + gradients) of every CPU backend vs float64 and vs "torch"."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.ops import token_logprobs
from tests.ops._common import BACKENDS, TOL, oracle_logprobs, stable_seed

# V=2050 crosses the C++ 2048-logit chunk, V=5000 the Triton 4096 tile; V=5 is tiny.
SHAPES = [(6, 257), (2, 3, 1000), (1, 1, 5), (3, 2050), (2, 5000)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    g_lp = torch.randn(shape[:-1], generator=gen)
    g_ent = torch.randn(shape[:-1], generator=gen)
    return logits, labels, g_lp, g_ent


def _run(backend, logits, labels, g_lp, g_ent, entropy=True):
    x = logits.clone().requires_grad_(True)
    if entropy:
        logp, ent = token_logprobs(x, labels, return_entropy=True, backend=backend)
        ((logp * g_lp).sum() + (ent * g_ent).sum()).backward()
    else:
        logp, ent = token_logprobs(x, labels, backend=backend), None
        (logp * g_lp).sum().backward()
    return logp, ent, x.grad


def _check_vs_oracle(dtype, logp, ent, grad, oracle):
    tol = TOL[dtype]
    ref_lp, ref_ent, ref_grad = oracle
    assert logp.dtype == torch.float32 and grad.dtype == dtype
    atol = tol["fwd"]
    torch.testing.assert_close(logp.double(), ref_lp, atol=atol, rtol=1e-6)
    if ent is not None:
        assert ent.dtype == torch.float32
        torch.testing.assert_close(ent.double(), ref_ent, atol=atol, rtol=1e-6)
    expected = ref_grad.to(dtype).double() if dtype != torch.float32 else ref_grad
    torch.testing.assert_close(
        grad.double(), expected, atol=tol["grad_atol"], rtol=tol["grad_rtol"]
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_and_reference(backend, dtype, shape):
    logits, labels, g_lp, g_ent = _inputs(shape, dtype, seed=stable_seed(shape, str(dtype)))
    oracle = oracle_logprobs(logits, labels, g_lp, g_ent)
    logp, ent, grad = _run(backend, logits, labels, g_lp, g_ent)
    _check_vs_oracle(dtype, logp, ent, grad, oracle)
    ref = _run("torch", logits, labels, g_lp, g_ent)
    torch.testing.assert_close(logp, ref[0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ent, ref[1], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad.float(), ref[2].float(), atol=1e-6, rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_entropy(backend):
    logits, labels, g_lp, g_ent = _inputs((4, 7, 300), torch.float32, seed=1)
    logp, _, grad = _run(backend, logits, labels, g_lp, g_ent, entropy=False)
    ref_lp, _, ref_grad = oracle_logprobs(logits, labels, g_lp, torch.zeros_like(g_ent))
    torch.testing.assert_close(logp.double(), ref_lp, atol=3e-5, rtol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_logits(backend, dtype):
    """Logits of +-1e4: the running max rescales by exp(-2e4) and must not lose accuracy."""
    gen = torch.Generator().manual_seed(7)
    n, v = 6, 2500
    sign = torch.where(torch.rand(n, v, generator=gen) > 0.5, 1.0, -1.0)
    logits = (sign * 1e4 + torch.randn(n, v, generator=gen)).to(dtype)
    logits[0] = torch.linspace(-1e4, 1e4, v)  # max in the last chunk: rescale path
    logits[1] = torch.linspace(1e4, -1e4, v)  # max first: no rescale
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[2] = int(logits[2].float().argmax())
    g_lp, g_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    oracle = oracle_logprobs(logits, labels, g_lp, g_ent)
    logp, ent, grad = _run(backend, logits, labels, g_lp, g_ent)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert torch.isfinite(grad.float()).all()
    # |logp| reaches 2e4: allow a few fp32 ulps of that magnitude
    torch.testing.assert_close(logp.double(), oracle[0], atol=1e-5, rtol=2e-6)
    _check_vs_oracle(dtype, logp, ent, grad, oracle)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token_only_label_term(backend):
    """g_ent unused -> same gradient as the no-entropy call; softmax gradient sums to 0."""
    logits, labels, g_lp, g_ent = _inputs((5, 64), torch.float32, seed=3)
    _, _, grad = _run(backend, logits, labels, g_lp, torch.zeros_like(g_ent))
    torch.testing.assert_close(grad.sum(-1), torch.zeros(5), atol=1e-6, rtol=0)
    _, _, grad2 = _run(backend, logits, labels, g_lp, g_ent, entropy=False)
    torch.testing.assert_close(grad, grad2, atol=1e-7, rtol=1e-6)


def test_shape_and_dtype_errors():
    logits = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match="must match"):
        token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long), backend="torch")
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        token_logprobs(logits.double(), torch.zeros(2, 3, dtype=torch.long), backend="torch")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_large_enough_for_threads(backend):
    """64 x 2050 logits: above the C++ single-thread threshold, so rows go to OpenMP."""
    logits, labels, g_lp, g_ent = _inputs((64, 2050), torch.float32, seed=9)
    oracle = oracle_logprobs(logits, labels, g_lp, g_ent)
    _check_vs_oracle(torch.float32, *_run(backend, logits, labels, g_lp, g_ent), oracle)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("entropy", [True, False])
def test_inplace_grad_overwrites_logits_with_the_same_gradient(
    backend, dtype, entropy, monkeypatch
):
    import hpc_rlhf.ops.logprobs as lp_mod

    # 7 rows of V=1000 in chunks of 2 rows: several chunks and a short last one
    monkeypatch.setattr(lp_mod, "_INPLACE_CHUNK_ELEMS", 2000)
    logits, labels, g_lp, g_ent = _inputs((7, 1000), dtype, seed=11)
    oracle = oracle_logprobs(logits, labels, g_lp, g_ent if entropy else torch.zeros_like(g_ent))
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0  # a non-leaf buffer the backward may reuse, like an LM head's output
    out = token_logprobs(x, labels, return_entropy=entropy, backend=backend, inplace_grad=True)
    if entropy:
        ((out[0] * g_lp).sum() + (out[1] * g_ent).sum()).backward()
    else:
        (out * g_lp).sum().backward()
    ref_lp, ref_ent, ref_grad = oracle
    tol = TOL[dtype]
    expected = ref_grad.to(dtype).double() if dtype != torch.float32 else ref_grad
    torch.testing.assert_close(
        leaf.grad.double(), expected, atol=tol["grad_atol"], rtol=tol["grad_rtol"]
    )
    # the logits buffer now holds the gradient: no second [N, V] tensor was made
    torch.testing.assert_close(x.detach(), leaf.grad)


def test_inplace_grad_refuses_when_another_backward_needs_the_logits():
    logits, labels, g_lp, _ = _inputs((4, 300), torch.float32, seed=3)
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0
    other = (x * x).sum()  # saves x for its own backward, which autograd runs after ours
    logp = token_logprobs(x, labels, backend="torch", inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ((logp * g_lp).sum() + other).backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "bad,shown", [(-1, r"\[-1, 4\]"), (7, r"\[0, 7\]"), (-100, r"\[-100, 4\]")], ids=str
)
def test_labels_outside_the_vocabulary_raise_with_their_range(backend, bad, shown):
    """Every backend would return a silent value for an id outside [0, V) (-100 included:
    callers pad labels with the pad id, never -100)."""
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[0, 1, 2], [3, 4, 0]])
    token_logprobs(logits, labels, backend=backend)  # in range: fine
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=rf"labels must be token ids in \[0, 7\).*{shown}"):
        token_logprobs(logits, labels, backend=backend)
    with pytest.raises(ValueError, match=r"in \[0, 7\)"):
        token_logprobs(logits, labels, backend=backend, return_entropy=True)
