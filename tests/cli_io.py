"""In-process `csprt` calls for CLI tests: exit code, stdout and stderr, and the stderr lines that are errors."""

from __future__ import annotations

import contextlib
import io

from tools import cli


def call(argv: list[str]) -> tuple[int, str, str]:
    """cli.main in-process with stdout/stderr captured (usable from module-scoped fixtures, unlike capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def error_lines(stderr: str) -> list[str]:
    """stderr lines that are neither `[csprt ...]` progress nor tqdm progress bars (transformers' loading bar)."""
    lines = []
    for raw in stderr.splitlines():
        line = raw.split("\r")[-1].strip()  # tqdm redraws with \r
        if not line or line.startswith("[csprt") or "it/s]" in line or "%|" in line:
            continue
        lines.append(line)
    return lines
