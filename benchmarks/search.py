"""Subset search speed and picks under several memory budgets.

    python benchmarks/search.py [--reps 9] [--batch 32] [--seed 0]

Models: MLP-784 (784-1024-256-10 ReLU, ~1.07M parameters), the zoo CNN at 3x32x32, the zoo
CNN at 1x8x8 on the bundled digits, and a deeper MLP (9 parameter layers) to show how the
search scales with depth (probes grow with the square of the parameter-layer count). Search rows use synthetic (random exponential, per-layer
scaled) scores, since only the search is timed; budgets are the cheapest single unit plus a
fraction of the way to training everything. Times are medians of `reps` runs (each a fresh
search: probes, knapsack, verification, hill-climb), with the min-max spread.

The last rows time ``importance_scores`` on real data (digits validation split, 512 samples in
batches of 64) and then the search on those scores.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import ftte_core as ft  # noqa: E402
from ftte_core import search as S  # noqa: E402
from ftte_core.subset import LayerSubset, Subset  # noqa: E402


def synthetic_scores(model, rng):
    out = {}
    for l in model.param_layers:
        out[f"{l.name}.weight"] = rng.exponential(size=l.weight.shape[0]) * rng.uniform(0.1, 10)
        out[f"{l.name}.bias"] = float(rng.exponential() * rng.uniform(0.1, 10))
    return out


def cheapest(model, batch):
    best = None
    for l in model.param_layers:
        for k in [0] + S._row_counts(l.weight.shape[0], S.DEFAULT_RATIOS):
            for b in (False, True):
                if k or b:
                    sub = Subset({l.name: LayerSubset(np.arange(k, dtype=np.int32), b)})
                    m = ft.predict_memory(model, sub, batch)["total"]
                    best = m if best is None else min(best, m)
    return best


def timed(fn, reps):
    out, times = None, []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, np.median(times) * 1e3, min(times) * 1e3, max(times) * 1e3


def mib(n):
    return f"{n / 2 ** 20:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    ds = ft.load_bundled("digits")
    models = [
        ("MLP 784-1024-256-10", ft.zoo("mlp", (784,), 10, seed=0, hidden=(1024, 256))),
        ("CNN zoo 3x32x32", ft.zoo("cnn", (3, 32, 32), 10, seed=0)),
        ("CNN zoo 1x8x8 (digits)", ft.zoo("cnn", ds.feature_shape, ds.num_classes, seed=0)),
        ("MLP 784-256x8-10 (9 layers)", ft.zoo("mlp", (784,), 10, seed=0, hidden=(256,) * 8)),
    ]
    print(f"threads {ft.get_num_threads()}, batch {args.batch}, median of {args.reps} runs (min-max)\n")
    header = ("| model | params | options | budget (MiB) | search ms | chosen subset | predicted MiB | "
              "score share | probes |")
    print(header)
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for label, model in models:
        scores = synthetic_scores(model, rng)
        lo, hi = cheapest(model, args.batch), ft.predict_memory(model, None, args.batch)["total"]
        for frac in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
            budget = int(lo + frac * (hi - lo))
            r, med, mn, mx = timed(lambda: S.search_subset(model, scores, budget, batch_size=args.batch), args.reps)
            print(f"| {label} | {model.num_params():,} | {r.options} | {mib(budget)} ({frac:.0%}) | "
                  f"{med:.1f} ({mn:.1f}-{mx:.1f}) | {r.describe()} | {mib(r.predicted_bytes)} | "
                  f"{r.score / r.max_score:.0%} | {r.probes} |")

    # importance scores on real data, then the search on them
    train, val = ft.data.train_val_split(ds, 0.3, seed=args.seed)
    print("\nimportance_scores on digits validation data (512 samples, batches of 64), then search:\n")
    print("| model | params | scoring ms | batches | search ms | budget (MiB) | chosen subset | predicted MiB |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for label, model in [("CNN zoo 1x8x8", ft.zoo("cnn", ds.feature_shape, ds.num_classes, seed=0)),
                         ("MLP 64-256-256-10", ft.zoo("mlp", ds.feature_shape, ds.num_classes, seed=0))]:
        sc, med_s, _, _ = timed(lambda: S.importance_scores(model, val.x, val.y, batch_size=64, max_samples=512),
                                max(3, args.reps // 3))
        lo, hi = cheapest(model, args.batch), ft.predict_memory(model, None, args.batch)["total"]
        budget = int(lo + 0.25 * (hi - lo))
        r, med, _, _ = timed(lambda: S.search_subset(model, sc, budget, batch_size=args.batch), args.reps)
        print(f"| {label} | {model.num_params():,} | {med_s:.1f} | {sc.batches} | {med:.1f} | {mib(budget)} | "
              f"{r.describe()} | {mib(r.predicted_bytes)} |")


if __name__ == "__main__":
    main()
