"""Hub under load: the real ``ftte-hub train`` against hundreds of fake agents over loopback.

    python benchmarks/hub_load.py                         # 200 agents, K=10, ~100k-parameter subset, 2000 updates
    python benchmarks/hub_load.py --agents 300 --updates 3000 --train-ms 200

Three processes, so the hub's memory is the hub's alone:
  * fakes: ``benchmarks/fake_agents.py`` (asyncio servers speaking Channel + messages; each TASK is
    answered with a valid int8 UPDATE, see its docstring);
  * hub: ``ftte_hub.train.run_train`` in a child process with the fakes as static ``--peer``s, mDNS
    off, its hooks recording which update triggered each merge and when tasks went out;
  * this one: picks the memory budget whose searched subset has ~``--subset-params`` parameters
    (the hub's own importance scores and search on the same synthetic validation data), starts
    both, and prints the table.

Measured:
  * merge-and-redispatch latency: for every update that triggered a merge, from the moment its
    fake agent finished writing the UPDATE to the moment that agent received its next TASK (the
    hub's receive, decode, checks, merge, journal fsync, ACK and the new TASK's encoding and
    encryption all fall inside), split into three legs at the hub's hooks: UPDATE written ->
    merged (transfer, decode, checks, the merge), merged -> next TASK written (journal fsync, ACK,
    TASK encoding and encryption, waiting for the event loop), TASK written -> received.
    ``--train-ms 0`` saturates the hub (every fake answers at once), so its latency is mostly
    queueing; a think time that keeps the offered load under the hub's capacity measures the
    hub's response time.
  * updates/s: accepted updates over the time from the first TASK sent to the last merge.
  * hub peak RSS: the hub process's ru_maxrss.
  * protocol overhead: framing + tag bytes (21 per message) over message-body bytes, summed over
    every connection; and the same with the handshakes and close frames included.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# -- the hub child ---------------------------------------------------------------------------------
def hub_child(config_path: str) -> None:
    """Run the real hub with hooks; write what they saw and the peak RSS next to the config."""
    from ftte_core.protocol import read_key
    from ftte_hub.fleet import Hooks
    from ftte_hub.train import TrainConfig, run_train

    cfg = json.loads(Path(config_path).read_text())
    merges = []            # (agent id, task id, perf_counter after the merge[, when the next TASK was written])
    pending = {}           # agent id -> index into merges, until that agent's next TASK
    redispatch = []        # hub-side latency, s
    first_task = []
    merge_times = []

    def on_update(agent_id, arrival, t):
        if arrival.merge is not None:
            pending[agent_id] = len(merges)
            merges.append((agent_id, arrival.task_id, t))
            merge_times.append(t)

    def on_task_sent(agent_id, task, t):
        if not first_task:
            first_task.append(t)
        i = pending.pop(agent_id, None)
        if i is not None:
            redispatch.append(t - merges[i][2])
            merges[i] = merges[i] + (t,)

    config = TrainConfig(model="mlp", val_data=cfg["val_data"], out=cfg["out"], min_agents=cfg["agents"],
                         peers=cfg["peers"], buffer=cfg["buffer"], max_versions=cfg["max_versions"], mdns=False,
                         wait_timeout=120.0, seed=0)
    hooks = Hooks(on_update=on_update, on_task_sent=on_task_sent)
    t0 = time.perf_counter()
    if cfg.get("profile"):
        import cProfile
        profiler = cProfile.Profile()
        summary = profiler.runcall(asyncio.run, run_train(config, read_key(cfg["key"]), hooks))
        profiler.dump_stats(cfg["profile"])
    else:
        summary = asyncio.run(run_train(config, read_key(cfg["key"]), hooks))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {"summary": summary, "merges": merges, "redispatch_s": redispatch,
              "cpu_s": usage.ru_utime + usage.ru_stime,
              "first_task": first_task[0] if first_task else None, "last_merge": merge_times[-1] if merge_times else None,
              "wall_s": time.perf_counter() - t0,
              "peak_rss_bytes": usage.ru_maxrss * 1024}
    Path(cfg["result"]).write_text(json.dumps(result, default=str))


# -- set-up ----------------------------------------------------------------------------------------
def synthetic_validation(path: Path, features: int, samples: int, classes: int = 10, seed: int = 0) -> None:
    """Separable-ish random data: the benchmark measures the hub, not learning."""
    from ftte_core.data import Dataset, save_npz
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, features)).astype(np.float32)
    y = rng.integers(0, classes, size=samples).astype(np.int32)
    x = (centers[y] + rng.normal(scale=2.0, size=(samples, features))).astype(np.float32)
    save_npz(str(path), Dataset(x, y, classes))


def budget_for_subset(val_path: Path, target_params: int, batch_size: int = 32) -> tuple:
    """(budget bytes, trainable params): the smallest budget whose searched subset has >= target params.

    The same model, scores and search the hub runs (``ftte_hub.train.setup_fresh``), so the hub
    chooses this very subset.
    """
    import ftte_core as ft
    from ftte_core.data import load_npz
    from ftte_core.search import BudgetTooSmall, importance_scores, search_subset

    val = load_npz(str(val_path))
    model = ft.zoo("mlp", val.feature_shape, val.num_classes, seed=0)
    scores = importance_scores(model, val.x, val.y, seed=0)

    def trained(budget: int) -> int:
        try:
            return search_subset(model, scores, budget, batch_size=batch_size).subset.num_trainable(model)
        except BudgetTooSmall:
            return 0

    lo, hi = 1 << 16, 1 << 20
    while trained(hi) < target_params:
        hi *= 2
        if hi > 1 << 34:
            raise SystemExit(f"hub_load: no budget gives a {target_params}-parameter subset "
                             f"(the model has {model.num_params()} parameters)")
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        if trained(mid) >= target_params:
            hi = mid
        else:
            lo = mid
    return hi, trained(hi), model.num_params()


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# -- the run ---------------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="The real hub against many fake agents over loopback.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--agents", type=int, default=200, help="concurrent fake agents (one TCP connection each)")
    p.add_argument("--buffer", type=int, default=10, help="K: updates per merge")
    p.add_argument("--updates", type=int, default=2000, help="accepted updates to run for (max versions = updates / K)")
    p.add_argument("--subset-params", type=int, default=100_000, help="trainable parameters the subset should have")
    p.add_argument("--features", type=int, default=256,
                   help="input features of the synthetic data (zoo MLP features-256-256-10: 134k parameters at 256)")
    p.add_argument("--val-samples", type=int, default=256, help="validation samples the hub evaluates after each merge")
    p.add_argument("--fake-procs", type=int, default=2, help="processes the fake agents are spread over")
    p.add_argument("--train-ms", type=float, default=4000.0,
                   help="mean fake think time per task, ms (offered load = agents / think time; 0: answer at once, saturating the hub)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="abort the run after this many seconds")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="folder for the hub's output, logs and measurements (None: a new temp folder, left in place)")
    p.add_argument("--profile", action="store_true", help="profile the hub with cProfile (DIR/hub.prof; slows the hub)")
    p.add_argument("--hub-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hub_child:
        hub_child(args.hub_child)
        return

    from ftte_core.protocol import generate_key, write_key
    from ftte_core.search import format_size

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hub_load_"))
    work.mkdir(parents=True, exist_ok=True)
    key_path, val_path = work / "fleet.key", work / "val.npz"
    write_key(key_path, generate_key())
    synthetic_validation(val_path, args.features, args.val_samples)
    print(f"# choosing the budget for a ~{args.subset_params:,}-parameter subset ...", flush=True)
    budget, subset_params, model_params = budget_for_subset(val_path, args.subset_params)
    print(f"# budget {format_size(budget)} -> {subset_params:,} of {model_params:,} parameters trained", flush=True)

    hub_result = work / "hub_result.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    shares = [args.agents // args.fake_procs + (1 if i < args.agents % args.fake_procs else 0)
              for i in range(args.fake_procs)]
    fakes, fake_outs = [], []
    hub = None
    try:
        first = 0
        for i, n in enumerate(shares):
            fake_outs.append(work / f"fakes{i}.json")
            fakes.append(subprocess.Popen(
                [sys.executable, str(HERE / "fake_agents.py"), "--agents", str(n), "--first-id", str(first),
                 "--seed", str(i), "--key", str(key_path), "--budget", str(budget), "--train-ms", str(args.train_ms),
                 "--max-seconds", str(args.max_seconds), "--out", str(fake_outs[-1])],
                stdout=subprocess.PIPE, stderr=open(work / f"fakes{i}.log", "w"), text=True, env=env))
            first += n
        peers = []
        for i, proc in enumerate(fakes):
            ready = proc.stdout.readline().split()
            if not ready or ready[0] != "ready":
                raise SystemExit(f"hub_load: fake agents did not start (see {work / f'fakes{i}.log'})")
            peers += ready[1:]
        config = {"val_data": str(val_path), "out": str(work / "hub-out"), "agents": args.agents, "peers": peers,
                  "buffer": args.buffer, "max_versions": max(1, args.updates // args.buffer), "key": str(key_path),
                  "result": str(hub_result), "profile": str(work / "hub.prof") if args.profile else ""}
        (work / "hub_config.json").write_text(json.dumps(config))
        print(f"# {args.agents} fake agents listening in {args.fake_procs} process(es); starting the hub "
              f"(K={args.buffer}, {config['max_versions']} versions)", flush=True)
        t0 = time.perf_counter()
        hub = subprocess.Popen([sys.executable, __file__, "--hub-child", str(work / "hub_config.json")],
                               stdout=subprocess.DEVNULL, stderr=open(work / "hub.log", "w"), env=env)
        code = _wait_with_progress(hub, work / "hub-out" / "metrics.jsonl", config["max_versions"], args.max_seconds)
        if code is None:
            raise SystemExit(f"hub_load: the hub did not finish within --max-seconds {args.max_seconds:g} "
                             f"(see {work / 'hub.log'})")
        wall = time.perf_counter() - t0
        if code != 0:
            raise SystemExit(f"hub_load: the hub exited with {code}: {_last_line(work / 'hub.log')}")
        for proc in fakes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(timeout=10)
    finally:
        for proc in [hub] + fakes:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    hubr = json.loads(hub_result.read_text())
    fk = _merge_fake_reports([json.loads(path.read_text()) for path in fake_outs])
    sent_at, next_at = fk["update_sent_at"], fk["next_task_at"]
    # perf_counter is CLOCK_MONOTONIC, one clock for every process on the machine: the legs add up
    complete = [m for m in hubr["merges"] if len(m) == 4 and m[1] in sent_at and m[1] in next_at]
    latency = [next_at[tid] - sent_at[tid] for _, tid, _, _ in complete]
    legs = {"UPDATE written -> merged": [t_merge - sent_at[tid] for _, tid, t_merge, _ in complete],
            "merged -> next TASK written": [t_task - t_merge for _, _, t_merge, t_task in complete],
            "TASK written -> received": [next_at[tid] - t_task for _, tid, _, t_task in complete]}
    end = hubr["last_merge"] or float("inf")
    errors = [msg for t, msg in fk["errors"] if t <= end]  # later ones: fakes still sending after the hub stopped
    accepted = int(hubr["summary"].get("accepted", fk["accepted"]))
    span = (hubr["last_merge"] - hubr["first_task"]) if hubr["first_task"] and hubr["last_merge"] else float("nan")
    framing = fk["frames"] * 21
    body = fk["body_bytes"]
    rows = [
        ("agents", f"{args.agents}"),
        ("K (buffer)", f"{args.buffer}"),
        ("subset params", f"{subset_params:,} of {model_params:,}"),
        ("fake think time", f"{args.train_ms:g} ms"),
        ("updates accepted / sent", f"{accepted} / {fk['updates_sent']}"
         + (f" (rejected: {hubr['summary'].get('rejected_by_reason')})" if hubr["summary"].get("rejected") else "")),
        ("merges (versions)", f"{len(hubr['merges'])} (-> v{hubr['summary'].get('version')})"),
        ("merge->next TASK, median", f"{1e3 * statistics.median(latency):.1f} ms" if latency else "n/a"),
        ("merge->next TASK, p99", f"{1e3 * pct(latency, 0.99):.1f} ms" if latency else "n/a"),
        ("merge->next TASK, max", f"{1e3 * max(latency):.1f} ms" if latency else "n/a"),
    ] + [(f"  {leg}, median / p99", f"{1e3 * statistics.median(v):.1f} / {1e3 * pct(v, 0.99):.1f} ms")
         for leg, v in legs.items() if v] + [
        ("updates/s", f"{accepted / span:.0f}" if span == span and span > 0 else "n/a"),
        ("hub peak RSS", f"{hubr['peak_rss_bytes'] / 2**20:.0f} MiB"),
        ("hub CPU time", f"{hubr['cpu_s']:.1f} s ({1e3 * hubr['cpu_s'] / max(1, fk['updates_sent']):.1f} ms per update)"),
        ("fake agents' CPU time", f"{fk['cpu_s']:.1f} s in {args.fake_procs} process(es)"),
        ("payload (message bodies)", f"{body / 1e6:.1f} MB in {fk['frames']:,} messages"),
        ("protocol overhead, framing+tag", f"{100 * framing / body:.4f} %"),
        ("  incl. handshakes and closes", f"{100 * (fk['wire_bytes'] - body) / body:.4f} %"),
        ("wall time (hub process)", f"{wall:.1f} s"),
    ]
    if fk.get("unacknowledged_at_stop"):
        rows.append(("UPDATEs without ACK at STOP", f"{fk['unacknowledged_at_stop']} (kept pending by a real agent)"))
    if errors:
        rows.append(("fake-agent errors during the run", f"{len(errors)} (first: {errors[0]})"))
    rows.append(("machine load average (1 min) at the end", f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"))
    pressure = _cpu_pressure()
    if pressure is not None:
        rows.append(("CPU pressure (share of time some task waited for a CPU, 60 s)", f"{pressure:.0f} %"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    (work / "table.json").write_text(json.dumps(dict(rows)))
    print(f"# details in {work}")


def _wait_with_progress(proc, metrics: Path, versions: int, limit_s: float, every_s: float = 5.0):
    """The hub's exit code, or None after ``limit_s``; a progress line (merges so far) every ``every_s``."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return proc.wait(timeout=max(0.0, min(every_s, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                return None
        try:
            merged = sum(1 for _ in metrics.open())
        except OSError:
            merged = 0
        print(f"# {merged}/{versions} merges", flush=True)


def _cpu_pressure():
    """Linux PSI: on a shared machine this says how far the latencies are the machine's, not the hub's."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(dict(kv.split("=") for kv in line.split()[1:])["avg60"])
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _merge_fake_reports(reports):
    total = {"update_sent_at": {}, "next_task_at": {}, "errors": [], "rejected": {}}
    for r in reports:
        for k, v in r.items():
            if isinstance(v, dict):
                total.setdefault(k, {}).update(v)
            elif isinstance(v, list):
                total.setdefault(k, []).extend(v)
            else:
                total[k] = total.get(k, 0) + v
    return total


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


if __name__ == "__main__":
    main()
