import numpy as np
import pytest

import ftte_core as ft
from ftte_core import _kernels as K

from np_reference import loss_and_grads


def _batch(model, n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + model.input_shape).astype(np.float32)
    y = rng.integers(0, model.num_classes, n).astype(np.int32)
    return x, y


MODELS = {
    "mlp": lambda: ft.zoo("mlp", (20,), 5, seed=1, hidden=(24, 16)),
    "cnn": lambda: ft.zoo("cnn", (1, 8, 8), 4, seed=2, channels=(3, 5)),
}


def _sgd_reference(model, subset, x, y, lr, steps=1, momentum=0.0, wd=0.0):
    """NumPy SGD on the subset: full-model float64 gradients, applied to the selected rows only."""
    ref = model.copy()
    vel = {}
    for _ in range(steps):
        _, grads = loss_and_grads(ref, x, y)
        for key, ls_layer, view, rows in subset.tensors(ref):
            g = grads[key].reshape(view.shape[0], -1) if key.endswith("weight") else grads[key].reshape(1, -1)
            r = rows if rows is not None else np.arange(view.shape[0])
            g = g[r] + wd * view[r]
            if momentum:
                vel[key] = momentum * vel.get(key, 0) + g
                g = vel[key]
            view[r] -= (lr * g).astype(np.float32)
    return ref


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("which", ["full", "sparse", "last"])
def test_step_matches_numpy_sgd(name, which):
    model = MODELS[name]()
    names = [l.name for l in model.param_layers]
    if which == "full":
        subset = ft.Subset.full(model)
    elif which == "sparse":
        subset = ft.Subset.of(model, {names[-1]: {"rows": "all", "bias": True},
                                      names[-2]: {"rows": [0, 2, 3], "bias": False}})
    else:
        subset = ft.Subset.of(model, {names[-1]: {"rows": None, "bias": True}})
    x, y = _batch(model)
    ref = _sgd_reference(model, subset, x, y, lr=0.1, steps=2, momentum=0.9, wd=1e-3)
    before = {k: v.copy() for k, v in model.state().items()}
    tr = ft.Trainer(model, subset, lr=0.1, momentum=0.9, weight_decay=1e-3)
    tr.step(x, y)
    tr.step(x, y)
    for key, got in model.state().items():
        np.testing.assert_allclose(got, ref.state()[key], rtol=1e-4, atol=1e-5, err_msg=key)
    # frozen values are bit-for-bit untouched
    for layer in model.param_layers:
        ls = subset.get(layer.name)
        w_before = before[f"{layer.name}.weight"].reshape(layer.weight.shape[0], -1)
        frozen_rows = np.setdiff1d(np.arange(layer.weight.shape[0]), [] if ls is None else ls.rows)
        assert np.array_equal(layer.weight.reshape(layer.weight.shape[0], -1)[frozen_rows], w_before[frozen_rows])
        if ls is None or not ls.bias:
            assert np.array_equal(layer.bias, before[f"{layer.name}.bias"])


def test_loss_is_reference_loss():
    model = MODELS["cnn"]()
    x, y = _batch(model)
    ref_loss, _ = loss_and_grads(model, x, y)
    loss = ft.Trainer(model, ft.Subset.full(model), lr=1e-9).step(x, y)
    assert abs(loss - ref_loss) < 1e-5


def test_layers_below_earliest_trainable_keep_nothing():
    model = ft.zoo("mlp", (64,), 10, seed=0)
    subset = ft.Subset.of(model, {"fc3": {"rows": "all", "bias": True}})
    tr = ft.Trainer(model, subset)
    x, y = _batch(model, 32)
    tr.step(x, y)
    kept = sorted(key for key, buf in tr.arena._buffers.items() if tr.arena._category[key] == "activations")
    # only the frozen prefix's output (fc3's input) and the softmax probabilities
    assert len(kept) == 2 and ("loss", "probs") in kept, kept
    frontier = [k for k in kept if k != ("loss", "probs")][0]
    assert tr.arena._buffers[frontier].shape == (32, 256)
    # the frozen layers ran 8 samples at a time: their scratch holds 8 rows, not 32
    assert tr.memory.workspace < 32 * 256 * 4 + 10 * 32 * 4 * 2 + 8 * 256 * 4 * 2 + 64 * 1024
    # the update is applied inside backward, tile by tile: no gradient buffer, and no velocity
    # without momentum
    assert tr.memory.gradients == 0 and tr.memory.optimizer_state == 0


def test_sparse_step_uses_much_less_memory_and_gradient_rows_only():
    model = ft.zoo("cnn", (1, 28, 28), 10, seed=0)
    full = ft.Trainer(model.copy(), ft.Subset.full(model), momentum=0.9)
    sparse_subset = ft.Subset.of(model, {"fc1": {"rows": "all", "bias": True},
                                         "conv2": {"rows": 0.25, "bias": True}})
    sparse = ft.Trainer(model.copy(), sparse_subset, momentum=0.9)
    x, y = _batch(model, 32)
    K.set_num_threads(1)  # kernel scratch live at once is scheduling-dependent on several threads
    try:
        full.step(x, y)
        sparse.step(x, y)
    finally:
        K.set_num_threads(0)
    # conv1, its ReLU and its pooling run in chunks of 8 samples and keep nothing: the sparse step
    # keeps exactly the full step's activations less pool1's uint8 argmax of [32, 8, 14, 14] (the
    # ReLU runs inside the pool, plan.FUSE_RELU_POOL: no bit mask in either step); and clearly less
    # scratch (gradients stop at conv2)
    assert full.memory.activations - sparse.memory.activations == 32 * 8 * 14 * 14
    assert sparse.memory.workspace < 0.75 * full.memory.workspace
    # (0.63: the full step keeps bytes for its pools too, so what remains of
    # the sparse step, conv2's float input and the scratch, weighs more in the ratio)
    assert sparse.memory.total < 0.65 * full.memory.total
    # no gradient buffers (SGD inside backward, tile by tile); velocity for the trained rows only
    assert sparse.memory.gradients == full.memory.gradients == 0
    assert sparse.memory.optimizer_state == (4 * 8 * 9 + 16 + 10 * 784 + 10) * 4


@pytest.mark.parametrize("zoo_args", [("mlp", (64,), 10, {}), ("mlp", (784,), 10, {"hidden": (128,)}),
                                      ("cnn", (1, 28, 28), 10, {}), ("cnn", (1, 8, 8), 10, {}),
                                      ("cnn", (3, 32, 32), 10, {})])
@pytest.mark.parametrize("which", ["full", "last", "sparse", "bias"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_cost_model_predicts_recorded_memory(zoo_args, which, momentum):
    name, shape, classes, opts = zoo_args
    model = ft.zoo(name, shape, classes, seed=0, **opts)
    names = [l.name for l in model.param_layers]
    spec = {"full": None,
            "last": {names[-1]: {"rows": "all", "bias": True}},
            "sparse": {names[-1]: {"rows": "all", "bias": True}, names[-2]: {"rows": 0.25, "bias": False}},
            "bias": {n: {"rows": None, "bias": True} for n in names}}[which]
    subset = ft.Subset.full(model) if spec is None else ft.Subset.of(model, spec)
    x, y = _batch(model, 32)
    for threads in (1, 2):
        # With several threads, how much kernel scratch is live at once depends on scheduling;
        # the prediction assumes every thread holds its share at the same moment.
        K.set_num_threads(threads)
        try:
            tr = ft.Trainer(model.copy(), subset, momentum=momentum)
            tr.step(x, y)
            tr.step(x, y)
        finally:
            K.set_num_threads(0)
        got = tr.memory.as_dict()
        want = ft.predict_memory(model, subset, batch_size=32, momentum=momentum, threads=threads)
        for cat in ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "activations"):
            assert want[cat] == got[cat], (cat, want, got)
        if threads == 1:
            assert abs(want["total"] - got["total"]) <= 0.10 * got["total"], (want, got)
        else:
            assert got["total"] <= 1.10 * want["total"], (want, got)


def test_training_learns_digits():
    ds = ft.load_bundled("digits")
    model = ft.zoo("mlp", ds.feature_shape, ds.num_classes, seed=0, hidden=(64,))
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(ds))
    tr_idx, va_idx = idx[:1400], idx[1400:]
    _, acc0 = model.evaluate(ds.x[va_idx], ds.y[va_idx])
    trainer = ft.Trainer(model, lr=0.1, momentum=0.9)
    stats = trainer.train(ds.x[tr_idx], ds.y[tr_idx], epochs=5, batch_size=32)
    _, acc = model.evaluate(ds.x[va_idx], ds.y[va_idx])
    assert acc0 < 0.3 and acc > 0.9, (acc0, acc)
    assert stats.losses[-1] < stats.losses[0]


def test_step_is_identical_for_any_thread_count():
    results = []
    for threads in (1, 2):
        K.set_num_threads(threads)
        try:
            model = ft.zoo("cnn", (1, 28, 28), 10, seed=3)
            x, y = _batch(model, 64, seed=5)
            ft.Trainer(model, lr=0.05, momentum=0.9).train(x, y, epochs=2, batch_size=32)
            results.append(model.state())
        finally:
            K.set_num_threads(0)
    for key in results[0]:
        assert np.array_equal(results[0][key], results[1][key]), key


def test_trainer_rejects_bad_arguments():
    model = MODELS["mlp"]()
    with pytest.raises(ValueError, match="learning rate"):
        ft.Trainer(model, lr=-1)
    with pytest.raises(ValueError, match="momentum"):
        ft.Trainer(model, momentum=1.5)
    with pytest.raises(ValueError, match="trains nothing"):
        ft.Trainer(model, ft.Subset({}))
    tr = ft.Trainer(model)
    x, y = _batch(model)
    with pytest.raises(ValueError, match="labels"):
        tr.step(x, y[:3])
    with pytest.raises(ValueError, match="expects"):
        tr.step(np.zeros((4, 7), np.float32), y[:4])
    with pytest.raises(ValueError):
        tr.step(x, np.full_like(y, 99))


@pytest.mark.parametrize("name,shape", [("cnn", (1, 8, 8)), ("mlp", (64,))])
def test_a_model_file_model_trains_with_owned_writable_weights(name, shape):
    """The agent's path (issue 9, finding 11): a model rebuilt from model-file bytes trains."""
    from ftte_core.modelfile import model_from_bytes, model_to_bytes
    model = model_from_bytes(model_to_bytes(ft.zoo(name, shape, 10, seed=1)))
    for key, arr in model.state().items():
        f = arr.flags
        assert f.writeable and f.owndata and f.c_contiguous and f.aligned, (key, f)
    before = {k: v.copy() for k, v in model.state().items()}
    subset = ft.Subset.of(model, {layer.name: {"rows": "all", "bias": True} for layer in model.param_layers})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64,) + shape).astype(np.float32)
    ft.Trainer(model, subset, lr=0.05).train(x, rng.integers(0, 10, 64), epochs=1, batch_size=16)
    assert all(not np.array_equal(v, before[k]) for k, v in model.state().items())


def test_layers_copy_read_only_or_strided_weights():
    from ftte_core.graph import Conv2d, Dense
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    w.setflags(write=False)
    conv = Conv2d("c", w, np.ones(2, np.float32)[::1])
    assert conv.weight.flags.writeable and conv.weight.flags.owndata and conv.weight is not w
    strided = np.arange(40, dtype=np.float32).reshape(4, 10)[:, ::2]
    dense = Dense("d", strided)
    assert dense.weight.flags.c_contiguous and dense.weight.flags.owndata
    np.testing.assert_array_equal(dense.weight, strided)
