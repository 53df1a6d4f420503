"""Robust aggregation (issue 9, findings 1, 2 and 9): one faulty device must not wreck or stall a run.

A faulty device holds the fleet key, so its updates are well-formed; here it crafts them by
mutating the honest Update it computed (row scales, num_samples, data).
"""
import copy
import functools
import json
import math

import numpy as np
import pytest

import ftte_core as ft
from ftte_core import _kernels as K
from ftte_core import data as ftdata
from ftte_core.local import LocalWorker
from ftte_core.robust import RobustPolicy, RunningMedian, clip_factors
from ftte_core.scheduler import RoundDriver, TaskConfig
from ftte_core.strategies import FTTE, MergeRefused, make_strategy
from ftte_core.update import decode_update, encode_update, load_values, measure_update


# -- small helpers ------------------------------------------------------------------------------------
def _model(seed=0):
    return ft.zoo("mlp", (8,), 3, hidden=(6,), seed=seed)


def _sparse(model):
    return ft.Subset.of(model, {"fc1": {"rows": [0, 2, 5], "bias": True}, "fc2": {"rows": "all", "bias": True}})


def _driver(name="ftte", k=3, **kw):
    m = _model()
    return RoundDriver(m, _sparse(m), make_strategy(name, buffer_size=k), TaskConfig(), seed=1, **kw)


def _work(driver, task, seed=0, scale=0.01, samples=10):
    rng = np.random.default_rng(seed)
    local = driver.model.copy()
    load_values(local, task.subset, task.values)
    for key, _l, view, rows in task.subset.tensors(local):
        r = rows if rows is not None else np.arange(view.shape[0])
        view[r] += (scale * rng.standard_normal((r.size, view.shape[1]))).astype(np.float32)
    return encode_update(local, task.subset, dict(task.values), task.base_version, samples, 0.5, bits=task.bits,
                         seed=task.seed, device_id=task.device_id, task_id=task.id)


def _state(model):
    return {k: v.copy() for k, v in model.state().items()}


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def _deliver(d, dev, seed=0, mutate=None, samples=10):
    t = d.device_idle(dev)
    u = _work(d, t, seed=seed, samples=samples)
    if mutate is not None:
        mutate(u)
    return d.update_arrived(dev, u)


def _set_scales(value):
    def mutate(u):
        for t in u.tensors:
            if t.scales is None:
                t.data[0, 0] = value
            else:
                t.scales[:] = value
    return mutate


# -- finding 1: float32 overflow in the FTTE variance factor ------------------------------------------
def test_variance_factor_is_computed_in_float64_and_catches_a_huge_update():
    m = _model()
    sub = _sparse(m)
    d = RoundDriver(m, sub, FTTE(4), TaskConfig(), seed=1)
    ups = []
    for i in range(4):
        ups.append(_work(d, d.device_idle(f"d{i}"), seed=i))
    for t in ups[3].tensors:
        t.scales[:] = 1e20  # decoded ~1e22: its square overflows float32, not float64
    s = FTTE(4, age=False)
    var = s.variance_factors(ups)
    assert np.all(np.isfinite(var))
    # the outlier is recognised as one: with K = 4 and one outlier, d = (3, 1/3, 1/3, 1/3)
    np.testing.assert_allclose(var, [0.75, 0.75, 0.75, 0.25], rtol=1e-3)
    w, factors = s.weighting(ups, 0)
    assert np.all(np.isfinite(w)) and w[3] < w[:3].min() and factors["variance"] == pytest.approx(var.tolist())


def test_weighting_is_a_pure_function():
    m = _model()
    d = RoundDriver(m, _sparse(m), FTTE(3), TaskConfig(), seed=1)
    ups = [_work(d, d.device_idle(f"d{i}"), seed=i, samples=10 * (i + 1)) for i in range(3)]
    s = FTTE(3)
    w1, f1 = s.weighting(ups, 0)
    w2, f2 = s.weighting(ups, 0, samples=[10, 10, 10])
    w3, f3 = s.weighting(ups, 0)
    np.testing.assert_array_equal(w1, w3)
    assert f1 == f3 and f2["data"] == [10.0, 10.0, 10.0] and not np.allclose(w1, w2)
    assert not hasattr(s, "_cached")
    report = s.merge(m, d.subset, ups, 0)
    assert report.factors["data"] == f1["data"] and report.weights == pytest.approx(w1.tolist())


# -- finding 1: what a faulty update may claim ----------------------------------------------------------
@pytest.mark.parametrize("name", ["ftte", "fedbuff"])
@pytest.mark.parametrize("scale", [3.4e38, 1e30])
def test_an_update_that_overflows_when_decoded_is_rejected(name, scale):
    d = _driver(name, 2)
    before = _state(d.model)
    a = _deliver(d, "bad", mutate=_set_scales(scale))
    assert not a.accepted and a.reason == "overflow" and "\n" not in a.message
    assert _same(before, _state(d.model)) and d.buffered == 0
    assert d.stats()["rejected_by_reason"] == {"overflow": 1}
    for i, dev in enumerate(("x", "y")):
        a = _deliver(d, dev, seed=i)
    assert a.merge is not None and d.version == 1


def test_num_samples_is_capped_by_the_declared_count_and_the_fleet_cap():
    d = _driver("ftte", 3)
    for dev in ("a", "b", "bad"):
        d.device_joined(dev, {"samples": 100})
    a1 = _deliver(d, "a", seed=1, samples=100)
    _deliver(d, "b", seed=2, samples=100)
    a3 = _deliver(d, "bad", seed=3, samples=(1 << 62) - 1)  # the largest count the wire format allows
    assert a1.samples == 100 and a3.accepted and a3.samples == 100
    assert a3.merge is not None and a3.merge.num_samples == 300
    assert max(a3.merge.weights) < 0.5  # the inflated count does not dominate (it would be ~1.0)
    assert d.stats()["samples_capped"] == 1

    # no declaration: the fleet-wide cap, then a multiple of the running median of accepted counts
    d = _driver("ftte", 1)
    assert _deliver(d, "u", samples=1 << 40).samples == RobustPolicy().max_samples
    d = _driver("ftte", 1)
    for i in range(3):
        _deliver(d, f"h{i}", seed=i, samples=50)
    assert _deliver(d, "u", samples=1 << 40).samples == 500


def test_fedavg_weights_use_the_capped_counts():
    d = _driver("fedavg", 3)
    for dev in ("a", "b", "c"):
        d.device_joined(dev, {"num_samples": 60})
    tasks = {dev: d.device_idle(dev) for dev in ("a", "b", "c")}
    d.update_arrived("a", _work(d, tasks["a"], seed=1, samples=60))
    d.update_arrived("b", _work(d, tasks["b"], seed=2, samples=60))
    a = d.update_arrived("c", _work(d, tasks["c"], seed=3, samples=10 ** 15))
    np.testing.assert_allclose(a.merge.weights, [1 / 3] * 3)


def test_norms_are_clipped_to_a_multiple_of_the_running_median():
    d = _driver("fedbuff", 4)
    arrivals = [_deliver(d, f"h{i}", seed=i) for i in range(3)]
    a = _deliver(d, "big", seed=9, mutate=lambda u: [t.data.__imul__(1000.0) for t in u.tensors])
    assert all(x.accepted for x in arrivals) and a.merge is not None
    r = a.merge
    assert r.clip[:3] == [1.0, 1.0, 1.0] and 0 < r.clip[3] < 0.01
    median = sorted(r.norms)[1]  # the lower median of the four
    assert r.norms[3] * r.clip[3] == pytest.approx(RobustPolicy().clip_multiple * median, rel=1e-6)
    assert d.stats()["clipped"] == 1
    # the clipped update moved the model by at most its clipped norm times its weight
    assert r.update_norm < 2.0 * median


def test_identical_bad_updates_do_not_look_normal():
    """Two devices sending the same huge update: the variance factor sees a pair that agrees;
    the clip against the running median of accepted norms still bounds both."""
    d = _driver("ftte", 5)
    for i in range(5):
        _deliver(d, f"warm{i}", seed=i)  # a history of honest norms
    assert d.version == 1
    crafted = {}

    def same_huge(u):
        if "tensors" not in crafted:
            for t in u.tensors:
                t.scales[:] = t.scales * 1000.0
            crafted["tensors"] = copy.deepcopy(u.tensors)
        else:
            u.tensors = copy.deepcopy(crafted["tensors"])

    for i in range(3):
        _deliver(d, f"h{i}", seed=10 + i)
    _deliver(d, "bad1", seed=20, mutate=same_huge)
    a = _deliver(d, "bad2", seed=21, mutate=same_huge)
    r = a.merge
    assert r is not None and r.clip[3] < 0.01 and r.clip[4] < 0.01 and r.clip[:3] == [1.0] * 3
    assert r.update_norm < 3.0 * sorted(r.norms)[2]


def test_clip_factors_and_running_median():
    rm = RunningMedian(3)
    assert rm.reference() is None
    for v in (5.0, 1.0, 1e30, 2.0):
        rm.add(v)
    assert len(rm) == 3 and rm.reference() == 2.0  # the window is the last three: 1, 1e30, 2
    np.testing.assert_allclose(clip_factors([1.0, 6.0, 60.0, 0.0], 2.0, 3.0), [1.0, 1.0, 0.1, 1.0])
    np.testing.assert_array_equal(clip_factors([1e30], None, 3.0), [1.0])
    np.testing.assert_array_equal(clip_factors([1e30], 1.0, 0), [1.0])  # clipping off
    with pytest.raises(ValueError, match="clip_multiple"):
        RobustPolicy(clip_multiple=0.5)
    with pytest.raises(ValueError, match="max_samples"):
        RobustPolicy(max_samples=0)


# -- finding 2: a merge that fails never stalls the driver, never half-merges ---------------------------
def test_merge_refused_as_non_finite_keeps_the_version_and_later_merges_happen():
    # with the arrival bound and the clip switched off, a row scale of 3.4e38 reaches the merge
    d = _driver("ftte", 3, robust=RobustPolicy(max_abs_delta=1e300, clip_multiple=0))
    before = _state(d.model)
    _deliver(d, "a", seed=1)
    _deliver(d, "b", seed=2)
    a = _deliver(d, "bad", seed=3, mutate=_set_scales(3.4e38))
    assert a.accepted and a.merge is None and d.version == 0 and _same(before, _state(d.model))
    assert [(x.device_id, x.reason) for x in a.dropped] == [("bad", "merge_nonfinite")]
    assert [x.device_id for x in d.take_dropped()] == ["bad"] and d.take_dropped() == []
    st = d.stats()
    assert st["merge_failures"] == 1 and st["dropped_by_reason"] == {"merge_nonfinite": 1} and st["buffered"] == 2
    a = _deliver(d, "c", seed=4)  # the two honest updates still wait; the third completes the buffer
    assert a.merge is not None and d.version == 1 and a.merge.device_ids == ["a", "b", "c"]
    assert all(np.all(np.isfinite(v)) for v in d.model.state().values())
    for i in range(6):
        _deliver(d, f"late{i}", seed=30 + i)
    assert d.version == 3


class _Exploding(FTTE):
    """Writes one tensor, then raises: what a buggy strategy could do."""

    def merge(self, model, subset, updates, current_version, samples=None, clip=None, base_steps=None):
        key, layer, view, rows = subset.tensors(model)[0]
        view[rows if rows is not None else slice(None)] += 1.0
        raise RuntimeError("boom\nsecond line")


def test_a_merge_that_raises_drops_the_buffer_restores_the_model_and_the_driver_goes_on():
    m = _model()
    strategy = _Exploding(2)
    d = RoundDriver(m, _sparse(m), strategy, TaskConfig(), seed=1)
    before = _state(m)
    _deliver(d, "a", seed=1)
    a = _deliver(d, "b", seed=2)
    assert a.accepted and a.merge is None and d.version == 0 and d.buffered == 0
    assert _same(before, _state(m))  # the half-written tensor was undone
    assert {x.reason for x in a.dropped} == {"merge_failed"} and len(a.dropped) == 2
    assert "boom" in a.dropped[0].message and "\n" not in a.dropped[0].message
    assert d.stats()["dropped_by_reason"] == {"merge_failed": 2}
    strategy.__class__ = FTTE  # the bug is fixed: later arrivals merge
    _deliver(d, "c", seed=3)
    assert _deliver(d, "e", seed=4).merge is not None and d.version == 1


def test_strategy_merge_is_all_or_nothing(monkeypatch):
    m = _model()
    sub = _sparse(m)
    d = RoundDriver(m, sub, FTTE(3), TaskConfig(), seed=1)
    ups = [_work(d, d.device_idle(f"d{i}"), seed=i) for i in range(3)]
    before = _state(m)
    real, calls = K.merge_int8, []

    def fails_on_the_third_tensor(*a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("kernel failure")
        return real(*a)

    monkeypatch.setattr(K, "merge_int8", fails_on_the_third_tensor)
    with pytest.raises(RuntimeError):
        FTTE(3).merge(m, sub, ups, 0)
    assert _same(before, _state(m))
    monkeypatch.setattr(K, "merge_int8", real)
    for t in ups[1].tensors:
        t.scales[:] = 3.4e38
    with pytest.raises(MergeRefused) as e:
        FTTE(3).merge(m, sub, ups, 0)
    assert e.value.culprits == [1] and _same(before, _state(m))


def test_merge_happens_at_k_or_more_buffered():
    d = _driver("ftte", 3)
    _deliver(d, "a", seed=1)
    _deliver(d, "b", seed=2)
    state = d.state_dict()
    m2 = d.model.copy()
    d2 = RoundDriver(m2, _sparse(m2), make_strategy("ftte", buffer_size=2), TaskConfig(), seed=1)
    changes = d2.load_state_dict(state)
    assert ("strategy.buffer_size", 3, 2) in changes and d2.policy_changes == changes
    assert d2.buffered == 2 and d2.version == 0
    a = _deliver(d2, "c", seed=3)  # 3 buffered >= K = 2
    assert a.merge is not None and a.merge.num_updates == 3 and d2.version == 1


# -- policy in the checkpoint ---------------------------------------------------------------------------
def test_policy_is_in_the_checkpoint_and_differences_are_reported():
    d = _driver("ftte", 3, max_versions=10, max_staleness=4, robust=RobustPolicy(clip_multiple=4.0))
    pol = d.policy()
    assert json.loads(json.dumps(pol)) == pol
    assert pol["strategy"]["name"] == "ftte" and pol["strategy"]["buffer_size"] == 3
    assert pol["strategy"]["age_exponent"] == 1.0 and pol["max_versions"] == 10 and pol["max_staleness"] == 4
    assert pol["robust"]["clip_multiple"] == 4.0 and pol["task_config"]["lr"] == TaskConfig().lr
    state = d.state_dict()
    assert state["meta"]["policy"] == pol
    m2 = d.model.copy()
    same = RoundDriver(m2, _sparse(m2), make_strategy("ftte", buffer_size=3), TaskConfig(), seed=1, max_versions=10,
                       max_staleness=4, robust=RobustPolicy(clip_multiple=4.0))
    assert same.policy_differences(pol) == [] and same.load_state_dict(state) == []
    other = RoundDriver(m2, _sparse(m2), make_strategy("ftte", buffer_size=3), TaskConfig(lr=0.2), seed=1,
                        max_versions=20, max_staleness=4)
    diffs = other.policy_differences(pol)
    assert diffs == [("max_versions", 10, 20), ("robust.clip_multiple", 4.0, 2.0), ("task_config.lr", 0.05, 0.2)]
    with pytest.raises(ValueError, match="policy differs.*max_versions 10 -> 20") as e:
        other.load_state_dict(state, on_policy_change="error")
    assert "\n" not in str(e.value) and other.version == 0
    assert other.load_state_dict(state) == diffs  # applied: the caller logs them


def test_checkpoint_keeps_the_robust_state_so_a_resume_replays_exactly():
    d = _driver("ftte", 3)
    d.device_joined("bad", {"samples": 40})
    for i in range(4):
        _deliver(d, f"h{i}", seed=i)
    _deliver(d, "bad", seed=9, samples=10 ** 9)
    state = json.loads(json.dumps(d.state_dict()["meta"]))
    m2 = d.model.copy()
    d2 = RoundDriver(m2, _sparse(m2), make_strategy("ftte", buffer_size=3), TaskConfig(), seed=1)
    d2.load_state_dict({"meta": state, "buffer": d.state_dict()["buffer"]})
    assert d2._norms.to_list() == d._norms.to_list() and d2.devices["bad"].declared == 40
    for drv in (d, d2):
        _deliver(drv, "z", seed=11)
    assert _same(_state(d.model), _state(m2)) and d2.version == d.version == 2


# -- finding 9: bounded state ---------------------------------------------------------------------------
def _cheap_run(n_updates, checkpoints, ghost_device=False, **kw):
    """Many cheap tasks: one template update per device, re-labelled for each task. With
    ``ghost_device`` a seventh device takes a task now and then and never delivers."""
    m = ft.zoo("mlp", (4,), 2, hidden=(3,), seed=0)
    d = RoundDriver(m, ft.Subset.full(m), make_strategy("ftte", buffer_size=4), TaskConfig(), seed=1, **kw)
    devices = [f"dev{i}" for i in range(6)]
    templates = {}
    for i, dev in enumerate(devices):
        d.device_joined(dev, {"samples": 20})
        t = d.device_idle(dev)
        templates[dev] = _work(d, t, seed=i, samples=20)
        d.update_arrived(dev, templates[dev])
    sizes, ghost = {}, []
    while d.merged_updates < n_updates:
        for dev in devices:
            t = d.device_idle(dev)
            u = copy.copy(templates[dev])
            u.task_id, u.base_version = t.id, t.base_version
            assert d.update_arrived(dev, u).accepted
            if ghost_device and dev == devices[0]:
                ghost.append(d.device_idle("ghost"))  # takes a task and is never heard from again
        for c in checkpoints:
            if c not in sizes and d.merged_updates >= c:
                sizes[c] = len(json.dumps(d.state_dict()["meta"]))
    return d, sizes, ghost, templates[devices[0]]


@pytest.mark.slow
def test_checkpoint_size_is_bounded_after_20000_merged_updates():
    d, sizes, _, _ = _cheap_run(20_000, (1_000, 20_000))
    assert d.merged_updates >= 20_000
    assert sizes[20_000] <= 2 * sizes[1_000], sizes
    assert len(d.history) <= 1000


@pytest.fixture
def small_memory(monkeypatch):
    """Scaled down 20x (spent ids remembered by name, reports kept) so the fast variant stays fast."""
    from ftte_core import scheduler
    monkeypatch.setattr(scheduler, "RECENT_TASKS", 50)


def test_checkpoint_size_is_bounded_fast_variant(small_memory):
    d, sizes, _, _ = _cheap_run(2_000, (100, 2_000))
    assert sizes[2_000] <= 2 * sizes[100], sizes


def test_outstanding_tasks_of_a_vanished_device_expire(small_memory):
    d, sizes, ghost, template = _cheap_run(2_000, (400, 2_000), ghost_device=True,
                                               task_expiry_versions=50, max_outstanding=100)
    assert d.stats()["outstanding_tasks"] <= 100
    assert sizes[2_000] <= 2 * sizes[400], sizes
    # its first task expired long ago: a late delivery is rejected with a reason, never merged
    for t in (ghost[0], ghost[-60]):
        u = copy.copy(template)
        u.task_id, u.base_version, u.device_id = t.id, t.base_version, "ghost"
        a = d.update_arrived("ghost", u)
        assert not a.accepted and a.reason == "late", a
    u = copy.copy(template)
    u.task_id, u.base_version, u.device_id = ghost[-1].id, ghost[-1].base_version, "ghost"
    assert d.update_arrived("ghost", u).accepted  # a recent one is still deliverable


# -- goal: one faulty device among honest ones ------------------------------------------------------------
N_DEVICES = 10


@functools.lru_cache(maxsize=None)
def _digits():
    ds = ft.load_bundled("digits")
    train, val = ftdata.train_val_split(ds, 0.2, seed=0)
    return ftdata.partition_iid(train, N_DEVICES, seed=0), val


def _faulty(mode, u, k, shared):
    """The faulty device's k-th update, crafted from its honest one."""
    if mode == "mixed":  # a bit of everything, one behaviour per update
        mode = ("huge", "inflated", "overflow", "scale_1e30", "noise", "identical")[k % 6]
    u = copy.deepcopy(u)
    if mode in ("huge", "identical") or (mode == "huge_once" and k == 0):
        for t in u.tensors:
            if t.scales is None:
                t.data *= 1e5
            else:
                t.scales[:] = 1e3
        if mode == "identical":  # the same bytes as the other faulty device's
            tensors = shared.setdefault("tensors", u.tensors)
            u.tensors = copy.deepcopy(tensors)
    elif mode == "inflated":
        u.num_samples = (1 << 62) - 1
    elif mode in ("overflow", "scale_1e30"):
        _set_scales(3.4e38 if mode == "overflow" else 1e30)(u)
    elif mode == "noise":
        rng = np.random.default_rng(k)
        for t in u.tensors:
            if t.scales is None:
                t.data[...] = 100 * rng.standard_normal(t.data.shape)
            else:
                t.data[...] = rng.integers(-127, 128, t.data.shape, dtype=np.int8)
                t.scales[:] = 1.0
    return u


@functools.lru_cache(maxsize=None)
def _fleet_run(name, mode, versions, robust=None):
    """A fleet of N_DEVICES on digits; with ``mode`` != "honest", d9 (and d8 for identical
    updates) is faulty. Returns (final validation accuracy, version, stats)."""
    parts, val = _digits()
    model = ft.zoo("mlp", (1, 8, 8), 10, seed=0)
    k = N_DEVICES if name == "fedavg" else 5
    d = RoundDriver(model, ft.Subset.full(model), make_strategy(name, buffer_size=k),
                    TaskConfig(lr=0.1, batch_size=32), max_versions=versions, seed=0, robust=robust)
    sub = d.subset
    devs = {f"d{i}": (LocalWorker(model.copy(), sub), parts[i]) for i in range(N_DEVICES)}
    faulty = {"d9"} | ({"d8"} if mode in ("identical", "mixed") else set())
    for dev, (_, p) in devs.items():
        d.device_joined(dev, {"samples": len(p)})
    queue = [t for t in (d.device_idle(dev) for dev in devs) if t is not None]
    shared, count = {}, {}
    while queue and not d.done:
        t = queue.pop(0)
        worker, p = devs[t.device_id]
        u = worker.run(dict(t.values), t.base_version, p.x, p.y, t.config, bits=t.bits, seed=t.seed,
                       device_id=t.device_id).update
        u.task_id = t.id
        if mode != "honest" and t.device_id in faulty:
            n = count[t.device_id] = count.get(t.device_id, -1) + 1
            u = _faulty("identical" if t.device_id == "d8" else mode, u, n, shared)
            u.task_id, u.device_id, u.base_version = t.id, t.device_id, t.base_version
        d.update_arrived(t.device_id, u)
        busy = {q.device_id for q in queue}
        for dev in (devs if d.strategy.synchronous else [t.device_id]):
            if dev not in busy:
                nt = d.device_idle(dev)
                if nt is not None:
                    queue.append(nt)
    _loss, acc = model.evaluate(val.x, val.y)
    assert all(np.all(np.isfinite(v)) for v in model.state().values())
    return acc, d.version, d.stats()


GOAL_VERSIONS = 40


def _check_goal(name, mode, versions):
    honest, v_h, _ = _fleet_run(name, "honest", versions)
    acc, v, st = _fleet_run(name, mode, versions)
    assert v_h == v == versions, f"{name}/{mode}: stopped at version {v} of {versions} ({st})"
    assert honest > 0.8, honest
    assert acc >= honest - 0.02, f"{name}/{mode}: accuracy {acc:.3f} against {honest:.3f} honest-only ({st})"
    return st


def test_goal_one_faulty_device_ftte():
    """Fast variant: FTTE, one device cycling through every fault, a second sending identical bad updates."""
    st = _check_goal("ftte", "mixed", GOAL_VERSIONS)
    assert st["rejected_by_reason"].get("overflow", 0) > 0 and st["clipped"] > 0 and st["samples_capped"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["huge_once", "huge", "inflated", "overflow", "scale_1e30", "noise", "identical",
                                  "mixed"])
@pytest.mark.parametrize("name", ["ftte", "fedbuff", "fedavg"])
def test_goal_one_faulty_device_every_strategy(name, mode):
    _check_goal(name, mode, GOAL_VERSIONS)


def test_update_measure_is_exact():
    m = _model()
    d = RoundDriver(m, _sparse(m), FTTE(2, bits=4), TaskConfig(), seed=1)
    u = _work(d, d.device_idle("a"), seed=3)
    dec = decode_update(u)
    norm, peak = measure_update(u)
    flat = np.concatenate([v.ravel().astype(np.float64) for v in dec.values()])
    assert norm == pytest.approx(np.linalg.norm(flat), rel=1e-6) and peak == pytest.approx(np.abs(flat).max(), rel=1e-6)
    for t in u.tensors:
        t.scales[:] = 3.4e38
    norm, peak = measure_update(u)
    assert math.isfinite(norm) and peak > 1e39


def test_fedavg_does_not_wait_for_a_member_whose_update_was_rejected():
    d = _driver("fedavg", 3)
    tasks = {dev: d.device_idle(dev) for dev in ("a", "b", "bad")}
    d.update_arrived("a", _work(d, tasks["a"], seed=1))
    d.update_arrived("b", _work(d, tasks["b"], seed=2))
    u = _work(d, tasks["bad"], seed=3)
    _set_scales(3.4e38)(u)
    a = d.update_arrived("bad", u)
    assert not a.accepted and a.reason == "overflow"
    assert a.merge is not None and a.merge.partial and a.merge.device_ids == ["a", "b"] and d.version == 1
    assert d.device_idle("bad").base_version == 1  # a new round, not the old task again


# -- the run's end is not a verdict on an update ---------------------------------------------------------
def test_updates_after_the_end_are_not_counted_as_rejections():
    d = _driver("ftte", k=3)
    t = d.device_idle("a")
    u = _work(d, t)
    d.shutdown()
    arrival = d.update_arrived("a", u)
    assert not arrival.accepted and arrival.reason == "shutdown"
    stats = d.stats()
    assert stats["rejected"] == 0 and stats["after_end"] == 1
    resumed = _driver("ftte", k=3)
    resumed.load_state_dict(d.state_dict())
    assert resumed.after_end == 1


# -- the hub's journal: a join carries the declared sample count, so a replay caps the same way ---------
def test_hub_journal_replays_a_join_with_its_declared_sample_cap(tmp_path):
    from ftte_hub.coordinator import Coordinator

    def run(replay_from=None):
        d = _driver("ftte", k=3)
        c = Coordinator(d, tmp_path)
        if replay_from is not None:
            c.replay(replay_from)
            return d, c
        c.open_journal()
        c.joined("liar", {"samples": 20})
        c.joined("honest", {"samples": 10})
        for dev, seed, n in (("liar", 1, 1 << 40), ("honest", 2, 10)):
            t = c.task_for(dev)
            raw = _work(d, t, seed=seed, samples=n)
            arrival, _j, _s = c.update_from(dev, raw, raw.to_bytes(), 100)
            assert arrival.accepted
        c.journal.close_now()
        return d, c

    live, live_c = run()
    assert live_c.agents["liar"]["samples"] <= 20  # the inflated count never reaches the per-agent stats
    replayed, rep_c = run(replay_from=0)
    assert [e.samples for e in replayed._buffer] == [e.samples for e in live._buffer]
    assert rep_c.agents["liar"]["samples"] == live_c.agents["liar"]["samples"]


def test_an_old_run_scoped_task_id_is_late_not_unknown(small_memory):
    d = _driver("ftte", k=1)
    d.task_prefix = "abcd1234-"  # what the hub sets: task ids unique across runs
    first = d.device_idle("a")
    assert first.id == "abcd1234-t1"
    u = _work(d, first)
    assert d.update_arrived("a", u).accepted
    for i in range(80):  # past the 50 spent ids remembered by name
        t = d.device_idle("a")
        assert d.update_arrived("a", _work(d, t, seed=i + 1)).accepted
    again = d.update_arrived("a", u)
    assert not again.accepted and again.reason == "late", again
    stranger = copy.copy(u)
    stranger.task_id = "ffff0000-t1"  # another run's numbering: never ours
    assert d.update_arrived("a", stranger).reason == "unknown_task"
