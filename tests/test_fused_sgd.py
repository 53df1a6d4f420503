"""Backward with the SGD update fused in (no gradient buffers): the dense and conv kernels against
a float64 NumPy reference (with and without momentum and weight decay, row subsets, several
gradient tiles), thread-count invariance, errors, and the trainer's fused step against the
buffered path (gradients() + sgd_update_rows) over a few steps, with memory predicted exactly."""
import numpy as np
import pytest

import ftte_core as ft
from ftte_core import _kernels as K
from test_conv import out_size, ref_backward

from dag_models import tiny_resnet

TOL = dict(rtol=2e-5, atol=2e-5)


def sgd_ref(p, rows, g, v, lr, momentum, wd):
    """PyTorch SGD on p's rows (float64): returns new p (and new v, or None)."""
    p = p.astype(np.float64).copy()
    idx = np.arange(p.shape[0]) if rows is None else rows
    d = g.astype(np.float64) + wd * p[idx]
    if momentum:
        v = momentum * v.astype(np.float64) + d
        d = v
    p[idx] -= lr * d
    return p, v


def dense_case(rng, N, I, O, rows):
    x = rng.standard_normal((N, I)).astype(np.float32)
    w = rng.standard_normal((O, I)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    dy = rng.standard_normal((N, O)).astype(np.float32)
    R = O if rows is None else len(rows)
    vw = rng.standard_normal((R, I)).astype(np.float32)
    vb = rng.standard_normal(O).astype(np.float32)
    return x, w, b, dy, vw, vb


# (N, I, O, rows): R * I * 4 over 32 KiB takes several tiles (784: 16 rows per tile)
DENSE = [(5, 7, 6, None), (32, 784, 40, None), (32, 784, 40, "some"), (3, 64, 300, "some"), (4, 9, 5, "none"),
         (1, 2000, 20, None)]


@pytest.mark.parametrize("case", DENSE)
@pytest.mark.parametrize("momentum,wd,bias", [(0.0, 0.0, True), (0.9, 1e-3, True), (0.9, 0.0, False)])
def test_dense_backward_sgd_matches_numpy(case, momentum, wd, bias):
    N, I, O, which = case
    rng = np.random.default_rng(N * 1000 + I + O)
    rows = {None: None, "some": np.sort(rng.choice(O, size=max(1, O // 3), replace=False)).astype(np.int32),
            "none": np.zeros(0, np.int32)}[which]
    x, w, b, dy, vw, vb = dense_case(rng, N, I, O, rows)
    lr = 0.05
    idx = np.arange(O) if rows is None else rows
    dx_ref = dy.astype(np.float64) @ w.astype(np.float64)
    dw_ref = dy.astype(np.float64)[:, idx].T @ x.astype(np.float64)
    w_ref, vw_ref = sgd_ref(w, idx, dw_ref, vw, lr, momentum, wd)
    b_ref, vb_ref = sgd_ref(b, None, dy.astype(np.float64).sum(0), vb, lr, momentum, wd)
    dx = np.empty((N, I), np.float32)
    b0 = b.copy()
    K.dense_backward_sgd(x, w, b, dy, rows, dx, bias, vw if momentum else None, vb if momentum and bias else None,
                         lr, momentum, wd)
    np.testing.assert_allclose(dx, dx_ref, **TOL)
    np.testing.assert_allclose(w, w_ref, **TOL)
    if momentum:
        np.testing.assert_allclose(vw, vw_ref, **TOL)
    if bias:
        np.testing.assert_allclose(b, b_ref, **TOL)
        if momentum:
            np.testing.assert_allclose(vb, vb_ref, **TOL)
    else:
        np.testing.assert_array_equal(b, b0)


def test_dense_backward_sgd_equals_buffered_kernels():
    """The fused call and dense_backward + sgd_update_rows (today's path) agree."""
    rng = np.random.default_rng(3)
    rows = np.sort(rng.choice(128, size=50, replace=False)).astype(np.int32)
    x, w, b, dy, vw, vb = dense_case(rng, 32, 784, 128, rows)
    w2, b2, vw2, vb2 = w.copy(), b.copy(), vw.copy(), vb.copy()
    dx, dx2 = np.empty((32, 784), np.float32), np.empty((32, 784), np.float32)
    K.dense_backward_sgd(x, w, b, dy, rows, dx, True, vw, vb, 0.1, 0.9, 1e-4)
    dw, db = np.empty((50, 784), np.float32), np.empty(128, np.float32)
    K.dense_backward(None, w2, dy, None, None, db, None)
    K.dense_backward(x, w2, dy, rows, dw, None, dx2)
    K.sgd_update_rows(w2, rows, dw, vw2, 0.1, 0.9, 1e-4)
    K.sgd_update_rows(b2, None, db, vb2, 0.1, 0.9, 1e-4)
    for got, want in ((w, w2), (b, b2), (vw, vw2), (vb, vb2), (dx, dx2)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def conv_case(rng, N, C, H, W, OC, k, R):
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((OC, C, k, k)).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    vw = rng.standard_normal((R, C, k, k)).astype(np.float32)
    vb = rng.standard_normal(OC).astype(np.float32)
    return x, w, b, vw, vb


# (N, C, H, W, OC, k, stride, pad, rows): 120 channels of 64x3x3 take two 256 KiB gradient tiles
CONV = [(2, 3, 7, 6, 5, 3, (1, 1), (1, 1, 1, 1), None), (3, 4, 9, 8, 6, 3, (2, 1), (1, 0, 2, 1), "some"),
        (2, 5, 6, 7, 4, 1, (1, 1), (0, 0, 0, 0), "some"), (2, 64, 4, 4, 120, 3, (1, 1), (1, 1, 1, 1), None),
        (2, 64, 4, 4, 120, 3, (1, 1), (1, 1, 1, 1), "some"), (1, 2, 5, 5, 3, 3, (1, 1), (0, 0, 0, 0), "none")]


@pytest.mark.parametrize("case", CONV)
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 1e-3)])
def test_conv2d_backward_sgd_matches_numpy(case, momentum, wd):
    N, C, H, W, OC, k, stride, pad, which = case
    rng = np.random.default_rng(N + C * 10 + OC)
    rows = {None: None, "some": np.sort(rng.choice(OC, size=max(1, (OC * 3) // 4), replace=False)).astype(np.int32),
            "none": np.zeros(0, np.int32)}[which]
    idx = np.arange(OC) if rows is None else rows
    x, w, b, vw, vb = conv_case(rng, N, C, H, W, OC, k, len(idx))
    OH, OW = out_size(H, k, stride[0], pad[0], pad[2]), out_size(W, k, stride[1], pad[1], pad[3])
    dy = rng.standard_normal((N, OC, OH, OW)).astype(np.float32)
    dx_ref, dw_ref, db_ref = ref_backward(x, w, dy, stride, pad)
    lr = 0.01
    w_ref, vw_ref = sgd_ref(w, idx, dw_ref[idx], vw, lr, momentum, wd)
    b_ref, vb_ref = sgd_ref(b, None, db_ref, vb, lr, momentum, wd)
    dx = np.empty_like(x)
    K.conv2d_backward_sgd(x, w, b, dy, rows, dx, True, vw if momentum else None, vb if momentum else None,
                          lr, momentum, wd, stride, pad)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, dx_ref, **tol)
    np.testing.assert_allclose(w, w_ref, **tol)
    np.testing.assert_allclose(b, b_ref, **tol)
    if momentum:
        np.testing.assert_allclose(vw, vw_ref, **tol)
        np.testing.assert_allclose(vb, vb_ref, **tol)


def test_fused_kernels_thread_count_bit_identical():
    rng = np.random.default_rng(11)
    rows = np.array([1, 4, 5, 9, 15, 30, 31, 47, 60, 99], np.int32)
    xd, wd, bd, dyd, vwd, vbd = dense_case(rng, 32, 784, 100, rows)
    xc, wc, bc, vwc, vbc = conv_case(rng, 5, 64, 6, 6, 120, 3, 120)
    dyc = rng.standard_normal((5, 120, 6, 6)).astype(np.float32)
    outs = []
    try:
        for t in (1, 2, 3):
            K.set_num_threads(t)
            arrs = [a.copy() for a in (wd, bd, vwd, vbd, wc, bc, vwc, vbc)]
            dxd, dxc = np.empty_like(xd), np.empty_like(xc)
            K.dense_backward_sgd(xd, arrs[0], arrs[1], dyd, rows, dxd, True, arrs[2], arrs[3], 0.1, 0.9, 1e-4)
            K.conv2d_backward_sgd(xc, arrs[4], arrs[5], dyc, None, dxc, True, arrs[6], arrs[7], 0.1, 0.9, 1e-4,
                                  1, 1)
            outs.append(arrs + [dxd, dxc])
    finally:
        K.set_num_threads(0)
    for one, other in zip(outs[0], outs[1]):
        np.testing.assert_array_equal(one, other)
    for one, other in zip(outs[0], outs[2]):
        np.testing.assert_array_equal(one, other)


def test_fused_kernel_scratch_is_bounded_and_reported():
    """The weight gradient lives in tiles: scratch stays near the cap whatever the layer's size."""
    rng = np.random.default_rng(2)
    x, w, b, dy, _, _ = dense_case(rng, 32, 784, 256, None)
    K.set_num_threads(1)
    try:
        K.reset_workspace_peak()
        base = K.workspace_current_bytes()
        K.dense_backward_sgd(x, w, b, dy, None, None, True, None, None, 0.1)
        got = K.workspace_peak_bytes() - base
    finally:
        K.set_num_threads(0)
    assert got == K.dense_backward_sgd_scratch_bytes(32, 784, 256, 256, False, True, False)
    assert got < 64 * 1024 < 256 * 784 * 4  # the whole gradient would be 784 KiB
    assert K.conv2d_backward_sgd_scratch_bytes((2, 64, 4, 4), (120, 64, 3, 3), 1, 1, None, True, True, 1) > 0


def test_fused_kernel_errors():
    rng = np.random.default_rng(0)
    x, w, b, dy, vw, vb = dense_case(rng, 4, 6, 5, None)
    with pytest.raises(ValueError, match="dense_backward_sgd: vw is required when momentum != 0"):
        K.dense_backward_sgd(x, w, b, dy, None, None, True, None, vb, 0.1, 0.9)
    with pytest.raises(ValueError, match="dense_backward_sgd: rows holds 2 more than once"):
        K.dense_backward_sgd(x, w, b, dy, np.array([2, 2], np.int32), None, False, None, None, 0.1)
    with pytest.raises(ValueError, match="dense_backward_sgd: w must be writable"):
        ro = w.copy()
        ro.flags.writeable = False
        K.dense_backward_sgd(x, ro, b, dy, None, None, False, None, None, 0.1)
    with pytest.raises(ValueError, match="dense_backward_sgd: dx must not share memory with x"):
        K.dense_backward_sgd(x, w, b, dy, None, x[:, :6], False, None, None, 0.1)
    with pytest.raises(ValueError, match="dense_backward_sgd: x is required"):
        K.dense_backward_sgd(None, w, b, dy, None, None, False, None, None, 0.1)
    xc, wc, bc, vwc, vbc = conv_case(rng, 2, 3, 5, 5, 4, 3, 4)
    dyc = np.zeros((2, 4, 3, 3), np.float32)
    with pytest.raises(ValueError, match="conv2d_backward_sgd: vb is required when momentum != 0"):
        K.conv2d_backward_sgd(xc, wc, bc, dyc, None, None, True, vwc, None, 0.1, 0.9)
    with pytest.raises(ValueError, match="conv2d_backward_sgd: dy has shape"):
        K.conv2d_backward_sgd(xc, wc, bc, np.zeros((2, 4, 2, 3), np.float32), None, None, False, None, None, 0.1)
    with pytest.raises(ValueError, match="conv2d_backward_sgd: w and vw share memory"):
        K.conv2d_backward_sgd(xc, wc, bc, dyc, None, None, False, wc, None, 0.1, 0.9)


# -- the trainer -------------------------------------------------------------------------------------

def _separable():
    """Conv, batch norm, depthwise (multiplier 2), grouped 1x1 and a dense head: the layers whose
    gradients go through the shared buffer, next to fused ones."""
    from ftte_core.graph import BatchNorm, Conv2d, Dense, Flatten, GlobalAvgPool, Model, ReLU
    rng = np.random.default_rng(7)

    def r(*shape):
        return (rng.standard_normal(shape) * 0.4).astype(np.float32)

    return Model([Conv2d("c0", r(4, 2, 3, 3), r(4), padding=(1, 1, 1, 1)), BatchNorm("bn0", 1 + r(4), r(4), r(4),
                  1 + np.abs(r(4))), ReLU("r0"), Conv2d("dw", r(8, 1, 3, 3), r(8), padding=(1, 1, 1, 1), group=4),
                  ReLU("r1"), Conv2d("pw", r(6, 4, 1, 1), r(6), group=2), GlobalAvgPool("gap"), Flatten("fl"),
                  Dense("head", r(10, 6), r(10))], (2, 6, 6))


def _models():
    cnn = ft.zoo("cnn", (1, 12, 12), 10, seed=0)
    mlp = ft.zoo("mlp", (64,), 10, seed=0, hidden=(32, 32))
    res = tiny_resnet((1, 8, 8), 10, width=8, seed=0)  # batch norm: the shared-buffer path
    return {"mlp": mlp, "cnn": cnn, "resnet": res, "separable": _separable()}


def _subset(model, which):
    names = [l.name for l in model.param_layers]
    if which == "full":
        return ft.Subset.full(model)
    spec = {names[-1]: {"rows": "all", "bias": True}}
    for n in names[-4:-1]:
        spec[n] = {"rows": 0.5, "bias": which == "sparse"}
    return ft.Subset.of(model, spec)


def buffered_steps(model, subset, x, y, steps, lr, momentum, wd, frozen="float32"):
    """Today's path: whole gradients (Trainer.gradients), then sgd_update_rows per tensor."""
    tr = ft.Trainer(model, subset, lr=lr, momentum=momentum, weight_decay=wd, frozen=frozen)
    vel = {}
    losses = []
    for _ in range(steps):
        loss, grads = tr.gradients(x, y)
        losses.append(loss)
        for layer in model.param_layers:
            ls = subset.get(layer.name)
            if ls is None:
                continue
            if ls.rows.size:
                g = grads[f"{layer.name}.weight"]
                v = vel.setdefault((layer.name, "w"), np.zeros_like(g)) if momentum else None
                K.sgd_update_rows(layer.weight.reshape(layer.weight.shape[0], -1), ls.rows, g, v, lr, momentum, wd)
            if ls.bias:
                g = grads[f"{layer.name}.bias"].reshape(-1)
                v = vel.setdefault((layer.name, "b"), np.zeros_like(g)) if momentum else None
                K.sgd_update_rows(layer.bias, None, g, v, lr, momentum, wd)
    return losses


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "separable"])
@pytest.mark.parametrize("which", ["full", "sparse", "rows"])
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 1e-3)])
def test_fused_step_follows_the_buffered_trajectory(name, which, momentum, wd):
    base = _models()[name]
    subset = _subset(base, which)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16,) + base.input_shape).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    fused_model, ref_model = base.copy(), base.copy()
    tr = ft.Trainer(fused_model, subset, lr=0.05, momentum=momentum, weight_decay=wd)
    assert tr.fused
    losses = [tr.step(x, y) for _ in range(4)]
    ref_losses = buffered_steps(ref_model, subset, x, y, 4, 0.05, momentum, wd)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, atol=1e-5)
    for a, b in zip(fused_model.param_layers, ref_model.param_layers):
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-4, atol=1e-5, err_msg=a.name)
        np.testing.assert_allclose(a.bias, b.bias, rtol=1e-4, atol=1e-5, err_msg=a.name)
    # the step keeps no whole gradients; without momentum no optimizer state either
    mem = tr.memory
    assert mem.optimizer_state == (0 if momentum == 0 else mem.trainable_weights)
    if name in ("mlp", "cnn"):
        assert mem.gradients == 0
    # exact prediction at one thread
    K.set_num_threads(1)
    try:
        tr1 = ft.Trainer(base.copy(), subset, lr=0.05, momentum=momentum, weight_decay=wd)
        tr1.step(x, y)
    finally:
        K.set_num_threads(0)
    want = ft.predict_memory(base, subset, batch_size=16, momentum=momentum, threads=1)
    assert want == tr1.memory.as_dict()


def test_gradients_still_work_after_fused_steps_and_leave_weights_alone():
    model = ft.zoo("mlp", (64,), 10, seed=0, hidden=(32,))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int32)
    tr = ft.Trainer(model, momentum=0.9)
    tr.step(x, y)
    before = [l.weight.copy() for l in model.param_layers]
    loss, grads = tr.gradients(x, y)
    for b, l in zip(before, model.param_layers):
        np.testing.assert_array_equal(b, l.weight)
    assert set(grads) == {f"{l.name}.{t}" for l in model.param_layers for t in ("weight", "bias")}
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    tr.step(x, y)  # and training goes on fused
    assert not tr._buffered


def test_tied_weights_fall_back_to_buffered_gradients():
    """Two layers reading one weight array: the upper layer's update must not reach the lower
    layer's input gradient within the step, so the step keeps whole gradients."""
    from ftte_core.graph import Dense, Model, ReLU
    rng = np.random.default_rng(0)
    shared = (rng.standard_normal((16, 16)) * 0.3).astype(np.float32)
    head = (rng.standard_normal((10, 16)) * 0.3).astype(np.float32)

    def make():
        w = shared.copy()
        return Model([Dense("d0", rng.standard_normal((16, 16)).astype(np.float32) * 0.3), ReLU("r0"),
                      Dense("d1", w), ReLU("r1"), Dense("d2", w), ReLU("r2"), Dense("out", head.copy())], (16,))

    model = make()
    assert model.layers[2].weight is model.layers[4].weight
    subset = ft.Subset.full(model)
    assert not ft.plan.fused_update(model, subset)
    tr = ft.Trainer(model, subset, lr=0.05)
    assert not tr.fused
    x = rng.standard_normal((8, 16)).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int32)
    tr.step(x, y)
    assert tr.memory.gradients > 0
    assert ft.predict_memory(model, subset, 8)["gradients"] == tr.memory.gradients


def test_int8_layer_trains_its_bias_through_the_shared_buffer():
    """frozen="int8": a layer whose rows do not train is int8 and only its bias may train; its
    backward has no fused kernel (the weight is int8), so the bias goes through the shared buffer."""
    base = ft.zoo("mlp", (64,), 10, seed=0, hidden=(32, 32))
    names = [l.name for l in base.param_layers]
    subset = ft.Subset.of(base, {names[-1]: {"rows": "all", "bias": True}, names[-2]: {"rows": None, "bias": True}})
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    fused_model, ref_model = base.copy(), base.copy()
    K.set_num_threads(1)
    try:
        tr = ft.Trainer(fused_model, subset, lr=0.05, momentum=0.9, frozen="int8")
        assert fused_model.layer(names[-2]).is_int8 and tr.fused
        losses = [tr.step(x, y) for _ in range(3)]
    finally:
        K.set_num_threads(0)
    ref = buffered_steps(ref_model, subset, x, y, 3, 0.05, 0.9, 0.0, frozen="int8")
    np.testing.assert_allclose(losses, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(fused_model.param_layers, ref_model.param_layers):
        np.testing.assert_allclose(a.bias, b.bias, rtol=1e-4, atol=1e-5, err_msg=a.name)
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-4, atol=1e-5, err_msg=a.name)
    want = ft.predict_memory(base, subset, batch_size=16, momentum=0.9, threads=1, frozen="int8")
    assert want == tr.memory.as_dict()
    assert tr.memory.gradients == 32 * 4  # the int8 layer's bias, in the shared buffer
