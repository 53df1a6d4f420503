"""SGD on selected rows vs a NumPy (PyTorch-semantics) reference; errors."""
import numpy as np
import pytest

from ftte_core import _kernels as K


def _ref_step(param, rows, grad, vel, lr, momentum, wd):
    sel = np.arange(param.shape[0]) if rows is None else rows
    g = grad + wd * param[sel]
    if momentum:
        vel[:] = momentum * vel + g
        step = vel
    else:
        step = g
    param[sel] -= lr * step


@pytest.mark.parametrize("shape", [(7, 5), (300, 33), (9,)])
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.0), (0.0, 1e-2), (0.9, 5e-4)])
@pytest.mark.parametrize("subset", [False, True])
def test_sgd_matches_numpy(shape, momentum, wd, subset):
    rng = np.random.default_rng(sum(shape))
    O = shape[0]
    param = rng.standard_normal(shape).astype(np.float32)
    rows = rng.choice(O, size=max(1, O // 2), replace=False).astype(np.int32) if subset else None
    R = O if rows is None else len(rows)
    gshape = (R,) + shape[1:]
    vel = np.zeros(gshape, np.float32) if momentum else None
    p_ref = param.astype(np.float64)
    v_ref = np.zeros(gshape)
    for _ in range(3):
        grad = rng.standard_normal(gshape).astype(np.float32)
        K.sgd_update_rows(param, rows, grad, vel, 0.1, momentum, wd)
        _ref_step(p_ref, rows, grad.astype(np.float64), v_ref, 0.1, momentum, wd)
    np.testing.assert_allclose(param, p_ref, rtol=1e-5, atol=1e-6)
    if momentum:
        np.testing.assert_allclose(vel, v_ref, rtol=1e-5, atol=1e-6)
    if rows is not None:  # untouched rows stay bit-identical
        others = np.setdiff1d(np.arange(O), rows)
        np.testing.assert_array_equal(param[others], p_ref[others].astype(np.float32))


def test_sgd_velocity_optional_without_momentum():
    p = np.ones((3, 2), np.float32)
    K.sgd_update_rows(p, np.array([1], np.int32), np.ones((1, 2), np.float32), None, 0.5)
    np.testing.assert_array_equal(p, [[1, 1], [0.5, 0.5], [1, 1]])


def test_sgd_thread_count_bit_identical():
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal((2000, 300)).astype(np.float32)
    g = rng.standard_normal((2000, 300)).astype(np.float32)
    outs = []
    try:
        for t in (1, 2):
            K.set_num_threads(t)
            p, v = p0.copy(), np.ones_like(g)
            K.sgd_update_rows(p, None, g, v, 0.01, 0.9, 1e-4)
            outs.append(p)
    finally:
        K.set_num_threads(0)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_sgd_errors():
    p = np.ones((4, 3), np.float32)
    g = np.ones((2, 3), np.float32)
    rows = np.array([0, 2], np.int32)
    with pytest.raises(ValueError, match="sgd_update_rows: velocity is required when momentum != 0"):
        K.sgd_update_rows(p, rows, g, None, 0.1, 0.9)
    with pytest.raises(ValueError, match="sgd_update_rows: rows holds 2 more than once"):
        K.sgd_update_rows(p, np.array([2, 2], np.int32), g, None, 0.1)
    with pytest.raises(ValueError, match="sgd_update_rows: rows holds 4, outside"):
        K.sgd_update_rows(p, np.array([0, 4], np.int32), g, None, 0.1)
    with pytest.raises(ValueError, match="sgd_update_rows: grad has shape"):
        K.sgd_update_rows(p, rows, np.ones((3, 3), np.float32), None, 0.1)
    with pytest.raises(ValueError, match="sgd_update_rows: velocity has shape"):
        K.sgd_update_rows(p, rows, g, np.ones((2, 2), np.float32), 0.1, 0.9)
    with pytest.raises(ValueError, match="sgd_update_rows: param must have 1 or 2 dimensions"):
        K.sgd_update_rows(np.ones((2, 2, 2), np.float32), None, g, None, 0.1)
    ro = p.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="sgd_update_rows: param must be writable"):
        K.sgd_update_rows(ro, rows, g, None, 0.1)
    with pytest.raises(ValueError, match="sgd_update_rows: grad must have dtype float32"):
        K.sgd_update_rows(p, rows, g.astype(np.float64), None, 0.1)
    with pytest.raises(ValueError, match="sgd_update_rows: param must not share memory with grad"):
        K.sgd_update_rows(p, None, p, None, 0.1)
