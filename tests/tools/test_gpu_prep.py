"""`tools.gpu_prep` planning (wheels, sizes, split, commands) and `tools.gpu_unpack` on CPU, with injected sizes and
metadata: nothing is downloaded here."""

from __future__ import annotations

import json
import zipfile

import pytest

from graphs.errors import ToolchainError
from tools import gpu_prep, gpu_unpack
from tools.gpu_prep import COMMAND_MAX, MiB, plan_calls

REQUIRES = {
    "jsonschema": ["attrs>=22.2.0", "referencing>=0.28.4", "idna; extra == 'format'"],
    "referencing": ["attrs>=22.2.0", "typing-extensions>=4.4.0; python_version < '3.13'"],
    "pytest": ['colorama>=0.4; sys_platform == "win32"', 'exceptiongroup>=1; python_version < "3.11"', "packaging>=22",
               "pluggy<2,>=1.5", 'tomli>=1; python_version < "3.11"'],
}
VERSIONS = {"attrs": "26.1.0", "referencing": "0.37.0", "pluggy": "1.7.0", "typing-extensions": "4.15.0"}


def test_device_wheels_are_the_pins_the_image_lacks_and_their_runtime_dependencies():
    pins = {"torch": "2.13.0", "numpy": "1.26.4", "jsonschema": "4.26.0", "pytest": "9.0.3", "matplotlib": "3.11.2",
            "tensorrt-rtx-cu13-libs": "1.7.1.116"}
    got = gpu_prep.device_wheels(pins, REQUIRES.get, VERSIONS.__getitem__)
    # not torch/numpy (the image has them), not matplotlib (unused there), no extras, no Windows or Python < 3.12
    # markers, not packaging (the image's transformers brings it); typing-extensions for referencing on Python 3.12
    assert got == {"attrs": "26.1.0", "jsonschema": "4.26.0", "pluggy": "1.7.0", "pytest": "9.0.3",
                   "referencing": "0.37.0", "tensorrt-rtx-cu13-libs": "1.7.1.116", "typing-extensions": "4.15.0"}


@pytest.mark.parametrize("payload_mib, calls", [(10, 1), (61, 1), (75, 2), (130, 3)])
def test_plan_keeps_every_call_under_the_limit(payload_mib, calls):
    tree = int(1.3 * MiB)
    plan = plan_calls(tree, payload_mib * MiB, limit_bytes=64 * MiB, budget_s=420)
    assert len(plan) == calls
    assert sum(c.part_bytes for c in plan) == payload_mib * MiB + 4096  # the parts list rides in the last call
    assert all(c.total_bytes <= 64 * MiB - gpu_prep.MARGIN for c in plan)
    assert [c.carry for c in plan] == [f".gpu/call{i}" for i in range(1, calls + 1)]  # one path each, all distinct
    assert all(len(c.command) <= COMMAND_MAX and c.timeout_s <= 600 for c in plan)
    last = plan[-1]
    assert last.command == ("python3 -m tools.gpu_unpack --dir .gpu --dest /tmp/gpu --site /tmp/site && "
                            "PYTHONPATH=/tmp/site python3 -m tools.gpu_check --tiny /tmp/gpu/tiny --budget 420")
    assert last.timeout_s == 510 and all(c.command.endswith("--check") for c in plan[:-1])


def test_plan_refuses_what_cannot_fit():
    with pytest.raises(ToolchainError, match=r"^the working tree \(63\.9 MiB\) leaves no room under the 64 MiB"):
        plan_calls(int(63.9 * MiB), MiB)
    with pytest.raises(ToolchainError, match=r"^call 1 breaks a device limit .*timeout 690 s, at most 600.*lower "
                                             r"--budget$"):
        plan_calls(MiB, MiB, budget_s=600)


def test_split_sizes():
    assert gpu_prep.split_sizes(10, 3) == [4, 3, 3] and gpu_prep.split_sizes(7, 1) == [7]


def test_big_wheels_are_restored_uncompressed_with_the_same_files(tmp_path, monkeypatch):
    wheel = tmp_path / "big-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("big/lib.so", b"\x7fELF" + b"ab" * 5000)
        z.writestr("big-1.0.dist-info/RECORD", "big/lib.so,,\n")
    monkeypatch.setattr(gpu_prep, "STORE_OVER", 100)
    out = gpu_prep.stored(wheel, tmp_path / "stored")
    with zipfile.ZipFile(out) as z, zipfile.ZipFile(wheel) as src:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
        assert {n: z.read(n) for n in z.namelist()} == {n: src.read(n) for n in src.namelist()}
    monkeypatch.setattr(gpu_prep, "STORE_OVER", 1 << 30)
    assert gpu_prep.stored(wheel, tmp_path / "other") == wheel  # small wheels travel as they are


def test_parts_join_back_into_the_payload_on_the_device(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "tiny").mkdir(parents=True)
    (src / "tiny" / "manifest.json").write_text('{"a": 1}')
    (src / "pytest-9.0.3-py3-none-any.whl").write_bytes(b"not really a wheel")  # installed here: never reinstalled
    members = {"tiny": src / "tiny", "wheels/pytest-9.0.3-py3-none-any.whl": src / "pytest-9.0.3-py3-none-any.whl"}
    packed = gpu_prep.payload(members, tmp_path / "payload.tar.xz", lambda _m: None)
    folder = tmp_path / ".gpu"
    plan = plan_calls(0, packed.stat().st_size, limit_bytes=gpu_prep.MARGIN + 4096 + 200, budget_s=60)
    assert len(plan) > 1
    gpu_prep.split(packed, plan, folder, {"pytest": "9.0.3"})
    assert gpu_unpack.main(["--dir", str(folder), "--check"]) == 0
    assert capsys.readouterr().out.count("payload.part") == len(plan)
    dest, site = tmp_path / "dest", tmp_path / "site"
    assert gpu_unpack.main(["--dir", str(folder), "--dest", str(dest), "--site", str(site)]) == 0
    assert json.loads((dest / "tiny" / "manifest.json").read_text()) == {"a": 1}
    out = capsys.readouterr().out
    assert "installed into" in out and ": nothing; already here: pytest==" in out and not site.exists()
    (folder / plan[0].carry.split("/")[-1] / "payload.part01").unlink()  # the machine went cold between calls
    with pytest.raises(SystemExit, match=r"part 1 of \d+ .* is missing: the machine was handed back between calls"):
        gpu_unpack.main(["--dir", str(folder), "--dest", str(dest)])


def test_tree_travels_in_every_call_and_is_small():
    assert 0 < gpu_prep.tree_bytes() < 16 * MiB
