"""Kernel micro-benchmarks: the delta codec and the fused merge against their NumPy equivalents.

    python benchmarks/kernels.py [--rows 1024 --cols 1024 --subset 512 --K 10 --reps 50]

Each case is timed as the median of --reps runs after warm-up, with the spread (p10..p90 as a
percentage of the median), GB/s of float32 input (encode: the R x F float32 delta; decode: the
R x F float32 it produces; merge: the K x R x F float32 the updates stand for), and the speed-up
over NumPy measured in the same run. The table is printed at 1 thread and at all threads.

Structured as functions plus main() so further benchmarks (e.g. peak RSS of a training process)
can be appended as more functions called from main().
"""
import argparse
import time

import numpy as np

from ftte_core import _kernels as K

F32 = np.float32


# ---------------------------------------------------------------- timing
def measure_pair(kfn, nfn, reps, warmup=3):
    """Times kernel and NumPy alternately (so load bursts on this shared box hit both alike).
    Returns per side (median, p10, p90) seconds over `reps` calls after `warmup` calls."""
    for _ in range(warmup):
        kfn()
        nfn()
    ts = np.empty((2, reps))
    for i in range(reps):
        for j, fn in enumerate((kfn, nfn)):
            t0 = time.perf_counter()
            fn()
            ts[j, i] = time.perf_counter() - t0
    return [(float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90))) for t in ts]


# ---------------------------------------------------------------- NumPy equivalents
def np_encode(new, base, rows, levels, stochastic, seed=0):
    d = new[rows] - base
    s = (np.abs(d).max(axis=1) / F32(levels)).astype(F32)
    inv = np.divide(F32(1), s, out=np.zeros_like(s), where=s > 0)
    x = d * inv[:, None]
    if stochastic:
        x = np.floor(x + np.random.default_rng(seed).random(x.shape, dtype=F32))
    else:
        x = np.rint(x)
    return np.clip(x, -levels, levels).astype(np.int8), s


def np_pack4(q):
    u = (q & 0xF).astype(np.uint8)
    if u.shape[1] % 2:
        u = np.concatenate([u, np.zeros((u.shape[0], 1), np.uint8)], axis=1)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def np_unpack4(p, F):
    q = np.empty((p.shape[0], 2 * p.shape[1]), np.int8)
    q[:, 0::2] = (p << 4).view(np.int8) >> 4
    q[:, 1::2] = p.view(np.int8) >> 4
    return q[:, :F]


# ---------------------------------------------------------------- cases
def codec_cases(O, F, R, Kn, seed=0):
    """(name, kernel_fn, numpy_fn, float32 bytes of input) for every codec / merge case."""
    rng = np.random.default_rng(seed)
    new = rng.standard_normal((O, F)).astype(F32)
    rows = np.sort(rng.choice(O, size=R, replace=False)).astype(np.int32)
    base = (new[rows] + 0.01 * rng.standard_normal((R, F))).astype(F32)
    q8, q4 = np.empty((R, F), np.int8), np.empty((R, (F + 1) // 2), np.uint8)
    s, out = np.empty(R, F32), np.empty((R, F), F32)
    K.encode_int8(new, base, rows, q8, s)
    s8 = s.copy()
    K.encode_int4(new, base, rows, q4, s)
    s4 = s.copy()
    nbytes = R * F * 4

    def np_enc4(stoch):
        q, sc = np_encode(new, base, rows, 7, stoch)
        return np_pack4(q), sc

    cases = [
        ("encode int8 nearest", lambda: K.encode_int8(new, base, rows, q8, s),
         lambda: np_encode(new, base, rows, 127, False), nbytes),
        ("encode int8 stochastic", lambda: K.encode_int8(new, base, rows, q8, s, True, 1),
         lambda: np_encode(new, base, rows, 127, True, 1), nbytes),
        ("encode int4 nearest", lambda: K.encode_int4(new, base, rows, q4, s),
         lambda: np_enc4(False), nbytes),
        ("encode int4 stochastic", lambda: K.encode_int4(new, base, rows, q4, s, True, 1),
         lambda: np_enc4(True), nbytes),
        ("decode int8", lambda: K.decode_int8(q8, s8, out),
         lambda: np.multiply(q8, s8[:, None], out=out), nbytes),
        ("decode int4", lambda: K.decode_int4(q4, s4, out),
         lambda: np.multiply(np_unpack4(q4, F), s4[:, None], out=out), nbytes),
    ]

    # Merge of Kn updates into the selected rows of an [O, F] target.
    qs8, ss8, qs4, ss4, ds = [], [], [], [], []
    for k in range(Kn):
        d = rng.standard_normal((R, F)).astype(F32)
        z = np.zeros_like(d)
        qa, sa = np.empty((R, F), np.int8), np.empty(R, F32)
        K.encode_int8(d, z, None, qa, sa, True, k)
        qb, sb = np.empty((R, (F + 1) // 2), np.uint8), np.empty(R, F32)
        K.encode_int4(d, z, None, qb, sb, True, k)
        qs8.append(qa), ss8.append(sa), qs4.append(qb), ss4.append(sb), ds.append(d)
    alphas = rng.uniform(0.01, 0.1, Kn).astype(F32)
    target = rng.standard_normal((O, F)).astype(F32)

    def np_merge8():
        for k in range(Kn):
            target[rows] += alphas[k] * ss8[k][:, None] * qs8[k]

    def np_merge4():
        for k in range(Kn):
            target[rows] += alphas[k] * ss4[k][:, None] * np_unpack4(qs4[k], F)

    def np_mergef():
        for k in range(Kn):
            target[rows] += alphas[k] * ds[k]

    mbytes = Kn * R * F * 4
    cases += [
        (f"merge int8 K={Kn}", lambda: K.merge_int8(target, rows, qs8, ss8, alphas), np_merge8, mbytes),
        (f"merge int4 K={Kn}", lambda: K.merge_int4(target, rows, qs4, ss4, alphas), np_merge4, mbytes),
        (f"merge float K={Kn}", lambda: K.merge_float(target, rows, ds, alphas), np_mergef, mbytes),
    ]
    return cases


def bench_codec(O, F, R, Kn, reps, threads):
    """Times every codec case at `threads` kernel threads (0 = all); returns result dicts."""
    K.set_num_threads(threads)
    results = []
    for name, kfn, nfn, nbytes in codec_cases(O, F, R, Kn):
        (km, k10, k90), (nm, n10, n90) = measure_pair(kfn, nfn, reps)
        results.append(dict(name=name, kernel_s=km, kernel_spread=(k10, k90), numpy_s=nm, numpy_spread=(n10, n90),
                            kernel_gbs=nbytes / km / 1e9, numpy_gbs=nbytes / nm / 1e9, ratio=nm / km))
    K.set_num_threads(0)
    return results


def print_codec_table(results, title):
    print(f"\n{title}")
    print(f"{'case':<24}{'kernel ms':>11}{'spread %':>14}{'GB/s':>8}{'numpy ms':>11}{'spread %':>14}{'GB/s':>8}{'speed-up':>10}")
    for r in results:
        def spread(m, s):
            return f"-{100 * (m - s[0]) / m:.0f}/+{100 * (s[1] - m) / m:.0f}"
        print(f"{r['name']:<24}{r['kernel_s'] * 1e3:>11.3f}{spread(r['kernel_s'], r['kernel_spread']):>14}"
              f"{r['kernel_gbs']:>8.2f}{r['numpy_s'] * 1e3:>11.3f}{spread(r['numpy_s'], r['numpy_spread']):>14}"
              f"{r['numpy_gbs']:>8.2f}{r['ratio']:>9.1f}x")


# ---------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024, help="rows O of the parameter tensor")
    ap.add_argument("--cols", type=int, default=1024, help="columns F of the parameter tensor")
    ap.add_argument("--subset", type=int, default=512, help="trained rows R sent in each update")
    ap.add_argument("--K", type=int, default=10, help="updates per merge")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args(argv)
    shape = f"[{args.rows} x {args.cols}], {args.subset} rows selected"
    for threads in (1, 0):
        label = "1 thread" if threads == 1 else f"all threads ({K.default_num_threads()})"
        res = bench_codec(args.rows, args.cols, args.subset, args.K, args.reps, threads)
        print_codec_table(res, f"Delta codec and merge, {shape}, kernel at {label} (NumPy single-threaded)")
    print_peak_rss()


# VmHWM (not ru_maxrss, which a forked child inherits from its parent's high-water mark).
PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"

RSS_CHILD = r"""
import sys, time
import numpy as np
t0 = time.perf_counter()
import ftte_core as ft
model = ft.zoo("mlp", (64,), 10, seed=0, hidden=(256, 256))
trainer = ft.Trainer(model, lr=0.05, momentum=0.9)
rng = np.random.default_rng(0)
x = rng.standard_normal((32, 64)).astype(np.float32)
y = rng.integers(0, 10, 32).astype(np.int32)
for _ in range(100):
    trainer.step(x, y)
print(PEAK, "onnx" in sys.modules, time.perf_counter() - t0)
""".replace("PEAK", PEAK)

BASELINE_CHILD = "import numpy; print(PEAK)".replace("PEAK", PEAK)


def print_peak_rss(runs=5):
    """Peak RSS of a fresh process that imports ftte_core and trains MLP-64 for 100 steps."""
    import subprocess
    import sys
    train, base = [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", RSS_CHILD], capture_output=True, text=True, check=True).stdout.split()
        train.append(int(out[0]) / 1024)
        onnx_loaded = out[1] == "True"
        base.append(int(subprocess.run([sys.executable, "-c", BASELINE_CHILD], capture_output=True, text=True,
                                       check=True).stdout) / 1024)
    print(f"\nPeak RSS of a fresh process, {runs} runs (MiB, median [min-max]):")
    print(f"  python + numpy only                               {np.median(base):6.1f} [{min(base):.1f}-{max(base):.1f}]")
    print(f"  import ftte_core + train MLP-64 for 100 steps     {np.median(train):6.1f} [{min(train):.1f}-{max(train):.1f}]"
          f"   (onnx imported: {onnx_loaded})")


if __name__ == "__main__":
    main()
