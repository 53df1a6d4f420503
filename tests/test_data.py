import os
import zipfile

import numpy as np
import pytest

from ftte_core import data as D
from ftte_core.data import DataError, Dataset


def _write(tmp_path, name="d.npz", **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


def _toy(n=200, classes=5, shape=(1, 6, 6), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n,) + shape, dtype=np.float32)
    y = (np.arange(n) % classes).astype(np.int32)
    rng.shuffle(y)
    return Dataset(x, y, classes, "toy")


@pytest.fixture(scope="module")
def digits():
    return D.load_bundled("digits")


# ----------------------------------------------------------------------------- loading

def test_bundled_digits(digits):
    assert len(digits) == 1797
    assert digits.num_classes == 10
    assert digits.feature_shape == (1, 8, 8)
    assert digits.x.dtype == np.float32 and digits.y.dtype == np.int32
    assert digits.x.flags.c_contiguous and digits.y.flags.c_contiguous
    assert digits.x.min() == 0.0 and digits.x.max() == 1.0
    assert set(np.unique(digits.y)) == set(range(10))
    assert "digits" in D.bundled_names()
    assert "n=1797" in repr(digits)


def test_bundled_unknown_name():
    with pytest.raises(DataError, match="no bundled dataset 'nope'.*digits"):
        D.load_bundled("nope")
    with pytest.raises(DataError, match="bad dataset name"):
        D.load_bundled("../digits")


def test_uint8_scaling_and_casts(tmp_path):
    x = np.array([[0, 51, 255], [255, 0, 102]], dtype=np.uint8)
    ds = D.load_npz(_write(tmp_path, x=x, y=np.array([0, 3], np.int64)))
    np.testing.assert_array_equal(ds.x, np.array([[0, .2, 1], [1, 0, .4]], np.float32))
    assert ds.num_classes == 4 and ds.name == "d" and ds.y.dtype == np.int32
    # other ints: cast, not scaled; float64 -> float32; integral float labels accepted
    ds = D.load_npz(_write(tmp_path, x=np.array([[300, -2]], np.int16),
                           y=np.array([1.0])), name="n")
    np.testing.assert_array_equal(ds.x, [[300, -2]])
    assert ds.x.dtype == np.float32 and ds.y.tolist() == [1] and ds.name == "n"
    ds = D.load_npz(_write(tmp_path, x=np.ones((3, 2)), y=np.zeros(3, np.uint8)))
    assert ds.x.dtype == np.float32 and ds.num_classes == 2  # at least 2 classes


@pytest.mark.parametrize("arrays, match", [
    (dict(y=np.zeros(3)), "no array 'x'; arrays present: 'y'"),
    (dict(x=np.zeros((3, 2)), labels=np.zeros(3)), "no array 'y'; arrays present: 'x', 'labels'"),
    (dict(x=np.zeros(3), y=np.zeros(3)), r"ndim >= 2.*shape \(3,\)"),
    (dict(x=np.zeros((3, 2)), y=np.zeros((3, 1))), "y must be 1-D"),
    (dict(x=np.zeros((3, 2)), y=np.zeros(4, np.int64)), "x has 3 samples but y has 4 labels"),
    (dict(x=np.zeros((0, 2)), y=np.zeros(0, np.int64)), "no samples"),
    (dict(x=np.zeros((3, 0)), y=np.zeros(3, np.int64)), "empty features"),
    (dict(x=np.array([[np.nan, 1], [np.inf, -np.inf]]), y=np.zeros(2, np.int64)),
     r"3 non-finite values \(1 NaN, 2 Inf\)"),
    (dict(x=np.full((2, 2), 1e300), y=np.zeros(2, np.int64)), "outside the float32 range"),
    (dict(x=np.zeros((3, 2)), y=np.array([0, -1, -2])), "2 negative labels"),
    (dict(x=np.zeros((3, 2)), y=np.array([0, 1.5, 2])), r"non-integer labels \(e.g. y\[1\]"),
    (dict(x=np.zeros((2, 2)), y=np.array([0, np.nan])), "NaN/Inf labels"),
    (dict(x=np.zeros((2, 2)), y=np.array([0, 10**9])), "too large"),
    (dict(x=np.array([["a", "b"]]), y=np.zeros(1, np.int64)), "integer or floating"),
    (dict(x=np.zeros((2, 2), np.complex64), y=np.zeros(2, np.int64)), "integer or floating"),
    (dict(x=np.zeros((2, 2)), y=np.array(["a", "b"])), "integer class labels"),
    (dict(x=np.zeros((2, 2)), y=np.array([0, 3]), num_classes=np.array(2)),
     "num_classes=2 but labels need at least 4"),
    (dict(x=np.zeros((2, 2)), y=np.array([0, 1]), num_classes=np.array(2.5)),
     "num_classes must be one integer"),
])
def test_bad_arrays(tmp_path, arrays, match):
    p = _write(tmp_path, **arrays)
    with pytest.raises(DataError, match=match) as ei:
        D.load_npz(p)
    assert "d.npz" in str(ei.value) and "\n" not in str(ei.value)


def test_object_array_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):  # would run if the loader ever unpickled
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    p = tmp_path / "o.npz"
    np.savez(p, x=np.array([Boom(), 1], dtype=object), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="'x' is an object array.*pickle"):
        D.load_npz(p)
    assert not (tmp_path / "pwned").exists()
    # a plain pickle file (not npz at all)
    import pickle
    q = tmp_path / "p.npz"
    q.write_bytes(pickle.dumps({"x": [1]}))
    with pytest.raises(DataError, match="not an .npz archive"):
        D.load_npz(q)


def test_file_level_errors(tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        D.load_npz(empty)
    np.savez(tmp_path / "none.npz")
    with pytest.raises(DataError, match="empty .no arrays"):
        D.load_npz(tmp_path / "none.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 this is not really a zip file at all")
    with pytest.raises(DataError, match="corrupt zip"):
        D.load_npz(junk)
    with pytest.raises(DataError, match="No such file"):
        D.load_npz(tmp_path / "missing.npz")
    with pytest.raises(DataError, match="cannot read"):
        D.load_npz(tmp_path)  # a directory
    np.save(tmp_path / "single.npy", np.zeros((2, 2)))
    with pytest.raises(DataError, match="single .npy array"):
        D.load_npz(tmp_path / "single.npy")


def test_corruption_fuzz_only_dataerror(tmp_path):
    # Truncations and byte flips of a real archive must give DataError or load fine; never
    # another exception type.
    for compress in (False, True):
        p = tmp_path / "good.npz"
        (np.savez_compressed if compress else np.savez)(
            p, x=np.arange(60, dtype=np.uint8).reshape(6, 10), y=np.arange(6) % 3)
        good = p.read_bytes()
        rng = np.random.default_rng(1)
        bad = tmp_path / "bad.npz"
        cases = [good[:k] for k in range(0, len(good), max(1, len(good) // 40))]
        for _ in range(150):
            b = bytearray(good)
            for i in rng.integers(0, len(b), size=rng.integers(1, 4)):
                b[i] = rng.integers(0, 256)
            cases.append(bytes(b))
        for c in cases:
            bad.write_bytes(c)
            try:
                ds = D.load_npz(bad)
            except DataError as e:
                assert "\n" not in str(e)
            else:
                assert isinstance(ds, Dataset)


def test_save_roundtrip_atomic(tmp_path, digits):
    part = digits.subset(np.flatnonzero(digits.y < 4))  # lacks classes 4..9
    p = tmp_path / "part.data"  # exact name kept, no ".npz" appended
    D.save_npz(p, part)
    assert sorted(os.listdir(tmp_path)) == ["part.data"]  # no temp file left behind
    back = D.load_npz(p)
    np.testing.assert_array_equal(back.x, part.x)
    np.testing.assert_array_equal(back.y, part.y)
    assert back.num_classes == 10  # kept via the num_classes key, not max(y)+1 == 4
    D.save_npz(p, digits.subset([0, 1, 2]), compress=True)  # overwrite in place
    assert len(D.load_npz(p)) == 3
    with zipfile.ZipFile(p) as z:
        assert sorted(z.namelist()) == ["num_classes.npy", "x.npy", "y.npy"]


def test_save_failure_leaves_old_file(tmp_path, digits, monkeypatch):
    p = tmp_path / "d.npz"
    D.save_npz(p, digits.subset([0, 1]))

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        D.save_npz(p, digits)
    assert os.listdir(tmp_path) == ["d.npz"] and len(D.load_npz(p)) == 2


def test_dataset_validation_and_subset(digits):
    with pytest.raises(DataError, match="float32"):
        Dataset(np.zeros((2, 2)), np.zeros(2, np.int32), 2)
    with pytest.raises(DataError, match="labels must be in 0..1"):
        Dataset(np.zeros((2, 2), np.float32), np.array([0, 2]), 2)
    with pytest.raises(DataError, match=r"shape \(2,\)"):
        Dataset(np.zeros((2, 2), np.float32), np.array([0, 1, 1]), 2)
    s = digits.subset(np.array([5, 3, 5]))
    assert len(s) == 3 and s.num_classes == 10
    np.testing.assert_array_equal(s.x[0], digits.x[5])
    assert len(digits.subset(digits.y == 3)) == int((digits.y == 3).sum())
    assert len(digits.subset([])) == 0
    with pytest.raises(DataError, match="out of range"):
        digits.subset([1797])


# ----------------------------------------------------------------------------- splitting

def test_train_val_split(digits):
    tr, va = D.train_val_split(digits, 0.2, seed=3)
    assert len(va) == round(0.2 * 1797) and len(tr) + len(va) == 1797
    both = np.concatenate([tr.x.reshape(len(tr), -1), va.x.reshape(len(va), -1)])
    assert len(np.unique(both, axis=0)) == len(np.unique(digits.x.reshape(1797, -1), axis=0))
    # stratified: each class's val share within one sample of 20%
    hv, hall = D.label_histogram(va), D.label_histogram(digits)
    assert np.all(np.abs(hv - 0.2 * hall) <= 1)
    tr2, va2 = D.train_val_split(digits, 0.2, seed=3)
    np.testing.assert_array_equal(va.x, va2.x)
    _, va3 = D.train_val_split(digits, 0.2, seed=4)
    assert not np.array_equal(va.x, va3.x)
    _, va4 = D.train_val_split(digits, 0.3, seed=0, stratify=False)
    assert len(va4) == round(0.3 * 1797)
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            D.train_val_split(digits, bad)


def _index_parts(ds, parts):
    # Recover original indices via a unique per-sample tag stored in x.
    lookup = {float(v): i for i, v in enumerate(ds.x[:, 0])}
    return [np.array([lookup[float(v)] for v in p.x[:, 0]], dtype=np.int64) for p in parts]


def _tagged(n=600, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    x = np.arange(n, dtype=np.float32)[:, None].repeat(3, axis=1)
    y = rng.integers(0, classes, n).astype(np.int32)
    return Dataset(x, y, classes, "tag")


@pytest.mark.parametrize("make", [
    lambda ds, seed: D.partition_iid(ds, 7, seed),
    lambda ds, seed: D.partition_dirichlet(ds, 7, 0.5, seed),
    lambda ds, seed: D.partition_dirichlet(ds, 40, 0.05, seed, min_size=5),
])
def test_partitions_disjoint_cover_reproducible(make):
    ds = _tagged()
    parts = make(ds, 11)
    idx = _index_parts(ds, parts)
    allidx = np.concatenate(idx)
    assert len(allidx) == len(ds) and len(np.unique(allidx)) == len(ds)
    for p, i in zip(parts, idx):
        np.testing.assert_array_equal(p.y, ds.y[i])
        assert p.num_classes == ds.num_classes
    again = make(ds, 11)
    assert all(np.array_equal(a.x, b.x) for a, b in zip(parts, again))
    other = make(ds, 12)
    assert any(not np.array_equal(a.x, b.x) for a, b in zip(parts, other))


def test_partition_iid_sizes(digits):
    parts = D.partition_iid(digits, 10, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1797
    assert [p.name for p in parts[:2]] == ["digits/part0", "digits/part1"]
    with pytest.raises(DataError, match="only 1797 samples"):
        D.partition_iid(digits, 1798, 0)
    with pytest.raises(ValueError, match="n_parts must be an integer >= 1"):
        D.partition_iid(digits, 0, 0)


def _mean_max_share(parts):
    return np.mean([D.label_histogram(p).max() / len(p) for p in parts])


def test_dirichlet_skew_and_min_size(digits):
    skewed = D.partition_dirichlet(digits, 20, 0.1, seed=0)
    flat = D.partition_dirichlet(digits, 20, 100.0, seed=0)
    s_skew, s_flat = _mean_max_share(skewed), _mean_max_share(flat)
    assert s_skew > 0.5 and s_flat < 0.25 and s_skew > 2 * s_flat
    # tiny alpha with many more parts than classes forces the fix-up path
    parts = D.partition_dirichlet(digits, 300, 0.01, seed=1, min_size=4, max_tries=3)
    assert min(len(p) for p in parts) >= 4 and sum(len(p) for p in parts) == 1797
    parts = D.partition_dirichlet(digits, 5, 1e-6, seed=2, min_size=1)  # gamma underflow path
    assert min(len(p) for p in parts) >= 1 and sum(len(p) for p in parts) == 1797
    with pytest.raises(DataError, match="needs 1800 samples"):
        D.partition_dirichlet(digits, 100, 1.0, 0, min_size=18)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha must be"):
            D.partition_dirichlet(digits, 4, bad, 0)


# ----------------------------------------------------------------------------- augmentation

def test_augment(digits):
    a = D.augment(digits, 500, seed=0)
    assert a.x.shape == (500, 1, 8, 8) and a.x.dtype == np.float32 and a.y.dtype == np.int32
    assert a.num_classes == 10 and 0.0 <= a.x.min() and a.x.max() <= 1.0
    b = D.augment(digits, 500, seed=0)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, D.augment(digits, 500, seed=1).x)
    # labels kept: each augmented sample is closest (over its class) to an original
    # of the same label, checked through the noise-free, shift-free variant
    c = D.augment(digits, 50, seed=5, max_shift=0, noise_std=0.0)
    flat = digits.x.reshape(len(digits), -1)
    for xi, yi in zip(c.x.reshape(50, -1), c.y):
        hits = np.flatnonzero((flat == xi).all(axis=1))
        assert hits.size and yi in digits.y[hits]
    assert len(D.augment(digits, 0, seed=0)) == 0
    with pytest.raises(ValueError, match="n must be"):
        D.augment(digits, -1, 0)


def test_augment_shift_zero_fill():
    x = np.ones((1, 1, 4, 4), np.float32)
    a = D.augment(Dataset(x, np.zeros(1, np.int32), 2), 200, seed=0, noise_std=0.0)
    # every sample is a shift by at most one pixel: exactly 16, 12 or 9 ones, rest zero
    counts = a.x.reshape(200, -1).sum(axis=1)
    assert set(counts.tolist()) <= {16.0, 12.0, 9.0} and len(set(counts.tolist())) == 3
    flat = D.augment(Dataset(np.zeros((3, 5), np.float32) + 0.5, np.array([0, 1, 1]), 2),
                     4, seed=0)  # 1-D features: noise only; constant data has no range
    assert flat.x.shape == (4, 5)


# ----------------------------------------------------------------------------- iteration

def test_batches_cover_epoch():
    ds = _tagged(103)
    seen = []
    sizes = []
    for xb, yb in D.batches(ds, 10, seed=0):
        assert xb.dtype == np.float32 and yb.dtype == np.int32 and xb.flags.c_contiguous
        seen.append(xb[:, 0])
        sizes.append(len(xb))
    assert sizes == [10] * 10 + [3]
    assert sorted(np.concatenate(seen).tolist()) == list(range(103))
    order0 = np.concatenate([b[0][:, 0] for b in D.batches(ds, 10, seed=0)])
    order1 = np.concatenate([b[0][:, 0] for b in D.batches(ds, 10, seed=1)])
    assert not np.array_equal(order0, order1)
    assert [len(b[0]) for b in D.batches(ds, 10, 0, drop_last=True)] == [10] * 10
    with pytest.raises(ValueError, match="batch_size"):
        D.batches(ds, 0, 0)  # raised eagerly, not on first next()


def test_label_histogram(digits):
    h = D.label_histogram(digits)
    assert h.shape == (10,) and h.sum() == 1797 and h.dtype == np.int64
    part = digits.subset(np.flatnonzero(digits.y == 2))
    assert D.label_histogram(part).tolist() == [0, 0, int(h[2])] + [0] * 7
