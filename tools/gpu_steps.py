"""`tools.gpu_check`'s clock and subprocess steps: a total budget, a budget per part, one line per skip.

    clock = Clock(total_s=420)               # the whole check stops itself before total_s
    part = clock.part("torch_bench", cap_s=180)
    step = run_step("bench", [sys.executable, "-m", "tools", "bench", ...], part, log, work)
    step.status                              # "passed" | "failed" | "timeout" | "skipped"

Every step is a subprocess in its own process group, killed (TERM, then KILL) at its deadline:
min(the part's deadline, the total deadline less a reserve for writing the report). Its stdout and
stderr go to files under the work directory; their tails go to the log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

def print_report(prog: str, measure, json_path: Path | None) -> int:
    """A GPU measuring tool's ending (`tools.gpu_decode`, `tools.gpu_weights`): the report of `measure()` printed
    as JSON (and written to `json_path`), or its ToolchainError as one line; the exit status."""
    import json

    from graphs.errors import ToolchainError

    try:
        report = measure()
    except ToolchainError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if json_path is not None:
        from graphs.atomic import write_json

        write_json(report, json_path)
    print(json.dumps(report, indent=1))
    return 0


RESERVE_S = 10.0   # kept back from the total for the report, the summary and the process exits
LOG_TAIL = 64_000  # characters of each step's output copied to the log (the log must stay well under 16 MiB)


class Clock:
    """The whole check's deadline, and the deadline of each part inside it."""

    def __init__(self, total_s: float, now=time.monotonic):
        self.now = now
        self.start, self.total_s = now(), float(total_s)

    def left(self) -> float:
        """Seconds left for parts (the reserve excluded)."""
        return self.start + self.total_s - RESERVE_S - self.now()

    def elapsed(self) -> float:
        return self.now() - self.start

    def part(self, name: str, cap_s: float) -> "PartClock":
        return PartClock(self, name, min(float(cap_s), max(0.0, self.left())))


class PartClock:
    def __init__(self, clock: Clock, name: str, budget_s: float):
        self.clock, self.name, self.budget_s = clock, name, budget_s
        self.start = clock.now()

    def left(self) -> float:
        return min(self.start + self.budget_s - self.clock.now(), self.clock.left())

    def elapsed(self) -> float:
        return self.clock.now() - self.start


@dataclass
class Step:
    name: str
    command: list[str]
    status: str                 # "passed" | "failed" | "timeout" | "skipped"
    rc: int | None = None
    wall_s: float = 0.0
    reason: str | None = None   # why skipped or failed, one line
    stdout: str = field(default="", repr=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("stdout")
        return d


class Log:
    """Lines to `path` and stderr ("[gpu_check] ..."); step output tails to `path` only."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("", encoding="utf-8")

    def say(self, msg: str) -> None:
        print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)
        self.raw(f"[gpu_check] {msg}\n")

    def raw(self, text: str) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)


def error_line(text: str) -> str | None:
    """The line that says what went wrong: the last "error" line of a tool's stderr, else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower() or "Error" in ln:
            return ln[:2000]
    return lines[-1][:2000] if lines else None


def run_step(name: str, command: list[str], part: PartClock, log: Log, work: Path, min_s: float = 5.0,
             env: dict | None = None, cwd: Path | None = None) -> Step:
    """Run `command` within what is left of `part`; skip it when less than `min_s` is left."""
    left = part.left()
    if left < min_s:
        step = Step(name, command, "skipped", reason=f"{max(left, 0):.0f} s left in part {part.name!r}, needs at "
                                                     f"least {min_s:g} s")
        log.say(f"{part.name}/{name}: skipped: {step.reason}")
        return step
    log.say(f"{part.name}/{name}: {' '.join(command)} (at most {left:.0f} s)")
    work.mkdir(parents=True, exist_ok=True)
    out_path, err_path = work / f"{part.name}.{name}.stdout", work / f"{part.name}.{name}.stderr"
    t0 = time.monotonic()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=left)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc, timed_out = proc.returncode, True
    wall = time.monotonic() - t0
    stdout = out_path.read_text(encoding="utf-8", errors="replace")
    stderr = err_path.read_text(encoding="utf-8", errors="replace")
    log.raw(f"--- {part.name}/{name} stderr (tail) ---\n{stderr[-LOG_TAIL:]}\n"
            f"--- {part.name}/{name} stdout (tail) ---\n{stdout[-LOG_TAIL:]}\n")
    if timed_out:
        step = Step(name, command, "timeout", rc, wall, f"stopped after {wall:.0f} s (its time in part "
                                                        f"{part.name!r} ran out)", stdout)
    elif rc == 0:
        step = Step(name, command, "passed", rc, wall, None, stdout)
    else:
        step = Step(name, command, "failed", rc, wall, error_line(stderr) or f"exit code {rc}", stdout)
    log.say(f"{part.name}/{name}: {step.status} in {wall:.1f} s" + (f": {step.reason}" if step.reason else ""))
    return step


def _kill(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
