"""FTTE against budget-held and unconstrained FedAvg/FedBuff on the simulated fleet (issue 12's goals).

    python benchmarks/fleet_sim.py [--clients 100,500] [--seeds 0,1,2] [--workloads mlp,cnn]
                                   [--starts pretrained,scratch] [--scratch-clients 100]
                                   [--stragglers 0.9] [--quick] [--out bench-sim]

Runs `ftte-hub simulate`'s engine (same code) with every strategy (ftte, ftte-tiered, fedbuff,
fedbuff-full, fedavg, fedavg-full) on the same devices, data and virtual time, for each
workload, fleet size and seed, and prints per (workload, fleet size) the mean [min..max] over
seeds of each metric, then the ratios the issue's goals name:

- against `fedavg` (held to budgets): time to the common target (goal <= 0.19x), peak device
  training memory (<= 0.20x), bytes moved until the target (<= 0.31x, aiming at 0.15x);
- final accuracy: ftte - fedbuff (>= 0), ftte - fedavg-full (>= -2 points),
  ftte-tiered - fedbuff-full (>= -1 point).

Workloads: `mlp` (the digits MLP 64-256-256-10, batch 16) and `cnn` (zoo cnn on digits upsampled
to 1x28x28, batch 64: activations and conv workspace dominate its memory), or an `.onnx` file
(its own input shape, batch 16; its start is the file's weights).

Starts (issue 12 asks for both): `pretrained` (the zoo model pretrained centrally on
--pretrain-fraction of the training data, 0.05, as `ftte-hub simulate` does) and `scratch`
(random initialisation, every sample on the devices). The scratch comparison runs at the fleet
sizes of --scratch-clients only (default 100, the smallest: the 500-device runs are the long
ones, so both starts everywhere would double the default runtime; `all` runs it everywhere).
An .onnx workload starts from the file's weights (pretrain fraction 0) and has no scratch start. Devices train on one
kernel thread (`SimConfig.threads=1`), so memory is what a one-thread agent needs.
``--quick`` shortens the run (FedAvg rounds 20, semi-async merges capped at 300; every merge is
still evaluated) to measure on a shared machine.
Each run's results.json/results.md/curves.svg go to OUT/<workload>-n<clients>-s<seed>/.
"""
import argparse
import json
import os
import sys
import time

# One BLAS thread: the simulator's float64 reductions (update norms, FTTE's Gram matrix) are small,
# and OpenBLAS threads spinning on a shared, loaded CPU made one 256x256 norm 100 ms instead of 2.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from ftte_hub.report import write_results  # noqa: E402
from ftte_hub.simulate import ASYNC_MERGES_PER_DEVICE, SimConfig, simulate  # noqa: E402

ALL = ("ftte", "ftte-tiered", "fedbuff", "fedbuff-full", "fedavg", "fedavg-full")
WORKLOADS = {
    "mlp": dict(model="mlp", batch_size=16),
    "cnn": dict(model="cnn", input_shape=(1, 28, 28), batch_size=64),
}
STARTS = ("pretrained", "scratch")


def workload_config(workload: str) -> dict:
    """SimConfig fields of a workload: a WORKLOADS name or an .onnx file (batch 16)."""
    if workload in WORKLOADS:
        return dict(WORKLOADS[workload])
    if workload.lower().endswith(".onnx"):
        return dict(model=workload, batch_size=16)
    raise SystemExit(f"fleet_sim: unknown workload {workload!r}: {', '.join(WORKLOADS)} or an .onnx file")


def runs_to_make(workloads, clients, starts, scratch_clients):
    """The (workload, fleet size, start) comparisons to run, in order: every start at the fleet sizes
    of ``scratch_clients`` (None: all), the pretrained start alone at the others; an .onnx workload
    once, from the file's weights ("file")."""
    out = []
    for workload in workloads:
        for n in clients:
            if workload.lower().endswith(".onnx"):
                out.append((workload, n, "file"))
                continue
            for start in starts:
                if start == "scratch" and len(starts) > 1 and scratch_clients is not None and n not in scratch_clients:
                    continue
                out.append((workload, n, start))
    return out


def start_fraction(start: str, pretrain_fraction: float) -> float:
    """The pretrain fraction of a start: ``pretrained`` the given one, ``scratch`` and ``file`` 0."""
    return pretrain_fraction if start == "pretrained" else 0.0


def spread(values, fmt="{:,.2f}"):
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    text = f"{fmt.format(np.mean(v))} [{fmt.format(min(v))}..{fmt.format(max(v))}]"
    return text + ("" if len(v) == len(values) else f" ({len(v)}/{len(values)} seeds)")


def ratio(a, b):
    return a / b if a is not None and b else None


def load_results(where: str, strategies) -> dict:
    """A run's results.json (``--from-results``), with every asked strategy in it, or a one-line exit."""
    path = os.path.join(where, "results.json")
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"fleet_sim: cannot read {path}: {getattr(e, 'strerror', None) or e}")
    missing = [s for s in strategies if s not in res.get("strategies", {})]
    if missing:
        raise SystemExit(f"fleet_sim: {path} has no {', '.join(missing)} (ran with other --strategies?)")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="100,500")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workloads", default="mlp,cnn", help="mlp, cnn and/or .onnx files")
    ap.add_argument("--starts", default=",".join(STARTS), help="pretrained and/or scratch")
    ap.add_argument("--scratch-clients", default="100",
                    help="fleet sizes that also run the scratch start when both starts are asked ('all': every size)")
    ap.add_argument("--pretrain-fraction", type=float, default=SimConfig.pretrain_fraction,
                    help="share of the training data that pretrains the start model (the pretrained start)")
    ap.add_argument("--stragglers", type=float, default=0.9)
    ap.add_argument("--strategies", default=",".join(ALL))
    ap.add_argument("--max-versions", type=int, default=60, help="FedAvg rounds (sets everyone's virtual time)")
    ap.add_argument("--async-cap", type=int, default=None,
                    help="merges at most per semi-async strategy (default: 20 per device, so every fleet size runs "
                         "to FedAvg's horizon: 2,000 for 100 devices, 10,000 for 500)")
    ap.add_argument("--quick", action="store_true", help="--max-versions 20 --async-cap 300")
    ap.add_argument("--age-exponent", type=float, default=SimConfig.age_exponent)
    ap.add_argument("--variance-strength", type=float, default=SimConfig.variance_strength)
    ap.add_argument("--ftte-server-lr", type=float, default=SimConfig.ftte_server_lr,
                    help="server learning rate of ftte (the baselines keep 1.0)")
    ap.add_argument("--tiered-server-lr", type=float, default=None,
                    help="server learning rate of ftte-tiered (default 1.0, the strategy's own)")
    ap.add_argument("--no-direct-steps", action="store_true",
                    help="the ftte strategies' downlink: canonical frames only (no direct steps)")
    ap.add_argument("--downlink-bits", type=int, choices=(8, 4), default=8,
                    help="the ftte strategies' downlink steps: int8 or packed int4")
    ap.add_argument("--float32-install", action="store_true",
                    help="the ftte strategies install the model as float32 (default: the weights a tier "
                         "does not train int8 when it trains with frozen weights int8)")
    ap.add_argument("--update-bits", type=int, choices=(8, 4), default=8,
                    help="the ftte strategies' uplink deltas: int8 or packed int4")
    ap.add_argument("--base-step-budget", type=float, default=SimConfig.base_step_budget,
                    help="ftte's per-base step budget in mean deltas (default 0.5, the simulator's; 0: off, "
                         "the ablation; ftte-tiered has none)")
    ap.add_argument("--ftte-lr-decay", type=float, default=SimConfig.ftte_lr_decay,
                    help="ftte's server-step decay in merges per device: the step at merge v is scaled by "
                         "1/sqrt(1 + v / (this x clients)) (default 3, the simulator's; 0: off)")
    ap.add_argument("--agreement-damping", type=float, default=SimConfig.agreement_damping,
                    help="ftte's agreement damping kappa: a buffer whose stale updates agree (rho) takes a step "
                         "scaled by sum n (1 + tau)^(-kappa rho) / sum n (0: off)")
    ap.add_argument("--tiered-lr-decay", type=float, default=SimConfig.tiered_lr_decay,
                    help="ftte-tiered's server-step decay in merges per device, as --ftte-lr-decay (default off)")
    ap.add_argument("--tiered-age-exponent", type=float, default=SimConfig.tiered_age_exponent,
                    help="staleness exponent of ftte-tiered (default 1.0, the strategy's own; --age-exponent is ftte's)")
    ap.add_argument("--out", default="bench-sim")
    ap.add_argument("--from-results", action="store_true",
                    help="run nothing: print the tables from the results.json files already in --out (seeds run "
                         "in separate processes, e.g. side by side on a shared machine)")
    args = ap.parse_args()
    if args.quick:
        args.max_versions, args.async_cap = 20, 300
    strategies = args.strategies.split(",")
    starts = [x for x in args.starts.split(",") if x]
    if not starts or set(starts) - set(STARTS):
        raise SystemExit(f"fleet_sim: --starts takes {', '.join(STARTS)}, got {args.starts!r}")
    scratch_clients = None if args.scratch_clients == "all" else {int(c) for c in args.scratch_clients.split(",") if c}
    for workload, n, start in runs_to_make(args.workloads.split(","), [int(c) for c in args.clients.split(",")],
                                           starts, scratch_clients):
        tag = "" if start == "pretrained" else f"-{start}"
        rows = {s: [] for s in strategies}
        t0 = time.perf_counter()
        seeds = [int(s) for s in args.seeds.split(",")]
        starts_seen = []
        for seed in seeds:
            name = os.path.splitext(os.path.basename(workload))[0]
            where = os.path.join(args.out, f"{name}-n{n}-s{seed}{tag}")
            if args.from_results:
                res = load_results(where, strategies)
                starts_seen.append(f"{res.get('start', '?')}, start accuracy {res['start_accuracy']:.3f}")
                for s in strategies:
                    rows[s].append(res["strategies"][s])
                continue
            cfg = SimConfig(clients=n, stragglers=args.stragglers, strategies=strategies, seed=seed,
                            max_versions=args.max_versions, async_version_cap=args.async_cap, threads=1,
                            age_exponent=args.age_exponent, variance_strength=args.variance_strength,
                            ftte_server_lr=args.ftte_server_lr, tiered_server_lr=args.tiered_server_lr,
                            downlink_direct=not args.no_direct_steps, downlink_bits=args.downlink_bits,
                            update_bits=args.update_bits, int8_install=not args.float32_install,
                            tiered_age_exponent=args.tiered_age_exponent, base_step_budget=args.base_step_budget,
                            ftte_lr_decay=args.ftte_lr_decay, tiered_lr_decay=args.tiered_lr_decay,
                            agreement_damping=args.agreement_damping,
                            pretrain_fraction=start_fraction(start, args.pretrain_fraction),
                            **workload_config(workload))
            t1 = time.perf_counter()
            res = simulate(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
            print(f"[{workload} n={n} {start} seed={seed}: {time.perf_counter() - t1:.0f} s wall]",
                  file=sys.stderr, flush=True)
            write_results(res, where)
            starts_seen.append(f"{res['start']}, start accuracy {res['start_accuracy']:.3f}")
            for s in strategies:
                rows[s].append(res["strategies"][s])
        wall = time.perf_counter() - t0
        if args.from_results:  # the strategies' own wall time as recorded (setup and search not included)
            wall = sum(x["wall_seconds"] for r in rows.values() for x in r)
        when = ("strategies' recorded wall time" if args.from_results
                else f"wall; load average at the end {os.getloadavg()[0]:.1f}")
        print(f"\n## {workload}, {n} devices, {args.stragglers:.0%} stragglers, start {start}, seeds {args.seeds} "
              f"({wall:.0f} s for {len(strategies)} strategies x {len(seeds)} seeds, "
              f"{wall / len(seeds):.0f} s per seed, {when}; FedAvg rounds {args.max_versions}, "
              f"async cap {args.async_cap or ASYNC_MERGES_PER_DEVICE * n})\n")
        print("start: " + "; ".join(starts_seen) + "; time budget (virtual s) "
              + spread([x["final_time_s"] for x in rows["fedavg"]] if "fedavg" in rows else []) + "\n")
        print("| strategy | devices (sat out) | time to target (s) | bytes to target (MiB) | final accuracy | "
              "peak device memory (KiB) | total bytes (MiB) | merges | end (virtual s) | mean staleness | departures |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for s in strategies:
            r = rows[s]
            print(f"| {s} | {spread([x['participating_devices'] for x in r], '{:.0f}')} "
                  f"({spread([x['devices_sat_out'] for x in r], '{:.0f}')}) | "
                  f"{spread([x['time_to_target_s'] for x in r], '{:,.2f}')} | "
                  f"{spread([x['bytes_to_target'] / 2**20 if x['bytes_to_target'] is not None else None for x in r])} | "
                  f"{spread([x['final_accuracy'] for x in r], '{:.3f}')} | "
                  f"{spread([x['peak_device_memory_bytes'] / 1024 for x in r], '{:,.0f}')} | "
                  f"{spread([(x['bytes_down_total'] + x['bytes_up_total']) / 2**20 for x in r])} | "
                  f"{spread([x['merges'] for x in r], '{:.0f}')} | "
                  f"{spread([x['final_time_s'] for x in r])} | "
                  f"{spread([x['mean_staleness'] for x in r])} | "
                  f"{spread([x.get('departures') for x in r], '{:.0f}')} |")
        print()
        base = rows.get("fedavg")
        for s in ("ftte", "ftte-tiered"):
            if s not in rows or base is None:
                continue
            f = rows[s]
            ttt = [ratio(x["time_to_target_s"], y["time_to_target_s"]) for x, y in zip(f, base)]
            mem = [ratio(x["peak_device_memory_bytes"], y["peak_device_memory_bytes"]) for x, y in zip(f, base)]
            btt = [ratio(x["bytes_to_target"], y["bytes_to_target"]) for x, y in zip(f, base)]
            rbt = [ratio(x["round_bytes_to_target"], y["round_bytes_to_target"]) for x, y in zip(f, base)]
            print(f"- {s} / fedavg: time to target {spread(ttt)} (goal <= 0.19); peak device memory "
                  f"{spread(mem)} (goal <= 0.20); bytes to target {spread(btt)} (goal <= 0.31, aim 0.15), "
                  f"without the one-time install of the model {spread(rbt)}")
            per_device = [x.get("install_bytes_per_device") for x in f]   # ftte-tiered: one per tier
            per_device = [(v[0] if isinstance(v, list) and v else v) for v in per_device]
            per_device = [v / 1000 if isinstance(v, int) else None for v in per_device]
            print(f"- {s}: install {spread(per_device, '{:,.1f}')} KB per device"
                  f"{' of tier 0' if s == 'ftte-tiered' else ''}; start accuracy "
                  f"{spread([x.get('start_accuracy') for x in f], '{:.4f}')} (its quantised start when the "
                  f"install is int8)")
        for a, b, goal in (("ftte", "fedbuff", ">= 0"), ("ftte", "fedavg-full", ">= -2"),
                           ("ftte-tiered", "fedbuff-full", ">= -1"), ("ftte-tiered", "fedavg-full", "")):
            if a in rows and b in rows:
                d = [100 * (x["final_accuracy"] - y["final_accuracy"]) for x, y in zip(rows[a], rows[b])]
                print(f"- final accuracy {a} - {b}: {spread(d, '{:+.2f}')} points" + (f" (goal {goal})" if goal else ""))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
