"""tools/serve_lifecycle.py without a server: the process tree from /proc, reaping re-parented orphans, the
first signal raising Stopping once, and in-flight counting. Each child process has a deadline."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from tools.serve_lifecycle import Lifecycle, alive, descendants, kill_tree

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, timeout: float = 60) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_descendants_and_kill_tree():
    sh = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 10
        while len(descendants(sh.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        kids = descendants(sh.pid)
        assert len(kids) == 2 and all(alive(k) for k in kids)
        assert set(kids) <= set(descendants(os.getpid()))
        kill_tree(root=sh.pid)
        sh.wait(10)  # sh's `wait` returns once its children are gone
        deadline = time.monotonic() + 10
        while any(alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(alive(k) for k in kids)
    finally:
        sh.kill()
        sh.wait(10)


def test_orphans_are_reparented_and_reaped():
    """A grandchild whose parent exits first (a Python-backend stub whose tritonserver is gone) comes to the
    subreaper, which collects it: nothing is left, not even a zombie."""
    out = _python("""
        import os, subprocess, time
        from tools.serve_lifecycle import become_subreaper, descendants, reap, _stat
        assert become_subreaper()
        subprocess.run(["sh", "-c", "sleep 0.3 & exit 0"], check=True)  # the sleep is orphaned
        kids = descendants(os.getpid())
        assert len(kids) == 1 and _stat(kids[0])[0] == os.getpid(), kids  # re-parented here
        deadline = time.monotonic() + 10
        while _stat(kids[0])[1] != "Z" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _stat(kids[0])[1] == "Z"  # exited, not yet collected
        reap()
        assert _stat(kids[0]) is None and descendants(os.getpid()) == []
        print("ok")
    """)
    assert out.strip() == "ok"


def test_first_signal_raises_stopping_once_then_sets_stop():
    out = _python("""
        import os, signal, time
        from tools.serve_lifecycle import Lifecycle, Stopping
        lines = []
        with Lifecycle(lines.append) as life:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
                raise SystemExit("no Stopping")
            except Stopping as stop:
                assert str(stop) == "SIGTERM" and life.stop.is_set() and life.why == "SIGTERM"
            assert 9 < life.left() <= 10
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored on exit
        print("ok")
    """)
    assert out.strip() == "ok"


def test_serving_signal_sets_stop_without_raising():
    out = _python("""
        import os, signal
        from tools.serve_lifecycle import Lifecycle
        with Lifecycle(print) as life:
            life.serving()
            os.kill(os.getpid(), signal.SIGINT)
            assert life.stop.wait(5) and life.why == "SIGINT"
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_second_signal_kills_the_tree_and_exits_1():
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, signal, subprocess, time
        from tools.serve_lifecycle import Lifecycle
        with Lifecycle(print) as life:
            life.serving()
            child = subprocess.Popen(["sleep", "30"])
            print("child", child.pid, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            life.stop.wait(5)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        print("not reached")
    """)], cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "not reached" not in proc.stdout, proc.stdout + proc.stderr
    assert "second SIGTERM: killing what is left now" in proc.stdout
    child = int(proc.stdout.split("child ")[1].split()[0])
    assert not alive(child)


def test_drain_waits_for_requests_in_flight():
    life = Lifecycle(lambda msg: None)
    release = threading.Event()
    model = life.counted(lambda requests: release.wait(10) and [r * 2 for r in requests])
    release.set()
    assert model([1, 2]) == [2, 4] and life.drain(0) == 0  # the wrapper returns what the model returns
    release.clear()
    t = threading.Thread(target=model, args=([3],))
    t.start()
    deadline = time.monotonic() + 5
    while life.drain(0) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert life.drain(0.1) == 1  # still running: drain gives up at its timeout
    threading.Timer(0.2, release.set).start()
    t0 = time.monotonic()
    assert life.drain(5) == 0 and time.monotonic() - t0 < 2
    t.join(5)
