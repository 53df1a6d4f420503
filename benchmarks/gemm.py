"""Our sgemm vs numpy `@` (OpenBLAS) on the GEMM shapes of small-model training.

    python benchmarks/gemm.py              # 1 thread, then 2 threads (in a child process)
    python benchmarks/gemm.py --threads 2  # one thread count only

Thread counts for OpenBLAS must be fixed before numpy is imported, hence the env setup first
and a fresh process per thread count. Times are per call: median over `reps` repetitions of a
timed batch of calls (ours and numpy alternate batch by batch, so load from other processes
hits both alike), with the 10th-90th percentile spread.
"""
import argparse
import os
import subprocess
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=0, help="0: run 1 and 2")
ap.add_argument("--reps", type=int, default=31)
ap.add_argument("--kernel", default="", help="set FTTE_GEMM_KERNEL (e.g. generic)")
args = ap.parse_args()

if args.threads == 0:
    for t in (1, 2):
        cmd = [sys.executable, __file__, "--threads", str(t), "--reps", str(args.reps)]
        if args.kernel:
            cmd += ["--kernel", args.kernel]
        subprocess.run(cmd, check=True)
    sys.exit(0)

for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[v] = str(args.threads)
if args.kernel:
    os.environ["FTTE_GEMM_KERNEL"] = args.kernel

import time  # noqa: E402

import numpy as np  # noqa: E402

from ftte_core import _kernels as K  # noqa: E402

K.set_num_threads(args.threads)

# (label, M, N, K, trans_a, trans_b)
SHAPES = [
    ("mlp64 fc1 fwd x@W^T", 32, 256, 64, False, True),
    ("mlp64 fc2 fwd x@W^T", 32, 256, 256, False, True),
    ("mlp64 fc3 fwd x@W^T", 32, 10, 256, False, True),
    ("mlp64 fc1 dW=dY^T X", 256, 64, 32, True, False),
    ("mlp64 fc2 dW=dY^T X", 256, 256, 32, True, False),
    ("mlp64 fc3 dW=dY^T X", 10, 256, 32, True, False),
    ("mlp64 fc2 dX=dY W", 32, 256, 256, False, False),
    ("mlp64 fc3 dX=dY W", 32, 256, 10, False, False),
    ("mlp784 fc1 fwd", 32, 128, 784, False, True),
    ("mlp784 fc2 fwd", 32, 10, 128, False, True),
    ("mlp784 fc1 dW", 128, 784, 32, True, False),
    ("mlp784 fc2 dW", 10, 128, 32, True, False),
    ("mlp784 fc2 dX", 32, 128, 10, False, False),
    ("conv 8x784x9", 8, 784, 9, False, False),
    ("conv 16x784x72", 16, 784, 72, False, False),
    ("conv 8x6272x9", 8, 6272, 9, False, False),
    ("conv 16x6272x72", 16, 6272, 72, False, False),
    ("square 256", 256, 256, 256, False, False),
]


def timeit_pair(f, g, reps):
    """Times f and g in alternating batches so machine noise hits both alike."""
    def batch_size(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return max(1, int(2e-3 / max(time.perf_counter() - t0, 1e-7)))  # ~2 ms per batch

    nf, ng = batch_size(f), batch_size(g)
    for _ in range(3):
        f(), g()
    tf, tg = [], []
    for _ in range(reps):
        for fn, n, out in ((f, nf, tf), (g, ng, tg)):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out.append((time.perf_counter() - t0) / n)
    stats = lambda ts: (np.median(ts), np.percentile(ts, 10), np.percentile(ts, 90))  # noqa: E731
    return stats(np.array(tf)), stats(np.array(tg))


rng = np.random.default_rng(0)
print(f"\n== {args.threads} thread(s), kernel {K.sgemm_kernel_name()}, numpy {np.__version__} ==")
print(f"{'shape':22s} {'M':>5s} {'N':>5s} {'K':>4s} | {'ours us':>8s} {'(p10-p90)':>13s} {'GF/s':>6s} | "
      f"{'numpy us':>8s} {'(p10-p90)':>13s} {'GF/s':>6s} | {'np/ours':>7s} {'p10':>5s}")
ratios, ratios10 = [], []
for label, M, N, Kd, ta, tb in SHAPES:
    a = rng.standard_normal((Kd, M) if ta else (M, Kd)).astype(np.float32)
    b = rng.standard_normal((N, Kd) if tb else (Kd, N)).astype(np.float32)
    c1 = np.empty((M, N), np.float32)
    c2 = np.empty((M, N), np.float32)
    at = a.T if ta else a
    bt = b.T if tb else b
    ours, ref = timeit_pair(lambda: K.sgemm(a, b, c1, ta, tb), lambda: np.matmul(at, bt, out=c2), args.reps)
    np.testing.assert_allclose(c1, c2, rtol=1e-3, atol=1e-3 * np.sqrt(Kd))
    fl = 2.0 * M * N * Kd
    r = ref[0] / ours[0]
    ratios.append(r)
    ratios10.append(ref[1] / ours[1])
    print(f"{label:22s} {M:5d} {N:5d} {Kd:4d} | {ours[0]*1e6:8.2f} ({ours[1]*1e6:5.1f}-{ours[2]*1e6:5.1f}) "
          f"{fl/ours[0]/1e9:6.1f} | {ref[0]*1e6:8.2f} ({ref[1]*1e6:5.1f}-{ref[2]*1e6:5.1f}) {fl/ref[0]/1e9:6.1f} | "
          f"{r:7.2f} {ref[1] / ours[1]:5.2f}")
gm = lambda x: np.exp(np.mean(np.log(x)))  # noqa: E731
print(f"geometric mean numpy/ours time: medians {gm(ratios):.2f}, p10 {gm(ratios10):.2f} (>1: ours faster; "
      "on a loaded machine p10 is the better estimate of code speed)")
