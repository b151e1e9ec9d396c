"""Device side of `tools.gpu_prep`: join the payload parts the calls carried, unpack, install missing wheels.

    python3 -m tools.gpu_unpack --dir .gpu --check                                  # a call before the last
    python3 -m tools.gpu_unpack --dir .gpu --dest /tmp/gpu --site /tmp/site       # the last call

The parts list (DIR/call<n>/parts.json, in the last call) gives every part's size and sha256; a part
missing means the machine was handed back between calls. Only wheels whose distribution is not
installed on the machine are installed (into --site, to put first on PYTHONPATH), so the image's own
torch, numpy and transformers are never shadowed. Standard library only: nothing else is there yet.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import subprocess
import sys
import tarfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


class _Joined(io.RawIOBase):
    """The parts, read back to back as one stream."""

    def __init__(self, paths: list[Path]):
        self.files = [p.open("rb") for p in paths]

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self.files:
            n = self.files[0].readinto(buf)
            if n:
                return n
            self.files.pop(0).close()
        return 0


def _sha256(path: Path) -> str:
    # graphs.manifest.file_sha256 is not importable here (standard library only until the wheels are installed)
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_parts(folder: Path) -> tuple[list[Path], dict]:
    """The parts in order, verified against the parts list, and the list itself.

    Raises:
        SystemExit: no parts list, or a part missing or changed (one line saying which and what to do).
    """
    listings = sorted(folder.glob("call*/parts.json"))
    if not listings:
        raise SystemExit(f"gpu_unpack: error: no {folder}/call*/parts.json: carry the last call's folder")
    listing = json.loads(listings[-1].read_text())
    paths = []
    for i, part in enumerate(listing["parts"], 1):
        path = folder / part["path"]
        if not path.is_file():
            raise SystemExit(f"gpu_unpack: error: part {i} of {len(listing['parts'])} ({path}) is missing: the "
                             "machine was handed back between calls; make the calls again, back to back")
        if path.stat().st_size != part["bytes"] or _sha256(path) != part["sha256"]:
            raise SystemExit(f"gpu_unpack: error: part {i} ({path}) is not the one gpu_prep wrote; run gpu_prep "
                             "again and carry its output")
        paths.append(path)
    return paths, listing


def _dist(wheel: Path) -> str:
    return wheel.name.split("-")[0].replace("_", "-").lower()


def install(wheels: list[Path], site: Path) -> dict:
    """Install the wheels whose distribution is missing here; {"installed": [...], "present": {name: version}}."""
    present, todo = {}, []
    for w in wheels:
        try:
            present[_dist(w)] = version(_dist(w))
        except PackageNotFoundError:
            todo.append(w)
    if todo:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, todo)], check=True)
    return {"installed": [w.name for w in todo], "present": present}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tools.gpu_unpack", description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path(".gpu"))
    p.add_argument("--dest", type=Path, default=Path("/tmp/gpu"))
    p.add_argument("--site", type=Path, default=Path("/tmp/site"))
    p.add_argument("--check", action="store_true", help="only list the parts present (a call before the last)")
    args = p.parse_args(argv)
    if args.check:
        for part in sorted(args.dir.glob("call*/payload.part*")):
            print(f"{part} {part.stat().st_size} bytes sha256 {_sha256(part)}")
        return 0
    paths, listing = check_parts(args.dir)
    args.dest.mkdir(parents=True, exist_ok=True)
    with lzma.open(io.BufferedReader(_Joined(paths), 1 << 20)) as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        tar.extractall(args.dest, filter="data")
    done = install(sorted((args.dest / "wheels").glob("*.whl")), args.site)
    print(f"gpu_unpack: {len(paths)} parts joined into {args.dest}; installed into {args.site}: "
          f"{', '.join(done['installed']) or 'nothing'}; already here: "
          f"{', '.join(f'{k}=={v}' for k, v in done['present'].items()) or 'nothing'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
