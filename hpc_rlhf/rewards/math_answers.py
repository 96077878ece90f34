"""Math answer verification: a verifiable reward for GRPO-style RL on GSM8K / MATH-like data.

Pipeline (``answer_match`` is the rule, ``hpc_rlhf.rewards.math_answers:answer_match``):

1. ``extract_answer`` takes the final answer out of a response: the last ``\\boxed{...}``
   (or ``\\fbox{...}``), else the text after the last ``####``, else after the last
   "the answer is" / "answer:", else the last number in the text.
2. ``normalize`` maps an answer to a canonical string (``$``, ``\\left``/``\\right``, spacing
   commands, ``\\dfrac``, units, degrees, percent signs, thousands commas, ``x =`` removed).
3. ``equivalent`` compares two answers: equal normalized strings, else equal numbers
   (within 1e-6 relative), else sympy says they are symbolically equal.

Safety of the symbolic step. The LaTeX is first converted to sympy's input syntax by a small
converter of our own (``to_sympy_text``: ``\\frac``, ``\\sqrt``, ``^``, ``\\cdot``, ``\\pi``,
a few functions and Greek letters), then checked against a whitelist (``check_safe``):
digits, the operators ``+ - * / ( ) . ,``, spaces, and letter runs that are either one
letter (a variable) or a known function/constant name. No quotes, underscores, brackets or
other words ever reach ``parse_expr`` -- which ``eval``s its transformed code -- so no
Python builtin (``__import__``, ``open``, ``eval``, ``chr``...) can be named; the
evaluation namespace also has empty ``__builtins__``. Answers longer than ``MAX_CHARS``
and exponents with more than ``MAX_EXPONENT_DIGITS`` digits are refused before parsing.

sympy can still take forever on legal input (``9^9^9``), so parsing and simplification run
in one persistent worker process (multiprocessing ``spawn`` context, safe when the caller
has threads; it imports sympy once and serves requests over a pipe). A request that does
not answer within ``timeout`` seconds gets the worker killed (a new one starts lazily for
the next request) and counts as "not equivalent". The timeout covers the solver's work on
one request; requests from several threads are served one at a time, and the worker's
start-up (a fresh interpreter importing sympy, about a second) is not counted.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import re
import signal
import threading
from fractions import Fraction
from multiprocessing.connection import Connection
from typing import Any

MAX_CHARS = 200  # longer answers only get the exact (normalized string) comparison
MAX_EXPONENT_DIGITS = 3  # "x^{1000}" and beyond are refused before parsing
REL_TOL = 1e-6  # numbers within this relative difference are equal
STARTUP_TIMEOUT = 60.0  # seconds for a new worker to import sympy and report ready

# ---------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS_RE = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?|answer\s*:", re.IGNORECASE)
_SPACES_RE = re.compile(r"\s*")
_TOKEN_RE = re.compile(r"[^\s$]+")
_NUMBER_RE = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?(?:/\d+)?|\.\d+)"
)


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each ``{`` -> index of its matching ``}`` (escaped ``\\{`` skipped), in one
    pass; unmatched braces are left out."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _last_boxed(text: str) -> str | None:
    """Content of the last well-formed, non-empty ``\\boxed{...}`` / ``\\fbox{...}`` (also
    ``\\boxed 5``); a malformed last one falls back to the one before."""
    pairs: dict[int, int] | None = None
    for m in reversed(list(_BOX_RE.finditer(text))):
        spaces = _SPACES_RE.match(text, m.end())
        j = spaces.end() if spaces else m.end()
        if text[j : j + 1] == "{":
            pairs = _brace_pairs(text) if pairs is None else pairs
            end = pairs.get(j)
            if end is not None and text[j + 1 : end].strip():
                return text[j + 1 : end].strip()
        elif j > m.end():
            token = _TOKEN_RE.match(text, j)
            if token:
                return _clean_tail(token.group())
    return None


def _clean_tail(text: str) -> str:
    """Strip whitespace, markdown bold stars and a trailing period."""
    text = text.strip().strip("*").strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def _after_marker(text: str, start: int) -> str:
    """The rest of the line from ``start`` (or the next non-empty line when that is empty)."""
    lines = text[start:].split("\n")
    for k, line in enumerate(lines):
        if k > 0 or line.strip().strip("*").strip():
            cleaned = _clean_tail(line)
            if cleaned:
                return cleaned
    return ""


def extract_answer(text: str) -> str | None:
    """The final answer of a response, as written (``normalize`` canonicalizes it).

    In order: the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces
    handled, malformed ones skipped); else the text after the last ``####`` (GSM8K), to the
    end of the line; else the text after the last "the answer is" / "answer:" (any case,
    to the end of the line, trailing period stripped); else the last number (``-3``,
    ``2.5``, ``1,234``, ``3/4``). ``None`` when nothing is found; never raises on text.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    idx = text.rfind("####")
    if idx >= 0:
        after = _after_marker(text, idx + 4)
        if after:
            return after
    marks = list(_ANSWER_IS_RE.finditer(text))
    if marks:
        after = _after_marker(text, marks[-1].end())
        if after:
            return after
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def reference_answer(text: str) -> str | None:
    """The answer inside a reference solution: the last ``\\boxed{}`` of a MATH solution,
    else what follows ``####`` in a GSM8K solution, else the whole text stripped (a bare
    answer such as ``"42"`` or ``"x+1"``). ``None`` when empty or when it only has a
    malformed ``\\boxed{``."""
    text = str(text)
    if _BOX_RE.search(text):
        return _last_boxed(text)
    idx = text.rfind("####")
    if idx >= 0:
        return _after_marker(text, idx + 4) or None
    return text.strip() or None


# ---------------------------------------------------------------------------------------
# normalization
# ---------------------------------------------------------------------------------------

_TEXT_CMD = r"\\(?:text|textrm|textbf|mathrm|mbox)\s*"
_UNIT_RE = re.compile(r"(\d)\s*" + _TEXT_CMD + r"\{\s*[A-Za-z][^{}]*\}(\s*\^\s*\{?\d\}?)?\s*$")
_ASSIGN_RE = re.compile(r"^(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?=")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SUBSTITUTIONS = [  # (pattern, replacement), applied in order
    (r"\\(?:left|right)\.", ""),
    (r"\\(?:left|right|displaystyle)(?![A-Za-z])", ""),
    (r"\\[!,;: ]", ""),
    (r"\\[dt]frac(?![A-Za-z])", r"\\frac"),
    (r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])", ""),
    (r"\\?%", ""),
    (r"\\\$", ""),
    ("\u2212", "-"),
    (r"\\frac\s*(\w)\s*(\w)", r"\\frac{\1}{\2}"),  # \frac12 -> \frac{1}{2}
    (r"\\frac\s*(\w)\s*\{", r"\\frac{\1}{"),
    (r"\\frac\s*(\{[^{}]*\})\s*(\w)", r"\\frac\1{\2}"),
    (r"\\sqrt\s*(\w)", r"\\sqrt{\1}"),
    (r"\^\{(\w)\}", r"^\1"),
]


def _strip_delimiters(s: str) -> str:
    """Remove surrounding whitespace, ``$`` and ``\\(..\\)`` / ``\\[..\\]``."""
    prev = None
    while prev != s:
        prev = s
        s = s.strip().strip("$").strip()
        for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
            if s.startswith(left) and s.endswith(right):
                s = s[2:-2]
    return s


def normalize(answer: str) -> str:
    """A canonical string for exact comparison.

    Removes surrounding whitespace and ``$`` (and ``\\( \\)``, ``\\[ \\]``), ``\\left`` /
    ``\\right``, ``\\displaystyle``, spacing commands (``\\! \\, \\; \\:``), degree marks
    (``^\\circ``, ``°``), percent signs and ``\\$``; ``\\dfrac`` / ``\\tfrac`` become
    ``\\frac``, the shorthands ``\\frac12`` / ``\\sqrt2`` / ``x^{2}`` become ``\\frac{1}{2}``
    / ``\\sqrt{2}`` / ``x^2``. Units: a ``\\text{...}`` (or ``\\mbox``, ``\\mathrm``) right
    after a number at the end of the answer is dropped (``5\\text{ cm}^2`` -> ``5``); any
    other ``\\text{X}`` becomes ``X``. Whitespace is removed except between two letters.
    Then a trailing period, a leading single assignment (``x =``, ``\\theta=``, ``y_1 =``)
    and the thousands commas of a plain number (``1,234`` -> ``1234``) are removed.
    """
    s = _strip_delimiters(str(answer))
    for pattern, repl in _SUBSTITUTIONS:
        s = re.sub(pattern, repl, s)
    s = _UNIT_RE.sub(r"\1", s)
    s = re.sub(_TEXT_CMD + r"\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\s+", " ", s)  # one space per run first: the next pattern stays linear
    s = re.sub(r"(?<![A-Za-z]) | (?![A-Za-z])", "", s)
    s = _strip_delimiters(s).rstrip(".")
    if s.count("=") == 1:
        s = _ASSIGN_RE.sub("", s)
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    return s


# ---------------------------------------------------------------------------------------
# numbers, LaTeX -> sympy text, whitelist
# ---------------------------------------------------------------------------------------

_PLAIN_NUMBER_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)$")
_PLAIN_FRACTION_RE = re.compile(r"^([+-]?)(?:(\d+)/(\d+)|\\frac\{(\d+)\}\{(\d+)\})$")


def _as_number(s: str) -> Fraction | None:
    """The exact value of a normalized plain number (``-2``, ``0.5``, ``3/4``,
    ``\\frac{3}{4}``); ``None`` for anything else (expressions go to sympy)."""
    if _PLAIN_NUMBER_RE.match(s):
        return Fraction(s)
    m = _PLAIN_FRACTION_RE.match(s)
    if m:
        num, den = (m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5))
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if m.group(1) == "-" else value
    return None


def _close(x: Any, y: Any) -> bool:
    """``|x - y| <= REL_TOL * max(|x|, |y|)`` (so 0 only equals 0)."""
    return abs(x - y) <= REL_TOL * max(abs(x), abs(y))


_GREEK = (
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa mu nu xi "
    "rho sigma tau upsilon phi varphi chi psi omega"
).split()
# LaTeX command -> sympy text (functions are applied by implicit application: "sin x")
_COMMANDS = {
    "cdot": "*",
    "times": "*",
    "div": "/",
    "pi": " pi ",
    "infty": " oo ",
    "lambda": " lamda ",  # "lambda" is a Python keyword
    **{name: f" {name} " for name in _GREEK},
    **{name: f" {name} " for name in ("sin", "cos", "tan", "cot", "sec", "csc", "ln", "log")},
    "exp": " exp ",
}
FUNCTION_NAMES = frozenset({"sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp"})
KNOWN_NAMES = FUNCTION_NAMES | {"pi", "oo", "lamda"} | set(_GREEK)
_SAFE_CHARS_RE = re.compile(r"[0-9A-Za-z+\-*/()., ]*")


def _group(s: str, i: int) -> tuple[str, int]:
    """The argument starting at ``s[i]`` (spaces skipped): a brace group's content, a
    ``\\command``, or one character; and the index after it. Raises ``ValueError``."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise ValueError("missing argument")
    if s[i] == "{":
        depth = 0
        for j in range(i, len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                return s[i + 1 : j], j + 1
        raise ValueError("unbalanced braces")
    if s[i] == "\\":
        m = re.match(r"\\[A-Za-z]+", s[i:])
        if m:
            return m.group(), i + m.end()
    if s[i] == "}":
        raise ValueError("unbalanced braces")
    return s[i], i + 1


def _convert(s: str) -> str:
    """Recursive LaTeX -> sympy text (see ``to_sympy_text``)."""
    out: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            m = re.match(r"\\([A-Za-z]+)", s[i:])
            if not m:
                raise ValueError(f"unsupported LaTeX at {s[i : i + 2]!r}")
            name, i = m.group(1), i + m.end()
            if name == "frac":
                num, i = _group(s, i)
                den, i = _group(s, i)
                out.append(f"(({_convert(num)})/({_convert(den)}))")
            elif name == "sqrt":
                index = None
                if s[i : i + 1] == "[":
                    end = s.find("]", i)
                    if end < 0:
                        raise ValueError("unclosed \\sqrt[")
                    index, i = s[i + 1 : end], end + 1
                arg, i = _group(s, i)
                if index is None:
                    out.append(f" sqrt({_convert(arg)})")
                else:
                    out.append(f"(({_convert(arg)})**(1/({_convert(index)})))")
            elif name in _COMMANDS:
                out.append(_COMMANDS[name])
            else:
                raise ValueError(f"unsupported LaTeX command \\{name}")
        elif c == "{":
            inner, i = _group(s, i)
            out.append(f"({_convert(inner)})")
        elif c == "}":
            raise ValueError("unbalanced braces")
        else:
            out.append("**" if c == "^" else c)
            i += 1
    return "".join(out)


def check_safe(text: str) -> None:
    """Raise ``ValueError`` unless ``text`` (sympy syntax) may be given to ``parse_expr``:
    only digits, ``+ - * / ( ) . ,`` and spaces, letter runs that are one letter or in
    ``KNOWN_NAMES``, a ``.`` only before a digit, at most ``MAX_CHARS`` characters and
    exponents of at most ``MAX_EXPONENT_DIGITS`` digits (the first number after ``**``)."""
    if len(text) > MAX_CHARS:
        raise ValueError("answer too long")
    if not _SAFE_CHARS_RE.fullmatch(text):
        raise ValueError("character outside the whitelist")
    for word in re.findall(r"[A-Za-z]+", text):
        if len(word) > 1 and word not in KNOWN_NAMES:
            raise ValueError(f"unknown name {word!r}")
    if re.search(r"\.(?!\d)", text):
        raise ValueError("'.' not followed by a digit")
    for m in re.finditer(r"\*\*[\s()+\-]*(\d+)", text):
        if len(m.group(1)) > MAX_EXPONENT_DIGITS:
            raise ValueError("exponent too large")


def to_sympy_text(latex: str) -> str:
    """Convert a normalized LaTeX answer to sympy's input syntax, checked by ``check_safe``:
    ``\\frac{a}{b}`` -> ``((a)/(b))``, ``\\sqrt{x}`` -> ``sqrt(x)``, ``\\sqrt[n]{x}`` ->
    ``((x)**(1/(n)))``, ``^`` -> ``**``, ``\\cdot`` / ``\\times`` -> ``*``, ``\\pi`` ->
    ``pi``, ``\\infty`` -> ``oo``, ``\\sin`` etc. and Greek letters by name, braces ->
    parentheses; a space between a digit and a letter (``2x`` -> ``2 x``, implicit
    multiplication; so no ``2e5`` notation). Anything else (subscripts, ``\\le``, ``=``,
    ``|x|``, intervals ``[a,b]``, multi-letter words) raises ``ValueError``."""
    if len(latex) > MAX_CHARS:
        raise ValueError("answer too long")
    text = _convert(latex)
    text = re.sub(r"(\d)(?=[A-Za-z])", r"\1 ", text)
    text = re.sub(r"\s+", " ", text).strip()
    check_safe(text)
    return text


# ---------------------------------------------------------------------------------------
# the sympy worker (runs in its own process)
# ---------------------------------------------------------------------------------------


def _namespaces() -> tuple[dict[str, Any], dict[str, Any]]:
    """(local_dict, global_dict) for ``parse_expr``: every single letter a Symbol, the known
    names, the constructors the parser's transformations emit, and no builtins."""
    import string

    import sympy

    local: dict[str, Any] = {ch: sympy.Symbol(ch) for ch in string.ascii_letters}
    local.update({name: sympy.Symbol(name) for name in KNOWN_NAMES - FUNCTION_NAMES})
    local.update(pi=sympy.pi, oo=sympy.oo, sqrt=sympy.sqrt, exp=sympy.exp, ln=sympy.log)
    local.update({name: getattr(sympy, name) for name in ("sin", "cos", "tan", "cot")})
    local.update(sec=sympy.sec, csc=sympy.csc, log=sympy.log)
    names = ("Integer", "Float", "Rational", "Symbol", "Function", "factorial")
    glob: dict[str, Any] = {name: getattr(sympy, name) for name in names}
    glob["__builtins__"] = {}
    return local, glob


def _parse(text: str) -> Any:
    """sympy expression (or tuple of them) of a ``to_sympy_text`` string; checked again."""
    from sympy.parsing.sympy_parser import (
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    check_safe(text)
    local, glob = _namespaces()
    transformations = standard_transformations + (implicit_multiplication_application,)
    return parse_expr(text, local_dict=local, global_dict=glob, transformations=transformations)


def _expr_equal(a: Any, b: Any) -> bool:
    """Symbolic equality of two sympy expressions: identical, or (both constant) numerically
    within ``REL_TOL``, or ``simplify(a - b) == 0``, or ``a.equals(b)``."""
    import sympy

    if not isinstance(a, sympy.Expr) or not isinstance(b, sympy.Expr):
        return False
    if a == b:
        return True
    if not a.free_symbols and not b.free_symbols:
        va, vb = a.evalf(30), b.evalf(30)
        if va.is_number and vb.is_number and va.is_finite and vb.is_finite:
            return _close(complex(va), complex(vb))
    if sympy.simplify(a - b) == 0:
        return True
    return a.equals(b) is True


def _symbolic_equal(text_a: str, text_b: str) -> bool:
    """Worker request: do two sympy-syntax strings denote equal values (tuples element by
    element)?"""
    a, b = _parse(text_a), _parse(text_b)
    if isinstance(a, tuple) or isinstance(b, tuple):
        if not (isinstance(a, tuple) and isinstance(b, tuple)) or len(a) != len(b):
            return False
        return all(_expr_equal(x, y) for x, y in zip(a, b))
    return _expr_equal(a, b)


def _serve(conn: Connection) -> None:
    """Worker main loop: import sympy, say "ready", then answer ``(a, b)`` requests with a
    bool (any error -> False) until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    import sympy  # noqa: F401  (imported once, before reporting ready)

    conn.send("ready")
    while True:
        try:
            text_a, text_b = conn.recv()
        except (EOFError, OSError):
            return
        try:
            result = bool(_symbolic_equal(text_a, text_b))
        except Exception:  # parse errors, sympy errors, recursion limits: not equal
            result = False
        conn.send(result)


class _Worker:
    """A running sympy worker process and the parent's end of its pipe."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child_conn,), daemon=True)
        self.process.start()
        child_conn.close()
        self.owner_pid = os.getpid()
        try:
            ready = self.conn.poll(STARTUP_TIMEOUT) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.stop()
            raise RuntimeError(f"the sympy worker did not start within {STARTUP_TIMEOUT} s")

    def stop(self) -> None:
        """Kill the process (if still alive) and close the pipe."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


_lock = threading.Lock()
_worker: _Worker | None = None


def _forget_worker_after_fork() -> None:
    """In a forked child: the worker belongs to the parent; start afresh."""
    global _lock, _worker
    _lock = threading.Lock()
    _worker = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker_after_fork)


def shutdown_worker() -> None:
    """Stop the sympy worker process if one is running (also run at exit). The next
    symbolic comparison starts a new one."""
    global _worker
    with _lock:
        if _worker is not None and _worker.owner_pid == os.getpid():
            _worker.stop()
        _worker = None


atexit.register(shutdown_worker)


def start_worker() -> None:
    """Start the sympy worker now instead of at the first symbolic comparison (e.g. to keep
    its start-up out of a timed section)."""
    global _worker
    with _lock:
        if _worker is None or not _worker.process.is_alive():
            _worker = _Worker()


def _symbolic_request(text_a: str, text_b: str, timeout: float) -> bool:
    """Ask the worker; on timeout (or a dead worker) kill it and return False."""
    global _worker
    with _lock:
        if _worker is None or not _worker.process.is_alive():
            _worker = _Worker()
        worker = _worker
        try:
            worker.conn.send((text_a, text_b))
            if worker.conn.poll(timeout):
                return bool(worker.conn.recv())
        except (EOFError, OSError):
            pass
        except BaseException:  # interrupted mid-request: the pipe state is unknown
            worker.stop()
            _worker = None
            raise
        worker.stop()
        _worker = None
        return False


# ---------------------------------------------------------------------------------------
# public comparison and the rule
# ---------------------------------------------------------------------------------------


def equivalent(a: str, b: str, timeout: float = 2.0) -> bool:
    """Whether two answers are equal: their ``normalize`` forms are identical; else both are
    plain numbers (``0.5``, ``1/2``, ``\\frac{1}{2}``) equal within 1e-6 relative; else sympy
    finds them equal (``to_sympy_text`` conversion and whitelist, then in the worker
    process: constants within 1e-6 relative, ``simplify(A - B) == 0`` or ``A.equals(B)``;
    tuples element by element) within ``timeout`` seconds. Unparseable, refused, too long
    (> ``MAX_CHARS``) or timed-out comparisons are False; never raises on bad text."""
    na, nb = normalize(a), normalize(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    if len(na) > MAX_CHARS or len(nb) > MAX_CHARS:
        return False
    xa, xb = _as_number(na), _as_number(nb)
    if xa is not None and xb is not None:
        return _close(xa, xb)
    try:
        text_a, text_b = to_sympy_text(na), to_sympy_text(nb)
    except (ValueError, RecursionError):
        return False
    if text_a == text_b:
        return True
    return _symbolic_request(text_a, text_b, timeout)


def answer_match(
    prompt_ids: Any,
    response_ids: Any,
    tokenizer: Any,
    answer: str,
    timeout: float = 2.0,
    format_score: float = 0.0,
) -> float:
    """Rule reward for math answers (``hpc_rlhf.rewards.math_answers:answer_match``, with
    the prompt rows' ``answer`` field as a reference field).

    Decodes the response with ``tokenizer.decode(response_ids)``, takes its final answer
    with ``extract_answer`` and compares it with the reference by ``equivalent`` (within
    ``timeout`` seconds for the symbolic check). The reference may be a bare answer
    (``"42"``, ``"\\frac{1}{2}"``) or a whole solution: a GSM8K ``"... #### 42"`` or a MATH
    solution with ``\\boxed{}`` is reduced by ``reference_answer`` first.

    Returns 1.0 when equivalent, ``format_score`` when an answer was extracted but is wrong
    (a small bonus for answering in a checkable form, 0.0 by default), 0.0 when the response
    has no answer at all. Raises ``ValueError`` when the reference has no answer (a data
    error, not the policy's)."""
    reference = reference_answer(str(answer))
    if reference is None:
        raise ValueError(f"math reference answer {answer!r} has no answer in it")
    predicted = extract_answer(tokenizer.decode(response_ids))
    if predicted is None:
        return 0.0
    return 1.0 if equivalent(predicted, reference, timeout=timeout) else float(format_score)
