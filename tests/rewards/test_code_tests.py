"""The code verifier: program extraction, assertion and stdin/stdout tests scored by hand-
written programs, and the sandbox (time, memory, output, processes, network, files, scratch
directories, forged pass markers), the batched rule in parallel, malformed tests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from hpc_rlhf.config import InputError
from hpc_rlhf.rewards import is_batched
from hpc_rlhf.rewards.code_tests import (
    ISOLATIONS,
    _launch_prefix,
    extract_program,
    parse_tests,
    pass_fraction,
    run_tests,
    sandbox_isolation,
)

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]
SUM_CASES = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 7\n", "output": "12"}]
SUM = "a, b = map(int, input().split())\nprint(a + b)\n"
SLACK = 2.5  # seconds of margin on time limits: the machine is shared


@pytest.fixture(params=ISOLATIONS)
def isolation(request):
    """Each isolation this machine has: the namespace one only where unshare works."""
    if request.param == "namespace" and sandbox_isolation() != "namespace":
        pytest.skip("unprivileged user namespaces are not available here")
    return request.param


def _program(src: str) -> str:
    return textwrap.dedent(src).lstrip("\n")


def test_extract_program():
    assert extract_program("Here:\n```python\nx = 1\n```\nDone.") == "x = 1\n"
    assert extract_program("```\ny = 2\n```") == "y = 2\n"
    several = "```python\nfirst = 1\n```\ntext\n```py\nsecond = 2\n```\n```text\nout\n```"
    assert extract_program(several) == "second = 2\n"  # the last Python (or plain) block
    assert extract_program("z = 3\nprint(z)") == "z = 3\nprint(z)"
    assert extract_program("  ```python\n  def f():\n      return 1\n  ```") == (
        "def f():\n    return 1\n"
    )


@pytest.mark.parametrize(
    "program, expected",
    [
        (ADD, 1.0),
        ("def add(a, b):\n    return a + b if a >= 0 else 7\n", 2 / 3),
        ("def add(a, b)\n    return a + b\n", 0.0),  # syntax error
        ("raise RuntimeError('at import')\n" + ADD, 0.0),
        ("import sys\n" + ADD + "sys.exit(0)\n", 0.0),  # not a pass
        ("import os\n" + ADD + "os._exit(0)\n", 0.0),
        ("import sys\ndef add(a, b):\n    sys.exit(0)\n", 0.0),  # SystemExit in each test
        ("def add(a, b):\n    raise KeyboardInterrupt\n", 0.0),
    ],
    ids=["correct", "partial", "syntax", "raises", "sys_exit", "os_exit", "exit_in_test", "kbi"],
)
def test_assertion_tests(program, expected):
    assert run_tests(program, ADD_TESTS, timeout=2) == pytest.approx(expected)


def test_stdio_tests():
    assert run_tests(SUM, SUM_CASES, timeout=2) == 1.0
    assert run_tests("print(3)\n", SUM_CASES, timeout=2) == 0.5
    # trailing spaces on lines and trailing blank lines do not matter, leading ones do
    sloppy = "print('1 2   ')\nprint('3\\t')\nprint()\nprint()\n"
    assert run_tests(sloppy, [{"input": "", "output": "1 2\n3"}], timeout=2) == 1.0
    assert run_tests(sloppy, [{"input": "", "output": " 1 2\n3"}], timeout=2) == 0.0
    # the right output then a crash, or a non-zero exit status: a failure
    crash = "print(3)\nraise SystemExit(1)\n"
    assert run_tests(crash, [{"input": "", "output": "3"}], timeout=2) == 0.0
    ok_exit = "import sys\nprint(3)\nsys.exit(0)\n"
    assert run_tests(ok_exit, [{"input": "", "output": "3"}], timeout=2) == 1.0


def test_tests_as_json_string():
    assert run_tests(ADD, json.dumps(ADD_TESTS), timeout=2) == 1.0
    assert run_tests(SUM, json.dumps(SUM_CASES), timeout=2) == 1.0


def test_infinite_loop_ends_the_run_and_earlier_passes_count():
    """Test 1 passes, test 2 loops: it fails at its 1 s limit and ends the run, so test 3
    never runs: 1/3."""
    program = "def spin():\n    while True:\n        pass\n"
    start = time.monotonic()
    assert run_tests(program, ["assert True", "spin()", "assert True"], timeout=1) == (
        pytest.approx(1 / 3)
    )
    assert time.monotonic() - start < 1 + SLACK


def test_program_defeating_the_child_timer_is_killed_by_the_parent():
    """With SIGALRM ignored, only the parent's kill (test limit + grace) ends it."""
    program = _program(
        """
        import signal
        def spin():
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            while True:
                pass
        """
    )
    start = time.monotonic()
    assert run_tests(program, ["assert True", "spin()"], timeout=1) == 0.5
    assert time.monotonic() - start < 1.5 + SLACK
    start = time.monotonic()  # stdin/stdout: one child per case, each killed at its limit
    assert run_tests("while True:\n    pass\n", SUM_CASES, timeout=0.5) == 0.0
    assert time.monotonic() - start < 2 * 1.0 + SLACK


def test_memory_bombs_fail_fast():
    bomb = "def big():\n    x = bytearray(4 * 1024**3)\n    return len(x)\n"
    grow = "def grow():\n    xs = []\n    while True:\n        xs.append(b' ' * 10**6)\n"
    start = time.monotonic()
    assert run_tests(bomb, ["assert big()", "assert True"], memory_mb=256, timeout=3) == 0.5
    assert run_tests(grow, ["grow()", "assert True"], memory_mb=256, timeout=3) == 0.5
    assert run_tests("x = bytearray(4 * 1024**3)\nprint(1)\n", [{"input": "", "output": "1"}],
                     memory_mb=256, timeout=3) == 0.0  # fmt: skip
    assert time.monotonic() - start < 3 + SLACK  # MemoryError, not the time limits
    assert run_tests(ADD, ADD_TESTS, memory_mb=256) == 1.0  # the parent is unharmed


def test_numpy_still_imports():
    program = "import numpy as np\ndef total(n):\n    return int(np.arange(n).sum())\n"
    assert run_tests(program, ["assert total(4) == 6"], timeout=5) == 1.0


def test_new_processes_fail(tmp_path, isolation):
    marker = tmp_path / "forked"
    # Python 3.11's signature (a real call: it runs touch when not blocked)
    fork_exec_args = (
        f"['/usr/bin/touch', '{marker}'], [b'/usr/bin/touch'], True, (), None, None, "
        "-1, -1, -1, -1, -1, -1, *os.pipe(), False, False, -1, None, None, -1, -1, None, False"
    )
    attempts = [
        f"os.system('touch {marker}')",
        f"subprocess.run(['touch', '{marker}'])",
        "os.fork()",
        f"os.execv('/usr/bin/touch', ['touch', '{marker}'])",
        f"_posixsubprocess.fork_exec({fork_exec_args})",
        f"subprocess._fork_exec({fork_exec_args})",
        "del sys.modules['_posixsubprocess']; import _posixsubprocess",
        "multiprocessing.Process(target=print).start()",
        "ctypes.CDLL(None).fork()",
    ]
    header = "import os, sys, subprocess, _posixsubprocess, multiprocessing, ctypes\n"
    for attempt in attempts:
        program = header + f"def go():\n    {attempt}\n    return True\n"
        assert run_tests(program, ["assert go()"], timeout=2, isolation=isolation) == 0.0, attempt
    assert not marker.exists()
    # importing them is fine
    assert run_tests(header + ADD, ADD_TESTS, timeout=2, isolation=isolation) == 1.0


def test_network_is_unreachable(isolation):
    """A listening socket on this machine's loopback; the program must not reach it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        program = _program(
            f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
                connected = True
            except Exception:
                connected = False
            def connect():
                socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
                return True
            """
        )
        tests = ["assert connected", "assert connect()"]
        assert run_tests(program, tests, timeout=3, isolation=isolation) == 0.0
        with pytest.raises(socket.timeout):
            listener.accept()


def test_network_namespace_alone_blocks_loopback():
    """The kernel layer on its own: a plain interpreter (no harness, no audit hook) under
    the namespace prefix cannot reach the host's loopback."""
    if sandbox_isolation() != "namespace":
        pytest.skip("unprivileged user namespaces are not available here")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        cmd = [*_launch_prefix("namespace"), sys.executable, "-I", "-c", code]
        done = subprocess.run(cmd, capture_output=True, timeout=30)
        assert done.returncode != 0
        assert b"unreachable" in done.stderr.lower()
        with pytest.raises(socket.timeout):
            listener.accept()


def test_writes_outside_the_scratch_dir_fail(tmp_path, isolation):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "written"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"open({str(target)!r}, 'a').write('x')",
        f"os.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
        f"os.mkdir({str(target)!r})",
        f"os.symlink('/etc/hostname', {str(target)!r})",
        f"pathlib.Path({str(target)!r}).write_text('x')",
        f"os.symlink({str(target)!r}, 'link'); open('link', 'w').write('x')",
        f"fd = os.open({str(outside)!r}, os.O_RDONLY); "
        "os.close(os.open('written', os.O_WRONLY | os.O_CREAT, dir_fd=fd))",
    ]
    for attempt in attempts:
        program = f"import os, pathlib\ndef go():\n    {attempt}\n    return True\n"
        assert run_tests(program, ["assert go()"], timeout=2, isolation=isolation) == 0.0, attempt
        assert not target.exists() and not target.is_symlink(), attempt
    inside = _program(
        """
        import os, tempfile
        def go():
            with open("out.txt", "w") as f:
                f.write("hi")
            os.mkdir("sub")
            os.rename("out.txt", "sub/out.txt")
            with tempfile.NamedTemporaryFile("w") as f:
                f.write("x")
            return open("sub/out.txt").read() == "hi" and len(open(os.__file__).read()) > 0
        """
    )
    assert run_tests(inside, ["assert go()"], timeout=2, isolation=isolation) == 1.0


def test_scratch_dirs_are_removed(tmp_path):
    parent = tmp_path / "scratch"
    parent.mkdir()
    program = _program(
        f"""
        import os
        def here():
            return os.path.dirname(os.getcwd()) == {str(parent)!r}
        def litter():
            os.makedirs("a/b")
            open("a/b/f", "w").write("x")
            os.chmod("a/b", 0)
            os.chmod("a", 0)
            return True
        def spin():
            while True:
                pass
        """
    )
    tests = ["assert here()", "assert litter()", "spin()"]
    assert run_tests(program, tests, timeout=1, scratch_parent=str(parent)) == 2 / 3
    assert run_tests(SUM, SUM_CASES, timeout=2, scratch_parent=str(parent)) == 1.0
    assert list(parent.iterdir()) == []


def test_minimal_environment(monkeypatch):
    monkeypatch.setenv("HPC_RLHF_SECRET_FOR_TEST", "x")
    program = "import os\ndef clean():\n    return 'HPC_RLHF_SECRET_FOR_TEST' not in os.environ\n"
    assert run_tests(program, ["assert clean()"], timeout=2) == 1.0


def test_printing_forever_is_cut_off():
    start = time.monotonic()
    forever = "while True:\n    print('x' * 1000)\n"
    assert run_tests(forever, [{"input": "", "output": "x"}], timeout=5) == 0.0
    assert time.monotonic() - start < 5  # the output cap, well before the time limit
    program = "def chatty():\n    while True:\n        print('x' * 1000)\n"
    start = time.monotonic()
    assert run_tests(program, ["assert True", "chatty()"], timeout=1) == 0.5
    assert time.monotonic() - start < 1 + SLACK


def test_forged_pass_markers_do_not_count():
    """Without the nonce, pass lines written to every fd and to stdout count for nothing."""
    program = _program(
        """
        import os
        forged = b"".join(b"PASS %s %d\\n" % (n, i) for n in (b"0", b"x" * 32) for i in range(3))
        for fd in range(1, 64):
            try:
                os.write(fd, forged)
            except OSError:
                pass
        print(forged.decode())
        """
    )
    assert run_tests(program, ["assert False", "assert False"], timeout=2) == 0.0


class _StandInTokenizer:
    """decode() returns the text stored for those ids."""

    def __init__(self, texts):
        self.texts = texts

    def decode(self, ids):
        return self.texts[ids[0]]


def _barrier(wait_s: float) -> str:
    """A program whose test passes only if another sample's program is running alongside
    it (both mark their scratch dirs; the dirs are siblings)."""
    return _program(
        f"""
        ```python
        import glob, os, time
        def together():
            open("ready", "w").close()
            deadline = time.monotonic() + {wait_s}
            while time.monotonic() < deadline:
                if len(glob.glob("../*/ready")) >= 2:
                    time.sleep(1.0)  # so that the other one sees this one too
                    return True
                time.sleep(0.02)
            return False
        ```
        """
    )


def test_pass_fraction_batched_in_parallel_and_in_order(tmp_path):
    assert is_batched(pass_fraction)
    texts = [
        "Solution:\n```python\ndef add(a, b):\n    return a + b if a >= 0 else 7\n```\n",
        _barrier(8.0),
        _barrier(8.0),
        f"```\n{SUM}```",
    ]
    tok = _StandInTokenizer(texts)
    response_ids = [[i] for i in range(4)]
    tests = [ADD_TESTS, ["assert together()"], json.dumps(["assert together()"])]
    tests.append([SUM_CASES[0], {"input": "1 1", "output": "3"}])
    scores = pass_fraction(
        [[0]] * 4, response_ids, tok, tests, timeout=10, max_workers=2,
        scratch_parent=str(tmp_path),
    )  # fmt: skip
    assert scores == pytest.approx([2 / 3, 1.0, 1.0, 0.5])
    assert list(tmp_path.iterdir()) == []
    # one worker: the two barrier programs never meet
    serial = pass_fraction(
        [[0]] * 2, [[1], [2]], _StandInTokenizer([None, _barrier(0.5), _barrier(0.5)]),
        tests[1:3], timeout=5, max_workers=1, scratch_parent=str(tmp_path),
    )  # fmt: skip
    assert serial == [0.0, 0.0]
    assert pass_fraction([], [], tok, []) == []


@pytest.mark.parametrize(
    "tests, message",
    [
        (42, "got int"),
        ("not json", "not valid JSON"),
        ('{"input": "1"}', "got dict"),
        ([], "empty"),
        (["assert True", 3], r"tests\[1\]"),
        (["assert True", {"input": "", "output": ""}], r"tests\[1\]"),
        ([{"input": "1"}], "'output'"),
        ([{"input": 1, "output": "2"}], "'input'"),
        ([3], r"tests\[0\]"),
        (["assert (("], "not valid Python"),
    ],
)
def test_malformed_tests_raise_input_error(tests, message):
    with pytest.raises(InputError, match=message):
        parse_tests(tests)
    with pytest.raises(InputError, match=message):
        run_tests(ADD, tests)


def test_pass_fraction_checks_every_sample_before_running():
    tok = _StandInTokenizer([ADD, ADD])
    with pytest.raises(InputError, match="sample 1"):
        pass_fraction([[0], [0]], [[0], [1]], tok, [ADD_TESTS, "oops"])
    with pytest.raises(InputError, match="one entry per sample"):
        pass_fraction([[0], [0]], [[0], [1]], tok, [ADD_TESTS])
    with pytest.raises(InputError, match="isolation"):
        run_tests(ADD, ADD_TESTS, isolation="none")
