"""Adversarial inputs to every command, by class: each must end in one `csprt <command>: error:` line and exit 2,
within a time bound, with no traceback and nothing written. In-process (tests.cli_io.call) on the session's tiny
checkpoint and a module copy of its artifact; a case that edits either works on its own copy.

Classes: reads (unbounded or special files), inputs (what the code never imagined), weights (the checkpoint),
artifact (the sealed artifact), bounds (flags checked before work), concurrency. Shutdown cases live in
tests/tools/test_serve.py and tests/tools/test_serve_lifecycle.py, kill -9 cases in tests/tools/test_kill_trials.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graphs.manifest import MANIFEST_NAME, sealed
from tests.cli_io import call, error_lines

TIME_BOUND_S = 60  # per case; most take well under a second
QUERY = "Where is the cat?"


@pytest.fixture(scope="module")
def base(tiny_ckpt, export_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adversarial")
    art = root / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    image = root / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    return {"ckpt": tiny_ckpt, "art": art, "image": image}


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit_json(path: Path, edit, reseal: bool = False) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(sealed(data) if reseal else data))


def _run(art, image, *extra, query=QUERY) -> list[str]:
    return ["run", str(art), "--image", str(image), "--query", query, *extra]


# Each case: (class, setup(base, tmp) -> argv, words the error line must contain).
def _reads():
    def fifo(b, t):
        os.mkfifo(t / "pipe.png")
        return _run(b["art"], t / "pipe.png")

    def sock(b, t):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(t / "sock.png"))
        return _run(b["art"], t / "sock.png")

    def sparse(b, t):
        with open(t / "huge.png", "wb") as f:
            f.truncate(300 * 2**20)  # 300 MiB of holes: refused by size, never read
        return _run(b["art"], t / "huge.png")

    def schedule_fifo(b, t):
        os.mkfifo(t / "schedule.json")
        return ["export", str(b["ckpt"]), "--schedule", str(t / "schedule.json"), "--out", str(t / "o")]

    def config_fifo(b, t):
        ck = _copy(b["ckpt"], t / "ck")
        (ck / "config.json").unlink()
        os.mkfifo(ck / "config.json")
        return ["export", str(ck), "--schedule", "csp", "--out", str(t / "o")]

    def manifest_fifo(b, t):
        art = _copy(b["art"], t / "a")
        (art / MANIFEST_NAME).unlink()
        os.mkfifo(art / MANIFEST_NAME)
        return _run(art, b["image"])

    return {
        "image-dev-zero": ("reads", lambda b, t: _run(b["art"], "/dev/zero"), ["not a regular file"]),
        "image-dev-null": ("reads", lambda b, t: _run(b["art"], "/dev/null"), ["not a regular file"]),
        "image-fifo": ("reads", fifo, ["not a regular file"]),
        "image-socket": ("reads", sock, []),
        "image-directory": ("reads", lambda b, t: _run(b["art"], t), []),
        "image-300-mib-sparse": ("reads", sparse, ["over the limit"]),
        "query-10-mb": ("reads", lambda b, t: _run(b["art"], b["image"], query="cat " * 2_500_000), ["query"]),
        "schedule-fifo": ("reads", schedule_fifo, []),
        "config-fifo": ("reads", config_fifo, []),
        "manifest-fifo": ("reads", manifest_fifo, []),
        "validate-image-dev-zero": ("reads", lambda b, t: ["validate", str(b["art"]), "--image", "/dev/zero"],
                                    ["not a regular file"]),
    }


def _png(t: Path, name: str, hw, data: bytes | None = None) -> Path:
    path = t / name
    if data is not None:
        path.write_bytes(data)
    else:
        Image.fromarray(np.zeros((*hw, 3), np.uint8)).save(path)
    return path


def _inputs():
    return {
        "query-empty": ("inputs", lambda b, t: _run(b["art"], b["image"], query=""), ["query"]),
        "query-blank": ("inputs", lambda b, t: _run(b["art"], b["image"], query=" \t "), ["query"]),
        "query-image-token": ("inputs", lambda b, t: _run(b["art"], b["image"], query="is <image> a cat"), ["<image>"]),
        "query-seg-token": ("inputs", lambda b, t: _run(b["art"], b["image"], query="[SEG] where"), ["[SEG]"]),
        "query-eos-token": ("inputs", lambda b, t: _run(b["art"], b["image"], query="cat </s>"), ["</s>"]),
        "query-lone-surrogate": ("inputs", lambda b, t: _run(b["art"], b["image"], query="cat \udcff"), ["UTF-8"]),
        "image-empty-file": ("inputs", lambda b, t: _run(b["art"], _png(t, "e.png", None, b"")), []),
        "image-truncated-png": ("inputs", lambda b, t: _run(b["art"], _png(t, "t.png", None,
                                                                           b["image"].read_bytes()[:60])), []),
        "image-text-file": ("inputs", lambda b, t: _run(b["art"], _png(t, "x.png", None, b"just text\n")), []),
        "image-1x5000-strip": ("inputs", lambda b, t: _run(b["art"], _png(t, "s.png", (1, 5000))), ["aspect ratio"]),
        "image-5000x1-strip": ("inputs", lambda b, t: _run(b["art"], _png(t, "s.png", (5000, 1))), ["aspect ratio"]),
        "image-missing": ("inputs", lambda b, t: _run(b["art"], t / "nope.png"), []),
        "run-target-missing": ("inputs", lambda b, t: _run(t / "nothing", b["image"]), []),
        "run-torch-on-artifact": ("inputs", lambda b, t: _run(b["art"], b["image"], "--backend", "torch"),
                                  ["--backend torch"]),
        "run-mode-not-exported": ("inputs", lambda b, t: _run(export_single(b, t), b["image"], "--mode", "generate"),
                                  ["generate"]),
        "flops-unknown-schedule": ("inputs", lambda b, t: ["flops", "--shape", "lisa-7b", "--schedule", "nope"],
                                   ["nope"]),
        "flops-missing-checkpoint": ("inputs", lambda b, t: ["flops", "--checkpoint", str(t / "x"), "--schedule",
                                                             "csp"], []),
        "export-unknown-schedule": ("inputs", lambda b, t: ["export", str(b["ckpt"]), "--schedule", "nope", "--out",
                                                            str(t / "o")], ["nope"]),
        "export-checkpoint-missing": ("inputs", lambda b, t: ["export", str(t / "x"), "--schedule", "csp", "--out",
                                                              str(t / "o")], []),
        "export-checkpoint-is-artifact": ("inputs", lambda b, t: ["export", str(b["art"]), "--schedule", "csp",
                                                                  "--out", str(t / "o")], []),
        "export-out-is-a-file": ("inputs", lambda b, t: ["export", str(b["ckpt"]), "--schedule", "csp", "--out",
                                                         str(_png(t, "f.png", (2, 2)))], ["not a directory"]),
        "export-out-unrelated-dir": ("inputs", lambda b, t: ["export", str(b["ckpt"]), "--schedule", "csp", "--out",
                                                             str(_unrelated(t))], ["other content"]),
        "validate-checkpoint-as-artifact": ("inputs", lambda b, t: ["validate", str(b["ckpt"])], []),
        "triton-repo-name-escapes": ("inputs", lambda b, t: ["triton-repo", str(b["art"]), "--out", str(t / "r"),
                                                             "--name", "../evil"], []),
        "make-tiny-over-a-file": ("inputs", lambda b, t: ["make-tiny", str(_png(t, "f.png", (2, 2)))],
                                  ["choose another path"]),
        "run-out-is-a-file": ("inputs", lambda b, t: _run(b["art"], b["image"], "--out",
                                                          str(_png(t, "f.png", (2, 2)))), []),
        "export-cache-is-a-file": ("inputs", lambda b, t: ["export", str(b["ckpt"]), "--schedule", "csp", "--out",
                                                           str(t / "o"), "--cache", str(_png(t, "f.png", (2, 2)))],
                                   []),
        "triton-repo-out-is-the-artifact": ("inputs", lambda b, t: ["triton-repo", str(b["art"]), "--out",
                                                                    str(b["art"])], []),
        "bench-missing-artifact": ("inputs", lambda b, t: ["bench", str(t / "nothing")], []),
        "validate-missing-artifact": ("inputs", lambda b, t: ["validate", str(t / "nothing")], []),
        "flops-checkpoint-is-artifact": ("inputs", lambda b, t: ["flops", "--checkpoint", str(b["art"]),
                                                                 "--schedule", "csp"], []),
    }


def export_single(b, t) -> Path:
    """The module artifact's manifest narrowed to single-pass (resealed: as if exported so)."""
    art = _copy(b["art"], t / "single")
    _edit_json(art / MANIFEST_NAME, lambda m: m.update(modes=["single-pass"]), reseal=True)
    return art


def _unrelated(t: Path) -> Path:
    d = t / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"not yours to overwrite")
    return d


def _ckpt_edit(name, edit):
    def setup(b, t):
        ck = _copy(b["ckpt"], t / "ck")
        edit(ck)
        return ["export", str(ck), "--schedule", "csp", "--out", str(t / "o")]
    return setup


def _config(edit):
    return _ckpt_edit("config", lambda ck: _edit_json(ck / "config.json", edit))


def _weights():
    def truncate_shard(ck):
        shard = sorted(ck.glob("pytorch_model-*.bin"))[0]
        shard.write_bytes(shard.read_bytes()[:100])

    return {
        "config-not-json": ("weights", _ckpt_edit("c", lambda ck: (ck / "config.json").write_text("{nope")), []),
        "config-missing": ("weights", _ckpt_edit("c", lambda ck: (ck / "config.json").unlink()), []),
        "config-hidden-size-string": ("weights", _config(lambda c: c.update(hidden_size="64")), ["hidden_size"]),
        "config-heads-not-dividing": ("weights", _config(lambda c: c.update(num_attention_heads=5)), []),
        "config-negative-layers": ("weights", _config(lambda c: c.update(num_hidden_layers=-4)), []),
        "config-vocab-zero": ("weights", _config(lambda c: c.update(vocab_size=0)), []),
        "weights-shard-truncated": ("weights", _ckpt_edit("w", truncate_shard), []),
        "weights-index-missing": ("weights", _ckpt_edit("w", lambda ck: (ck / "pytorch_model.bin.index.json").unlink()),
                                  []),
        "tokenizer-model-missing": ("weights", _ckpt_edit("t", lambda ck: (ck / "tokenizer.model").unlink()), []),
        "added-tokens-not-json": ("weights", _ckpt_edit("t", lambda ck: (ck / "added_tokens.json").write_text("[")), []),
    }


def _tampered(edit, reseal=False, command=None):
    def setup(b, t):
        art = _copy(b["art"], t / "a")
        edit(art) if reseal is None else _edit_json(art / MANIFEST_NAME, edit, reseal)
        return (command or (lambda a: _run(a, b["image"])))(art)
    return setup


def _artifact():
    def file_edit(fn):
        return _tampered(fn, reseal=None)

    def append(rel):
        def fn(art):
            with open(art / rel, "ab") as f:
                f.write(b"\0")
        return fn

    def link_out(art):
        target = art.parent / "elsewhere.json"
        target.write_text("{}")
        tok = art / "tokenizer" / "tokenizer.json"
        tok.unlink()
        tok.symlink_to(target)

    def stage(m, name):
        return next(s for s in m["stages"] if s["name"] == name)

    return {
        "manifest-hand-edited": ("artifact", _tampered(lambda m: m["preprocessing"]["sam"].update(image_size=512)),
                                 ["edited after csprt wrote it"]),
        "manifest-tolerance-loosened": ("artifact", _tampered(lambda m: m["tolerances"]["end_to_end"].update(
            mask_iou_min=0.0)), ["edited after csprt wrote it"]),
        "manifest-seal-removed": ("artifact", _tampered(lambda m: m.pop("seal")), ["no seal"]),
        "manifest-truncated": ("artifact", file_edit(lambda a: (a / MANIFEST_NAME).write_text(
            (a / MANIFEST_NAME).read_text()[:300])), ["not valid JSON"]),
        "manifest-is-a-list": ("artifact", file_edit(lambda a: (a / MANIFEST_NAME).write_text("[]")), ["format"]),
        "manifest-newer-schema": ("artifact", _tampered(lambda m: m.update(schema_version=99)), ["upgrade csprt"]),
        "manifest-unknown-key": ("artifact", _tampered(lambda m: m.update(extra=1), reseal=True), ["schema"]),
        "graph-appended": ("artifact", file_edit(append("graphs/llm_1.onnx")), ["hash mismatch"]),
        "graph-missing": ("artifact", file_edit(lambda a: (a / "graphs/seg_head.onnx").unlink()), ["missing"]),
        "tokenizer-file-changed": ("artifact", file_edit(append("tokenizer/tokenizer.json")), ["changed since export"]),
        "tokenizer-link-outside": ("artifact", file_edit(link_out), ["outside the artifact"]),
        "tokenizer-dir-absolute": ("artifact", _tampered(lambda m: m["tokenizer"].update(dir="/etc"), reseal=True),
                                   ["outside the artifact"]),
        "graph-path-escapes": ("artifact", _tampered(lambda m: stage(m, "vision").update(graph="../x.onnx"),
                                                     reseal=True), ["does not match the manifest schema"]),
        "resealed-precision-fp16": ("artifact", _tampered(lambda m: m.update(precision="fp16"), reseal=True),
                                    ["precision 'fp16'"]),
        "resealed-dim-beyond-positions": ("artifact", _tampered(lambda m: m["dims"]["suffix_len"].update(
            max=10**9), reseal=True), ["positions"]),
        "resealed-max-new-tokens-huge": ("artifact", _tampered(lambda m: m["loop"].update(max_new_tokens=10**6),
                                                               reseal=True), ["max_new_tokens"]),
        "resealed-dim-disordered": ("artifact", _tampered(lambda m: m["dims"]["suffix_len"].update(min=50, max=5),
                                                          reseal=True), ["expected 1 <= min"]),
        "resealed-dim-expression-code": ("artifact", _tampered(lambda m: stage(m, "seg_head")["inputs"][0].update(
            shape=["__import__('os').getpid()", 64]), reseal=True), ["only non-negative ints"]),
        "resealed-graph-io-dtype": ("artifact", _tampered(lambda m: stage(m, "seg_head")["outputs"][0].update(
            dtype="int64"), reseal=True), ["expected dtype int64"]),
        "resealed-wiring-dangling": ("artifact", _tampered(lambda m: stage(m, "seg_head")["inputs"][0].update(
            {"from": "nowhere.x"}), reseal=True), ["which no stage"]),
        "build-on-tampered": ("artifact", _tampered(lambda m: m["dims"]["suffix_len"].update(max=16),
                                                    command=lambda a: ["build", str(a)]), ["edited after"]),
        "triton-repo-on-tampered": ("artifact", _tampered(lambda m: m.update(opset=19), command=lambda a: [
            "triton-repo", str(a), "--out", str(a.parent / "repo")]), ["edited after"]),
        "validate-on-tampered": ("artifact", _tampered(lambda m: m.update(opset=19),
                                                       command=lambda a: ["validate", str(a)]), ["edited after"]),
        "bench-on-tampered": ("artifact", _tampered(lambda m: m.update(opset=19),
                                                    command=lambda a: ["bench", str(a)]), ["edited after"]),
    }


def _bounds():
    def export(*flags):
        return lambda b, t: ["export", str(b["ckpt"]), "--schedule", "csp", "--out", str(t / "o"), *flags]

    return {
        "export-opset-5": ("bounds", export("--opset", "5"), ["--opset"]),
        "export-max-seg-0": ("bounds", export("--max-seg", "0"), ["--max-seg"]),
        "export-max-text-len-huge": ("bounds", export("--max-text-len", "100000"), ["--max-text-len"]),
        "export-max-new-tokens-negative": ("bounds", export("--max-new-tokens", "-3"), ["--max-new-tokens"]),
        "run-max-new-tokens-0": ("bounds", lambda b, t: _run(b["art"], b["image"], "--mode", "generate",
                                                             "--max-new-tokens", "0"), ["max_new_tokens"]),
        "run-max-new-tokens-huge": ("bounds", lambda b, t: _run(b["art"], b["image"], "--mode", "generate",
                                                                "--max-new-tokens", str(10**9)), []),
        "build-shapes-garbage": ("bounds", lambda b, t: ["build", str(b["art"]), "--shapes", "prefix_len=a:b:c"],
                                 ["prefix_len"]),
        "build-shapes-unknown-dim": ("bounds", lambda b, t: ["build", str(b["art"]), "--shapes", "nodim=1:2:3"],
                                     ["nodim"]),
        "build-shapes-beyond-export": ("bounds", lambda b, t: ["build", str(b["art"]), "--shapes",
                                                               "suffix_len=1:2:100000"], ["suffix_len"]),
        "build-compute-capability-bad": ("bounds", lambda b, t: ["build", str(b["art"]), "--compute-capability",
                                                                 "sm_xx"], ["sm_xx"]),
        "build-unknown-stage": ("bounds", lambda b, t: ["build", str(b["art"]), "--stages", "nope"], ["nope"]),
        "build-workspace-negative": ("bounds", lambda b, t: ["build", str(b["art"]), "--workspace", "-1"], []),
        "triton-repo-instances-0": ("bounds", lambda b, t: ["triton-repo", str(b["art"]), "--out", str(t / "r"),
                                                            "--instances", "0"], ["--instances"]),
        "triton-repo-cache-negative": ("bounds", lambda b, t: ["triton-repo", str(b["art"]), "--out", str(t / "r"),
                                                               "--image-cache-mb", "-1"], []),
        "serve-instances-0": ("bounds", lambda b, t: ["serve", str(b["art"]), "--instances", "0"], ["--instances"]),
        "serve-port-huge": ("bounds", lambda b, t: ["serve", str(b["art"]), "--http-port", "70000"], ["--http-port"]),
        "bench-repeat-0": ("bounds", lambda b, t: ["bench", "--shape", "tiny", "--repeat", "0"], ["--repeat"]),
        "validate-unknown-stage": ("bounds", lambda b, t: ["validate", str(b["art"]), "--stages", "nope"], ["nope"]),
    }


def _concurrency():
    def locked(b, t):
        out = t / "o"
        lock = t / ".o.export.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"4242", 0)
        _HELD.append(fd)
        return ["export", str(b["ckpt"]), "--schedule", "csp", "--out", str(out)]

    return {"export-while-another-exports": ("concurrency", locked, ["already running", "4242"])}


_HELD: list[int] = []
CASES = {**_reads(), **_inputs(), **_weights(), **_artifact(), **_bounds(), **_concurrency()}


class _TimeBound(Exception):
    pass


@contextlib.contextmanager
def _time_bound(seconds: int):
    def expire(*_):
        raise _TimeBound(f"no answer within {seconds} s (a hang)")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: f"{CASES[c][0]}-{c}")
def test_bad_input_is_one_line_and_exit_2(base, tmp_path, case):
    _, setup, words = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    argv = setup(base, work)
    try:
        with _time_bound(TIME_BOUND_S):
            rc, out, err = call(argv)
    finally:
        while _HELD:
            os.close(_HELD.pop())
    lines = error_lines(err)
    assert "Traceback" not in err, err
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"csprt {argv[0]}: error: "), (rc, err)
    assert all(w in lines[0] for w in words), lines[0]
    assert not (work / "o").exists() or argv[0] != "export", "export left output behind"


def test_the_suite_covers_every_class_and_command():
    classes = {c for c, _, _ in CASES.values()}
    assert classes == {"reads", "inputs", "weights", "artifact", "bounds", "concurrency"}
    assert len(CASES) >= 94
