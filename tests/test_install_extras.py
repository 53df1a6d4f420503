"""Install weight: onnx is the hub's extra, and hub commands without it say so in one line."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftte_hub.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_onnx_is_an_extra_and_the_test_extra_skips_it_on_armv7():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [d.split(">")[0].split("=")[0].split(";")[0].strip() for d in project["dependencies"]]
    assert "onnx" not in names and {"numpy", "click", "cryptography", "zeroconf"} <= set(names)
    assert any(d.startswith("onnx") for d in project["optional-dependencies"]["hub"])
    for dep in project["optional-dependencies"]["test"]:
        if dep.startswith("onnx"):   # PyPI has no armv7 wheels of onnx or onnxruntime
            assert "platform_machine != 'armv7l'" in dep


@pytest.mark.parametrize("args, what", [
    (["train", "--key", "k", "--model", "mlp", "--val-data", "v.npz", "--out", "o"], "ftte-hub train"),
    (["demo"], "ftte-hub demo"),
    (["evaluate", "--model", "model.onnx", "--data", "digits"], "reading ONNX models"),
])
def test_hub_commands_without_onnx_say_so(monkeypatch, tmp_path, args, what):
    monkeypatch.setitem(sys.modules, "onnx", None)       # as on 32-bit ARM: not installed
    monkeypatch.setitem(sys.modules, "ftte_core.onnx_io", None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"")
    res = CliRunner().invoke(main, args)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert what in lines[0] and "needs the onnx package" in lines[0] and "ftte-fleet[hub]" in lines[0]
