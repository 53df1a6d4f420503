"""Graph-op kernels (issue 10): frozen batch norm with selected-channel parameter gradients,
broadcast add/mul forward/backward, channel concat. NumPy references (float64), finite
differences, thread-count invariance, bad-input errors and onnxruntime agreement."""
import numpy as np
import pytest

from ftte_core import _kernels as K

BN_SHAPES = [(1, 1), (4, 3), (2, 5, 7), (3, 4, 5, 6), (2, 16, 9, 9), (1, 3, 1, 1), (0, 3, 4)]


def _threads(n):
    class _T:
        def __enter__(self):
            self.before = K.get_num_threads()
            K.set_num_threads(n)

        def __exit__(self, *a):
            K.set_num_threads(self.before)
    return _T()


def _bn_params(rng, C):
    scale = rng.standard_normal(C).astype(np.float32)
    shift = rng.standard_normal(C).astype(np.float32)
    mean = rng.standard_normal(C).astype(np.float32)
    var = (rng.random(C) + 0.1).astype(np.float32)
    return scale, shift, mean, var


def _bshape(C, nd):
    return (1, C) + (1,) * (nd - 2)


def _bn_ref(x, scale, shift, mean, var, eps):
    s = _bshape(len(scale), x.ndim)
    x = x.astype(np.float64)
    return (scale.reshape(s) * (x - mean.reshape(s)) / np.sqrt(var.astype(np.float64).reshape(s) + eps)
            + shift.reshape(s))


def _bn_grads_ref(x, scale, mean, var, eps, dy, sel):
    nd = x.ndim
    s = _bshape(len(scale), nd)
    axes = tuple(i for i in range(nd) if i != 1)
    inv = 1.0 / np.sqrt(var.astype(np.float64) + eps)
    xhat = (x.astype(np.float64) - mean.reshape(s)) * inv.reshape(s)
    dy = dy.astype(np.float64)
    dscale = (dy * xhat).sum(axis=axes)[sel]
    dshift = dy.sum(axis=axes)[sel]
    dx = dy * (scale.astype(np.float64) * inv).reshape(s)
    return dscale, dshift, dx


def _rows_cases(rng, C):
    yield None
    yield np.arange(C, dtype=np.int32)
    yield np.array([C - 1], dtype=np.int32)
    yield rng.choice(C, size=max(1, C // 3), replace=False).astype(np.int32)
    yield np.zeros(0, dtype=np.int32)


# ------------------------------------------------------------------------------------------------
# batch norm
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batchnorm_forward(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    scale, shift, mean, var = _bn_params(rng, shape[1])
    y = np.full(shape, np.nan, np.float32)
    K.batchnorm_forward(x, scale, shift, mean, var, 1e-5, y)
    np.testing.assert_allclose(y, _bn_ref(x, scale, shift, mean, var, 1e-5), rtol=1e-5, atol=1e-5)
    # in place
    x2 = x.copy()
    K.batchnorm_forward(x2, scale, shift, mean, var, 1e-5, x2)
    np.testing.assert_array_equal(x2, y)


@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batchnorm_backward(shape):
    rng = np.random.default_rng(7 + sum(shape))
    C = shape[1]
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    scale, _, mean, var = _bn_params(rng, C)
    eps = 1e-3
    n_sum = max(1, int(np.prod(shape)) // C)
    tol = dict(rtol=1e-4, atol=1e-5 * np.sqrt(n_sum) * 4)
    for rows in _rows_cases(rng, C):
        sel = np.arange(C) if rows is None else rows
        R = len(sel)
        ds_ref, db_ref, dx_ref = _bn_grads_ref(x, scale, mean, var, eps, dy, sel)
        dscale = np.full(R, np.nan, np.float32)
        dshift = np.full(R, np.nan, np.float32)
        dx = np.full(shape, np.nan, np.float32)
        K.batchnorm_backward(x, scale, mean, var, eps, dy, rows, dscale, dshift, dx)
        np.testing.assert_allclose(dscale, ds_ref, **tol)
        np.testing.assert_allclose(dshift, db_ref, **tol)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)
        # accumulate adds onto dscale/dshift
        d0 = rng.standard_normal(R).astype(np.float32)
        dscale, dshift = d0.copy(), d0.copy()
        K.batchnorm_backward(x, scale, mean, var, eps, dy, rows, dscale, dshift, None, accumulate=True)
        np.testing.assert_allclose(dscale, d0 + ds_ref, **tol)
        np.testing.assert_allclose(dshift, d0 + db_ref, **tol)
    # dx only, without x; and in place on dy
    dx = np.empty_like(dy)
    K.batchnorm_backward(None, scale, mean, var, eps, dy, None, None, None, dx)
    dy2 = dy.copy()
    ds = np.empty(C, np.float32)
    K.batchnorm_backward(x, scale, mean, var, eps, dy2, None, ds, None, dy2)
    np.testing.assert_array_equal(dy2, dx)
    np.testing.assert_allclose(ds, _bn_grads_ref(x, scale, mean, var, eps, dy, np.arange(C))[0], **tol)


def test_batchnorm_finite_differences():
    """Loss L = sum(w * y); float64 central differences of the reference forward against the kernel."""
    rng = np.random.default_rng(3)
    shape, eps = (3, 4, 5), 1e-3
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(shape).astype(np.float32)
    scale, shift, mean, var = _bn_params(rng, 4)
    rows = np.array([2, 0], np.int32)
    dscale, dshift, dx = np.empty(2, np.float32), np.empty(2, np.float32), np.empty(shape, np.float32)
    K.batchnorm_backward(x, scale, mean, var, eps, w, rows, dscale, dshift, dx)

    def loss(x_, scale_, shift_):
        return float((w.astype(np.float64) * _bn_ref(x_, scale_, shift_, mean, var, eps)).sum())

    h = 1e-3
    x64, s64, b64 = x.astype(np.float64), scale.astype(np.float64), shift.astype(np.float64)
    for r, c in enumerate(rows):
        e = np.zeros(4)
        e[c] = h
        np.testing.assert_allclose(dscale[r], (loss(x64, s64 + e, b64) - loss(x64, s64 - e, b64)) / (2 * h),
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dshift[r], (loss(x64, s64, b64 + e) - loss(x64, s64, b64 - e)) / (2 * h),
                                   rtol=1e-4, atol=1e-4)
    for idx in [(0, 0, 0), (2, 3, 4), (1, 2, 1)]:
        e = np.zeros(shape)
        e[idx] = h
        fd = (loss(x64 + e, s64, b64) - loss(x64 - e, s64, b64)) / (2 * h)
        np.testing.assert_allclose(dx[idx], fd, rtol=1e-4, atol=1e-4)


def test_batchnorm_threads_identical():
    rng = np.random.default_rng(11)
    shape = (16, 32, 17, 19)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    scale, shift, mean, var = _bn_params(rng, 32)
    rows = rng.choice(32, 9, replace=False).astype(np.int32)
    outs = []
    for n in (1, 2):
        with _threads(n):
            y = np.empty_like(x)
            K.batchnorm_forward(x, scale, shift, mean, var, 1e-5, y)
            ds, db, dx = np.empty(9, np.float32), np.empty(9, np.float32), np.empty_like(x)
            K.batchnorm_backward(x, scale, mean, var, 1e-5, dy, rows, ds, db, dx)
            outs.append([a.tobytes() for a in (y, ds, db, dx)])
    assert outs[0] == outs[1]


def test_batchnorm_errors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    s, b, m, v = _bn_params(rng, 3)
    y = np.empty_like(x)
    f = K.batchnorm_forward
    with pytest.raises(ValueError, match="batchnorm_forward: scale has shape"):
        f(x, s[:2], b, m, v, 1e-5, y)
    with pytest.raises(ValueError, match="dtype float32"):
        f(x.astype(np.float64), s, b, m, v, 1e-5, y)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        f(x[0, 0].copy(), s, b, m, v, 1e-5, np.empty(4, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        f(x.transpose(0, 2, 1), s, b, m, v, 1e-5, y)
    with pytest.raises(ValueError, match="must match"):
        f(x, s, b, m, v, 1e-5, y[:1].copy())
    with pytest.raises(ValueError, match="var\\[1\\] \\+ eps must be > 0"):
        f(x, s, b, m, np.array([1, -1, 1], np.float32), 1e-5, y)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        f(x, s, b, m, v, -1.0, y)
    buf = np.zeros(x.size + 1, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        f(buf[1:].reshape(x.shape), s, b, m, v, 1e-5, buf[:-1].reshape(x.shape))
    raw = np.zeros(x.size * 4 + 1, np.uint8)
    mis = np.frombuffer(raw.data, np.float32, count=x.size, offset=1).reshape(x.shape)
    with pytest.raises(ValueError, match="aligned"):
        f(mis, s, b, m, v, 1e-5, y)
    g = K.batchnorm_backward
    with pytest.raises(ValueError, match="rows holds 3"):
        g(x, s, m, v, 1e-5, x, np.array([3], np.int32), np.empty(1, np.float32), None, None)
    with pytest.raises(ValueError, match="dscale has shape"):
        g(x, s, m, v, 1e-5, x, np.array([1], np.int32), np.empty(3, np.float32), None, None)
    with pytest.raises(ValueError, match="x is required"):
        g(None, s, m, v, 1e-5, x, None, np.empty(3, np.float32), None, None)
    with pytest.raises(ValueError, match="must not share memory"):
        ds = np.empty(3, np.float32)
        g(x, s, m, v, 1e-5, x, None, ds, ds, None)


# ------------------------------------------------------------------------------------------------
# broadcast add / mul
# ------------------------------------------------------------------------------------------------

BCAST = [
    ((2, 3, 4, 5), (1, 3, 1, 1)),
    ((2, 3, 4, 5), (3, 1, 1)),
    ((2, 3, 4, 5), ()),
    ((2, 3, 4, 5), (1,)),
    ((2, 3, 4, 5), (2, 3, 4, 5)),
    ((2, 3, 4, 5), (5,)),
    ((2, 3, 4, 5), (2, 1, 4, 1)),
    ((2, 3, 4, 5), (1, 3, 4, 5)),
    ((4, 6), (6,)),
    ((4, 6), (4, 1)),
    ((3, 1, 5), (1, 1, 5)),
    ((7,), (7,)),
    ((), ()),
    ((0, 3, 2), (1, 3, 1)),
    ((64, 16, 12, 12), (1, 16, 1, 1)),
    ((3, 20000), (3, 20000)),  # one long row, split into pieces
    ((2, 3, 20000), (1, 3, 1)),
    ((3, 20000), (20000,)),
]


def _reduce_to(g, bshape):
    nd = g.ndim
    pad = (1,) * (nd - len(bshape)) + tuple(bshape)
    axes = tuple(i for i in range(nd) if pad[i] == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(bshape) if nd else g.reshape(bshape)


@pytest.mark.parametrize("ashape,bshape", BCAST)
def test_add_mul_forward_backward(ashape, bshape):
    rng = np.random.default_rng(len(ashape) * 10 + len(bshape))
    a = rng.standard_normal(ashape).astype(np.float32)
    b = rng.standard_normal(bshape).astype(np.float32)
    dy = rng.standard_normal(ashape).astype(np.float32)
    a64, b64, dy64 = (t.astype(np.float64) for t in (a, b, dy))
    nsum = max(1, a.size // max(1, b.size))
    tol = dict(rtol=1e-5, atol=1e-5 * np.sqrt(nsum) * 4)
    for op, ref in ((K.add_forward, a64 + b64), (K.mul_forward, a64 * b64)):
        y = np.full(ashape, np.nan, np.float32)
        op(a, b, y)
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
        a2 = a.copy()
        op(a2, b, a2)  # in place
        np.testing.assert_array_equal(a2, y)
    da = np.full(ashape, np.nan, np.float32)
    db = np.full(bshape, np.nan, np.float32)
    K.add_backward(dy, da=da, db=db)
    np.testing.assert_array_equal(da, dy)
    np.testing.assert_allclose(db, _reduce_to(dy64, bshape), **tol)
    da = np.full(ashape, np.nan, np.float32)
    db = np.full(bshape, np.nan, np.float32)
    K.mul_backward(a, b, dy, da, db)
    np.testing.assert_allclose(da, dy64 * b64, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(db, _reduce_to(dy64 * a64, bshape), **tol)
    # da in place on dy, db computed from the original dy
    dy2 = dy.copy()
    db2 = np.empty(bshape, np.float32)
    K.mul_backward(a, b, dy2, dy2, db2)
    np.testing.assert_array_equal(dy2, da)
    np.testing.assert_array_equal(db2, db)
    # only da for add: no b shape needed
    da = np.empty(ashape, np.float32)
    K.add_backward(dy, da=da)
    np.testing.assert_array_equal(da, dy)


def test_add_mul_finite_differences():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((2, 3, 4)).astype(np.float32)
    b = rng.standard_normal((3, 1)).astype(np.float32)
    w = rng.standard_normal((2, 3, 4)).astype(np.float32)
    da, db = np.empty_like(a), np.empty_like(b)
    K.mul_backward(a, b, w, da, db)
    h = 1e-4
    a64, b64, w64 = a.astype(np.float64), b.astype(np.float64), w.astype(np.float64)

    def loss(a_, b_):
        return float((w64 * (a_ * b_)).sum())

    for i in range(3):
        e = np.zeros(b.shape)
        e[i, 0] = h
        np.testing.assert_allclose(db[i, 0], (loss(a64, b64 + e) - loss(a64, b64 - e)) / (2 * h), rtol=1e-4, atol=1e-5)
    for idx in [(0, 0, 0), (1, 2, 3)]:
        e = np.zeros(a.shape)
        e[idx] = h
        np.testing.assert_allclose(da[idx], (loss(a64 + e, b64) - loss(a64 - e, b64)) / (2 * h), rtol=1e-4, atol=1e-5)
    K.add_backward(w, da=da, db=db)
    for i in range(3):
        e = np.zeros(b.shape)
        e[i, 0] = h
        fd = ((w64 * (a64 + b64 + e)).sum() - (w64 * (a64 + b64 - e)).sum()) / (2 * h)
        np.testing.assert_allclose(db[i, 0], fd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bshape", [(1, 32, 1, 1), (), (16, 32, 17, 19), (19,), (16, 1, 17, 1)])
def test_add_mul_threads_identical(bshape):
    rng = np.random.default_rng(9)
    a = rng.standard_normal((16, 32, 17, 19)).astype(np.float32)
    b = rng.standard_normal(bshape).astype(np.float32)
    dy = rng.standard_normal(a.shape).astype(np.float32)
    outs = []
    for n in (1, 2):
        with _threads(n):
            y1, y2 = np.empty_like(a), np.empty_like(a)
            K.add_forward(a, b, y1)
            K.mul_forward(a, b, y2)
            da, db, db2 = np.empty_like(a), np.empty(bshape, np.float32), np.empty(bshape, np.float32)
            K.mul_backward(a, b, dy, da, db)
            K.add_backward(dy, db=db2)
            outs.append([t.tobytes() for t in (y1, y2, da, db, db2)])
    assert outs[0] == outs[1]


def test_add_mul_errors():
    a = np.zeros((2, 3, 4), np.float32)
    y = np.empty_like(a)
    with pytest.raises(ValueError, match=r"add_forward: b of shape \(2,\) does not broadcast to a's shape \(2, 3, 4\)"):
        K.add_forward(a, np.zeros(2, np.float32), y)
    with pytest.raises(ValueError, match="does not broadcast"):
        K.mul_forward(a, np.zeros((1, 2, 3, 4), np.float32), y)
    with pytest.raises(ValueError, match="y has shape"):
        K.add_forward(a, np.zeros(4, np.float32), np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match="dtype float32"):
        K.add_forward(a, np.zeros(4, np.float64), y)
    with pytest.raises(ValueError, match="overlap"):
        K.add_forward(a, y[0, 0], y)  # b is a slice of y
    with pytest.raises(ValueError, match="must be writable"):
        ro = np.empty_like(a)
        ro.flags.writeable = False
        K.add_forward(a, a, ro)
    with pytest.raises(ValueError, match="db of shape|does not broadcast"):
        K.add_backward(a, db=np.empty(5, np.float32))
    with pytest.raises(ValueError, match="db has shape"):
        K.mul_backward(a, np.zeros(4, np.float32), a, None, np.empty(3, np.float32))
    with pytest.raises(ValueError, match="must not share memory"):
        K.mul_backward(a, np.zeros(4, np.float32), a, None, a[0, 0])
    K.add_backward(a, b_shape=(3, 1), da=y)  # b_shape is only checked
    with pytest.raises(ValueError, match="does not broadcast"):
        K.add_backward(a, b_shape=(5,), da=y)
    with pytest.raises(ValueError, match="b_shape must hold integers"):
        K.add_backward(a, b_shape=("x",), da=y)
    with pytest.raises(ValueError, match="pass b_shape only without db"):
        K.add_backward(a, b_shape=(4,), db=np.empty(4, np.float32))
    raw = np.zeros(a.size * 4 + 1, np.uint8)
    mis = np.frombuffer(raw.data, np.float32, count=a.size, offset=1).reshape(a.shape)
    with pytest.raises(ValueError, match="aligned"):
        K.add_forward(mis, np.zeros(4, np.float32), y)


# ------------------------------------------------------------------------------------------------
# concat
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rest", [(), (5,), (3, 4), (0,)])
@pytest.mark.parametrize("cs", [(1,), (2, 3), (4, 0, 1, 2)])
def test_concat(rest, cs):
    rng = np.random.default_rng(len(rest) + len(cs))
    N = 3
    xs = [rng.standard_normal((N, c) + rest).astype(np.float32) for c in cs]
    y = np.full((N, sum(cs)) + rest, np.nan, np.float32)
    K.concat_forward(xs, y)
    np.testing.assert_array_equal(y, np.concatenate(xs, axis=1))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dxs = [np.full((N, c) + rest, np.nan, np.float32) for c in cs]
    dxs[0] = None if len(cs) > 1 else dxs[0]
    K.concat_backward(dy, list(cs), dxs)
    parts = np.split(dy, np.cumsum(cs)[:-1], axis=1)
    for d, p in zip(dxs, parts):
        if d is not None:
            np.testing.assert_array_equal(d, p)


def test_concat_threads_and_errors():
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((32, c, 9, 9)).astype(np.float32) for c in (8, 16)]
    outs = []
    for n in (1, 2):
        with _threads(n):
            y = np.empty((32, 24, 9, 9), np.float32)
            K.concat_forward(xs, y)
            d = [np.empty_like(x) for x in xs]
            K.concat_backward(y, [8, 16], d)
            outs.append([t.tobytes() for t in [y] + d])
    assert outs[0] == outs[1]
    y = np.empty((32, 24, 9, 9), np.float32)
    with pytest.raises(ValueError, match="concat_forward: y has 23 channels but the inputs have 24"):
        K.concat_forward(xs, np.empty((32, 23, 9, 9), np.float32))
    with pytest.raises(ValueError, match=r"xs\[1\] has shape"):
        K.concat_forward([xs[0], xs[1][:, :, :8].copy()], y)
    with pytest.raises(ValueError, match="at least one"):
        K.concat_forward([], y)
    with pytest.raises(ValueError, match="list of arrays"):
        K.concat_forward(xs[0], y)
    with pytest.raises(ValueError, match=r"y must not share memory with xs\[0\]"):
        K.concat_forward([y.reshape(-1)[: xs[0].size].reshape(xs[0].shape), xs[1]], y)
    with pytest.raises(ValueError, match="channels sum to 23"):
        K.concat_backward(y, [8, 15], [None, None])
    with pytest.raises(ValueError, match=r"dxs\[1\] has shape"):
        K.concat_backward(y, [8, 16], [None, np.empty((32, 8, 9, 9), np.float32)])
    with pytest.raises(ValueError, match="dxs has 2 entries but channels has 1"):
        K.concat_backward(y, [24], [None, None])


# ------------------------------------------------------------------------------------------------
# onnxruntime
# ------------------------------------------------------------------------------------------------

def _ort_run(node, inputs, out_shape, initializers=()):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, list(out_shape))],
        [numpy_helper.from_array(v, n) for n, v in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0]


@pytest.mark.parametrize("shape", [(4, 6), (2, 5, 7), (2, 3, 8, 8)])
def test_batchnorm_matches_onnxruntime(shape):
    pytest.importorskip("onnxruntime")
    from onnx import helper
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(np.float32)
    s, b, m, v = _bn_params(rng, shape[1])
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)
    ref = _ort_run(node, {"x": x}, shape, [("s", s), ("b", b), ("m", m), ("v", v)])
    y = np.empty_like(x)
    K.batchnorm_forward(x, s, b, m, v, 1e-3, y)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ashape,bshape", [((2, 3, 4, 5), (1, 3, 1, 1)), ((2, 3, 4, 5), (3, 1, 1)),
                                           ((2, 3, 4, 5), ()), ((4, 6), (4, 6))])
@pytest.mark.parametrize("op", ["Add", "Mul"])
def test_add_mul_match_onnxruntime(op, ashape, bshape):
    pytest.importorskip("onnxruntime")
    from onnx import helper
    rng = np.random.default_rng(4)
    a = rng.standard_normal(ashape).astype(np.float32)
    b = rng.standard_normal(bshape).astype(np.float32)
    ref = _ort_run(helper.make_node(op, ["a", "b"], ["y"]), {"a": a, "b": b}, ashape)
    y = np.empty_like(a)
    (K.add_forward if op == "Add" else K.mul_forward)(a, b, y)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rest", [(), (7,), (5, 6)])
def test_concat_matches_onnxruntime(rest):
    pytest.importorskip("onnxruntime")
    from onnx import helper
    rng = np.random.default_rng(6)
    xs = {f"x{i}": rng.standard_normal((2, c) + rest).astype(np.float32) for i, c in enumerate((3, 1, 4))}
    out = (2, 8) + rest
    ref = _ort_run(helper.make_node("Concat", list(xs), ["y"], axis=1), xs, out)
    y = np.empty(out, np.float32)
    K.concat_forward(list(xs.values()), y)
    np.testing.assert_array_equal(y, ref)


# ------------------------------------------------------------------------------------------------
# accumulate (gradients summed where DAG paths join)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ashape,bshape", [((2, 3, 4, 5), (1, 3, 1, 1)), ((3, 20000), (3, 20000)), ((4, 6), ())])
def test_backward_accumulate(ashape, bshape):
    rng = np.random.default_rng(8)
    a = rng.standard_normal(ashape).astype(np.float32)
    b = rng.standard_normal(bshape).astype(np.float32)
    dy = rng.standard_normal(ashape).astype(np.float32)
    da0 = rng.standard_normal(ashape).astype(np.float32)
    db0 = rng.standard_normal(bshape).astype(np.float32)
    for backward in (lambda da, db, acc: K.add_backward(dy, da=da, db=db, accumulate=acc),
                     lambda da, db, acc: K.mul_backward(a, b, dy, da, db, accumulate=acc)):
        da, db = np.empty(ashape, np.float32), np.empty(bshape, np.float32)
        backward(da, db, False)
        da1, db1 = da0.copy(), db0.copy()
        backward(da1, db1, True)
        # aarch64/armv7 g++ contracts da0 + dy*b into one fused multiply-add, which rounds once
        np.testing.assert_allclose(da1, da0 + da, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(db1, db0 + db, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="da must not share memory with dy"):
        K.add_backward(dy, da=dy, accumulate=True)
    with pytest.raises(ValueError, match="da must not share memory with dy"):
        K.mul_backward(a, b, dy, dy, None, accumulate=True)


def test_concat_backward_accumulate():
    rng = np.random.default_rng(12)
    dy = rng.standard_normal((3, 5, 4)).astype(np.float32)
    d0 = [rng.standard_normal((3, c, 4)).astype(np.float32) for c in (2, 3)]
    d = [x.copy() for x in d0]
    K.concat_backward(dy, [2, 3], d, accumulate=True)
    np.testing.assert_array_equal(d[0], d0[0] + dy[:, :2])
    np.testing.assert_array_equal(d[1], d0[1] + dy[:, 2:])
