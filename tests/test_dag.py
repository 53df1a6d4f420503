"""Training on DAG models: gradients through every path, partial subsets, memory predicted = allocated."""
import numpy as np
import pytest

import ftte_core as ft
from ftte_core import _kernels as K
from ftte_core import graph as G
from ftte_core.plan import build


def _conv(rng, name, oc, ic, k, group=1, stride=1, pad=0):
    w = rng.standard_normal((oc, ic // group, k, k)).astype(np.float32) * np.sqrt(2.0 / (ic // group * k * k))
    return G.Conv2d(name, w, rng.standard_normal(oc).astype(np.float32) * 0.1, (stride, stride), (pad,) * 4, group)


def _bn(rng, name, c):
    return G.BatchNorm(name, 1 + 0.2 * rng.standard_normal(c), 0.1 * rng.standard_normal(c),
                       0.1 * rng.standard_normal(c), 0.5 + rng.random(c), 1e-5)


def rich_dag(seed=0):
    """Every layer kind of the 2-D graph in one small DAG: a residual join, a depthwise conv, an
    SE-style product, a concat, padding, grouped conv and batch norm after a dense layer."""
    rng = np.random.default_rng(seed)
    layers, inputs = [], []

    def add(layer, *ins):
        layers.append(layer)
        inputs.append(ins)
        return len(layers)  # value id of its output

    c1 = add(_conv(rng, "c1", 4, 2, 3, pad=1), 0)
    b1 = add(_bn(rng, "b1", 4), c1)
    r1 = add(G.ReLU("r1"), b1)
    dw = add(_conv(rng, "dw", 4, 4, 3, group=4, pad=1), r1)
    b2 = add(_bn(rng, "b2", 4), dw)
    cl = add(G.Clip("relu6", 0.0, 6.0), b2)
    pw = add(_conv(rng, "pw", 4, 4, 1), cl)
    sm = add(G.Binary("join", "add"), pw, r1)
    lr = add(G.LeakyReLU("lrelu", 0.1), sm)
    gp = add(G.GlobalAvgPool("squeeze"), lr)
    sg = add(G.Sigmoid("gate"), gp)
    se = add(G.Binary("excite", "mul"), lr, sg)
    cat = add(G.Concat("cat"), se, r1)
    pad = add(G.Pad("pad", (0, 1, 1, 0, 1, 1)), cat)
    mp = add(G.MaxPool2d("pool", (2, 2)), pad)
    hs = add(G.HardSwish("hswish"), mp)
    gc = add(_conv(rng, "gconv", 4, 8, 3, group=2), hs)
    sub = add(G.Binary("shift", "sub", const=rng.standard_normal((4, 1, 1)).astype(np.float32)), gc)
    fl = add(G.Flatten("flat"), sub)
    d1 = add(G.Dense("fc1", rng.standard_normal((8, 16)).astype(np.float32) * 0.3), fl)
    b3 = add(_bn(rng, "bn_fc", 8), d1)
    th = add(G.Tanh("tanh"), b3)
    add(G.Dense("fc2", rng.standard_normal((3, 8)).astype(np.float32) * 0.5), th)
    return G.Model(layers, (2, 6, 6), "rich", inputs)


def conv1d_dag(seed=1):
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((6, 3, 5)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((6, 2, 3)).astype(np.float32) * 0.3
    layers = [G.Conv1d("c1", w1, None, (1,), (2, 2)), _bn(rng, "b1", 6), G.ReLU("r1"),
              G.MaxPool2d("mp", (2,)), G.Conv1d("c2", w2, None, (1,), (1, 1), group=3), G.HardSigmoid("hsig", 0.2, 0.5),
              G.Binary("res", "add"), G.AvgPool2d("ap", (2,), padding=(0, 0)), G.GlobalAvgPool("gap", keepdims=False),
              G.Dense("fc", rng.standard_normal((4, 6)).astype(np.float32))]
    inputs = [(0,), (1,), (2,), (3,), (4,), (5,), (6, 4), (7,), (8,), (9,)]
    return G.Model(layers, (3, 16), "sensor", inputs)


def _data(model, n=6, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + model.input_shape).astype(np.float32)
    y = rng.integers(0, model.num_classes, n).astype(np.int32)
    return x, y


def _loss64(model, x, y) -> float:
    logits = model.forward(model.check_input(x)).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


@pytest.mark.parametrize("make", [rich_dag, conv1d_dag])
def test_dag_gradients_match_finite_differences(make):
    model = make()
    x, y = _data(model)
    _, grads = ft.Trainer(model, ft.Subset.full(model)).gradients(x, y)
    rng = np.random.default_rng(0)
    checked = 0
    for layer in model.param_layers:
        for what, arr in (("weight", layer.weight), ("bias", layer.bias)):
            g = grads[f"{layer.name}.{what}"].reshape(-1)
            flat = arr.reshape(-1)
            picks = set(np.argsort(-np.abs(g))[:2].tolist()) | set(rng.integers(0, flat.size, 2).tolist())
            for k in picks:
                old = flat[k]
                eps = 3e-3
                flat[k] = old + eps
                up = _loss64(model, x, y)
                flat[k] = old - eps
                down = _loss64(model, x, y)
                flat[k] = old
                fd = (up - down) / (2 * eps)
                assert abs(fd - g[k]) <= 2e-3 + 3e-2 * abs(fd), (layer.name, what, k, fd, g[k])
                checked += 1
    assert checked > 20


def _rows_grad(model, subset, x, y):
    _, grads = ft.Trainer(model, subset).gradients(x, y)
    return grads


@pytest.mark.parametrize("train", [["dw"], ["b2"], ["pw", "c1"], ["gconv"], ["bn_fc"], ["c1"], ["b1", "fc2"]])
def test_partial_subsets_reach_their_layers_through_every_path(train):
    """A subset that starts in the middle of a residual block (or trains only batch-norm scales)
    gets exactly the gradient the full model computes for those rows."""
    model = rich_dag()
    x, y = _data(model)
    full = _rows_grad(model, ft.Subset.full(model), x, y)
    spec = {}
    for name in train:
        n_rows = model.layer(name).weight.shape[0]
        spec[name] = {"rows": [r for r in range(n_rows) if r % 2 == 0], "bias": True}
    part = _rows_grad(model, ft.Subset.of(model, spec), x, y)
    for name in train:
        rows = spec[name]["rows"]
        np.testing.assert_allclose(part[f"{name}.weight"], full[f"{name}.weight"][rows], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(part[f"{name}.bias"], full[f"{name}.bias"], rtol=2e-5, atol=1e-6)


SUBSETS = [None, {"fc2": {"rows": "all", "bias": True}}, {"dw": {"rows": [1, 3], "bias": True}},
           {"b2": {"rows": None, "bias": True}}, {"pw": {"rows": 0.5, "bias": False}, "fc1": {"rows": "all", "bias": True}},
           {"gconv": {"rows": [0, 3], "bias": True}, "bn_fc": {"rows": "all", "bias": False}}]


@pytest.mark.parametrize("spec", SUBSETS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_memory_prediction_equals_what_the_trainer_allocates(spec, momentum):
    model = rich_dag()
    subset = ft.Subset.full(model) if spec is None else ft.Subset.of(model, spec)
    x, y = _data(model, n=10)
    tr = ft.Trainer(model, subset, momentum=momentum, prefix_chunk=4)
    K.set_num_threads(1)  # kernel scratch is exact at one thread, an upper bound on more
    try:
        tr.step(x, y)
    finally:
        K.set_num_threads(0)
    got = tr.memory.as_dict()
    want = ft.predict_memory(model, subset, batch_size=10, momentum=momentum, threads=1, prefix_chunk=4)
    for cat in ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "activations"):
        assert got[cat] == want[cat], (cat, got, want)
    assert abs(got["workspace"] - want["workspace"]) <= 0.1 * want["workspace"], (got, want)


def test_plan_keeps_only_what_backward_reads():
    model = rich_dag()
    # only the last dense layer trains: everything before it is frozen and runs in chunks
    plan = build(model, ft.Subset.of(model, {"fc2": {"rows": "all", "bias": True}}), 16, prefix_chunk=4)
    kept = {k for k, (_, _, cat) in plan.fixed.items() if cat == "activations"}
    # fc1's output: bn_fc and tanh run in place over it
    assert kept == {("value", model.index("fc1") + 1), ("loss", "probs")}, kept
    # training the depthwise conv keeps its input (the ReLU's output, shared with the residual path)
    plan = build(model, ft.Subset.of(model, {"dw": {"rows": "all", "bias": False}}), 16)
    kept = {k[1] for k, (_, _, cat) in plan.fixed.items() if cat == "activations" and k[0] == "value"}
    # the frozen b1 and r1 run in place over c1's output, so that one buffer is what stays
    assert model.index("c1") + 1 in kept
    assert model.index("b1") + 1 not in kept and model.index("r1") + 1 not in kept


def test_loss_falls_on_a_dag():
    model = rich_dag(seed=5)
    x, y = _data(model, n=24, seed=9)
    tr = ft.Trainer(model, lr=0.05)
    first = tr.step(x, y)
    for _ in range(60):
        last = tr.step(x, y)
    assert last < 0.6 * first, (first, last)


def test_same_value_twice_into_one_layer():
    """Mul(x, x): both operands are one value; its gradient is the sum of both contributions."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    layers = [G.Dense("d0", rng.standard_normal((4, 4)).astype(np.float32)), G.Binary("sq", "mul"), G.Dense("d1", w)]
    model = G.Model(layers, (4,), "square", [(0,), (1, 1), (2,)])
    x, y = _data(model)
    _, grads = ft.Trainer(model).gradients(x, y)
    # reference by hand: h = x W0^T + b0, s = h*h, z = s W1^T + b1
    h = x @ layers[0].weight.T + layers[0].bias
    z = (h * h) @ w.T + layers[2].bias
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = p.copy()
    dz[np.arange(len(y)), y] -= 1
    dz /= len(y)
    dh = (dz @ w) * 2 * h
    np.testing.assert_allclose(grads["d0.weight"], dh.T @ x, rtol=1e-4, atol=1e-6)


def test_frozen_branch_is_not_differentiated():
    """A branch with nothing trainable upstream gets no gradient buffers (only the trained path)."""
    model = rich_dag()
    subset = ft.Subset.of(model, {"pw": {"rows": "all", "bias": True}})
    plan = build(model, subset, 8)
    backward_layers = {getattr(fn, "__self__", None).name for fn, _ in plan.backward if hasattr(fn, "__self__")
                       and isinstance(fn.__self__, G.Layer)}
    assert "c1" not in backward_layers and "dw" not in backward_layers
    assert "pw" in backward_layers and "fc2" in backward_layers


def test_mul_where_only_one_operand_leads_to_training():
    """x * gate(x') where only the gate's branch trains: backward needs the other operand only."""
    rng = np.random.default_rng(4)
    layers = [G.Dense("feat", rng.standard_normal((6, 5)).astype(np.float32)),
              G.Dense("gate_fc", rng.standard_normal((6, 5)).astype(np.float32)), G.Sigmoid("gate"),
              G.Binary("gated", "mul"), G.Dense("head", rng.standard_normal((3, 6)).astype(np.float32))]
    model = G.Model(layers, (5,), "gated", [(0,), (0,), (2,), (1, 3), (4,)])
    x, y = _data(model)
    full = _rows_grad(model, ft.Subset.full(model), x, y)
    for train in ("gate_fc", "feat"):
        part = _rows_grad(model, ft.Subset.of(model, {train: {"rows": "all", "bias": True}}), x, y)
        np.testing.assert_allclose(part[f"{train}.weight"], full[f"{train}.weight"], rtol=1e-5, atol=1e-7)
        copy = model.copy()
        tr = ft.Trainer(copy, ft.Subset.of(copy, {train: {"rows": "all", "bias": True}}))
        tr.step(x, y)
        assert tr.memory.total == pytest.approx(ft.predict_memory(copy, tr.subset, batch_size=len(x))["total"], rel=0.1)


def _forward_calls(plan, layer):
    return sum(1 for fn, _args in plan.forward if getattr(fn, "__self__", None) is layer)


def test_frozen_prefix_runs_in_chunks_only_when_that_saves_a_buffer():
    # MLP: the frozen fc1's output is the trained fc2's input, held for the whole batch anyway,
    # so chunks would save nothing: one pass
    mlp = ft.zoo("mlp", (12,), 5, seed=0, hidden=(16, 16))
    names = [layer.name for layer in mlp.param_layers]
    sub = ft.Subset.of(mlp, {names[-1]: {"rows": "all", "bias": True}, names[-2]: {"rows": 0.25, "bias": False}})
    plan = build(mlp, sub, 16, prefix_chunk=4)
    assert _forward_calls(plan, mlp.layer(names[0])) == 1
    # and it trains as a chunked prefix would: same losses, same weights (up to rounding)
    x = np.random.default_rng(1).standard_normal((16, 12)).astype(np.float32)
    y = np.arange(16, dtype=np.int32) % 5
    trained = []
    for chunk in (4, 16):
        m = ft.zoo("mlp", (12,), 5, seed=0, hidden=(16, 16))
        tr = ft.Trainer(m, sub, lr=0.1, momentum=0.9, prefix_chunk=chunk)
        losses = [tr.step(x, y) for _ in range(3)]
        trained.append((losses, m.layer(names[-2]).weight.copy()))
    np.testing.assert_allclose(trained[0][0], trained[1][0], rtol=1e-6)
    np.testing.assert_allclose(trained[0][1], trained[1][1], rtol=1e-5, atol=1e-7)
    # CNN: conv1's output goes through ReLU and pooling before the trained conv2 reads it, so a
    # chunk's conv1 output is scratch of chunk size: the prefix still runs in chunks
    cnn = ft.zoo("cnn", (1, 8, 8), 3, seed=0, channels=(4, 4))
    names = [layer.name for layer in cnn.param_layers]
    sub = ft.Subset.of(cnn, {names[-1]: {"rows": "all", "bias": True}, names[-2]: {"rows": 0.25, "bias": False}})
    assert _forward_calls(build(cnn, sub, 16, prefix_chunk=4), cnn.layer(names[0])) == 4
