"""The math answer verifier: extraction, normalization, equivalence (exact, numeric,
symbolic in the worker process), its safety (whitelist, time limit, worker restart) and the
``answer_match`` rule, against hand-written expected values."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from hpc_rlhf.rewards import math_answers as ma
from hpc_rlhf.rewards.math_answers import (
    answer_match,
    equivalent,
    extract_answer,
    normalize,
    reference_answer,
    shutdown_worker,
)


@pytest.fixture(scope="module", autouse=True)
def worker():
    """One sympy worker for the module (its start-up kept out of the timed tests)."""
    ma.start_worker()
    yield
    shutdown_worker()


class WordTokenizer:
    """Stand-in tokenizer: ids index a word list, ``decode`` joins the words."""

    def __init__(self, words: list[str]):
        self.words = words

    def decode(self, ids) -> str:
        return " ".join(self.words[i] for i in ids)


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so we get $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{\sqrt{\frac{a}{b^{2}}}} done", r"\sqrt{\frac{a}{b^{2}}}"),
        (r"first \boxed{3}, then corrected: \boxed{4}", "4"),
        (r"\fbox{7} is it", "7"),
        (r"the result is \boxed 5.", "5"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("#### 1,234\nmore text 9", "1,234"),
        ("The answer is 42.", "42"),
        ("We compute 3+4.\nthe ANSWER is: $x = 7$.\nCheck: 7 works.", "$x = 7$"),
        ("Answer: -12", "-12"),
        ("**Answer:** 8.", "8"),
        ("I think 3 apples and then 17 more", "17"),
        ("the temperature fell to -4 degrees", "-4"),
        ("it costs 2.75 dollars", "2.75"),
        ("about 1,234,567 people", "1,234,567"),
        ("a share of 3/4 of them", "3/4"),
        ("pages 3, 5 and .5", ".5"),
        ("no numbers here at all", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{\frac{1}{2}", "2"),  # unbalanced: falls back to the last number
        (r"\boxed{2} and later \boxed{3", "2"),  # a malformed last box: the one before
        (r"\boxed{", None),
        (r"}}} \boxed{{{", None),
        ("\\boxed{}", None),
        ("#### ", None),
    ],
)
def test_extract_answer_malformed_does_not_raise(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_many_unbalanced_boxes_is_fast():
    text = r"\boxed{" * 20000 + " 5"
    start = time.perf_counter()
    assert extract_answer(text) == "5"
    assert time.perf_counter() - start < 1.0


def test_reference_answer():
    assert reference_answer("She has 6 + 36 = 42 apples.\n#### 42") == "42"
    assert reference_answer(r"So the area is $\boxed{\frac{\pi}{4}}$.") == r"\frac{\pi}{4}"
    assert reference_answer("  x+1 ") == "x+1"  # a bare answer is its own reference
    assert reference_answer(r"\boxed{1") is None
    assert reference_answer("   ") is None


# ------------------------------------------------------------------------ normalization


@pytest.mark.parametrize(
    "raw, expected",
    [
        (r" $\dfrac{1}{2}$ ", r"\frac{1}{2}"),
        (r"\tfrac{3}{4}.", r"\frac{3}{4}"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"1\!000", "1000"),
        (r"2\,\sqrt{3}", r"2\sqrt{3}"),
        ("1,234", "1234"),
        ("-12,345.5", "-12345.5"),
        ("1,2", "1,2"),  # not thousands groups: a pair, kept
        ("x = 5", "5"),
        (r"\theta = \frac{\pi}{3}", r"\frac{\pi}{3}"),
        ("x=y=2", "x=y=2"),  # not a single assignment
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        (r"50\%", "50"),
        (r"5\text{ cm}", "5"),
        (r"12 \text{ square meters}", "12"),
        (r"5\text{ cm}^2", "5"),
        (r"\text{(B)}", "(B)"),
        (r"\frac12", r"\frac{1}{2}"),
        (r"\sqrt2", r"\sqrt{2}"),
        ("x^{2} + 1", "x^2+1"),
        (r"\pi r", r"\pi r"),  # a space between letters is kept
        (r"\$5", "5"),
        (r"\[ x + 1 \]", "x+1"),
    ],
)
def test_normalize(raw, expected):
    assert normalize(raw) == expected


# -------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    "a, b",
    [
        (r"\frac{1}{2}", "0.5"),
        ("0.5", "1/2"),
        (r"\frac{1}{2}", "1/2"),
        (r"\dfrac{2}{4}", r"\frac12"),
        ("1,234", "1234"),
        (r"50\%", "50"),
        ("0.3333333", "1/3"),  # within 1e-6 relative
        (r"2\sqrt{3}", r"\sqrt{12}"),
        ("x^2+2x+1", "(x+1)^2"),
        (r"\pi/2", r"\frac{\pi}{2}"),
        (r"\sqrt[3]{8}", "2"),
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
        (r"2 \cdot 3 \times x", "6x"),
        (r"\sin^2 x + \cos^2 x", "1"),
        (r"\left(1, \frac{1}{2}\right)", "(1, 0.5)"),
        ("x = 3", "3"),
    ],
)
def test_equivalent_pairs(a, b):
    assert equivalent(a, b)
    assert equivalent(b, a)


@pytest.mark.parametrize(
    "a, b",
    [
        ("1/3", "0.33"),
        ("x+1", "x-1"),
        (r"\sqrt{2}", "1.414"),
        ("(1, 2)", "(2, 1)"),
        ("(1, 2)", "3"),
        ("odd", "dod"),  # multi-letter words are not products of letters
        ("0", "0.000001"),
    ],
)
def test_not_equivalent_pairs(a, b):
    assert not equivalent(a, b)
    assert not equivalent(b, a)


@pytest.mark.parametrize(
    "a, b",
    [
        (r"\frac{1}{", r"\frac{1}{2}"),
        (")(", "1"),
        ("", "0"),
        ("", ""),
        ("1/0", "2"),
        (r"x \le 3", "3"),
        ("x_1", "x"),
        (r"\unknown{3}", "3"),
        ("2^", "2"),
        ("5" * 300, "5" * 299 + "4"),  # too long for sympy
    ],
)
def test_malformed_is_false_without_raising(a, b):
    assert equivalent(a, b) is False


def test_to_sympy_text():
    assert ma.to_sympy_text(r"\frac{1}{2}") == "((1)/(2))"
    assert ma.to_sympy_text(r"2\sqrt{3}") == "2 sqrt(3)"
    assert ma.to_sympy_text(r"\sqrt[3]{x}") == "((x)**(1/(3)))"
    assert ma.to_sympy_text(r"x^{2} \cdot \pi") == "x**(2) * pi"
    with pytest.raises(ValueError):
        ma.to_sympy_text(r"\frac{1}{")


# ------------------------------------------------------------------------------- safety


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('echo hi')",
        "eval(chr(95))",
        "open(x)",
        "x.func",
        "2**10000",
        "x" + "+x" * 150,
    ],
)
def test_check_safe_refuses(text):
    with pytest.raises(ValueError):
        ma.check_safe(text)


def test_code_injection_is_not_run(tmp_path):
    marker = tmp_path / "marker"
    attacks = [
        f"__import__('os').system('touch {marker}')",
        f"\\boxed{{__import__('os').system('touch {marker}')}}",
        f"exec(\"open('{marker}', 'w')\")",
    ]
    for attack in attacks:
        assert equivalent(attack, "0") is False
        assert equivalent("0", attack) is False
    tokenizer = WordTokenizer(attacks)
    assert answer_match([], [0, 1, 2], tokenizer, answer="0") == 0.0
    time.sleep(0.05)
    assert not marker.exists()
    with pytest.raises(ValueError):  # the worker checks the whitelist again
        ma._symbolic_equal(f"__import__('os').system('touch {marker}')", "0")
    # and behind the whitelist, the namespace parse_expr evaluates in has no builtins
    from sympy.parsing.sympy_parser import parse_expr

    local, glob = ma._namespaces()
    with pytest.raises(NameError):
        parse_expr(f"open('{marker}', 'w')", local_dict=local, global_dict=glob, transformations=())
    assert not marker.exists()


def test_timeout_kills_the_worker_and_the_next_call_works():
    old = ma._worker
    assert old is not None
    start = time.perf_counter()
    assert equivalent("9^9^9", "1", timeout=0.3) is False  # legal, but hangs sympy
    elapsed = time.perf_counter() - start
    assert elapsed < 0.3 + 1.5, elapsed
    assert not old.process.is_alive()
    assert ma._worker is None
    assert equivalent("x^2-1", "(x-1)(x+1)")  # a new worker answers
    assert ma._worker is not None and ma._worker.process.is_alive()


def test_equivalent_from_threads():
    pairs = [("x^2+2x+1", "(x+1)^2"), (r"2\sqrt{3}", r"\sqrt{12}"), ("x+1", "x-1")] * 2
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda p: equivalent(*p), pairs))
    assert results == [True, True, False] * 2
    assert threading.current_thread() is threading.main_thread()


def test_shutdown_and_lazy_restart():
    shutdown_worker()
    assert ma._worker is None
    shutdown_worker()  # idempotent
    assert equivalent(r"\frac{x}{2}", "0.5x")
    assert ma._worker is not None


# ----------------------------------------------------------------------------- the rule


def test_answer_match():
    tok = WordTokenizer(["so", "x", "is", r"\boxed{\frac{1}{2}}", "0.5", "#### 72", "The"])
    assert answer_match([1, 2], [0, 3], tok, answer="1/2") == 1.0
    assert answer_match([1, 2], [0, 4], tok, answer=r"\frac{1}{2}") == 1.0  # last number
    assert answer_match([1, 2], [5], tok, answer="Half of 144 is 72.\n#### 72") == 1.0
    assert answer_match([], [3], tok, answer=r"the area is $\boxed{0.5}$") == 1.0
    assert answer_match([], [3], tok, answer="3") == 0.0
    assert answer_match([], [3], tok, answer="3", format_score=0.1) == 0.1
    assert answer_match([], [0, 1, 2], tok, answer="3", format_score=0.1) == 0.0  # none
    assert answer_match([], [], tok, answer="3", format_score=0.1) == 0.0
    assert isinstance(answer_match([], [3], tok, answer=0.5), float)
    with pytest.raises(ValueError):
        answer_match([], [3], tok, answer="  ")
