"""Issue 9, finding 10, with real processes: SIGTERM on `ftte-hub train` is a clean, resumable stop.

--no-mdns and --peer (agents on loopback, ports read from their logs), so no multicast is needed.
Every wait is bounded by progress (merges, exits), with limits far above what a slow device needs.
"""
import json
import re
import signal
import subprocess
import sys
import time

import pytest

from ftte_core import data as ftdata
from ftte_core.protocol import generate_key, write_key

pytest.importorskip("onnx", reason="the hub needs the onnx package (none for armv7)")
pytestmark = pytest.mark.slow

HUB = [sys.executable, "-c", "from ftte_hub.cli import main; main()", "train"]
AGENT = [sys.executable, "-c", "from ftte_agent.cli import main; main()"]


def _wait(cond, timeout, what, log):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}:\n" + log.read_text()[-3000:])


def _agents(d, procs, n=2):
    """Start n real agents on loopback; returns the hub's --peer arguments."""
    write_key(d / "fleet.key", generate_key())
    ds = ftdata.load_bundled("digits")
    train, val = ftdata.train_val_split(ds, val_fraction=0.2, seed=0)
    ftdata.save_npz(d / "val.npz", val)
    peers = []
    for i, part in enumerate(ftdata.partition_dirichlet(train, n, alpha=1.0, seed=0, min_size=20)):
        ftdata.save_npz(d / f"data{i}.npz", part)
        log = d / f"agent{i}.log"
        procs.append(subprocess.Popen(AGENT + ["--key", str(d / "fleet.key"), "--data", str(d / f"data{i}.npz"),
                                               "--name", f"sa{i}", "--port", "0", "--interface", "127.0.0.1",
                                               "--state-dir", str(d / f"state{i}")],
                                      stdout=open(log, "ab"), stderr=subprocess.STDOUT))
        port = _wait(lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text()), 120, "an agent", log)
        peers += ["--peer", f"127.0.0.1:{port.group(1)}"]
    return peers


def _kill_all(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_onnx_cnn_trains_to_the_end_with_real_agents(tmp_path):
    # finding 11: `ftte-hub train --model cnn.onnx` hung silently after the first update
    import ftte_core as ft

    d, procs = tmp_path, []
    try:
        peers = _agents(d, procs)
        ft.save_onnx(ft.zoo("cnn", input_shape=(1, 8, 8), num_classes=10), str(d / "cnn.onnx"))
        hub_log = d / "hub.log"
        hub = subprocess.Popen(HUB + ["--key", str(d / "fleet.key"), "--model", str(d / "cnn.onnx"), "--val-data",
                                      str(d / "val.npz"), "--out", str(d / "run"), "--min-agents", "2", "--no-mdns",
                                      *peers, "--buffer", "2", "--batch-size", "16", "--max-versions", "4"],
                               stdout=open(hub_log, "ab"), stderr=subprocess.STDOUT)
        procs.append(hub)
        assert hub.wait(300) == 0, hub_log.read_text()[-3000:]
        summary = json.loads((d / "run" / "summary.json").read_text())
        assert summary["finished"] and summary["version"] == 4
    finally:
        _kill_all(procs)


def test_sigterm_stops_the_hub_cleanly_and_the_same_command_resumes(tmp_path):
    d = tmp_path
    procs = []
    try:
        peers = _agents(d, procs)
        hub_log = d / "hub.log"
        cmd = HUB + ["--key", str(d / "fleet.key"), "--model", "mlp", "--val-data", str(d / "val.npz"),
                     "--out", str(d / "run"), "--min-agents", "2", "--no-mdns", *peers, "--buffer", "2",
                     "--batch-size", "16", "--lr", "0.1", "--max-versions", "12", "--ping-interval", "1"]

        def merges():
            p = d / "run" / "metrics.jsonl"
            return [json.loads(l) for l in p.read_text().splitlines() if l.endswith("}")] if p.exists() else []

        hub = subprocess.Popen(cmd, stdout=open(hub_log, "ab"), stderr=subprocess.STDOUT)
        procs.append(hub)
        _wait(lambda: len(merges()) >= 3, 300, "3 merges", hub_log)
        hub.send_signal(signal.SIGTERM)
        assert hub.wait(120) == 0, hub_log.read_text()[-3000:]
        text = hub_log.read_text()
        assert "SIGTERM: stopping" in text and "stopped: stopped by SIGTERM" in text
        assert "Traceback" not in text
        first = json.loads((d / "run" / "summary.json").read_text())
        assert first["finished"] is False and first["version"] < 12 and (d / "run" / "model.onnx").exists()

        hub2 = subprocess.Popen(cmd, stdout=open(hub_log, "ab"), stderr=subprocess.STDOUT)
        procs.append(hub2)
        assert hub2.wait(300) == 0, hub_log.read_text()[-3000:]
        assert "resumed from" in hub_log.read_text()
        second = json.loads((d / "run" / "summary.json").read_text())
        assert second["finished"] and second["version"] == 12
        assert [m["version"] for m in merges()] == list(range(1, 13))
        assert second["bytes_in"] > first["bytes_in"] and second["bytes_out"] > first["bytes_out"]
        assert all(p.poll() is None for p in procs[:2])  # the agents served both processes
    finally:
        _kill_all(procs)
