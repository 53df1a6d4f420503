"""Strategies: weighting direction (age, variance), normalisation, switches, and merges against NumPy."""
import numpy as np
import pytest

import ftte_core as ft
from ftte_core import _kernels as K
from ftte_core.strategies import FTTE, FedAvg, FedBuff, make_strategy
from ftte_core.update import decode_update, encode_update, subset_values


def _model():
    return ft.zoo("mlp", (8,), 3, hidden=(6,), seed=0)


def _sparse(model):
    return ft.Subset.of(model, {"fc1": {"rows": [0, 2, 5], "bias": True}, "fc2": {"rows": "all", "bias": False}})


def _make_updates(model, subset, deltas, bits=8, base_versions=None, samples=None, stochastic=False):
    """One update per entry of `deltas` (a list of {key: [R,F] array} or scalars: a uniform shift + noise)."""
    base = subset_values(model, subset)
    out = []
    for k, d in enumerate(deltas):
        work = model.copy()
        for key, _l, view, rows in subset.tensors(work):
            r = rows if rows is not None else np.arange(view.shape[0])
            view[r] = base[key] + d[key]
        out.append(encode_update(work, subset, base, (base_versions or [0] * len(deltas))[k],
                                 (samples or [10] * len(deltas))[k], 1.0, bits=bits, stochastic=stochastic, seed=k,
                                 device_id=f"d{k}", task_id=f"t{k}"))
    return out


def _random_deltas(model, subset, n, seed=0, scale=0.01, center=None):
    rng = np.random.default_rng(seed)
    shapes = {key: ((rows.size if rows is not None else view.shape[0]), view.shape[1])
              for key, _l, view, rows in subset.tensors(model)}
    center = center or {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    return [{k: center[k] + (0.2 * scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
            for _ in range(n)]


def test_make_strategy_names_and_properties():
    s = make_strategy("ftte", buffer_size=4)
    assert isinstance(s, FTTE) and s.sparse and not s.synchronous and s.bits == 8 and s.buffer_size == 4
    assert s.age and s.variance
    assert not make_strategy("ftte-noage").age and make_strategy("ftte-noage").variance
    assert make_strategy("ftte-novar").age and not make_strategy("ftte-novar").variance
    assert make_strategy("ftte-noage").name == "ftte-noage"
    fb = make_strategy("fedbuff", buffer_size=3)
    assert isinstance(fb, FedBuff) and not fb.sparse and not fb.synchronous and fb.bits == 32
    fa = make_strategy("FedAvg", buffer_size=7)
    assert isinstance(fa, FedAvg) and fa.synchronous and not fa.sparse and fa.cohort_size == 7
    assert make_strategy("ftte", buffer_size=2, bits=4, server_lr=0.5).bits == 4
    with pytest.raises(ValueError, match="unknown strategy 'fedprox'"):
        make_strategy("fedprox")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="buffer size"):
            make_strategy("ftte", buffer_size=bad)
    with pytest.raises(ValueError, match="server_lr"):
        make_strategy("fedbuff", server_lr=float("nan"))
    with pytest.raises(ValueError, match="bits"):
        FTTE(bits=32)
    with pytest.raises(ValueError, match="age_exponent"):
        FTTE(age_exponent=-1)


def test_training_subset():
    m = _model()
    sub = _sparse(m)
    assert make_strategy("ftte").training_subset(m, sub) is sub
    assert make_strategy("fedbuff").training_subset(m, sub) == ft.Subset.full(m)
    assert make_strategy("fedavg").training_subset(m, None) == ft.Subset.full(m)
    with pytest.raises(ValueError, match="subset"):
        make_strategy("ftte").training_subset(m, None)


def test_age_factor_older_gets_less_weight():
    m = _model()
    sub = _sparse(m)
    ups = _make_updates(m, sub, _random_deltas(m, sub, 4), base_versions=[5, 4, 2, 0])
    s = FTTE(buffer_size=4, variance=False)
    w = s.weights(ups, current_version=5)
    assert np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0)
    assert w[0] > w[1] > w[2] > w[3]
    np.testing.assert_allclose(s.age_factors(ups, 5), (1.0 + np.array([0, 1, 3, 5])) ** -1.0)
    # the switch: without the age factor staleness no longer matters
    w_off = FTTE(buffer_size=4, age=False, variance=False).weights(ups, current_version=5)
    np.testing.assert_allclose(w_off, 0.25)
    w_fresh = FTTE(buffer_size=4, age=False).weights(_make_updates(m, sub, _random_deltas(m, sub, 4)), 0)
    w_stale = FTTE(buffer_size=4, age=False).weights(ups, 5)
    np.testing.assert_allclose(w_fresh, w_stale, rtol=1e-12)  # same deltas, different ages
    # a larger exponent discounts faster
    w_steep = FTTE(buffer_size=4, variance=False, age_exponent=2.0).weights(ups, 5)
    assert w_steep[3] < w[3]


def test_variance_factor_outlier_gets_less_weight():
    m = _model()
    sub = _sparse(m)
    deltas = _random_deltas(m, sub, 5, seed=1)
    deltas[3] = {k: -5 * v for k, v in deltas[3].items()}  # far from the others
    ups = _make_updates(m, sub, deltas)
    s = FTTE(buffer_size=5, age=False)
    var = s.variance_factors(ups)
    assert np.argmin(var) == 3 and np.all(var > 0) and np.all(var <= 1)
    w = s.weights(ups, 0)
    assert np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0)
    assert w[3] < 0.5 * min(np.delete(w, 3))
    # distances follow the documented formula (on the decoded deltas)
    dec = [np.concatenate([v.ravel() for v in decode_update(u).values()]).astype(np.float64) for u in ups]
    mean = np.mean(dec, axis=0)
    d = np.array([((x - mean) ** 2).sum() for x in dec])
    # (the hub computes in float32 with float32 dot products: 1e-5 is ample for a weighting)
    np.testing.assert_allclose(s.outlier_distances(ups), d / d.mean(), rtol=1e-5)
    np.testing.assert_allclose(var, 1 / (1 + d / d.mean()), rtol=1e-5)
    # stronger b punishes the outlier more; the switch turns the factor off entirely
    assert FTTE(buffer_size=5, age=False, variance_strength=4.0).weights(ups, 0)[3] < w[3]
    np.testing.assert_allclose(FTTE(buffer_size=5, age=False, variance=False).weights(ups, 0), 0.2)
    np.testing.assert_allclose(make_strategy("ftte-novar", 5).weights(ups, 0), 0.2)


def test_variance_uses_sample_weighted_mean():
    # two updates: the mean sits near the one with more samples, so the smaller one is the outlier
    m = _model()
    sub = _sparse(m)
    ups = _make_updates(m, sub, _random_deltas(m, sub, 2, seed=4), samples=[90, 10])
    var = FTTE(buffer_size=2, age=False).variance_factors(ups)
    assert var[0] > var[1]


def test_equal_deltas_and_single_update_get_unit_variance_factor():
    m = _model()
    sub = _sparse(m)
    same = _random_deltas(m, sub, 1, seed=2) * 4
    ups = _make_updates(m, sub, same, samples=[10, 20, 30, 40])
    s = FTTE(buffer_size=4, age=False)
    np.testing.assert_array_equal(s.variance_factors(ups), 1.0)
    np.testing.assert_allclose(s.weights(ups, 0), [0.1, 0.2, 0.3, 0.4])  # data size alone
    np.testing.assert_array_equal(s.variance_factors(ups[:1]), 1.0)
    zero = _make_updates(m, sub, [{k: 0 * v for k, v in same[0].items()}] * 3)
    w = s.weights(zero, 0)
    assert np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0)


def test_combined_weights_are_finite_normalised_and_ordered():
    m = _model()
    sub = _sparse(m)
    rng = np.random.default_rng(3)
    for trial in range(10):
        n = int(rng.integers(1, 8))
        ups = _make_updates(m, sub, _random_deltas(m, sub, n, seed=trial), base_versions=list(rng.integers(0, 9, n)),
                            samples=list(rng.integers(1, 500, n)), stochastic=True)
        w = FTTE(buffer_size=n).weights(ups, 9)
        assert w.shape == (n,) and np.all(np.isfinite(w)) and np.all(w > 0) and w.sum() == pytest.approx(1.0)


def test_fedbuff_and_fedavg_weights():
    m = _model()
    full = ft.Subset.full(m)
    ups = _make_updates(m, full, _random_deltas(m, full, 3), bits=32, base_versions=[3, 1, 0], samples=[5, 10, 35])
    np.testing.assert_allclose(FedBuff(3).weights(ups, 3), 1 / np.sqrt(1 + np.array([0, 2, 3])) / 3)
    np.testing.assert_allclose(FedAvg(3).weights(ups, 3), [0.1, 0.2, 0.7])
    with pytest.raises(ValueError, match="ahead"):
        FedBuff(3).weights(ups, 2)


@pytest.mark.parametrize("name,bits", [("ftte", 8), ("ftte", 4), ("ftte-noage", 8), ("fedbuff", 32), ("fedavg", 32)])
def test_merge_matches_numpy(name, bits):
    m = _model()
    kw = {"bits": bits} if name.startswith("ftte") else {}
    s = make_strategy(name, buffer_size=3, server_lr=0.7, **kw)
    sub = s.training_subset(m, _sparse(m))
    ups = _make_updates(m, sub, _random_deltas(m, sub, 3, seed=5), bits=bits, base_versions=[2, 1, 0],
                        samples=[10, 20, 30], stochastic=True)
    before = {k: v.copy() for k, v in m.state().items()}
    w = s.weights(ups, 2)
    # FTTE scales the whole step by the buffer's sample-weighted mean age factor
    g = 1.0
    if name == "ftte":
        g = float(np.dot([10, 20, 30], (1.0 + np.array([0, 1, 2])) ** -1.0) / 60)
        assert s.step_scale(ups, 2) == pytest.approx(g)
    expect = {k: v.astype(np.float64).copy() for k, v in before.items()}
    decs = [decode_update(u) for u in ups]
    for key, layer, view, rows in sub.tensors(m):
        e = expect[key].reshape(view.shape[0], -1)
        r = rows if rows is not None else np.arange(view.shape[0])
        e[r] += 0.7 * g * sum(wk * d[key] for wk, d in zip(w, decs))
    report = s.merge(m, sub, ups, 2)
    for k, v in m.state().items():
        np.testing.assert_allclose(v, expect[k].reshape(v.shape), rtol=1e-5, atol=1e-6)
    changed = {k for k in before if not np.array_equal(before[k], m.state()[k])}
    assert changed <= {key for key, *_ in sub.tensors(m)}
    if name.startswith("ftte"):  # rows outside the subset are untouched
        np.testing.assert_array_equal(m.layer("fc1").weight[[1, 3, 4]], before["fc1.weight"][[1, 3, 4]])
        assert set(report.factors) == {"data", "age", "variance"} | ({"budget"} if s.base_step_budget else set())
    assert report.num_updates == 3 and report.staleness == [0, 1, 2] and report.mean_staleness == 1.0
    np.testing.assert_allclose(report.weights, w)
    np.testing.assert_allclose(report.alphas, 0.7 * g * w, rtol=1e-6)
    assert report.num_samples == 60 and report.device_ids == ["d0", "d1", "d2"] and not report.partial
    diff = np.concatenate([(m.state()[k].astype(np.float64) - before[k]).ravel() for k in before])
    assert report.update_norm == pytest.approx(np.linalg.norm(diff), rel=1e-6)


def test_ftte_merge_uses_one_kernel_call_per_tensor(monkeypatch):
    m = _model()
    sub = _sparse(m)
    ups = _make_updates(m, sub, _random_deltas(m, sub, 4))
    calls = []
    real = K.merge_int8
    monkeypatch.setattr(K, "merge_int8", lambda *a: (calls.append(len(a[2])), real(*a))[1])
    FTTE(4).merge(m, sub, ups, 0)
    assert calls == [4] * len(sub.tensors(m))


def test_merge_is_thread_count_independent():
    results = []
    for threads in (1, 2):
        K.set_num_threads(threads)
        m = _model()
        sub = _sparse(m)
        FTTE(4).merge(m, sub, _make_updates(m, sub, _random_deltas(m, sub, 4, seed=9), stochastic=True), 0)
        results.append(m.state())
    for k in results[0]:
        np.testing.assert_array_equal(results[0][k], results[1][k])


def test_merge_of_nothing_is_an_error():
    m = _model()
    with pytest.raises(ValueError, match="nothing to merge"):
        FTTE(2).merge(m, _sparse(m), [], 0)
