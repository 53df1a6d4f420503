"""SGD inside backward (no gradient buffers) against the buffered step, in one process.

    python benchmarks/fused_update.py [--reps 200] [--threads 1] [--momentum 0.9]

The same trainer code, the same kernels, the same batches; the only difference is how the update
is applied: "fused" is what ``Trainer.step`` does (each trained layer's backward updates its rows
tile by tile, no weight gradient ever whole), "buffered" is the path ``Trainer.gradients`` and
tied weights take (whole gradients of the trained rows, ``sgd_update_rows`` after backward),
switched on through the trainer's private flags (a benchmark-only look inside the trainer).
Rows: the classic models of benchmarks/train_step.py, full and sparse (last layer + 25% of the
rows of the layer before it), batch 32. Steps of the two paths alternate, so load from other
processes hits both alike; times are medians in microseconds, memory the trainer's record.
"""
import argparse
import time

import numpy as np

import ftte_core as ft

BATCH = 32


def models():
    return {"MLP-64": ft.zoo("mlp", (64,), 10, seed=0, hidden=(256, 256)),
            "MLP-784": ft.zoo("mlp", (784,), 10, seed=0, hidden=(128,)),
            "CNN-28": ft.zoo("cnn", (1, 28, 28), 10, seed=0)}


def buffered(trainer):
    trainer.fused = False
    trainer._buffered = True
    trainer._alloc_grads(buffered=True)
    return trainer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--momentum", type=float, default=0.9)
    args = ap.parse_args()
    ft.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"batch {BATCH}, momentum {args.momentum:g}, {args.threads} thread(s), median us over {args.reps} steps; "
          f"memory KiB (trainer's record)")
    print(f"{'model':8} {'subset':6} | {'fused us':>9} {'buffered us':>11} {'ratio':>6} | "
          f"{'fused KiB':>9} {'buffered KiB':>12} {'gradients KiB':>13}")
    for name, model in models().items():
        names = [l.name for l in model.param_layers]
        subsets = {"full": ft.Subset.full(model),
                   "sparse": ft.Subset.of(model, {names[-1]: {"rows": "all", "bias": True},
                                                  names[-2]: {"rows": 0.25, "bias": True}})}
        x = rng.standard_normal((BATCH,) + model.input_shape).astype(np.float32)
        y = rng.integers(0, 10, BATCH).astype(np.int32)
        for label, subset in subsets.items():
            fused = ft.Trainer(model.copy(), subset, lr=0.01, momentum=args.momentum)
            buf = buffered(ft.Trainer(model.copy(), subset, lr=0.01, momentum=args.momentum))
            times = {"fused": [], "buffered": []}
            for _ in range(10):
                fused.step(x, y)
                buf.step(x, y)
            for _ in range(args.reps):
                for key, tr in (("fused", fused), ("buffered", buf)):
                    t = time.perf_counter()
                    tr.step(x, y)
                    times[key].append(time.perf_counter() - t)
            f, b = (float(np.median(times[k])) * 1e6 for k in ("fused", "buffered"))
            mf, mb = fused.memory, buf.memory
            print(f"{name:8} {label:6} | {f:9.1f} {b:11.1f} {f / b:6.2f} | {mf.total / 1024:9.1f} "
                  f"{mb.total / 1024:12.1f} {mb.gradients / 1024:13.1f}")


if __name__ == "__main__":
    main()
