"""Per-merge diagnosis of one simulated run (how issue 12's accuracy failures were found).

    python benchmarks/sim_diagnose.py --clients 500 --strategies ftte-tiered [--seed 0] [--workload mlp|cnn]
                                      [--max-time 8.36] [--cap 2000] [--tiered-age-exponent 1] [--age-exponent 0.5]
                                      [--ftte-server-lr 2] [--line-search ftte|full] [--json OUT]

Runs `ftte-hub simulate`'s engine for the given strategies (no FedAvg first: `--max-time` is the
virtual time budget, 8.36 s being what `fedavg`'s 60 rounds take on the digits MLP, 1.79 s its 20
quick rounds on the CNN) and keeps every `MergeReport` the round driver makes. It prints, per
stretch of merges: virtual time, accuracy, the merge's own norm, mean staleness, the share of
updates from each tier, the share clipped, the mean update norm per tier and the largest step
factor; then the accuracy curve's summary (final, last tenth mean +- sd, lowest after the first
tenth), the staleness distribution and the total step factor each base version received (the
sum of the step factors of the updates trained from it: FedAvg gives every version exactly 1).

`--line-search ftte|full` instead measures the start model's margin: every device trains one
task from the start values (the ftte subset or the full model), and the validation accuracy of
start + s x (their mean delta) is printed for s = 0.5 .. 8.
"""
import argparse
import json
import os
import sys
import time
from collections import defaultdict

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

import ftte_hub.simulate as sim  # noqa: E402
from ftte_core.local import LocalWorker, TaskConfig  # noqa: E402
from ftte_core.scheduler import RoundDriver  # noqa: E402
from ftte_core.update import decode_tensor64, subset_values  # noqa: E402

WORKLOADS = {"mlp": dict(model="mlp", batch_size=16), "cnn": dict(model="cnn", input_shape=(1, 28, 28), batch_size=64)}
REPORTS = {}


class RecordingDriver(RoundDriver):
    """The simulator's driver, keeping every merge report (``history`` keeps only the newest 1,000)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.all_reports = REPORTS.setdefault(self.strategy.name, [])

    def _merge(self, partial):
        report = super()._merge(partial)
        if report is not None:
            self.all_reports.append(report)
        return report


def summarise(name, reports, curve):
    acc = np.array([p[1] for p in curve])
    step = max(1, len(reports) // 20)
    print(f"\n{name}: merge, virtual s, accuracy, merge norm, mean staleness, tier shares, clipped, "
          "mean update norm per tier, largest step factor")
    for i in range(0, len(reports), step):
        chunk = reports[i:i + step]
        tiers = np.concatenate([r.tiers or [0] * r.num_updates for r in chunk])
        norms = np.concatenate([r.norms for r in chunk])
        per_tier = " ".join(f"t{t}={norms[tiers == t].mean():.3f}" for t in sorted(set(tiers.tolist())))
        shares = "/".join(f"{np.mean(tiers == t):.2f}" for t in sorted(set(tiers.tolist())))
        print(f"{i:5d} {curve[i + 1][0]:6.2f} {acc[i + 1]:.3f} {np.mean([r.update_norm for r in chunk]):.4f} "
              f"{np.mean(np.concatenate([r.staleness for r in chunk])):5.1f} {shares} "
              f"{np.mean(np.concatenate([r.clip for r in chunk]) < 1):.2f} {per_tier} "
              f"{max(max(r.alphas) for r in chunk):.3f}")
    k = max(1, len(acc) // 10)
    print(f"{name}: final {acc[-1]:.3f}, last tenth {acc[-k:].mean():.3f} +- {acc[-k:].std():.3f}, lowest after "
          f"the first tenth {acc[k:].min():.3f}, best {acc.max():.3f}, {len(reports)} merges")
    tau = np.concatenate([r.staleness for r in reports])
    print(f"{name}: staleness mean {tau.mean():.1f}, median {np.median(tau):.0f}, p10 {np.percentile(tau, 10):.0f}, "
          f"p90 {np.percentile(tau, 90):.0f}, max {tau.max()}")
    per_base, count = defaultdict(float), defaultdict(int)
    for r in reports:
        for a, t in zip(r.alphas, r.staleness):
            per_base[r.version - 1 - t] += a
            count[r.version - 1 - t] += 1
    total = np.array(list(per_base.values()))
    print(f"{name}: total step factor per base version: median {np.median(total):.3f}, p90 "
          f"{np.percentile(total, 90):.3f}, version 0 {per_base[0]:.2f} (from {count[0]} updates: the first wave)")


def line_search(cfg, which):
    setup = sim._Setup(cfg, lambda m: None)
    model = setup.model.copy()
    model.load_state(setup.start_state)
    subset = setup.ftte_subset if which == "ftte" else setup.full_subset
    frozen = setup.ftte_frozen if which == "ftte" else "float32"
    worker = LocalWorker(model.copy(), subset)
    values = subset_values(model, subset)
    task = TaskConfig(lr=cfg.lr, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, frozen=frozen)
    deltas = []
    for i, d in enumerate(setup.devices):
        res = worker.run(values, 0, d.x, d.y, task, bits=8 if which == "ftte" else 32, seed=i, device_id=d.id)
        deltas.append({t.key: decode_tensor64(t) for t in res.update.tensors})
    mean = {k: np.mean([d[k] for d in deltas], axis=0) for k in deltas[0]}
    print(f"start accuracy {setup.start_accuracy:.3f}; {which}: norm of the mean first delta "
          f"{np.sqrt(sum((v ** 2).sum() for v in mean.values())):.3f} ({len(deltas)} devices)")
    for s in (0.5, 1, 2, 3, 5, 8):
        m = setup.model.copy()
        m.load_state(setup.start_state)
        for key, _layer, view, rows in subset.tensors(m):
            cur = view[rows] if rows is not None else view
            new = (cur + s * mean[key].reshape(cur.shape)).astype(np.float32)
            if rows is None:
                view[...] = new
            else:
                view[rows] = new
        loss, acc = m.evaluate(setup.val.x, setup.val.y)
        print(f"  start + {s:g} x mean delta: accuracy {acc:.3f}, loss {loss:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="mlp")
    ap.add_argument("--strategies", default="ftte-tiered")
    ap.add_argument("--max-time", type=float, default=8.36, help="virtual seconds (fedavg's 60 rounds on the MLP)")
    ap.add_argument("--cap", type=int, default=2000, help="merges at most")
    ap.add_argument("--age-exponent", type=float, default=sim.SimConfig.age_exponent)
    ap.add_argument("--tiered-age-exponent", type=float, default=sim.SimConfig.tiered_age_exponent)
    ap.add_argument("--base-step-budget", type=float, default=sim.SimConfig.base_step_budget,
                    help="ftte's per-base step budget in mean deltas (default: the simulator's; 0: off)")
    ap.add_argument("--ftte-server-lr", type=float, default=sim.SimConfig.ftte_server_lr)
    ap.add_argument("--tiered-server-lr", type=float, default=None)
    ap.add_argument("--variance-strength", type=float, default=sim.SimConfig.variance_strength)
    ap.add_argument("--ftte-lr-decay", type=float, default=sim.SimConfig.ftte_lr_decay,
                    help="ftte's server-step decay in merges per device (default: the simulator's; 0: off)")
    ap.add_argument("--tiered-lr-decay", type=float, default=sim.SimConfig.tiered_lr_decay,
                    help="ftte-tiered's server-step decay in merges per device (default: the simulator's; 0: off)")
    ap.add_argument("--agreement-damping", type=float, default=sim.SimConfig.agreement_damping,
                    help="ftte's agreement damping kappa (default: the simulator's; 0: off)")
    ap.add_argument("--line-search", choices=("ftte", "full"), help="measure the start model's margin instead")
    ap.add_argument("--json", help="also write the reports and curves here")
    args = ap.parse_args()
    cfg = sim.SimConfig(clients=args.clients, stragglers=0.9, strategies=args.strategies.split(","), seed=args.seed,
                        max_time=args.max_time, async_version_cap=args.cap, threads=1,
                        age_exponent=args.age_exponent, tiered_age_exponent=args.tiered_age_exponent,
                        base_step_budget=args.base_step_budget, variance_strength=args.variance_strength,
                        ftte_lr_decay=args.ftte_lr_decay, tiered_lr_decay=args.tiered_lr_decay,
                        agreement_damping=args.agreement_damping,
                        ftte_server_lr=args.ftte_server_lr, tiered_server_lr=args.tiered_server_lr,
                        **WORKLOADS[args.workload])
    sim.K.set_num_threads(1)
    if args.line_search:
        line_search(cfg, args.line_search)
        return
    sim.RoundDriver = RecordingDriver
    t0 = time.perf_counter()
    res = sim.simulate(cfg, log=lambda m: None if m.startswith("  ") else print(m, file=sys.stderr, flush=True))
    print(f"[{time.perf_counter() - t0:.0f} s wall]", file=sys.stderr)
    for name, s in res["strategies"].items():
        summarise(name, REPORTS.get(name, []), s["curve"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": res, "reports": {n: [r.as_dict() for r in rs] for n, rs in REPORTS.items()}}, f)


if __name__ == "__main__":
    main()
