"""LeakyRelu / HardSigmoid / Clip / HardSwish kernels: NumPy references, finite differences,
kink and bound conventions (PyTorch's), in-place use, errors, thread-count invariance."""
import numpy as np
import pytest

from ftte_core import _kernels as K

# name -> (params passed to forward, float64 forward reference, float64 backward reference
# taking (saved, dy) where saved is the forward output y, or the input x for hardswish,
# params passed to backward). Parameters are float32-representable (or infinite) so the
# references and the kernels use the same numbers.
CASES = {
    "leaky_relu": (
        (0.125,),
        lambda x: np.where(x > 0, x, 0.125 * x),
        lambda y, dy: np.where(y > 0, dy, 0.125 * dy),
        (0.125,),
    ),
    "hardsigmoid": (
        (0.25, 0.5),
        lambda x: np.clip(0.25 * x + 0.5, 0, 1),
        lambda y, dy: np.where((y > 0) & (y < 1), 0.25 * dy, 0.0),
        (0.25,),
    ),
    "clip": (
        (-1.5, 2.0),
        lambda x: np.clip(x, -1.5, 2.0),
        lambda y, dy: np.where((y > -1.5) & (y < 2.0), dy, 0.0),
        (-1.5, 2.0),
    ),
    "hardswish": (
        (),
        lambda x: x * np.clip(x / 6 + 0.5, 0, 1),
        lambda x, dy: dy * np.where(x < -3, 0.0, np.where(x <= 3, x / 3 + 0.5, 1.0)),
        (),
    ),
}
SAVES_INPUT = {"hardswish"}  # backward reads the forward input rather than the output

# Where the derivative jumps: finite differences must stay away from these inputs.
KINKS = {
    "leaky_relu": [0.0],
    "hardsigmoid": [-2.0, 2.0],  # 0.25*x + 0.5 hits 0 and 1
    "clip": [-1.5, 2.0],
    "hardswish": [-3.0, 3.0],
}


def fwd(name):
    return getattr(K, name + "_forward")


def bwd(name):
    return getattr(K, name + "_backward")


def run_forward(name, x, y=None):
    y = np.full(x.shape, np.nan, np.float32) if y is None else y
    fwd(name)(x, y, *CASES[name][0])
    return y


def run_backward(name, x, y, dy, dx=None):
    dx = np.full(dy.shape, np.nan, np.float32) if dx is None else dx
    saved = x if name in SAVES_INPUT else y
    bwd(name)(saved, dy, dx, *CASES[name][3])
    return dx


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 5), (2, 3, 4, 5), (1, 40001)])
def test_matches_numpy(name, shape):
    _, ref_f, ref_b, _ = CASES[name]
    rng = np.random.default_rng(sum(shape) + len(name))
    x = (rng.standard_normal(shape) * 4).astype(np.float32)  # covers every branch of each function
    y = run_forward(name, x)
    np.testing.assert_allclose(y, ref_f(x.astype(np.float64)), rtol=2e-6, atol=1e-7)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx = run_backward(name, x, y, dy)
    saved = x if name in SAVES_INPUT else y
    np.testing.assert_allclose(dx, ref_b(saved.astype(np.float64), dy.astype(np.float64)), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", CASES)
def test_in_place_and_reshaped(name):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 7)) * 4).astype(np.float32)
    y = run_forward(name, x)
    z = x.copy()
    run_forward(name, z, z)  # y may be x
    np.testing.assert_array_equal(z, y)
    flat = np.empty(35, np.float32)  # any shape with the same number of elements
    run_forward(name, x, flat)
    np.testing.assert_array_equal(flat, y.reshape(-1))
    dy = rng.standard_normal((5, 7)).astype(np.float32)
    dx = run_backward(name, x, y, dy)
    run_backward(name, x, y, dy, dy)  # dx may be dy
    np.testing.assert_array_equal(dy, dx)


@pytest.mark.parametrize("name", CASES)
def test_finite_differences(name):
    """L = sum(f(x) * r): float64 central differences of the NumPy forward against the kernel
    backward fed the kernel's own float32 forward output (or input, for hardswish), with inputs
    kept at least 0.05 away from every kink (eps is 1e-4, so no difference straddles one)."""
    _, ref_f, _, _ = CASES[name]
    rng = np.random.default_rng(11)
    x = rng.uniform(-5, 5, 60)
    for k in KINKS[name]:
        x = np.where(np.abs(x - k) < 0.05, k + 0.5, x)
    x = x.astype(np.float32).astype(np.float64)  # the point the kernel sees, exactly
    r = rng.standard_normal(60)
    y = run_forward(name, x.astype(np.float32))
    dx = run_backward(name, x.astype(np.float32), y, r.astype(np.float32))
    eps = 1e-4
    fd = np.array([((ref_f(x + eps * e) - ref_f(x - eps * e)) * r).sum() / (2 * eps) for e in np.eye(60)])
    # Piecewise linear or quadratic: central differences are exact up to float64 rounding; the
    # kernel's float32 arithmetic gives ~1e-7 relative.
    np.testing.assert_allclose(dx, fd, rtol=1e-5, atol=1e-6)


def test_leaky_relu_boundaries():
    x = np.array([-np.inf, -2.0, -0.0, 0.0, 1e-30, 3.0, np.inf, np.nan], np.float32)
    y = np.empty_like(x)
    K.leaky_relu_forward(x, y, 0.5)
    np.testing.assert_array_equal(y, [-np.inf, -1.0, 0.0, 0.0, x[4], 3.0, np.inf, np.nan])
    dx = np.empty_like(x)
    K.leaky_relu_backward(y, np.ones_like(x), dx, 0.5)
    # x == 0 (y == 0) takes the negative slope, as PyTorch's leaky_relu_backward (x > 0 ? dy : a*dy).
    np.testing.assert_array_equal(dx, [0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 0.5])
    # Any finite slope is accepted forward (ONNX allows it); alpha=0 is ReLU, negative flips.
    K.leaky_relu_forward(np.array([-2.0, 2.0], np.float32), y[:2], -1.0)
    np.testing.assert_array_equal(y[:2], [2.0, 2.0])


def test_hardsigmoid_boundaries():
    # ONNX defaults alpha=0.2, beta=0.5: the linear part spans x in (-2.5, 2.5).
    x = np.array([-100, -2.5, -1, 0, 1, 2.5, 100, np.nan], np.float32)
    y = np.empty_like(x)
    K.hardsigmoid_forward(x, y, 0.2, 0.5)
    np.testing.assert_allclose(y, [0, 0, 0.3, 0.5, 0.7, 1, 1, np.nan], rtol=1e-6, atol=1e-7)
    assert y[0] == 0 and y[1] == 0 and y[5] == 1 and y[6] == 1
    dx = np.empty_like(x)
    K.hardsigmoid_backward(y, np.full_like(x, 2.0), dx, 0.2)
    # 0 on the bounds (y == 0 or y == 1), alpha*dy strictly inside, 0 for NaN.
    np.testing.assert_allclose(dx, [0, 0, 0.4, 0.4, 0.4, 0, 0, 0], rtol=1e-6)
    # PyTorch's hardsigmoid: alpha=1/6, beta=0.5, saturating exactly at +-3.
    x = np.array([-3, -1.5, 0, 1.5, 3], np.float32)
    K.hardsigmoid_forward(x, y[:5], 1 / 6, 0.5)
    np.testing.assert_allclose(y[:5], [0, 0.25, 0.5, 0.75, 1], rtol=1e-6, atol=1e-7)


def test_clip_boundaries_relu6_and_open_sides():
    x = np.array([-np.inf, -1, 0, 3, 6, 7, np.inf, np.nan], np.float32)
    y = np.empty_like(x)
    K.clip_forward(x, y, 0.0, 6.0)  # ReLU6
    np.testing.assert_array_equal(y, [0, 0, 0, 3, 6, 6, 6, np.nan])
    dx = np.empty_like(x)
    K.clip_backward(y, np.full_like(x, 5.0), dx, 0.0, 6.0)
    # Gradient 0 exactly on a bound, as torch's relu6/hardtanh.
    np.testing.assert_array_equal(dx, [0, 0, 0, 5, 0, 0, 0, 0])
    K.clip_forward(x, y, -np.inf, np.inf)  # both sides open: identity
    np.testing.assert_array_equal(y, x)
    K.clip_backward(y, np.ones_like(x), dx, -np.inf, np.inf)
    np.testing.assert_array_equal(dx, [0, 1, 1, 1, 1, 1, 0, 0])
    K.clip_forward(x, y, -np.inf, 1.0)  # only an upper bound
    np.testing.assert_array_equal(y, [-np.inf, -1, 0, 1, 1, 1, 1, np.nan])
    K.clip_forward(x, y, 2.0, 2.0)  # lo == hi is allowed: a constant, gradient 0 everywhere
    np.testing.assert_array_equal(y[:7], 2.0)
    K.clip_backward(y, np.ones_like(x), dx, 2.0, 2.0)
    np.testing.assert_array_equal(dx, 0.0)


def test_hardswish_boundaries():
    x = np.array([-np.inf, -4, -3, -1.5, 0, 1.5, 3, 4, 1e30, np.inf, np.nan], np.float32)
    y = np.empty_like(x)
    K.hardswish_forward(x, y)
    # Exactly 0 at and below -3, exactly x at and above 3.
    np.testing.assert_allclose(y, [0, 0, 0, -0.375, 0, 1.125, 3, 4, x[8], np.inf, np.nan], rtol=1e-6)
    assert np.all(y[:3] == 0) and np.array_equal(y[6:10], x[6:10])
    dx = np.empty_like(x)
    K.hardswish_backward(x, np.ones_like(x), dx)
    # PyTorch's edges: x < -3 -> 0, -3 <= x <= 3 -> x/3 + 1/2 (so -1/2 at -3 and 3/2 at 3), x > 3 -> 1;
    # a NaN input fails both comparisons and passes dy through, as in PyTorch's branch order.
    np.testing.assert_allclose(dx, [0, 0, -0.5, 0, 0.5, 1, 1.5, 1, 1, 1, 1], rtol=1e-6)


def test_thread_count_independent():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(300001) * 4).astype(np.float32)
    dy = rng.standard_normal(300001).astype(np.float32)
    before = K.get_num_threads()
    res = []
    try:
        for t in (1, 2, 3):
            K.set_num_threads(t)
            outs = []
            for name in CASES:
                y = run_forward(name, x)
                outs += [y, run_backward(name, x, y, dy)]
            res.append(outs)
    finally:
        K.set_num_threads(before)
    for other in res[1:]:
        for a, b in zip(res[0], other):
            np.testing.assert_array_equal(a, b)


def test_shape_dtype_and_memory_errors():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="leaky_relu_forward: x has 12 elements but y has 11"):
        K.leaky_relu_forward(x, np.zeros(11, np.float32), 0.1)
    with pytest.raises(ValueError, match="hardsigmoid_forward: x must have dtype float32, got float64"):
        K.hardsigmoid_forward(x.astype(np.float64), x, 0.2, 0.5)
    with pytest.raises(ValueError, match="clip_forward: y must be C-contiguous"):
        K.clip_forward(np.zeros((4, 3), np.float32), x.T, 0.0, 6.0)
    with pytest.raises(ValueError, match="hardswish_forward: x must be a numpy array"):
        K.hardswish_forward([1.0], x)
    ro = np.zeros_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="clip_backward: dx must be writable"):
        K.clip_backward(x, x, ro, 0.0, 6.0)
    with pytest.raises(ValueError, match="hardsigmoid_backward: y has 12 elements but dy has 4"):
        K.hardsigmoid_backward(x, np.zeros(4, np.float32), x, 0.2)
    with pytest.raises(ValueError, match="hardswish_backward: dy has 12 elements but dx has 13"):
        K.hardswish_backward(x, x, np.zeros(13, np.float32))
    with pytest.raises(ValueError, match="leaky_relu_backward: dy must have dtype float32, got int32"):
        K.leaky_relu_backward(x, x.astype(np.int32), x, 0.1)
    buf = np.zeros(13, np.float32)
    with pytest.raises(ValueError, match="leaky_relu_forward: x and y overlap without being the same array"):
        K.leaky_relu_forward(buf[1:], buf[:-1], 0.1)
    # hardswish backward reads x at every index it writes: dx may be dy but never x.
    dy = np.ones_like(x)
    with pytest.raises(ValueError, match="hardswish_backward: x and dx must not share memory"):
        K.hardswish_backward(x, dy, x)
    with pytest.raises(ValueError, match="hardswish_backward: x and dx overlap"):
        K.hardswish_backward(buf[1:], buf[:-1].copy(), buf[:-1])
    K.hardswish_backward(x, dy, dy)  # allowed
    empty = np.zeros(0, np.float32)
    K.hardswish_backward(empty, empty, empty)  # nothing to overlap


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: K.leaky_relu_backward(x, x, x, 0.0), "leaky_relu_backward: alpha must be > 0"),
        (lambda x: K.leaky_relu_backward(x, x, x, -0.1), "leaky_relu_backward: alpha must be > 0"),
        (lambda x: K.leaky_relu_backward(x, x, x, 1e-50), "leaky_relu_backward: alpha must be > 0"),  # 0 in float32
        (lambda x: K.leaky_relu_backward(x, x, x, float("nan")), "leaky_relu_backward: alpha must be finite"),
        (lambda x: K.leaky_relu_forward(x, x, float("inf")), "leaky_relu_forward: alpha must be finite"),
        (lambda x: K.leaky_relu_forward(x, x, 1e39), "leaky_relu_forward: alpha must be finite in float32"),
        (lambda x: K.leaky_relu_forward(x, x, "0.1"), "leaky_relu_forward: alpha must be a number"),
        (lambda x: K.leaky_relu_forward(x, x, None), "leaky_relu_forward: alpha must be a number"),
        (lambda x: K.leaky_relu_forward(x, x, True), "leaky_relu_forward: alpha must be a number"),
        (lambda x: K.hardsigmoid_forward(x, x, float("nan"), 0.5), "hardsigmoid_forward: alpha must be finite"),
        (lambda x: K.hardsigmoid_forward(x, x, 0.2, float("inf")), "hardsigmoid_forward: beta must be finite"),
        (lambda x: K.hardsigmoid_backward(x, x, x, float("-inf")), "hardsigmoid_backward: alpha must be finite"),
        (lambda x: K.clip_forward(x, x, 1.0, 0.0), r"clip_forward: lo must be <= hi, got lo=1.0 > hi=0.0"),
        (lambda x: K.clip_forward(x, x, float("nan"), 1.0), "clip_forward: lo and hi must not be NaN"),
        (lambda x: K.clip_backward(x, x, x, 0.0, float("nan")), "clip_backward: lo and hi must not be NaN"),
        (lambda x: K.clip_backward(x, x, x, np.inf, -np.inf), "clip_backward: lo must be <= hi"),
        (lambda x: K.clip_forward(x, x, [0.0], 1.0), "clip_forward: lo must be a number"),
    ],
)
def test_bad_parameters(call, message):
    x = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=message):
        call(x)


def test_numpy_scalars_and_ints_are_accepted_as_parameters():
    x = np.array([-8.0, -1.0, 0.5, 8.0], np.float32)
    y = np.empty_like(x)
    K.clip_forward(x, y, np.float32(0), 6)  # ints and NumPy scalars, e.g. from an ONNX initializer
    np.testing.assert_array_equal(y, [0, 0, 0.5, 6])
    K.leaky_relu_forward(x, y, np.float64(0.5))
    np.testing.assert_array_equal(y, [-4, -0.5, 0.5, 8])
    K.hardsigmoid_forward(x, y, alpha=np.float32(0.25), beta=0.5)
    np.testing.assert_array_equal(y, [0, 0.25, 0.625, 1])
