"""Micro-batched steps (``Trainer(micro_batch=m)``): the same SGD step in passes of m samples,
with activations and workspace for m samples, predicted to the byte."""
import numpy as np
import pytest

import ftte_core as ft
from ftte_core import _kernels as K
from test_fused_sgd import _models, _subset


def _batch(model, n, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + model.input_shape).astype(np.float32)
    return x, rng.integers(0, 10, n).astype(np.int32)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "separable"])
@pytest.mark.parametrize("which", ["full", "sparse", "rows"])
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 1e-3)])
@pytest.mark.parametrize("n,m", [(16, 4), (15, 4), (6, 8)])
def test_micro_batched_step_is_the_one_pass_step(name, which, momentum, wd, n, m):
    base = _models()[name]
    subset = _subset(base, which)
    x, y = _batch(base, n)
    one, micro = base.copy(), base.copy()
    tr_one = ft.Trainer(one, subset, lr=0.05, momentum=momentum, weight_decay=wd)
    tr_micro = ft.Trainer(micro, subset, lr=0.05, momentum=momentum, weight_decay=wd, micro_batch=m)
    assert not tr_micro.fused
    losses = [tr_one.step(x, y) for _ in range(3)]
    micro_losses = [tr_micro.step(x, y) for _ in range(3)]
    np.testing.assert_allclose(micro_losses, losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(micro.param_layers, one.param_layers):
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-4, atol=1e-5, err_msg=a.name)
        np.testing.assert_allclose(a.bias, b.bias, rtol=1e-4, atol=1e-5, err_msg=a.name)
    # and the whole gradients of one batch, summed over the passes
    loss_one, g_one = tr_one.gradients(x, y)
    loss_micro, g_micro = tr_micro.gradients(x, y)
    assert loss_micro == pytest.approx(loss_one, rel=1e-5)
    assert g_micro.keys() == g_one.keys()
    for key in g_one:
        np.testing.assert_allclose(g_micro[key], g_one[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_micro_batched_step_with_int8_frozen_weights(name):
    base = _models()[name]
    subset = _subset(base, "rows")
    x, y = _batch(base, 15)
    one, micro = base.copy(), base.copy()
    tr_one = ft.Trainer(one, subset, lr=0.05, momentum=0.9, frozen="int8")
    tr_micro = ft.Trainer(micro, subset, lr=0.05, momentum=0.9, frozen="int8", micro_batch=4)
    for _ in range(3):
        assert tr_micro.step(x, y) == pytest.approx(tr_one.step(x, y), rel=1e-5)
    np.testing.assert_allclose(micro.predict(x), one.predict(x), rtol=1e-4, atol=1e-5)


def _cnn28():
    model = ft.zoo("cnn", (1, 28, 28), 10, seed=0)
    names = [layer.name for layer in model.param_layers]
    return model, ft.Subset.of(model, {names[-1]: {"rows": "all", "bias": True},
                                       names[-2]: {"rows": 0.25, "bias": False}})


@pytest.mark.parametrize("n", [32, 30])
@pytest.mark.parametrize("frozen", ["float32", "int8"])
def test_micro_batch_memory_is_predicted_and_scales_with_the_pass(n, frozen):
    K.set_num_threads(1)
    try:
        records = {}
        for m in (0, 8, 4):
            model, subset = _cnn28()
            x, y = _batch(model, n)
            tr = ft.Trainer(model, subset, momentum=0.9, frozen=frozen, micro_batch=m)
            tr.step(x, y)
            buffers = {k: id(v) for k, v in tr.arena._buffers.items()}
            tr.step(x, y)  # the same buffers: the shorter last pass lives in the full passes' ones
            assert {k: id(v) for k, v in tr.arena._buffers.items()} == buffers
            want = ft.predict_memory(model, subset, n, momentum=0.9, threads=1, frozen=frozen, micro_batch=m)
            assert tr.memory.as_dict() == want, m
            records[m] = want
    finally:
        K.set_num_threads(0)
    held = {m: r["activations"] + r["workspace"] for m, r in records.items()}
    assert held[8] < 0.55 * held[0] and held[4] < 0.35 * held[0], held
    # the price: whole gradients of the trained parameters
    assert records[0]["gradients"] == 0 and records[4]["gradients"] == records[4]["trainable_weights"]


def test_micro_batch_errors():
    model, subset = _cnn28()
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="micro_batch must be an integer >= 0"):
            ft.Trainer(model.copy(), subset, micro_batch=bad)
        with pytest.raises(ValueError, match="micro_batch must be an integer >= 0"):
            ft.predict_memory(model, subset, 32, micro_batch=bad)
