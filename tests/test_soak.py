"""benchmarks/soak.py and benchmarks/state_growth.py: they run, print what they promise, and judge right.

The short soak (real agents, the real hub, kills, a faulty agent, a stalling neighbour) is marked
slow. Its verdicts: versions monotonic, no acknowledged update lost, the hub never exits by
itself, and SIGTERM ends it cleanly.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
VERDICT_RE = re.compile(r"^verdict (\w+):\s+(PASS|FAIL)\s+(.*)$", re.M)


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def _env():
    # the installed packages (as every other process test uses): a source tree has no compiled kernels
    return dict(os.environ)


# -- the judging helpers -----------------------------------------------------------------------------
def test_version_check_counts_gaps_repeats_and_going_back():
    soak = _load("soak")
    good = soak.version_check([{"version": v} for v in (1, 2, 3, 4)])
    assert (good["gaps"], good["repeats"], good["backwards"], good["last"]) == (0, 0, 0, 4)
    bad = soak.version_check([{"version": v} for v in (1, 2, 4, 4, 3, 7)] + [{"version": 8, "replayed": True}])
    assert bad["gaps"] == 2            # 5 and 6 never appear
    assert bad["repeats"] == 1         # 4 twice
    assert bad["backwards"] == 1       # 4 -> 3
    assert bad["replayed_lines"] == 1


def test_longest_stall_counts_the_tail_and_ignores_replayed_lines():
    soak = _load("soak")
    lines = [{"version": 1, "unix_time": 105.0}, {"version": 2, "unix_time": 110.0},
             {"version": 3, "unix_time": 111.0, "replayed": True}]
    assert soak.longest_stall(lines, 100.0, 140.0) == pytest.approx(30.0)
    assert soak.longest_stall([], 100.0, 140.0) == pytest.approx(40.0)


def test_faulty_agent_updates_have_the_task_shapes_and_the_promised_defects():
    peers = _load("soak_peers")
    from ftte_core import messages as M
    from ftte_core.local import TaskConfig
    from ftte_core.update import Update, UpdateError, decode_update

    values = {"fc1.weight": np.zeros((5, 7), np.float32), "fc1.bias": np.zeros((5, 1), np.float32)}
    task = M.TaskMessage(task_id="t1", base_version=0, model_hash="h", subset={}, subset_fingerprint="f",
                         config=TaskConfig(), seed=0, bits=8, values=values)
    rng = np.random.default_rng(0)
    for kind in peers.KINDS:
        tensors = peers.bad_tensors(task, kind, rng)
        assert [(t.key, t.shape) for t in tensors] == [(k, v.shape) for k, v in values.items()]
        raw = Update(base_version=0, subset_fingerprint="f", num_samples=1, loss=1.0, tensors=tensors,
                     device_id="x", task_id="t1").to_bytes()
        if kind == "nan_scales":
            with pytest.raises(UpdateError):
                Update.from_bytes(raw)
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            decoded = decode_update(Update.from_bytes(raw))
        biggest = max(float(np.max(np.abs(v))) for v in decoded.values())
        if kind == "scale_overflow":
            assert not np.isfinite(biggest)
        elif kind in ("scale_1e3", "scale_1e30"):
            assert biggest > 1e2


# -- state_growth ------------------------------------------------------------------------------------
def test_state_growth_prints_its_table_and_ratios(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "state_growth.py"), "--at", "20,60", "--buffer", "4",
                        "--devices", "6", "--keep", str(tmp_path / "out")],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode in (0, 1), r.stderr[-2000:]
    head = r.stdout.splitlines()
    assert any(h.split()[:2] == ["merged", "updates"] and "checkpoint" in h and "RSS" in h for h in head), r.stdout
    rows = [h.split() for h in head if re.match(r"^\s+\d", h)]
    assert [row[0] for row in rows] == ["20", "60"], r.stdout
    for label in ("checkpoint", "journal (peak)", "driver meta", "RSS"):
        assert re.search(rf"^\s+{re.escape(label)}\s+[\d.]+x\s+(PASS|FAIL)", r.stdout, re.M), (label, r.stdout)


# -- the short soak ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_soak(tmp_path_factory):
    work = tmp_path_factory.mktemp("soak")
    # bounded inside (a ~80 s run, 60 s for the hub's SIGTERM, 10 s per agent); this limit is a backstop
    r = subprocess.run([sys.executable, str(BENCH / "soak.py"), "--short", "--keep", str(work / "run")],
                       capture_output=True, text=True, env=_env(), timeout=1800)
    return r, work


@pytest.mark.slow
def test_short_soak_runs_and_prints_every_verdict(short_soak):
    r, work = short_soak
    assert r.returncode in (0, 1), (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    verdicts = {name: (v, detail) for name, v, detail in VERDICT_RE.findall(r.stdout)}
    assert set(verdicts) == {"versions", "lost", "accuracy", "merging", "hub_exits", "sigterm"}, r.stdout
    assert re.search(r"^acknowledged updates lost: \d+$", r.stdout, re.M), r.stdout
    assert re.search(r"^\s+\d+s\s", r.stdout, re.M), "no progress row"
    # nothing left running: every child was in a process group the soak killed
    leftover = subprocess.run(["pgrep", "-f", str(work / "run")], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"orphan processes: {leftover.stdout}"


@pytest.mark.slow
def test_short_soak_versions_are_monotonic_and_nothing_acknowledged_is_lost(short_soak):
    r, _ = short_soak
    verdicts = {name: v for name, v, _ in VERDICT_RE.findall(r.stdout)}
    assert re.search(r"^acknowledged updates lost: 0$", r.stdout, re.M), r.stdout
    assert verdicts.get("lost") == "PASS", r.stdout
    assert verdicts.get("versions") == "PASS", r.stdout
    assert verdicts.get("hub_exits") == "PASS", r.stdout
    assert verdicts.get("sigterm") == "PASS", r.stdout
