"""Artifact generations: a re-export never touches the artifact that is being run or served.

    parent/
      art -> .art.csprt/3        a relative link, replaced atomically (a rename over it) when an export completes
      .art.csprt/3/              the current generation: manifest.json, graphs/, tokenizer/, engines/
      .art.csprt/2/              the previous one, kept until the next export completes: a reader that resolved
                                 the link just before a swap finishes on the files it started with
      .art.csprt/4.partial/      an export in progress, or killed: never loaded, removed by the next export
      .art.export.lock           the export lock (`export_lock`): held by an export, and by a build

An export starts from a clone of the current generation made of hard links (no bytes copied) and rewrites what
changed in the clone. Every write into an artifact is a temp file renamed into place, so a linked file is
replaced, never written through, and the current generation stays byte for byte what its manifest says.
`graphs.manifest.load_artifact` resolves the link once, so everything one Artifact reads comes from one generation.

An artifact directory written by an older csprt (a plain directory) becomes the previous generation at the
first export that replaces it: it is exchanged with the link atomically (renameat2 RENAME_EXCHANGE); a reader
that was loading that plain directory at that instant may see the new files and fail its hash check (one line).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from pathlib import Path

from graphs.errors import ArtifactError

PARTIAL = ".partial"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def generations_dir(out: str | os.PathLike) -> Path:
    """Where the generations of the artifact `out` live: `<parent>/.<name>.csprt`."""
    out = Path(out)
    return out.parent / f".{out.name}.csprt"


def export_lock(out: str | os.PathLike) -> Path:
    """The lock file that serialises the exports and builds of the artifact `out`: `<parent>/.<name>.export.lock`
    (graphs.atomic.exclusive_lock). Held by `csprt export` while it writes a generation and by `csprt build`
    while it writes engines into the current one, so neither works on a generation the other is replacing."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.export.lock"


def interrupted(out: str | os.PathLike) -> bool:
    """An export to `out` began and never completed, and `out` itself does not exist yet."""
    gens = generations_dir(out)
    return not Path(out).exists() and gens.is_dir() and any(p.name.endswith(PARTIAL) for p in gens.iterdir())


def _numbers(gens: Path) -> list[int]:
    return [int(p.name.split(".")[0]) for p in gens.iterdir() if p.name.split(".")[0].isdigit()]


def begin_generation(out: str | os.PathLike, is_artifact: bool) -> Path:
    """A new partial generation for an export to `out` (call it under the export lock): the current generation's
    files hard-linked into it, or empty when `out` is not an artifact yet. Partial generations left by killed
    exports are removed first.

    Args:
        out (path): the artifact path the user named (`--out`).
        is_artifact (bool): `out` holds an artifact (or an interrupted export) to start from.

    Raises:
        ArtifactError: `out` is a file, or a directory with other content than an artifact.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--out {out} exists and is not a directory; choose a directory path")
    if out.is_dir() and not out.is_symlink() and not is_artifact and any(out.iterdir()):
        raise ArtifactError(f"--out {out} is a directory with other content than a csprt artifact; choose a new "
                            "path (csprt export creates it) or empty it first")
    gens = generations_dir(out).absolute()
    gens.mkdir(parents=True, exist_ok=True)
    for p in gens.iterdir():  # killed exports; the previous generation stays until this one is published
        if p.name.endswith(PARTIAL):
            _remove(p)
    partial = gens / f"{max(_numbers(gens), default=0) + 1}{PARTIAL}"
    if is_artifact and out.is_dir():
        _link_tree(out.resolve(), partial)
    else:
        partial.mkdir()
    return partial


def _link_tree(src: Path, dst: Path) -> None:
    """dst: src's directories recreated and its files hard-linked (copied where links are not supported)."""
    for root, dirs, files in os.walk(src):
        here = dst / Path(root).relative_to(src)
        here.mkdir(parents=True, exist_ok=True)
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # temp dirs of a writer, never content
        for name in files:
            if name.startswith("."):  # temp files of an atomic write
                continue
            try:
                os.link(Path(root) / name, here / name)
            except OSError:
                shutil.copy2(Path(root) / name, here / name)


def publish(out: str | os.PathLike, partial: Path) -> Path:
    """Make the completed generation `partial` the artifact `out`: one atomic rename of the link. The generation
    that was current is kept as the previous one (until the next export completes); older ones are removed.
    Returns the generation directory.

    Args:
        out (path): the artifact path the user named.
        partial (Path): from `begin_generation`, with its manifest written.
    """
    out = Path(out)
    final = partial.with_name(partial.name[:-len(PARTIAL)])
    os.rename(partial, final)
    gens = final.parent
    link = out.parent / f".{out.name}.csprt-link"
    if link.is_symlink() or link.exists():
        _remove(link)
    os.symlink(os.path.relpath(final, out.parent), link)
    previous = None
    if out.is_symlink():
        previous = out.resolve()
        os.replace(link, out)
    elif out.is_dir():  # a plain directory (an older csprt's artifact, or an empty one): it becomes the previous
        _exchange(link, out)
        previous = gens / f"{final.name}.before"
        os.rename(link, previous)
    else:
        os.replace(link, out)
    keep = {final.name, previous.name if previous is not None and previous.parent.resolve() == gens.resolve() else None}
    for p in gens.iterdir():
        if p.name not in keep and not p.name.endswith(PARTIAL):
            _remove(p)
    return final


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> None:
    """Swap the directory entries `a` and `b` atomically (renameat2 RENAME_EXCHANGE, Linux >= 3.15). Where the
    file system lacks it, `b` is moved aside and `a` renamed to it: a moment without `b`."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None and fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return
    aside = b.with_name(b.name + ".csprt-aside")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)
