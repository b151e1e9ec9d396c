"""This process's and this host's memory, read from /proc (Linux; no psutil), for builds and benchmarks alike.

    rss_bytes()         VmRSS of this process, or None where /proc has none
    available_bytes()   MemAvailable of the host, else its physical memory
    PeakRss             `with PeakRss() as p: ...; p.peak`: the largest RSS sampled while the block runs

Both sides use it (`engines.build_memory` for build budgets, `engines.bench` and `exporter.bench` for peak
memory), so it lives in the contract layer rather than in one of them.
"""

from __future__ import annotations

import os
import threading


def _proc_kib(path: str, key: str) -> int | None:
    """The `key:` line of a /proc file in bytes (its value is in kB), or None where there is none."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident set size in bytes (VmRSS), or None where /proc has none."""
    return _proc_kib("/proc/self/status", "VmRSS")


def available_bytes() -> int:
    """What this host can give now: MemAvailable (Linux), else the physical memory."""
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class PeakRss:
    """`with PeakRss() as p: ...; p.peak`: the largest RSS sampled every `every` s while the block runs (None
    where /proc has none). Sampled, not VmHWM: resetting that would change what `/usr/bin/time -v` reports.

    Args:
        every (float): seconds between samples. Defaults to 0.05.
    """

    def __init__(self, every: float = 0.05):
        self.every, self.peak = every, rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="csprt-peak-rss", daemon=True)

    @property
    def peak_mib(self) -> float | None:
        return None if self.peak is None else self.peak / 2**20

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._take()

    def _take(self) -> None:
        now = rss_bytes()
        if now is not None:
            self.peak = max(self.peak or 0, now)

    def __enter__(self) -> PeakRss:
        if self.peak is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self._take()
