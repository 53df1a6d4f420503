"""Fused weighted merge (int8, packed int4, float) against the NumPy loop the hub would write."""
import numpy as np
import pytest

from ftte_core import _kernels as K

F32 = np.float32


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    K.set_num_threads(0)


def unpack4(p, F):
    lo = (p & 0xF).astype(np.int8)
    hi = (p >> 4).astype(np.int8)
    q = np.empty((p.shape[0], 2 * p.shape[1]), np.int8)
    q[:, 0::2] = np.where(lo > 7, lo - 16, lo)
    q[:, 1::2] = np.where(hi > 7, hi - 16, hi)
    return q[:, :F]


def updates(rng, kind, Kn, R, F):
    """K encoded updates of random deltas: (qs, scales) for int8/int4, deltas for float."""
    if kind == "float":
        return [rng.standard_normal((R, F)).astype(F32) for _ in range(Kn)], None
    qs, ss = [], []
    for k in range(Kn):
        d = rng.standard_normal((R, F)).astype(F32)
        s = np.empty(R, F32)
        if kind == "int8":
            q = np.empty((R, F), np.int8)
            K.encode_int8(d, np.zeros_like(d), None, q, s, True, k)
        else:
            q = np.empty((R, (F + 1) // 2), np.uint8)
            K.encode_int4(d, np.zeros_like(d), None, q, s, True, k)
        qs.append(q)
        ss.append(s)
    return qs, ss


def ref_merge(target, rows, kind, qs, ss, alphas):
    out = target.astype(np.float64)
    idx = slice(None) if rows is None else rows
    for k in range(len(qs)):
        if kind == "float":
            out[idx] += float(alphas[k]) * qs[k]
        else:
            q = qs[k] if kind == "int8" else unpack4(qs[k], target.shape[1])
            out[idx] += float(alphas[k]) * ss[k][:, None].astype(np.float64) * q
    return out


def run(kind, target, rows, qs, ss, alphas):
    if kind == "int8":
        K.merge_int8(target, rows, qs, ss, alphas)
    elif kind == "int4":
        K.merge_int4(target, rows, qs, ss, alphas)
    else:
        K.merge_float(target, rows, qs, alphas)


@pytest.mark.parametrize("kind", ["int8", "int4", "float"])
@pytest.mark.parametrize("Kn", [1, 3, 10])
@pytest.mark.parametrize("O,F,R", [(9, 13, None), (40, 1031, 11), (5, 1, 3), (64, 600, 64)])
def test_merge_matches_numpy(kind, Kn, O, F, R):
    rng = np.random.default_rng(Kn * 100 + F)
    rows = None if R is None else rng.permutation(O)[:R].astype(np.int32)  # unsorted on purpose
    nR = O if R is None else R
    target = rng.standard_normal((O, F)).astype(F32)
    qs, ss = updates(rng, kind, Kn, nR, F)
    alphas = rng.uniform(0.05, 1.0, Kn).astype(F32)
    if Kn > 1:
        alphas[1] = 0.0  # a zero weight contributes nothing
    before = target.copy()
    ref = ref_merge(target, rows, kind, qs, ss, alphas)
    run(kind, target, rows, qs, ss, alphas)
    # float32 accumulation of K terms of size <= ~3 each
    np.testing.assert_allclose(target, ref, rtol=1e-5, atol=2e-6 * Kn * 4)
    if rows is not None:
        untouched = np.setdiff1d(np.arange(O), rows)
        assert target[untouched].tobytes() == before[untouched].tobytes()
    # and against the literal float32 NumPy loop the hub would otherwise run
    lit = before.copy()
    idx = slice(None) if rows is None else rows
    for k in range(Kn):
        if kind == "float":
            lit[idx] += alphas[k] * qs[k]
        else:
            q = qs[k] if kind == "int8" else unpack4(qs[k], F)
            lit[idx] += alphas[k] * ss[k][:, None] * q
    np.testing.assert_allclose(target, lit, rtol=1e-5, atol=2e-6 * Kn * 4)


def test_merge_k0_and_zero_scale_rows_are_noops():
    rng = np.random.default_rng(1)
    target = rng.standard_normal((6, 7)).astype(F32)
    before = target.copy()
    K.merge_int8(target, None, [], [], np.zeros(0, F32))
    K.merge_float(target, None, [], np.zeros(0, F32))
    assert target.tobytes() == before.tobytes()
    q = np.full((6, 7), 100, np.int8)
    K.merge_int8(target, None, [q], [np.zeros(6, F32)], np.ones(1, F32))
    assert target.tobytes() == before.tobytes()


@pytest.mark.parametrize("kind", ["int8", "int4", "float"])
def test_merge_thread_count_independent(kind):
    rng = np.random.default_rng(2)
    O, F, R, Kn = 600, 301, 500, 10
    rows = rng.permutation(O)[:R].astype(np.int32)
    qs, ss = updates(rng, kind, Kn, R, F)
    alphas = rng.uniform(0.0, 1.0, Kn).astype(F32)
    t0 = rng.standard_normal((O, F)).astype(F32)
    outs = []
    for n in (1, 2):
        K.set_num_threads(n)
        t = t0.copy()
        run(kind, t, rows, qs, ss, alphas)
        outs.append(t)
    assert outs[0].tobytes() == outs[1].tobytes()


def _args(rng, kind="int8", O=8, F=6, R=4, Kn=3):
    rows = np.arange(R, dtype=np.int32)
    qs, ss = updates(rng, kind, Kn, R, F)
    return np.zeros((O, F), F32), rows, qs, ss, np.ones(Kn, F32)


def test_merge_errors():
    rng = np.random.default_rng(3)
    t, rows, qs, ss, a = _args(rng)
    with pytest.raises(ValueError, match="merge_int8: alphas has 2 entries but qs has 3"):
        K.merge_int8(t, rows, qs, ss, a[:2])
    with pytest.raises(ValueError, match="merge_int8: scales has 2 arrays but qs has 3"):
        K.merge_int8(t, rows, qs, ss[:2], a)
    with pytest.raises(ValueError, match=r"merge_int8: qs\[1\] has shape \(4, 5\)"):
        K.merge_int8(t, rows, [qs[0], qs[1][:, :5].copy(), qs[2]], ss, a)
    with pytest.raises(ValueError, match=r"merge_int8: qs\[2\] must have dtype int8"):
        K.merge_int8(t, rows, [qs[0], qs[1], qs[2].astype(np.int16)], ss, a)
    with pytest.raises(ValueError, match=r"merge_int8: scales\[0\] has shape"):
        K.merge_int8(t, rows, qs, [ss[0][:3].copy(), ss[1], ss[2]], a)
    with pytest.raises(ValueError, match="merge_int8: rows holds 2 twice"):
        K.merge_int8(t, np.array([0, 2, 1, 2], np.int32), qs, ss, a)
    with pytest.raises(ValueError, match=r"merge_int8: rows\[0\] = -1 is outside"):
        K.merge_int8(t, np.array([-1, 2, 1, 3], np.int32), qs, ss, a)
    with pytest.raises(ValueError, match=r"merge_int8: qs\[0\] has shape"):
        K.merge_int8(t, None, qs, ss, a)  # rows None means all 8 rows
    bad = a.copy()
    bad[1] = np.nan
    with pytest.raises(ValueError, match=r"merge_int8: alphas\[1\] is not finite"):
        K.merge_int8(t, rows, qs, ss, bad)
    bs = [s.copy() for s in ss]
    bs[2][3] = np.inf
    with pytest.raises(ValueError, match=r"merge_int8: scales\[2\]\[3\] is not finite"):
        K.merge_int8(t, rows, qs, bs, a)
    with pytest.raises(ValueError, match="merge_int8: alphas must have dtype float32"):
        K.merge_int8(t, rows, qs, ss, a.astype(np.float64))
    with pytest.raises(ValueError, match="merge_int8: qs must be a list or tuple"):
        K.merge_int8(t, rows, qs[0], ss, a)
    with pytest.raises(ValueError, match="merge_int8: target must be C-contiguous"):
        K.merge_int8(np.zeros((6, 8), F32).T, rows, qs, ss, a)
    ro = t.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="merge_int8: target must be writable"):
        K.merge_int8(ro, rows, qs, ss, a)
    with pytest.raises(ValueError, match="merge_int8: target must have dtype float32"):
        K.merge_int8(t.astype(np.float64), rows, qs, ss, a)


def test_merge_int4_and_float_errors():
    rng = np.random.default_rng(4)
    t, rows, qs, ss, a = _args(rng, "int4", F=7)
    with pytest.raises(ValueError, match=r"merge_int4: qs\[0\] has shape \(4, 4\) but dimension 1 must be 3"):
        K.merge_int4(np.zeros((8, 6), F32), rows, qs, ss, a)
    with pytest.raises(ValueError, match=r"merge_int4: qs\[0\] must have dtype uint8"):
        K.merge_int4(t, rows, [q.view(np.int8) for q in qs], ss, a)
    with pytest.raises(ValueError, match="merge_int4: rows holds 0 twice"):
        K.merge_int4(t, np.array([0, 1, 0, 3], np.int32), qs, ss, a)
    t, rows, ds, _, a = _args(rng, "float")
    with pytest.raises(ValueError, match="merge_float: alphas has 3 entries but deltas has 2"):
        K.merge_float(t, rows, ds[:2], a)
    with pytest.raises(ValueError, match=r"merge_float: deltas\[1\] must have dtype float32"):
        K.merge_float(t, rows, [ds[0], ds[1].astype(np.float64), ds[2]], a)
    with pytest.raises(ValueError, match=r"merge_float: deltas\[0\] must be C-contiguous"):
        K.merge_float(t, rows, [np.asfortranarray(ds[0]), ds[1], ds[2]], a)
    bad = a.copy()
    bad[0] = -np.inf
    with pytest.raises(ValueError, match=r"merge_float: alphas\[0\] is not finite"):
        K.merge_float(t, rows, ds, bad)
