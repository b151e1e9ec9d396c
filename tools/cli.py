"""`csprt`: one entry point, one module per subcommand.

Each subcommand module exposes `add_parser(subparsers)` and `run(args) -> int`. Flags default to
None so only what the user set is applied. Any ToolchainError becomes one line on stderr and exit 2;
a failed check (parity, validation) exits 1.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from graphs.errors import ToolchainError

# subcommand -> module under tools/
COMMANDS = {
    "make-tiny": "tools.make_tiny",
    "flops": "tools.flops",
    "export": "tools.export",
    "build": "tools.build",
    "run": "tools.run",
    "validate": "tools.validate",
    "bench": "tools.bench",
    "serve": "tools.serve",
    "triton-repo": "tools.triton_repo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csprt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub, name)
    return parser


def _one_line(message: str) -> str:
    """Fold a multi-line message (e.g. a list of checkpoint key problems) into one line: "head item; item"."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message
    return f"{lines[0]} {'; '.join(lines[1:])}"


# OSErrors that say the machine, not csprt, refused (disk full, read-only or forbidden output, ...), with the fix.
_HOST_ERRORS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "choose a writable location",
    errno.EACCES: "check the permissions or choose another location",
    errno.EPERM: "check the permissions or choose another location",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ENOTDIR: "a parent of this path is a file; choose another path",
    errno.EISDIR: "this path is a directory; name a file",
    errno.EMFILE: "raise the open-file limit (ulimit -n)",
    errno.EEXIST: "a file is in the way of a directory csprt creates; choose another path or move the file",
}


def host_error_line(exc: OSError) -> str | None:
    """One line for an OSError the host raised (what, where, the fix), or None for any other OSError."""
    fix = _HOST_ERRORS.get(exc.errno)
    if fix is None:
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or errno.errorcode.get(exc.errno, exc.errno)}{where}; {fix}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ToolchainError as exc:
        print(f"csprt {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        line = host_error_line(exc)
        if line is None:
            raise
        print(f"csprt {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"csprt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
