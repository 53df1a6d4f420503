"""The systemd units: hardened (`systemd-analyze security` exposure <= 3.0, "OK"), valid
(`systemd-analyze verify`), installable side by side, and the programs still work inside the
units' system-call filter (seccomp built from the unit by tests/service_sandbox.py).

Skipped, with the reason, where systemd-analyze or libseccomp is missing (e.g. the emulated
arm64 userland of scripts/pi-check).
"""
from __future__ import annotations

import ctypes.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"agent": ROOT / "agent" / "ftte-agent.service", "hub": ROOT / "hub" / "ftte-hub.service"}
SANDBOX = Path(__file__).resolve().parent / "service_sandbox.py"
MAX_EXPOSURE = 3.0

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def _seccomp_missing() -> str:
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze is not installed (it expands the unit's @syscall groups)"
    if ctypes.util.find_library("seccomp") is None:
        return "libseccomp is not installed"
    return ""


needs_sandbox = pytest.mark.skipif(bool(_seccomp_missing()), reason=_seccomp_missing() or "ok")


def settings(unit: Path):
    from service_sandbox import unit_settings
    return unit_settings(str(unit))


def exposure(unit: Path):
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", r.stdout + r.stderr)
    assert m, f"no exposure line (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return float(m.group(1)), m.group(2), r.stdout


@needs_analyze
@pytest.mark.parametrize("which", sorted(UNITS))
def test_unit_exposure_is_ok(which):
    level, word, report = exposure(UNITS[which])
    print(f"{UNITS[which].name}: exposure {level} {word}")
    assert level <= MAX_EXPOSURE and word == "OK", report


@needs_analyze
@pytest.mark.parametrize("which", sorted(UNITS))
def test_unit_verifies(which, tmp_path):
    """`systemd-analyze verify`, with ExecStart's /opt/ftte program swapped for one that exists here."""
    unit = UNITS[which]
    text = unit.read_text()
    assert f"/opt/ftte/.venv/bin/ftte-{which}" in text
    copy = tmp_path / unit.name
    copy.write_text(text.replace(f"/opt/ftte/.venv/bin/ftte-{which}", shutil.which("true") or "/bin/true"))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True,
                       timeout=120)
    out = (r.stdout + r.stderr).strip()
    if r.returncode != 0 and re.search(r"\.target not found|Failed to (initialize|set up) manager", out):
        pytest.skip(f"systemd-analyze verify needs the system's unit files here: {out.splitlines()[0]}")
    assert r.returncode == 0 and not out, out   # unknown keys are only warnings: none allowed


def test_units_install_side_by_side():
    """One machine can run the hub and an agent: one shared user (created only if missing), one
    key (installed or generated only if missing), separate state directories."""
    agent, hub = settings(UNITS["agent"]), settings(UNITS["hub"])
    assert agent["User"] == hub["User"] == ["ftte"] and agent["Group"] == hub["Group"] == ["ftte"]
    assert agent["StateDirectory"] != hub["StateDirectory"]
    for unit in UNITS.values():
        header = [ln for ln in unit.read_text().splitlines() if ln.startswith("#")]
        text = "\n".join(header)
        assert "useradd" in text and "id -u ftte >/dev/null 2>&1 || useradd" in text, unit.name
        assert "--home-dir /nonexistent" in text   # neither claims the other's state dir as home
        key_lines = [ln for ln in header if "/etc/ftte/fleet.key" in ln and ("install -m" in ln or "keygen" in ln)]
        assert key_lines and all("test -e /etc/ftte/fleet.key ||" in ln for ln in key_lines), key_lines
        s = settings(unit)
        assert s["UMask"] == ["0027"] and s["CapabilityBoundingSet"] == [""]
        assert "ReadWritePaths" not in s      # each writes only its own StateDirectory


# -- the programs inside the filter -------------------------------------------------------------------
def sandboxed(unit: Path, cmd):
    return [sys.executable, str(SANDBOX), str(unit), "--", *cmd]


@needs_sandbox
def test_the_sandbox_enforces_the_unit(tmp_path):
    """The filter is real: W+X memory, a packet socket and setuid fail inside it."""
    probe = ("import mmap, os, socket\n"
             "def tried(f):\n"
             "    try:\n        f(); return 'allowed'\n"
             "    except OSError as e:\n        return e.strerror\n"
             "print(tried(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)))\n"
             "print(tried(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)))\n"
             "print(tried(lambda: os.setuid(os.getuid())))\n"
             "print(tried(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()))\n")
    r = subprocess.run(sandboxed(UNITS["agent"], [sys.executable, "-c", probe]), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    wx, packet, setuid, udp = r.stdout.split("\n")[:4]
    assert wx == "Operation not permitted" and "not supported" in packet and setuid == "Operation not permitted"
    assert udp == "allowed"


@needs_sandbox
def test_agent_trains_inside_its_units_filter(tmp_path):
    """numpy, the C++ kernels, libsodium (handshake and frames) and, where multicast works, zeroconf."""
    from mdns_support import multicast_unavailable
    from test_agent import AgentProc, agent_cmd, ack, hello, make_model, run, train_one

    from ftte_core.data import Dataset, load_bundled, save_npz
    from ftte_core.protocol import generate_key, write_key

    key = tmp_path / "fleet.key"
    write_key(key, generate_key())
    key.chmod(0o640)
    ds = load_bundled("digits")
    data = tmp_path / "local.npz"
    save_npz(data, Dataset(ds.x[:120].copy(), ds.y[:120].copy(), ds.num_classes, "local"))
    mdns = not multicast_unavailable()
    cmd = agent_cmd(key, data, tmp_path / "state", *([] if mdns else ["--no-mdns"]))
    proc = subprocess.Popen(sandboxed(UNITS["agent"], cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        a = AgentProc(proc)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    try:
        if mdns:
            a.wait_for(r"mDNS: advertising", timeout=60)
        model, subset = make_model(seed=3)

        async def go():
            ch, _ = await hello(a.port, key)
            update = await train_one(ch, model, subset, "sandboxed-1")
            await ack(ch, "sandboxed-1")
            await ch.close()
            return update
        update = run(go())
        assert update.task_id == "sandboxed-1" and update.num_samples > 0
    finally:
        rc = a.stop()
    assert rc == 0, "\n".join(a.lines[-30:])
    bad = [ln for ln in a.lines if any(s in ln for s in ("Traceback", "Operation not permitted", "key file"))]
    assert not bad, "\n".join(a.lines)   # "key file": a 0640 key gets no warning


@needs_sandbox
@pytest.mark.slow
def test_hub_runs_a_short_training_inside_its_units_filter(tmp_path):
    """The hub's whole path inside the filter: setup, search, rounds, checkpoint, ONNX export."""
    pytest.importorskip("onnx", reason="the hub needs the onnx package (none for armv7)")
    from test_agent import AgentProc, agent_cmd

    from ftte_core import data as ftdata
    from ftte_core.protocol import generate_key, write_key

    key = tmp_path / "fleet.key"
    write_key(key, generate_key())
    ds = ftdata.load_bundled("digits")
    train, val = ftdata.train_val_split(ds, val_fraction=0.2, seed=0)
    ftdata.save_npz(tmp_path / "val.npz", val)
    ftdata.save_npz(tmp_path / "data.npz", train)
    agent_proc = subprocess.Popen(sandboxed(UNITS["agent"], agent_cmd(key, tmp_path / "data.npz", tmp_path / "state",
                                                                        "--no-mdns")),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        a = AgentProc(agent_proc)
    except BaseException:
        agent_proc.kill()
        agent_proc.wait(10)
        raise
    try:
        hub = [sys.executable, "-c", "from ftte_hub.cli import main; main()", "train", "--key", str(key), "--model", "mlp",
               "--val-data", str(tmp_path / "val.npz"), "--out", str(tmp_path / "run"), "--no-mdns",
               "--peer", f"127.0.0.1:{a.port}", "--min-agents", "1", "--max-versions", "3", "--buffer", "1"]
        r = subprocess.run(sandboxed(UNITS["hub"], hub), capture_output=True, text=True, timeout=600)
    finally:
        assert a.stop() == 0
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "model.onnx").stat().st_size > 0 and (tmp_path / "run" / "summary.json").exists()
    assert "Traceback" not in r.stderr
