"""WAN bytes and wall time per round of a two-site federation through Flower (docs/multi-site.md).

    python benchmarks/multisite.py [--rounds 3] [--site-versions 4] [--memory-budget 96KiB]

Starts what tests/test_multisite.py starts (four agents on the bundled digits, non-IID; two site
hubs; a SuperLink; a SuperNode per site; `flwr run examples/multisite`, all on loopback) and
prints, per federation round, the payload bytes that crossed the WAN link (SuperLink <->
SuperNodes: the records of Flower's messages, as Flower counts them; HTTP and TLS framing not
included) against shipping the full float32 model down to and back up from every site (what a
FedAvg ServerApp that sends whole models moves), and the round's wall time. --memory-budget
limits the agents, so each site's subset search trains fewer rows (smaller deltas).
Needs the `flower` extra (pip install '.[flower]').
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from multisite_support import (Procs, federation_env, missing_tool, run_federation, start_superlink,  # noqa: E402
                               start_sites, start_supernodes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--site-versions", type=int, default=4, help="versions each site fleet trains per round")
    ap.add_argument("--memory-budget", default=None, help="each agent's --memory-budget (default: the agent's)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (logs, outputs)")
    args = ap.parse_args()
    why = missing_tool()
    if why:
        sys.exit(f"multisite: {why} (pip install '.[flower]')")
    d = Path(tempfile.mkdtemp(prefix="ftte-multisite-"))
    procs = Procs(d, federation_env(d))
    slack = lambda s: 3.0 * s  # noqa: E731 - generous limits: a benchmark must not fail for a busy host
    try:
        link = start_superlink(d, procs)
        start_sites(d, procs, slack, args.site_versions, memory_budget=args.memory_budget)
        start_supernodes(d, procs, slack, link)
        lines = run_federation(d, procs, slack, rounds=args.rounds, site_versions=args.site_versions)
    finally:
        procs.kill_all()
    full = lines[0]["full_model_float32"]
    sites = len(lines[0]["sites"])
    plain = 2 * sites * full
    print(f"two sites, {args.site_versions} site versions per round, agents' budget "
          f"{args.memory_budget or 'default'}; float32 model {full:,} B; bytes are message payloads")
    print(f"{'round':>5} {'accuracy':>8} {'down train':>11} {'up train':>9} {'down eval':>10} {'up eval':>8} "
          f"{'WAN total':>10} {'full f32':>10} {'ratio':>6} {'wall s':>7} {'train s':>7}")
    for x in lines:
        total = x["wan_train_down"] + x["wan_train_up"] + x["wan_eval_down"] + x["wan_eval_up"]
        print(f"{x['round']:>5} {x['accuracy']:>8.4f} {x['wan_train_down']:>11,} {x['wan_train_up']:>9,} "
              f"{x['wan_eval_down']:>10,} {x['wan_eval_up']:>8,} {total:>10,} {plain:>10,} {total / plain:>6.2f} "
              f"{x['round_s']:>7.1f} {x['train_s']:>7.1f}")
    print("full f32: the float32 model down to and up from each site; wall s: the round (train + evaluate "
          "exchanges); train s: until the sites' deltas were in")
    if args.keep:
        print(f"kept {d}")
    else:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
