"""Fixtures for ACCM tests: one tiny LISA checkpoint with tiny ACCM models, written by `csprt make-tiny --accm`."""

import pytest

from tests.cli_io import call


@pytest.fixture(scope="session")
def tiny_accm(tmp_path_factory):
    """(checkpoint dir, ACCM dir) of `csprt make-tiny OUT --weights fp32 --accm`, once per session. Read-only."""
    out = tmp_path_factory.mktemp("tiny_accm") / "tiny"
    rc, stdout, stderr = call(["make-tiny", str(out), "--weights", "fp32", "--accm"])
    assert rc == 0, stderr
    assert f"ACCM models (caption model, selector, GPT-2, LongCLIP, full CLIP): {out / 'accm'}" in stdout
    return out, out / "accm"


@pytest.fixture(scope="session")
def accm_models(tiny_accm):
    from exporter.accm.checkpoint import load_accm

    return load_accm(tiny_accm[1])


@pytest.fixture(scope="session")
def lisa(tiny_accm):
    from exporter.checkpoint import load_checkpoint

    return load_checkpoint(tiny_accm[0])
