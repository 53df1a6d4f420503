"""Conv2d workspace and speed on the zoo's large-map layers, optionally against another build.

    python benchmarks/conv_workspace.py [--batch 8 --reps 41 --threads 1]
    python benchmarks/conv_workspace.py --baseline /path/to/old/_kernels.cpython-*.so [--cpu]

For each layer it prints the kernel scratch conv2d_scratch_bytes reports (one image, one thread:
the per-thread figure; forward, backward with dW and dX) and checks it against the workspace peak
the kernels record. Times are the medians of --reps calls (forward; backward with dW, db and dX)
at --threads threads, with the p10..p90 spread. With --baseline the other build (for example the
kernels before a change, copied aside) is loaded next to this one and both are timed alternately,
call by call, so load bursts on a shared machine hit both alike; the ratio new/old is printed.
"""
import argparse
import importlib.util
import time

import numpy as np

from ftte_core import _kernels as K

# name, x shape [C, H, W], w shape, stride, padding (top, left, bottom, right)
LAYERS = [
    ("mobilenetv1 stem 3x96x96 -> 8 s2", (3, 96, 96), (8, 3, 3, 3), (2, 2), (1, 1, 1, 1)),
    ("resnet8 stem 3x32x32 -> 16", (3, 32, 32), (16, 3, 3, 3), (1, 1), (1, 1, 1, 1)),
    ("resnet8 block1 16x32x32 -> 16", (16, 32, 32), (16, 16, 3, 3), (1, 1), (1, 1, 1, 1)),
    ("resnet8 block2.conv1 16x32x32 -> 32 s2", (16, 32, 32), (32, 16, 3, 3), (2, 2), (1, 1, 1, 1)),
    ("resnet8 block2.conv2 32x16x16 -> 32", (32, 16, 16), (32, 32, 3, 3), (1, 1), (1, 1, 1, 1)),
    ("cnn-28 conv2 8x14x14 -> 16", (8, 14, 14), (16, 8, 3, 3), (1, 1), (1, 1, 1, 1)),
    ("cnn-28 conv1 1x28x28 -> 8", (1, 28, 28), (8, 1, 3, 3), (1, 1), (1, 1, 1, 1)),
]


def load_baseline(path):
    spec = importlib.util.spec_from_file_location("baseline._kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def recorded_peak(mod, fn):
    base = mod.workspace_current_bytes()
    mod.reset_workspace_peak()
    fn()
    return mod.workspace_peak_bytes() - base


def calls(mod, x, w, b, stride, pad):
    N, OC = x.shape[0], w.shape[0]
    OH = K.window_out_size(x.shape[2], w.shape[2], stride[0], pad[0], pad[2])
    OW = K.window_out_size(x.shape[3], w.shape[3], stride[1], pad[1], pad[3])
    y = np.empty((N, OC, OH, OW), np.float32)
    dy = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    dw, db, dx = np.empty_like(w), np.empty_like(b), np.empty_like(x)
    fwd = lambda: mod.conv2d_forward(x, w, b, y, stride, pad)  # noqa: E731
    bwd = lambda: mod.conv2d_backward(x, w, dy, None, dw, db, dx, stride, pad)  # noqa: E731
    return fwd, bwd


def time_alternating(fns, reps, clock, warmup=3):
    for _ in range(warmup):
        for fn in fns:
            fn()
    ts = np.empty((len(fns), reps))
    for i in range(reps):
        for j, fn in enumerate(fns):
            t0 = clock()
            fn()
            ts[j, i] = clock() - t0
    return ts


def fmt(t):
    med, p10, p90 = np.median(t), np.percentile(t, 10), np.percentile(t, 90)
    return f"{med * 1e3:7.3f} ms ({(p10 / med - 1) * 100:+.0f}/{(p90 / med - 1) * 100:+.0f}%)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", help="another build's _kernels .so to compare with")
    ap.add_argument("--only", help="substring of the layer names to run")
    ap.add_argument("--cpu", action="store_true",
                    help="time the calling thread's CPU time, not wall time (1 thread only: the kernels then "
                         "run on this thread; leaves out the time other processes hold the core)")
    args = ap.parse_args()
    mods = [("new", K)]
    if args.baseline:
        mods.append(("old", load_baseline(args.baseline)))
    for _, mod in mods:
        mod.set_num_threads(args.threads)
    if args.cpu and args.threads != 1:
        ap.error("--cpu needs --threads 1")
    print(f"GEMM kernel {K.sgemm_kernel_name()}, batch {args.batch}, {args.threads} thread(s), "
          f"{args.reps} reps, {'CPU' if args.cpu else 'wall'} time; scratch per image per thread (KiB)")
    rng = np.random.default_rng(0)
    for name, xs, ws, stride, pad in LAYERS:
        if args.only and args.only not in name:
            continue
        print(name)
        x1 = rng.standard_normal((1,) + xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        b = rng.standard_normal(ws[0]).astype(np.float32)
        for label, mod in mods:
            f1, b1 = calls(mod, x1, w, b, stride, pad)
            sf = mod.conv2d_scratch_bytes(x1.shape, w.shape, stride, pad, threads=1)
            sb = mod.conv2d_scratch_bytes(x1.shape, w.shape, stride, pad, backward=True, threads=1)
            rf, rb = recorded_peak(mod, f1), recorded_peak(mod, b1)
            note = "" if (sf, sb) == (rf, rb) else f"  (recorded {rf / 1024:.1f} / {rb / 1024:.1f})"
            print(f"  {label}: scratch forward {sf / 1024:7.1f}, backward {sb / 1024:7.1f}{note}")
        x = rng.standard_normal((args.batch,) + xs).astype(np.float32)
        fns = [calls(mod, x, w, b, stride, pad) for _, mod in mods]
        for what, idx in (("forward", 0), ("backward", 1)):
            ts = time_alternating([f[idx] for f in fns], args.reps, time.thread_time if args.cpu else time.perf_counter)
            line = "  ".join(f"{label} {fmt(t)}" for (label, _), t in zip(mods, ts))
            if len(mods) == 2:
                line += (f"  new/old {np.median(ts[0]) / np.median(ts[1]):.3f}"
                         f" (median of pairs {np.median(ts[0] / ts[1]):.3f})")
            print(f"  {what:8s} {line}")


if __name__ == "__main__":
    main()
