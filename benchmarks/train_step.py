"""One training step (forward, backward, SGD update; batch 32): FTTE engine vs plain NumPy vs PyTorch.

    python benchmarks/train_step.py [--reps 300] [--tiny-reps 30] [--threads 1,all] [--only classic|tiny]
                                    [--momentum 0.9]

Two sets of models, both in one run so the comparison shares the machine's state:

- classic: MLP-64 (64-256-256-10 ReLU), MLP-784 (784-128-10), CNN-28 (1x28x28: conv 8@3x3 pad 1,
  ReLU, maxpool 2, conv 16@3x3 pad 1, ReLU, maxpool 2, flatten, dense 10), against a plain NumPy
  step and PyTorch; the sparse step trains the last layer + 25% of the rows of the layer before it.
- tiny (issue 10, the MLPerf Tiny zoo models): ResNet-8 (3x32x32), DS-CNN (1x49x10),
  MobileNetV1 x0.25 (3x48x48), against the same network built in PyTorch from our layers
  (``torch_net``: same architecture and weights, batch norm in eval mode, i.e. frozen statistics
  with trainable scale and shift, as the engine's). The sparse step trains the classifier and
  the last block's convolutions and batch norms at 25% of their output channels (a Subset). For
  each model: the training flops (``ft.training_flops``), the GEMM rate measured in the same
  process, the compute limit they imply (flops / GEMM rate: the step if every flop ran at GEMM
  speed), and a per-layer breakdown of the engine's step.

Every implementation does the same work: SGD with momentum 0.9 (``--momentum``) on all parameters, softmax
cross-entropy. Each thread setting runs in its own child process (BLAS thread pools are fixed at
import). Times are medians over `reps` steps after warm-up, with the 10th-90th percentile spread. The
implementations of one model run in turn (classic: rounds of CLASSIC_BLOCK steps of each; tiny: one
step of each per round), so machine load hits them alike, and ratios are medians of per-round ratios.
"""
import argparse
import json
import os
import subprocess
import sys
import time

BATCH = 32
LR = 0.05
LR_TINY = 0.01  # the deeper zoo models diverge at 0.05 from random data
MOMENTUM = 0.9
#: classic models: steps of one implementation per round (the median counts); reps / this rounds
CLASSIC_BLOCK = 5
#: the classic steps also run in micro-batches (label -> samples per pass): the full step for reference,
#: the sparse step float32 and int8 (Trainer(micro_batch=...), the memory lever for activation-bound models)
MICRO_STEPS = {"full_mb4": 4, "sparse_mb4": 4, "sparse_int8_mb4": 4, "sparse_int8_mb2": 2}


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


def time_rounds(steps, reps, warmup=5, block=1):
    """Times the named steps in turn, one of each per round, so load from other processes hits
    them alike: {name: percentiles}, and {name: median over rounds of its time / the first's}.
    With block > 1 a round runs `block` consecutive steps of each (a training loop's steady state:
    its own buffers warm in cache rather than just evicted by the other implementations) and
    counts their median; `reps` is then the number of rounds."""
    import numpy as np
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for _ in range(reps):
        for name in names:
            block_times = []
            for _ in range(block):
                t = time.perf_counter()
                steps[name]()
                block_times.append(time.perf_counter() - t)
            times[name].append(float(np.median(block_times)))
    base = np.asarray(times[names[0]])
    return ({name: percentiles(ts) for name, ts in times.items()},
            {name: float(np.median(np.asarray(ts) / base)) for name, ts in times.items()})


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

# ---------------------------------------------------------------------------------------------
# The MLPerf Tiny zoo models (issue 10).
def tiny_specs():
    """label -> (zoo name, input shape, the last block's layers for the sparse step)."""
    return {
        "ResNet-8": ("resnet8", (3, 32, 32), ["block3.conv1", "block3.bn1", "block3.conv2", "block3.bn2",
                                              "block3.shortcut"]),
        "DS-CNN": ("dscnn", (1, 49, 10), ["block4.dw", "block4.dw_bn", "block4.pw", "block4.pw_bn"]),
        "MobileNetV1-48": ("mobilenetv1", (3, 48, 48), ["block13.dw", "block13.dw_bn", "block13.pw",
                                                        "block13.pw_bn"]),
    }


def sparse_spec(last_block):
    """Classifier whole; the last block's convolutions and batch norms at 25% of their channels."""
    spec = {name: {"rows": 0.25, "bias": False} for name in last_block}
    spec["classifier"] = {"rows": "all", "bias": True}
    return spec


def torch_net(model):
    """The same network in PyTorch, weights copied from ``model`` (a zoo DAG), in eval mode (batch
    norm uses its running statistics, which stay frozen; scale and shift still train)."""
    import torch
    from torch import nn

    def conv(layer):
        one_d = layer.kind == "conv1d"
        w = torch.from_numpy(layer.weight.copy())
        oc, cg = w.shape[:2]
        k = tuple(w.shape[2:])
        if one_d:
            (pl, pr), (pt, pb) = layer.padding, (0, 0)
        else:
            pt, pl, pb, pr = layer.padding
        symmetric = pt == pb and pl == pr
        cls = nn.Conv1d if one_d else nn.Conv2d
        pad = (pl,) if one_d else (pt, pl)
        c = cls(cg * layer.group, oc, k, stride=layer.stride, padding=pad if symmetric else 0, groups=layer.group)
        with torch.no_grad():
            c.weight.copy_(w)
            c.bias.copy_(torch.from_numpy(layer.bias.copy()))
        if symmetric:
            return c
        return nn.Sequential(nn.ConstantPad1d((pl, pr), 0.0) if one_d else nn.ZeroPad2d((pl, pr, pt, pb)), c)

    def module(layer, in_rank):
        k = layer.kind
        if k == "dense":
            lin = nn.Linear(layer.in_features, layer.out_features)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(layer.weight.copy()))
                lin.bias.copy_(torch.from_numpy(layer.bias.copy()))
            return lin
        if k in ("conv2d", "conv1d"):
            return conv(layer)
        if k == "batchnorm":
            bn = (nn.BatchNorm2d if in_rank == 3 else nn.BatchNorm1d)(layer.channels, eps=layer.eps)
            with torch.no_grad():
                bn.weight.copy_(torch.from_numpy(layer.weight.copy()))
                bn.bias.copy_(torch.from_numpy(layer.bias.copy()))
                bn.running_mean.copy_(torch.from_numpy(layer.mean.copy()))
                bn.running_var.copy_(torch.from_numpy(layer.var.copy()))
            return bn
        if k == "relu":
            return nn.ReLU(inplace=True)  # as torchvision's models do
        if k == "clip":
            return nn.ReLU6(inplace=True) if (layer.lo, layer.hi) == (0.0, 6.0) else nn.Hardtanh(layer.lo, layer.hi)
        if k == "maxpool1d":
            return nn.MaxPool1d(layer.kernel[0], layer.stride[0])
        if k == "maxpool2d":
            return nn.MaxPool2d(layer.kernel, layer.stride)
        if k == "global_avgpool":
            return (nn.AdaptiveAvgPool2d(1) if in_rank == 3 else nn.AdaptiveAvgPool1d(1))
        if k == "flatten":
            return nn.Flatten()
        if k == "dropout":
            return nn.Dropout(layer.p)
        if k == "add":
            return None
        raise ValueError(f"torch_net: no PyTorch equivalent written for layer kind {k!r}")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mods = nn.ModuleList()
            self.calls = []
            for i, layer in enumerate(model.layers):
                m = module(layer, len(model.shapes[model.inputs[i][0]]))
                if m is None:
                    self.calls.append(None)
                else:
                    self.calls.append(len(self.mods))
                    self.mods.append(m)
            last = model.last_uses()
            self.free_after = [[v for v in set(ins) if last[v] == i] for i, ins in enumerate(model.inputs)]

        def forward(self, x):
            values = {0: x}
            for i, ins in enumerate(model.inputs):
                k = self.calls[i]
                values[i + 1] = (values[ins[0]] + values[ins[1]]) if k is None else self.mods[k](values[ins[0]])
                for v in self.free_after[i]:
                    del values[v]
            return values[len(model.layers)]

    return Net().eval()


def torch_tiny_step(model, x, y):
    """A PyTorch training step on the same network; also the largest |logit difference| to ours."""
    import torch
    from torch import nn
    net = torch_net(model)
    xt, yt = torch.from_numpy(x.copy()), torch.from_numpy(y.astype("int64"))
    with torch.no_grad():
        diff = float((net(xt) - torch.from_numpy(model.predict(x))).abs().max())
    opt = torch.optim.SGD(net.parameters(), lr=LR_TINY, momentum=MOMENTUM)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(xt), yt)
        loss.backward()
        opt.step()
    return step, diff


#: GEMM shapes timed for the compute limit: a square one (about the best rate the kernel reaches)
#: and ResNet-8's conv GEMMs per image (output channels x output pixels x C*3*3 inputs)
GEMM_SHAPES = (("square 256", 256, 256, 256), ("resnet8 block1 conv", 16, 1024, 144),
               ("resnet8 block3 conv", 64, 64, 576))


def gemm_rate(reps=30):
    """Our sgemm's GFLOP/s on GEMM_SHAPES."""
    import numpy as np
    import ftte_core as ft
    out = {}
    rng = np.random.default_rng(0)
    for label, m, n, k in GEMM_SHAPES:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        c = np.empty((m, n), np.float32)
        med, _, _ = time_steps(lambda: ft._kernels.sgemm(a, b, c), reps, warmup=5)
        out[label] = 2.0 * m * n * k / (med * 1e-6) / 1e9
    return out


def layer_breakdown(trainer, x, y, reps=10):
    """Median microseconds per layer (forward, backward) of the trainer's step, by wrapping the
    calls of its bound plan (a benchmark-only look inside the trainer), plus loss + update."""
    import time as _time
    import numpy as np
    trainer.step(x, y)  # binds the plan for this batch size
    bound = trainer._plans[x.shape[0]]
    samples = {}

    def wrap(entries, phase):
        out = []
        for fn, args, dynamic in entries:
            owner = getattr(fn, "__self__", None)
            label = (owner.name, phase) if hasattr(owner, "kind") else ("(gradient join add)", phase)

            def timed(*a, _fn=fn, _label=label):
                t = _time.perf_counter()
                _fn(*a)
                samples.setdefault(_label, []).append(_time.perf_counter() - t)
            out.append((timed, args, dynamic))
        return out

    plain_f, plain_b = bound.forward, bound.backward
    bound.forward, bound.backward = wrap(plain_f, "fwd"), wrap(plain_b, "bwd")
    totals, others = [], []
    try:
        for _ in range(reps):
            before = sum(sum(ts) for ts in samples.values())
            t = _time.perf_counter()
            trainer.step(x, y)
            totals.append(_time.perf_counter() - t)
            others.append(totals[-1] - (sum(sum(ts) for ts in samples.values()) - before))
    finally:
        bound.forward, bound.backward = plain_f, plain_b
    per_call = {}
    for (name, phase), ts in samples.items():
        calls = len(ts) // reps
        per_call[(name, phase)] = float(np.median(np.asarray(ts).reshape(reps, calls).sum(axis=1))) * 1e6
    model = trainer.model
    rows = []
    for i, layer in enumerate(model.layers):
        f, b = per_call.get((layer.name, "fwd"), 0.0), per_call.get((layer.name, "bwd"), 0.0)
        if f or b:
            kind = f"{layer.kind}/{layer.mode}" if layer.kind in ("conv2d", "conv1d") else layer.kind
            rows.append({"layer": layer.name, "kind": kind, "fwd": f, "bwd": b,
                         "flops": layer.flops(*model.in_shapes(i)) * x.shape[0]})
    joins = per_call.get(("(gradient join add)", "bwd"), 0.0)
    total = float(np.median(totals)) * 1e6
    return {"rows": rows, "joins": joins, "total": total, "other": float(np.median(others)) * 1e6}


def torch_breakdown(step, steps=5):
    """PyTorch's own per-op profile of its step: the top ops by self CPU time, ms per step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    return {"total": total / steps / 1000,
            "top": [(e.key, e.self_cpu_time_total / steps / 1000) for e in ops[:6]]}


def tiny_child(out, torch, reps):
    import numpy as np
    import ftte_core as ft
    out["gemm_gflops"] = gemm_rate()
    rate = max(out["gemm_gflops"].values())
    out["tiny"] = {}
    for label, (zoo_name, shape, last_block) in tiny_specs().items():
        make = lambda: ft.zoo(zoo_name, shape, seed=0)  # noqa: E731
        model = make()
        rng = np.random.default_rng(0)
        x = rng.standard_normal((BATCH,) + shape).astype(np.float32)
        y = rng.integers(0, model.num_classes, BATCH).astype(np.int32)
        row = {"params": model.num_params()}
        subsets = {"full": ft.Subset.full(model), "sparse": ft.Subset.of(model, sparse_spec(last_block))}
        trainers, steps = {}, {}
        for kind, subset in subsets.items():
            tr = trainers[kind] = ft.Trainer(make(), subset, lr=LR_TINY, momentum=MOMENTUM)
            steps[f"engine_{kind}"] = (lambda t: lambda: t.step(x, y))(tr)
            row[f"predicted_{kind}"] = ft.predict_memory(tr.model, subset, BATCH, momentum=MOMENTUM)["total"]
            row[f"flops_{kind}"] = ft.training_flops(tr.model, subset, BATCH)
            row[f"limit_{kind}"] = row[f"flops_{kind}"] / (rate * 1e9) * 1e6
        if torch is not None:
            steps["torch"], row["torch_max_logit_diff"] = torch_tiny_step(make(), x, y)
        times, ratios = time_rounds(steps, reps)
        row.update(times)
        row["sparse_ratio"] = ratios["engine_sparse"]
        if torch is not None:
            row["torch_ratio"] = ratios["torch"]
        for kind, tr in trainers.items():
            row[f"memory_{kind}"] = tr.memory.as_dict()
        row["breakdown"] = layer_breakdown(ft.Trainer(make(), lr=LR_TINY, momentum=MOMENTUM), x, y)
        if torch is not None:
            row["torch_ops"] = torch_breakdown(steps["torch"])
        out["tiny"][label] = row


def print_tiny(results):
    def fmt(t):
        return f"{t[0] / 1000:7.2f} [{t[1] / 1000:.2f}-{t[2] / 1000:.2f}]"

    first = results[0]
    g = first["gemm_gflops"]
    print(f"\nMLPerf Tiny zoo models: training step, batch {BATCH}, SGD momentum {MOMENTUM}, lr {LR_TINY}; "
          f"median ms [p10-p90]; torch: {first['torch'] or 'not installed (column skipped; pip install torch)'}")
    print("GEMM rate measured in the same process (1st setting): "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in g.items())
          + "; compute limit = the step's training flops at the best of these rates; eff = limit / engine")
    print("engine full, engine sparse and torch steps run in turn; ratios are medians of the per-round ratios "
          "(p10s: of the 10th percentiles, the better estimate of code speed on a loaded machine)")
    print(f"{'model':<15} {'thr':>3} | {'engine full':>21} | {'torch full':>21} | {'torch/ftte':>10} | "
          f"{'p10s':>7} | {'GFLOP/step':>10} | {'limit ms':>8} | {'eff':>5} | {'|dlogit|':>8}")
    for r in results:
        for name, row in r["tiny"].items():
            e, tt = row["engine_full"], row.get("torch")
            ratio = f"{row['torch_ratio']:.2f}x" if tt else "n/a"
            ratio10 = f"{tt[1] / e[1]:.2f}x" if tt else "n/a"
            print(f"{name:<15} {r['threads']:>3} | {fmt(e):>21} | {fmt(tt) if tt else 'n/a':>21} | "
                  f"{ratio:>10} | {ratio10:>7} | {row['flops_full'] / 1e9:>10.3f} | "
                  f"{row['limit_full'] / 1000:>8.2f} | {row['limit_full'] / e[0]:>5.2f} | "
                  f"{row.get('torch_max_logit_diff', float('nan')):>8.1e}")
    print("\nSparse step (classifier + the last block's convs and batch norms at 25% of their channels)")
    print(f"{'model':<15} {'thr':>3} | {'sparse':>21} | {'time ratio':>10} | {'full mem KiB':>12} | "
          f"{'sparse mem KiB':>14} | {'mem ratio':>9} | {'predicted full/sparse KiB':>26} | {'limit ms':>8}")
    for r in results:
        for name, row in r["tiny"].items():
            e, s = row["engine_full"], row["engine_sparse"]
            mf, ms = row["memory_full"]["total"], row["memory_sparse"]["total"]
            print(f"{name:<15} {r['threads']:>3} | {fmt(s):>21} | {row['sparse_ratio']:>10.3f} | {mf / 1024:>12.1f} | "
                  f"{ms / 1024:>14.1f} | {ms / mf:>9.3f} | "
                  f"{row['predicted_full'] / 1024:>12.1f} / {row['predicted_sparse'] / 1024:<11.1f} | "
                  f"{row['limit_sparse'] / 1000:>8.2f}")
    print("\nRecorded memory by category (KiB), 1st thread setting:")
    for name, row in first["tiny"].items():
        for label in ("full", "sparse"):
            m = row[f"memory_{label}"]
            print(f"  {name:<15} {label:<6} " + "  ".join(f"{k}={v / 1024:.1f}" for k, v in m.items()))
    print("\nWhere the engine's full step goes (1st thread setting; medians of 10 steps, ms; GFLOP/s of "
          "the layer's forward flops x3 over forward + backward)")
    for name, row in first["tiny"].items():
        b = row["breakdown"]
        by_kind = {}
        for x in b["rows"]:
            k = by_kind.setdefault(x["kind"], [0.0, 0.0, 0])
            k[0] += x["fwd"]
            k[1] += x["bwd"]
            k[2] += x["flops"]
        layers = sum(x["fwd"] + x["bwd"] for x in b["rows"])
        print(f"  {name}: step {b['total'] / 1000:.2f} ms; layers {layers / 1000:.2f}"
              f", gradient joins {b['joins'] / 1000:.2f}, loss + update + Python {b['other'] / 1000:.2f} (medians "
              f"each, so they need not add up)")
        for kind, (f, bw, fl) in sorted(by_kind.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
            share = (f + bw) / b["total"]
            rate = 3 * fl / ((f + bw) * 1e-6) / 1e9 if f + bw else 0.0
            print(f"    {kind:<20} fwd {f / 1000:7.2f}  bwd {bw / 1000:7.2f}  {share:6.1%}  {rate:6.1f} GFLOP/s")
        top = sorted(b["rows"], key=lambda x: -(x["fwd"] + x["bwd"]))[:6]
        print("    slowest layers: " + ", ".join(f"{x['layer']} {(x['fwd'] + x['bwd']) / 1000:.2f}" for x in top))
        t = row.get("torch_ops")
        if t:
            print(f"    PyTorch (torch.profiler, ms per step, self CPU; {t['total']:.1f} in all, profiler included): "
                  + ", ".join(f"{k.replace('aten::', '')} {v:.1f}" for k, v in t["top"]))


def child(threads, reps, tiny_reps, only):
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
    if only in ("all", "tiny"):
        tiny_child(out, torch, tiny_reps)
    rng = np.random.default_rng(0)
    for name, (make_model, shape) in (model_specs().items() if only in ("all", "classic") else ()):
        x = rng.standard_normal((BATCH,) + shape).astype(np.float32)
        y = rng.integers(0, 10, BATCH).astype(np.int32)
        row = {}
        model = make_model()
        names = [layer.name for layer in model.param_layers]
        subsets = {"full": ft.Subset.full(model),
                   "sparse": ft.Subset.of(model, {names[-1]: {"rows": "all", "bias": True},
                                                  names[-2]: {"rows": 0.25, "bias": False}})}
        subsets["sparse_int8"] = subsets["sparse"]  # the same subset, frozen weights held as int8
        for label, micro in MICRO_STEPS.items():  # the same steps in micro-batches
            subsets[label] = subsets[label.rsplit("_mb", 1)[0]]
        steps, trainers = {}, {}
        for label, subset in subsets.items():
            m = make_model()
            frozen = "int8" if "_int8" in label else "float32"
            micro = MICRO_STEPS.get(label, 0)
            tr = trainers[label] = ft.Trainer(m, subset, lr=LR, momentum=MOMENTUM, frozen=frozen, micro_batch=micro)
            steps[f"engine_{label}"] = (lambda t: lambda: t.step(x, y))(tr)
            row[f"predicted_{label}"] = ft.predict_memory(m, subset, BATCH, momentum=MOMENTUM, frozen=frozen,
                                                          micro_batch=micro)["total"]
        ref = NumpyStep(make_model())
        xr = x.reshape((BATCH,) + make_model().input_shape)
        steps["numpy"] = lambda: ref(xr, y)
        if torch is not None:
            steps["torch"] = torch_step(name)(xr.copy(), y)
        # Rounds of CLASSIC_BLOCK steps of each, so load from other processes hits them alike; the
        # ratios are medians of the per-round ratios to the engine's full step.
        times, ratios = time_rounds(steps, max(1, reps // CLASSIC_BLOCK), warmup=20, block=CLASSIC_BLOCK)
        row.update(times)
        row["ratios"] = ratios
        for label, tr in trainers.items():
            row[f"memory_{label}"] = tr.memory.as_dict()
        out["models"][name] = row
    print(json.dumps(out))


def main():
    global MOMENTUM
    ap = argparse.ArgumentParser(description="Training-step benchmark: engine vs NumPy vs PyTorch")
    ap.add_argument("--reps", type=int, default=300, help="timed steps per measurement (default 300)")
    ap.add_argument("--tiny-reps", type=int, default=30, help="timed steps per MLPerf Tiny measurement (default 30)")
    ap.add_argument("--threads", default="1,all", help="comma list of thread counts, 'all' = every CPU (default 1,all)")
    ap.add_argument("--only", choices=("all", "classic", "tiny"), default="all", help="which models (default all)")
    ap.add_argument("--momentum", type=float, default=MOMENTUM,
                    help=f"SGD momentum of every implementation (default {MOMENTUM}; 0 is the TTE setting, where the "
                         "engine's step keeps no optimizer state)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    MOMENTUM = args.momentum
    if args.child is not None:
        child(args.child, args.reps, args.tiny_reps, args.only)
        return
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = [ncpu if t.strip() == "all" else int(t) for t in args.threads.split(",")]
    results = []
    for threads in settings:
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads), FTTE_NUM_THREADS=str(threads))
        print(f"measuring at {threads} thread(s) ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", str(threads), "--reps", str(args.reps),
                               "--tiny-reps", str(args.tiny_reps), "--only", args.only,
                                "--momentum", repr(args.momentum)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"child at {threads} threads failed:\n{proc.stderr}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    if args.only in ("all", "tiny"):
        print_tiny(results)
    if args.only == "tiny":
        return

    def fmt(t):
        return f"{t[0]:8.1f} [{t[1]:.0f}-{t[2]:.0f}]"

    print(f"\nTraining step, batch {BATCH}, SGD momentum {MOMENTUM}; median us [p10-p90]; "
          f"GEMM kernel: {results[0]['gemm']}; torch: {results[0]['torch'] or 'not installed (skipped)'}")
    print(f"engine full, sparse and sparse int8, NumPy and torch steps run in turn, {CLASSIC_BLOCK} steps of each "
          "per round (their median counts); 'vs' and 'time ratio' columns are medians of the per-round ratios to "
          "the engine's full step")
    print(f"{'model':<8} {'thr':>3} | {'engine full':>20} | {'numpy':>20} | {'torch':>20} | "
          f"{'vs numpy':>8} | {'vs torch':>8}")
    for r in results:
        for name, row in r["models"].items():
            e, npy = row["engine_full"], row["numpy"]
            tt = row.get("torch")
            vs_torch = f"{row['ratios']['torch']:.2f}x" if tt else "n/a"
            print(f"{name:<8} {r['threads']:>3} | {fmt(e):>20} | {fmt(npy):>20} | "
                  f"{fmt(tt) if tt else 'n/a':>20} | {row['ratios']['numpy']:>7.2f}x | {vs_torch:>8}")
    print("\nSparse step (last layer + 25% of the rows of the layer before it) against the full step")
    print(f"{'model':<8} {'thr':>3} | {'sparse us':>20} | {'time ratio':>10} | {'full mem KiB':>12} | "
          f"{'sparse mem KiB':>14} | {'mem ratio':>9} | {'predicted full/sparse KiB':>26}")
    for r in results:
        for name, row in r["models"].items():
            e, s = row["engine_full"], row["engine_sparse"]
            mf, ms = row["memory_full"]["total"], row["memory_sparse"]["total"]
            print(f"{name:<8} {r['threads']:>3} | {fmt(s):>20} | {row['ratios']['engine_sparse']:>10.2f} | "
                  f"{mf / 1024:>12.1f} | {ms / 1024:>14.1f} | {ms / mf:>9.3f} | "
                  f"{row['predicted_full'] / 1024:>12.1f} / {row['predicted_sparse'] / 1024:<11.1f}")
    print("\nThe same sparse step with int8 frozen weights (Trainer(frozen=\"int8\"): layers with no trained row "
          "held as int8 + a scale per row, the partly trained layer's frozen rows likewise)")
    print(f"{'model':<8} {'thr':>3} | {'int8 sparse us':>20} | {'time ratio':>10} | {'int8 mem KiB':>12} | "
          f"{'mem ratio':>9} | {'predicted KiB':>13}")
    for r in results:
        for name, row in r["models"].items():
            e, s = row["engine_full"], row["engine_sparse_int8"]
            mf, ms = row["memory_full"]["total"], row["memory_sparse_int8"]["total"]
            print(f"{name:<8} {r['threads']:>3} | {fmt(s):>20} | {row['ratios']['engine_sparse_int8']:>10.2f} | "
                  f"{ms / 1024:>12.1f} | "
                  f"{ms / mf:>9.3f} | {row['predicted_sparse_int8'] / 1024:>13.1f}")
    print("\nThe same steps in micro-batches (Trainer(micro_batch=m): passes of m samples, gradients summed in whole "
          "buffers, one update); ratios to the one-pass full step")
    print(f"{'model':<8} {'thr':>3} | {'step':<16} | {'us':>20} | {'time ratio':>10} | {'mem KiB':>9} | "
          f"{'mem ratio':>9} | {'predicted KiB':>13}")
    for r in results:
        for name, row in r["models"].items():
            mf = row["memory_full"]["total"]
            for label, micro in MICRO_STEPS.items():
                s, ms = row[f"engine_{label}"], row[f"memory_{label}"]["total"]
                what = f"{label.rsplit('_mb', 1)[0]}, m={micro}"
                print(f"{name:<8} {r['threads']:>3} | {what:<16} | {fmt(s):>20} | "
                      f"{row['ratios'][f'engine_{label}']:>10.2f} | {ms / 1024:>9.1f} | {ms / mf:>9.3f} | "
                      f"{row[f'predicted_{label}'] / 1024:>13.1f}")
    print("\nRecorded memory by category (KiB), 1st thread setting:")
    for name, row in results[0]["models"].items():
        for label in ("full", "sparse", "sparse_int8") + tuple(MICRO_STEPS):
            m = row[f"memory_{label}"]
            print(f"  {name:<8} {label:<15} " + "  ".join(f"{k}={v / 1024:.1f}" for k, v in m.items()))


if __name__ == "__main__":
    main()
