"""Real processes: `ftte-hub train` and `ftte-agent`s on loopback, found over mDNS (127.0.0.1 only).

Skipped until the agent package is installed. Each test bounds every wait; processes it started
are killed by id at the end.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ftte_core import data as ftdata
from ftte_core.protocol import generate_key, write_key
from mdns_support import needs_multicast
from slowdev import scaled, wait_for_progress


pytestmark = pytest.mark.slow

HUB = [sys.executable, "-c", "from ftte_hub.cli import main; main()", "train"]
AGENT = [sys.executable, "-c", "from ftte_agent.cli import main; main()"]


@pytest.fixture
def fleet_dir(tmp_path):
    write_key(tmp_path / "fleet.key", generate_key())
    ds = ftdata.load_bundled("digits")
    train, val = ftdata.train_val_split(ds, val_fraction=0.2, seed=0)
    ftdata.save_npz(tmp_path / "val.npz", val)
    for i, part in enumerate(ftdata.partition_dirichlet(train, 3, alpha=1.0, seed=0, min_size=20)):
        ftdata.save_npz(tmp_path / f"data{i}.npz", part)
    procs = []
    yield tmp_path, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(scaled(10))


def _agent(d, procs, i):
    log = open(d / f"agent{i}.log", "ab")
    p = subprocess.Popen(AGENT + ["--key", str(d / "fleet.key"), "--data", str(d / f"data{i}.npz"), "--name", f"pa{i}",
                                  "--memory-budget", "64MiB", "--port", "0", "--state-dir", str(d / f"state{i}"),
                                  "--interface", "127.0.0.1"], stdout=log, stderr=log)
    procs.append(p)
    return p


def _hub(d, procs, *extra):
    log = open(d / "hub.log", "ab")
    p = subprocess.Popen(HUB + ["--key", str(d / "fleet.key"), "--model", "mlp", "--val-data", str(d / "val.npz"),
                                "--out", str(d / "run"), "--min-agents", "3", "--interface", "127.0.0.1",
                                "--buffer", "3", "--batch-size", "16", "--lr", "0.1", "--ping-interval", "1",
                                *extra], stdout=log, stderr=log)
    procs.append(p)
    return p


def _metrics(d):
    path = d / "run" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.endswith("}")]


def _wait(cond, timeout, what, d):
    end = time.monotonic() + scaled(timeout)  # a figure for a fast host, scaled to this machine
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; hub log:\n" + (d / "hub.log").read_text()[-3000:])


def _finish(hub, d, stall=60):
    """The hub's exit status, waiting as long as its log grows (a slow machine is slow, not stuck)."""
    try:
        wait_for_progress(lambda: hub.poll() is not None, lambda: (d / "hub.log").stat().st_size, "the hub's exit",
                          stall=stall, describe=lambda: "hub log:\n" + (d / "hub.log").read_text()[-3000:])
    except AssertionError:
        hub.kill()
        hub.wait()
        raise
    return hub.wait()


@needs_multicast
def test_hub_and_three_agent_processes_reach_accuracy_over_mdns(fleet_dir):
    d, procs = fleet_dir
    for i in range(3):
        _agent(d, procs, i)
    hub = _hub(d, procs, "--target-accuracy", "0.9", "--max-versions", "100")
    assert _finish(hub, d) == 0, (d / "hub.log").read_text()[-3000:]
    summary = json.loads((d / "run" / "summary.json").read_text())
    assert summary["accuracy"] >= 0.9
    assert len(summary["agents"]) == 3 and all(a["accepted"] > 0 for a in summary["agents"].values())
    assert len(_metrics(d)) == summary["merges"]
    ort = pytest.importorskip("onnxruntime")  # last: an optional test dependency
    val = ftdata.load_npz(d / "val.npz")
    sess = ort.InferenceSession(str(d / "run" / "model.onnx"))
    logits = sess.run(None, {sess.get_inputs()[0].name: val.x})[0]
    assert abs(float(np.mean(logits.argmax(1) == val.y)) - summary["accuracy"]) < 1e-9


@needs_multicast
def test_kill_agent_then_kill_hub_and_resume(fleet_dir):
    d, procs = fleet_dir
    agents = [_agent(d, procs, i) for i in range(3)]
    top = "60"
    hub = _hub(d, procs, "--max-versions", top)
    _wait(lambda: len(_metrics(d)) >= 3, 90, "3 merges", d)
    os.kill(agents[2].pid, signal.SIGKILL)          # an agent dies mid-run
    agents[2].wait(scaled(10))
    seen = len(_metrics(d))
    _wait(lambda: len(_metrics(d)) >= seen + 3, 60, "3 more merges without the killed agent", d)
    os.kill(hub.pid, signal.SIGKILL)                # the hub dies mid-run
    hub.wait(scaled(10))
    before = [m["version"] for m in _metrics(d)]
    assert before and before[-1] < int(top)
    hub2 = _hub(d, procs, "--max-versions", top)    # same --out: resume; agents reconnect by themselves
    assert _finish(hub2, d) == 0, "resumed hub:\n" + (d / "hub.log").read_text()[-3000:]
    versions = [m["version"] for m in _metrics(d)]
    assert versions == list(range(1, int(top) + 1))  # continued; never back, never repeated
    assert versions[:len(before)] == before
    log = (d / "hub.log").read_text()
    assert "resumed from" in log
    summary = json.loads((d / "run" / "summary.json").read_text())
    assert summary["version"] == int(top)
    after = [m for m in _metrics(d) if m["version"] > before[-1]]
    assert {"pa0", "pa1"} <= {summary["agents"][a]["name"] for m in after for a in m["devices"]}
    # downlink deltas across the restart: the new hub's stream starts from the model file's values,
    # which the agents hold, so no frame ever failed to resolve and no snapshot was needed
    for i in (0, 1):
        alog = (d / f"agent{i}.log").read_text()
        assert "downlink" not in alog and "Traceback" not in alog, alog[-3000:]
