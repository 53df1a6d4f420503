"""The process's real memory while training, against the cost model (issue 11: "real memory, not bookkeeping").

    python benchmarks/real_memory.py [--threads 1] [--steps 20] [--momentum 0] [--json]

Model: MLP 784-2048-2048-10 (ReLU), built from ftte_core.graph layers, batch 32. Each row runs in a
fresh child process, so nothing another measurement allocated or freed can be counted:

  1. build the model and the training data (640 random samples), ask ``predict_memory``;
  2. free what that left behind (gc, then glibc ``malloc_trim``: heap pages freed while building
     the weights would otherwise be reused by training without growing the resident set, and the
     growth would come out smaller than what training really needs);
  3. reset the peak: write "5" to /proc/self/clear_refs (VmHWM := VmRSS), read the baseline RSS;
  4. make a ``ftte_core.Trainer`` and train ``--steps`` steps (``Trainer.train``, batch 32);
  5. read VmHWM: growth = VmHWM - baseline.

What the growth is compared with: ``predict_memory(...)["total"]`` minus the weights, frozen and
trainable, because the model's arrays are resident before the baseline. Gradients, optimizer state,
activations and workspace (arena buffers and the kernels' scratch) are allocated by training, so
they are the predicted new bytes. They agree when

    |growth - predicted new| <= TOLERANCE x predicted new + allowance()

Rows: "sparse" (fc3 whole + 25% of fc2's rows, fc2's bias frozen), "sparse_int8" (the same with
``Trainer(frozen="int8")``: fc1, which trains nothing, held as int8 + a scale per row, and fc2
mixed: its 75% untrained rows int8 + a scale per row, its trained rows float32 in a compact
array; converted before the baseline, as an agent's model is once its first int8 task arrived),
"full" (every parameter), and
"overhead": the same procedure on a model with almost nothing to allocate (Dense 784-10, whole),
whose growth beyond its tiny prediction is the fixed cost of training at all, i.e. what the
allowance must cover (see ``allowance``).

The sparse/full ratios: of the growth alone, of "training memory" (weights + growth: the measured
counterpart of the cost model's total and of benchmarks/train_step.py's recorded memory), and of
the whole process's peak (interpreter and numpy included).

Needs Linux /proc (VmHWM, clear_refs). Under qemu-user (scripts/pi-check) the figures are the
emulator's process; they agree all the same (growth beyond the prediction for overhead /
sparse / full: emulated arm64 Cortex-A72 0.36 / 0.82 / 0.64 MiB, armhf Cortex-A7 0.36 / 0.45 /
0.46 MiB).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MIB = 1 << 20
BATCH = 32
HIDDEN = 2048
INPUTS = 784
CLASSES = 10
#: relative tolerance of the agreement between predicted and measured growth (the issue's 10%)
TOLERANCE = 0.10
#: fixed part of the allowance. Measured on x86-64 (4 KiB pages, glibc, Python 3.11, 1 thread), the
#: growth beyond the prediction is 0.43-0.53 MiB for the "overhead" row, 0.47-0.67 MiB for the
#: sparse and 0.56-0.68 MiB for the full one (emulated arm64: 0.36, 0.82, 0.64; armhf: 0.36, 0.45,
#: 0.46). It is made of:
#: - kernel and numpy code pages touched for the first time: RssFile grows 0.12-0.19 MiB;
#: - two input batches alive at once: Trainer._batches makes the next batch while the loop still
#:   holds the previous one, 2 x 32 x 784 x 4 B = 0.19 MiB (tracemalloc: the Python-side peak is
#:   210 KB above the end state; the labels are 128 B a batch);
#: - the Python objects of the bound plan and of the loop: 38-48 KB beyond the arena's buffers;
#: - page rounding of the ~20 arena buffers and malloc's own bookkeeping: the rest, 0.1-0.25 MiB.
#: None of it grows with the model, so a fixed 1 MiB covers it with room for another allocator or
#: Python version.
ALLOWANCE_FIXED = 1 * MIB
#: plus this many pages: rounding of each buffer and of touched code to the page grows with the
#: page size (16 KiB on a Raspberry Pi 5 kernel, 64 KiB on some aarch64 kernels)
ALLOWANCE_PAGES = 32


def allowance() -> int:
    return ALLOWANCE_FIXED + ALLOWANCE_PAGES * os.sysconf("SC_PAGE_SIZE")


def agrees(measured: int, predicted: int) -> bool:
    return abs(measured - predicted) <= TOLERANCE * predicted + allowance()


# -------------------------------------------------------------------------------------------------
# child: one measurement in a fresh process
def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def _free_heap() -> bool:
    """Return freed heap pages to the system (glibc); False where malloc_trim does not exist."""
    import ctypes
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def child(mode: str, steps: int, momentum: float = 0.0) -> dict:
    try:
        before = _status()
    except OSError as e:
        return {"skip": f"cannot read /proc/self/status ({e.strerror}): no Linux process accounting here"}
    if "VmHWM" not in before:
        return {"skip": "/proc/self/status has no VmHWM here"}
    import gc

    import numpy as np

    import ftte_core as ft
    from ftte_core.graph import Dense, Model, ReLU

    rng = np.random.default_rng(0)

    def dense(name, n_in, n_out):
        w = rng.standard_normal((n_out, n_in), dtype=np.float32)
        w *= np.float32(np.sqrt(2.0 / n_in))
        return Dense(name, w, np.zeros(n_out, np.float32))

    if mode == "overhead":
        model = Model([dense("fc1", INPUTS, CLASSES)], (INPUTS,), name="mlp-784-10")
        subset = ft.Subset.full(model)
    else:
        model = Model([dense("fc1", INPUTS, HIDDEN), ReLU("relu1"), dense("fc2", HIDDEN, HIDDEN), ReLU("relu2"),
                       dense("fc3", HIDDEN, CLASSES)], (INPUTS,), name="mlp-784-2048-2048-10")
        if mode in ("sparse", "sparse_int8"):
            subset = ft.Subset.of(model, {"fc3": {"rows": "all", "bias": True},
                                          "fc2": {"rows": list(range(0, HIDDEN, 4)), "bias": False}})
        elif mode == "full":
            subset = ft.Subset.full(model)
        else:
            raise SystemExit(f"real_memory: unknown mode {mode!r}")
    x = rng.standard_normal((steps * BATCH, INPUTS), dtype=np.float32)
    y = rng.integers(0, CLASSES, steps * BATCH).astype(np.int32)
    frozen = "int8" if mode == "sparse_int8" else "float32"
    predicted = ft.predict_memory(model, subset, batch_size=BATCH, momentum=momentum, frozen=frozen)
    if frozen == "int8":  # the weights the step holds are resident before the baseline, as for float32
        from ftte_core.plan import int8_layers, mixed_layers
        for name in int8_layers(model, subset, frozen):
            model.layer(name).quantize_weight()
        for name in mixed_layers(model, subset, frozen):  # fc2: its untrained rows int8, its trained ones float32
            model.layer(name).mix_weight(subset.get(name).rows)

    gc.collect()
    trimmed = _free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        return {"skip": f"cannot reset the peak RSS: writing /proc/self/clear_refs failed ({e.strerror})"}
    base = _status()
    if base["VmHWM"] > base["VmRSS"] + 64 * 1024:
        return {"skip": f"writing 5 to /proc/self/clear_refs did not reset VmHWM here "
                        f"({base['VmHWM'] >> 10} kB peak, {base['VmRSS'] >> 10} kB resident)"}

    trainer = ft.Trainer(model, subset, lr=0.01, momentum=momentum, frozen=frozen)
    stats = trainer.train(x, y, epochs=1.0, batch_size=BATCH, max_steps=steps)
    end = _status()

    weights = predicted["frozen_weights"] + predicted["trainable_weights"]
    return {"mode": mode, "model": model.name, "params": model.num_params(), "steps": stats.steps,
            "threads": ft.get_num_threads(), "page_size": os.sysconf("SC_PAGE_SIZE"), "malloc_trim": trimmed,
            "emulated": os.environ.get("FTTE_EMULATED", ""),
            "predicted": predicted, "recorded": trainer.memory.as_dict(), "weights": weights,
            "predicted_new": predicted["total"] - weights,
            "baseline_rss": base["VmRSS"], "peak": end["VmHWM"], "growth": end["VmHWM"] - base["VmRSS"],
            "anon_growth": end["RssAnon"] - base["RssAnon"], "file_growth": end["RssFile"] - base["RssFile"],
            "loss": stats.mean_loss}


# -------------------------------------------------------------------------------------------------
# parent
def measure(mode: str, threads: int = 1, steps: int = 20, timeout: float = 600.0, momentum: float = 0.0) -> dict:
    """Run one measurement in a fresh child process; returns its figures (or {"skip": reason})."""
    env = dict(os.environ, FTTE_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--steps", str(steps),
                           "--momentum", repr(float(momentum))],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"real_memory child {mode!r} exited {proc.returncode}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="kernel threads (the cost model is exact at 1)")
    ap.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    ap.add_argument("--momentum", type=float, default=0.0,
                    help="SGD momentum (default 0, the TTE setting: the step then keeps no state between steps)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object instead")
    ap.add_argument("--child", choices=("sparse", "sparse_int8", "full", "overhead"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.momentum)))
        return
    rows = {mode: measure(mode, args.threads, args.steps, momentum=args.momentum)
            for mode in ("overhead", "sparse", "sparse_int8", "full")}
    if args.json:
        print(json.dumps(rows))
        return
    skipped = {m: r["skip"] for m, r in rows.items() if "skip" in r}
    if skipped:
        raise SystemExit(f"real_memory: not measurable here: {next(iter(skipped.values()))}")
    any_row = rows["sparse"]
    print(f"Real memory of training (fresh process per row; batch {BATCH}, momentum {args.momentum:g}, "
          f"{any_row['steps']} steps, "
          f"{any_row['threads']} thread(s), page {any_row['page_size'] >> 10} KiB"
          f"{', EMULATED ' + any_row['emulated'] if any_row['emulated'] else ''})")
    print(f"agreement: |growth - predicted new| <= {TOLERANCE:.0%} x predicted new + {allowance() / MIB:.2f} MiB")
    print(f"{'row':11} {'model':22} {'weights':>9} {'pred new':>9} {'growth':>9} {'(anon':>8} {'+ file)':>8} "
          f"{'excess':>8} {'ratio':>6} {'agrees':>6} {'proc peak':>10}")
    for mode, r in rows.items():
        excess = r["growth"] - r["predicted_new"]
        ratio = r["growth"] / r["predicted_new"] if r["predicted_new"] else float("inf")
        print(f"{mode:11} {r['model']:22} {r['weights'] / MIB:>7.2f}Mi {r['predicted_new'] / MIB:>7.2f}Mi "
              f"{r['growth'] / MIB:>7.2f}Mi {r['anon_growth'] / MIB:>6.2f}Mi {r['file_growth'] / MIB:>6.2f}Mi "
              f"{excess / MIB:>+6.2f}Mi {ratio:>6.3f} {'yes' if agrees(r['growth'], r['predicted_new']) else 'NO':>6} "
              f"{r['peak'] / MIB:>8.1f}Mi")
    s, f = rows["sparse"], rows["full"]
    print("\nsparse / full (large MLP)        measured   predicted")
    print(f"  growth of the resident set     {s['growth'] / f['growth']:>8.3f}   {s['predicted_new'] / f['predicted_new']:>9.3f}")
    train_s, train_f = s["weights"] + s["growth"], f["weights"] + f["growth"]
    print(f"  training memory (weights+new)  {train_s / train_f:>8.3f}   "
          f"{s['predicted']['total'] / f['predicted']['total']:>9.3f}   (issue 11 target <= 0.25)")
    print(f"  whole process peak (VmHWM)     {s['peak'] / f['peak']:>8.3f}")
    q = rows["sparse_int8"]
    train_q = q["weights"] + q["growth"]
    print("sparse with int8 frozen weights / full")
    print(f"  training memory (weights+new)  {train_q / train_f:>8.3f}   "
          f"{q['predicted']['total'] / f['predicted']['total']:>9.3f}   (issue 11 target <= 0.25)")
    print(f"  whole process peak (VmHWM)     {q['peak'] / f['peak']:>8.3f}")
    print(f"frozen weights held as float32 in the sparse row: {s['predicted']['frozen_weights'] / MIB:.2f} MiB "
          f"of {s['weights'] / MIB:.2f} MiB; in the sparse_int8 row (int8 + scales + row slots): "
          f"{q['predicted']['frozen_weights'] / MIB:.2f} MiB of {q['weights'] / MIB:.2f} MiB")


if __name__ == "__main__":
    main()
