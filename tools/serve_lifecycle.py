"""`csprt serve`'s lifecycle: SIGTERM or SIGINT at any moment ends it within SHUTDOWN_S, with nothing left running.

    loading, warm-up, Triton starting   the first signal raises `Stopping` in the main thread at its next Python
                                        bytecode: the load is abandoned, whatever started is stopped below
    serving                             requests in flight finish (up to DRAIN_S; idle keep-alive connections
                                        are not waited for), then tritonserver gets SIGINT and TRITON_EXIT_S
    then                                PyTriton's own cleanup (handler threads, workspace) in a bounded wait;
                                        every descendant still alive is killed, and every one is reaped
    always                              a watchdog started by the first signal kills what is left and exits 1
                                        at WATCHDOG_S if the steps above have not finished; a second signal
                                        does the same at once

csprt serve makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so a Python-backend stub whose
tritonserver exits first is re-parented to it and reaped here, not left as a zombie. Processes are read
from /proc (Linux), without psutil.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import threading
import time
from typing import Callable

SHUTDOWN_S = 10.0    # from the signal to the process's exit (orchestrators kill at 30 s; the issue asks 10)
DRAIN_S = 5.0        # requests in flight get this long to finish
TRITON_EXIT_S = 2    # tritonserver --exit-timeout-secs: nothing is in flight when it gets SIGINT
WATCHDOG_S = 9.0     # the last resort: kill every descendant and exit 1
_PR_SET_CHILD_SUBREAPER = 36


class Stopping(BaseException):
    """The first SIGTERM/SIGINT while csprt serve loads or starts Triton (a BaseException: no `except Exception`
    on the way may swallow it)."""


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(ppid, state, comm) of `pid` from /proc, or None when it is gone."""
    try:
        text = open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    state, ppid = text[text.rindex(")") + 2:].split()[:2]
    return int(ppid), state, comm


def descendants(pid: int) -> list[int]:
    """Every descendant of `pid` (children first), zombies included."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            parents.setdefault(st[0], []).append(int(name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] not in ("Z", "X")


def reap(skip: Callable[[str], bool] = lambda comm: False) -> None:
    """Collect the exit status of this process's exited children (re-parented stubs included), except those
    whose command name `skip` names (a child that another thread waits for)."""
    for pid in descendants(os.getpid()):
        st = _stat(pid)
        if st is not None and st[0] == os.getpid() and st[1] == "Z" and not skip(st[2]):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def kill_tree(sig: int = signal.SIGKILL, root: int | None = None) -> None:
    """Send `sig` to every descendant of `root` (default: this process)."""
    for pid in descendants(os.getpid() if root is None else root):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux >= 3.4); False where not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Lifecycle:
    """Signal handling and in-flight counting for one `csprt serve` run (a context manager: handlers installed
    on entry, restored on exit).

    Args:
        progress (Callable[[str], None]): one line per lifecycle step.
    """

    def __init__(self, progress: Callable[[str], None]):
        self.progress = progress
        self.stop = threading.Event()
        self.why = ""
        self.signalled_at: float | None = None
        self._interrupt = True
        self._in_flight = 0
        self._idle = threading.Condition()
        self._previous: dict = {}

    def __enter__(self) -> "Lifecycle":
        become_subreaper()
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    # -- signals --------------------------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.stop.is_set():
            self.progress(f"second {name}: killing what is left now")
            self._force(f"second {name}")
        self.why, self.signalled_at = name, time.monotonic()
        self.stop.set()
        threading.Thread(target=self._watchdog, name="csprt-serve-watchdog", daemon=True).start()
        if self._interrupt:
            self._interrupt = False  # raised once; the cleanup that follows runs undisturbed
            raise Stopping(name)

    def serving(self) -> None:
        """Triton answers from now on: a signal sets `stop` for the main loop instead of raising."""
        self._interrupt = False

    def left(self) -> float:
        """Seconds of the shutdown budget left (the whole budget before any signal)."""
        if self.signalled_at is None:
            return SHUTDOWN_S
        return max(0.0, self.signalled_at + SHUTDOWN_S - time.monotonic())

    def _watchdog(self) -> None:
        time.sleep(max(0.0, self.signalled_at + WATCHDOG_S - time.monotonic()))
        self.progress(f"{self.why}: not stopped within {WATCHDOG_S:g} s; killing what is left")
        self._force("watchdog")

    @staticmethod
    def _force(_why: str) -> None:
        kill_tree(signal.SIGKILL)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and any(alive(p) for p in descendants(os.getpid())):
            time.sleep(0.02)
        reap()
        os._exit(1)

    # -- requests in flight ---------------------------------------------------------------------
    def counted(self, model):
        """`model` (an inference callable) wrapped so the requests it is running are counted for `drain`."""
        life = self

        class Counted:
            def __init__(self):
                self.model = model

            def __call__(self, requests):
                with life._idle:
                    life._in_flight += 1
                try:
                    return model(requests)
                finally:
                    with life._idle:
                        life._in_flight -= 1
                        life._idle.notify_all()

        return Counted()

    def drain(self, timeout_s: float) -> int:
        """Wait until no request is running, at most `timeout_s`; the number still running."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._in_flight and time.monotonic() < deadline:
                self._idle.wait(max(0.0, deadline - time.monotonic()))
            return self._in_flight


def stop_triton(triton, life: Lifecycle) -> None:
    """Stop tritonserver and PyTriton within the shutdown budget; afterwards no descendant is left, zombies included.

    Args:
        triton (pytriton.triton.Triton | None): the server, or None when it was never created.
        life (Lifecycle): for the budget and progress.
    """
    me = os.getpid()
    servers = [p for p in descendants(me) if (_stat(p) or (0, "", ""))[2] == "tritonserver"]
    for pid in servers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + max(0.5, min(TRITON_EXIT_S + 2.0, life.left() - 3.0))
    while any(alive(p) for p in servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in servers:
        if alive(pid):
            life.progress(f"tritonserver (pid {pid}) did not exit in time; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if triton is not None:  # PyTriton's cleanup: handler threads, sockets, workspace; bounded
        cleanup = threading.Thread(target=_quietly(triton.stop), name="csprt-pytriton-stop", daemon=True)
        cleanup.start()
        cleanup.join(max(0.5, life.left() - 2.0))
    kill_tree(signal.SIGKILL)  # anything left (a stub re-parented here); nothing normally
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        reap(skip=lambda comm: comm == "tritonserver")  # sh's thread waits for tritonserver itself
        if not descendants(me):
            break
        time.sleep(0.02)
    reap()


def _quietly(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        with contextlib.suppress(Exception):
            fn()
    return run
