"""Dense forward/backward on selected rows: NumPy reference, finite differences, errors,
thread-count independence."""
import numpy as np
import pytest

from ftte_core import _kernels as K


def _data(rng, N, I, O):
    x = rng.standard_normal((N, I)).astype(np.float32)
    w = (rng.standard_normal((O, I)) / np.sqrt(I)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    dy = rng.standard_normal((N, O)).astype(np.float32)
    return x, w, b, dy


@pytest.mark.parametrize("N,I,O", [(1, 1, 1), (3, 5, 7), (32, 64, 256), (17, 130, 10), (33, 784, 129)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_forward(N, I, O, with_bias):
    rng = np.random.default_rng(N + I + O)
    x, w, b, _ = _data(rng, N, I, O)
    y = np.full((N, O), np.nan, np.float32)
    K.dense_forward(x, w, b if with_bias else None, y)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + (b if with_bias else 0)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * np.sqrt(I) * 4)


def _rows_cases(rng, O):
    yield None
    yield np.arange(O, dtype=np.int32)
    yield np.array([O - 1], dtype=np.int32)
    k = max(1, O // 3)
    yield rng.choice(O, size=k, replace=False).astype(np.int32)  # unsorted subset
    yield np.zeros(0, dtype=np.int32)


@pytest.mark.parametrize("N,I,O", [(1, 1, 1), (3, 5, 7), (32, 64, 256), (17, 130, 10), (33, 97, 129)])
def test_dense_backward(N, I, O):
    rng = np.random.default_rng(100 + N + I + O)
    x, w, _, dy = _data(rng, N, I, O)
    x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    for rows in _rows_cases(rng, O):
        sel = np.arange(O) if rows is None else rows
        R = len(sel)
        dw = np.full((R, I), np.nan, np.float32)
        db = np.full(R, np.nan, np.float32)
        dx = np.full((N, I), np.nan, np.float32)
        K.dense_backward(x, w, dy, rows, dw, db, dx)
        tol = dict(rtol=1e-4, atol=1e-5 * np.sqrt(max(N, O)) * 4)
        np.testing.assert_allclose(dw, dy64[:, sel].T @ x64, **tol)
        np.testing.assert_allclose(db, dy64[:, sel].sum(0), **tol)
        np.testing.assert_allclose(dx, dy64 @ w64, **tol)
        # accumulate adds onto dw/db, dx is still overwritten
        dw0 = rng.standard_normal((R, I)).astype(np.float32)
        db0 = rng.standard_normal(R).astype(np.float32)
        dw, db = dw0.copy(), db0.copy()
        dx[:] = 123.0
        K.dense_backward(x, w, dy, rows, dw, db, dx, accumulate=True)
        np.testing.assert_allclose(dw, dw0 + dy64[:, sel].T @ x64, **tol)
        np.testing.assert_allclose(db, db0 + dy64[:, sel].sum(0), **tol)
        np.testing.assert_allclose(dx, dy64 @ w64, **tol)
    # any output may be None
    dw = np.empty((O, I), np.float32)
    K.dense_backward(x, w, dy, None, dw, None, None)
    np.testing.assert_allclose(dw, dy64.T @ x64, rtol=1e-4, atol=1e-4)


def test_dense_backward_finite_differences():
    # Loss L = sum(y * r). Central differences in float64 on the float32 forward kernel; with
    # O(1) values and eps = 1e-2 the float32 rounding error of L (~1e-6 relative to ~10) divided
    # by 2 eps is ~1e-3, so 2e-3 absolute is a float32-honest tolerance.
    rng = np.random.default_rng(5)
    N, I, O = 4, 6, 5
    x, w, b, _ = _data(rng, N, I, O)
    r = rng.standard_normal((N, O)).astype(np.float32)
    rows = np.array([3, 0, 4], np.int32)

    def loss(x_, w_, b_):
        y = np.empty((N, O), np.float32)
        K.dense_forward(x_.astype(np.float32), w_.astype(np.float32), b_.astype(np.float32), y)
        return float((y.astype(np.float64) * r).sum())

    def fd(arr, which):
        g = np.zeros(arr.shape)
        eps = 1e-2
        for idx in np.ndindex(arr.shape):
            p, m = arr.astype(np.float64).copy(), arr.astype(np.float64).copy()
            p[idx] += eps
            m[idx] -= eps
            args_p = {"x": x, "w": w, "b": b}
            args_m = dict(args_p)
            args_p[which], args_m[which] = p, m
            g[idx] = (loss(args_p["x"], args_p["w"], args_p["b"]) - loss(args_m["x"], args_m["w"], args_m["b"])) / (2 * eps)
        return g

    dw = np.empty((3, I), np.float32)
    db = np.empty(3, np.float32)
    dx = np.empty((N, I), np.float32)
    K.dense_backward(x, w, r, rows, dw, db, dx)
    np.testing.assert_allclose(dx, fd(x, "x"), atol=2e-3)
    np.testing.assert_allclose(dw, fd(w, "w")[rows], atol=2e-3)
    np.testing.assert_allclose(db, fd(b, "b")[rows], atol=2e-3)


def test_dense_errors():
    x = np.ones((4, 3), np.float32)
    w = np.ones((5, 3), np.float32)
    dy = np.ones((4, 5), np.float32)
    y = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="dense_forward: w has shape"):
        K.dense_forward(x, np.ones((5, 4), np.float32), None, y)
    with pytest.raises(ValueError, match="dense_forward: b has shape"):
        K.dense_forward(x, w, np.ones(4, np.float32), y)
    with pytest.raises(ValueError, match="dense_forward: y has shape"):
        K.dense_forward(x, w, None, np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="dense_forward: x must have dtype float32"):
        K.dense_forward(x.astype(np.float16), w, None, y)
    with pytest.raises(ValueError, match="dense_forward: x must be C-contiguous"):
        K.dense_forward(np.ones((3, 4), np.float32).T, w, None, y)
    ro = y.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="dense_forward: y must be writable"):
        K.dense_forward(x, w, None, ro)
    rows = np.array([1, 4], np.int32)
    with pytest.raises(ValueError, match="dense_backward: dy has shape"):
        K.dense_backward(x, w, np.ones((4, 4), np.float32), None, None, None, None)
    with pytest.raises(ValueError, match="dense_backward: dw has shape"):
        K.dense_backward(x, w, dy, rows, np.zeros((5, 3), np.float32), None, None)
    with pytest.raises(ValueError, match="dense_backward: db has shape"):
        K.dense_backward(x, w, dy, rows, None, np.zeros(5, np.float32), None)
    with pytest.raises(ValueError, match="dense_backward: rows holds 5, outside"):
        K.dense_backward(x, w, dy, np.array([5], np.int32), None, None, None)
    with pytest.raises(ValueError, match="dense_backward: rows must have dtype int32"):
        K.dense_backward(x, w, dy, np.array([1], np.int64), None, None, None)
    with pytest.raises(ValueError, match="dense_backward: dx must not share memory with x"):
        K.dense_backward(x, w, dy, None, None, None, x)


def test_dense_thread_count_bit_identical():
    rng = np.random.default_rng(9)
    x, w, b, dy = _data(rng, 32, 784, 128)
    rows = rng.choice(128, size=50, replace=False).astype(np.int32)
    outs = []
    try:
        for t in (1, 2):
            K.set_num_threads(t)
            y = np.empty((32, 128), np.float32)
            dw, db, dx = np.empty((50, 784), np.float32), np.empty(50, np.float32), np.empty((32, 784), np.float32)
            K.dense_forward(x, w, b, y)
            K.dense_backward(x, w, dy, rows, dw, db, dx)
            outs.append((y, dw, db, dx))
    finally:
        K.set_num_threads(0)
    for u, v in zip(*outs):
        np.testing.assert_array_equal(u, v)


def test_misaligned_arrays_are_refused_with_a_clear_error():
    """np.frombuffer at an odd offset gives float32 data a 32-bit ARM CPU cannot load (SIGBUS)."""
    raw = bytearray(4 * 3 * 5 + 1)
    x_bad = np.frombuffer(raw, dtype=np.float32, count=15, offset=1).reshape(3, 5)
    assert not x_bad.flags.aligned
    w = np.ones((2, 5), np.float32)
    y = np.empty((3, 2), np.float32)
    with pytest.raises(ValueError, match="dense_forward: x must be aligned to 4 bytes"):
        K.dense_forward(x_bad, w, None, y)
    K.dense_forward(np.require(x_bad, requirements="A"), w, None, y)  # the fix the message names
    np.testing.assert_allclose(y, np.zeros((3, 2)))
