"""conv2d forward/backward against a float64 NumPy reference, finite differences, errors, threads."""
import numpy as np
import pytest

from ftte_core import _kernels as K


def out_size(n, k, s, p0, p1):
    return (n + p0 + p1 - k) // s + 1


def ref_forward(x, w, b, stride, pad):
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    sh, sw = stride
    pt, pl, pb, pr = pad
    N, C, H, W = x.shape
    OC, _, KH, KW = w.shape
    OH, OW = out_size(H, KH, sh, pt, pb), out_size(W, KW, sw, pl, pr)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    y = np.zeros((N, OC, OH, OW))
    for i in range(KH):
        for j in range(KW):
            patch = xp[:, :, i:i + sh * (OH - 1) + 1:sh, j:j + sw * (OW - 1) + 1:sw]
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


def ref_backward(x, w, dy, stride, pad):
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    dy = dy.astype(np.float64)
    sh, sw = stride
    pt, pl, pb, pr = pad
    N, C, H, W = x.shape
    OC, _, KH, KW = w.shape
    OH, OW = dy.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    dxp = np.zeros_like(xp)
    dw = np.zeros(w.shape)
    for i in range(KH):
        for j in range(KW):
            sl = (slice(None), slice(None), slice(i, i + sh * (OH - 1) + 1, sh), slice(j, j + sw * (OW - 1) + 1, sw))
            dw[:, :, i, j] = np.einsum("nohw,nchw->oc", dy, xp[sl])
            dxp[sl] += np.einsum("nohw,oc->nchw", dy, w[:, :, i, j])
    dx = dxp[:, :, pt:pt + H, pl:pl + W]
    return dx, dw, dy.sum(axis=(0, 2, 3))


# (N, C, H, W, OC, KH, KW, stride, padding)
CASES = [
    (2, 1, 7, 9, 3, 3, 3, (1, 1), (1, 1, 1, 1)),
    (3, 4, 11, 8, 5, 3, 3, (2, 2), (1, 0, 2, 1)),
    (1, 3, 9, 9, 2, 5, 5, (1, 1), (2, 2, 2, 2)),
    (2, 5, 6, 7, 4, 1, 1, (1, 1), (0, 0, 0, 0)),  # pointwise fast path
    (2, 3, 6, 7, 4, 1, 1, (2, 1), (0, 1, 1, 0)),  # 1x1 but strided/padded: im2col path
    (1, 2, 10, 13, 3, 5, 3, (3, 2), (0, 2, 1, 0)),
    (2, 2, 5, 5, 3, 3, 5, (1, 2), (3, 0, 0, 3)),  # padding wider than some windows: pad-only rows
    (1, 3, 4, 4, 2, 4, 4, (1, 1), (0, 0, 0, 0)),  # kernel covers the whole input
    # stride 1 with OW == W: im2col/col2im as one run of the plane per tap, wrapped columns zeroed
    (2, 2, 5, 6, 3, 3, 3, (1, 1), (3, 2, 0, 0)),  # pad-only rows above, wrap on the left only
    (1, 3, 4, 9, 2, 1, 3, (1, 1), (0, 0, 0, 2)),  # 1x3, all the padding on the right
    (2, 1, 6, 1, 2, 3, 1, (1, 1), (2, 0, 1, 0)),  # one-column map: every row is its own run
]


def make(case, seed):
    N, C, H, W, OC, KH, KW, stride, pad = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((OC, C, KH, KW)).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    OH, OW = out_size(H, KH, stride[0], pad[0], pad[2]), out_size(W, KW, stride[1], pad[1], pad[3])
    return rng, x, w, b, (N, OC, OH, OW)


@pytest.mark.parametrize("ci", range(len(CASES)))
def test_forward_matches_numpy(ci):
    case = CASES[ci]
    _, x, w, b, yshape = make(case, ci)
    stride, pad = case[7], case[8]
    y = np.full(yshape, np.nan, np.float32)
    K.conv2d_forward(x, w, b, y, stride, pad)
    np.testing.assert_allclose(y, ref_forward(x, w, b, stride, pad), rtol=1e-4, atol=1e-4)
    y2 = np.full(yshape, np.nan, np.float32)
    K.conv2d_forward(x, w, None, y2, stride=stride, padding=pad)
    np.testing.assert_allclose(y2, ref_forward(x, w, None, stride, pad), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ci", range(len(CASES)))
@pytest.mark.parametrize("subset", [False, True])
def test_backward_matches_numpy(ci, subset):
    case = CASES[ci]
    rng, x, w, b, yshape = make(case, 100 + ci)
    stride, pad = case[7], case[8]
    OC = w.shape[0]
    dy = rng.standard_normal(yshape).astype(np.float32)
    rdx, rdw, rdb = ref_backward(x, w, dy, stride, pad)
    if subset:
        rows = rng.choice(OC, size=max(1, OC // 2), replace=False).astype(np.int32)
    else:
        rows = None
    sel = np.arange(OC) if rows is None else rows
    R = len(sel)
    dw = np.full((R,) + w.shape[1:], np.nan, np.float32)
    db = np.full(R, np.nan, np.float32)
    dx = np.full(x.shape, np.nan, np.float32)
    K.conv2d_backward(x, w, dy, rows, dw, db, dx, stride, pad)
    np.testing.assert_allclose(dw, rdw[sel], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, rdb[sel], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)

    # accumulate adds into what is there; None skips an output.
    dw0 = rng.standard_normal(dw.shape).astype(np.float32)
    db0 = rng.standard_normal(db.shape).astype(np.float32)
    dw2, db2 = dw0.copy(), db0.copy()
    K.conv2d_backward(x, w, dy, rows, dw2, db2, None, stride, pad, accumulate=True)
    np.testing.assert_allclose(dw2, dw0 + rdw[sel], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db2, db0 + rdb[sel], rtol=1e-4, atol=1e-4)
    dx2 = np.full(x.shape, np.nan, np.float32)
    K.conv2d_backward(x, w, dy, rows, None, None, dx2, stride, pad)
    np.testing.assert_array_equal(dx2, dx)


def test_empty_and_repeated_rows():
    rng, x, w, b, yshape = make(CASES[1], 7)
    stride, pad = CASES[1][7], CASES[1][8]
    dy = rng.standard_normal(yshape).astype(np.float32)
    _, rdw, rdb = ref_backward(x, w, dy, stride, pad)
    rows = np.array([], np.int32)
    K.conv2d_backward(x, w, dy, rows, np.zeros((0,) + w.shape[1:], np.float32), np.zeros(0, np.float32), None,
                      stride, pad)
    rows = np.array([2, 0, 2], np.int32)
    dw = np.zeros((3,) + w.shape[1:], np.float32)
    db = np.zeros(3, np.float32)
    K.conv2d_backward(x, w, dy, rows, dw, db, None, stride, pad)
    np.testing.assert_allclose(dw, rdw[rows], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, rdb[rows], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", [
    (2, 3, 6, 5, 4, 3, 3, (2, 1), (1, 0, 0, 2)),
    # stride 1, OW == W: the one-run-per-tap im2col/col2im, a pad-only row above; 45 positions per
    # plane, so the bias gradient's 16 running sums and their tail both count
    (2, 2, 5, 9, 3, 3, 3, (1, 1), (2, 1, 0, 1)),
])
def test_finite_differences(case):
    """Kernel backward vs float64 central differences of L = sum(conv(x, w, b) * r)."""
    rng, x, w, b, yshape = make(case, 3)
    stride, pad = case[7], case[8]
    r = rng.standard_normal(yshape)
    loss = lambda x_, w_, b_: float((ref_forward(x_, w_, b_, stride, pad) * r).sum())
    dx = np.empty_like(x)
    dw = np.empty_like(w)
    db = np.empty_like(b)
    K.conv2d_backward(x, w, r.astype(np.float32), None, dw, db, dx, stride, pad)
    x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    eps = 1e-3
    for arr, grad in ((x64, dx), (w64, dw), (b64, db)):
        for idx in [tuple(rng.integers(0, s) for s in arr.shape) for _ in range(12)]:
            old = arr[idx]
            arr[idx] = old + eps
            lp = loss(x64, w64, b64)
            arr[idx] = old - eps
            lm = loss(x64, w64, b64)
            arr[idx] = old
            # The loss is linear in each argument, so FD is exact up to float64 rounding; the
            # tolerance covers the kernel's float32 sums of ~100 terms of size ~1.
            assert abs((lp - lm) / (2 * eps) - grad[idx]) < 1e-3 * (1 + abs(grad[idx]))


def test_float32_forward_finite_differences():
    """Same check with the kernel's own float32 forward: coarse, but ties forward and backward together."""
    case = (1, 2, 5, 5, 2, 3, 3, (1, 1), (1, 1, 1, 1))
    rng, x, w, b, yshape = make(case, 4)
    r = rng.standard_normal(yshape).astype(np.float32)
    y = np.empty(yshape, np.float32)

    def loss():
        K.conv2d_forward(x, w, b, y, (1, 1), (1, 1, 1, 1))
        return float((y.astype(np.float64) * r).sum())

    dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)
    K.conv2d_backward(x, w, r, None, dw, db, dx, (1, 1), (1, 1, 1, 1))
    eps = 1e-2  # float32 forward: rounding error ~1e-6 * |L| / eps stays far below the 2e-2 tolerance
    for arr, grad in ((x, dx), (w, dw), (b, db)):
        for idx in [tuple(rng.integers(0, s) for s in arr.shape) for _ in range(6)]:
            old = arr[idx]
            arr[idx] = old + eps
            lp = loss()
            arr[idx] = old - eps
            lm = loss()
            arr[idx] = old
            assert abs((lp - lm) / (2 * eps) - grad[idx]) < 2e-2 * (1 + abs(grad[idx]))


def test_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    stride, pad = (2, 1), (1, 0, 2, 1)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=list(stride), pads=list(pad))
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape)
                                        for n, a in (("x", x), ("w", w), ("b", b))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x, "w": w, "b": b})[0]
    y = np.empty(want.shape, np.float32)
    K.conv2d_forward(x, w, b, y, stride, pad)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def _run_all(x, w, b, rows, stride, pad, dy):
    y = np.empty(dy.shape, np.float32)
    K.conv2d_forward(x, w, b, y, stride, pad)
    R = w.shape[0] if rows is None else len(rows)
    dw = np.full((R,) + w.shape[1:], 0.5, np.float32)
    db = np.full(R, 0.5, np.float32)
    dx = np.empty_like(x)
    K.conv2d_backward(x, w, dy, rows, dw, db, dx, stride, pad, accumulate=True)
    return y, dw, db, dx


@pytest.mark.parametrize("N", [1, 13])
def test_thread_count_independent(N):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((N, 8, 19, 17)).astype(np.float32)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    stride, pad = (1, 1), (1, 1, 1, 1)
    dy = rng.standard_normal((N, 16, 19, 17)).astype(np.float32)
    rows = np.array([1, 4, 5, 9, 15], np.int32)
    before = K.get_num_threads()
    try:
        K.set_num_threads(1)
        one = _run_all(x, w, b, rows, stride, pad, dy)
        K.set_num_threads(2)
        two = _run_all(x, w, b, rows, stride, pad, dy)
        K.set_num_threads(3)
        three = _run_all(x, w, b, rows, stride, pad, dy)
    finally:
        K.set_num_threads(before)
    for a, b_, c in zip(one, two, three):
        np.testing.assert_array_equal(a, b_)
        np.testing.assert_array_equal(a, c)


def test_scratch_is_per_image():
    """Forward scratch is one image's column matrix per thread, released afterwards."""
    N, C, H, W, OC = 6, 4, 12, 10, 8
    x = np.ones((N, C, H, W), np.float32)
    w = np.ones((OC, C, 3, 3), np.float32)
    y = np.empty((N, OC, H, W), np.float32)
    before = K.get_num_threads()
    try:
        K.set_num_threads(1)
        base = K.workspace_current_bytes()
        K.reset_workspace_peak()
        K.conv2d_forward(x, w, None, y, (1, 1), (1, 1, 1, 1))
        assert K.workspace_current_bytes() == base
        used = K.workspace_peak_bytes() - base
        one_image_cols = C * 9 * H * W * 4
        assert one_image_cols <= used <= one_image_cols + 64 * 1024  # + whatever sgemm packs
    finally:
        K.set_num_threads(before)


def test_errors():
    x = np.zeros((2, 3, 8, 8), np.float32)
    w = np.zeros((4, 3, 3, 3), np.float32)
    b = np.zeros(4, np.float32)
    y = np.zeros((2, 4, 6, 6), np.float32)
    K.conv2d_forward(x, w, b, y)  # the valid call
    with pytest.raises(ValueError, match=r"conv2d_forward: y has shape \(2, 4, 6, 6\).*must be 8"):
        K.conv2d_forward(x, w, b, y, padding=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="conv2d_forward: y has shape"):
        K.conv2d_forward(x, w, b, np.zeros((2, 4, 6, 5), np.float32))
    with pytest.raises(ValueError, match="x must have dtype float32, got float64"):
        K.conv2d_forward(x.astype(np.float64), w, b, y)
    with pytest.raises(ValueError, match="w has shape .* dimension 1 must be 3"):
        K.conv2d_forward(x, np.zeros((4, 2, 3, 3), np.float32), b, y)
    with pytest.raises(ValueError, match="b has shape"):
        K.conv2d_forward(x, w, np.zeros(5, np.float32), y)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        K.conv2d_forward(np.zeros((2, 3, 8, 16), np.float32)[..., ::2], w, b, y)
    ro = np.zeros_like(y)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="y must be writable"):
        K.conv2d_forward(x, w, b, ro)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        K.conv2d_forward(x[0], w, b, y)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        K.conv2d_forward(x, w, b, y, stride=(0, 1))
    with pytest.raises(ValueError, match="padding must have 4 entries"):
        K.conv2d_forward(x, w, b, y, padding=(1, 1))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        K.conv2d_forward(x, w, b, y, padding=(-1, 0, 0, 0))
    with pytest.raises(ValueError, match="does not fit"):
        K.conv2d_forward(x, np.zeros((4, 3, 9, 3), np.float32), b, y)
    with pytest.raises(ValueError, match="must be a numpy array"):
        K.conv2d_forward([[1.0]], w, b, y)

    dy = np.zeros_like(y)
    with pytest.raises(ValueError, match="conv2d_backward: rows holds 4, outside"):
        K.conv2d_backward(x, w, dy, np.array([0, 4], np.int32), np.zeros((2, 3, 3, 3), np.float32), None, None)
    with pytest.raises(ValueError, match="rows must have dtype int32"):
        K.conv2d_backward(x, w, dy, np.array([0, 1], np.int64), np.zeros((2, 3, 3, 3), np.float32), None, None)
    with pytest.raises(ValueError, match="dw has shape .* dimension 0 must be 2"):
        K.conv2d_backward(x, w, dy, np.array([0, 1], np.int32), np.zeros((4, 3, 3, 3), np.float32), None, None)
    with pytest.raises(ValueError, match="db has shape"):
        K.conv2d_backward(x, w, dy, None, None, np.zeros(3, np.float32), None)
    with pytest.raises(ValueError, match="dx has shape"):
        K.conv2d_backward(x, w, dy, None, None, None, np.zeros((2, 3, 8, 7), np.float32))
    with pytest.raises(ValueError, match="dy has shape"):
        K.conv2d_backward(x, w, dy[:, :, :5].copy(), None, None, None, None)


def test_window_out_size():
    assert K.window_out_size(8, 3, 1, 1, 1) == 8
    assert K.window_out_size(8, 3, 2, 0, 0) == 3
    assert K.window_out_size(8, 3, 2, 0, 0, True) == 4
    # ceil would add a window starting in the end padding: dropped, as onnxruntime does.
    assert K.window_out_size(5, 2, 2, 1, 1, True) == 3
    assert K.window_out_size(2, 3, 1, 0, 0) <= 0


def test_bias_only_and_dx_only_without_x():
    """x may be None when dw is not wanted (graph.py computes a whole bias gradient that way)."""
    rng, x, w, b, yshape = make(CASES[1], 9)
    stride, pad = CASES[1][7], CASES[1][8]
    dy = rng.standard_normal(yshape).astype(np.float32)
    rdx, _, rdb = ref_backward(x, w, dy, stride, pad)
    db = np.empty(w.shape[0], np.float32)
    K.conv2d_backward(None, w, dy, None, None, db, None, stride, pad)
    np.testing.assert_allclose(db, rdb, rtol=1e-4, atol=1e-4)
    dx = np.empty_like(x)
    K.conv2d_backward(None, w, dy, None, None, None, dx, stride, pad)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="x is needed to compute dw"):
        K.conv2d_backward(None, w, dy, None, np.empty_like(w), None, None, stride, pad)


def test_empty_batch():
    x = np.zeros((0, 2, 5, 5), np.float32)
    w = np.ones((3, 2, 3, 3), np.float32)
    y = np.zeros((0, 3, 3, 3), np.float32)
    K.conv2d_forward(x, w, None, y)
    dw = np.full(w.shape, np.nan, np.float32)
    db = np.full(3, np.nan, np.float32)
    K.conv2d_backward(x, w, y, None, dw, db, np.zeros_like(x))
    assert not dw.any() and not db.any()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("N", [1, 3, 20])
def test_scratch_bytes_matches_recorded_peak(threads, N):
    """conv2d_scratch_bytes (for the cost model) is what the kernels really hold, GEMM packing included."""
    rng = np.random.default_rng(N)
    C, H, W, OC = 4, 11, 9, 12
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((OC, C, 3, 3)).astype(np.float32)
    stride, pad = (1, 2), (1, 1, 0, 1)
    y = np.empty((N, OC, 10, 5), np.float32)
    rows = np.array([0, 5, 7], np.int32)
    dw = np.empty((3, C, 3, 3), np.float32)
    dx = np.empty_like(x)
    calls = [
        (lambda: K.conv2d_forward(x, w, None, y, stride, pad), dict()),
        (lambda: K.conv2d_backward(x, w, y, rows, dw, None, dx, stride, pad), dict(backward=True, n_rows=3)),
        (lambda: K.conv2d_backward(x, w, y, rows, dw, None, None, stride, pad),
         dict(backward=True, n_rows=3, dx=False)),
        (lambda: K.conv2d_backward(None, w, y, None, None, None, dx, stride, pad), dict(backward=True, dw=False)),
    ]
    before = K.get_num_threads()
    try:
        K.set_num_threads(threads)
        for call, kw in calls:
            want = K.conv2d_scratch_bytes(x.shape, w.shape, stride, pad, threads=threads, **kw)
            base = K.workspace_current_bytes()
            K.reset_workspace_peak()
            call()
            used = K.workspace_peak_bytes() - base
            # GEMM packing included: exact on one thread, an upper bound on several (how much
            # is live at once depends on scheduling).
            assert used <= want, (kw, used, want)
            if threads == 1:
                assert want == used, (kw, used, want)
    finally:
        K.set_num_threads(before)
    # pointwise reads x directly: no columns, only the GEMM's packing panels
    xp = np.ones((2, 3, 8, 8), np.float32)
    wp = np.ones((4, 3, 1, 1), np.float32)
    K.set_num_threads(1)
    try:
        base = K.workspace_current_bytes()
        K.reset_workspace_peak()
        K.conv2d_forward(xp, wp, None, np.empty((2, 4, 8, 8), np.float32))
        used = K.workspace_peak_bytes() - base
        assert K.conv2d_scratch_bytes(xp.shape, wp.shape, threads=1) == used
        assert used < 4 * (3 * 64)  # less than one image's columns would take
    finally:
        K.set_num_threads(before)
    with pytest.raises(ValueError, match="conv2d_scratch_bytes: w_shape must be"):
        K.conv2d_scratch_bytes((2, 3, 8, 8), (4, 2, 3, 3))


# ---- column tiles: a map whose column matrix exceeds the cap is built and consumed in tiles ----
TILE_CAP = 256 * 1024  # kTileBytes in csrc/conv2d.cpp
TILE_GRANULE = 16  # kTileGranule

# (N, C, H, W, OC, KH, KW, stride, padding): column matrices over the cap, cut unevenly
TILED_CASES = [
    (2, 7, 45, 53, 5, 5, 5, (2, 2), (2, 1, 1, 2)),  # K=175, P=572: tiles 288 + 284, cut mid-row
    (2, 16, 33, 33, 6, 3, 3, (1, 2), (0, 1, 2, 0)),  # K=144, P=528: 272 + 256, odd map
    (1, 16, 31, 35, 4, 3, 3, (1, 1), (1, 1, 1, 1)),  # K=144, P=1085: 3 tiles of 368/368/349
    (2, 456, 3, 40, 3, 3, 3, (1, 1), (1, 1, 1, 1)),  # K=4104 > 4096: 16-wide tiles, narrower than a row
]


def _tiles(case):
    """(widths of the tiles, bytes of one tile's columns) as conv2d.cpp cuts them."""
    N, C, H, W, OC, KH, KW, stride, pad = case
    Kc = C * KH * KW
    P = out_size(H, KH, stride[0], pad[0], pad[2]) * out_size(W, KW, stride[1], pad[1], pad[3])
    widest = max(TILE_GRANULE, TILE_CAP // (Kc * 4) // TILE_GRANULE * TILE_GRANULE)
    if P <= widest:
        return [P], Kc * P * 4
    tiles = -(-P // widest)
    T = -(-(-(-P // tiles)) // TILE_GRANULE) * TILE_GRANULE
    widths = [min(T, P - p0) for p0 in range(0, P, T)]
    return widths, Kc * T * 4


@pytest.mark.parametrize("ci", range(len(TILED_CASES)))
def test_tiled_maps_match_numpy_and_stay_under_the_cap(ci):
    case = TILED_CASES[ci]
    widths, tile_bytes = _tiles(case)
    assert len(widths) > 1 and len(set(widths)) > 1  # the cases do cut the map, unevenly
    rng, x, w, b, yshape = make(case, 200 + ci)
    stride, pad = case[7], case[8]
    OC = w.shape[0]
    dy = rng.standard_normal(yshape).astype(np.float32)
    rdx, rdw, rdb = ref_backward(x, w, dy, stride, pad)
    rows = np.sort(rng.choice(OC, size=OC - 1, replace=False)).astype(np.int32)
    whole_image = x.shape[1] * w.shape[2] * w.shape[3] * yshape[2] * yshape[3] * 4
    before = K.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            K.set_num_threads(threads)
            y = np.full(yshape, np.nan, np.float32)
            dw = np.full((len(rows),) + w.shape[1:], np.nan, np.float32)
            db = np.full(len(rows), np.nan, np.float32)
            dx = np.full(x.shape, np.nan, np.float32)
            base = K.workspace_current_bytes()
            K.reset_workspace_peak()
            K.conv2d_forward(x, w, b, y, stride, pad)
            used_f = K.workspace_peak_bytes() - base
            K.reset_workspace_peak()
            K.conv2d_backward(x, w, dy, rows, dw, db, dx, stride, pad)
            used_b = K.workspace_peak_bytes() - base
            assert K.workspace_current_bytes() == base
            results.append((y, dw, db, dx))
            if threads == 1:
                want_f = K.conv2d_scratch_bytes(x.shape, w.shape, stride, pad, threads=1)
                want_b = K.conv2d_scratch_bytes(x.shape, w.shape, stride, pad, backward=True, n_rows=len(rows),
                                                threads=1)
                assert (used_f, used_b) == (want_f, want_b)
                # one tile of columns (at most the cap, or 16 columns when K alone is wider)
                # plus the GEMM's packing panels, plus dW partials in backward; never the
                # whole image's columns
                assert used_f < whole_image
                # GEMM packing: a few panels, at most a packed copy of the tile (dW with the
                # dot path off, FTTE_GEMM_DOT=0) plus A's panels
                packing = tile_bytes + 64 * 1024
                assert used_f <= max(TILE_CAP, x.shape[1] * w.shape[2] * w.shape[3] * TILE_GRANULE * 4) + packing
                partials = (min(x.shape[0], 8) - 1) * len(rows) * dw[0].size * 4
                assert tile_bytes <= used_b <= tile_bytes + packing + partials
        y, dw, db, dx = results[0]
        np.testing.assert_allclose(y, ref_forward(x, w, b, stride, pad), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dw, rdw[rows], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(db, rdb[rows], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
        for other in results[1:]:
            for a, c in zip(results[0], other):
                np.testing.assert_array_equal(a, c)
    finally:
        K.set_num_threads(before)


def test_tiled_finite_differences():
    """Backward of a tiled map (stride 2, padding, uneven tiles) vs float64 central differences."""
    case = (1, 7, 45, 53, 3, 5, 5, (2, 2), (2, 1, 1, 2))
    assert len(_tiles(case)[0]) > 1
    rng, x, w, b, yshape = make(case, 31)
    stride, pad = case[7], case[8]
    r = rng.standard_normal(yshape)
    loss = lambda x_, w_, b_: float((ref_forward(x_, w_, b_, stride, pad) * r).sum())
    dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)
    K.conv2d_backward(x, w, r.astype(np.float32), None, dw, db, dx, stride, pad)
    x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    eps = 1e-3
    for arr, grad in ((x64, dx), (w64, dw), (b64, db)):
        for idx in [tuple(rng.integers(0, s) for s in arr.shape) for _ in range(8)]:
            old = arr[idx]
            arr[idx] = old + eps
            lp = loss(x64, w64, b64)
            arr[idx] = old - eps
            lm = loss(x64, w64, b64)
            arr[idx] = old
            # linear loss: exact up to rounding; dW sums ~600 float32 terms here
            assert abs((lp - lm) / (2 * eps) - grad[idx]) < 2e-3 * (1 + abs(grad[idx]))


def test_dw_partials_only_for_chunks_running_at_once():
    """Backward sums image chunks' dW in chunk order, in waves of as many chunks as run at once:
    one partial buffer on one thread (was chunks - 1 = 7 for a batch of 20), results unchanged."""
    rng = np.random.default_rng(8)
    N, C, H, W, OC = 20, 6, 9, 7, 10
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((OC, C, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((N, OC, H, W)).astype(np.float32)
    pad = (1, 1, 1, 1)
    one_dw = OC * C * 9 * 4
    for threads in (1, 2, 3):
        with_partials = K.conv2d_scratch_bytes(x.shape, w.shape, (1, 1), pad, backward=True, threads=threads)
        single_image = K.conv2d_scratch_bytes((1, C, H, W), w.shape, (1, 1), pad, backward=True, threads=threads)
        assert with_partials - single_image * threads == threads * one_dw
    _, rdw, _ = ref_backward(x, w, dy, (1, 1), pad)
    before = K.get_num_threads()
    try:
        K.set_num_threads(1)
        dw = np.empty_like(w)
        base = K.workspace_current_bytes()
        K.reset_workspace_peak()
        K.conv2d_backward(x, w, dy, None, dw, None, None, (1, 1), pad)
        used = K.workspace_peak_bytes() - base
        assert used == K.conv2d_scratch_bytes(x.shape, w.shape, (1, 1), pad, backward=True, dx=False, threads=1)
        np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-3)
    finally:
        K.set_num_threads(before)


# ---- dW of at most 4 rows, no dx, stride 1 and OW == W: dot products over runs of x, no im2col ----
# (N, C, H, W, OC, KH, KW, padding): stride 1, pl + pr == KW - 1
FEW_ROW_CASES = [
    (13, 8, 14, 14, 16, 3, 3, (1, 1, 1, 1)),  # the zoo CNN's conv2 at 25%; 13 images: 8 chunks with partials
    (2, 2, 5, 6, 3, 3, 3, (3, 2, 0, 0)),  # pad-only rows above, wrap on the left only
    (3, 3, 4, 9, 5, 1, 3, (0, 0, 0, 2)),  # 1x3, all the padding on the right
    (2, 1, 6, 1, 2, 3, 1, (2, 0, 1, 0)),  # one-column map
    (2, 3, 7, 11, 6, 5, 5, (0, 2, 4, 2)),  # OH != H, 5-wide taps (runs shorter than 8 and tails)
]


def _few_rows(case, seed, R):
    N, C, H, W, OC, KH, KW, pad = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((OC, C, KH, KW)).astype(np.float32)
    OH = out_size(H, KH, 1, pad[0], pad[2])
    dy = rng.standard_normal((N, OC, OH, W)).astype(np.float32)
    rows = rng.permutation(OC)[:min(R, OC)].astype(np.int32)
    return x, w, dy, rows


@pytest.mark.parametrize("ci", range(len(FEW_ROW_CASES)))
@pytest.mark.parametrize("R", [1, 3, 4])
def test_few_rows_dw_matches_numpy(ci, R):
    case = FEW_ROW_CASES[ci]
    x, w, dy, rows = _few_rows(case, 300 + ci, R)
    pad = case[7]
    _, rdw, _ = ref_backward(x, w, dy, (1, 1), pad)
    dw = np.full((rows.size,) + w.shape[1:], np.nan, np.float32)
    K.conv2d_backward(x, w, dy, rows, dw, None, None, (1, 1), pad)
    np.testing.assert_allclose(dw, rdw[rows], rtol=1e-4, atol=1e-4)
    dw0 = np.random.default_rng(ci).standard_normal(dw.shape).astype(np.float32)
    dw2 = dw0.copy()
    K.conv2d_backward(x, w, dy, rows, dw2, None, None, (1, 1), pad, accumulate=True)
    np.testing.assert_allclose(dw2, dw0 + rdw[rows], rtol=1e-4, atol=1e-4)
    # the fused update takes the same path: w[rows] -= lr * dW
    w2 = w.copy()
    K.conv2d_backward_sgd(x, w2, None, dy, rows, None, False, None, None, 0.5, stride=(1, 1), padding=pad)
    want = w.astype(np.float64)
    want[rows] -= 0.5 * rdw[rows]
    np.testing.assert_allclose(w2, want, rtol=1e-4, atol=1e-4)


def test_few_rows_dw_finite_differences():
    """L(w) = sum(conv(x, w) * dy) in float64: its derivative in the selected rows' weights."""
    case = FEW_ROW_CASES[4]
    x, w, dy, rows = _few_rows(case, 9, 3)
    pad = case[7]
    dw = np.empty((rows.size,) + w.shape[1:], np.float32)
    K.conv2d_backward(x, w, dy, rows, dw, None, None, (1, 1), pad)
    w64 = w.astype(np.float64)
    rng = np.random.default_rng(0)
    eps = 1e-3
    for _ in range(12):
        r = int(rng.integers(rows.size))
        idx = (rows[r],) + tuple(int(rng.integers(d)) for d in w.shape[1:])
        wp, wm = w64.copy(), w64.copy()
        wp[idx] += eps
        wm[idx] -= eps
        num = ((ref_forward(x, wp, None, (1, 1), pad) - ref_forward(x, wm, None, (1, 1), pad)) * dy).sum() / (2 * eps)
        assert abs(dw[(r,) + idx[1:]] - num) <= 1e-3 * (1 + abs(num)), (idx, dw[(r,) + idx[1:]], num)


def test_few_rows_dw_thread_count_independent_and_scratch_exact():
    case = FEW_ROW_CASES[0]
    x, w, dy, rows = _few_rows(case, 11, 4)
    pad = case[7]
    before = K.get_num_threads()
    out = {}
    try:
        for threads in (1, 2, 3):
            K.set_num_threads(threads)
            dw = np.empty((rows.size,) + w.shape[1:], np.float32)
            want = K.conv2d_scratch_bytes(x.shape, w.shape, (1, 1), pad, threads=threads, backward=True,
                                          n_rows=rows.size, dx=False)
            base = K.workspace_current_bytes()
            K.reset_workspace_peak()
            K.conv2d_backward(x, w, dy, rows, dw, None, None, (1, 1), pad)
            used = K.workspace_peak_bytes() - base
            assert used <= want, (threads, used, want)
            if threads == 1:
                assert used == want, (used, want)
                # no im2col columns: one image's columns alone would take C*KH*KW*OH*OW floats
                assert want < case[1] * 9 * case[2] * case[3] * 4
            out[threads] = dw
    finally:
        K.set_num_threads(before)
    np.testing.assert_array_equal(out[1], out[2])
    np.testing.assert_array_equal(out[1], out[3])
