"""`ftte-hub demo`: a whole fleet on this machine, end to end, with the real programs.

It writes a fleet key, splits the bundled digits non-IID across the agents (Dirichlet label
skew), starts one `ftte-agent` process per simulated device (different memory budgets and
slowdowns, advertising over mDNS on 127.0.0.1 only), and runs the hub in this process with the
same code as `ftte-hub train`: discovery over mDNS, the subset search for the smallest budget,
semi-asynchronous rounds, checkpoints, ONNX export. Everything lands in OUT (default ./ftte-demo).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ftte_core import data as ftdata
from ftte_core.protocol import generate_key, write_key

from .fleet import Hooks
from .status import parse_status_address
from .train import TrainConfig, run_train

LOOPBACK = "127.0.0.1"
MARKER = ".ftte-demo"  # written into every demo folder: only such a folder is ever deleted


@dataclass(frozen=True)
class DemoDevice:
    name: str
    memory_budget: str
    slowdown: float


#: a mixed testbed: the smallest budget decides what the fleet trains, the slow ones straggle
DEVICES = (
    DemoDevice("pi-zero-2w", "512KiB", 4.0),
    DemoDevice("pi3", "768KiB", 2.5),
    DemoDevice("pi4", "1MiB", 1.5),
    DemoDevice("pi5", "2MiB", 1.0),
    DemoDevice("jetson-nano", "4MiB", 1.0),
    DemoDevice("pi4-b", "1MiB", 2.0),
)


class DemoError(Exception):
    """The demo cannot run (one-line reason)."""


def prepare(out: Path, agents: int, alpha: float, seed: int) -> Dict[str, object]:
    """Key, validation split and one non-IID shard per agent, under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `ftte-hub demo`; the next demo with this --out replaces this folder\n")
    key_path = out / "fleet.key"
    key = generate_key()
    write_key(key_path, key)
    ds = ftdata.load_bundled("digits")
    train, val = ftdata.train_val_split(ds, val_fraction=0.25, seed=seed)
    shards = ftdata.partition_dirichlet(train, agents, alpha=alpha, seed=seed, min_size=64)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    ftdata.save_npz(data_dir / "val.npz", val)
    paths = []
    for i, shard in enumerate(shards):
        p = data_dir / f"agent-{i}.npz"
        ftdata.save_npz(p, shard)
        paths.append(p)
    return {"key": key, "key_path": key_path, "val": data_dir / "val.npz", "shards": paths,
            "sizes": [int(s.x.shape[0]) for s in shards],
            "labels": [ftdata.label_histogram(s) for s in shards]}


def agent_command(dev: DemoDevice, key_path: Path, data: Path, state_dir: Path) -> List[str]:
    return [sys.executable, "-m", "ftte_agent", "--key", str(key_path), "--data", str(data), "--name", dev.name,
            "--memory-budget", dev.memory_budget, "--slowdown", f"{dev.slowdown:g}", "--port", "0",
            "--state-dir", str(state_dir), "--interface", LOOPBACK]


def start_agents(devices, prep, out: Path) -> List[subprocess.Popen]:
    procs = []
    env = dict(os.environ, FTTE_NUM_THREADS="1")  # several devices share this machine's cores
    for dev, shard in zip(devices, prep["shards"]):
        log_path = out / "logs" / f"{dev.name}.log"
        log_path.parent.mkdir(exist_ok=True)
        with open(log_path, "wb") as log_file:
            procs.append(subprocess.Popen(agent_command(dev, prep["key_path"], shard, out / "agents" / dev.name),
                                          stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
    return procs


def stop_agents(procs: List[subprocess.Popen], timeout: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_demo(out: str = "ftte-demo", agents: int = 4, model: str = "mlp", target_accuracy: float = 0.95,
             max_versions: int = 400, buffer: int = 4, alpha: float = 0.5, seed: int = 0,
             fresh: bool = True, status: Optional[str] = None,
             say: Callable[[str], None] = print) -> Dict[str, object]:
    if not 1 <= agents <= len(DEVICES):
        raise DemoError(f"--agents must be 1..{len(DEVICES)}, got {agents}")
    if status is not None:
        try:
            parse_status_address(status)  # before any folder is made or agent started
        except ValueError as e:
            raise DemoError(str(e)) from None
    out_dir = Path(out)
    if fresh and out_dir.exists():
        if not (out_dir / MARKER).is_file():
            raise DemoError(f"{out_dir} exists and is not a demo folder; choose another --out")
        shutil.rmtree(out_dir)
    devices = DEVICES[:agents]
    prep = prepare(out_dir, agents, alpha, seed)
    say(f"demo: {agents} agents on this machine, digits split non-IID (Dirichlet alpha={alpha:g}):")
    for dev, n, hist in zip(devices, prep["sizes"], prep["labels"]):
        top = ", ".join(f"{c}:{int(k)}" for c, k in sorted(enumerate(hist), key=lambda t: -t[1])[:3])
        say(f"  {dev.name:<12} budget {dev.memory_budget:>6}  {dev.slowdown:g}x slower  {n:4d} samples "
            f"(most: {top})")
    procs = start_agents(devices, prep, out_dir)
    say(f"demo: started {agents} ftte-agent processes (logs in {out_dir / 'logs'}); "
        f"the hub finds them over mDNS on {LOOPBACK}")
    cfg = TrainConfig(model=model, val_data=str(prep["val"]), out=str(out_dir), min_agents=agents,
                      buffer=buffer, max_versions=max_versions, target_accuracy=target_accuracy,
                      interfaces=[LOOPBACK], mdns=True, lr=0.05, batch_size=32, local_epochs=1.0,
                      wait_timeout=60.0, seed=seed, status=status)
    hooks = Hooks(on_status_url=lambda url: say(f"demo: watch the run at {url} (read-only status page)"))
    try:
        summary = asyncio.run(_watch(run_train(cfg, prep["key"], hooks), procs, devices, out_dir))
    finally:
        stop_agents(procs)
    return summary


async def _watch(coro, procs, devices, out_dir: Path):
    """Run the hub, but fail fast (with the agent's last log line) if an agent process dies."""
    hub = asyncio.ensure_future(coro)
    while not hub.done():
        await asyncio.wait([hub], timeout=0.5)
        for dev, p in zip(devices, procs):
            if p.poll() is not None and not hub.done():
                hub.cancel()
                await asyncio.gather(hub, return_exceptions=True)
                tail = (out_dir / "logs" / f"{dev.name}.log").read_text(errors="replace").strip().splitlines()
                raise DemoError(f"agent {dev.name} exited with status {p.returncode}: "
                                f"{tail[-1] if tail else '(no output)'}")
    return hub.result()
