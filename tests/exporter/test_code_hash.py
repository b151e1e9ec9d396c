"""The graph cache's code key is derived from what the export imports, not from a hand list that drifts."""

from __future__ import annotations

from exporter.export import code_files


def test_follows_transitive_and_local_imports_of_own_packages_only(tmp_path):
    (tmp_path / "exporter").mkdir()
    (tmp_path / "graphs").mkdir()
    (tmp_path / "exporter/export.py").write_text("import numpy\nfrom exporter import wrappers\n")
    (tmp_path / "exporter/wrappers.py").write_text("def f():\n    from graphs.sel import pick\n")
    (tmp_path / "graphs/sel.py").write_text("import graphs.deep\n")
    (tmp_path / "graphs/deep.py").write_text("x = 1\n")
    (tmp_path / "graphs/unused.py").write_text("x = 2\n")
    assert code_files(("exporter/export.py",), base=tmp_path) == [
        "exporter/export.py", "exporter/wrappers.py", "graphs/deep.py", "graphs/sel.py"]


def test_the_real_export_covers_every_module_the_traced_code_uses():
    files = set(code_files())
    assert {"exporter/wrappers.py", "exporter/selection.py", "exporter/model.py", "graphs/stages.py",
            "graphs/onnx_passes.py", "exporter/streaming.py", "graphs/schedule.py", "graphs/shapes.py"} <= files
    assert not any(f.startswith(("engines/", "tools/")) for f in files)
