"""A whole multi-site federation on loopback, for tests/test_multisite.py and benchmarks/multisite.py.

Four `ftte-agent`s (the bundled digits, non-IID), two site hubs (`ftte-hub train --site`, two
agents each, their own fleet keys and validation halves), a Flower SuperLink, one SuperNode per
site, and `flwr run examples/multisite`. --insecure is for loopback only (docs/multi-site.md says
what a WAN needs). Every process starts in its own session; ``Procs.kill_all`` ends each group by
its id, so nothing outlives the caller whatever happened.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ftte_core import data as ftdata
from ftte_core.protocol import generate_key, write_key

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HUB = [sys.executable, "-c", "from ftte_hub.cli import main; main()", "train"]
AGENT = [sys.executable, "-c", "from ftte_agent.cli import main; main()"]
FLOWER_TOOLS = ("flower-superlink", "flower-supernode", "flwr")


def missing_tool() -> Optional[str]:
    for tool in FLOWER_TOOLS:
        if not (BIN / tool).exists():
            return f"{tool} is not installed beside {sys.executable}"
    return None


def free_ports(n: int) -> List[int]:
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


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait(cond, timeout: float, what: str, logs=()):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    tails = "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-2500:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


class Procs:
    """Processes started in their own sessions; ``kill_all`` ends each group by its id."""

    def __init__(self, d: Path, env: Dict[str, str]):
        self.d, self.env, self.procs, self.logs = d, env, [], []

    def start(self, name: str, argv: List[str]):
        log = self.d / f"{name}.log"
        p = subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=self.env,
                             start_new_session=True)
        self.procs.append(p)
        self.logs.append(log)
        return p, log

    def kill_all(self, grace: float = 10.0) -> None:
        # Flower starts flower-superexec in a session of its own: find every descendant first
        doomed = set(descendants([p.pid for p in self.procs]))
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in self.procs:
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass


def descendants(roots: List[int]) -> List[int]:
    """The process ids below ``roots`` (Linux /proc; empty elsewhere)."""
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def federation_env(d: Path) -> Dict[str, str]:
    # FLWR_HOME: the flwr CLI's SuperLink connections and the apps the SuperNodes install, per run;
    # PATH: Flower starts flower-superexec by name; the poll interval: 1 s by default, per message;
    # telemetry off: nothing of a test leaves the machine (and no wait on an unreachable host)
    return dict(os.environ, FLWR_HOME=str(d / "flwr-home"), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                PYTHONUNBUFFERED="1", FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2", FLWR_TELEMETRY_ENABLED="0")


def start_sites(d: Path, procs: Procs, scaled, site_versions: int, memory_budget: Optional[str] = None,
                alpha: float = 0.5):
    """Data, four agents and two site hubs; returns the validation set they share out."""
    ds = ftdata.load_bundled("digits")
    train, val = ftdata.train_val_split(ds, val_fraction=0.2, seed=0)
    order = np.random.default_rng(0).permutation(len(val))
    parts = ftdata.partition_dirichlet(train, 4, alpha=alpha, seed=0, min_size=40)
    peers: Dict[int, List[str]] = {0: [], 1: []}
    for i, part in enumerate(parts):
        ftdata.save_npz(d / f"agent{i}.npz", part)
    for s in (0, 1):
        write_key(d / f"site{s}.key", generate_key())
        half = order[s::2]
        ftdata.save_npz(d / f"site{s}-val.npz", ftdata.Dataset(val.x[half], val.y[half], val.num_classes))
    logs = []
    for i in range(4):   # all four start at once; then their ports are read from their logs
        budget = ["--memory-budget", memory_budget] if memory_budget else []
        logs.append(procs.start(f"agent{i}", AGENT + [
            "--key", str(d / f"site{i // 2}.key"), "--data", str(d / f"agent{i}.npz"), "--name", f"s{i // 2}a{i}",
            "--port", "0", "--interface", "127.0.0.1", "--no-mdns", "--state-dir", str(d / f"state{i}"),
            *budget])[1])
    for i, log in enumerate(logs):
        port = wait(lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text()), scaled(60),
                    f"agent {i}", [log])
        peers[i // 2] += ["--peer", f"127.0.0.1:{port.group(1)}"]
    for s in (0, 1):
        procs.start(f"site{s}", HUB + [
            "--site", "--key", str(d / f"site{s}.key"), "--val-data", str(d / f"site{s}-val.npz"),
            "--out", str(d / f"site{s}"), "--no-mdns", *peers[s], "--min-agents", "2", "--buffer", "2",
            "--max-versions", str(site_versions), "--batch-size", "16", "--lr", "0.1", "--ping-interval", "1",
            "--wait-timeout", str(scaled(120))])
    for s in (0, 1):
        wait(lambda: (d / f"site{s}" / "site.sock").exists(), scaled(60), f"site hub {s}", procs.logs)
    return val


def start_superlink(d: Path, procs: Procs) -> int:
    """A SuperLink on a free port (not waited for: it starts while the sites do); returns the port."""
    (link,) = free_ports(1)
    (d / "flwr-home").mkdir(exist_ok=True)
    (d / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "sites"\n\n[superlink.sites]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    procs.start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                              str(link), "--disable-runtime-dependency-installation"])
    return link


def start_supernodes(d: Path, procs: Procs, scaled, link: int) -> None:
    """Once the SuperLink listens: a SuperNode beside each site hub (its local API on a free port)."""
    wait(lambda: port_open(link), scaled(60), "the SuperLink", procs.logs)
    rt0, rt1 = [p for p in free_ports(3) if p != link][:2]
    for s, rt in ((0, rt0), (1, rt1)):
        procs.start(f"supernode{s}", [
            str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(rt),
            "--node-config", f'site-socket="{d / f"site{s}" / "site.sock"}" site-key="{d / f"site{s}.key"}"'])


def run_federation(d: Path, procs: Procs, scaled, rounds: int, site_versions: int) -> List[dict]:
    """`flwr run examples/multisite` for ``rounds`` rounds; returns the ServerApp's metrics lines."""
    out = d / "federation"
    procs.start("flwr-run", [
        str(BIN / "flwr"), "run", str(ROOT / "examples" / "multisite"), "sites", "--stream", "--run-config",
        f'out="{out}" num-rounds={rounds} site-versions={site_versions} min-sites=2 '
        f'wait-timeout={scaled(60):.0f} round-timeout={scaled(300):.0f} evaluate-timeout={scaled(120):.0f}'])
    metrics = out / "metrics.jsonl"
    wait(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= rounds, scaled(300 * rounds),
         f"{rounds} federation rounds", procs.logs)
    return [json.loads(x) for x in metrics.read_text().splitlines()]
