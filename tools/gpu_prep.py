"""Prepare the GPU acceptance run here, and print the exact device calls that carry it there.

    python -m tools.gpu_prep [--dir .gpu] [--limit-mib 64] [--budget 420]

1. wheels   what csprt needs on the device image beyond what it has (`DEVICE_IMAGE`): the pinned packages
            and their runtime dependencies, resolved from this environment's metadata, downloaded for
            CPython 3.12 manylinux x86-64 into DIR/wheels (kept between runs)
2. tiny     a tiny checkpoint and its csp artifact (both modes) in DIR/tiny, made once
3. payload  one tar of both, xz-compressed (x86 filter, preset 9e); wheels over 8 MiB are re-zipped stored first,
            so xz sees their bytes (libtensorrt_rtx.so.1 alone is 234 MB)
4. calls    the payload split into DIR/call<i>/ so that every call's working tree plus carried folder stays
            under the limit; the last call unpacks (`tools.gpu_unpack`) and runs `tools.gpu_check`

Calls before the last only deliver their part: the machine keeps ignored paths while warm (about 30 s
after a call), so make the calls back to back. `plan_calls` is pure and tested on CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from graphs.errors import ToolchainError
from tools.gpu_machine import ROOT, pinned_packages

MiB = 1 << 20
# On the device image already (torch 2.11+cu130, onnx 1.23.1, onnxruntime 1.30 CPU, onnxscript 0.7.2,
# transformers 5.17 and what they bring): never shipped, their dependencies not followed. typing-extensions is
# shipped (installed only where missing): jsonschema's `referencing` needs a recent one on Python 3.12.
DEVICE_IMAGE = frozenset({"torch", "numpy", "onnx", "onnxruntime", "onnxscript", "transformers", "tokenizers",
                          "safetensors", "huggingface-hub", "packaging", "filelock", "pyyaml",
                          "protobuf", "sympy", "networkx", "jinja2", "fsspec", "setuptools"})
# Pinned, but no part of gpu_check uses them: serving (gpu_check does not serve), plots, and test-only packages of
# tests that are not gpu-marked.
NOT_SHIPPED = frozenset({"nvidia-pytriton", "tritonclient", "matplotlib", "scikit-image", "segment-anything"})
PIP_DOWNLOAD = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
STORE_OVER = 8 * MiB
XZ_FILTERS = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
COMMAND_MAX, CARRY_MAX, TIMEOUT_MAX = 2000, 8, 600
MARGIN = MiB // 2  # headroom under the limit: the tree may grow a little before the calls are made


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_wheels(pins: dict[str, str], requires, version) -> dict[str, str]:
    """{distribution: version} to ship: the pins minus `DEVICE_IMAGE` and `NOT_SHIPPED`, plus their runtime
    dependencies (markers evaluated for CPython 3.12 on Linux), at this environment's versions.

    Args:
        pins (dict[str, str]): pyproject.toml's pins.
        requires (callable): name -> list of Requires-Dist strings or None (importlib.metadata.requires).
        version (callable): name -> installed version (importlib.metadata.version).
    """
    from packaging.requirements import Requirement

    env = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
           "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython", "extra": ""}
    todo = [n for n in map(_norm, pins) if n not in DEVICE_IMAGE | NOT_SHIPPED]
    out: dict[str, str] = {}
    while todo:
        name = todo.pop(0)
        if name in out:
            continue
        out[name] = pins.get(name) or version(name)
        for line in requires(name) or ():
            req = Requirement(line)
            dep = _norm(req.name)
            if (req.marker is None or req.marker.evaluate(env)) and dep not in DEVICE_IMAGE and dep not in out:
                todo.append(dep)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Call:
    index: int            # 1-based
    carry: str            # the one folder it carries, e.g. ".gpu/call1"
    part_bytes: int       # payload bytes in it
    tree_bytes: int       # the working tree, which travels with every call
    command: str
    timeout_s: int

    @property
    def total_bytes(self) -> int:
        return self.tree_bytes + self.part_bytes


def split_sizes(total: int, parts: int) -> list[int]:
    """`total` bytes in `parts` near-equal pieces (the first ones one byte larger)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def plan_calls(tree_bytes: int, payload_bytes: int, limit_bytes: int = 64 * MiB, budget_s: float = 420.0,
               folder: str = ".gpu", manifest_bytes: int = 4096) -> list[Call]:
    """The device calls: payload parts sized so that tree + part (+ the parts list) stays under the limit.

    Raises:
        ToolchainError: the tree alone leaves no room, or a command or timeout would break the device's limits.
    """
    room = limit_bytes - MARGIN - tree_bytes - manifest_bytes
    if room <= 0:
        raise ToolchainError(f"the working tree ({tree_bytes / MiB:.1f} MiB) leaves no room under the "
                             f"{limit_bytes / MiB:.0f} MiB a call carries; remove large untracked files from it")
    sizes = split_sizes(payload_bytes, max(1, math.ceil(payload_bytes / room)))
    unpack = f"python3 -m tools.gpu_unpack --dir {folder}"
    final = (f"{unpack} --dest /tmp/gpu --site /tmp/site && PYTHONPATH=/tmp/site python3 -m tools.gpu_check "
             f"--tiny /tmp/gpu/tiny --budget {budget_s:.0f}")
    calls = []
    for i, size in enumerate(sizes, 1):
        last = i == len(sizes)
        calls.append(Call(i, f"{folder}/call{i}", size + (manifest_bytes if last else 0), tree_bytes,
                          final if last else f"{unpack} --check", int(budget_s + 90) if last else 60))
    for c in calls:
        if len(c.command) > COMMAND_MAX or c.timeout_s > TIMEOUT_MAX or c.total_bytes > limit_bytes:
            raise ToolchainError(f"call {c.index} breaks a device limit (command {len(c.command)} chars, at most "
                                 f"{COMMAND_MAX}; timeout {c.timeout_s} s, at most {TIMEOUT_MAX}; {c.total_bytes} "
                                 f"bytes, at most {limit_bytes}); lower --budget")
    return calls


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what travels with every call: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    return sum((root / p).stat().st_size for p in out.decode().split("\0") if p and (root / p).is_file())


# --- gathering (network, minutes) -------------------------------------------------------------------

def download(wheels: dict[str, str], dest: Path, say) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    have = {_norm(p.name.split("-")[0]) + "==" + p.name.split("-")[1]: p for p in dest.glob("*.whl")}
    missing = [f"{n}=={v}" for n, v in wheels.items() if f"{n}=={v}" not in have]
    if missing:
        say(f"downloading {len(missing)} wheels: {' '.join(missing)}")
        subprocess.run(PIP_DOWNLOAD + ["-d", str(dest), *missing], check=True)
    have = {_norm(p.name.split("-")[0]) + "==" + p.name.split("-")[1]: p for p in dest.glob("*.whl")}
    lost = [f"{n}=={v}" for n, v in wheels.items() if f"{n}=={v}" not in have]
    if lost:
        raise ToolchainError(f"pip download gave no wheel for {', '.join(lost)}")
    return [have[f"{n}=={v}"] for n, v in wheels.items()]


def stored(wheel: Path, cache: Path) -> Path:
    """`wheel` re-zipped without compression (same files, same RECORD), when it is over `STORE_OVER`."""
    if wheel.stat().st_size <= STORE_OVER:
        return wheel
    out = cache / wheel.name
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out.with_suffix(".tmp"), "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                data = src.read(info)  # before the compress type changes: `info` is the reader's own entry
                info.compress_type = zipfile.ZIP_STORED
                dst.writestr(info, data)
        out.with_suffix(".tmp").rename(out)
    return out


def tiny(folder: Path, say) -> Path:
    """DIR/tiny/{checkpoint,artifact}: `csprt make-tiny` and its csp export (both modes), made again when this
    csprt no longer loads the artifact (e.g. a newer manifest schema)."""
    from graphs.errors import ArtifactError
    from graphs.manifest import load_artifact

    try:
        load_artifact(folder / "artifact")
        fresh = (folder / "checkpoint" / "config.json").is_file()
    except ArtifactError:
        fresh = False
    if not fresh:
        say(f"making the tiny checkpoint and artifact in {folder}")
        shutil.rmtree(folder, ignore_errors=True)
        csprt = [sys.executable, "-m", "tools"]
        for cmd in (["make-tiny", str(folder / "checkpoint")],
                    ["export", str(folder / "checkpoint"), "--schedule", "csp", "--mode", "both", "--out",
                     str(folder / "artifact")]):
            subprocess.run(csprt + cmd, check=True, cwd=ROOT, stdout=sys.stderr)  # stdout: the calls only
    return folder


def payload(members: dict[str, Path], out: Path, say) -> Path:
    """One .tar.xz of `members` (archive name -> file or folder); rebuilt only when a member changed."""
    key = json.dumps(sorted((a, p.stat().st_size, p.stat().st_mtime_ns) for a, p in members.items()))
    key_file = out.with_suffix(".key")
    if out.is_file() and key_file.is_file() and key_file.read_text() == key:
        return out
    say(f"compressing {len(members)} members into {out} (xz -9e with the x86 filter; minutes)")
    with lzma.open(out.with_suffix(".tmp"), "wb", format=lzma.FORMAT_XZ, filters=XZ_FILTERS) as xz, \
            tarfile.open(fileobj=xz, mode="w") as tar:
        for arcname, path in sorted(members.items()):
            tar.add(path, arcname=arcname)
    out.with_suffix(".tmp").rename(out)
    key_file.write_text(key)
    return out


def split(payload_path: Path, calls: list[Call], folder: Path, wheels: dict[str, str]) -> None:
    """Write each call's part into its folder, and the parts list (sizes, sha256) into the last one."""
    for old in folder.glob("call*"):
        shutil.rmtree(old)
    parts = []
    with payload_path.open("rb") as src:
        for c in calls:
            size = c.part_bytes - (4096 if c is calls[-1] else 0)
            data = src.read(size)
            rel = f"call{c.index}/payload.part{c.index:02d}"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
            parts.append({"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    listing = json.dumps({"parts": parts, "wheels": wheels}, indent=1)
    if len(listing) > 4096:
        raise ToolchainError("the parts list is over the 4096 bytes planned for it")
    (folder / f"call{calls[-1].index}" / "parts.json").write_text(listing)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_prep", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=".gpu", help="ignored folder, relative to the repository. Defaults to .gpu")
    p.add_argument("--limit-mib", type=float, default=64.0, help="bytes one call carries, in MiB. Defaults to 64.")
    p.add_argument("--budget", type=float, default=420.0, help="gpu_check's --budget. Defaults to 420.")
    args = p.parse_args(argv)
    say = lambda msg: print(f"[gpu_prep] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    folder = ROOT / args.dir
    if subprocess.run(["git", "check-ignore", "-q", args.dir.rstrip("/") + "/"], cwd=ROOT).returncode != 0:
        print(f"gpu_prep: error: {args.dir} is not ignored by git; add it to .gitignore", file=sys.stderr)
        return 2
    from importlib.metadata import requires, version

    wheels = device_wheels(pinned_packages(), requires, version)
    files = download(wheels, folder / "wheels", say)
    members = {f"wheels/{w.name}": stored(w, folder / "stored") for w in files}
    members["tiny"] = tiny(folder / "tiny", say)
    packed = payload(members, folder / "payload.tar.xz", say)
    calls = plan_calls(tree_bytes(), packed.stat().st_size, int(args.limit_mib * MiB), args.budget, args.dir)
    split(packed, calls, folder, wheels)
    print(format_calls(calls, wheels, {f.name: f.stat().st_size for f in files}, packed.stat().st_size))
    return 0


def format_calls(calls: list[Call], wheels: dict[str, str], wheel_bytes: dict[str, int], payload_bytes: int) -> str:
    lines = [f"wheels ({len(wheels)}): " + ", ".join(f"{n}=={v}" for n, v in wheels.items()),
             f"payload {payload_bytes / MiB:.2f} MiB (wheels {sum(wheel_bytes.values()) / MiB:.2f} MiB as "
             f"downloaded, plus the tiny checkpoint and artifact), in {len(calls)} call(s); make them back to back:"]
    for c in calls:
        lines += ["", f"call {c.index}: carry {json.dumps([c.carry])}, timeout_s {c.timeout_s}, carries "
                      f"{c.total_bytes / MiB:.2f} MiB (tree {c.tree_bytes / MiB:.2f} + part {c.part_bytes / MiB:.2f})",
                  f"  command ({len(c.command)} chars): {c.command}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
