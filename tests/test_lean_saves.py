"""Saved state as small as backward needs: ReLU keeps a bit mask, MaxPool a uint8 window position.

Each model is also built with the previous layers (ReLU keeping its float32 output, MaxPool its
int32 plane index) as the reference: the recorded activations differ by exactly what the shapes
say, the cost model still predicts the recorded bytes, and the gradients are the same.
"""
import numpy as np
import pytest

import ftte_core as ft
from ftte_core import _kernels as K
from ftte_core.graph import Dense, Flatten, MaxPool2d, Model, ReLU, Conv2d
from ftte_core import plan
from ftte_core.plan import parameter_buffers

from np_reference import loss_and_grads


class FloatReLU(ReLU):
    """The previous ReLU: backward reads the float output."""

    saves_output = True

    def saved_buffers(self, n, in_shapes, out_shape):
        return {}

    def forward(self, x, y, scope=None):
        K.relu_forward(x, y)

    def backward(self, x, y, dy, dx, scope):
        K.relu_backward(y, dy, dx)


class Int32MaxPool(MaxPool2d):
    """The previous MaxPool: int32 argmax, the flat index in the input plane."""

    argmax_dtype = np.int32


def with_previous_layers(model: Model) -> Model:
    ref = model.copy()
    for i, layer in enumerate(ref.layers):
        if type(layer) is ReLU:
            ref.layers[i] = FloatReLU(layer.name)
        elif type(layer) is MaxPool2d:
            ref.layers[i] = Int32MaxPool(layer.name, layer.kernel, layer.stride, layer.padding, layer.ceil_mode)
    return ref


def _batch(model, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + model.input_shape).astype(np.float32)
    y = rng.integers(0, model.num_classes, n).astype(np.int32)
    return x, y


def _step(model, subset, x, y):
    K.set_num_threads(1)
    try:
        tr = ft.Trainer(model, subset, lr=0.1)  # gradients() updates nothing
        loss, grads = tr.gradients(x, y)
    finally:
        K.set_num_threads(0)
    want = ft.predict_memory(model, subset, batch_size=x.shape[0], momentum=0.0, threads=1)
    got = tr.memory.as_dict()
    for cat in ("frozen_weights", "trainable_weights", "optimizer_state", "activations"):
        assert want[cat] == got[cat], (cat, want, got)
    # gradients() keeps whole gradients (the step, which predict_memory describes, keeps none)
    whole = parameter_buffers(model, subset, 0.0, fused=False).values()
    assert got["gradients"] == sum(int(np.prod(shape)) * 4 for shape, _, _ in whole)
    return tr, loss, grads


N = 16  # not a multiple of 8 of every per-sample size below: masks end in partial bytes


def _cnn():
    return ft.zoo("cnn", (1, 8, 8), 4, seed=2, channels=(3, 5))  # conv1 relu1 pool1 conv2 relu2 pool2 fc1


def _mlp():
    return ft.zoo("mlp", (20,), 5, seed=1, hidden=(24, 13))  # fc1 relu1 fc2 relu2 fc3


def _bits(n):
    return (n + 7) // 8


# (model, subset spec or None for full, the activation bytes the new layers save over the previous)
CASES = {
    # relu1/relu2 outputs feed pools only: float32 -> bits; both pools' argmax int32 -> uint8
    "cnn full": (_cnn, None,
                 N * 3 * 8 * 8 * 4 - _bits(N * 3 * 8 * 8) + N * 5 * 4 * 4 * 4 - _bits(N * 5 * 4 * 4)
                 + 3 * N * 3 * 4 * 4 + 3 * N * 5 * 2 * 2),
    # conv1's block is frozen (keeps nothing either way); conv2 trains 2 of 5 channels
    "cnn sparse": (_cnn, {"fc1": {"rows": "all", "bias": True}, "conv2": {"rows": [0, 3], "bias": True}},
                   N * 5 * 4 * 4 * 4 - _bits(N * 5 * 4 * 4) + 3 * N * 5 * 2 * 2),
    # every ReLU output is a trained Dense's input, kept as float anyway: backward reads it, no mask
    "mlp full": (_mlp, None, 0),
    # only biases train above fc1: no weight gradient reads a ReLU output, the masks replace them
    "mlp bias above": (_mlp, {"fc1": {"rows": "all", "bias": True}, "fc2": {"rows": None, "bias": True},
                              "fc3": {"rows": None, "bias": True}},
                       N * 24 * 4 - _bits(N * 24) + N * 13 * 4 - _bits(N * 13)),
}


@pytest.mark.parametrize("case", CASES)
def test_activations_shrink_by_the_shapes_and_gradients_are_unchanged(case, monkeypatch):
    # the layers' own saved state: no ReLU fused into its pool (its mask would not exist at all;
    # test_relu_pool_fusion.py covers that)
    monkeypatch.setattr(plan, "FUSE_RELU_POOL", False)
    make, spec, saved = CASES[case]
    model = make()
    subset = ft.Subset.full(model) if spec is None else ft.Subset.of(model, spec)
    x, y = _batch(model, N)
    tr_new, loss_new, g_new = _step(model.copy(), subset, x, y)
    tr_old, loss_old, g_old = _step(with_previous_layers(model), subset, x, y)
    assert tr_old.memory.activations - tr_new.memory.activations == saved
    masks = {k: b for k, b in tr_new.arena._buffers.items() if k[1:] == ("mask",)}
    argmaxes = {k: b for k, b in tr_new.arena._buffers.items() if k[1:] == ("argmax",)}
    assert all(b.dtype == np.uint8 and b.ndim == 1 for b in masks.values())
    assert bool(masks) == (case != "mlp full")
    assert all(b.dtype == np.uint8 for b in argmaxes.values())
    assert abs(loss_new - loss_old) < 1e-6
    assert g_new.keys() == g_old.keys()
    for key in g_new:  # the same float operations on the same numbers, planned differently
        np.testing.assert_allclose(g_new[key], g_old[key], rtol=1e-6, atol=1e-7, err_msg=key)
    # and both agree with the float64 NumPy reference
    _, ref = loss_and_grads(model, x, y)
    for key, lsub, view, rows in subset.tensors(model):
        r = ref[key].reshape(view.shape[0], -1) if key.endswith("weight") else ref[key].reshape(1, -1)
        if rows is not None:
            r = r[rows]
        np.testing.assert_allclose(g_new[key], r, rtol=1e-4, atol=1e-5, err_msg=key)


def test_relu_output_read_by_a_trained_layer_stays_float_and_replaces_the_mask():
    model = _mlp()
    x, y = _batch(model, N)
    tr, _, _ = _step(model, ft.Subset.full(model), x, y)
    kept = {k: b for k, b in tr.arena._buffers.items() if tr.arena._category[k] == "activations"}
    # fc2's and fc3's inputs (the ReLU outputs) as float32 and the probabilities: no masks
    shapes = sorted((b.shape, b.dtype.str) for b in kept.values())
    assert shapes == sorted([((N, 24), "<f4"), ((N, 13), "<f4"), ((N, 5), "<f4")]), shapes
    # fc2 trains its bias only: relu1's output is no Dense input anyone keeps, so relu1 keeps its
    # mask; relu2's output is fc3's kept input and serves as its mask
    subset = ft.Subset.of(model, {"fc1": {"rows": "all", "bias": True}, "fc2": {"rows": None, "bias": True},
                                  "fc3": {"rows": "all", "bias": True}})
    tr, _, _ = _step(model, subset, x, y)
    kept = {k: b for k, b in tr.arena._buffers.items() if tr.arena._category[k] == "activations"}
    shapes = sorted((b.shape, b.dtype.str) for b in kept.values())
    assert shapes == sorted([((_bits(N * 24),), "|u1"), ((N, 13), "<f4"), ((N, 5), "<f4")]), shapes


def test_maxpool_1d_and_large_windows():
    # sensor1d: conv1d, batch norm, ReLU, 1-D max pools (reshaped to 2-D): uint8 window positions
    model = ft.zoo("sensor1d", (3, 20), 4, seed=0, channels=(4, 6), kernels=(3, 3))
    subset = ft.Subset.full(model)
    x, y = _batch(model, 5)
    tr_new, _, g_new = _step(model.copy(), subset, x, y)
    _, _, g_old = _step(with_previous_layers(model), subset, x, y)
    pools = [i for i, l in enumerate(model.layers) if isinstance(l, MaxPool2d)]
    assert pools
    for i in pools:
        assert tr_new.arena._buffers[(i, "argmax")].dtype == np.uint8
    for key in g_new:
        np.testing.assert_allclose(g_new[key], g_old[key], rtol=1e-6, atol=1e-7, err_msg=key)

    # a 17x17 window has 289 cells: more than a byte can name, so the int32 plane index stays
    rng = np.random.default_rng(1)
    layers = [Conv2d("conv", rng.standard_normal((2, 1, 1, 1)).astype(np.float32), padding=(0, 0, 0, 0)),
              MaxPool2d("pool", (17, 17), (1, 1)), Flatten("flat"),
              Dense("fc", rng.standard_normal((3, 2 * 2 * 2)).astype(np.float32))]
    big = Model(layers, (1, 18, 18))
    assert big.layers[1].argmax_dtype is np.int32
    x, y = _batch(big, 3)
    tr, _, grads = _step(big, ft.Subset.full(big), x, y)
    assert tr.arena._buffers[(1, "argmax")].dtype == np.int32
    _, ref = loss_and_grads(big, x, y)
    np.testing.assert_allclose(grads["conv.weight"], ref["conv.weight"].reshape(2, -1), rtol=1e-4, atol=1e-5)
