"""Depthwise and grouped conv2d forward/backward against a float64 NumPy reference, finite
differences, row selection, errors, thread-count invariance, onnxruntime, and 1-D signals as H=1."""
import numpy as np
import pytest

from ftte_core import _kernels as K


def out_size(n, k, s, p0, p1):
    return (n + p0 + p1 - k) // s + 1


def ref_forward(x, w, b, group, stride, pad):
    """Grouped conv in float64: group == C with w [C*M, 1, KH, KW] is depthwise."""
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    sh, sw = stride
    pt, pl, pb, pr = pad
    N, _C, H, W = x.shape
    OC, Cg, KH, KW = w.shape
    OCg = OC // group
    OH, OW = out_size(H, KH, sh, pt, pb), out_size(W, KW, sw, pl, pr)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    y = np.zeros((N, OC, OH, OW))
    for g in range(group):
        xs = xp[:, g * Cg:(g + 1) * Cg]
        ws = w[g * OCg:(g + 1) * OCg]
        for i in range(KH):
            for j in range(KW):
                patch = xs[:, :, i:i + sh * (OH - 1) + 1:sh, j:j + sw * (OW - 1) + 1:sw]
                y[:, g * OCg:(g + 1) * OCg] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


def ref_backward(x, w, dy, group, stride, pad):
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    dy = dy.astype(np.float64)
    sh, sw = stride
    pt, pl, pb, pr = pad
    _N, _C, H, W = x.shape
    OC, Cg, KH, KW = w.shape
    OCg = OC // group
    OH, OW = dy.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    dxp = np.zeros_like(xp)
    dw = np.zeros(w.shape)
    for g in range(group):
        cs, os_ = slice(g * Cg, (g + 1) * Cg), slice(g * OCg, (g + 1) * OCg)
        for i in range(KH):
            for j in range(KW):
                sl = (slice(None), cs, slice(i, i + sh * (OH - 1) + 1, sh), slice(j, j + sw * (OW - 1) + 1, sw))
                dw[os_, :, i, j] = np.einsum("nohw,nchw->oc", dy[:, os_], xp[sl])
                dxp[sl] += np.einsum("nohw,oc->nchw", dy[:, os_], w[os_, :, i, j])
    dx = dxp[:, :, pt:pt + H, pl:pl + W]
    return dx, dw, dy.sum(axis=(0, 2, 3))


# depthwise: (N, C, H, W, M, KH, KW, stride, padding)
DW_CASES = [
    (2, 3, 7, 9, 1, 3, 3, (1, 1), (1, 1, 1, 1)),
    (3, 4, 11, 8, 2, 3, 3, (2, 2), (1, 0, 2, 1)),
    (1, 5, 9, 9, 1, 5, 5, (1, 1), (2, 2, 2, 2)),
    (2, 2, 6, 7, 3, 1, 1, (1, 1), (0, 0, 0, 0)),
    (2, 3, 6, 7, 1, 1, 1, (2, 1), (0, 1, 1, 0)),
    (1, 2, 10, 13, 2, 5, 3, (3, 2), (0, 2, 1, 0)),
    (2, 2, 5, 5, 1, 3, 5, (1, 2), (3, 0, 0, 3)),  # padding wider than some windows
    (1, 3, 4, 4, 1, 4, 4, (1, 1), (0, 0, 0, 0)),  # kernel covers the whole input
    (4, 8, 12, 12, 1, 3, 3, (2, 2), (0, 0, 1, 1)),  # MobileNet-style stride-2 with TF "SAME" padding
]

# grouped: (N, C, H, W, OC, group, KH, KW, stride, padding)
GR_CASES = [
    (2, 4, 7, 9, 6, 2, 3, 3, (1, 1), (1, 1, 1, 1)),
    (3, 6, 8, 7, 9, 3, 3, 2, (2, 1), (1, 0, 2, 1)),
    (1, 8, 6, 6, 4, 4, 1, 1, (1, 1), (0, 0, 0, 0)),  # pointwise per group
    (2, 6, 9, 9, 12, 2, 5, 3, (2, 2), (2, 1, 0, 1)),
    (2, 4, 5, 5, 4, 4, 3, 3, (1, 1), (1, 1, 1, 1)),  # group == C: same as depthwise
    (2, 3, 6, 5, 6, 1, 3, 3, (1, 1), (1, 1, 1, 1)),  # group == 1: same as conv2d
]


def make_dw(case, seed):
    N, C, H, W, M, KH, KW, stride, pad = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((C * M, 1, KH, KW)).astype(np.float32)
    b = rng.standard_normal(C * M).astype(np.float32)
    OH, OW = out_size(H, KH, stride[0], pad[0], pad[2]), out_size(W, KW, stride[1], pad[1], pad[3])
    return rng, x, w, b, C, (N, C * M, OH, OW)


def make_gr(case, seed):
    N, C, H, W, OC, group, KH, KW, stride, pad = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((OC, C // group, KH, KW)).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    OH, OW = out_size(H, KH, stride[0], pad[0], pad[2]), out_size(W, KW, stride[1], pad[1], pad[3])
    return rng, x, w, b, group, (N, OC, OH, OW)


def fwd(kind, x, w, b, y, group, stride, pad):
    if kind == "dw":
        K.depthwise_conv2d_forward(x, w, b, y, stride, pad)
    else:
        K.grouped_conv2d_forward(x, w, b, y, group, stride, pad)


def bwd(kind, x, w, dy, rows, dw, db, dx, group, stride, pad, accumulate=False):
    if kind == "dw":
        K.depthwise_conv2d_backward(x, w, dy, rows, dw, db, dx, stride, pad, accumulate)
    else:
        K.grouped_conv2d_backward(x, w, dy, rows, dw, db, dx, group, stride, pad, accumulate)


ALL = [("dw", i) for i in range(len(DW_CASES))] + [("gr", i) for i in range(len(GR_CASES))]


def setup(kind, ci, seed):
    if kind == "dw":
        case = DW_CASES[ci]
        rng, x, w, b, group, yshape = make_dw(case, seed)
    else:
        case = GR_CASES[ci]
        rng, x, w, b, group, yshape = make_gr(case, seed)
    return rng, x, w, b, group, yshape, case[-2], case[-1]


@pytest.mark.parametrize("kind,ci", ALL)
def test_forward_matches_numpy(kind, ci):
    _, x, w, b, group, yshape, stride, pad = setup(kind, ci, ci)
    y = np.full(yshape, np.nan, np.float32)
    fwd(kind, x, w, b, y, group, stride, pad)
    np.testing.assert_allclose(y, ref_forward(x, w, b, group, stride, pad), rtol=1e-4, atol=1e-4)
    y2 = np.full(yshape, np.nan, np.float32)
    fwd(kind, x, w, None, y2, group, stride, pad)
    np.testing.assert_allclose(y2, ref_forward(x, w, None, group, stride, pad), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,ci", ALL)
@pytest.mark.parametrize("subset", ["all", "shuffled", "sorted"])
def test_backward_matches_numpy(kind, ci, subset):
    rng, x, w, _b, group, yshape, stride, pad = setup(kind, ci, 100 + ci)
    OC = w.shape[0]
    dy = rng.standard_normal(yshape).astype(np.float32)
    rdx, rdw, rdb = ref_backward(x, w, dy, group, stride, pad)
    rows = None if subset == "all" else rng.choice(OC, size=max(1, OC // 2), replace=False).astype(np.int32)
    if subset == "sorted":  # grouped: each group's rows then fill consecutive slots (written in place)
        rows.sort()
    sel = np.arange(OC) if rows is None else rows
    R = len(sel)
    dw = np.full((R,) + w.shape[1:], np.nan, np.float32)
    db = np.full(R, np.nan, np.float32)
    dx = np.full(x.shape, np.nan, np.float32)
    bwd(kind, x, w, dy, rows, dw, db, dx, group, stride, pad)
    np.testing.assert_allclose(dw, rdw[sel], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, rdb[sel], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)

    # accumulate adds into what is there; None skips an output.
    dw0 = rng.standard_normal(dw.shape).astype(np.float32)
    db0 = rng.standard_normal(db.shape).astype(np.float32)
    dw2, db2 = dw0.copy(), db0.copy()
    bwd(kind, x, w, dy, rows, dw2, db2, None, group, stride, pad, accumulate=True)
    np.testing.assert_allclose(dw2, dw0 + rdw[sel], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db2, db0 + rdb[sel], rtol=1e-4, atol=1e-4)
    dx2 = np.full(x.shape, np.nan, np.float32)
    bwd(kind, x, w, dy, rows, None, None, dx2, group, stride, pad)
    np.testing.assert_array_equal(dx2, dx)


@pytest.mark.parametrize("kind", ["dw", "gr"])
def test_empty_and_repeated_rows(kind):
    """As conv2d: an empty selection writes nothing; a repeated row gets its gradient in each slot."""
    rng, x, w, _b, group, yshape, stride, pad = setup(kind, 1, 7)
    dy = rng.standard_normal(yshape).astype(np.float32)
    rdx, rdw, rdb = ref_backward(x, w, dy, group, stride, pad)
    dx = np.full(x.shape, np.nan, np.float32)
    bwd(kind, x, w, dy, np.array([], np.int32), np.zeros((0,) + w.shape[1:], np.float32), np.zeros(0, np.float32),
        dx, group, stride, pad)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
    rows = np.array([2, 0, 2, w.shape[0] - 1], np.int32)
    dw = np.zeros((4,) + w.shape[1:], np.float32)
    db = np.zeros(4, np.float32)
    bwd(kind, x, w, dy, rows, dw, db, None, group, stride, pad)
    np.testing.assert_allclose(dw, rdw[rows], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, rdb[rows], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(dw[0], dw[2])


@pytest.mark.parametrize("kind", ["dw", "gr"])
def test_finite_differences(kind):
    """Kernel backward vs float64 central differences of L = sum(conv(x, w, b) * r)."""
    if kind == "dw":
        case = (2, 3, 6, 5, 2, 3, 3, (2, 1), (1, 0, 0, 2))
        rng, x, w, b, group, yshape = make_dw(case, 3)
    else:
        case = (2, 4, 6, 5, 6, 2, 3, 3, (2, 1), (1, 0, 0, 2))
        rng, x, w, b, group, yshape = make_gr(case, 3)
    stride, pad = case[-2], case[-1]
    r = rng.standard_normal(yshape)
    loss = lambda x_, w_, b_: float((ref_forward(x_, w_, b_, group, stride, pad) * r).sum())
    dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)
    bwd(kind, x, w, r.astype(np.float32), None, dw, db, dx, group, stride, pad)
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
            assert abs((lp - lm) / (2 * eps) - grad[idx]) < 1e-3 * (1 + abs(grad[idx]))


@pytest.mark.parametrize("kind", ["dw", "gr"])
def test_float32_forward_finite_differences(kind):
    """The kernel's own float32 forward against its backward (coarse, ties the two together)."""
    if kind == "dw":
        case = (1, 2, 5, 5, 2, 3, 3, (1, 1), (1, 1, 1, 1))
        rng, x, w, b, group, yshape = make_dw(case, 4)
    else:
        case = (1, 4, 5, 5, 4, 2, 3, 3, (1, 1), (1, 1, 1, 1))
        rng, x, w, b, group, yshape = make_gr(case, 4)
    stride, pad = case[-2], case[-1]
    r = rng.standard_normal(yshape).astype(np.float32)
    y = np.empty(yshape, np.float32)

    def loss():
        fwd(kind, x, w, b, y, group, stride, pad)
        return float((y.astype(np.float64) * r).sum())

    dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)
    bwd(kind, x, w, r, None, dw, db, dx, group, stride, pad)
    eps = 1e-2
    for arr, grad in ((x, dx), (w, dw), (b, db)):
        for idx in [tuple(rng.integers(0, s) for s in arr.shape) for _ in range(6)]:
            old = arr[idx]
            arr[idx] = old + eps
            lp = loss()
            arr[idx] = old - eps
            lm = loss()
            arr[idx] = old
            assert abs((lp - lm) / (2 * eps) - grad[idx]) < 2e-2 * (1 + abs(grad[idx]))


def test_group_c_and_group_1_agree_with_other_kernels():
    """grouped with group == C gives the depthwise result; group == 1 gives conv2d's (same bits)."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 4, 9, 9)).astype(np.float32)
    w = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    y1, y2 = np.empty((3, 8, 9, 9), np.float32), np.empty((3, 8, 9, 9), np.float32)
    K.depthwise_conv2d_forward(x, w, None, y1, 1, 1)
    K.grouped_conv2d_forward(x, w, None, y2, 4, 1, 1)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
    w1 = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    y3, y4 = np.empty((3, 5, 9, 9), np.float32), np.empty((3, 5, 9, 9), np.float32)
    K.conv2d_forward(x, w1, None, y3, (1, 1), (1, 1, 1, 1))
    K.grouped_conv2d_forward(x, w1, None, y4, 1, 1, 1)
    np.testing.assert_array_equal(y3, y4)


def _onnx_conv(x, w, b, group, stride, pad):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=list(stride), pads=list(pad), group=group,
                            kernel_shape=list(w.shape[2:]))
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape)
                                        for n, a in (("x", x), ("w", w), ("b", b))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "w": w, "b": b})[0]


@pytest.mark.parametrize("M", [1, 2])
def test_depthwise_matches_onnxruntime(M):
    # ONNX pads are (begin..., end...) = (top, left, bottom, right), the kernels' order.
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    w = rng.standard_normal((3 * M, 1, 3, 2)).astype(np.float32)
    b = rng.standard_normal(3 * M).astype(np.float32)
    stride, pad = (2, 1), (1, 0, 2, 1)
    want = _onnx_conv(x, w, b, 3, stride, pad)
    y = np.empty(want.shape, np.float32)
    K.depthwise_conv2d_forward(x, w, b, y, stride, pad)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_grouped_matches_onnxruntime():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 6, 9, 8)).astype(np.float32)
    w = rng.standard_normal((9, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(9).astype(np.float32)
    stride, pad = (1, 2), (1, 1, 0, 1)
    want = _onnx_conv(x, w, b, 3, stride, pad)
    y = np.empty(want.shape, np.float32)
    K.grouped_conv2d_forward(x, w, b, y, 3, stride, pad)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_conv1d_as_height_one_matches_onnxruntime():
    """A [N, C, L] signal is [N, C, 1, L] with a 1xK kernel and padding (0, left, 0, right):
    forward matches ONNX Conv on 3-D input, backward matches the reference, for both kernels."""
    rng = np.random.default_rng(13)
    N, C, L = 3, 6, 40
    x1 = rng.standard_normal((N, C, L)).astype(np.float32)
    x = x1.reshape(N, C, 1, L)
    for group, OC in ((C, C), (C, 2 * C), (2, 4), (3, 6)):
        w1 = rng.standard_normal((OC, C // group, 5)).astype(np.float32)
        b = rng.standard_normal(OC).astype(np.float32)
        want = _onnx_conv(x1, w1, b, group, (2,), (2, 1))
        w = w1.reshape(OC, C // group, 1, 5)
        stride, pad = (1, 2), (0, 2, 0, 1)
        y = np.empty((N, OC, 1, want.shape[2]), np.float32)
        kind = "dw" if group == C else "gr"
        fwd(kind, x, w, b, y, group, stride, pad)
        np.testing.assert_allclose(y.reshape(want.shape), want, rtol=1e-4, atol=1e-4)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        rdx, rdw, rdb = ref_backward(x, w, dy, group, stride, pad)
        rows = np.array([OC - 1, 0], np.int32)
        dw, db, dx = np.empty((2,) + w.shape[1:], np.float32), np.empty(2, np.float32), np.empty_like(x)
        bwd(kind, x, w, dy, rows, dw, db, dx, group, stride, pad)
        np.testing.assert_allclose(dw, rdw[rows], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(db, rdb[rows], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)


def _run_all(kind, x, w, b, rows, group, stride, pad, dy):
    y = np.empty(dy.shape, np.float32)
    fwd(kind, x, w, b, y, group, stride, pad)
    R = w.shape[0] if rows is None else len(rows)
    dw = np.full((R,) + w.shape[1:], 0.5, np.float32)
    db = np.full(R, 0.5, np.float32)
    dx = np.empty_like(x)
    bwd(kind, x, w, dy, rows, dw, db, dx, group, stride, pad, accumulate=True)
    return y, dw, db, dx


@pytest.mark.parametrize("kind", ["dw", "gr"])
@pytest.mark.parametrize("N", [1, 13])
def test_thread_count_independent(kind, N):
    rng = np.random.default_rng(5)
    C = 16
    x = rng.standard_normal((N, C, 19, 17)).astype(np.float32)
    group = C if kind == "dw" else 4
    w = rng.standard_normal((2 * C, C // group, 3, 3)).astype(np.float32)
    b = rng.standard_normal(2 * C).astype(np.float32)
    stride, pad = (1, 1), (1, 1, 1, 1)
    dy = rng.standard_normal((N, 2 * C, 19, 17)).astype(np.float32)
    rows = np.array([1, 4, 5, 9, 31, 20], np.int32)
    before = K.get_num_threads()
    try:
        K.set_num_threads(1)
        one = _run_all(kind, x, w, b, rows, group, stride, pad, dy)
        K.set_num_threads(2)
        two = _run_all(kind, x, w, b, rows, group, stride, pad, dy)
        K.set_num_threads(3)
        three = _run_all(kind, x, w, b, rows, group, stride, pad, dy)
    finally:
        K.set_num_threads(before)
    for a, b_, c in zip(one, two, three):
        assert a.tobytes() == b_.tobytes()
        assert a.tobytes() == c.tobytes()


@pytest.mark.parametrize("stride,threads", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_depthwise_scratch_is_what_scratch_bytes_says(stride, threads):
    """Stride 1 pads one plane per task into counted scratch (exactly the predicted bytes at one
    thread, at most that on more); other strides hold none."""
    x = np.ones((4, 8, 16, 16), np.float32)
    w = np.ones((8, 1, 3, 3), np.float32)
    oh = (16 + 2 - 3) // stride + 1
    y = np.empty((4, 8, oh, oh), np.float32)
    K.set_num_threads(threads)
    try:
        for backward in (False, True):
            base = K.workspace_current_bytes()
            K.reset_workspace_peak()
            if backward:
                K.depthwise_conv2d_backward(x, w, y, None, np.empty_like(w), None, np.empty_like(x), stride, 1)
            else:
                K.depthwise_conv2d_forward(x, w, None, y, stride, 1)
            used = K.workspace_peak_bytes() - base
            want = K.depthwise_conv2d_scratch_bytes(x.shape, w.shape, stride, 1, backward=backward, threads=threads)
            if stride != 1:
                assert used == want == 0
            elif threads == 1:
                assert used == want == (18 * 18 + 15 * 18 + 16) * 4
            else:
                assert 0 < used <= want
            assert K.workspace_current_bytes() == base
    finally:
        K.set_num_threads(0)


def test_depthwise_flat_path_matches_the_row_path_on_narrow_planes():
    """DS-CNN-like planes (25x5, pads on both sides, channel multiplier 2): stride 1 (flat loops)
    agrees with the float64 reference, forward and backward, rows selected."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 4, 25, 5)).astype(np.float32)
    w = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    y = np.empty((3, 8, 25, 5), np.float32)
    K.depthwise_conv2d_forward(x, w, b, y, 1, (1, 1, 1, 1))
    ry = ref_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), 4, (1, 1), (1, 1, 1, 1))
    np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    rows = np.array([6, 1, 3], np.int32)
    dw, db, dx = np.empty((3, 1, 3, 3), np.float32), np.empty(3, np.float32), np.empty_like(x)
    K.depthwise_conv2d_backward(x, w, dy, rows, dw, db, dx, 1, (1, 1, 1, 1))
    rdx, rdw, rdb = ref_backward(x, w, dy, 4, (1, 1), (1, 1, 1, 1))
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, rdw[rows], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, rdb[rows], rtol=1e-4, atol=1e-4)


def test_bias_only_and_dx_only_without_x():
    for kind in ("dw", "gr"):
        rng, x, w, _b, group, yshape, stride, pad = setup(kind, 1, 9)
        dy = rng.standard_normal(yshape).astype(np.float32)
        rdx, _, rdb = ref_backward(x, w, dy, group, stride, pad)
        db = np.empty(w.shape[0], np.float32)
        bwd(kind, None, w, dy, None, None, db, None, group, stride, pad)
        np.testing.assert_allclose(db, rdb, rtol=1e-4, atol=1e-4)
        dx = np.empty_like(x)
        bwd(kind, None, w, dy, None, None, None, dx, group, stride, pad)
        np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="x is needed to compute dw"):
            bwd(kind, None, w, dy, None, np.empty_like(w), None, None, group, stride, pad)


@pytest.mark.parametrize("kind", ["dw", "gr"])
def test_empty_batch(kind):
    x = np.zeros((0, 4, 5, 5), np.float32)
    w = np.ones((4, 1 if kind == "dw" else 2, 3, 3), np.float32)
    y = np.zeros((0, 4, 3, 3), np.float32)
    fwd(kind, x, w, None, y, 2, 1, 0)
    dw = np.full(w.shape, np.nan, np.float32)
    db = np.full(4, np.nan, np.float32)
    bwd(kind, x, w, y, None, dw, db, np.zeros_like(x), 2, 1, 0)
    assert not dw.any() and not db.any()
    rows = np.array([3, 0], np.int32)  # grouped: rows out of group order go through scratch
    dw = np.full((2,) + w.shape[1:], np.nan, np.float32)
    db = np.full(2, np.nan, np.float32)
    bwd(kind, x, w, y, rows, dw, db, None, 2, 1, 0)
    assert not dw.any() and not db.any()


def test_grouped_sorted_rows_need_no_gradient_scratch():
    """Rows in group order are written in place; otherwise the regrouped sums take R*(K+1) floats."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((3, 8, 10, 10)).astype(np.float32)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((3, 8, 10, 10)).astype(np.float32)

    def peak(rows):
        dw, db = np.empty((len(rows),) + w.shape[1:], np.float32), np.empty(len(rows), np.float32)
        base = K.workspace_current_bytes()
        K.reset_workspace_peak()
        K.grouped_conv2d_backward(x, w, dy, rows, dw, db, None, 2, 1, 1)
        assert K.workspace_current_bytes() == base
        return K.workspace_peak_bytes() - base, dw, db

    before = K.get_num_threads()
    try:
        K.set_num_threads(1)
        sorted_, dw1, db1 = peak(np.array([1, 2, 5, 6], np.int32))
        shuffled, dw2, db2 = peak(np.array([5, 1, 6, 2], np.int32))
    finally:
        K.set_num_threads(before)
    assert shuffled - sorted_ == 4 * (4 * 36 + 4)
    np.testing.assert_array_equal(dw1[[2, 0, 3, 1]], dw2)
    np.testing.assert_array_equal(db1[[2, 0, 3, 1]], db2)


def test_errors():
    x = np.zeros((2, 4, 8, 8), np.float32)
    w = np.zeros((4, 1, 3, 3), np.float32)
    b = np.zeros(4, np.float32)
    y = np.zeros((2, 4, 6, 6), np.float32)
    f = K.depthwise_conv2d_forward
    f(x, w, b, y)  # the valid call
    with pytest.raises(ValueError, match=r"depthwise_conv2d_forward: y has shape \(2, 4, 6, 6\).*must be 8"):
        f(x, w, b, y, padding=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="x must have dtype float32, got float64"):
        f(x.astype(np.float64), w, b, y)
    with pytest.raises(ValueError, match="w has shape .* dimension 1 must be 1"):
        f(x, np.zeros((4, 2, 3, 3), np.float32), b, y)
    with pytest.raises(ValueError, match="C\\*M output channels"):
        f(x, np.zeros((6, 1, 3, 3), np.float32), np.zeros(6, np.float32), np.zeros((2, 6, 6, 6), np.float32))
    with pytest.raises(ValueError, match="C\\*M output channels"):
        f(x, np.zeros((2, 1, 3, 3), np.float32), None, np.zeros((2, 2, 6, 6), np.float32))
    with pytest.raises(ValueError, match="b has shape"):
        f(x, w, np.zeros(5, np.float32), y)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        f(np.zeros((2, 4, 8, 16), np.float32)[..., ::2], w, b, y)
    with pytest.raises(ValueError, match="w must be C-contiguous"):
        f(x, np.zeros((4, 1, 3, 6), np.float32)[..., ::2], b, y)
    ro = np.zeros_like(y)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="y must be writable"):
        f(x, w, b, ro)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        f(x[0], w, b, y)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        f(x, w, b, y, stride=(0, 1))
    with pytest.raises(ValueError, match="padding must have 4 entries"):
        f(x, w, b, y, padding=(1, 1))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        f(x, w, b, y, padding=(-1, 0, 0, 0))
    with pytest.raises(ValueError, match="does not fit"):
        f(x, np.zeros((4, 1, 9, 3), np.float32), b, y)
    with pytest.raises(ValueError, match="must be a numpy array"):
        f([[1.0]], w, b, y)
    with pytest.raises(ValueError, match="must not overlap"):
        xx = np.zeros((2, 4, 8, 8), np.float32)
        f(xx, np.zeros((4, 1, 1, 1), np.float32), None, xx)
    raw = np.zeros(2 * 4 * 8 * 8 * 4 + 1, np.uint8)
    mis = np.frombuffer(raw.data, np.float32, count=2 * 4 * 8 * 8, offset=1).reshape(x.shape)
    with pytest.raises(ValueError, match="x must be aligned to 4 bytes"):
        f(mis, w, b, y)

    dy = np.zeros_like(y)
    g = K.depthwise_conv2d_backward
    with pytest.raises(ValueError, match="depthwise_conv2d_backward: rows holds 4, outside"):
        g(x, w, dy, np.array([0, 4], np.int32), np.zeros((2, 1, 3, 3), np.float32), None, None)
    with pytest.raises(ValueError, match="rows must have dtype int32"):
        g(x, w, dy, np.array([0, 1], np.int64), np.zeros((2, 1, 3, 3), np.float32), None, None)
    with pytest.raises(ValueError, match="dw has shape .* dimension 0 must be 2"):
        g(x, w, dy, np.array([0, 1], np.int32), np.zeros((4, 1, 3, 3), np.float32), None, None)
    with pytest.raises(ValueError, match="db has shape"):
        g(x, w, dy, None, None, np.zeros(3, np.float32), None)
    with pytest.raises(ValueError, match="dx has shape"):
        g(x, w, dy, None, None, None, np.zeros((2, 4, 8, 7), np.float32))
    with pytest.raises(ValueError, match="dy has shape"):
        g(x, w, dy[:, :, :5].copy(), None, None, None, None)
    with pytest.raises(ValueError, match="dw must be writable"):
        ro_w = np.zeros_like(w)
        ro_w.flags.writeable = False
        g(x, w, dy, None, ro_w, None, None)

    wg = np.zeros((6, 2, 3, 3), np.float32)
    yg = np.zeros((2, 6, 6, 6), np.float32)
    K.grouped_conv2d_forward(x, wg, None, yg, 2)  # the valid call
    with pytest.raises(ValueError, match="grouped_conv2d_forward: group must be >= 1"):
        K.grouped_conv2d_forward(x, wg, None, yg, 0)
    with pytest.raises(ValueError, match="group 3 does not divide the 4 input channels"):
        K.grouped_conv2d_forward(x, np.zeros((6, 1, 3, 3), np.float32), None, yg, 3)
    with pytest.raises(ValueError, match="group 4 does not divide the 6 output channels"):
        K.grouped_conv2d_forward(x, np.zeros((6, 1, 3, 3), np.float32), None, yg, 4)
    with pytest.raises(ValueError, match="w has shape .* dimension 1 must be 2"):
        K.grouped_conv2d_forward(x, np.zeros((6, 4, 3, 3), np.float32), None, yg, 2)
    with pytest.raises(ValueError, match="x has shape .* dimension 1 must be 4"):
        K.grouped_conv2d_backward(np.zeros((2, 6, 8, 8), np.float32), wg, yg, None, None, None, None, 2)
    with pytest.raises(ValueError, match="group must be >= 1"):
        K.grouped_conv2d_backward(x, wg, yg, None, None, None, None, -1)
    with pytest.raises(ValueError, match="rows holds 6, outside"):
        K.grouped_conv2d_backward(x, wg, yg, np.array([6], np.int32), np.zeros((1, 2, 3, 3), np.float32), None,
                                  None, 2)


@pytest.mark.parametrize("threads", [1, 2])
def test_grouped_scratch_bytes_matches_recorded_peak(threads):
    """grouped_conv2d_scratch_bytes (for the cost model): exact on one thread, an upper bound on more."""
    rng = np.random.default_rng(22)
    N, C, H, W, OC, group = 3, 6, 11, 9, 9, 3
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((OC, C // group, 3, 3)).astype(np.float32)
    stride, pad = (1, 2), (1, 1, 0, 1)
    y = np.empty((N, OC, 10, 5), np.float32)
    dx = np.empty_like(x)
    cases = [(None, {}), (np.array([0, 4, 5, 8], np.int32), {}), (np.array([8, 0, 4, 5], np.int32), {}),
             (np.array([7, 1], np.int32), {"dx": False}), (None, {"dw": False}), (None, {"dw": False, "dx": False})]
    before = K.get_num_threads()
    try:
        K.set_num_threads(threads)
        base = K.workspace_current_bytes()
        K.reset_workspace_peak()
        K.grouped_conv2d_forward(x, w, None, y, group, stride, pad)
        used = K.workspace_peak_bytes() - base
        want = K.grouped_conv2d_scratch_bytes(x.shape, w.shape, group, stride, pad, threads=threads)
        assert used <= want and (threads > 1 or used == want), (used, want)
        for rows, kw in cases:
            R = OC if rows is None else len(rows)
            dw = np.empty((R,) + w.shape[1:], np.float32) if kw.get("dw", True) else None
            db = np.empty(R, np.float32)
            base = K.workspace_current_bytes()
            K.reset_workspace_peak()
            K.grouped_conv2d_backward(x, w, y, rows, dw, db, dx if kw.get("dx", True) else None, group, stride, pad)
            used = K.workspace_peak_bytes() - base
            want = K.grouped_conv2d_scratch_bytes(x.shape, w.shape, group, stride, pad, backward=True, rows=rows,
                                                  threads=threads, **kw)
            assert used <= want and (threads > 1 or used == want), (rows, kw, used, want)
    finally:
        K.set_num_threads(before)
