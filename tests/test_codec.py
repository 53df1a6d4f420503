"""Delta codec (int8 / packed int4, nearest / stochastic) against a NumPy mirror of the kernel.

The kernel's rounding uses only exactly-rounded float32 steps, so the mirror below reproduces the
bytes exactly (not just approximately); the error-bound and unbiasedness tests then check the
properties the hub relies on independently of that mirror.
"""
import numpy as np
import pytest

from ftte_core import _kernels as K

F32 = np.float32
M64 = (1 << 64) - 1


# ---------------------------------------------------------------- NumPy reference
def _splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _mix32(x):
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def ref_bits(seed, R, F):
    s = _splitmix64(seed)
    keys = [_splitmix64((s + r) & M64) for r in range(R)]
    k1 = np.array([k & 0xFFFFFFFF for k in keys], np.uint32)[:, None]
    k2 = np.array([k >> 32 for k in keys], np.uint32)[:, None]
    c = np.arange(F, dtype=np.uint32)[None, :]
    return _mix32(_mix32(c ^ k1) ^ k2)


def ref_encode(new, base, rows, L, stochastic=False, seed=0):
    """Integer levels q [R,F] (int32) and scales [R], exactly as the kernel computes them."""
    d = (new if rows is None else new[rows]) - base
    m = np.abs(d).max(axis=1) if d.shape[1] else np.zeros(d.shape[0], F32)
    scale = (m / F32(L)).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = (F32(1) / scale).astype(F32)
        x = np.where(np.isfinite(inv)[:, None], d * inv[:, None], d / scale[:, None]).astype(F32)
    x = np.nan_to_num(x)  # zero-scale rows: masked below
    x = np.clip(x, F32(-(L + 1)), F32(L + 1))
    if stochastic:
        t = np.floor(x)
        fr = (x - t).astype(F32)
        u = (ref_bits(seed, d.shape[0], d.shape[1]) >> np.uint32(8)).astype(F32) * F32(2.0**-24)
        q = t + (u < fr)
    else:
        t = np.trunc(x)
        fr = (x - t).astype(F32)
        q = t + (fr >= 0.5) - (fr <= -0.5)
    q = np.clip(q, -L, L).astype(np.int32)
    q[scale == 0] = 0
    return q, scale


def pack4(q):
    R, F = q.shape
    u = (q & 0xF).astype(np.uint8)
    if F % 2:
        u = np.concatenate([u, np.zeros((R, 1), np.uint8)], axis=1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def unpack4(p, F):
    lo = (p & 0xF).astype(np.int8)
    hi = (p >> 4).astype(np.int8)
    lo = np.where(lo > 7, lo - 16, lo)
    hi = np.where(hi > 7, hi - 16, hi)
    q = np.empty((p.shape[0], 2 * p.shape[1]), np.int8)
    q[:, 0::2], q[:, 1::2] = lo, hi
    return q[:, :F]


# ---------------------------------------------------------------- helpers
def make(rng, O, F, R=None):
    new = rng.standard_normal((O, F)).astype(F32)
    if R is None:
        rows = None
        base = (new + 0.1 * rng.standard_normal((O, F))).astype(F32)
    else:
        rows = np.sort(rng.choice(O, size=R, replace=False)).astype(np.int32)
        base = (new[rows] + 0.1 * rng.standard_normal((R, F))).astype(F32)
    return new, base, rows


def encode(width, new, base, rows, stochastic=False, seed=0):
    R, F = base.shape
    s = np.empty(R, F32)
    if width == 8:
        q = np.empty((R, F), np.int8)
        K.encode_int8(new, base, rows, q, s, stochastic, seed)
    else:
        q = np.empty((R, (F + 1) // 2), np.uint8)
        K.encode_int4(new, base, rows, q, s, stochastic=stochastic, seed=seed)
    return q, s


def decode(width, q, s, F):
    out = np.empty((q.shape[0], F), F32)
    (K.decode_int8 if width == 8 else K.decode_int4)(q, s, out)
    return out


LEVELS = {8: 127, 4: 7}


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    K.set_num_threads(0)


# ---------------------------------------------------------------- reference tests
def test_random_bits_match_reference():
    bits = ref_bits(12345, 3, 17)
    for r in range(3):
        for c in range(17):
            assert K.codec_random_bits(12345, r, c) == int(bits[r, c])


@pytest.mark.parametrize("width", [8, 4])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("O,F,R", [(7, 13, None), (33, 64, 9), (5, 1, None), (40, 129, 17), (3, 1000, 2)])
def test_encode_decode_match_reference(width, stochastic, O, F, R):
    rng = np.random.default_rng(O * 1000 + F)
    new, base, rows = make(rng, O, F, R)
    q, s = encode(width, new, base, rows, stochastic, seed=77)
    qr, sr = ref_encode(new, base, rows, LEVELS[width], stochastic, seed=77)
    np.testing.assert_array_equal(s, sr)
    if width == 8:
        np.testing.assert_array_equal(q.astype(np.int32), qr)
    else:
        np.testing.assert_array_equal(q, pack4(qr))  # exact bytes, incl. a zero high nibble for odd F
        np.testing.assert_array_equal(unpack4(q, F).astype(np.int32), qr)
    out = decode(width, q, s, F)
    np.testing.assert_array_equal(out, (qr.astype(F32) * sr[:, None]).astype(F32))


def test_int4_nibble_layout():
    # delta row = [7, -7, 1, -1, 0] with scale 1: low nibble holds element 2i, high 2i+1.
    base = np.zeros((1, 5), F32)
    new = np.array([[7, -7, 1, -1, 0]], F32)
    q, s = encode(4, new, base, None)
    assert s[0] == 1.0
    assert list(q[0]) == [0x7 | (0x9 << 4), 0x1 | (0xF << 4), 0x0]
    np.testing.assert_array_equal(decode(4, q, s, 5), new)


def test_rows_subset_equals_gathered_rows():
    rng = np.random.default_rng(1)
    new, base, rows = make(rng, 50, 31, 12)
    for width in (8, 4):
        q1, s1 = encode(width, new, base, rows, True, 5)
        q2, s2 = encode(width, np.ascontiguousarray(new[rows]), base, None, True, 5)
        np.testing.assert_array_equal(q1, q2)
        np.testing.assert_array_equal(s1, s2)


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("width", [8, 4])
def test_error_bounds(width):
    rng = np.random.default_rng(2)
    new, base, rows = make(rng, 64, 257, None)
    new[3] *= 1e-30  # tiny rows still round correctly
    base[3] *= 1e-30
    delta = (new - base).astype(np.float64)
    q, s = encode(width, new, base, rows, False)
    err = np.abs(decode(width, q, s, 257) - delta)
    assert np.all(err <= s[:, None] * (0.5 + 1e-5) + 1e-45)
    for seed in range(5):
        q, s = encode(width, new, base, rows, True, seed)
        err = np.abs(decode(width, q, s, 257) - delta)
        assert np.all(err < s[:, None] * (1 + 1e-5))
    # the largest |delta| of each row is representable: q reaches +-L
    qi = q.astype(np.int32) if width == 8 else unpack4(q, 257).astype(np.int32)
    assert np.abs(qi).max() == LEVELS[width]


@pytest.mark.parametrize("width", [8, 4])
def test_stochastic_is_unbiased(width):
    rng = np.random.default_rng(3)
    F, n = 40, 2000
    new = rng.standard_normal((1, F)).astype(F32)
    base = np.zeros((1, F), F32)
    acc = np.zeros(F)
    for seed in range(n):
        q, s = encode(width, new, base, None, True, seed)
        acc += decode(width, q, s, F)[0]
    mean = acc / n
    delta = new[0].astype(np.float64)
    # Each draw is one of two neighbouring levels: std <= scale/2, so the mean's SE <= scale/(2 sqrt n).
    se = s[0] / (2 * np.sqrt(n))
    assert np.all(np.abs(mean - delta) < 5 * se)
    # and it is not nearest rounding in disguise: the mean is much closer than nearest's error
    qn, sn = encode(width, new, base, None, False)
    nearest_err = np.abs(decode(width, qn, sn, F)[0] - delta)
    assert np.abs(mean - delta).mean() < 0.5 * nearest_err.mean()


@pytest.mark.parametrize("width", [8, 4])
def test_stochastic_reproducible(width):
    rng = np.random.default_rng(4)
    new, base, rows = make(rng, 20, 99, 7)
    a = encode(width, new, base, rows, True, 2**63 + 11)
    b = encode(width, new, base, rows, True, 2**63 + 11)
    c = encode(width, new, base, rows, True, 2**63 + 12)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].tobytes() != c[0].tobytes()
    np.testing.assert_array_equal(a[1], c[1])  # scales do not depend on the seed
    # any Python int is a seed, taken modulo 2**64
    m = encode(width, new, base, rows, True, -1)
    p = encode(width, new, base, rows, True, 2**64 - 1)
    assert m[0].tobytes() == p[0].tobytes()
    n = encode(width, new, base, rows, True, np.int64(-1))  # NumPy integers work too
    assert n[0].tobytes() == p[0].tobytes()
    with pytest.raises(ValueError, match="seed must be an integer, got float"):
        encode(width, new, base, rows, True, 1.5)


@pytest.mark.parametrize("width", [8, 4])
@pytest.mark.parametrize("stochastic", [False, True])
def test_thread_count_independent(width, stochastic):
    rng = np.random.default_rng(5)
    new, base, rows = make(rng, 700, 301, 600)  # big enough to really run on several threads
    K.set_num_threads(1)
    q1, s1 = encode(width, new, base, rows, stochastic, 9)
    d1 = decode(width, q1, s1, 301)
    K.set_num_threads(2)
    q2, s2 = encode(width, new, base, rows, stochastic, 9)
    d2 = decode(width, q2, s2, 301)
    assert q1.tobytes() == q2.tobytes() and s1.tobytes() == s2.tobytes()
    assert d1.tobytes() == d2.tobytes()


@pytest.mark.parametrize("width", [8, 4])
@pytest.mark.parametrize("stochastic", [False, True])
def test_zero_rows(width, stochastic):
    rng = np.random.default_rng(6)
    new, base, rows = make(rng, 6, 11, None)
    base[2] = new[2]
    base[4] = new[4]
    q, s = encode(width, new, base, rows, stochastic, 1)
    assert s[2] == 0 and s[4] == 0
    assert not q[2].any() and not q[4].any()
    out = decode(width, q, s, 11)
    assert not out[2].any() and not out[4].any()
    assert np.all(s[[0, 1, 3, 5]] > 0)


@pytest.mark.parametrize("fn", ["encode_int8", "encode_int4"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_delta_rejected(fn, bad):
    rng = np.random.default_rng(7)
    new, base, rows = make(rng, 10, 8, 5)
    new[rows[3], 6] = bad
    q = np.empty((5, 8 if fn == "encode_int8" else 4), np.int8 if fn == "encode_int8" else np.uint8)
    s = np.empty(5, F32)
    with pytest.raises(ValueError, match=rf"{fn}: delta row 3 \(new row {rows[3]}\) holds NaN or Inf"):
        getattr(K, fn)(new, base, rows, q, s)
    # the first bad row is named, whichever thread sees it
    new2, base2, _ = make(rng, 900, 300, None)
    base2[700, 0] = np.nan
    base2[650, 9] = np.inf
    q2 = np.empty((900, 300 if fn == "encode_int8" else 150), q.dtype)
    with pytest.raises(ValueError, match="delta row 650 "):
        getattr(K, fn)(new2, base2, None, q2, np.empty(900, F32), True, 3)


# ---------------------------------------------------------------- argument errors
def test_bad_arguments():
    rng = np.random.default_rng(8)
    new, base, rows = make(rng, 10, 6, 4)
    q = np.empty((4, 6), np.int8)
    s = np.empty(4, F32)
    with pytest.raises(ValueError, match="encode_int8: new must have dtype float32"):
        K.encode_int8(new.astype(np.float64), base, rows, q, s)
    with pytest.raises(ValueError, match="encode_int8: base has shape"):
        K.encode_int8(new, base[:3], rows, q, s)
    with pytest.raises(ValueError, match="encode_int8: q must have dtype int8"):
        K.encode_int8(new, base, rows, q.view(np.uint8), s)
    with pytest.raises(ValueError, match="encode_int8: q has shape"):
        K.encode_int8(new, base, rows, np.empty((4, 5), np.int8), s)
    with pytest.raises(ValueError, match="encode_int8: scales has shape"):
        K.encode_int8(new, base, rows, q, np.empty(3, F32))
    with pytest.raises(ValueError, match="encode_int8: rows must have dtype int32"):
        K.encode_int8(new, base, rows.astype(np.int64), q, s)
    with pytest.raises(ValueError, match=r"encode_int8: rows\[1\] = 10 is outside \[0, 10\)"):
        K.encode_int8(new, base, np.array([0, 10, 2, 3], np.int32), q, s)
    with pytest.raises(ValueError, match="encode_int8: new must be C-contiguous"):
        K.encode_int8(np.asfortranarray(new), base, rows, q, s)
    with pytest.raises(ValueError, match="encode_int8: new must have 2 dimensions"):
        K.encode_int8(new.ravel(), base, rows, q, s)
    ro = np.empty((4, 6), np.int8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="encode_int8: q must be writable"):
        K.encode_int8(new, base, rows, ro, s)
    with pytest.raises(ValueError, match="encode_int8: base has shape"):
        K.encode_int8(new, base, None, q, s)  # rows None means all 10 rows
    with pytest.raises(ValueError, match=r"encode_int4: q has shape \(4, 6\) but dimension 1 must be 3"):
        K.encode_int4(new, base, rows, np.empty((4, 6), np.uint8), s)
    with pytest.raises(ValueError, match="encode_int4: q must have dtype uint8"):
        K.encode_int4(new, base, rows, np.empty((4, 3), np.int8), s)
    out = np.empty((4, 6), F32)
    K.encode_int8(new, base, rows, q, s)
    with pytest.raises(ValueError, match=r"decode_int8: scales\[2\] is not finite"):
        bad = s.copy()
        bad[2] = np.nan
        K.decode_int8(q, bad, out)
    with pytest.raises(ValueError, match=r"decode_int4: scales\[0\] is not finite"):
        bad = s.copy()
        bad[0] = np.inf
        K.decode_int4(np.empty((4, 3), np.uint8), bad, out)
    with pytest.raises(ValueError, match="decode_int8: q has shape"):
        K.decode_int8(q[:, :5].copy(), s, out)
    with pytest.raises(ValueError, match="decode_int8: out must be writable"):
        ro = np.empty((4, 6), F32)
        ro.flags.writeable = False
        K.decode_int8(q, s, ro)
    with pytest.raises(ValueError, match="decode_int4: q has shape"):
        K.decode_int4(np.empty((4, 4), np.uint8), s, np.empty((4, 5), F32))
    with pytest.raises(ValueError, match="decode_int8: out must have dtype float32"):
        K.decode_int8(q, s, np.empty((4, 6), np.float64))
