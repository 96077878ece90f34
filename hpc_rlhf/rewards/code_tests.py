"""A code verifier: the fraction of a prompt's unit tests that the response's program passes,
as a batched rule reward (``hpc_rlhf.rewards.code_tests:pass_fraction``) for GRPO-style RL
on code.

Tests (a prompt row's ``tests`` field, a list or its JSON encoding) come in two forms:

- assertion strings, ``["assert add(1, 2) == 3", ...]``: one child process loads the
  program once, then runs each test in the program's namespace;
- stdin/stdout cases, ``[{"input": "1 2\\n", "output": "3"}, ...]``: one child process per
  case, the input on its stdin; it passes when it exits with status 0 and its stdout equals
  the expected output, each line's trailing whitespace and trailing blank lines ignored.

**How a program runs.** A child of the current interpreter (``sys.executable -I -B``) runs
a small harness (``_HARNESS``) that reads its job from an inherited pipe, lowers its
resource limits (RLIMIT_AS = ``memory_mb``, RLIMIT_CPU about the time budget, RLIMIT_FSIZE
16 MiB, RLIMIT_CORE 0: hard limits, which an unprivileged process cannot raise again),
installs an audit hook and only then compiles and runs the program, its cwd a fresh scratch
directory (removed afterwards, whatever happened), with a minimal environment, in a new
session. The parent enforces wall-clock limits by killing the child's whole process group
(SIGKILL); a test that exceeds its limit fails, and in assertion mode it also ends the run
(the remaining tests get 0). Output is read up to ``OUTPUT_CAP`` bytes: a program printing
more is killed and fails.

**Isolation** (``sandbox_isolation()`` probes once and logs which one is in use):

- ``"namespace"``, when unprivileged user namespaces work: the child runs under
  ``unshare --user --map-root-user --net --pid --fork --kill-child``. The kernel gives it an
  empty network namespace (a down loopback: no network at all, not even the host's
  127.0.0.1) and its own PID namespace (when the group is killed, the kernel kills every
  process left in it, even one that called ``setsid``).
- ``"audit_hook"`` otherwise: the audit hook below is the only network guard.

In both cases the harness installs a ``sys.addaudithook`` hook (it cannot be removed) before
the program runs. It raises ``PermissionError`` on: network (``socket.connect``/``bind``/
``sendto``/``sendmsg``, name lookups, sockets other than AF_UNIX ones), new processes
(``subprocess.Popen``, ``os.system``, ``os.exec*``, ``os.posix_spawn*``, ``os.spawn*``,
``os.fork``, ``os.forkpty``; ``_posixsubprocess.fork_exec``, which has no audit event, is
replaced by a stub, in ``subprocess`` too, and its re-import refused), signals to other
processes (``os.kill``, ``os.killpg``), ``ctypes`` (loading libraries, looking up or calling
foreign functions;
``ctypes`` itself is imported before the hook so ``import numpy`` still works), raising
resource limits, ``gc.get_objects``/``get_referrers``/``get_referents``, hard links, and any
write outside the scratch directory: ``open`` for writing (reading anywhere still works, so
the standard library imports), ``os.mkdir``/``rmdir``/``remove``/``rename``/``symlink``/
``chmod``/``chown``/``utime``/``truncate``/xattrs, and ``os.open``-style writes with a
relative path (their ``dir_fd`` is not in the audit event).

**What this does not guarantee.** The resource limits, the time limits, the process-group
kill and (in namespace mode) the network and PID namespaces are enforced by the kernel. The
audit hook is defence in depth, not a sandbox: the program runs in the same interpreter as
the harness, and Python code can reach the harness's frames and objects (e.g. through
``sys._getframe``), use a C extension that makes system calls itself, or race the path
checks with a symlink swap. In namespace mode the program can still read and (if it gets
past the hook) write any file the trainer's user can: there is no mount namespace or
seccomp filter (so a program could read, say, the training data with the expected outputs,
if it knows where to look). Consequently:

- stdin/stdout cases are judged by the parent from the child's stdout and exit status, so a
  program cannot forge a pass (it can only produce the right output);
- assertion tests run inside the child: after each passing test the harness writes
  ``PASS <nonce> <i>`` to a private pipe, and the parent counts only lines with the right
  nonce. The per-run random nonce reaches the harness through the job pipe (not the
  environment, argv or a file); the program's own stdout is discarded. This stops a program
  that merely prints pass markers or writes them to every fd (the pipe's fd number is on the
  harness's command line), but a program determined to, can find the nonce in the harness's
  frame and forge every result; so can
  one returning an object whose ``__eq__`` always says True. A reward that must resist such
  a policy should use stdin/stdout cases.
- ``SystemExit`` (``sys.exit``) in the program or a test fails that test (it ends a
  stdin/stdout run normally, its status deciding), and ``os._exit`` ends the run.

Running the trainer as root weakens this (root may raise its hard limits when not in a user
namespace, and writes everywhere once past the hook). RLIMIT_NPROC is not used: it counts
all the user's processes, so it would fail legitimate programs on a busy machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import secrets
import selectors
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hpc_rlhf.config import InputError
from hpc_rlhf.rewards import batched_rule

logger = logging.getLogger(__name__)

OUTPUT_CAP = 1 << 20  # bytes of a child's output read at most; more kills it (a failure)
FSIZE_LIMIT = 16 << 20  # RLIMIT_FSIZE: the largest file a program may write
STARTUP_S = 10.0  # interpreter (and namespace) start-up allowance, before the program runs
GRACE_S = 0.5  # after a test's own time limit, how long the parent waits before killing
ISOLATIONS = ("namespace", "audit_hook")
UNSHARE_ARGS = ("--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child")

# The program's interpreter: ``python -I -B -c _HARNESS <mode> <job fd> <progress fd>``. It
# reads the job (JSON) from the job pipe, sets the limits, installs the audit hook, then
# runs the program. Progress lines on the progress pipe: ``BEGIN <i>`` before the program
# loads (i = -1) and before each test, ``PASS <nonce> <i>`` after a test passes.
_HARNESS = r'''
import builtins, json, os, resource, signal, sys


class _TimeLimit(BaseException):
    pass


def _alarm(signum, frame):
    raise _TimeLimit()


def _read_job(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return json.loads(b"".join(chunks))


def _set_limits(limits):
    for name, value in limits:
        which = getattr(resource, name)
        hard = resource.getrlimit(which)[1]
        cap = value + 1 if name == "RLIMIT_CPU" else value
        if hard != resource.RLIM_INFINITY:
            value, cap = min(value, hard), min(cap, hard)
        resource.setrlimit(which, (value, cap))


def _prepare():
    """Import what the hook then refuses to load: ctypes (numpy imports it) and subprocess,
    whose fork primitive (no audit event of its own) becomes a stub."""
    import types
    try:
        import ctypes  # noqa: F401
    except Exception:
        pass
    import subprocess

    def fork_exec(*args, **kwargs):
        raise PermissionError("sandbox: starting processes is not allowed")

    stub = types.ModuleType("_posixsubprocess")
    stub.fork_exec = fork_exec
    subprocess._posixsubprocess = stub
    subprocess._fork_exec = fork_exec  # its alias of the real one
    sys.modules["_posixsubprocess"] = stub


def _install_hook(scratch):
    realpath, fspath, fsdecode, isabs = os.path.realpath, os.fspath, os.fsdecode, os.path.isabs
    root = scratch + os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    devices = frozenset(("/dev/null", "/dev/stdout", "/dev/stderr"))
    denied = frozenset((
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "os.link",
        "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
        "socket.getnameinfo", "socket.sethostname",
    ))
    # event: (positions of paths that must be inside the scratch dir, positions of dir_fd)
    path_events = {
        "os.mkdir": ((0,), (2,)), "os.rmdir": ((0,), (1,)), "os.remove": ((0,), (1,)),
        "os.rename": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)), "os.chmod": ((0,), (2,)),
        "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()),
        "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
    }

    def inside(path):
        if isinstance(path, int):
            return False
        path = fsdecode(fspath(path))
        if path in devices:
            return True
        path = realpath(path)
        return path == scratch or path.startswith(root)

    def allowed(event, args):
        if event in denied or event.startswith("ctypes."):
            return False
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return True
            if not ((flags or 0) & write_flags or (mode and any(c in mode for c in "wax+"))):
                return True
            if mode is None and not isabs(fsdecode(fspath(path))):
                return False  # os.open: its dir_fd is not in the event
            return inside(path)
        if event in path_events:
            paths, dir_fds = path_events[event]
            if event == "os.truncate" and isinstance(args[0], int):
                return True  # ftruncate needs a descriptor open for writing
            no_dir_fd = all(args[i] in (None, -1) for i in dir_fds)  # -1: the default
            return no_dir_fd and all(inside(args[i]) for i in paths)
        if event == "socket.__new__":
            return args[1] == 1  # AF_UNIX (socketpair, used by asyncio); no network family
        if event == "import":
            return args[0] != "_posixsubprocess"
        return True

    def hook(event, args):
        try:
            ok = allowed(event, args)
        except Exception:
            ok = False
        if not ok:
            raise PermissionError(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


def _attempt(code, namespace, seconds):
    """'pass', 'fail' or 'timeout'."""
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            exec(code, namespace)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return "pass"
    except _TimeLimit:
        return "timeout"
    except BaseException:  # SystemExit and KeyboardInterrupt included: a failure
        return "fail"


def _run_asserts(job, program, namespace, progress_fd):
    nonce, timeout, write = job["nonce"], job["timeout"], os.write
    tests = [compile(test, f"<test {i}>", "exec") for i, test in enumerate(job["tests"])]
    del job
    signal.signal(signal.SIGALRM, _alarm)
    _install_hook(os.path.realpath(os.getcwd()))
    write(progress_fd, b"BEGIN -1\n")
    try:
        code = compile(program, "solution.py", "exec")
    except BaseException:
        os._exit(0)
    del program
    if _attempt(code, namespace, timeout) != "pass":
        os._exit(0)
    for i, test in enumerate(tests):
        try:
            write(progress_fd, b"BEGIN %d\n" % i)
            outcome = _attempt(test, namespace, timeout)
            if outcome == "pass":
                write(progress_fd, b"PASS %s %d\n" % (nonce.encode(), i))
            elif outcome == "timeout":
                break
        except BaseException:  # a late alarm
            break
    os._exit(0)


def _main():
    mode, job_fd, progress_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    job = _read_job(job_fd)
    _set_limits(job.pop("limits"))
    _prepare()
    program = job.pop("program")
    sys.argv[:] = ["solution.py"]
    namespace = {"__name__": "__main__", "__builtins__": builtins, "__file__": "solution.py"}
    if mode == "assert":
        _run_asserts(job, program, namespace, progress_fd)
    del job
    _install_hook(os.path.realpath(os.getcwd()))
    os.write(progress_fd, b"BEGIN -1\n")
    os.close(progress_fd)
    exec(compile(program, "solution.py", "exec"), namespace)


_main()
'''

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("", "python", "python3", "py")

_isolation_lock = threading.Lock()
_isolation: str | None = None


def extract_program(text: str) -> str:
    """The last fenced code block of ``text`` tagged ``python`` (or ``py``, ``python3``) or
    untagged, dedented; the whole text when there is none."""
    blocks = [m.group(2) for m in _FENCE.finditer(text) if m.group(1).lower() in _PYTHON_TAGS]
    return textwrap.dedent(blocks[-1]) if blocks else text


def parse_tests(tests: Any) -> tuple[str, list]:
    """``("assert", [str, ...])`` or ``("stdio", [{"input": str, "output": str}, ...])`` from a
    prompt row's ``tests`` (a list, or its JSON encoding). Anything else raises
    ``InputError`` naming the problem: not a list, empty, mixed or wrong item types, an
    assertion that does not compile, a case without string ``input`` and ``output``."""
    if isinstance(tests, (str, bytes)):
        try:
            tests = json.loads(tests)
        except ValueError as err:
            raise InputError(f"tests: a string that is not valid JSON ({err})") from err
    if not isinstance(tests, list):
        raise InputError(
            "tests: expected a list of assertion strings or of {'input', 'output'} objects, "
            f"got {type(tests).__name__}"
        )
    if not tests:
        raise InputError("tests: the list is empty")
    if isinstance(tests[0], str):
        for i, test in enumerate(tests):
            if not isinstance(test, str):
                raise InputError(
                    f"tests[{i}]: expected an assertion string (as the others), "
                    f"got {type(test).__name__}"
                )
            try:
                compile(test, f"<tests[{i}]>", "exec")
            except (SyntaxError, ValueError) as err:
                raise InputError(f"tests[{i}]: {test!r} is not valid Python ({err})") from err
        return "assert", list(tests)
    for i, case in enumerate(tests):
        if not isinstance(case, dict):
            raise InputError(
                f"tests[{i}]: expected an assertion string or an {{'input', 'output'}} object "
                f"(as the others), got {type(case).__name__}"
            )
        for key in ("input", "output"):
            if not isinstance(case.get(key), str):
                raise InputError(
                    f"tests[{i}]: field {key!r} must be a string, got {case.get(key)!r}"
                )
    return "stdio", [{"input": c["input"], "output": c["output"]} for c in tests]


def sandbox_isolation() -> str:
    """``"namespace"`` when ``unshare`` can give a child its own user, network and PID
    namespaces here, else ``"audit_hook"``; probed once (the first call), logged, cached."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation, reason = _probe_isolation()
            if _isolation == "namespace":
                logger.info("code tests run without network, in namespaces: %s", reason)
            else:
                logger.warning(
                    "code tests: no network namespace (%s); the in-process audit hook is the "
                    "only network guard",
                    reason,
                )
        return _isolation


def _probe_isolation() -> tuple[str, str]:
    """(isolation, why): whether ``unshare`` with ``UNSHARE_ARGS`` runs this interpreter."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "audit_hook", "no unshare command on PATH"
    cmd = [unshare, *UNSHARE_ARGS, "--", sys.executable, "-I", "-S", "-c", "pass"]
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return "audit_hook", f"{' '.join(cmd[:-5])} failed: {err}"
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip()[:200]
        return "audit_hook", f"unshare {' '.join(UNSHARE_ARGS)} exits {done.returncode}: {detail}"
    return "namespace", f"unshare {' '.join(UNSHARE_ARGS)}"


def _launch_prefix(isolation: str) -> list[str]:
    """The command the harness runs under for ``isolation``."""
    if isolation == "namespace":
        unshare = shutil.which("unshare")
        if unshare is None:
            raise InputError("isolation 'namespace' needs the unshare command")
        return [unshare, *UNSHARE_ARGS, "--"]
    if isolation == "audit_hook":
        return []
    raise InputError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")


def _child_env(scratch: str) -> dict[str, str]:
    """The child's whole environment: no credentials or proxies of the trainer's."""
    one = "1"
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": one,
        "OPENBLAS_NUM_THREADS": one,
        "MKL_NUM_THREADS": one,
    }


@contextlib.contextmanager
def _scratch_dir(parent: str | None) -> Iterator[str]:
    """A fresh directory, removed on leaving (after the child's group is dead)."""
    path = tempfile.mkdtemp(prefix="code_tests_", dir=parent)
    try:
        yield path
    finally:
        _remove_tree(path)


def _remove_tree(path: str) -> None:
    """``rm -rf path``, first making every directory in it writable again (a program may
    have removed its permissions)."""
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            sub = os.path.join(root, name)
            if not os.path.islink(sub):
                with contextlib.suppress(OSError):
                    os.chmod(sub, 0o700)
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        logger.warning("code tests: could not remove the scratch directory %s", path)


@dataclasses.dataclass
class _Limits:
    """When the parent kills a child: ``first`` seconds after the start without progress,
    ``idle`` seconds after the last progress line, ``total`` seconds after the start."""

    first: float
    idle: float
    total: float


@dataclasses.dataclass
class _Child:
    """What a child left: its progress lines and stdout (each capped), its exit status
    (``None``: killed at a time limit or over the output cap)."""

    progress: bytes
    stdout: bytes
    returncode: int | None


def _run_child(
    mode: str, job: dict, stdin: bytes | None, scratch: str, limits: _Limits, isolation: str
) -> _Child:
    """Run the harness on ``job`` in ``scratch``; always kills its process group."""
    job_r, job_w = os.pipe()
    progress_r, progress_w = os.pipe()
    cmd = [*_launch_prefix(isolation), sys.executable, "-I", "-B", "-c", _HARNESS]
    try:
        proc = subprocess.Popen(
            [*cmd, mode, str(job_r), str(progress_w)],
            cwd=scratch,
            env=_child_env(scratch),
            pass_fds=(job_r, progress_w),
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE if mode == "stdio" else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except BaseException:
        for fd in (job_w, progress_r):
            os.close(fd)
        raise
    finally:
        os.close(job_r)
        os.close(progress_w)
    try:
        writes = {job_w: json.dumps(job).encode()}
        if proc.stdin is not None:
            writes[os.dup(proc.stdin.fileno())] = stdin or b""
            proc.stdin.close()
        reads = [progress_r] + ([os.dup(proc.stdout.fileno())] if proc.stdout else [])
        if proc.stdout is not None:
            proc.stdout.close()
        data, finished = _pump(writes, reads, limits)
        returncode = _wait_then_kill(proc, time.monotonic() + GRACE_S if finished else 0.0)
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    return _Child(data[reads[0]], data[reads[1]] if len(reads) > 1 else b"", returncode)


def _pump(writes: dict[int, bytes], reads: list[int], limits: _Limits) -> tuple[dict, bool]:
    """Feed ``writes`` (fd: data) and drain ``reads`` (the first: the progress pipe) until
    every read fd is at EOF (returns ``True``), a time limit passes or one exceeds
    ``OUTPUT_CAP`` (``False``). Closes every fd given."""
    sel = selectors.DefaultSelector()
    got = {fd: bytearray() for fd in reads}
    pending = {fd: memoryview(data) for fd, data in writes.items()}
    for fd in [*writes, *reads]:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_WRITE if fd in pending else selectors.EVENT_READ)
    start = time.monotonic()
    deadline = start + min(limits.first, limits.total)
    try:
        while len(sel.get_map()) > len(pending):  # a read fd is still open
            left = deadline - time.monotonic()
            if left <= 0:
                return {fd: bytes(b) for fd, b in got.items()}, False
            for key, _ in sel.select(left):
                fd = key.fd
                if fd in pending:
                    try:
                        pending[fd] = pending[fd][os.write(fd, pending[fd][:65536]) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the child does not read it: drop the rest
                        pending[fd] = pending[fd][:0]
                    if not pending[fd]:
                        del pending[fd]
                        sel.unregister(fd)
                        os.close(fd)
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    os.close(fd)
                    continue
                got[fd] += chunk
                if len(got[fd]) > OUTPUT_CAP:
                    return {fd: bytes(b) for fd, b in got.items()}, False
                if fd == reads[0]:
                    deadline = min(start + limits.total, time.monotonic() + limits.idle)
        return {fd: bytes(b) for fd, b in got.items()}, True
    finally:
        for key in list(sel.get_map().values()):
            os.close(key.fd)
        sel.close()


def _wait_then_kill(proc: subprocess.Popen, until: float) -> int | None:
    """The child's exit status if it exits by ``until`` (else ``None``); then its whole
    process group is killed (escaped grandchildren included) and it is reaped. The status
    is peeked without reaping (``WNOWAIT``), so the group id cannot be reused meanwhile."""
    status = None
    while True:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            exited = info.si_code == os.CLD_EXITED
            status = info.si_status if exited else -info.si_status
            break
        if time.monotonic() >= until:
            break
        time.sleep(0.005)
    _kill_group(proc)
    proc.wait()
    return status


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the child's process group (its id is the child's pid: a new session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, 9)


def _limit_list(cpu_seconds: float, memory_mb: int) -> list[tuple[str, int]]:
    return [
        ("RLIMIT_AS", int(memory_mb * (1 << 20))),
        ("RLIMIT_CPU", math.ceil(cpu_seconds) + 1),
        ("RLIMIT_FSIZE", FSIZE_LIMIT),
        ("RLIMIT_CORE", 0),
    ]


def _run_asserts(
    program: str,
    tests: list[str],
    timeout: float,
    memory_mb: int,
    scratch_parent: str | None,
    isolation: str,
) -> int:
    """How many assertion tests pass: one child, passes counted by nonce."""
    nonce = secrets.token_hex(16)
    budget = (len(tests) + 1) * (timeout + GRACE_S)
    job = {
        "program": program,
        "tests": tests,
        "timeout": timeout,
        "nonce": nonce,
        "limits": _limit_list((len(tests) + 1) * timeout, memory_mb),
    }
    limits = _Limits(first=STARTUP_S, idle=timeout + GRACE_S, total=STARTUP_S + budget)
    with _scratch_dir(scratch_parent) as scratch:
        child = _run_child("assert", job, None, scratch, limits, isolation)
    passed = set()
    for line in child.progress.split(b"\n")[:-1]:  # complete lines only
        parts = line.split(b" ")
        if len(parts) == 3 and parts[0] == b"PASS" and parts[1] == nonce.encode():
            with contextlib.suppress(ValueError):
                passed.add(int(parts[2]))
    return len(passed & set(range(len(tests))))


def _normalized(text: str) -> str:
    """``text`` without each line's trailing whitespace, nor trailing blank lines."""
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip("\n")


def _run_stdio_case(
    program: str,
    case: dict,
    timeout: float,
    memory_mb: int,
    scratch_parent: str | None,
    isolation: str,
) -> bool:
    """Whether one stdin/stdout case passes (exit status 0, the expected output)."""
    job = {"program": program, "limits": _limit_list(timeout, memory_mb)}
    limits = _Limits(first=STARTUP_S, idle=timeout + GRACE_S, total=STARTUP_S + timeout + GRACE_S)
    with _scratch_dir(scratch_parent) as scratch:
        child = _run_child("stdio", job, case["input"].encode(), scratch, limits, isolation)
    if child.returncode != 0:
        return False
    return _normalized(child.stdout.decode(errors="replace")) == _normalized(case["output"])


def run_tests(
    program: str,
    tests: Any,
    timeout: float = 5.0,
    memory_mb: int = 512,
    *,
    scratch_parent: str | None = None,
    isolation: str | None = None,
) -> float:
    """The fraction of ``tests`` (see ``parse_tests``) that ``program`` passes, run in a
    child process (see the module docstring). ``timeout``: seconds per test (the program's
    loading counts as one in assertion mode, where a timeout also ends the run); a run costs
    at most about ``(len(tests) + 1) * timeout`` seconds. ``memory_mb``: the child's address
    space. ``scratch_parent``: where the scratch directories go (default: the system's temp
    directory). ``isolation``: ``"namespace"`` or ``"audit_hook"``, default
    ``sandbox_isolation()``."""
    kind, cases = parse_tests(tests)
    if not timeout > 0 or memory_mb <= 0:
        raise InputError(f"timeout ({timeout}) and memory_mb ({memory_mb}) must be > 0")
    isolation = sandbox_isolation() if isolation is None else isolation
    _launch_prefix(isolation)  # checks the name
    args = (timeout, memory_mb, scratch_parent, isolation)
    if kind == "assert":
        passed = _run_asserts(program, cases, *args)
    else:
        passed = sum(_run_stdio_case(program, case, *args) for case in cases)
    return passed / len(cases)


@batched_rule
def pass_fraction(
    prompt_ids: Sequence,
    response_ids: Sequence,
    tokenizer: Any,
    tests: Sequence,
    timeout: float = 5.0,
    memory_mb: int = 512,
    max_workers: int | None = None,
    scratch_parent: str | None = None,
) -> list[float]:
    """Per sample, the fraction of its prompt's ``tests`` that the program in its response
    (``extract_program(tokenizer.decode(ids))``) passes (``run_tests``); samples run in
    parallel, at most ``max_workers`` at once (default ``os.cpu_count()``). Every sample's
    tests are checked before any program runs."""
    if not isinstance(tests, (list, tuple)) or len(tests) != len(response_ids):
        raise InputError(
            f"pass_fraction: tests must be a list with one entry per sample "
            f"({len(response_ids)}), got {type(tests).__name__}"
            + (f" of {len(tests)}" if isinstance(tests, (list, tuple)) else "")
        )
    for i, sample_tests in enumerate(tests):
        try:
            parse_tests(sample_tests)
        except InputError as err:
            raise InputError(f"sample {i}: {err}") from err
    if max_workers is not None and max_workers < 1:
        raise InputError(f"pass_fraction: max_workers must be >= 1, got {max_workers}")
    if not response_ids:
        return []
    programs = [extract_program(tokenizer.decode(list(ids))) for ids in response_ids]
    isolation = sandbox_isolation()
    workers = min(max_workers or os.cpu_count() or 1, len(programs))

    def one(i: int) -> float:
        return run_tests(
            programs[i],
            tests[i],
            timeout,
            memory_mb,
            scratch_parent=scratch_parent,
            isolation=isolation,
        )

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="code_tests") as pool:
        return list(pool.map(one, range(len(programs))))
