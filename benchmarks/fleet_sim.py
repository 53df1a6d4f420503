"""FTTE vs FedBuff vs FedAvg on the simulated fleet: the paper's comparison, mean and spread over seeds.

    python benchmarks/fleet_sim.py [--clients 100,500] [--seeds 0,1,2] [--stragglers 0.9] [--out bench-sim]

For each fleet size and seed, runs `ftte-hub simulate`'s engine (same code) with all three
strategies on the same devices and data, then prints, per fleet size, the mean and min..max over
seeds of each metric and FTTE's reduction against FedAvg:
time to target, peak device training memory, payload per task, final accuracy.
Each run's results.json/results.md/curves.svg go to OUT/n<clients>-s<seed>/.
"""
import argparse
import os
import sys
import time

import numpy as np

from ftte_hub.report import write_results
from ftte_hub.simulate import SimConfig, simulate


def spread(values):
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    return f"{np.mean(v):,.2f} [{min(v):,.2f}..{max(v):,.2f}]" + ("" if len(v) == len(values) else f" ({len(v)}/{len(values)})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="100,500")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--stragglers", type=float, default=0.9)
    ap.add_argument("--strategies", default="ftte,fedbuff,fedavg")
    ap.add_argument("--max-versions", type=int, default=60)
    ap.add_argument("--out", default="bench-sim")
    args = ap.parse_args()
    strategies = args.strategies.split(",")
    for n in [int(c) for c in args.clients.split(",")]:
        rows = {s: [] for s in strategies}
        t0 = time.perf_counter()
        for seed in [int(s) for s in args.seeds.split(",")]:
            cfg = SimConfig(clients=n, stragglers=args.stragglers, strategies=strategies, seed=seed,
                            max_versions=args.max_versions)
            res = simulate(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
            write_results(res, os.path.join(args.out, f"n{n}-s{seed}"))
            for s in strategies:
                rows[s].append(res["strategies"][s])
        wall = time.perf_counter() - t0
        print(f"\n## {n} devices, {args.stragglers:.0%} stragglers, seeds {args.seeds} "
              f"({wall:.0f} s wall for {len(strategies)} strategies x {len(rows[strategies[0]])} seeds)\n")
        print("| strategy | time to target (virtual s) | final accuracy | peak device memory (KiB) | "
              "payload per task (KiB) | total bytes (MiB) | merges | mean staleness |")
        print("|---|---|---|---|---|---|---|---|")
        for s in strategies:
            r = rows[s]
            print(f"| {s} | {spread([x['time_to_target_s'] for x in r])} | "
                  f"{spread([x['final_accuracy'] for x in r])} | "
                  f"{spread([x['peak_device_memory_bytes'] / 1024 for x in r])} | "
                  f"{spread([(x['bytes_down_per_task'] + x['bytes_up_per_task']) / 1024 for x in r])} | "
                  f"{spread([(x['bytes_down_total'] + x['bytes_up_total']) / 2**20 for x in r])} | "
                  f"{spread([x['merges'] for x in r])} | {spread([x['mean_staleness'] for x in r])} |")
        if "ftte" in rows and "fedavg" in rows:
            f, a = rows["ftte"], rows["fedavg"]
            ttt = [1 - x["time_to_target_s"] / y["time_to_target_s"] if x["time_to_target_s"] and y["time_to_target_s"]
                   else None for x, y in zip(f, a)]
            mem = [1 - x["peak_device_memory_bytes"] / y["peak_device_memory_bytes"] for x, y in zip(f, a)]
            pay = [1 - (x["bytes_down_per_task"] + x["bytes_up_per_task"]) /
                   (y["bytes_down_per_task"] + y["bytes_up_per_task"]) for x, y in zip(f, a)]
            acc = [100 * (x["final_accuracy"] - y["final_accuracy"]) for x, y in zip(f, a)]
            print(f"\nFTTE vs FedAvg: time to target {spread([100 * v if v is not None else None for v in ttt])}% less; "
                  f"peak memory {spread([100 * v for v in mem])}% less; payload per task "
                  f"{spread([100 * v for v in pay])}% less; final accuracy {spread(acc)} points")
        if "ftte" in rows and "fedbuff" in rows:
            d = [100 * (x["final_accuracy"] - y["final_accuracy"]) for x, y in zip(rows["ftte"], rows["fedbuff"])]
            print(f"FTTE vs FedBuff final accuracy: {spread(d)} points")


if __name__ == "__main__":
    main()
