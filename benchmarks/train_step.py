"""One training step (forward, backward, SGD update; batch 32): FTTE engine vs plain NumPy vs PyTorch.

    python benchmarks/train_step.py [--reps 300] [--threads 1,all]

Models: MLP-64 (64-256-256-10 ReLU), MLP-784 (784-128-10), CNN-28 (1x28x28: conv 8@3x3 pad 1,
ReLU, maxpool 2, conv 16@3x3 pad 1, ReLU, maxpool 2, flatten, dense 10). Every implementation
does the same work: SGD with momentum 0.9 on all parameters, softmax cross-entropy. The engine
also runs the sparse step (last layer + 25% of the rows of the layer before it) and reports its
time and recorded training memory against the full step.

Each thread setting runs in its own child process (BLAS thread pools are fixed at import), all
in one invocation, so the comparison shares the machine's state. Times are medians over `reps`
steps after warm-up, with the 10th-90th percentile spread.
"""
import argparse
import json
import os
import subprocess
import sys
import time

BATCH = 32
LR = 0.05
MOMENTUM = 0.9


def percentiles(samples):
    import numpy as np
    a = np.asarray(samples) * 1e6
    return float(np.median(a)), float(np.percentile(a, 10)), float(np.percentile(a, 90))


def time_steps(step, reps, warmup=30):
    for _ in range(warmup):
        step()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return percentiles(out)


def model_specs():
    import ftte_core as ft
    return {
        "MLP-64": (lambda: ft.zoo("mlp", (64,), 10, seed=0, hidden=(256, 256)), (64,)),
        "MLP-784": (lambda: ft.zoo("mlp", (784,), 10, seed=0, hidden=(128,)), (784,)),
        "CNN-28": (lambda: ft.zoo("cnn", (1, 28, 28), 10, seed=0), (1, 28, 28)),
    }


# ---------------------------------------------------------------------------------------------
# Plain NumPy: the same step written the way one would with NumPy alone (im2col by strides).
class NumpyStep:
    def __init__(self, model):
        import numpy as np
        self.np = np
        self.layers = []
        for layer, s_in in zip(model.layers, model.shapes):
            entry = {"kind": layer.kind, "in_shape": s_in}
            if layer.has_params:
                entry["w"] = layer.weight.copy()
                entry["b"] = layer.bias.copy()
                entry["vw"] = np.zeros_like(entry["w"])
                entry["vb"] = np.zeros_like(entry["b"])
                if layer.kind == "conv2d":
                    entry["pad"] = layer.padding[0]
            self.layers.append(entry)

    def __call__(self, x, y):
        np = self.np
        n = x.shape[0]
        caches = []
        h = x
        for L in self.layers:
            k = L["kind"]
            if k == "dense":
                caches.append(h)
                h = h @ L["w"].T + L["b"]
            elif k == "conv2d":
                p = L["pad"]
                oc, c, kh, kw = L["w"].shape
                xp = np.pad(h, ((0, 0), (0, 0), (p, p), (p, p)))
                win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))  # n,c,oh,ow,kh,kw
                oh, ow = win.shape[2:4]
                cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
                caches.append((cols, h.shape))
                h = (cols @ L["w"].reshape(oc, -1).T + L["b"]).reshape(n, oh, ow, oc).transpose(0, 3, 1, 2)
            elif k == "relu":
                h = np.maximum(h, 0)
                caches.append(h)
            elif k == "maxpool2d":
                nn_, c, hh, ww = h.shape
                r = h.reshape(nn_, c, hh // 2, 2, ww // 2, 2)
                out = r.max(axis=(3, 5))
                caches.append((r, out))
                h = out
            elif k == "flatten":
                caches.append(h.shape)
                h = h.reshape(n, -1)
        z = h - h.max(axis=1, keepdims=True)
        e = np.exp(z)
        prob = e / e.sum(axis=1, keepdims=True)
        loss = -np.log(prob[np.arange(n), y]).mean()
        d = prob
        d[np.arange(n), y] -= 1
        d /= n
        for L, cache in zip(reversed(self.layers), reversed(caches)):
            k = L["kind"]
            if k == "dense":
                L["gw"] = d.T @ cache
                L["gb"] = d.sum(axis=0)
                d = d @ L["w"]
            elif k == "conv2d":
                cols, in_shape = cache
                oc, c, kh, kw = L["w"].shape
                nn_, _, hh, ww = in_shape
                d2 = d.transpose(0, 2, 3, 1).reshape(-1, oc)
                L["gw"] = (d2.T @ cols).reshape(L["w"].shape)
                L["gb"] = d2.sum(axis=0)
                if L is not self.layers[0]:
                    dcols = (d2 @ L["w"].reshape(oc, -1)).reshape(nn_, hh, ww, c, kh, kw)
                    p = L["pad"]
                    dxp = np.zeros((nn_, c, hh + 2 * p, ww + 2 * p), np.float32)
                    for i in range(kh):
                        for j in range(kw):
                            dxp[:, :, i:i + hh, j:j + ww] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
                    d = dxp[:, :, p:p + hh, p:p + ww]
            elif k == "relu":
                d = d * (cache > 0)
            elif k == "maxpool2d":
                r, out = cache
                mask = r == out[:, :, :, None, :, None]
                d = (mask * d[:, :, :, None, :, None]).reshape(r.shape[0], r.shape[1], r.shape[2] * 2, r.shape[4] * 2)
            elif k == "flatten":
                d = d.reshape(cache)
        for L in self.layers:
            if "w" in L:
                L["vw"] *= MOMENTUM
                L["vw"] += L["gw"]
                L["w"] -= LR * L["vw"]
                L["vb"] *= MOMENTUM
                L["vb"] += L["gb"]
                L["b"] -= LR * L["vb"]
        return loss


# ---------------------------------------------------------------------------------------------
def torch_step(name):
    import torch
    from torch import nn
    if name == "MLP-64":
        net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    elif name == "MLP-784":
        net = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    else:
        net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    loss_fn = nn.CrossEntropyLoss()

    def make(x, y):
        xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype("int64"))

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xt), yt)
            loss.backward()
            opt.step()
        return step
    return make


def child(threads, reps):
    """Measure every model at one thread setting; print JSON."""
    import numpy as np
    import ftte_core as ft
    ft.set_num_threads(threads)
    try:
        import torch
        torch.set_num_threads(threads)
        torch_version = torch.__version__
    except ImportError:
        torch = None
        torch_version = None
    out = {"threads": threads, "torch": torch_version, "gemm": ft._kernels.sgemm_kernel_name(), "models": {}}
    rng = np.random.default_rng(0)
    for name, (make_model, shape) in model_specs().items():
        x = rng.standard_normal((BATCH,) + shape).astype(np.float32)
        y = rng.integers(0, 10, BATCH).astype(np.int32)
        row = {}
        model = make_model()
        names = [layer.name for layer in model.param_layers]
        subsets = {"full": ft.Subset.full(model),
                   "sparse": ft.Subset.of(model, {names[-1]: {"rows": "all", "bias": True},
                                                  names[-2]: {"rows": 0.25, "bias": False}})}
        for label, subset in subsets.items():
            m = make_model()
            tr = ft.Trainer(m, subset, lr=LR, momentum=MOMENTUM)
            row[f"engine_{label}"] = time_steps(lambda: tr.step(x, y), reps)
            row[f"memory_{label}"] = tr.memory.as_dict()
            row[f"predicted_{label}"] = ft.predict_memory(m, subset, BATCH, momentum=MOMENTUM)["total"]
        ref = NumpyStep(make_model())
        xr = x.reshape((BATCH,) + make_model().input_shape)
        row["numpy"] = time_steps(lambda: ref(xr, y), reps)
        if torch is not None:
            step = torch_step(name)(xr.copy(), y)
            row["torch"] = time_steps(step, reps)
        out["models"][name] = row
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description="Training-step benchmark: engine vs NumPy vs PyTorch")
    ap.add_argument("--reps", type=int, default=300, help="timed steps per measurement (default 300)")
    ap.add_argument("--threads", default="1,all", help="comma list of thread counts, 'all' = every CPU (default 1,all)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.reps)
        return
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = [ncpu if t.strip() == "all" else int(t) for t in args.threads.split(",")]
    results = []
    for threads in settings:
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads), FTTE_NUM_THREADS=str(threads))
        print(f"measuring at {threads} thread(s) ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", str(threads), "--reps", str(args.reps)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"child at {threads} threads failed:\n{proc.stderr}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def fmt(t):
        return f"{t[0]:8.1f} [{t[1]:.0f}-{t[2]:.0f}]"

    print(f"\nTraining step, batch {BATCH}, SGD momentum {MOMENTUM}; median us [p10-p90]; "
          f"GEMM kernel: {results[0]['gemm']}; torch: {results[0]['torch'] or 'not installed (skipped)'}")
    print(f"{'model':<8} {'thr':>3} | {'engine full':>20} | {'numpy':>20} | {'torch':>20} | "
          f"{'vs numpy':>8} | {'vs torch':>8}")
    for r in results:
        for name, row in r["models"].items():
            e, npy = row["engine_full"], row["numpy"]
            tt = row.get("torch")
            print(f"{name:<8} {r['threads']:>3} | {fmt(e):>20} | {fmt(npy):>20} | "
                  f"{fmt(tt) if tt else 'n/a':>20} | {npy[0] / e[0]:>7.2f}x | "
                  f"{(f'{tt[0] / e[0]:.2f}x') if tt else 'n/a':>8}")
    print("\nSparse step (last layer + 25% of the rows of the layer before it) against the full step")
    print(f"{'model':<8} {'thr':>3} | {'sparse us':>20} | {'time ratio':>10} | {'full mem KiB':>12} | "
          f"{'sparse mem KiB':>14} | {'mem ratio':>9} | {'predicted full/sparse KiB':>26}")
    for r in results:
        for name, row in r["models"].items():
            e, s = row["engine_full"], row["engine_sparse"]
            mf, ms = row["memory_full"]["total"], row["memory_sparse"]["total"]
            print(f"{name:<8} {r['threads']:>3} | {fmt(s):>20} | {s[0] / e[0]:>10.2f} | {mf / 1024:>12.1f} | "
                  f"{ms / 1024:>14.1f} | {ms / mf:>9.3f} | "
                  f"{row['predicted_full'] / 1024:>12.1f} / {row['predicted_sparse'] / 1024:<11.1f}")
    print("\nRecorded memory by category (KiB), 1st thread setting:")
    for name, row in results[0]["models"].items():
        for label in ("full", "sparse"):
            m = row[f"memory_{label}"]
            print(f"  {name:<8} {label:<6} " + "  ".join(f"{k}={v / 1024:.1f}" for k, v in m.items()))


if __name__ == "__main__":
    main()
