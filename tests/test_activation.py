"""ReLU / sigmoid / tanh: NumPy references, finite differences, in-place use, errors, threads."""
import numpy as np
import pytest

from ftte_core import _kernels as K

ACTS = {
    "relu": (lambda x: np.maximum(x, 0), lambda y, dy: dy * (y > 0)),
    "sigmoid": (lambda x: 1 / (1 + np.exp(-x)), lambda y, dy: dy * y * (1 - y)),
    "tanh": (np.tanh, lambda y, dy: dy * (1 - y * y)),
}


def fwd(name):
    return getattr(K, name + "_forward")


def bwd(name):
    return getattr(K, name + "_backward")


@pytest.mark.parametrize("name", ACTS)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 5), (1, 40000)])
def test_matches_numpy(name, shape):
    ref_f, ref_b = ACTS[name]
    rng = np.random.default_rng(len(shape))
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    y = np.full(shape, np.nan, np.float32)
    fwd(name)(x, y)
    want = ref_f(x.astype(np.float64))
    np.testing.assert_allclose(y, want, rtol=2e-6, atol=1e-7)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx = np.full(shape, np.nan, np.float32)
    bwd(name)(y, dy, dx)
    np.testing.assert_allclose(dx, ref_b(y.astype(np.float64), dy.astype(np.float64)), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", ACTS)
def test_in_place_and_reshaped(name):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    y = np.empty_like(x)
    fwd(name)(x, y)
    z = x.copy()
    fwd(name)(z, z)
    np.testing.assert_array_equal(z, y)
    dy = rng.standard_normal((4, 6)).astype(np.float32)
    dx = np.empty_like(dy)
    bwd(name)(y, dy, dx)
    bwd(name)(y, dy, dy)  # dx may be dy
    np.testing.assert_array_equal(dy, dx)
    out = np.empty(24, np.float32)  # any shape with the same number of elements
    fwd(name)(x, out)
    np.testing.assert_array_equal(out, y.reshape(-1))


def test_extremes():
    x = np.array([-1e4, -100, -88, 0, 88, 100, 1e4], np.float32)
    y = np.empty_like(x)
    K.sigmoid_forward(x, y)
    assert np.all(np.isfinite(y)) and y[0] == 0 and y[-1] == 1 and y[3] == 0.5
    K.tanh_forward(x, y)
    np.testing.assert_array_equal(y[[0, -1]], [-1, 1])
    K.relu_forward(x, y)
    np.testing.assert_array_equal(y, np.maximum(x, 0))


@pytest.mark.parametrize("name", ACTS)
def test_finite_differences(name):
    """L = sum(f(x) * r): float64 central differences of the NumPy forward vs the kernel backward
    fed the kernel's float32 forward output (ReLU inputs kept away from the kink)."""
    ref_f, _ = ACTS[name]
    rng = np.random.default_rng(9)
    x = rng.standard_normal(50)
    if name == "relu":
        x = np.where(np.abs(x) < 0.05, 0.5, x)
    r = rng.standard_normal(50)
    y = np.empty(50, np.float32)
    fwd(name)(x.astype(np.float32), y)
    dx = np.empty(50, np.float32)
    bwd(name)(y, r.astype(np.float32), dx)
    eps = 1e-4
    fd = np.array([((ref_f(x + eps * e) - ref_f(x - eps * e)) * r).sum() / (2 * eps) for e in np.eye(50)])
    # float32 y carries a relative error ~6e-8 into the derivative formula; 1e-5 is ample.
    np.testing.assert_allclose(dx, fd, rtol=1e-5, atol=1e-6)


def test_thread_count_independent():
    x = np.random.default_rng(0).standard_normal(300001).astype(np.float32)
    before = K.get_num_threads()
    res = []
    try:
        for t in (1, 2):
            K.set_num_threads(t)
            outs = []
            for name in ACTS:
                y = np.empty_like(x)
                fwd(name)(x, y)
                dx = np.empty_like(x)
                bwd(name)(y, x, dx)
                outs += [y, dx]
            res.append(outs)
    finally:
        K.set_num_threads(before)
    for a, b in zip(*res):
        np.testing.assert_array_equal(a, b)


def test_errors():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="relu_forward: x has 12 elements but y has 11"):
        K.relu_forward(x, np.zeros(11, np.float32))
    with pytest.raises(ValueError, match="sigmoid_forward: x must have dtype float32, got float64"):
        K.sigmoid_forward(x.astype(np.float64), x)
    with pytest.raises(ValueError, match="tanh_forward: y must be C-contiguous"):
        K.tanh_forward(np.zeros((4, 3), np.float32), x.T)
    ro = np.zeros_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="relu_backward: dx must be writable"):
        K.relu_backward(x, x, ro)
    with pytest.raises(ValueError, match="tanh_backward: y has 12 elements but dy has 4"):
        K.tanh_backward(x, np.zeros(4, np.float32), x)
    buf = np.zeros(13, np.float32)
    with pytest.raises(ValueError, match="overlap without being the same array"):
        K.relu_forward(buf[1:], buf[:-1])
    with pytest.raises(ValueError, match="must be a numpy array"):
        K.relu_forward([1.0, 2.0], x)


def test_misaligned_arrays_are_refused_by_the_elementwise_kernels():
    raw = bytearray(4 * 6 + 2)
    x = np.frombuffer(raw, dtype=np.float32, count=6, offset=2)
    assert not x.flags.aligned
    with pytest.raises(ValueError, match="relu_forward: x must be aligned to 4 bytes"):
        K.relu_forward(x, np.empty(6, np.float32))


# -- ReLU with a packed bit mask (what a training step keeps instead of the float output) -----------

def _mask_ref(x):
    return np.packbits(np.asarray(x).reshape(-1) > 0, bitorder="little")


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 16384 + 5, 3 * 16384 + 13])
def test_relu_mask_matches_numpy(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    if n > 4:
        x[:4] = [0.0, -0.0, np.nan, np.float32(1e-45)]  # zero is off, NaN is off (y = 0), a denormal is on
    y = np.full(n, 7, np.float32)
    mask = np.full((n + 7) // 8, 0xAA, np.uint8)  # garbage: every bit must be written, the spare ones 0
    K.relu_forward_mask(x, y, mask)
    np.testing.assert_array_equal(y, np.where(x > 0, x, 0).astype(np.float32))
    np.testing.assert_array_equal(mask, _mask_ref(x))
    dy = rng.standard_normal(n).astype(np.float32)
    dx = np.full(n, 7, np.float32)
    K.relu_backward_mask(mask, dy, dx)
    np.testing.assert_array_equal(dx, np.where(x > 0, dy, 0).astype(np.float32))
    # the same numbers as the float-output pair
    dx_old = np.empty_like(dx)
    K.relu_backward(y, dy, dx_old)
    np.testing.assert_array_equal(dx, dx_old)


def test_relu_mask_in_place_any_shape():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5, 7)).astype(np.float32)  # 105 elements: a partial last byte
    want, want_mask = np.maximum(x, 0), _mask_ref(x)
    buf = x.copy()
    with pytest.raises(ValueError, match=r"relu_forward_mask: mask has 15 bytes but 105 elements need 14"):
        K.relu_forward_mask(buf, buf, np.empty((3, 5), np.uint8))
    mask = np.empty((2, 7), np.uint8)  # any shape of ceil(105/8) = 14 bytes
    K.relu_forward_mask(buf, buf, mask)
    np.testing.assert_array_equal(buf, want)
    np.testing.assert_array_equal(mask.reshape(-1), want_mask)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    want_dx = np.where(x > 0, dy, 0)
    K.relu_backward_mask(mask, dy, dy)
    np.testing.assert_array_equal(dy, want_dx)


def test_relu_mask_finite_differences():
    """L = sum(relu(x) * r): float64 central differences vs the mask backward (x kept off the kink)."""
    rng = np.random.default_rng(19)
    x = rng.standard_normal(53)
    x = np.where(np.abs(x) < 0.05, 0.5, x)
    r = rng.standard_normal(53)
    mask = np.empty(7, np.uint8)
    K.relu_forward_mask(x.astype(np.float32), np.empty(53, np.float32), mask)
    dx = np.empty(53, np.float32)
    K.relu_backward_mask(mask, r.astype(np.float32), dx)
    eps = 1e-4
    f = lambda v: (np.maximum(v, 0) * r).sum()  # noqa: E731
    fd = np.array([(f(x + eps * e) - f(x - eps * e)) / (2 * eps) for e in np.eye(53)])
    np.testing.assert_allclose(dx, fd, rtol=1e-5, atol=1e-6)


def test_relu_mask_thread_count_independent():
    x = np.random.default_rng(4).standard_normal(300003).astype(np.float32)
    before = K.get_num_threads()
    res = []
    try:
        for t in (1, 2, 3):
            K.set_num_threads(t)
            y, mask, dx = np.empty_like(x), np.empty((x.size + 7) // 8, np.uint8), np.empty_like(x)
            K.relu_forward_mask(x, y, mask)
            K.relu_backward_mask(mask, x, dx)
            res.append((y, mask, dx))
    finally:
        K.set_num_threads(before)
    for other in res[1:]:
        for a, b in zip(res[0], other):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(res[0][1], _mask_ref(x))


def test_relu_mask_errors():
    x = np.zeros(20, np.float32)
    m = np.zeros(3, np.uint8)
    cases = [
        (lambda: K.relu_forward_mask(x, x, np.zeros(3, np.int8)), "relu_forward_mask: mask must have dtype uint8, got int8"),
        (lambda: K.relu_forward_mask(x, x, np.zeros(4, np.uint8)), "relu_forward_mask: mask has 4 bytes but 20 elements need 3"),
        (lambda: K.relu_forward_mask(x, x, np.zeros(6, np.uint8)[::2]), "relu_forward_mask: mask must be C-contiguous"),
        (lambda: K.relu_forward_mask(x, np.zeros(19, np.float32), m), "relu_forward_mask: x has 20 elements but y has 19"),
        (lambda: K.relu_forward_mask(x, x, x.view(np.uint8)[:3]), "relu_forward_mask: mask and x share memory"),
        (lambda: K.relu_forward_mask(x, x, [0, 0, 0]), "relu_forward_mask: mask must be a numpy array"),
        (lambda: K.relu_backward_mask(np.zeros(2, np.uint8), x, x), "relu_backward_mask: mask has 2 bytes but 20 elements need 3"),
        (lambda: K.relu_backward_mask(x.view(np.uint8)[:3], x, x), "relu_backward_mask: mask and dx share memory"),
        (lambda: K.relu_backward_mask(m, x[1:], x[:-1]), "relu_backward_mask: dy and dx overlap without being the same array"),
        (lambda: K.relu_backward_mask(m, x.astype(np.float64), x), "relu_backward_mask: dy must have dtype float32"),
    ]
    ro = np.zeros(3, np.uint8)
    ro.flags.writeable = False
    cases.append((lambda: K.relu_forward_mask(x, x, ro), "relu_forward_mask: mask must be writable"))
    K.relu_backward_mask(ro, x, x)  # a read-only mask is fine for backward
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()
