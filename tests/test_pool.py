"""Max/avg/global-avg pooling against NumPy loops (ONNX semantics), onnxruntime, finite differences."""
import numpy as np
import pytest

from ftte_core import _kernels as K


def out_size(n, k, s, p0, p1, ceil_mode):
    span = n + p0 + p1 - k
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + p0:  # a window starting in the end padding is dropped
        out -= 1
    return out


def windows(H, W, kernel, stride, pad, ceil_mode):
    """Yields (oh, ow, h0, h1, w0, w1, padded_count) with [h0,h1)x[w0,w1) the real cells."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = kernel, stride, pad
    OH, OW = out_size(H, kh, sh, pt, pb, ceil_mode), out_size(W, kw, sw, pl, pr, ceil_mode)
    for oh in range(OH):
        hs = oh * sh - pt
        he = min(hs + kh, H + pb)
        for ow in range(OW):
            ws = ow * sw - pl
            we = min(ws + kw, W + pr)
            yield oh, ow, max(hs, 0), min(he, H), max(ws, 0), min(we, W), (he - hs) * (we - ws)


def oshape(x, kernel, stride, pad, ceil_mode):
    N, C, H, W = x.shape
    return (N, C, out_size(H, kernel[0], stride[0], pad[0], pad[2], ceil_mode),
            out_size(W, kernel[1], stride[1], pad[1], pad[3], ceil_mode))


def ref_max(x, kernel, stride, pad, ceil_mode):
    N, C, H, W = x.shape
    y = np.zeros(oshape(x, kernel, stride, pad, ceil_mode))
    am = np.zeros(y.shape, np.int64)
    for oh, ow, h0, h1, w0, w1, _ in windows(H, W, kernel, stride, pad, ceil_mode):
        win = x[:, :, h0:h1, w0:w1].reshape(N, C, -1)
        k = win.argmax(axis=2)  # first max
        y[:, :, oh, ow] = np.take_along_axis(win, k[..., None], 2)[..., 0]
        am[:, :, oh, ow] = (h0 + k // (w1 - w0)) * W + w0 + k % (w1 - w0)
    return y, am


def ref_avg(x, kernel, stride, pad, ceil_mode, cip):
    x = x.astype(np.float64)
    N, C, H, W = x.shape
    y = np.zeros(oshape(x, kernel, stride, pad, ceil_mode))
    for oh, ow, h0, h1, w0, w1, padded in windows(H, W, kernel, stride, pad, ceil_mode):
        n = padded if cip else (h1 - h0) * (w1 - w0)
        y[:, :, oh, ow] = x[:, :, h0:h1, w0:w1].sum(axis=(2, 3)) / n
    return y


def ref_avg_backward(dy, xshape, kernel, stride, pad, ceil_mode, cip):
    dx = np.zeros(xshape)
    H, W = xshape[2:]
    for oh, ow, h0, h1, w0, w1, padded in windows(H, W, kernel, stride, pad, ceil_mode):
        n = padded if cip else (h1 - h0) * (w1 - w0)
        dx[:, :, h0:h1, w0:w1] += dy[:, :, oh, ow][:, :, None, None] / n
    return dx


# (shape, kernel, stride, padding, ceil_mode)
CASES = [
    ((2, 3, 8, 8), (2, 2), (2, 2), (0, 0, 0, 0), False),
    ((1, 2, 7, 9), (3, 3), (2, 2), (1, 1, 1, 1), False),
    ((2, 1, 7, 9), (3, 3), (2, 2), (1, 1, 1, 1), True),
    ((1, 4, 9, 8), (3, 2), (2, 3), (0, 1, 2, 0), True),   # asymmetric, windows clipped at the end
    ((2, 2, 5, 5), (2, 2), (2, 2), (1, 1, 1, 1), True),   # ceil would add a pad-only window
    ((1, 3, 11, 6), (5, 3), (1, 1), (2, 1, 2, 1), False),
    ((3, 2, 6, 7), (1, 1), (2, 2), (0, 0, 0, 0), True),
    ((1, 1, 4, 4), (4, 4), (1, 1), (0, 0, 0, 0), False),
    ((2, 3, 14, 14), (2, 2), (2, 2), (0, 0, 0, 0), False),  # 2x2 rows of 7: the last 4-wide step overlaps
    ((1, 2, 6, 7), (2, 2), (2, 2), (0, 0, 0, 0), False),    # rows of 3: narrower than one step
]


@pytest.mark.parametrize("ci", range(len(CASES)))
def test_maxpool_matches_numpy(ci):
    shape, kernel, stride, pad, ceil_mode = CASES[ci]
    rng = np.random.default_rng(ci)
    x = rng.standard_normal(shape).astype(np.float32)
    want, want_am = ref_max(x, kernel, stride, pad, ceil_mode)
    y = np.full(want.shape, np.nan, np.float32)
    am = np.full(want.shape, -1, np.int32)
    K.maxpool2d_forward(x, y, am, kernel, stride, pad, ceil_mode)
    np.testing.assert_array_equal(y, want.astype(np.float32))
    np.testing.assert_array_equal(am, want_am)
    y2 = np.empty_like(y)
    K.maxpool2d_forward(x, y2, None, kernel, stride, padding=pad, ceil_mode=ceil_mode)
    np.testing.assert_array_equal(y2, y)

    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = np.full(shape, np.nan, np.float32)
    K.maxpool2d_backward(dy, am, dx)
    want_dx = np.zeros(shape)
    N, C, H, W = shape
    for n in range(N):
        for c in range(C):
            np.add.at(want_dx[n, c].reshape(-1), want_am[n, c].reshape(-1), dy[n, c].reshape(-1))
    np.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-6)


def test_maxpool_ties_and_padding():
    # Ties: the first max in row-major window order wins. Negative inputs: padding never wins.
    x = np.array([[[[1, 3, 3], [3, 2, 0], [-5, -5, -7]]]], np.float32)
    y = np.empty((1, 1, 2, 2), np.float32)
    am = np.empty((1, 1, 2, 2), np.int32)
    K.maxpool2d_forward(x, y, am, (2, 2), (1, 1))
    np.testing.assert_array_equal(am[0, 0], [[1, 1], [3, 4]])
    xn = -np.ones((1, 1, 3, 3), np.float32) - np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    y = np.empty((1, 1, 2, 2), np.float32)
    K.maxpool2d_forward(xn, y, am, (2, 2), (2, 2), (1, 1, 1, 1))
    np.testing.assert_array_equal(y[0, 0], [[-1, -2], [-4, -5]])
    np.testing.assert_array_equal(am[0, 0], [[0, 1], [3, 4]])


@pytest.mark.parametrize("cip", [False, True])
@pytest.mark.parametrize("ci", range(len(CASES)))
def test_avgpool_matches_numpy(ci, cip):
    shape, kernel, stride, pad, ceil_mode = CASES[ci]
    rng = np.random.default_rng(50 + ci)
    x = rng.standard_normal(shape).astype(np.float32)
    want = ref_avg(x, kernel, stride, pad, ceil_mode, cip)
    y = np.full(want.shape, np.nan, np.float32)
    K.avgpool2d_forward(x, y, kernel, stride, pad, ceil_mode, cip)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = np.full(shape, np.nan, np.float32)
    K.avgpool2d_backward(dy, dx, kernel, stride, pad, ceil_mode, count_include_pad=cip)
    np.testing.assert_allclose(dx, ref_avg_backward(dy, shape, kernel, stride, pad, ceil_mode, cip),
                               rtol=1e-5, atol=1e-6)


def _ort_run(op, x, **attrs):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    node = helper.make_node(op, ["x"], ["y"], **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    so = ort.SessionOptions()
    so.log_severity_level = 3  # ONNX shape inference disagrees about dropped ceil windows; ORT's run is what counts
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("ci", range(len(CASES)))
def test_matches_onnxruntime(ci):
    shape, kernel, stride, pad, ceil_mode = CASES[ci]
    x = np.random.default_rng(ci).standard_normal(shape).astype(np.float32)
    attrs = dict(kernel_shape=list(kernel), strides=list(stride), pads=list(pad), ceil_mode=int(ceil_mode))
    want = _ort_run("MaxPool", x, **attrs)
    y = np.empty(oshape(x, kernel, stride, pad, ceil_mode), np.float32)
    K.maxpool2d_forward(x, y, None, kernel, stride, pad, ceil_mode)
    np.testing.assert_array_equal(y, want)
    for cip in (0, 1):
        want = _ort_run("AveragePool", x, count_include_pad=cip, **attrs)
        K.avgpool2d_forward(x, y, kernel, stride, pad, ceil_mode, bool(cip))
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_global_avgpool():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5, 7, 6)).astype(np.float32)
    y = np.empty((3, 5), np.float32)
    K.global_avgpool_forward(x, y)
    np.testing.assert_allclose(y, x.astype(np.float64).mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    dy = rng.standard_normal((3, 5)).astype(np.float32)
    dx = np.empty_like(x)
    K.global_avgpool_backward(dy, dx)
    np.testing.assert_allclose(dx, np.broadcast_to(dy[:, :, None, None] / 42, x.shape), rtol=1e-6)


def _fd(loss, arr, idxs, eps):
    out = []
    for idx in idxs:
        old = arr[idx]
        arr[idx] = old + eps
        lp = loss()
        arr[idx] = old - eps
        lm = loss()
        arr[idx] = old
        out.append((lp - lm) / (2 * eps))
    return np.array(out)


@pytest.mark.parametrize("ci", [1, 3, 4])
def test_finite_differences(ci):
    """float64 central differences of L = sum(pool(x) * r) on the float64 reference forwards,
    against the kernels' backward. Maxpool inputs are spaced apart so eps never flips a max."""
    shape, kernel, stride, pad, ceil_mode = CASES[ci]
    rng = np.random.default_rng(7 + ci)
    n = int(np.prod(shape))
    x = (rng.permutation(n).reshape(shape) * 0.1).astype(np.float64)  # distinct, gaps of 0.1
    idxs = [tuple(rng.integers(0, s) for s in shape) for _ in range(15)]
    eps = 1e-3
    r = rng.standard_normal(oshape(x, kernel, stride, pad, ceil_mode))
    for cip in (False, True):
        dx = np.empty(shape, np.float32)
        K.avgpool2d_backward(r.astype(np.float32), dx, kernel, stride, pad, ceil_mode, cip)
        fd = _fd(lambda: float((ref_avg(x, kernel, stride, pad, ceil_mode, cip) * r).sum()), x, idxs, eps)
        np.testing.assert_allclose([dx[i] for i in idxs], fd, rtol=1e-4, atol=1e-5)
    x32 = x.astype(np.float32)
    y = np.empty(r.shape, np.float32)
    am = np.empty(r.shape, np.int32)
    K.maxpool2d_forward(x32, y, am, kernel, stride, pad, ceil_mode)
    dx = np.empty(shape, np.float32)
    K.maxpool2d_backward(r.astype(np.float32), am, dx)
    fd = _fd(lambda: float((ref_max(x, kernel, stride, pad, ceil_mode)[0] * r).sum()), x, idxs, eps)
    np.testing.assert_allclose([dx[i] for i in idxs], fd, rtol=1e-4, atol=1e-5)

    xg = rng.standard_normal((2, 3, 4, 5))
    rg = rng.standard_normal((2, 3))
    dxg = np.empty(xg.shape, np.float32)
    K.global_avgpool_backward(rg.astype(np.float32), dxg)
    gi = [tuple(rng.integers(0, s) for s in xg.shape) for _ in range(8)]
    fd = _fd(lambda: float((xg.mean(axis=(2, 3)) * rg).sum()), xg, gi, eps)
    np.testing.assert_allclose([dxg[i] for i in gi], fd, rtol=1e-4, atol=1e-6)


def test_thread_count_independent():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 16, 24, 24)).astype(np.float32)
    args = ((3, 3), (2, 2), (1, 1, 1, 1), True)
    before = K.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            K.set_num_threads(t)
            y = np.empty(oshape(x, *args[:3], args[3]), np.float32)
            am = np.empty(y.shape, np.int32)
            K.maxpool2d_forward(x, y, am, *args)
            dx1 = np.empty_like(x)
            K.maxpool2d_backward(y, am, dx1)
            ya = np.empty_like(y)
            K.avgpool2d_forward(x, ya, *args, True)
            dx2 = np.empty_like(x)
            K.avgpool2d_backward(ya, dx2, *args, False)
            outs.append((y, am, dx1, ya, dx2))
    finally:
        K.set_num_threads(before)
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_errors():
    x = np.zeros((2, 3, 8, 8), np.float32)
    y = np.zeros((2, 3, 4, 4), np.float32)
    am = np.zeros((2, 3, 4, 4), np.int32)
    K.maxpool2d_forward(x, y, am, (2, 2), (2, 2))
    with pytest.raises(ValueError, match=r"maxpool2d_forward: y has shape \(2, 3, 4, 4\).*must be 3"):
        K.maxpool2d_forward(x, y, am, (3, 3), (2, 2))
    with pytest.raises(ValueError, match="argmax must have dtype int32, got int64"):
        K.maxpool2d_forward(x, y, am.astype(np.int64), (2, 2), (2, 2))
    with pytest.raises(ValueError, match="padding must be smaller than the kernel"):
        K.maxpool2d_forward(x, np.zeros((2, 3, 5, 5), np.float32), None, (2, 2), (2, 2), (2, 2, 2, 2))
    with pytest.raises(ValueError, match="kernel must have 2 entries"):
        K.maxpool2d_forward(x, y, None, (2, 2, 2), (2, 2))
    with pytest.raises(ValueError, match="does not fit"):
        K.avgpool2d_forward(x, y, (9, 9), (1, 1))
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        K.avgpool2d_forward(np.zeros((2, 3, 8, 16), np.float32)[..., ::2], y, 2, 2)
    with pytest.raises(ValueError, match="y must have dtype float32"):
        K.avgpool2d_forward(x, y.astype(np.float64), 2, 2)
    with pytest.raises(ValueError, match="avgpool2d_backward: dy has shape"):
        K.avgpool2d_backward(np.zeros((2, 3, 5, 4), np.float32), x, 2, 2)
    bad = am.copy()
    bad[1, 2, 3, 3] = 64
    with pytest.raises(ValueError, match="maxpool2d_backward: argmax holds 64, outside the input plane"):
        K.maxpool2d_backward(y, bad, x)
    with pytest.raises(ValueError, match="dx has shape"):
        K.maxpool2d_backward(y, am, np.zeros((2, 4, 8, 8), np.float32))
    ro = np.zeros_like(y)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="y must be writable"):
        K.maxpool2d_forward(x, ro, None, 2, 2)
    with pytest.raises(ValueError, match="global_avgpool_forward: y has shape"):
        K.global_avgpool_forward(x, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="global_avgpool_backward: dx has shape"):
        K.global_avgpool_backward(np.zeros((2, 3), np.float32), np.zeros((3, 3, 2, 2), np.float32))


def test_maxpool_propagates_nan():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 0, 1] = np.nan
    x[0, 0, 3, 3] = np.nan
    x[0, 0, 2, 2] = 100
    y = np.empty((1, 1, 2, 2), np.float32)
    am = np.empty((1, 1, 2, 2), np.int32)
    K.maxpool2d_forward(x, y, am, 2, 2)
    assert np.isnan(y[0, 0, 0, 0]) and am[0, 0, 0, 0] == 1
    assert np.isnan(y[0, 0, 1, 1]) and am[0, 0, 1, 1] == 15
    assert y[0, 0, 0, 1] == 7 and y[0, 0, 1, 0] == 13


@pytest.mark.parametrize("hw", [(28, 28), (9, 30), (4, 6)])
def test_maxpool_2x2_fast_path_keeps_first_max_and_nan_rules(hw):
    """The vectorised 2x2/stride-2 path agrees with the window rule: first max wins, NaN sticks."""
    rng = np.random.default_rng(hw[1])
    H, W = hw
    x = rng.integers(0, 3, size=(3, 2, H, W)).astype(np.float32)  # many ties
    x.reshape(-1)[rng.choice(x.size, size=max(1, x.size // 50), replace=False)] = np.nan
    OH, OW = H // 2, W // 2
    y = np.empty((3, 2, OH, OW), np.float32)
    am = np.empty((3, 2, OH, OW), np.int32)
    K.maxpool2d_forward(x, y, am, (2, 2), (2, 2))
    for n in range(3):
        for c in range(2):
            for i in range(OH):
                for j in range(OW):
                    cells = [(2 * i, 2 * j), (2 * i, 2 * j + 1), (2 * i + 1, 2 * j), (2 * i + 1, 2 * j + 1)]
                    best, best_k = x[n, c, cells[0][0], cells[0][1]], 0
                    for k, (a, b) in enumerate(cells[1:], 1):
                        v = x[n, c, a, b]
                        if not (v <= best) and best == best:
                            best, best_k = v, k
                    a, b = cells[best_k]
                    assert am[n, c, i, j] == a * W + b
                    assert (np.isnan(best) and np.isnan(y[n, c, i, j])) or y[n, c, i, j] == best


# -- uint8 argmax: the max's position inside its window (what a training step keeps) ----------------

def window_positions(am, shape, kernel, stride, pad):
    """The plane indices of ref_max as positions inside each (padded) window."""
    W = shape[3]
    OH, OW = am.shape[2:]
    h_start = (np.arange(OH) * stride[0] - pad[0])[:, None]
    w_start = (np.arange(OW) * stride[1] - pad[1])[None, :]
    return (am // W - h_start) * kernel[1] + (am % W - w_start)


@pytest.mark.parametrize("ci", range(len(CASES)))
def test_maxpool_window_argmax_matches_numpy(ci):
    shape, kernel, stride, pad, ceil_mode = CASES[ci]
    rng = np.random.default_rng(100 + ci)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., ::3, 1::2] = x[..., ::3, :1]  # ties inside some windows: the first max must win
    want, want_am = ref_max(x, kernel, stride, pad, ceil_mode)
    y = np.full(want.shape, np.nan, np.float32)
    am = np.full(want.shape, 255, np.uint8)
    K.maxpool2d_forward(x, y, am, kernel, stride, pad, ceil_mode)
    np.testing.assert_array_equal(y, want.astype(np.float32))
    np.testing.assert_array_equal(am, window_positions(want_am, shape, kernel, stride, pad))

    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = np.full(shape, np.nan, np.float32)
    K.maxpool2d_backward(dy, am, dx, kernel, stride, pad, ceil_mode)
    am32 = np.empty(y.shape, np.int32)
    K.maxpool2d_forward(x, np.empty_like(y), am32, kernel, stride, pad, ceil_mode)
    dx32 = np.empty_like(dx)
    K.maxpool2d_backward(dy, am32, dx32)
    np.testing.assert_array_equal(dx, dx32)  # the same additions in the same order


def test_maxpool_window_argmax_ties_and_padding():
    x = np.array([[[[1, 3, 3], [3, 2, 0], [-5, -5, -7]]]], np.float32)
    am = np.empty((1, 1, 2, 2), np.uint8)
    K.maxpool2d_forward(x, np.empty((1, 1, 2, 2), np.float32), am, (2, 2), (1, 1))
    np.testing.assert_array_equal(am[0, 0], [[1, 0], [0, 0]])
    xn = -np.ones((1, 1, 3, 3), np.float32) - np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    K.maxpool2d_forward(xn, np.empty((1, 1, 2, 2), np.float32), am, (2, 2), (2, 2), (1, 1, 1, 1))
    np.testing.assert_array_equal(am[0, 0], [[3, 2], [1, 0]])  # padding (top/left) never wins
    # the 2x2 stride-2 fast paths with an odd height and width: vector lanes, the scalar tail,
    # and backward's last row and column (no window covers them: 0)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 7, 19)).astype(np.float32)
    x[0, 0, :2, :2] = 4.0  # four-way tie: position 0
    want, want_am = ref_max(x, (2, 2), (2, 2), (0, 0, 0, 0), False)
    am = np.empty(want.shape, np.uint8)
    K.maxpool2d_forward(x, np.empty(want.shape, np.float32), am, (2, 2), (2, 2))
    np.testing.assert_array_equal(am, window_positions(want_am, x.shape, (2, 2), (2, 2), (0, 0)))
    assert am[0, 0, 0, 0] == 0
    dy = rng.standard_normal(want.shape).astype(np.float32)
    dy[0, 0, 0, :3] = -0.0
    dx = np.full(x.shape, np.nan, np.float32)
    K.maxpool2d_backward(dy, am, dx, (2, 2), (2, 2))
    dx32 = np.full(x.shape, np.nan, np.float32)
    K.maxpool2d_backward(dy, want_am.astype(np.int32), dx32)
    np.testing.assert_array_equal(dx.view(np.int32), dx32.view(np.int32))  # bit for bit, -0 included
    assert not dx[:, :, 6, :].any() and not dx[:, :, :, 18].any()


@pytest.mark.parametrize("relu", [False, True])
def test_maxpool_window_argmax_thread_count_independent(relu):
    # relu: the fused ReLU's kernels, on an input with negatives, ties and zeros
    x = _relu_pool_input((8, 16, 24, 24), 7) if relu else \
        np.random.default_rng(2).standard_normal((8, 16, 24, 24)).astype(np.float32)
    before = K.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            K.set_num_threads(t)
            res = []
            for args in (((3, 3), (2, 2), (1, 1, 1, 1), True), ((2, 2), (2, 2), (0, 0, 0, 0), False)):
                y = np.empty(oshape(x, *args[:3], args[3]), np.float32)
                am = np.empty(y.shape, np.uint8)
                K.maxpool2d_forward(x, y, am, *args, relu=relu)
                dx = np.empty_like(x)
                K.maxpool2d_backward(y, am, dx, *args, relu=relu)
                res += [y, am, dx]
            outs.append(res)
    finally:
        K.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_array_equal(a, b)


def test_maxpool_window_argmax_errors():
    x = np.zeros((1, 2, 6, 6), np.float32)
    y = np.zeros((1, 2, 3, 3), np.float32)
    am = np.zeros((1, 2, 3, 3), np.uint8)
    big = np.zeros((1, 1, 17, 17), np.float32)
    with pytest.raises(ValueError, match="maxpool2d_forward: a uint8 argmax holds window positions, so the kernel "
                                         "must have at most 256 cells, got 17x16"):
        K.maxpool2d_forward(big, np.zeros((1, 1, 1, 2), np.float32), np.zeros((1, 1, 1, 2), np.uint8), (17, 16),
                            (1, 1))
    K.maxpool2d_forward(big, np.zeros((1, 1, 2, 2), np.float32), np.zeros((1, 1, 2, 2), np.uint8), (16, 16), (1, 1))
    with pytest.raises(ValueError, match=r"maxpool2d_forward: argmax has shape \(1, 2, 3, 2\)"):
        K.maxpool2d_forward(x, y, np.zeros((1, 2, 3, 2), np.uint8), (2, 2), (2, 2))
    with pytest.raises(ValueError, match="maxpool2d_backward: a uint8 argmax holds window positions: kernel and "
                                         "stride must be given"):
        K.maxpool2d_backward(y, am, x)
    with pytest.raises(ValueError, match=r"maxpool2d_backward: dy has shape \(3, 3\) per plane but this window "
                                         r"gives \(2, 2\)"):
        K.maxpool2d_backward(y, am, x, (3, 3), (3, 3))
    am[0, 1, 2, 2] = 4
    with pytest.raises(ValueError, match="maxpool2d_backward: argmax holds 4, not a real cell of its 2x2 window"):
        K.maxpool2d_backward(y, am, x, (2, 2), (2, 2))
    # a position in the padding: window (0, 0) of a 2x2 pool with top/left padding 1 has only cell 3 real
    am = np.zeros((1, 2, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="maxpool2d_backward: argmax holds 0, not a real cell of its 2x2 window"):
        K.maxpool2d_backward(np.zeros((1, 2, 4, 4), np.float32), am, x, (2, 2), (2, 2), (1, 1, 1, 1))
    with pytest.raises(ValueError, match="maxpool2d_backward: dx must not be dy"):
        K.maxpool2d_backward(y, np.zeros((1, 2, 3, 3), np.uint8), y.reshape(1, 2, 3, 3), (1, 1), (1, 1))


def test_maxpool_backward_checks_only_edge_windows_but_all_of_them():
    """The uint8 backward's check visits only windows reaching into padding or past the end, and
    names the first bad position in output order; the int32 check catches negatives and HW."""
    x = np.zeros((2, 3, 6, 6), np.float32)
    # left/right padding only: the edge windows are the first and last columns of every row
    dy = np.zeros((2, 3, 5, 4), np.float32)
    am = np.zeros(dy.shape, np.uint8)  # position 0 is the padded left column of window column 0
    am[..., 1:] = 1  # and position 1 of window column 3 is the padded right column
    with pytest.raises(ValueError, match="argmax holds 0, not a real cell of its 2x2 window"):
        K.maxpool2d_backward(dy, am, x, (2, 2), (1, 2), (0, 1, 0, 1))
    am[..., 0] = 1
    with pytest.raises(ValueError, match="argmax holds 1, not a real cell"):  # the right padding
        K.maxpool2d_backward(dy, am, x, (2, 2), (1, 2), (0, 1, 0, 1))
    am[..., 3] = 0
    dx = np.full(x.shape, np.nan, np.float32)
    K.maxpool2d_backward(dy, am, dx, (2, 2), (1, 2), (0, 1, 0, 1))
    assert not dx.any()
    # ceil_mode: the last row of windows runs past the end (rows 6 of a 7-row input), columns do not
    x = np.zeros((1, 2, 7, 4), np.float32)
    dy = np.ones((1, 2, 4, 2), np.float32)
    am = np.zeros(dy.shape, np.uint8)
    am[0, 1, 1, 1] = 3  # inside: fine
    am[0, 1, 3, 0] = 2  # bottom row of the last window: past the end
    am[0, 1, 3, 1] = 3
    with pytest.raises(ValueError, match="argmax holds 2, not a real cell"):  # the first in output order
        K.maxpool2d_backward(dy, am, x, (2, 2), (2, 2), (0, 0, 0, 0), True)
    am[0, 1, 3, 0] = 1
    with pytest.raises(ValueError, match="argmax holds 3, not a real cell"):
        K.maxpool2d_backward(dy, am, x, (2, 2), (2, 2), (0, 0, 0, 0), True)
    am[0, 1, 3, 1] = 0
    K.maxpool2d_backward(dy, am, x, (2, 2), (2, 2), (0, 0, 0, 0), True)
    assert x[0, 1, 3, 3] == 1 and x[0, 1, 6, 1] == 1 and x.sum() == 16
    # int32: a negative index, the plane size, and the first bad one is named
    dy = np.ones((1, 1, 2, 2), np.float32)
    for bad, first in (([0, -1, 5, 3], -1), ([0, 16, -7, 3], 16), ([15, 0, 1, 2], None)):
        am32 = np.array(bad, np.int32).reshape(1, 1, 2, 2)
        dx = np.empty((1, 1, 4, 4), np.float32)
        if first is None:
            K.maxpool2d_backward(dy, am32, dx)
            assert dx.sum() == 4 and dx[0, 0, 3, 3] == 1
        else:
            with pytest.raises(ValueError, match=f"argmax holds {first}, outside the input plane"):
                K.maxpool2d_backward(dy, am32, dx)


def _ref_2x2_sequential(x):
    """The window rule over (top-left, top-right, bottom-left, bottom-right) with NumPy selects:
    take v if not (v <= best) and best == best. Returns values (bits kept) and positions 0..3."""
    H, W = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    cells = [x[:, :, 0:H:2, 0:W:2], x[:, :, 0:H:2, 1:W:2], x[:, :, 1:H:2, 0:W:2], x[:, :, 1:H:2, 1:W:2]]
    best, pos = cells[0].copy(), np.zeros(cells[0].shape, np.int64)
    with np.errstate(invalid="ignore"):
        for k, v in enumerate(cells[1:], 1):
            take = ~(v <= best) & (best == best)
            best, pos = np.where(take, v, best), np.where(take, k, pos)
    return best, pos


@pytest.mark.parametrize("hw", [(2, 2), (4, 6), (5, 7), (6, 8), (3, 14), (8, 15), (28, 28), (14, 14), (9, 30),
                                (7, 19), (2, 18), (4, 2)])
def test_maxpool_2x2_fast_path_bits_ties_signed_zeros_and_nan_planes(hw):
    """Both argmax forms of the 2x2 stride-2 path, bit for bit against the sequential rule: ties
    (first wins), +0/-0 ties (the first zero's bits), planes with and without NaN (a NaN plane is
    redone by the exact path; its neighbours must not be), widths below, at and off multiples of 4."""
    H, W = hw
    rng = np.random.default_rng(H * 100 + W)
    x = rng.integers(-2, 3, size=(3, 5, H, W)).astype(np.float32)  # many ties
    zeros = rng.random(x.shape) < 0.3
    x[zeros] = np.where(rng.random(int(zeros.sum())) < 0.5, 0.0, -0.0).astype(np.float32)
    x[x > 0] *= -1  # all <= 0 in some windows: zero ties decide the max
    x[1] = rng.standard_normal(x[1].shape)
    nan_planes = [(0, 1), (2, 4), (1, 0)]
    for n, c in nan_planes:
        x[n, c].reshape(-1)[rng.integers(0, H * W, size=max(1, H * W // 9))] = np.nan
    x[2, 3, :2, :2] = [[np.nan, -np.nan], [np.nan, 1.0]]  # the first NaN wins (its sign bit shows it)
    want, want_pos = _ref_2x2_sequential(x)
    OH, OW = H // 2, W // 2
    for dtype in (np.uint8, np.int32):
        y = np.full((3, 5, OH, OW), 7.0, np.float32)
        am = np.zeros((3, 5, OH, OW), dtype)
        K.maxpool2d_forward(x, y, am, (2, 2), (2, 2))
        np.testing.assert_array_equal(y.view(np.int32), want.view(np.int32))  # bits: -0, NaN signs
        if dtype == np.uint8:
            np.testing.assert_array_equal(am, want_pos)
        else:
            rows = 2 * np.arange(OH)[:, None] + want_pos // 2
            cols = 2 * np.arange(OW)[None, :] + want_pos % 2
            np.testing.assert_array_equal(am, rows * W + cols)
    # no argmax at all (inference): the same values
    y2 = np.empty_like(y)
    K.maxpool2d_forward(x, y2, None, (2, 2), (2, 2))
    np.testing.assert_array_equal(y2.view(np.int32), want.view(np.int32))


def test_maxpool_2x2_with_padding_or_ceil_mode_takes_the_general_path():
    rng = np.random.default_rng(9)
    x = rng.integers(-1, 2, size=(2, 3, 7, 9)).astype(np.float32)
    x[0, 1, 3, 4] = np.nan
    for pad, ceil_mode in (((1, 1, 1, 1), False), ((0, 0, 0, 0), True), ((0, 1, 0, 0), True)):
        want, want_am = ref_max(x, (2, 2), (2, 2), pad, ceil_mode)
        y = np.empty(want.shape, np.float32)
        am = np.empty(want.shape, np.int32)
        K.maxpool2d_forward(x, y, am, (2, 2), (2, 2), pad, ceil_mode)
        np.testing.assert_array_equal(y, want.astype(np.float32))
        np.testing.assert_array_equal(am, want_am)
        am8 = np.empty(want.shape, np.uint8)
        K.maxpool2d_forward(x, y, am8, (2, 2), (2, 2), pad, ceil_mode)
        np.testing.assert_array_equal(am8, window_positions(want_am, x.shape, (2, 2), (2, 2), pad))


# -- relu=True: a ReLU fused into the max-pool that is its only reader ---------------------------

RELU_CASES = [  # (shape, kernel, stride, padding, ceil_mode)
    ((2, 3, 8, 8), (2, 2), (2, 2), (0, 0, 0, 0), False),     # the 2x2 stride-2 fast path
    ((3, 5, 28, 28), (2, 2), (2, 2), (0, 0, 0, 0), False),   # CNN-28's pool1
    ((2, 3, 7, 19), (2, 2), (2, 2), (0, 0, 0, 0), False),    # odd H and W: last row and column
    ((2, 2, 6, 7), (2, 2), (2, 2), (0, 0, 0, 0), False),     # rows of 3: the scalar tail
    ((2, 3, 9, 11), (3, 3), (2, 2), (1, 1, 1, 1), False),    # overlapping windows, padding
    ((2, 2, 7, 9), (3, 3), (2, 2), (1, 1, 1, 1), True),      # ceil_mode
    ((2, 2, 7, 9), (2, 2), (2, 2), (0, 0, 0, 0), True),      # 2x2 with ceil_mode: the general path
    ((1, 2, 11, 6), (5, 3), (1, 1), (2, 1, 2, 1), False),
]


def _relu_pool_input(shape, seed):
    """Negatives, all-negative windows, +0/-0 and equal-positive ties, NaN (either sign)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=shape).astype(np.float32)  # many ties among positives
    zeros = rng.random(shape) < 0.2
    x[zeros] = np.where(rng.random(int(zeros.sum())) < 0.5, 0.0, -0.0).astype(np.float32)
    x[0, 0] = -np.abs(x[0, 0]) - 1  # a plane with no positive cell at all
    x[-1, -1] = rng.standard_normal(shape[2:])  # and a plane of distinct values
    nan = rng.random(shape) < 0.05
    x[nan] = np.where(rng.random(int(nan.sum())) < 0.5, np.nan, -np.nan).astype(np.float32)
    return x


def _relu_then_pool(x, kernel, stride, pad, ceil_mode, dy):
    """The unfused kernels: relu_forward_mask, then the uint8 max-pool; backward likewise."""
    r = np.empty_like(x)
    mask = np.empty(((x.size + 7) // 8,), np.uint8)
    K.relu_forward_mask(x, r, mask)
    y = np.empty(oshape(x, kernel, stride, pad, ceil_mode), np.float32)
    am = np.empty(y.shape, np.uint8)
    K.maxpool2d_forward(r, y, am, kernel, stride, pad, ceil_mode)
    d_pool = np.empty_like(x)
    K.maxpool2d_backward(dy, am, d_pool, kernel, stride, pad, ceil_mode)
    dx = np.empty_like(x)
    K.relu_backward_mask(mask, d_pool, dx)
    return y, am, dx


@pytest.mark.parametrize("ci", range(len(RELU_CASES)))
def test_maxpool_relu_is_relu_then_maxpool_bit_for_bit(ci):
    shape, kernel, stride, pad, ceil_mode = RELU_CASES[ci]
    x = _relu_pool_input(shape, 300 + ci)
    # the NumPy rule: relu (a NaN gives +0), then the first max of each window
    with np.errstate(invalid="ignore"):
        relu = np.where(x > 0, x, np.float32(0))
    want, want_am = ref_max(relu, kernel, stride, pad, ceil_mode)
    want_pos = np.where(want > 0, window_positions(want_am, shape, kernel, stride, pad), 255)

    rng = np.random.default_rng(400 + ci)
    dy = rng.standard_normal(want.shape).astype(np.float32)
    dy.reshape(-1)[::7] = -0.0
    dy.reshape(-1)[3::11] = np.nan
    ref_y, ref_am, ref_dx = _relu_then_pool(x, kernel, stride, pad, ceil_mode, dy)

    y = np.full(want.shape, 7.0, np.float32)
    am = np.full(want.shape, 17, np.uint8)
    K.maxpool2d_forward(x, y, am, kernel, stride, pad, ceil_mode, relu=True)
    np.testing.assert_array_equal(y.view(np.int32), want.astype(np.float32).view(np.int32))  # +0, never -0
    np.testing.assert_array_equal(y.view(np.int32), ref_y.view(np.int32))
    np.testing.assert_array_equal(am, want_pos)
    np.testing.assert_array_equal(am, np.where(ref_y > 0, ref_am, 255))
    assert (am == 255).any() and (am != 255).any()

    y_frozen = np.full_like(y, 7.0)  # no argmax (a frozen forward): the same values
    K.maxpool2d_forward(x, y_frozen, None, kernel, stride, pad, ceil_mode, relu=True)
    np.testing.assert_array_equal(y_frozen.view(np.int32), y.view(np.int32))

    dx = np.full(shape, 5.0, np.float32)
    K.maxpool2d_backward(dy, am, dx, kernel, stride, pad, ceil_mode, relu=True)
    np.testing.assert_array_equal(dx.view(np.int32), ref_dx.view(np.int32))  # NaN and -0 dy included


def test_maxpool_relu_errors():
    x = np.zeros((1, 2, 6, 6), np.float32)
    y = np.zeros((1, 2, 3, 3), np.float32)
    am = np.full((1, 2, 3, 3), 255, np.uint8)
    # 255 is the fused backward's sentinel, not a cell: the unfused backward refuses it
    with pytest.raises(ValueError, match="maxpool2d_backward: argmax holds 255, not a real cell of its 2x2 window"):
        K.maxpool2d_backward(y, am, x, (2, 2), (2, 2))
    K.maxpool2d_backward(y, am, x, (2, 2), (2, 2), relu=True)
    am[0, 1, 2, 2] = 4
    with pytest.raises(ValueError, match="maxpool2d_backward: argmax holds 4, not a real cell of its 2x2 window"):
        K.maxpool2d_backward(y, am, x, (2, 2), (2, 2), relu=True)
    # a padding cell: window (0, 0) of a 2x2 pool with top/left padding 1 has only cell 3 real
    am = np.full((1, 2, 4, 4), 255, np.uint8)
    K.maxpool2d_backward(np.zeros((1, 2, 4, 4), np.float32), am, x, (2, 2), (2, 2), (1, 1, 1, 1), relu=True)
    am[0, 0, 0, 0] = 0
    with pytest.raises(ValueError, match="maxpool2d_backward: argmax holds 0, not a real cell of its 2x2 window"):
        K.maxpool2d_backward(np.zeros((1, 2, 4, 4), np.float32), am, x, (2, 2), (2, 2), (1, 1, 1, 1), relu=True)
    with pytest.raises(ValueError, match="maxpool2d_backward: relu=True takes the uint8 argmax"):
        K.maxpool2d_backward(y, np.zeros((1, 2, 3, 3), np.int32), x, (2, 2), (2, 2), relu=True)
    with pytest.raises(ValueError, match="maxpool2d_forward: relu=True keeps a uint8 argmax"):
        K.maxpool2d_forward(x, y, np.zeros((1, 2, 3, 3), np.int32), (2, 2), (2, 2), relu=True)
    # a 256-cell window has a position 255: no room for the sentinel
    big = np.zeros((1, 1, 16, 16), np.float32)
    one = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="maxpool2d_forward: a uint8 argmax holds window positions, so the kernel "
                                         "must have at most 255 cells with relu=True, got 16x16"):
        K.maxpool2d_forward(big, one, np.zeros((1, 1, 1, 1), np.uint8), (16, 16), (1, 1), relu=True)
    with pytest.raises(ValueError, match="at most 255 cells with relu=True"):
        K.maxpool2d_backward(one, np.zeros((1, 1, 1, 1), np.uint8), big, (16, 16), (1, 1), relu=True)
    big[0, 0, 15, 15] = 2.0  # without an argmax any window works
    K.maxpool2d_forward(big, one, None, (16, 16), (1, 1), relu=True)
    assert one[0, 0, 0, 0] == 2.0


@pytest.mark.parametrize("relu", [False, True])
def test_maxpool_backward_finds_a_bad_position_anywhere(relu):
    """The position check's max runs 16 bytes at a time, then the tail: a bad value in either."""
    x = np.zeros((1, 2, 10, 10), np.float32)
    dy = np.ones((1, 2, 5, 5), np.float32)  # 50 positions: 3 vectors and 2 left over
    for where in (0, 7, 31, 47, 48, 49):
        am = np.full(dy.shape, 255 if relu else 3, np.uint8)
        am.reshape(-1)[where] = 4
        with pytest.raises(ValueError, match="argmax holds 4, not a real cell of its 2x2 window"):
            K.maxpool2d_backward(dy, am, x, (2, 2), (2, 2), relu=relu)
        am.reshape(-1)[where] = 1
        K.maxpool2d_backward(dy, am, x, (2, 2), (2, 2), relu=relu)
        assert x.sum() == (1 if relu else 50) and x.reshape(2, -1)[where // 25].any()
