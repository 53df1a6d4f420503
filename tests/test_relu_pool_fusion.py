"""A ReLU whose only reader is a max-pool runs inside that pool (plan.build, MaxPool2d.forward_relu /
backward_relu): whole training steps are bit-identical with the fusion on and off, the cost model
still predicts the recorded bytes, and the fused step holds no ReLU mask."""
import numpy as np
import pytest

import ftte_core as ft
from ftte_core import _kernels as K
from ftte_core import plan
from ftte_core.graph import AvgPool2d, Binary, Conv2d, Dense, Flatten, MaxPool2d, Model, ReLU
from np_reference import _pad, _windows, layer_forward

N = 32


@pytest.fixture(autouse=True)
def one_thread():
    # predict_memory(threads=1) is exact for the kernel scratch at one thread
    K.set_num_threads(1)
    yield
    K.set_num_threads(0)


def _cnn28():
    return ft.zoo("cnn", (1, 28, 28), 10, seed=0)  # conv1 relu1 pool1 conv2 relu2 pool2 flatten fc1


def _subset(model, which):
    names = [layer.name for layer in model.param_layers]
    if which == "full":
        return ft.Subset.full(model)
    if which == "sparse":  # benchmarks/train_step.py: the last layer + 25% of the rows of the one before
        return ft.Subset.of(model, {names[-1]: {"rows": "all", "bias": True},
                                    names[-2]: {"rows": 0.25, "bias": False}})
    assert which == "head"  # only the classifier: every ReLU and pool in the frozen, chunked part
    return ft.Subset.of(model, {names[-1]: {"rows": "all", "bias": True}})


def _batches(model, n, steps, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.standard_normal((n,) + model.input_shape).astype(np.float32)
        yield x, rng.integers(0, model.num_classes, n).astype(np.int32)


def _params(model):
    out = []
    for layer in model.param_layers:
        arrays = layer.weight_arrays() if hasattr(layer, "weight_arrays") else [layer.weight]
        out += [a.tobytes() for a in arrays] + [layer.bias.tobytes()]
    return out


def _train(make, which, fuse, monkeypatch, steps=4, n=N, **trainer_args):
    """Losses, parameter bytes, recorded and predicted memory after `steps` steps."""
    monkeypatch.setattr(plan, "FUSE_RELU_POOL", fuse)
    model = make()
    subset = _subset(model, which)
    tr = ft.Trainer(model, subset, lr=0.05, momentum=0.9, **trainer_args)
    losses = [tr.step(x, y) for x, y in _batches(model, n, steps)]
    predicted = ft.predict_memory(model, subset, n, momentum=0.9, threads=1, **trainer_args)
    return losses, _params(model), tr.memory.as_dict(), predicted


def _same_training(make, which, monkeypatch, **trainer_args):
    fused = _train(make, which, True, monkeypatch, **trainer_args)
    plain = _train(make, which, False, monkeypatch, **trainer_args)
    assert fused[0] == plain[0]  # losses, exactly
    assert fused[1] == plain[1]  # every parameter (and int8 storage), bit for bit
    assert fused[2] == fused[3] and plain[2] == plain[3]  # recorded == predicted, to the byte
    assert fused[2]["total"] <= plain[2]["total"]
    return fused[2], plain[2]


def _mask_bytes(n, *shapes):
    return sum((n * int(np.prod(s)) + 7) // 8 for s in shapes)


# -- the plan ----------------------------------------------------------------------------------------

def test_cnn28_plan_has_no_relu_calls_and_no_masks():
    model = _cnn28()
    assert plan.relu_pool_pairs(model) == {1: 2, 4: 5}
    for which in ("full", "sparse"):
        subset = _subset(model, which)
        fused = plan.build(model, subset, N, fuse_relu_pool=True)
        plain = plan.build(model, subset, N, fuse_relu_pool=False)
        owners = [(fn.__self__.name, fn.__name__) for fn, _ in fused.forward + fused.backward]
        assert not any(name.startswith("relu") for name, _ in owners)
        assert ("pool1", "forward_relu") in owners and ("pool2", "forward_relu") in owners
        assert ("pool2", "backward_relu") in owners
        assert ("pool1", "backward_relu") in owners or which == "sparse"  # sparse: pool1 is frozen
        assert not any(key[1:] == ("mask",) for key in fused.fixed)
        assert any(key[1:] == ("mask",) for key in plain.fixed)
        assert [fn.__name__ for fn, _ in plain.forward + plain.backward].count("forward_relu") == 0
        # the frozen pool1 of the sparse step: no scope, no argmax
        if which == "sparse":
            frozen_pool = [args for fn, args in fused.forward if fn.__self__.name == "pool1"]
            assert frozen_pool and all(args[2] is None for args in frozen_pool)


def test_fusion_needs_plain_relu_and_a_byte_of_window_positions():
    rng = np.random.default_rng(0)

    def model(pool, relu=ReLU):
        features = int(np.prod(pool.out_shape((2, 17, 17))))
        layers = [Conv2d("conv", rng.standard_normal((2, 1, 1, 1)).astype(np.float32)), relu("relu"), pool,
                  Flatten("flat"), Dense("fc", rng.standard_normal((3, features)).astype(np.float32))]
        return Model(layers, (1, 17, 17))

    assert plan.relu_pool_pairs(model(MaxPool2d("pool", (15, 17), (1, 1)))) == {1: 2}  # 255 cells
    assert plan.relu_pool_pairs(model(MaxPool2d("pool", (16, 16), (1, 1)))) == {}  # 256: no sentinel left
    assert plan.relu_pool_pairs(model(AvgPool2d("pool", (2, 2), (2, 2)))) == {}

    class OtherReLU(ReLU):
        pass

    assert plan.relu_pool_pairs(model(MaxPool2d("pool", (2, 2), (2, 2)), OtherReLU)) == {}


# -- whole steps: fused and unfused agree bit for bit ---------------------------------------------

@pytest.mark.parametrize("which", ["full", "sparse", "head"])
@pytest.mark.parametrize("frozen", ["float32", "int8"])
@pytest.mark.parametrize("micro_batch", [0, 4])
def test_cnn28_steps_are_bit_identical(which, frozen, micro_batch, monkeypatch):
    fused, plain = _same_training(_cnn28, which, monkeypatch, frozen=frozen, micro_batch=micro_batch)
    n = micro_batch or N
    # what the fusion saves: the masks of the ReLUs that run backward (none in the head-only step)
    masks = {"full": _mask_bytes(n, (8, 28, 28), (16, 14, 14)), "sparse": _mask_bytes(n, (16, 14, 14)),
             "head": 0}[which]
    assert plain["activations"] - fused["activations"] == masks
    assert plain["workspace"] == fused["workspace"]


@pytest.mark.parametrize("which", ["full", "sparse"])
def test_cnn28_gradients_are_bit_identical(which, monkeypatch):
    got = {}
    for fuse in (True, False):
        monkeypatch.setattr(plan, "FUSE_RELU_POOL", fuse)
        model = _cnn28()
        tr = ft.Trainer(model, _subset(model, which), lr=0.05, momentum=0.9)
        x, y = next(_batches(model, N, 1, seed=3))
        tr.step(x, y)  # momentum and moved weights first
        got[fuse] = tr.gradients(x, y)
    assert got[True][0] == got[False][0]
    assert got[True][1].keys() == got[False][1].keys()
    for key in got[True][1]:
        assert got[True][1][key].tobytes() == got[False][1][key].tobytes(), key


def _relu_pool_model(pool, input_relu=False, seed=0):
    """conv -> ReLU -> `pool` -> flatten -> dense, on 1x9x11 inputs; input_relu: ReLU -> pool first."""
    rng = np.random.default_rng(seed)
    layers = ([ReLU("relu0"), MaxPool2d("pool0", (2, 2), (1, 1))] if input_relu else [])
    hw = (8, 10) if input_relu else (9, 11)
    layers += [Conv2d("conv", (rng.standard_normal((4, 1, 3, 3)) * 0.5).astype(np.float32),
                      rng.standard_normal(4).astype(np.float32) * 0.1, padding=(1, 1, 1, 1)), ReLU("relu"), pool]
    oh, ow = pool.out_shape((4,) + hw)[1:]
    layers += [Flatten("flat"), Dense("fc", (rng.standard_normal((5, 4 * oh * ow)) * 0.2).astype(np.float32))]
    return Model(layers, (1, 9, 11))


@pytest.mark.parametrize("pool", [
    lambda: MaxPool2d("pool", (3, 3), (2, 2), (1, 1, 1, 1)),          # overlapping windows, padding
    lambda: MaxPool2d("pool", (3, 3), (2, 2), (1, 1, 1, 1), True),    # and ceil_mode
    lambda: MaxPool2d("pool", (2, 2), (2, 2)),                        # odd H and W: the fast path's edges
], ids=["3x3s2p1", "3x3s2p1_ceil", "2x2_odd"])
@pytest.mark.parametrize("input_relu", [False, True])
def test_general_path_and_a_relu_on_the_model_input(pool, input_relu, monkeypatch):
    def make():
        return _relu_pool_model(pool(), input_relu)

    assert len(plan.relu_pool_pairs(make())) == 1 + input_relu
    for which in ("full", "head"):
        _same_training(make, which, monkeypatch, n=12)


def test_maxpool_1d(monkeypatch):
    # sensor1d: conv1d, batch norm, ReLU, then a 1-D max-pool (reshaped to 2-D by the layer)
    def make():
        return ft.zoo("sensor1d", (3, 40), 4, seed=0, channels=(4, 6, 8), kernels=(3, 3, 3))

    assert len(plan.relu_pool_pairs(make())) == 2
    for which in ("full", "sparse"):
        _same_training(make, which, monkeypatch, n=10)


# -- DAGs: a second reader of the ReLU's output stops the fusion; of its input, it does not -------------

def _dag(relu_shared: bool, seed=0):
    """conv -> ReLU -> max-pool, plus an average pool of the ReLU's output (relu_shared) or of the
    conv's (the ReLU's input), the two pools added, then flatten and dense. 1x8x8 inputs."""
    rng = np.random.default_rng(seed)
    layers = [Conv2d("conv", (rng.standard_normal((4, 1, 3, 3)) * 0.5).astype(np.float32),
                     rng.standard_normal(4).astype(np.float32) * 0.1, padding=(1, 1, 1, 1)),
              ReLU("relu"), MaxPool2d("max", (2, 2), (2, 2)), AvgPool2d("avg", (2, 2), (2, 2)),
              Binary("add", "add"), Flatten("flat"),
              Dense("fc", (rng.standard_normal((3, 64)) * 0.3).astype(np.float32), np.zeros(3, np.float32))]
    inputs = [(0,), (1,), (2,), (2,) if relu_shared else (1,), (3, 4), (5,), (6,)]
    return Model(layers, (1, 8, 8), inputs=inputs)


def _dag_reference(model, x, labels):
    """Float64 gradients of the relu-shared DAG by hand."""
    conv, fc = model.layers[0], model.layers[6]
    n = x.shape[0]
    x = x.astype(np.float64)
    a = layer_forward(conv, x, (4, 8, 8))
    r = np.maximum(a, 0)
    cells = r.reshape(n, 4, 4, 2, 4, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, 4, 4, 4, 4)
    s = cells.max(axis=-1) + cells.mean(axis=-1)
    logits = s.reshape(n, -1) @ fc.weight.astype(np.float64).T + fc.bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dl = p
    dl[np.arange(n), labels] -= 1
    dl /= n
    grads = {"fc.weight": dl.T @ s.reshape(n, -1), "fc.bias": dl.sum(axis=0)}
    ds = (dl @ fc.weight.astype(np.float64)).reshape(s.shape)
    dcells = np.zeros_like(cells)
    np.put_along_axis(dcells, cells.argmax(axis=-1)[..., None], ds[..., None], axis=-1)
    dcells += ds[..., None] / 4
    dr = dcells.reshape(n, 4, 4, 4, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, 4, 8, 8)
    da = dr * (a > 0)
    win = _windows(_pad(x, conv.padding), 3, 3, 1, 1, 8, 8)
    grads["conv.weight"] = np.einsum("noij,ncijhw->ochw", da, win)
    grads["conv.bias"] = da.sum(axis=(0, 2, 3))
    return grads


def test_relu_with_a_second_reader_is_not_fused_and_trains_right(monkeypatch):
    model = _dag(relu_shared=True)
    assert plan.relu_pool_pairs(model) == {}
    built = plan.build(model, ft.Subset.full(model), N)
    assert [fn.__name__ for fn, _ in built.forward].count("forward_relu") == 0
    _same_training(lambda: _dag(True), "full", monkeypatch)
    tr = ft.Trainer(model, lr=0.05)
    x, y = next(_batches(model, N, 1))
    _, grads = tr.gradients(x, y)
    ref = _dag_reference(model, x, y)
    for key, g in grads.items():
        np.testing.assert_allclose(g, ref[key].reshape(g.shape), rtol=1e-4, atol=1e-5, err_msg=key)


def test_fused_relu_whose_input_has_a_second_reader(monkeypatch):
    # the conv's gradient meets from the fused pool and the average pool: computed aside and added
    model = _dag(relu_shared=False)
    assert plan.relu_pool_pairs(model) == {1: 2}
    for which in ("full", "head"):
        fused, plain = _same_training(lambda: _dag(False), which, monkeypatch)
        if which == "full":
            assert plain["activations"] - fused["activations"] == _mask_bytes(N, (4, 8, 8))


# -- the zoo: recorded == predicted with the fusion wherever it applies -----------------------------------

@pytest.mark.parametrize("name, shape, last_block", [
    ("resnet8", (3, 32, 32), ["block3.conv1", "block3.bn1", "block3.conv2", "block3.bn2", "block3.shortcut"]),
    ("dscnn", (1, 49, 10), ["block4.dw", "block4.dw_bn", "block4.pw", "block4.pw_bn"]),
    ("mobilenetv1", (3, 48, 48), ["block13.dw", "block13.dw_bn", "block13.pw", "block13.pw_bn"]),
    ("cnn", (3, 32, 32), None),
])
def test_zoo_models_record_what_is_predicted(name, shape, last_block):
    n = 8
    for spec in ("full", "sparse"):
        model = ft.zoo(name, shape, 10, seed=0)
        if spec == "full":
            subset = ft.Subset.full(model)
        elif last_block is None:
            subset = _subset(model, "sparse")
        else:  # benchmarks/train_step.py sparse_spec
            subset = ft.Subset.of(model, {**{k: {"rows": 0.25, "bias": False} for k in last_block},
                                          "classifier": {"rows": "all", "bias": True}})
        tr = ft.Trainer(model, subset, lr=0.01, momentum=0.9)
        for x, y in _batches(model, n, 2):
            tr.step(x, y)
        assert tr.memory.as_dict() == ft.predict_memory(model, subset, n, momentum=0.9, threads=1), (name, spec)
