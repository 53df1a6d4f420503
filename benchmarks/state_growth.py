"""Hub state growth: checkpoint, journal, driver state and RSS after 1,000 and after 20,000 merged updates.

    python benchmarks/state_growth.py                       # marks at 1,000 and 20,000 merged updates
    python benchmarks/state_growth.py --at 100,2000 --buffer 4

Goal (issue 9, "bounded state"): every figure after 20,000 merged updates within 2x of the one
after 1,000.

How: the hub's own round-driver stack in this process, without sockets (reaching 20,000 updates
through the network takes minutes of both cores; the state in question lives entirely in these
objects):
  * ``ftte_core.scheduler.RoundDriver`` with the ``ftte`` strategy on the zoo ``mlp`` shaped by the
    bundled digits (85,002 parameters, all trained: what ``ftte-hub train --model mlp`` trains on
    digits at a 64 MiB budget), wrapped in the hub's ``ftte_hub.coordinator.Coordinator``, so
    every task issued, update and departure is appended to the real journal
    (``journal/<version>.log``; records written, not fsynced: the size is the same);
  * after every merge, a checkpoint exactly as ``ftte_hub.train`` writes it: the driver's
    ``state_dict()`` and per-agent counts in ``meta`` plus the model and buffer, with
    ``ftte_hub.checkpoint.save_checkpoint``; then the journals it makes redundant are deleted;
  * ``--devices`` devices (default 20) each holding one task; updates come back in a random order
    (so they are stale by a version or two, as on a real fleet) as valid int8 deltas from
    benchmarks/fake_agents.py's ``UpdateTemplates`` (tiny steps: the model stays sane);
  * ``--abandon`` (default 0.02) of the tasks are never answered: the device leaves
    (``device_gone``) and comes back with a new task, as an agent killed mid-task does.

Printed per mark: merged updates, checkpoint.npz bytes, journal bytes (peak: just before a
checkpoint, when the journal holds a full buffer of updates), the driver's
``state_dict()["meta"]`` as JSON bytes, this process's VmRSS (it holds what the hub holds:
driver, model, journal, coordinator), and the mean time per merge of ``state_dict()`` plus its
JSON encoding (the hub does this on its event loop). Then the ratios, last mark over first.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent


def vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run(marks: List[int], devices: int, buffer: int, abandon: float, seed: int, out: Path) -> List[Dict]:
    sys.path.insert(0, str(HERE))
    import ftte_core as ft
    from fake_agents import UpdateTemplates
    from ftte_core import data as ftdata
    from ftte_core.local import TaskConfig
    from ftte_core.modelfile import content_hash, model_to_bytes
    from ftte_core.scheduler import RoundDriver
    from ftte_core.strategies import make_strategy
    from ftte_core.subset import Subset
    from ftte_core.update import Update
    from ftte_hub import checkpoint as ckpt
    from ftte_hub.coordinator import Coordinator

    ds = ftdata.load_bundled("digits")
    model = ft.zoo("mlp", ds.feature_shape, ds.num_classes, seed=seed)
    subset = Subset.full(model)
    strategy = make_strategy("ftte", buffer_size=buffer, server_lr=1.0)
    task_cfg = TaskConfig(lr=0.05, local_epochs=1.0, batch_size=32)
    blob = model_to_bytes(model)
    meta_base = {"format": ckpt.FORMAT, "model_hash": content_hash(blob), "model_name": model.name,
                 "model_spec": "mlp", "strategy": strategy.name, "buffer": strategy.buffer_size,
                 "server_lr": strategy.server_lr, "task_config": task_cfg.as_dict(), "subset": subset.to_dict(),
                 "needed_bytes": 888400, "m_min": 64 << 20, "seed": seed, "subset_described": "the full model"}
    out.mkdir(parents=True, exist_ok=True)
    (out / ckpt.INITIAL_MODEL).write_bytes(blob)
    driver = RoundDriver(model, subset, strategy, task_cfg, max_versions=None, seed=seed)
    coord = Coordinator(driver, out)
    templates = UpdateTemplates(seed)
    rng = random.Random(seed)
    t_run = time.monotonic()

    timing = {"state_s": [], "write_s": [], "journal_peak": 0}

    def on_merge(report) -> None:
        timing["journal_peak"] = max(timing["journal_peak"], tree_bytes(out / ckpt.JOURNAL_DIR))
        t0 = time.perf_counter()
        state = driver.state_dict()
        meta = dict(meta_base, driver=state["meta"], agents=json.loads(json.dumps(coord.agents)),
                    elapsed_s=time.monotonic() - t_run, start_accuracy=0.0, last_accuracy=0.0, best_accuracy=0.0,
                    version=state["meta"]["version"], finished=False, finish_reason="")
        json.dumps(meta, separators=(",", ":"))
        timing["state_s"].append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        ckpt.save_checkpoint(out, meta, model.state(), state["buffer"])
        for v in ckpt.journal_versions(out):
            if v < state["meta"]["version"]:
                os.unlink(ckpt.journal_path(out, v))
        timing["write_s"].append(time.perf_counter() - t1)

    coord.on_merge = on_merge
    coord.open_journal()
    names = [f"dev-{i:03d}" for i in range(devices)]
    holding = {}                       # device -> its task
    for d in names:
        holding[d] = coord.task_for(d)
    results = []
    pending_marks = sorted(marks)
    last_report = time.monotonic()
    while pending_marks:
        d = rng.choice(names)
        task = holding[d]
        if rng.random() < abandon:     # killed mid-task: the task stays outstanding, never answered
            coord.gone(d)
            holding[d] = coord.task_for(d)
            continue
        upd = Update(base_version=task.base_version, subset_fingerprint=task.subset_fingerprint, num_samples=300,
                     loss=1.0, tensors=templates.tensors_for(task), stats={}, peak_memory_bytes=1 << 20,
                     device_id=d, task_id=task.id)
        raw = upd.to_bytes()
        arrival, _, _ = coord.update_from(d, upd, raw, len(raw))
        if not arrival.accepted:
            raise SystemExit(f"state_growth: update {task.id} rejected ({arrival.reason}): {arrival.message}")
        holding[d] = coord.task_for(d)
        merged = driver.merged_updates
        if time.monotonic() - last_report > 10:
            last_report = time.monotonic()
            print(f"# {merged:,} merged updates, {time.monotonic() - t_run:.0f} s", flush=True)
        if merged >= pending_marks[0] and arrival.merge is not None:
            pending_marks.pop(0)
            meta_bytes = len(json.dumps(driver.state_dict()["meta"], separators=(",", ":")))
            window = slice(-50, None)
            results.append({
                "merged_updates": merged, "versions": driver.version,
                "checkpoint_bytes": (out / ckpt.CHECKPOINT).stat().st_size,
                "journal_peak_bytes": timing["journal_peak"], "driver_meta_bytes": meta_bytes, "rss_bytes": vm_rss(),
                "state_ms": 1e3 * sum(timing["state_s"][window]) / len(timing["state_s"][window]),
                "write_ms": 1e3 * sum(timing["write_s"][window]) / len(timing["write_s"][window]),
                "outstanding": driver.stats()["outstanding_tasks"], "seconds": round(time.monotonic() - t_run, 1)})
            timing["journal_peak"] = 0
    if coord.journal is not None:
        coord.journal.close_now()
    return results


def fmt(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Hub state after N merged updates (checkpoint, journal, meta, RSS).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--at", default="1000,20000", help="comma-separated merged-update counts to measure at")
    p.add_argument("--devices", type=int, default=20, help="devices, each holding one task")
    p.add_argument("--buffer", type=int, default=10, help="K: updates per merge")
    p.add_argument("--abandon", type=float, default=0.02, help="share of tasks never answered (device killed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, metavar="DIR", help="folder for the checkpoint and journal (default: temp)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the figures as JSON")
    args = p.parse_args(argv)
    try:
        marks = sorted({int(x) for x in args.at.split(",") if x.strip()})
    except ValueError:
        p.error("--at: comma-separated integers")
    if not marks or marks[0] < 1 or args.devices < 1 or args.buffer < 1 or not 0 <= args.abandon < 1:
        p.error("--at, --devices and --buffer must be positive, --abandon in [0, 1)")
    with tempfile.TemporaryDirectory(prefix="state_growth_") as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        results = run(marks, args.devices, args.buffer, args.abandon, args.seed, out)
    cols = [("merged updates", lambda r: f"{r['merged_updates']:,}"), ("versions", lambda r: f"{r['versions']:,}"),
            ("checkpoint", lambda r: fmt(r["checkpoint_bytes"])),
            ("journal (peak)", lambda r: fmt(r["journal_peak_bytes"])),
            ("driver meta", lambda r: fmt(r["driver_meta_bytes"])), ("RSS", lambda r: fmt(r["rss_bytes"])),
            ("state_dict+JSON", lambda r: f"{r['state_ms']:.2f} ms"),
            ("checkpoint write", lambda r: f"{r['write_ms']:.1f} ms"),
            ("outstanding tasks", lambda r: f"{r['outstanding']:,}")]
    widths = [max(len(h), *(len(f(r)) for r in results)) for h, f in cols]
    print("  ".join(f"{h:>{w}}" for (h, _), w in zip(cols, widths)))
    for r in results:
        print("  ".join(f"{f(r):>{w}}" for (_, f), w in zip(cols, widths)))
    first, last = results[0], results[-1]
    verdict = True
    if len(results) > 1:
        print(f"\nratio, {last['merged_updates']:,} over {first['merged_updates']:,} merged updates (goal: within 2x):")
        for key, label in (("checkpoint_bytes", "checkpoint"), ("journal_peak_bytes", "journal (peak)"),
                           ("driver_meta_bytes", "driver meta"), ("rss_bytes", "RSS"),
                           ("state_ms", "state_dict+JSON time")):
            ratio = last[key] / first[key] if first[key] else float("inf")
            ok = ratio <= 2.0
            goal = key in ("checkpoint_bytes", "journal_peak_bytes", "rss_bytes")   # the goal
            if goal:
                verdict &= ok
            note = "" if goal else "  (not a goal: the cause)"
            print(f"  {label:<22} {ratio:7.2f}x  {'PASS' if ok else 'FAIL'}{note}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
