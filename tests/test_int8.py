"""int8 frozen weights: quantisation, every kernel path with an int8 weight against a float64
NumPy reference on the dequantised weight, finite differences, thread-count independence,
argument errors, scratch sizing, and the Trainer/cost-model/TaskConfig side (frozen="int8")."""
import numpy as np
import pytest

import ftte_core as ft
from ftte_core import _kernels as K
from ftte_core.graph import quantize_rows
from ftte_core.local import TaskConfig

from slowdev import scaled
from test_conv import make, ref_backward, ref_forward


def _q(w):
    q, s = quantize_rows(w)
    deq = q.astype(np.float64) * s.astype(np.float64).reshape((-1,) + (1,) * (w.ndim - 1))
    return q, s, deq


def _threads(n):
    class _Ctx:
        def __enter__(self):
            self.before = K.get_num_threads()
            K.set_num_threads(n)

        def __exit__(self, *a):
            K.set_num_threads(self.before)
    return _Ctx()


def _check_dx_by_differences(x, loss, dx, rng, points, eps=1e-3):
    """dx against float64 central differences of loss(x64) at random points (the loss is linear
    in x, so the differences are exact up to rounding; the tolerance covers float32 sums)."""
    x64 = x.astype(np.float64)
    for idx in [tuple(rng.integers(0, d) for d in x.shape) for _ in range(points)]:
        old = x64[idx]
        x64[idx] = old + eps
        lp = loss(x64)
        x64[idx] = old - eps
        lm = loss(x64)
        x64[idx] = old
        assert abs((lp - lm) / (2 * eps) - dx[idx]) < 1e-3 * (1 + abs(dx[idx]))


def test_quantize_rows_is_symmetric_round_to_nearest_per_row():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3, 2, 2)).astype(np.float32)
    w[2] = 0.0  # an all-zero row: scale 0, q 0
    q, s = quantize_rows(w)
    assert q.dtype == np.int8 and q.shape == w.shape and s.dtype == np.float32 and s.shape == (5,)
    flat = w.reshape(5, -1).astype(np.float64)
    want_s = np.abs(flat).max(1) / 127
    np.testing.assert_allclose(s, want_s, rtol=1e-6)
    assert s[2] == 0 and not q[2].any()
    for r in (0, 1, 3, 4):
        np.testing.assert_array_equal(q[r].reshape(-1), np.rint(flat[r] / s[r]).astype(np.int8))
        assert np.abs(q[r]).max() == 127
    # error at most half a step per element
    deq = q.reshape(5, -1) * s[:, None].astype(np.float64)
    assert np.all(np.abs(deq - flat) <= 0.5 * s[:, None] * (1 + 1e-5) + 1e-12)


# ---- dense ---------------------------------------------------------------------------------------
# (N, I, O): small and odd edges, the would-be dot path (N <= 64, I >= 128), a large batch
DENSE = [(1, 1, 1), (3, 5, 7), (17, 130, 10), (33, 784, 129), (70, 64, 33)]


@pytest.mark.parametrize("N,I,O", DENSE)
def test_dense_int8_forward_and_dx_match_numpy(N, I, O):
    rng = np.random.default_rng(N * 7 + I + O)
    x = rng.standard_normal((N, I)).astype(np.float32)
    w = (rng.standard_normal((O, I)) / np.sqrt(I)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    dy = rng.standard_normal((N, O)).astype(np.float32)
    q, s, deq = _q(w)
    tol = dict(rtol=1e-4, atol=1e-5 * np.sqrt(max(I, O)) * 4)
    y = np.full((N, O), np.nan, np.float32)
    K.dense_forward(x, q, b, y, w_scale=s)
    np.testing.assert_allclose(y, x.astype(np.float64) @ deq.T + b, **tol)
    # backward through a frozen layer: dx from the int8 weight; dw/db (of other rows) as ever
    rows = np.array([O - 1], np.int32)
    dx = np.full((N, I), np.nan, np.float32)
    dw = np.empty((1, I), np.float32)
    db = np.empty(1, np.float32)
    K.dense_backward(x, q, dy, rows, dw, db, dx, w_scale=s)
    np.testing.assert_allclose(dx, dy.astype(np.float64) @ deq, **tol)
    np.testing.assert_allclose(dw, dy[:, -1:].T.astype(np.float64) @ x, **tol)
    dx2 = np.empty_like(dx)
    K.dense_backward(None, q, dy, None, None, None, dx2, w_scale=s)
    np.testing.assert_array_equal(dx, dx2)


def test_dense_int8_finite_differences():
    """dx of L = sum(dense(x, w_int8) * r) against float64 central differences of the forward."""
    rng = np.random.default_rng(11)
    N, I, O = 4, 9, 6
    x = rng.standard_normal((N, I)).astype(np.float32)
    q, s, deq = _q(rng.standard_normal((O, I)).astype(np.float32))
    r = rng.standard_normal((N, O))
    dx = np.empty_like(x)
    K.dense_backward(None, q, r.astype(np.float32), None, None, None, dx, w_scale=s)
    _check_dx_by_differences(x, lambda x64: float(((x64 @ deq.T) * r).sum()), dx, rng, 10)


# ---- conv2d, grouped, depthwise ------------------------------------------------------------------
CONV = [
    (2, 3, 7, 9, 5, 3, 3, (1, 1), (1, 1, 1, 1)),
    (3, 4, 11, 8, 5, 3, 3, (2, 2), (1, 0, 2, 1)),
    (2, 5, 6, 7, 4, 1, 1, (1, 1), (0, 0, 0, 0)),  # pointwise: the float path reads W^T in place
    (1, 2, 10, 13, 3, 5, 3, (3, 2), (0, 2, 1, 0)),
]


@pytest.mark.parametrize("ci", range(len(CONV)))
def test_conv2d_int8_forward_and_dx_match_numpy(ci):
    case = CONV[ci]
    rng, x, w, b, yshape = make(case, 40 + ci)
    stride, pad = case[7], case[8]
    q, s, deq = _q(w)
    y = np.full(yshape, np.nan, np.float32)
    K.conv2d_forward(x, q, b, y, stride, pad, w_scale=s)
    np.testing.assert_allclose(y, ref_forward(x, deq, b, stride, pad), rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal(yshape).astype(np.float32)
    dx = np.full_like(x, np.nan)
    rows = np.array([0], np.int32)
    dw = np.empty((1,) + w.shape[1:], np.float32)
    K.conv2d_backward(x, q, dy, rows, dw, None, dx, stride, pad, w_scale=s)
    rdx, rdw, _ = ref_backward(x, deq, dy, stride, pad)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, rdw[:1], rtol=1e-4, atol=1e-4)


def test_conv2d_int8_finite_differences():
    case = (2, 3, 6, 5, 4, 3, 3, (2, 1), (1, 0, 0, 2))
    rng, x, w, b, yshape = make(case, 3)
    stride, pad = case[7], case[8]
    q, s, deq = _q(w)
    r = rng.standard_normal(yshape)
    dx = np.empty_like(x)
    K.conv2d_backward(None, q, r.astype(np.float32), None, None, None, dx, stride, pad, w_scale=s)
    _check_dx_by_differences(x, lambda x64: float((ref_forward(x64, deq, None, stride, pad) * r).sum()), dx, rng, 8)


def _grouped_ref(x, w, b, group, stride, pad):
    C, OC = x.shape[1], w.shape[0]
    cg, og = C // group, OC // group
    return np.concatenate([ref_forward(x[:, k * cg:(k + 1) * cg], w[k * og:(k + 1) * og],
                                       None if b is None else b[k * og:(k + 1) * og], stride, pad)
                           for k in range(group)], axis=1)


@pytest.mark.parametrize("group,stride,pad", [(2, (1, 1), (1, 1, 1, 1)), (3, (2, 1), (0, 1, 1, 0))])
def test_grouped_int8_forward_and_dx_match_numpy(group, stride, pad):
    rng = np.random.default_rng(group)
    N, C, H, W, OC = 2, 6, 7, 6, 9 if group == 3 else 4
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((OC, C // group, 3, 3)).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    q, s, deq = _q(w)
    ref = _grouped_ref(x, deq, b, group, stride, pad)
    y = np.empty(ref.shape, np.float32)
    K.grouped_conv2d_forward(x, q, b, y, group, stride, pad, w_scale=s)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal(ref.shape)
    dx = np.empty_like(x)
    K.grouped_conv2d_backward(None, q, dy.astype(np.float32), None, None, None, dx, group, stride, pad,
                              w_scale=s)
    # dx = d/dx sum(ref * dy): the grouped reference is linear in x, so take it blockwise
    cg, og = C // group, OC // group
    rdx = np.concatenate([ref_backward(x[:, k * cg:(k + 1) * cg], deq[k * og:(k + 1) * og],
                                       dy[:, k * og:(k + 1) * og], stride, pad)[0] for k in range(group)], axis=1)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride,pad,M", [((1, 1), (1, 1, 1, 1), 1), ((2, 2), (1, 0, 1, 1), 2)])
def test_depthwise_int8_forward_and_dx_match_numpy(stride, pad, M):
    rng = np.random.default_rng(M)
    N, C, H, W = 2, 3, 7, 8
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((C * M, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(C * M).astype(np.float32)
    q, s, deq = _q(w)
    # depthwise = grouped with group C, each output channel oc reading input channel oc // M
    ref = _grouped_ref(x, deq, b, C, stride, pad)
    y = np.empty(ref.shape, np.float32)
    K.depthwise_conv2d_forward(x, q, b, y, stride, pad, w_scale=s)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal(ref.shape)
    dx = np.empty_like(x)
    K.depthwise_conv2d_backward(None, q, dy.astype(np.float32), None, None, None, dx, stride, pad, w_scale=s)
    rdx = np.concatenate([ref_backward(x[:, c:c + 1], deq[c * M:(c + 1) * M], dy[:, c * M:(c + 1) * M],
                                       stride, pad)[0] for c in range(C)], axis=1)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)


def test_int8_kernels_give_identical_results_for_any_thread_count():
    rng = np.random.default_rng(5)
    xd = rng.standard_normal((70, 300)).astype(np.float32)
    qd, sd = quantize_rows(rng.standard_normal((130, 300)).astype(np.float32))
    dyd = rng.standard_normal((70, 130)).astype(np.float32)
    xc = rng.standard_normal((8, 8, 12, 12)).astype(np.float32)
    qc, sc = quantize_rows(rng.standard_normal((16, 8, 3, 3)).astype(np.float32))
    dyc = rng.standard_normal((8, 16, 12, 12)).astype(np.float32)
    qw, sw = quantize_rows(rng.standard_normal((8, 1, 3, 3)).astype(np.float32))
    out = []
    for threads in (1, 2, 3):
        with _threads(threads):
            y, dx = np.empty((70, 130), np.float32), np.empty_like(xd)
            K.dense_forward(xd, qd, None, y, w_scale=sd)
            K.dense_backward(None, qd, dyd, None, None, None, dx, w_scale=sd)
            y_dot = np.empty((32, 130), np.float32)  # batch <= 64, K >= 128: the int8 dot path
            K.dense_forward(xd[:32], qd, None, y_dot, w_scale=sd)
            yc, dxc = np.empty((8, 16, 12, 12), np.float32), np.empty_like(xc)
            K.conv2d_forward(xc, qc, None, yc, (1, 1), (1, 1, 1, 1), w_scale=sc)
            K.conv2d_backward(None, qc, dyc, None, None, None, dxc, (1, 1), (1, 1, 1, 1), w_scale=sc)
            yw = np.empty((8, 8, 12, 12), np.float32)
            K.depthwise_conv2d_forward(xc, qw, None, yw, (1, 1), (1, 1, 1, 1), w_scale=sw)
            out.append((y, dx, y_dot, yc, dxc, yw))
    assert_all_equal(out)


def assert_scratch_as_sized(calls):
    """(call, sizing) pairs: at one thread each call's kernel scratch peak is what its sizing says."""
    with _threads(1):
        for call, want in calls:
            base = K.workspace_current_bytes()
            K.reset_workspace_peak()
            call()
            assert K.workspace_peak_bytes() - base == want()


def assert_all_equal(results):
    """Each run's arrays (one tuple per thread count) equal the first run's, bit for bit."""
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_int8_weight_argument_errors():
    x = np.ones((2, 4), np.float32)
    y = np.empty((2, 3), np.float32)
    q, s = quantize_rows(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="dense_forward: w is int8, so w_scale .* is required"):
        K.dense_forward(x, q, None, y)
    with pytest.raises(ValueError, match="dense_forward: w must have dtype int8 when w_scale is given, got float32"):
        K.dense_forward(x, np.ones((3, 4), np.float32), None, y, w_scale=s)
    with pytest.raises(ValueError, match="dense_forward: w_scale has shape \\(2,\\) but dimension 0 must be 3"):
        K.dense_forward(x, q, None, y, w_scale=s[:2].copy())
    with pytest.raises(ValueError, match="dense_forward: w_scale must have dtype float32"):
        K.dense_forward(x, q, None, y, w_scale=s.astype(np.float64))
    with pytest.raises(ValueError, match="dense_forward: w must have dtype int8 when w_scale is given, got int16"):
        K.dense_forward(x, q.astype(np.int16), None, y, w_scale=s)
    with pytest.raises(ValueError, match="dense_forward: w must have dtype float32, got int16"):
        K.dense_forward(x, q.astype(np.int16), None, y)
    with pytest.raises(ValueError, match="dense_backward: dy has shape \\(2, 5\\) but dimension 1 must be 3"):
        K.dense_backward(None, q, np.ones((2, 5), np.float32), None, None, None, x, w_scale=s)
    with pytest.raises(ValueError, match="w_scale must be C-contiguous"):
        K.dense_forward(x, q, None, y, w_scale=np.ones(6, np.float32)[::2])
    xc = np.ones((1, 2, 5, 5), np.float32)
    qc, sc = quantize_rows(np.ones((3, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="conv2d_forward: w is int8"):
        K.conv2d_forward(xc, qc, None, np.empty((1, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="depthwise_conv2d_forward: w_scale has shape"):
        K.depthwise_conv2d_forward(xc, quantize_rows(np.ones((2, 1, 3, 3), np.float32))[0], None,
                                   np.empty((1, 2, 3, 3), np.float32), w_scale=sc)


def test_int8_scratch_bytes_are_what_the_kernels_take():
    """The cost model's sizes with int8 weights (packed panels, never read in place) are exact at one thread."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 300)).astype(np.float32)
    q, s = quantize_rows(rng.standard_normal((64, 300)).astype(np.float32))
    dy = rng.standard_normal((32, 64)).astype(np.float32)
    xc = rng.standard_normal((4, 4, 9, 9)).astype(np.float32)
    qc, sc = quantize_rows(rng.standard_normal((6, 4, 3, 3)).astype(np.float32))
    dyc = rng.standard_normal((4, 6, 9, 9)).astype(np.float32)
    xp = rng.standard_normal((4, 4, 9, 9)).astype(np.float32)
    qp, sp = quantize_rows(rng.standard_normal((6, 4, 1, 1)).astype(np.float32))
    calls = [
        (lambda: K.dense_forward(x, q, None, np.empty((32, 64), np.float32), w_scale=s),
         lambda: K.sgemm_scratch_bytes(32, 64, 300, False, True, int8_b=True)),
        (lambda: K.dense_backward(None, q, dy, None, None, None, np.empty_like(x), w_scale=s),
         lambda: K.sgemm_scratch_bytes(32, 300, 64, False, False, int8_b=True)),
        (lambda: K.conv2d_forward(xc, qc, None, dyc.copy(), (1, 1), (1, 1, 1, 1), w_scale=sc),
         lambda: K.conv2d_scratch_bytes(xc.shape, qc.shape, (1, 1), (1, 1, 1, 1), threads=1, int8_weight=True)),
        (lambda: K.conv2d_backward(None, qc, dyc, None, None, None, np.empty_like(xc), (1, 1), (1, 1, 1, 1),
                                   w_scale=sc),
         lambda: K.conv2d_scratch_bytes(xc.shape, qc.shape, (1, 1), (1, 1, 1, 1), backward=True, dw=False,
                                        threads=1, int8_weight=True)),
        (lambda: K.conv2d_backward(None, qp, dyc, None, None, None, np.empty_like(xp), w_scale=sp),
         lambda: K.conv2d_scratch_bytes(xp.shape, qp.shape, backward=True, dw=False, threads=1, int8_weight=True)),
    ]
    assert_scratch_as_sized(calls)
    # the small-batch int8 dense forward reads W's int8 rows in place (the dot path: no scratch);
    # a larger batch packs bounded panels, never a float copy of all of W
    assert K.sgemm_scratch_bytes(32, 2048, 2048, False, True, int8_b=True) == 0
    assert 0 < K.sgemm_scratch_bytes(70, 2048, 2048, False, True, int8_b=True) < 2048 * 2048 * 4 // 8


# ---- layers, Trainer, cost model, task settings --------------------------------------------------
def _digits_split():
    ds = ft.load_bundled("digits")
    idx = np.random.default_rng(0).permutation(len(ds))
    return ds, idx[:1400], idx[1400:]


def test_quantized_layers_predict_like_their_dequantised_float_model():
    model = ft.zoo("cnn", (1, 8, 8), 4, seed=2, channels=(3, 5))
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    q = model.copy()
    for layer in q.param_layers:
        layer.quantize_weight()
        assert layer.is_int8 and layer._weight is None and layer.weight_q.dtype == np.int8
    deq = q.copy()
    for layer in deq.param_layers:
        layer.weight = np.array(layer.weight)  # the dequantised values, as float32 again
    np.testing.assert_allclose(q.predict(x), deq.predict(x), rtol=1e-4, atol=1e-5)
    assert np.abs(q.predict(x) - model.predict(x)).max() < 0.05 * np.abs(model.predict(x)).max()
    w = q.param_layers[0].weight
    assert not w.flags.writeable  # a read-only dequantised copy: writing into it cannot be lost silently
    assert q.num_params() == model.num_params()


def test_trainer_int8_holds_frozen_layers_as_int8_and_predicts_its_memory():
    model = ft.zoo("mlp", (64,), 10, seed=0, hidden=(64, 32))
    names = [l.name for l in model.param_layers]
    subset = ft.Subset.of(model, {names[-1]: {"rows": "all", "bias": True},
                                  names[-2]: {"rows": 0.25, "bias": False},
                                  names[0]: {"rows": None, "bias": True}})
    x = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    y = np.arange(32, dtype=np.int32) % 10
    with _threads(1):
        m = model.copy()
        tr = ft.Trainer(m, subset, frozen="int8")
        tr.step(x, y)
        tr.step(x, y)
    l0, l1, l2 = m.param_layers
    assert l0.is_int8 and l0._weight is None  # no row trains (the bias does): int8, float released
    assert l1.is_mixed and l1._weight is None  # a quarter of its rows train: those float32, the rest int8
    assert l1.weight_trained.shape == (8, 64) and l1.weight_q.shape == (24, 64)
    assert not l2.is_int8 and not l2.is_mixed and l2._weight is not None  # every row trains: float32
    got = tr.memory.as_dict()
    want = ft.predict_memory(model, subset, batch_size=32, frozen="int8", threads=1)
    for cat in ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "activations"):
        assert want[cat] == got[cat], (cat, want, got)
    assert abs(want["total"] - got["total"]) <= 0.10 * got["total"], (want, got)
    f32 = ft.predict_memory(model, subset, batch_size=32, threads=1)
    # 64x64 weight as int8 + 64 scales instead of float32; the bias stays float32 (it trains); of
    # the 32x64 layer, 24 frozen rows as int8 + 24 scales, plus its 32-entry int32 row-slot table
    assert f32["frozen_weights"] - want["frozen_weights"] == (64 * 64 * 3 - 64 * 4) + (24 * 64 * 3 - 24 * 4 - 32 * 4)
    # a model already int8 is counted as it is, whatever frozen= says
    assert ft.predict_memory(m, subset, batch_size=32, threads=1)["frozen_weights"] == want["frozen_weights"]


_ZOO = [("mlp", (64,), 10, {}), ("mlp", (784,), 10, {"hidden": (128,)}), ("cnn", (1, 28, 28), 10, {}),
        ("cnn", (3, 32, 32), 10, {})]


@pytest.mark.parametrize("zoo_args,which", [(z, w) for z in _ZOO for w in ("last", "sparse", "bias")]
                         + [(("dscnn", (1, 49, 10), 12, {}), "last")])  # depthwise and pointwise int8
def test_cost_model_predicts_recorded_int8_memory(zoo_args, which):
    """As test_trainer's prediction test, with frozen="int8": categories exact, total within 10%."""
    name, shape, classes, opts = zoo_args
    model = ft.zoo(name, shape, classes, seed=0, **opts)
    names = [l.name for l in model.param_layers]
    spec = {"last": {names[-1]: {"rows": "all", "bias": True}},
            "sparse": {names[-1]: {"rows": "all", "bias": True}, names[-2]: {"rows": 0.25, "bias": False}},
            "bias": {n: {"rows": None, "bias": True} for n in names}}[which]
    subset = ft.Subset.of(model, spec)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32,) + model.input_shape).astype(np.float32)
    y = rng.integers(0, classes, 32).astype(np.int32)
    for threads in (1, 2):
        with _threads(threads):
            tr = ft.Trainer(model.copy(), subset, frozen="int8")
            tr.step(x, y)
            tr.step(x, y)
        # "sparse": the layer before the last trains a quarter of its rows, so it is mixed
        assert getattr(tr.model.layer(names[-2]), "is_mixed", False) == (which == "sparse")
        got = tr.memory.as_dict()
        want = ft.predict_memory(model, subset, batch_size=32, threads=threads, frozen="int8")
        for cat in ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "activations"):
            assert want[cat] == got[cat], (cat, want, got)
        if threads == 1:
            assert abs(want["total"] - got["total"]) <= 0.10 * got["total"], (want, got)
        else:
            assert got["total"] <= 1.10 * want["total"], (want, got)
    assert want["frozen_weights"] <= ft.predict_memory(model, subset, batch_size=32)["frozen_weights"]


def test_trainer_int8_refuses_bad_settings():
    model = ft.zoo("mlp", (8,), 3, seed=0, hidden=(6,))
    with pytest.raises(ValueError, match="frozen must be 'float32' or 'int8', got 'int4'"):
        ft.Trainer(model, frozen="int4")
    model.param_layers[0].quantize_weight()
    with pytest.raises(ValueError, match="holds int8 weights, so its weight rows cannot train"):
        ft.Trainer(model, ft.Subset.full(model))


def test_int8_model_saves_dequantised_and_loads_state():
    """A model file (and ONNX) holds an int8 layer's dequantised float32 weight; loading gives a
    float32 layer with those values, and quantising it again gives the same int8 values."""
    from ftte_core.modelfile import model_from_bytes, model_to_bytes
    model = ft.zoo("mlp", (8,), 3, seed=0, hidden=(6,))
    layer = model.param_layers[0]
    layer.quantize_weight()
    back = model_from_bytes(model_to_bytes(model))
    again = back.param_layers[0]
    assert not again.is_int8
    np.testing.assert_array_equal(again.weight, layer.weight)
    again.quantize_weight()
    np.testing.assert_array_equal(again.weight_q, layer.weight_q)
    np.testing.assert_allclose(again.weight_scale, layer.weight_scale, rtol=1e-6)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_allclose(back.predict(x), model.predict(x), rtol=1e-5, atol=1e-6)
    # load_state into an int8 layer quantises the new values into it (it stays int8)
    other = ft.zoo("mlp", (8,), 3, seed=5, hidden=(6,))
    other.param_layers[0].quantize_weight()
    other.load_state(model.state())
    assert other.param_layers[0].is_int8
    np.testing.assert_array_equal(other.param_layers[0].weight_q, layer.weight_q)


def test_task_config_carries_frozen():
    assert TaskConfig().frozen == "float32"
    assert TaskConfig.from_dict({"frozen": "int8"}).frozen == "int8"
    assert TaskConfig.from_dict(TaskConfig(frozen="int8").as_dict()).frozen == "int8"
    assert "frozen" not in TaskConfig().as_dict()  # the default goes unsaid on the wire
    with pytest.raises(ValueError, match='frozen must be "float32" or "int8", got \'fp16\''):
        TaskConfig.from_dict({"frozen": "fp16"})
    with pytest.raises(ValueError, match="frozen must be"):
        TaskConfig.from_dict({"frozen": 8})


@pytest.mark.parametrize("which", ["last", "sparse"])
def test_int8_fine_tuning_on_digits_costs_at_most_half_a_point(which):
    """Fine-tune a digits MLP with float32 and with int8 frozen layers: the last layer alone (the
    first layer int8), or with a quarter of the first layer's rows (that layer mixed: its other
    rows int8)."""
    ds, tr_idx, va_idx = _digits_split()
    base = ft.zoo("mlp", ds.feature_shape, ds.num_classes, seed=0, hidden=(64,))
    ft.Trainer(base, lr=0.1, momentum=0.9).train(ds.x[tr_idx], ds.y[tr_idx], epochs=1, batch_size=32)
    first, last = base.param_layers[0].name, base.param_layers[-1].name
    spec = {last: {"rows": "all", "bias": True}}
    if which == "sparse":
        spec[first] = {"rows": 0.25, "bias": False}
    subset = ft.Subset.of(base, spec)
    acc = {}
    for frozen in ("float32", "int8"):
        m = base.copy()
        ft.Trainer(m, subset, lr=0.05, frozen=frozen, seed=1).train(ds.x[tr_idx], ds.y[tr_idx], epochs=2,
                                                                    batch_size=32)
        acc[frozen] = m.evaluate(ds.x[va_idx], ds.y[va_idx])[1]
    assert acc["float32"] > 0.85, acc
    assert acc["int8"] >= acc["float32"] - 0.005, acc


def test_search_turns_on_int8_before_shrinking_the_subset():
    from ftte_core.search import BudgetTooSmall, search_subset
    # two hidden layers: with no gradient buffers, full training of a one-hidden-layer MLP is only
    # 3 KB above float32's cheapest subset, too close for int8 to let a better subset fit
    model = ft.zoo("mlp", (64,), 10, seed=0, hidden=(96, 96))
    rng = np.random.default_rng(0)
    scores = {}
    for layer in model.param_layers:
        scores[f"{layer.name}.weight"] = rng.random(layer.weight_shape[0]).tolist()
        scores[f"{layer.name}.bias"] = float(rng.random())
    full = ft.predict_memory(model, ft.Subset.full(model), batch_size=8)["total"]
    # ample budget: everything trains, float32 (int8 would buy nothing)
    res = search_subset(model, scores, full, batch_size=8, frozen="auto")
    assert res.frozen == "float32" and res.score == res.max_score
    with pytest.raises(BudgetTooSmall) as e32:
        search_subset(model, scores, 0, batch_size=8)
    with pytest.raises(BudgetTooSmall) as e8:
        search_subset(model, scores, 0, batch_size=8, frozen="int8")
    assert e8.value.minimum_bytes < e32.value.minimum_bytes
    # below float32's cheapest subset, int8 frozen weights still let something train
    tight = search_subset(model, scores, e8.value.minimum_bytes, batch_size=8, frozen="auto")
    assert tight.frozen == "int8"
    # budgets where float32 must shrink the subset: int8 is chosen exactly when it lets a better one fit
    lo = e32.value.minimum_bytes
    wins = 0
    for budget in np.linspace(lo, full, 4)[1:-1].astype(int):
        plain = search_subset(model, scores, int(budget), batch_size=8)
        auto = search_subset(model, scores, int(budget), batch_size=8, frozen="auto")
        assert auto.score >= plain.score and auto.predicted_bytes <= budget
        assert (auto.frozen == "int8") == (auto.score > plain.score)
        assert auto.predicted_bytes == ft.predict_memory(model, auto.subset, batch_size=8,
                                                         frozen=auto.frozen)["total"]
        wins += auto.frozen == "int8"
    assert wins >= 1
    with pytest.raises(ValueError, match="frozen must be 'float32', 'int8' or 'auto'"):
        search_subset(model, scores, full, frozen="fp16")


def test_local_worker_honours_the_task_setting():
    from ftte_core.local import LocalWorker
    from ftte_core.update import subset_values
    model = ft.zoo("mlp", (16,), 4, seed=0, hidden=(12,))
    subset = ft.Subset.of(model, {model.param_layers[-1].name: {"rows": "all", "bias": True}})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 16)).astype(np.float32)
    y = rng.integers(0, 4, 24).astype(np.int32)
    worker = LocalWorker(model, subset)
    cfg = TaskConfig(batch_size=8, frozen="int8")
    with _threads(1):
        result = worker.run(subset_values(model, subset), 0, x, y, cfg)
    assert model.param_layers[0].is_int8 and not model.param_layers[-1].is_int8
    want = ft.predict_memory(model, subset, batch_size=8, frozen="int8", threads=1)
    assert result.memory.frozen_weights == want["frozen_weights"] == 16 * 12 + 12 * 4 + 12 * 4


def test_int8_model_exports_onnx_with_dequantised_weights(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = ft.zoo("cnn", (1, 8, 8), 4, seed=2, channels=(3, 5))
    for layer in model.param_layers[:2]:
        layer.quantize_weight()
    path = tmp_path / "m.onnx"
    ft.save_onnx(model, path)
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, model.predict(x), rtol=1e-4, atol=1e-5)


_GENERIC_CHILD = r"""
import numpy as np, sys
from ftte_core import _kernels as K
from ftte_core.graph import Dense, quantize_rows
rng = np.random.default_rng(3)
out = {"name": K.sgemm_kernel_name()}
for tag, (N, I, O) in {"dot": (20, 300, 37), "blocked": (70, 40, 19)}.items():
    x = rng.standard_normal((N, I)).astype(np.float32)
    q, s = quantize_rows(rng.standard_normal((O, I)).astype(np.float32))
    dy = rng.standard_normal((N, O)).astype(np.float32)
    y, dx = np.empty((N, O), np.float32), np.empty_like(x)
    K.dense_forward(x, q, None, y, w_scale=s)
    K.dense_backward(None, q, dy, None, None, None, dx, w_scale=s)
    out.update({tag + "_x": x, tag + "_q": q, tag + "_s": s, tag + "_dy": dy, tag + "_y": y, tag + "_dx": dx})
    # mixed: a third of the rows float32, the rest int8 (test_int8_rows.py has the rest)
    layer = Dense("d", rng.standard_normal((O, I)).astype(np.float32))
    layer.mix_weight(np.arange(0, O, 3, dtype=np.int32))
    wq, kw = layer._kernel_weight()
    ym, dxm = np.empty((N, O), np.float32), np.empty_like(x)
    K.dense_forward(x, wq, None, ym, **kw)
    K.dense_backward(None, wq, dy, None, None, None, dxm, **kw)
    out.update({tag + "_wm": np.array(layer.weight), tag + "_ym": ym, tag + "_dxm": dxm})
np.savez(sys.argv[1], **out)
"""


def test_int8_paths_of_the_generic_kernel(tmp_path):
    """The portable micro-kernel (what ARM devices run) with int8 and mixed weights, against NumPy."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, FTTE_GEMM_KERNEL="generic")
    subprocess.run([sys.executable, "-c", _GENERIC_CHILD, str(tmp_path / "g.npz")], env=env, check=True,
                   timeout=scaled(120))
    r = np.load(tmp_path / "g.npz")
    assert str(r["name"]) == "generic"
    for tag in ("dot", "blocked"):
        deq = r[tag + "_q"].astype(np.float64) * r[tag + "_s"][:, None]
        np.testing.assert_allclose(r[tag + "_y"], r[tag + "_x"].astype(np.float64) @ deq.T, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(r[tag + "_dx"], r[tag + "_dy"].astype(np.float64) @ deq, rtol=1e-4, atol=1e-4)
        wm = r[tag + "_wm"].astype(np.float64)  # the mixed weight's dequantised values
        np.testing.assert_allclose(r[tag + "_ym"], r[tag + "_x"].astype(np.float64) @ wm.T, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(r[tag + "_dxm"], r[tag + "_dy"].astype(np.float64) @ wm, rtol=1e-4, atol=1e-4)
