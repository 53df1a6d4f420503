"""Round-driver state size and per-update cost over a long run (issue 9, bounded state).

    python benchmarks/driver_state.py [--updates 20000] [--devices 6] [--buffer 4] [--ghost]

Drives ``RoundDriver`` with many cheap updates (a tiny model; one encoded update per device,
re-labelled for each of its tasks, so the time is the driver's own: checks, norm measurement,
caps, merges). ``--ghost`` adds a device that takes a task now and then and never delivers.
Prints, at 1,000 merged updates and at every doubling after it, the size of
``json.dumps(state_dict()["meta"])``, the outstanding tasks and the driver's microseconds per
update. The target: the size at 20,000 within 2x of the size at 1,000.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np

import ftte_core as ft
from ftte_core.scheduler import RoundDriver, TaskConfig
from ftte_core.strategies import make_strategy
from ftte_core.update import encode_update, load_values


def _template(driver, task, seed):
    rng = np.random.default_rng(seed)
    local = driver.model.copy()
    load_values(local, task.subset, task.values)
    for _key, _l, view, rows in task.subset.tensors(local):
        r = rows if rows is not None else np.arange(view.shape[0])
        view[r] += (0.01 * rng.standard_normal((r.size, view.shape[1]))).astype(np.float32)
    return encode_update(local, task.subset, dict(task.values), task.base_version, 20, 0.5, bits=task.bits,
                         seed=task.seed, device_id=task.device_id, task_id=task.id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=20000)
    ap.add_argument("--devices", type=int, default=6)
    ap.add_argument("--buffer", type=int, default=4)
    ap.add_argument("--strategy", default="ftte")
    ap.add_argument("--ghost", action="store_true")
    args = ap.parse_args()

    m = ft.zoo("mlp", (4,), 2, hidden=(3,), seed=0)
    d = RoundDriver(m, ft.Subset.full(m), make_strategy(args.strategy, buffer_size=args.buffer), TaskConfig(), seed=1)
    devices = [f"dev{i}" for i in range(args.devices)]
    templates = {}
    for i, dev in enumerate(devices):
        d.device_joined(dev, {"samples": 20})
        t = d.device_idle(dev)
        templates[dev] = _template(d, t, i)
        d.update_arrived(dev, templates[dev])
    marks = [1000]
    while marks[-1] * 2 <= args.updates:
        marks.append(marks[-1] * 2)
    if marks[-1] != args.updates and args.updates > 1000:
        marks.append(args.updates)
    print(f"{'merged updates':>15} {'meta bytes':>11} {'outstanding':>12} {'us/update':>10}")
    first = None
    t0, n0 = time.perf_counter(), d.merged_updates
    while marks:
        for dev in devices:
            if d.done or (d.merged_updates >= marks[0]):
                break
            t = d.device_idle(dev)
            u = copy.copy(templates[dev])
            u.task_id, u.base_version = t.id, t.base_version
            d.update_arrived(dev, u)
            if args.ghost and dev == devices[0]:
                d.device_idle("ghost")
        if d.merged_updates >= marks[0]:
            us = 1e6 * (time.perf_counter() - t0) / max(1, d.merged_updates - n0)
            size = len(json.dumps(d.state_dict()["meta"]))
            first = first or size
            print(f"{d.merged_updates:>15,} {size:>11,} {d.stats()['outstanding_tasks']:>12,} {us:>10.0f}")
            marks.pop(0)
            t0, n0 = time.perf_counter(), d.merged_updates
    print(f"growth from the first mark to the last: {size / first:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
