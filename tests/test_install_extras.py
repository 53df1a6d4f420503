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
    assert "onnx" not in names and {"numpy", "click", "pynacl", "zeroconf"} <= set(names)
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


def test_build_wheels_and_pi_check_options():
    import subprocess
    res = subprocess.run([str(ROOT / "scripts" / "build-wheels"), "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "--arch" in res.stdout and "cp311" in res.stdout
    res = subprocess.run([str(ROOT / "scripts" / "build-wheels"), "--arch", "riscv64"], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode != 0 and res.stderr.strip() == \
        "build-wheels: unknown architecture 'riscv64' (use arm64 and/or armhf)"
    res = subprocess.run([str(ROOT / "scripts" / "pi-check"), "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "--rootfs-only" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("mode, lto, pool", [("ON", False, True), ("OFF", True, False)])
def test_low_memory_build_has_one_job_and_no_lto(tmp_path, mode, lto, pool):
    """CMake's configure step only (no compile): the Ninja file says what the build would do."""
    import shutil
    import subprocess
    pybind11 = pytest.importorskip("pybind11")
    if shutil.which("cmake") is None or shutil.which("ninja") is None:
        pytest.skip("cmake and ninja are needed to configure the build")
    res = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                          f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
                          f"-DFTTE_LOW_MEMORY_BUILD={mode}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert ("ftte: low-memory build" in res.stdout) == pool
    ninja = (tmp_path / "build.ninja").read_text()
    assert ("-flto" in ninja) == lto
    assert ("pool = ftte_one_job" in ninja) == pool
