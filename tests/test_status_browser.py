"""The status page in a real headless browser, against a real `ftte-hub train --status` with agent processes.

Chromium (Debian's `chromium` package; .ci/run installs it) loads the page twice while the run goes
on: the page must load with no console message at all (no script error, no resource the
Content-Security-Policy refused, no failed request), draw the accuracy curve, list the agents, and
show a later version the second time. Skipped with a reason where there is no Chromium (the emulated
Raspberry Pi userlands have none) unless FTTE_REQUIRE_BROWSER=1 (CI sets it when it installed one).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from ftte_core import data as ftdata
from ftte_core.protocol import generate_key, write_key
from slowdev import scaled

pytestmark = pytest.mark.slow

HUB = [sys.executable, "-c", "from ftte_hub.cli import main; main()", "train"]
AGENT = [sys.executable, "-c", "from ftte_agent.cli import main; main()"]
BROWSERS = ("chromium", "chromium-browser")


def find_browser():
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("FTTE_REQUIRE_BROWSER") == "1":
        pytest.fail("FTTE_REQUIRE_BROWSER=1 but no chromium is installed (apt-get install chromium)")
    pytest.skip("no chromium here (apt-get install chromium); the status page's browser test needs one")


def _wait(cond, seconds, what, log):
    end = time.monotonic() + scaled(seconds)
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; log:\n" + log.read_text(errors="replace")[-3000:])


def _metrics_lines(run):
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def load_page(browser, url, profile):
    """(DOM after the page's script ran, console messages) from one headless Chromium load."""
    proc = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                           "--disable-extensions", "--disable-background-networking", "--disable-sync",
                           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=4000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=scaled(120))
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


def test_status_page_in_chromium_during_a_real_run(tmp_path):
    browser = find_browser()
    write_key(tmp_path / "fleet.key", generate_key())
    ds = ftdata.load_bundled("digits")
    train, val = ftdata.train_val_split(ds, val_fraction=0.2, seed=0)
    ftdata.save_npz(tmp_path / "val.npz", val)
    procs = []
    try:
        ports = []
        for i, part in enumerate(ftdata.partition_dirichlet(train, 2, alpha=1.0, seed=0, min_size=20)):
            ftdata.save_npz(tmp_path / f"data{i}.npz", part)
            log = tmp_path / f"agent{i}.log"
            with open(log, "wb") as f:
                procs.append(subprocess.Popen(AGENT + ["--key", str(tmp_path / "fleet.key"), "--data",
                                                       str(tmp_path / f"data{i}.npz"), "--name", f"browser-pi{i}",
                                                       "--memory-budget", "64MiB", "--port", "0", "--no-mdns",
                                                       "--state-dir", str(tmp_path / f"state{i}"),
                                                       "--interface", "127.0.0.1"], stdout=f, stderr=f))
            ports.append(int(_wait(lambda: (re.findall(r"listening on [\d.]+:(\d+)", log.read_text()) or [None])[0],
                                   30, f"agent {i} to listen", log)))
        hub_log = tmp_path / "hub.log"
        with open(hub_log, "wb") as f:
            hub = subprocess.Popen(HUB + ["--key", str(tmp_path / "fleet.key"), "--model", "mlp", "--val-data",
                                          str(tmp_path / "val.npz"), "--out", str(tmp_path / "run"), "--min-agents", "2",
                                          "--no-mdns", *[a for p in ports for a in ("--peer", f"127.0.0.1:{p}")],
                                          "--buffer", "2", "--batch-size", "16", "--max-versions", "100000",
                                          "--target-accuracy", "0.999", "--status", "127.0.0.1:0"],
                                   stdout=f, stderr=f)
        procs.append(hub)
        url = _wait(lambda: (re.findall(r"status page: (http://\S+/)", hub_log.read_text()) or [None])[0],
                    30, "the status URL", hub_log)
        _wait(lambda: _metrics_lines(tmp_path / "run") >= 2, 60, "two merges", hub_log)

        with urllib.request.urlopen(url + "status.json", timeout=scaled(10)) as r:
            snap = json.loads(r.read())
        assert {"version", "accuracy", "target_accuracy", "agents"} <= set(snap)
        assert sorted(a["name"] for a in snap["agents"]) == ["browser-pi0", "browser-pi1"]

        dom1, console1 = load_page(browser, url, tmp_path / "profile1")
        seen = _metrics_lines(tmp_path / "run")
        _wait(lambda: _metrics_lines(tmp_path / "run") >= seen + 3, 60, "three more merges", hub_log)
        dom2, console2 = load_page(browser, url, tmp_path / "profile2")
        assert hub.poll() is None, "the run ended before the second load"
    finally:
        for p in procs[::-1]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs[::-1]:
            try:
                p.wait(scaled(30))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    assert console1 == [] and console2 == [], console1 + console2
    versions = []
    for dom in (dom1, dom2):
        version = re.search(r'<body[^>]*data-version="(\d+)"', dom)
        assert version, dom[:2000]                       # the script ran and rendered a snapshot
        versions.append(int(version.group(1)))
        acc = re.search(r'<polyline[^>]*id="acc-line"[^>]*>', dom)
        assert acc, "no accuracy curve"
        points = re.search(r'points="([^"]*)"', acc.group(0)).group(1).split()
        assert len(points) >= 2                          # the start model and at least one merge
        agents = re.findall(r'data-agent="([^"]+)" data-state="([^"]+)"', dom)
        assert sorted(n for n, _ in agents) == ["browser-pi0", "browser-pi1"], agents
        assert all(s in ("training", "idle") for _, s in agents), agents
        assert 'data-phase="training"' in dom
    assert versions[1] > versions[0], versions          # the page follows the run
    assert hub.returncode == 0, hub_log.read_text()[-2000:]  # SIGTERM: a clean, resumable stop
