"""Softmax cross-entropy: NumPy reference, stability, finite differences, errors, threads."""
import numpy as np
import pytest

from ftte_core import _kernels as K


def ref(logits, labels):
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return np.exp(logp), -logp[np.arange(len(labels)), labels].mean()


@pytest.mark.parametrize("N,C", [(1, 1), (1, 10), (7, 3), (64, 10), (5, 1000)])
def test_matches_numpy(N, C):
    rng = np.random.default_rng(N * C)
    logits = (rng.standard_normal((N, C)) * 4).astype(np.float32)
    labels = rng.integers(0, C, N).astype(np.int32)
    probs = np.full((N, C), np.nan, np.float32)
    loss = K.softmax_xent_forward(logits, labels, probs)
    want_p, want_loss = ref(logits, labels)
    assert isinstance(loss, float)
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(probs, want_p, rtol=1e-5, atol=1e-7)
    d = np.full((N, C), np.nan, np.float32)
    K.softmax_xent_backward(probs, labels, d, 1.0 / N)
    onehot = np.eye(C)[labels]
    np.testing.assert_allclose(d, (want_p - onehot) / N, rtol=1e-5, atol=1e-7)


def test_stable_for_huge_logits_and_in_place():
    logits = np.array([[1e4, 0, -1e4], [-3e4, -3e4 + 1, -3e4 + 2], [50, 50, 50]], np.float32)
    labels = np.array([2, 0, 1], np.int32)
    probs = np.empty_like(logits)
    loss = K.softmax_xent_forward(logits, labels, probs)
    want_p, want_loss = ref(logits, labels)
    assert np.isfinite(loss) and loss == pytest.approx(want_loss, rel=1e-6)
    np.testing.assert_allclose(probs, want_p, rtol=1e-6, atol=1e-30)
    z = logits.copy()
    assert K.softmax_xent_forward(z, labels, z) == loss  # probs may be logits
    np.testing.assert_array_equal(z, probs)
    K.softmax_xent_backward(z, labels, z, 0.5)  # dlogits may be probs
    np.testing.assert_allclose(z, (want_p - np.eye(3)[labels]) * 0.5, rtol=1e-6, atol=1e-30)


def test_finite_differences():
    """d(mean loss)/d logits from the kernels vs float64 central differences of the NumPy loss."""
    rng = np.random.default_rng(4)
    N, C = 6, 5
    z = rng.standard_normal((N, C))
    labels = rng.integers(0, C, N).astype(np.int32)
    probs = np.empty((N, C), np.float32)
    K.softmax_xent_forward(z.astype(np.float32), labels, probs)
    d = np.empty((N, C), np.float32)
    K.softmax_xent_backward(probs, labels, d, 1.0 / N)
    eps = 1e-5
    fd = np.zeros((N, C))
    for i in range(N):
        for j in range(C):
            zp, zm = z.copy(), z.copy()
            zp[i, j] += eps
            zm[i, j] -= eps
            fd[i, j] = (ref(zp, labels)[1] - ref(zm, labels)[1]) / (2 * eps)
    # float32 probs: absolute error ~1e-7 / N per entry.
    np.testing.assert_allclose(d, fd, rtol=1e-5, atol=1e-6)

    # And the kernel's own forward in float32 with a coarser step.
    z32 = z.astype(np.float32)

    def loss():
        return K.softmax_xent_forward(z32, labels, np.empty((N, C), np.float32))

    for i, j in [(0, 0), (2, 3), (5, 4)]:
        old = z32[i, j]
        z32[i, j] = old + 1e-2
        lp = loss()
        z32[i, j] = old - 1e-2
        lm = loss()
        z32[i, j] = old
        assert (lp - lm) / 2e-2 == pytest.approx(d[i, j], abs=2e-4)


def test_thread_count_independent():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((4000, 37)).astype(np.float32)
    labels = rng.integers(0, 37, 4000).astype(np.int32)
    before = K.get_num_threads()
    res = []
    try:
        for t in (1, 2):
            K.set_num_threads(t)
            p = np.empty_like(logits)
            loss = K.softmax_xent_forward(logits, labels, p)
            d = np.empty_like(p)
            K.softmax_xent_backward(p, labels, d, 1 / 4000)
            res.append((loss, p, d))
    finally:
        K.set_num_threads(before)
    assert res[0][0] == res[1][0]
    np.testing.assert_array_equal(res[0][1], res[1][1])
    np.testing.assert_array_equal(res[0][2], res[1][2])


def test_errors():
    z = np.zeros((4, 3), np.float32)
    lab = np.array([0, 1, 2, 0], np.int32)
    p = np.zeros_like(z)
    with pytest.raises(ValueError, match=r"softmax_xent_forward: labels\[2\] = 3 is outside \[0, 3\)"):
        K.softmax_xent_forward(z, np.array([0, 1, 3, 0], np.int32), p)
    with pytest.raises(ValueError, match=r"labels\[0\] = -1 is outside"):
        K.softmax_xent_backward(p, np.array([-1, 1, 2, 0], np.int32), p, 1.0)
    with pytest.raises(ValueError, match="labels must have dtype int32, got int64"):
        K.softmax_xent_forward(z, lab.astype(np.int64), p)
    with pytest.raises(ValueError, match="labels has shape"):
        K.softmax_xent_forward(z, lab[:3].copy(), p)
    with pytest.raises(ValueError, match="probs has shape"):
        K.softmax_xent_forward(z, lab, np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="logits must be C-contiguous"):
        K.softmax_xent_forward(np.zeros((3, 4), np.float32).T, lab, p)
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        K.softmax_xent_forward(z.reshape(-1), lab, p)
    with pytest.raises(ValueError, match="at least one row"):
        K.softmax_xent_forward(np.zeros((0, 3), np.float32), np.zeros(0, np.int32), np.zeros((0, 3), np.float32))
    ro = np.zeros_like(z)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="dlogits must be writable"):
        K.softmax_xent_backward(p, lab, ro, 1.0)
