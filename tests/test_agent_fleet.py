"""Real ftte-agent processes with the real ftte-hub on loopback: kill -9 either side mid-run.

Static --peer addresses (no mDNS) keep these runs quick and deterministic; discovery over mDNS
is covered by test_agent.py (the advertisement) and the hub's own tests. Every time limit is
scaled to this machine's measured speed (slowdev.py), and a run is waited on while it makes
progress (log lines), not for a fixed total: the suite also runs emulated, tens of times slower.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ftte_core.data import load_bundled, partition_dirichlet, save_npz, train_val_split
from ftte_core.protocol import generate_key, write_key

from slowdev import flag, scaled, wait_for_progress
from test_agent import AgentProc

HUB = [sys.executable, "-m", "ftte_hub.cli", "train"]
#: seconds without a new hub log line before a run counts as stuck (scaled to this machine)
STALL_SECONDS = 60


class HubProc:
    """ftte-hub train with its stderr collected line by line."""

    def __init__(self, args):
        # unbuffered: the test acts on progress lines as they happen
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(HUB + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self.lines: list = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60):
        rx = re.compile(pattern)
        deadline = time.monotonic() + scaled(timeout)
        with self._cond:
            while True:
                for line in self.lines:
                    m = rx.search(line)
                    if m:
                        return m
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"hub: no line matching {pattern!r}; log:\n" + "\n".join(self.lines[-30:]))
                self._cond.wait(0.2)

    def finish(self, stall: float = STALL_SECONDS) -> int:
        """The hub's exit status, waiting as long as it keeps logging (versions, warnings)."""
        try:
            wait_for_progress(lambda: self.proc.poll() is not None, lambda: len(self.lines), "the hub's exit",
                              stall=stall, describe=lambda: "hub log:\n" + "\n".join(self.lines[-30:]))
        except AssertionError:
            self.proc.kill()
            self.proc.wait()
            raise
        return self.proc.wait()


@pytest.fixture
def fleet3(tmp_path):
    key = tmp_path / "fleet.key"
    write_key(key, generate_key())
    train, val = train_val_split(load_bundled("digits"), 0.2, seed=0)
    save_npz(tmp_path / "val.npz", val)
    agents = []
    try:
        for i, part in enumerate(partition_dirichlet(train, 3, alpha=1.0, seed=0, min_size=64)):
            save_npz(tmp_path / f"d{i}.npz", part)
            cmd = [sys.executable, "-m", "ftte_agent.cli", "--key", str(key), "--data", str(tmp_path / f"d{i}.npz"),
                   "--state-dir", str(tmp_path / f"agent{i}"), "--name", f"dev{i}", "--port", "0",
                   "--interface", "127.0.0.1", "--no-mdns", "--slowdown", str(1 + 2 * i)]
            agents.append(AgentProc(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        yield {"key": key, "val": tmp_path / "val.npz", "agents": agents, "out": tmp_path / "out"}
    finally:
        for a in agents:
            a.stop()


def hub_args(f, max_versions):
    args = ["--key", str(f["key"]), "--model", "mlp", "--val-data", str(f["val"]), "--out", str(f["out"]),
            "--min-agents", "3", "--buffer", "3", "--max-versions", str(max_versions), "--no-mdns",
            "--task-timeout", flag(20), "--wait-timeout", flag(30), "--batch-size", "16", "--local-epochs", "2"]
    for a in f["agents"]:
        args += ["--peer", f"127.0.0.1:{a.port}"]
    return args


def metrics_versions(out: Path):
    return [json.loads(line)["version"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill_9_an_agent_mid_run_and_the_run_completes(fleet3):
    hub = HubProc(hub_args(fleet3, max_versions=30))
    hub.wait_for(r"version 5/30")
    assert hub.proc.poll() is None
    victim = fleet3["agents"][0]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(scaled(10))
    assert hub.finish() == 0, "\n".join(hub.lines[-30:])
    # the hub noticed the loss (its wording is its own business)
    assert any(("dev0" in ln or f":{victim.port}" in ln) and "warning" in ln.lower() for ln in hub.lines)
    summary = json.loads((fleet3["out"] / "summary.json").read_text())
    assert summary["version"] == 30
    assert summary["agents"]  # per-agent table
    assert metrics_versions(fleet3["out"]) == list(range(1, 31))
    for a in fleet3["agents"][1:]:  # the survivors kept training after the loss
        a.wait_for(r"hub .* stopped the run")


@pytest.mark.slow
def test_kill_9_the_hub_mid_run_and_a_restart_resumes_with_the_same_agents(fleet3):
    first = HubProc(hub_args(fleet3, max_versions=40))
    first.wait_for(r"version 8/40")
    assert first.proc.poll() is None
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(scaled(10))
    before = metrics_versions(fleet3["out"])
    assert before and before == list(range(1, len(before) + 1))
    # agents finishing their tasks now keep the updates in pending/ (how soon depends on the machine)
    def pending():
        return [p for i in range(3) for p in (fleet3["out"].parent / f"agent{i}" / "pending").rglob("*.upd")]
    deadline = time.monotonic() + scaled(10)
    while not pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # and let the others in training finish too
    kept = pending()

    second = HubProc(hub_args(fleet3, max_versions=40))
    second.wait_for(r"resumed from .*: version \d+")
    assert second.finish() == 0, "\n".join(second.lines[-30:])
    after = metrics_versions(fleet3["out"])
    assert after == list(range(1, 41))  # versions continue; none repeated, none lost
    for a in fleet3["agents"]:
        a.wait_for(r"hub .* stopped the run")  # every agent served the restarted hub
        assert not [ln for ln in a.lines if "Traceback" in ln]
    # updates finished while no hub was up went to the restarted one (accepted, or refused as duplicates
    # when the first hub had journaled them before the kill) and left the agents' state dirs
    assert kept and any("kept from earlier" in ln for a in fleet3["agents"] for ln in a.lines)
    assert not [p for p in kept if p.exists()]


@pytest.mark.slow
def test_an_agent_with_another_key_is_refused_and_trains_nothing(fleet3, tmp_path):
    stranger_key = tmp_path / "other.key"
    write_key(stranger_key, generate_key())
    cmd = [sys.executable, "-m", "ftte_agent.cli", "--key", str(stranger_key), "--data", str(tmp_path / "d0.npz"),
           "--state-dir", str(tmp_path / "stranger"), "--name", "stranger", "--port", "0",
           "--interface", "127.0.0.1", "--no-mdns"]
    stranger = AgentProc(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    try:
        hub = HubProc(hub_args(fleet3, max_versions=6) + ["--peer", f"127.0.0.1:{stranger.port}"])
        assert hub.finish() == 0, "\n".join(hub.lines[-30:])
        stranger.wait_for(r"refused 127\.0\.0\.1:\d+: .*key")
    finally:
        stranger.stop()
    summary = json.loads((fleet3["out"] / "summary.json").read_text())
    assert sorted(a.get("name", k) for k, a in summary["agents"].items()) == ["dev0", "dev1", "dev2"]
    assert not [ln for ln in stranger.lines if "trained" in ln or "connected" in ln]
    assert not list((tmp_path / "stranger" / "models").iterdir())


@pytest.mark.slow
def test_a_cnn_exported_to_onnx_trains_to_the_end(fleet3, tmp_path):
    """Issue 9, finding 11: `ftte-hub train --model cnn.onnx` (a zoo CNN exported with save_onnx)
    used to stall after the first update: the hub's model held read-only ONNX weights, the first
    merge raised, and the run never merged again."""
    pytest.importorskip("onnx", reason="the hub reads and writes ONNX (no onnx wheels for 32-bit ARM)")
    import ftte_core as ft

    model_path = tmp_path / "cnn.onnx"
    ft.save_onnx(ft.zoo("cnn", (1, 8, 8), 10, seed=0), model_path)
    args = hub_args(fleet3, max_versions=8)
    args[args.index("--model") + 1] = str(model_path)
    hub = HubProc(args)
    assert hub.finish() == 0, "\n".join(hub.lines[-30:])
    summary = json.loads((fleet3["out"] / "summary.json").read_text())
    assert summary["version"] == 8
    assert metrics_versions(fleet3["out"]) == list(range(1, 9))
    trained = ft.load_model(fleet3["out"] / "model.onnx")
    assert [layer.kind for layer in trained.layers] == [layer.kind for layer in ft.load_model(model_path).layers]
    changed = [k for k, v in trained.state().items()
               if not np.array_equal(v, ft.load_model(model_path).state()[k])]
    assert "conv1.weight" in changed  # the convolutions trained, not only the dense head
    assert not [ln for ln in hub.lines if "Traceback" in ln]
