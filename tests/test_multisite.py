"""Issue 14: two site hubs federate through Flower's deployment engine (docs/multi-site.md).

One SuperLink, two SuperNodes, each beside a site hub (`ftte-hub train --site`) with two
`ftte-agent` processes, all on loopback (--insecure: TLS and SuperNode authentication are what
the docs add for a real WAN). The bundled digits are split non-IID across the four agents; two
federation rounds (`flwr run examples/multisite`) must reach the target accuracy and the global
model must export to ONNX and match onnxruntime. Runs whenever flwr is installed; every process
it starts is in its own session and killed by group id at the end, whatever happened.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the `flower` extra (flwr) is not installed")
pytest.importorskip("onnx", reason="the hub needs the onnx package")

from ftte_core import data as ftdata  # noqa: E402
from ftte_core.protocol import generate_key, write_key  # noqa: E402
from slowdev import scaled  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HUB = [sys.executable, "-c", "from ftte_hub.cli import main; main()", "train"]
AGENT = [sys.executable, "-c", "from ftte_agent.cli import main; main()"]
TARGET = 0.80          # mean site validation accuracy after two rounds (start: ~0.1)
SITE_VERSIONS = 4


def free_ports(n):
    """n distinct ports free right now on 127.0.0.1 (held open together, so no two are the same)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait(cond, timeout, what, logs=()):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    tails = "\n".join(f"--- {p.name}:\n{p.read_text()[-2500:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


class Procs:
    """Processes started in their own sessions; ``kill_all`` ends each group by its id."""

    def __init__(self, d, env):
        self.d, self.env, self.procs, self.logs = d, env, [], []

    def start(self, name, argv, cwd=None):
        log = self.d / f"{name}.log"
        p = subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=self.env, cwd=cwd,
                             start_new_session=True)
        self.procs.append(p)
        self.logs.append(log)
        return p, log

    def kill_all(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(scaled(10))
            except subprocess.TimeoutExpired:
                pass


def test_two_sites_federate_through_flower(tmp_path):
    for tool in ("flower-superlink", "flower-supernode", "flwr"):
        if not (BIN / tool).exists():
            pytest.skip(f"{tool} is not installed beside {sys.executable}")
    d = tmp_path
    env = dict(os.environ, FLWR_HOME=str(d / "flwr-home"), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONUNBUFFERED="1")
    procs = Procs(d, env)
    try:
        # data: digits, 20% validation (half per site), the rest non-IID over four agents
        ds = ftdata.load_bundled("digits")
        train, val = ftdata.train_val_split(ds, val_fraction=0.2, seed=0)
        order = np.random.default_rng(0).permutation(len(val))
        parts = ftdata.partition_dirichlet(train, 4, alpha=0.5, seed=0, min_size=40)
        peers = {0: [], 1: []}
        for i, part in enumerate(parts):
            ftdata.save_npz(d / f"agent{i}.npz", part)
        for s in (0, 1):
            write_key(d / f"site{s}.key", generate_key())
            half = order[s::2]
            ftdata.save_npz(d / f"site{s}-val.npz", ftdata.Dataset(val.x[half], val.y[half], val.num_classes))
        for i in range(4):
            s = i // 2
            _, log = procs.start(f"agent{i}", AGENT + [
                "--key", str(d / f"site{s}.key"), "--data", str(d / f"agent{i}.npz"), "--name", f"s{s}a{i}",
                "--port", "0", "--interface", "127.0.0.1", "--no-mdns", "--state-dir", str(d / f"state{i}")])
            port = wait(lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text()), scaled(60),
                        f"agent {i}", [log])
            peers[s] += ["--peer", f"127.0.0.1:{port.group(1)}"]
        for s in (0, 1):
            procs.start(f"site{s}", HUB + [
                "--site", "--key", str(d / f"site{s}.key"), "--val-data", str(d / f"site{s}-val.npz"),
                "--out", str(d / f"site{s}"), "--no-mdns", *peers[s], "--min-agents", "2", "--buffer", "2",
                "--max-versions", str(SITE_VERSIONS), "--batch-size", "16", "--lr", "0.1", "--ping-interval", "1",
                "--wait-timeout", str(scaled(120))])
        for s in (0, 1):
            wait(lambda: (d / f"site{s}" / "site.sock").exists(), scaled(60), f"site hub {s}", procs.logs)

        link, rt0, rt1 = free_ports(3)
        (d / "flwr-home").mkdir()
        (d / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "sites"\n\n[superlink.sites]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
        procs.start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                  str(link), "--disable-runtime-dependency-installation"])
        wait(lambda: port_open(link), scaled(60), "the SuperLink", procs.logs)
        for s, rt in ((0, rt0), (1, rt1)):
            procs.start(f"supernode{s}", [
                str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(rt),
                "--node-config", f'site-socket="{d / f"site{s}" / "site.sock"}" site-key="{d / f"site{s}.key"}"'])
        out = d / "federation"
        run, run_log = procs.start("flwr-run", [
            str(BIN / "flwr"), "run", str(ROOT / "examples" / "multisite"), "sites", "--stream", "--run-config",
            f'out="{out}" num-rounds=2 site-versions={SITE_VERSIONS} min-sites=2 wait-timeout={scaled(60):.0f} '
            f'round-timeout={scaled(300):.0f} evaluate-timeout={scaled(120):.0f}'])
        metrics = out / "metrics.jsonl"
        wait(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, scaled(600),
             "two federation rounds", procs.logs)
        lines = [json.loads(x) for x in metrics.read_text().splitlines()]
        assert [x["version"] for x in lines] == [1, 2]
        assert all(len(x["sites"]) == 2 for x in lines), lines
        assert lines[-1]["accuracy"] >= TARGET, lines
        # deltas only: what a site sends up is a fraction of the float32 model
        assert all(x["wan_train_up"] < 2 * x["full_model_float32"] for x in lines), lines
        assert lines[1]["wan_train_down"] < lines[0]["wan_train_down"], lines   # rows changed, not the model

        # the global model: ONNX out, the same predictions in onnxruntime as in our engine
        import ftte_core as ft

        model = ft.load_model(str(out / "model.onnx"))
        _, acc = model.evaluate(val.x, val.y)
        assert acc >= TARGET - 0.05
        ort = pytest.importorskip("onnxruntime")
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        x = val.x[:64].astype(np.float32)
        ours = model.forward(x)
        theirs = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    finally:
        procs.kill_all()
