"""Bytes on the wire (both directions, every frame) and time until a target accuracy, real fleet.

Three real `ftte-agent` processes on loopback (static --peer addresses, no mDNS), each with its
own Dirichlet(alpha) shard of the bundled digits (`ftte-hub split`), and the hub of
`ftte-hub train` in this process with the digits MLP. Prints, per run, the time (from the moment
the hub is ready to hand out tasks) and the transport bytes (hub side: in + out, handshakes,
framing and encryption included) at the first merge whose validation accuracy reaches 0.85 and
0.90, read from the hub's metrics.jsonl. Repeats --runs times (new run folder each time) and
prints each run and the median.

    PYTHONPATH=src:agent:hub python benchmarks/fleet_bytes.py [--runs 3] [--alpha 0.8] [--buffer 3]
        [--no-downlink] [--no-direct-steps] [--float32-install] [--update-bits 4] [--base-step-budget B] [--lr-decay D] [--agreement-damping K]
        [--memory-budget 512KiB]
        [--strategy ftte-tiered --memory-budgets 210KiB,400KiB,1MiB]

``--memory-budgets`` gives each agent its own budget (one per agent, comma-separated), so
``--strategy ftte`` (one subset for the smallest) and ``ftte-tiered`` (nested subsets, one per
budget tier) can be compared on the same fleet; the summary lines name each agent's tier.

The agents' state folders are fresh each run, so every run pays for sending the model once per
agent (MODEL frame), as a first deployment would.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE / "src"), str(HERE / "agent"), str(HERE / "hub")]

from ftte_core.protocol import generate_key, write_key  # noqa: E402
from ftte_hub.checkpoint import INITIAL_MODEL  # noqa: E402
from ftte_hub.fleet import Hooks  # noqa: E402
from ftte_hub.tools import split  # noqa: E402
from ftte_hub.train import TrainConfig, run_train  # noqa: E402

TARGETS = (0.85, 0.90)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_agents(root: Path, key_path: Path, shards, extra, budgets=None):
    env = dict(os.environ, FTTE_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE / "src"), str(HERE / "agent"), str(HERE / "hub")]))
    procs, peers = [], []
    for i, shard in enumerate(shards):
        port = free_port()
        log = open(root / f"agent-{i}.log", "wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "ftte_agent", "--key", str(key_path), "--data", str(shard), "--name", f"a{i}",
             "--port", str(port), "--interface", "127.0.0.1", "--no-mdns", "--state-dir", str(root / f"state-{i}"),
             *extra, *(["--memory-budget", budgets[i]] if budgets else [])], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        peers.append(f"127.0.0.1:{port}")
    return procs, peers


def wait_listening(peers, timeout: float = 60.0) -> None:
    """Until every agent accepts TCP connections (so the hub's first dial succeeds)."""
    end = time.monotonic() + timeout
    for peer in peers:
        host, port = peer.rsplit(":", 1)
        while time.monotonic() < end:
            try:
                socket.create_connection((host, int(port)), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)


def stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def one_run(root: Path, args) -> dict:
    key = generate_key()
    key_path = root / "fleet.key"
    write_key(key_path, key)
    res = split("digits", str(root / "data"), 3, alpha=args.alpha, val_fraction=0.2, seed=args.seed)
    shards = [root / "data" / f"device-{i}.npz" for i in range(3)]
    extra = ["--memory-budget", args.memory_budget] if args.memory_budget else []
    budgets = [b.strip() for b in args.memory_budgets.split(",")] if args.memory_budgets else None
    procs, peers = start_agents(root, key_path, shards, extra, budgets)
    ready = {}
    try:
        wait_listening(peers)
        cfg = TrainConfig(model="mlp", val_data=str(root / "data" / "val.npz"), out=str(root / "run"), min_agents=3,
                          peers=peers, mdns=False, buffer=args.buffer, max_versions=args.max_versions,
                          target_accuracy=None if args.to_max_versions else TARGETS[-1], lr=args.lr, local_epochs=args.epochs,
                          batch_size=32, seed=args.seed, wait_timeout=60.0, downlink=not args.no_downlink,
                          downlink_direct=not args.no_direct_steps,
                          strategy=args.strategy,
                          update_bits=args.update_bits, downlink_bits=args.downlink_bits,
                          base_step_budget=args.base_step_budget, lr_decay=args.lr_decay,
                          agreement_damping=args.agreement_damping,
                          int8_install=not args.float32_install)
        hooks = Hooks(on_ready=lambda fleet: ready.setdefault("t", time.perf_counter()),
                      on_metrics=lambda line: ready.setdefault("lines", []).append((time.perf_counter(), line)))
        summary = asyncio.run(run_train(cfg, key, hooks))
    finally:
        stop(procs)
    # what each agent received in its MODEL frame (the int8 install or the float32 file), as cached
    cached = [sum(p.stat().st_size for p in (root / f"state-{i}").rglob("*.ftm")) for i in range(3)]
    out = {"samples": [len(p) for _n, p in res.shards[:3]], "final_accuracy": summary["accuracy"],
           "bytes_total": summary["bytes_in"] + summary["bytes_out"], "versions": summary["version"],
           # one MODEL frame per agent (fresh state folders): 21 bytes of framing each
           "model_frames_bytes": sum(n + 21 for n in cached),
           "float32_model_bytes": (root / "run" / INITIAL_MODEL).stat().st_size,
           "tiers": [t["trainable_params"] for t in summary.get("tiers", [])],
           "agent_tiers": {a["name"]: a.get("tier") for a in summary["agents"].values()}}
    t0 = ready["t"]
    for target in TARGETS:
        hit = next(((t, line) for t, line in ready.get("lines", []) if line["accuracy"] >= target), None)
        if hit is None:
            out[target] = None
            continue
        t, line = hit
        out[target] = {"time_s": t - t0, "bytes_in": line["bytes_in"], "bytes_out": line["bytes_out"],
                       "bytes": line["bytes_in"] + line["bytes_out"], "version": line["version"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--buffer", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-versions", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-downlink", action="store_true", help="tasks carry float32 values (as before downlink deltas)")
    ap.add_argument("--no-direct-steps", action="store_true", help="canonical downlink chains only (no direct steps)")
    ap.add_argument("--float32-install", action="store_true",
                    help="install the model as float32 (default: frozen weights int8 when the run trains so)")
    ap.add_argument("--downlink-bits", type=int, choices=(8, 4), default=8, help="the downlink stream's steps")
    ap.add_argument("--update-bits", type=int, choices=(8, 4), default=None, help="the agents' update encoding")
    ap.add_argument("--agreement-damping", type=float, default=0.0,
                    help="ftte's agreement damping kappa (train --agreement-damping; default 0, off)")
    ap.add_argument("--lr-decay", type=float, default=0.0,
                    help="ftte's server-step decay in merges per agent (train --lr-decay; default 0, off)")
    ap.add_argument("--base-step-budget", type=float, default=0.0,
                    help="plain ftte's per-base step budget in mean deltas (default 0: off, as ftte-hub train)")
    ap.add_argument("--memory-budget", default=None, help="every agent's --memory-budget (default: the agent's own)")
    ap.add_argument("--memory-budgets", default=None, help="each agent's --memory-budget, comma-separated (3 of them)")
    ap.add_argument("--strategy", default="ftte", choices=("ftte", "ftte-tiered", "fedbuff", "fedavg"))
    ap.add_argument("--to-max-versions", action="store_true",
                    help="train on to --max-versions after the targets (the final accuracy is printed)")
    ap.add_argument("--json", action="store_true", help="print one JSON line per run as well")
    args = ap.parse_args()
    if args.memory_budgets and len(args.memory_budgets.split(",")) != 3:
        ap.error("--memory-budgets takes 3 budgets, one per agent")
    import logging
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for r in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="ftte-fleet-bytes-") as tmp:
            res = one_run(Path(tmp), argparse.Namespace(**{**vars(args), "seed": args.seed + r}))
        rows.append(res)
        cells = []
        for target in TARGETS:
            h = res[target]
            cells.append(f"{target:.2f}: " + ("not reached" if h is None else
                         f"{h['time_s']:5.2f} s {h['bytes'] / 1e6:6.2f} MB (in {h['bytes_in'] / 1e6:.2f}, out "
                         f"{h['bytes_out'] / 1e6:.2f}) v{h['version']}"))
        print(f"run {r} (seed {args.seed + r}, shards {res['samples']}): " + " | ".join(cells)
              + f" | MODEL frames {res['model_frames_bytes'] / 1e6:.2f} MB"
              + f" | final accuracy {res['final_accuracy']:.4f} at v{res['versions']}"
              + (f" | tiers {res['tiers']} (trained parameters), agents' tiers {res['agent_tiers']}"
                 if res["tiers"] else ""), flush=True)
        if args.json:
            print(json.dumps(res, default=str))
    for target in TARGETS:
        hits = [r[target] for r in rows if r[target] is not None]
        if hits:
            model = statistics.median(r["model_frames_bytes"] for r in rows)
            print(f"median until {target:.2f} over {len(hits)}/{len(rows)} runs: "
                  f"{statistics.median(h['time_s'] for h in hits):.2f} s, "
                  f"{statistics.median(h['bytes'] for h in hits) / 1e6:.2f} MB "
                  f"(down {statistics.median(h['bytes_out'] for h in hits) / 1e6:.2f}, "
                  f"up {statistics.median(h['bytes_in'] for h in hits) / 1e6:.2f}; "
                  f"{statistics.median(h['bytes'] for h in hits) / 1e6 - model / 1e6:.2f} MB without the "
                  f"{model / 1e6:.2f} MB of MODEL frames an agent with the model cached skips)")
        else:
            print(f"until {target:.2f}: not reached in any run")


if __name__ == "__main__":
    main()
