"""Peak memory of an ftte-agent process: idle, and while training zoo models on the digits data.

    python benchmarks/agent_memory.py [--tasks 3] [--no-mdns] [--install]

Starts a real agent (loopback only, mDNS on 127.0.0.1 unless --no-mdns), plays the hub with
Channel + messages, and reads the agent's /proc/PID/status: VmHWM (peak resident set), VmRSS, and
its split into RssAnon (the process's heap) and RssFile (library pages).
One fresh agent per model, so each peak belongs to that model alone. The subset is the whole
model (the worst case: every gradient exists); tasks are one epoch over all 1797 samples, batch 32.
Prints a table; the target is "well inside 64 MB".

``--install``: instead, a larger MLP (64-2048-2048-10, 17 MB of float32 weights) trained as FTTE
trains it (the classifier and a quarter of the rows of the layer before, frozen weights int8),
once installed from the float32 model file and once from the hub's int8 install
(``modelfile.install_bytes``, model file version 3), a fresh agent each.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ftte_core import messages as M
from ftte_core.channel import Channel
from ftte_core.data import load_bundled, save_npz
from ftte_core.local import TaskConfig
from ftte_core.modelfile import content_hash, install_bytes, model_to_bytes
from ftte_core.protocol import generate_key, write_key
from ftte_core.subset import Subset
from ftte_core.update import Update, subset_values
from ftte_core.zoo import zoo

MIB = 1 << 20


def proc_memory(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def start_agent(key: Path, data: Path, state: Path, mdns: bool) -> tuple:
    cmd = [sys.executable, "-m", "ftte_agent.cli", "--key", str(key), "--data", str(data), "--state-dir", str(state),
           "--port", "0", "--interface", "127.0.0.1", "--name", "bench", "--memory-budget", "64MiB"]
    if not mdns:
        cmd.append("--no-mdns")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    for line in proc.stderr:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"agent_memory: the agent did not start: {proc.stderr.read()[-500:]}")


MODEL_LOG_TIMEOUT = 300  # s for the agent to log the MODEL as handled (a 17 MB model on a slow machine)


def wait_for_log(proc, pattern: str, timeout: float = MODEL_LOG_TIMEOUT) -> None:
    """Read the agent's log until a line matches ``pattern`` (the MODEL frame has been handled).
    The read blocks on the pipe, so it runs in a daemon thread that a timeout abandons."""
    found = threading.Event()

    def read():
        for line in proc.stderr:
            if re.search(pattern, line):
                found.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found.is_set():
        raise SystemExit(f"agent_memory: the agent did not log {pattern!r} within {timeout:g} s")


async def drive(port: int, key: bytes, model, tasks: int, subset=None, blob=None, frozen="float32",
                after_model=None) -> float:
    subset = subset if subset is not None else Subset.full(model)
    blob = blob if blob is not None else model_to_bytes(model)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ch = await Channel.open(reader, writer, "client", key)
    await ch.recv(timeout=10)  # AGENT_INFO
    await ch.send(M.MODEL, blob)
    if after_model is not None:
        await asyncio.to_thread(after_model)
    seconds = 0.0
    for i in range(tasks):
        msg = M.TaskMessage(task_id=f"bench-{i}", run_id="bench", base_version=0, model_hash=content_hash(blob),
                            subset=subset.to_dict(), subset_fingerprint=subset.fingerprint(),
                            config=TaskConfig(lr=0.05, batch_size=32, local_epochs=1.0, frozen=frozen), seed=i, bits=8,
                            values=subset_values(model, subset))
        await ch.send(M.TASK, M.encode_task(msg))
        while True:
            t, body = await ch.recv(timeout=120)
            if t == M.UPDATE:
                upd = Update.from_bytes(body)
                seconds += upd.stats["train_seconds"]
                await ch.send(M.ACK, M.encode_json({"task_id": upd.task_id, "accepted": True, "reason": "",
                                                    "message": "", "version": 0}))
                break
            if t in (M.TASK_FAILED, M.ERROR):
                raise SystemExit(f"agent_memory: {M.name(t)} {M.decode_json(body, t)}")
    await ch.close()
    return seconds / tasks


def _fleet_files(tmp: Path, ds) -> bytes:
    """A fleet key and the data file in ``tmp``; returns the key."""
    key = generate_key()
    write_key(tmp / "fleet.key", key)
    save_npz(tmp / "digits.npz", ds)
    return key


def measure_agent(tmp: Path, key: bytes, label: str, args, model, *drive_args, **drive_kw) -> tuple:
    """(idle memory, memory once the MODEL frame is handled, memory after the tasks, seconds per
    task) of a fresh agent driven by ``drive``."""
    proc, port = start_agent(tmp / "fleet.key", tmp / "digits.npz", tmp / f"state-{label}", not args.no_mdns)
    after_model = {}

    def model_handled():
        wait_for_log(proc, r"model \S+: (received and cached|already cached)")
        after_model.update(proc_memory(proc.pid))

    try:
        time.sleep(2.5 if not args.no_mdns else 0.5)  # let the advertisement settle
        idle = proc_memory(proc.pid)
        task_s = asyncio.run(drive(port, key, model, args.tasks, *drive_args, after_model=model_handled, **drive_kw))
        busy = proc_memory(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    return idle, after_model, busy, task_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=3, help="tasks per model")
    ap.add_argument("--no-mdns", action="store_true", help="run the agents without mDNS")
    ap.add_argument("--install", action="store_true",
                    help="a 64-2048-2048-10 MLP trained sparse with frozen weights int8: float32 file vs int8 install")
    args = ap.parse_args()
    if args.install:
        compare_installs(args)
        return
    ds = load_bundled("digits")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        key = _fleet_files(tmp, ds)
        for name in ("mlp", "cnn"):
            model = zoo(name, ds.feature_shape, ds.num_classes, seed=0)
            idle, _, busy, task_s = measure_agent(tmp, key, name, args, model)
            rows.append((name, model.num_params(), idle["VmHWM"], busy["VmHWM"], busy["VmRSS"], busy["RssAnon"],
                         busy["RssFile"], task_s))
    print(f"ftte-agent memory (digits, {ds.x.shape[0]} samples, full-model subset, {args.tasks} tasks of 1 epoch, "
          f"mDNS {'off' if args.no_mdns else 'on'})")
    print(f"{'model':6} {'params':>8} {'idle VmHWM':>11} {'train VmHWM':>12} {'train VmRSS':>12} {'(anon':>8} "
          f"{'+ file)':>8} {'s/task':>7}")
    for name, params, idle_hwm, hwm, rss, anon, file_, s in rows:
        print(f"{name:6} {params:>8} {idle_hwm / MIB:>9.1f}Mi {hwm / MIB:>10.1f}Mi {rss / MIB:>10.1f}Mi "
              f"{anon / MIB:>6.1f}Mi {file_ / MIB:>6.1f}Mi {s:>7.3f}")
    print("VmHWM: peak resident set; anon: the process's own heap; file: shared-library pages (shared, reclaimable)")


def compare_installs(args) -> None:
    ds = load_bundled("digits")
    model = zoo("mlp", ds.feature_shape, ds.num_classes, seed=0, hidden=(2048, 2048))
    subset = Subset.of(model, {"fc2": {"rows": list(range(0, 2048, 4)), "bias": True},
                               "fc3": {"rows": "all", "bias": True}})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        key = _fleet_files(tmp, ds)
        for form in ("float32", "int8"):
            blob = install_bytes(model, subset, form)
            idle, after_model, busy, task_s = measure_agent(tmp, key, form, args, model, subset, blob, frozen="int8")
            rows.append((form, len(blob), idle["VmHWM"], after_model["VmHWM"], busy["VmHWM"], busy["VmRSS"], task_s))
    print(f"ftte-agent memory, MLP 64-2048-2048-10 ({model.num_params():,} parameters), subset "
          f"{subset.describe(model)}, frozen weights int8, {args.tasks} tasks of 1 epoch, mDNS "
          f"{'off' if args.no_mdns else 'on'}")
    print(f"{'install':8} {'MODEL bytes':>12} {'idle VmHWM':>11} {'MODEL VmHWM':>12} {'train VmHWM':>12} "
          f"{'train VmRSS':>12} {'s/task':>7}")
    for form, nbytes, idle_hwm, model_hwm, hwm, rss, s in rows:
        print(f"{form:8} {nbytes:>12,} {idle_hwm / MIB:>9.1f}Mi {model_hwm / MIB:>10.1f}Mi {hwm / MIB:>10.1f}Mi "
              f"{rss / MIB:>10.1f}Mi {s:>7.3f}")
    print("MODEL VmHWM: the peak once the agent has received, checked and cached the model file")


if __name__ == "__main__":
    main()
