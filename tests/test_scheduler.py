"""The round driver's invariants, for the semi-async strategies and for synchronous FedAvg."""
import numpy as np
import pytest

import ftte_core as ft
from ftte_core import _kernels as K
from ftte_core.scheduler import RoundDriver, Task, TaskConfig, run_task
from ftte_core.strategies import make_strategy
from ftte_core.update import TensorDelta, encode_update, load_values


def _model(seed=0):
    return ft.zoo("mlp", (8,), 3, hidden=(6,), seed=seed)


def _sparse(model):
    return ft.Subset.of(model, {"fc1": {"rows": [0, 2, 5], "bias": True}, "fc2": {"rows": "all", "bias": True}})


def _driver(name="ftte", k=3, **kw):
    m = _model()
    return RoundDriver(m, _sparse(m), make_strategy(name, buffer_size=k), TaskConfig(), seed=1, **kw)


def _work(driver, task, seed=0, scale=0.01, samples=10):
    """Stand-in for local training (the engine's own test is test_end_to_end_real_training)."""
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


def test_task_contents_and_shared_values():
    d = _driver()
    t1, t2 = d.device_idle("a"), d.device_idle("b")
    assert isinstance(t1, Task) and t1.base_version == 0 and t1.device_id == "a" and t1.id != t2.id
    assert t1.values is t2.values  # one copy per version, shared by its tasks
    assert all(not v.flags.writeable for v in t1.values.values())
    assert t1.bits == 8 and t1.subset_fingerprint == _sparse(d.model).fingerprint() and d.seed == 1 and isinstance(t1.config, TaskConfig)
    assert t1.seed != t2.seed
    assert t1.payload_bytes == sum(v.nbytes for v in t1.values.values())
    assert list(t1.values) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    np.testing.assert_array_equal(t1.values["fc1.weight"], d.model.layer("fc1").weight[[0, 2, 5]])
    fb = _driver("fedbuff")
    t = fb.device_idle("a")
    assert t.bits == 32 and t.subset == ft.Subset.full(fb.model)  # baselines train everything


@pytest.mark.parametrize("name", ["ftte", "ftte-noage", "ftte-novar", "fedbuff"])
def test_semi_async_merges_exactly_at_k_and_versions_increase(name):
    k = 3
    d = _driver(name, k)
    devices = [f"d{i}" for i in range(5)]
    for dev in devices:
        d.device_joined(dev)
    tasks = [d.device_idle(dev) for dev in devices]
    versions, arrivals = [d.version], 0
    rng = np.random.default_rng(0)
    for step in range(40):
        t = tasks.pop(int(rng.integers(0, len(tasks))))  # arrivals in random order: staleness varies
        before_buffer, before_version = d.buffered, d.version
        a = d.update_arrived(t.device_id, _work(d, t, seed=step))
        arrivals += 1
        assert a.accepted and a.staleness == before_version - t.base_version
        if before_buffer == k - 1:
            assert a.merge is not None and d.buffered == 0 and d.version == before_version + 1
            assert a.merge.version == d.version and a.merge.num_updates == k and not a.merge.partial
        else:
            assert a.merge is None and d.buffered == before_buffer + 1 and d.version == before_version
        versions.append(d.version)
        nt = d.device_idle(t.device_id)  # an idle device always gets work at the current version
        assert nt is not None and nt.base_version == d.version
        tasks.append(nt)
    assert all(b >= a for a, b in zip(versions, versions[1:]))
    assert d.merges == arrivals // k and d.version == arrivals // k
    st = d.stats()
    assert st["accepted"] == arrivals and st["rejected"] == 0 and st["merges"] == d.merges
    merged_tau = [s for r in d.history for s in r.staleness]
    assert st["mean_staleness"] == pytest.approx(np.mean(merged_tau)) and max(merged_tau) > 0


def test_staleness_comes_from_each_updates_base_version():
    d = _driver("ftte", 2)
    old = d.device_idle("slow")  # version 0
    for i in range(2):  # two merges while "slow" trains
        for dev in ("f1", "f2"):
            t = d.device_idle(dev)
            d.update_arrived(dev, _work(d, t, seed=i))
    assert d.version == 2
    mid = d.device_idle("mid")
    a = d.update_arrived("slow", _work(d, old))
    assert a.accepted and a.staleness == 2
    a = d.update_arrived("mid", _work(d, mid))
    assert a.merge is not None and a.merge.staleness == [2, 0]
    assert a.merge.factors["age"] == pytest.approx([3 ** -1.0, 1.0])


def _rejects(d, dev, update, reason):
    before = _state(d.model)
    v, buf = d.version, d.buffered
    a = d.update_arrived(dev, update)
    assert not a.accepted and a.reason == reason and a.merge is None, (a.reason, a.message)
    assert a.message and "\n" not in a.message
    assert _same(before, _state(d.model)) and d.version == v and d.buffered == buf
    return a


def test_bad_updates_rejected_and_never_merged():
    d = _driver("ftte", 2)
    # wrong subset: trained on another subset of the same model
    t = d.device_idle("a")
    other = ft.Subset.of(d.model, {"fc2": {"rows": "all", "bias": True}})
    from ftte_core.update import subset_values
    base = subset_values(d.model, other)
    u = encode_update(d.model, other, base, 0, 5, 0.1, task_id=t.id, device_id="a")
    _rejects(d, "a", u, "subset")
    # every delivery consumes the task: the real one now counts as a duplicate
    _rejects(d, "a", _work(d, t), "duplicate")

    t = d.device_idle("a")
    u = _work(d, t)
    u.tensors[0] = TensorDelta("fc1.weight", 8, np.zeros((2, 8), np.int8), np.ones(2, np.float32), (2, 8))
    _rejects(d, "a", u, "shape")

    t = d.device_idle("a")
    u = _work(d, t)
    u.tensors[2].scales[0] = np.nan
    _rejects(d, "a", u, "non_finite")

    t = d.device_idle("a")
    u = _work(d, t)
    u.tensors[1].scales[0] = np.inf
    _rejects(d, "a", u, "non_finite")

    t = d.device_idle("a")
    u = _work(d, t)
    u.tensors.pop()
    _rejects(d, "a", u, "keys")

    t = d.device_idle("a")
    u = _work(d, t)
    u.base_version = 5
    _rejects(d, "a", u, "version")  # not the task's version

    t = d.device_idle("a")
    _rejects(d, "b", _work(d, t), "wrong_device")
    u = _work(d, t)
    u.task_id = "t999"
    _rejects(d, "a", u, "unknown_task")
    u = _work(d, t)
    u.num_samples = 0
    _rejects(d, "a", u, "samples")

    t = d.device_idle("a")
    u = _work(d, t)
    u.tensors = [TensorDelta(x.key, 32, np.zeros(x.shape, np.float32), None, x.shape) for x in u.tensors]
    _rejects(d, "a", u, "bits")  # FTTE takes int8 only

    _rejects(d, "a", b"not an update", "malformed")
    st = d.stats()
    assert st["accepted"] == 0 and st["merges"] == 0 and st["rejected"] == sum(st["rejected_by_reason"].values())
    assert st["rejected_by_reason"]["non_finite"] == 2

    # after all that, good updates still merge normally
    for dev in ("x", "y"):
        t = d.device_idle(dev)
        a = d.update_arrived(dev, _work(d, t))
    assert a.merge is not None and d.version == 1


def test_nan_float_update_rejected_for_fedbuff():
    d = _driver("fedbuff", 1)
    t = d.device_idle("a")
    u = _work(d, t)
    u.tensors[0].data[0, 0] = np.nan
    _rejects(d, "a", u, "non_finite")


def test_future_base_version_rejected():
    d = _driver("ftte", 1)
    t = d.device_idle("a")
    u = _work(d, t)
    # a forged record: the task claims a version the hub has not reached
    d._outstanding[t.id].base_version = 7
    u.base_version = 7
    _rejects(d, "a", u, "future_version")


def test_update_without_task_id_matches_the_devices_task_at_its_version():
    d = _driver("ftte", 2)
    old = d.device_idle("a")
    d.device_gone("a")  # it dropped out; its task stays deliverable
    ta, tb = d.device_idle("a"), d.device_idle("b")
    u = _work(d, ta)
    u.task_id = ""
    assert d.update_arrived("a", u).accepted  # takes the newest matching task
    u = _work(d, old)
    u.task_id = ""
    assert d.update_arrived("a", u).accepted  # then the older one at the same version
    u = _work(d, tb)
    u.task_id = ""
    u.base_version = 1  # no task of b at version 1
    _rejects(d, "b", u, "unknown_task")
    assert d.version == 1


def test_late_delivery_after_device_gone_is_accepted_as_stale():
    d = _driver("ftte", 1)
    t = d.device_idle("a")
    d.device_gone("a")
    t2 = d.device_idle("b")
    d.update_arrived("b", _work(d, t2))
    a = d.update_arrived("a", _work(d, t))
    assert a.accepted and a.staleness == 1 and a.merge is not None and d.version == 2


def test_max_staleness_and_max_versions():
    d = _driver("ftte", 1, max_staleness=1, max_versions=3)
    old = d.device_idle("old")
    for i in range(2):
        t = d.device_idle("f")
        d.update_arrived("f", _work(d, t))
    _rejects(d, "old", _work(d, old), "too_stale")
    held = d.device_idle("h")
    t = d.device_idle("f")
    assert d.update_arrived("f", _work(d, t)).merge.version == 3
    assert d.done and d.device_idle("f") is None
    _rejects(d, "h", _work(d, held), "done")
    assert d.version == 3


@pytest.mark.parametrize("partial", [False, True])
def test_shutdown_merges_partial_buffer_only_if_configured(partial):
    d = _driver("ftte", 3, merge_partial_at_shutdown=partial)
    for dev in ("a", "b"):
        t = d.device_idle(dev)
        d.update_arrived(dev, _work(d, t))
    before = _state(d.model)
    late = d.device_idle("c")
    report = d.shutdown()
    if partial:
        assert report is not None and report.partial and report.num_updates == 2 and d.version == 1
        assert not _same(before, _state(d.model))
    else:
        assert report is None and d.version == 0 and _same(before, _state(d.model))
    assert d.done and d.device_idle("a") is None and d.shutdown() is None
    a = d.update_arrived("c", _work(d, late))
    assert not a.accepted and a.reason == "shutdown"


def test_fedavg_waits_for_its_cohort():
    d = _driver("fedavg", 3)
    tasks = {dev: d.device_idle(dev) for dev in ("a", "b", "c")}
    assert d.device_idle("d") is None  # outside the running cohort
    assert d.cohort == {"a", "b", "c"}
    assert all(t.base_version == 0 for t in tasks.values())
    assert d.update_arrived("a", _work(d, tasks["a"], samples=10)).merge is None
    assert d.device_idle("a") is None  # delivered; waits for the round like everyone else
    assert d.update_arrived("b", _work(d, tasks["b"], samples=30)).merge is None
    assert d.version == 0
    a = d.update_arrived("c", _work(d, tasks["c"], samples=60))
    assert a.merge is not None and d.version == 1 and a.merge.staleness == [0, 0, 0]
    np.testing.assert_allclose(a.merge.weights, [0.1, 0.3, 0.6])
    # next round: a new cohort at version 1, which may include the device that waited
    t = d.device_idle("d")
    assert t is not None and t.base_version == 1


def test_fedavg_survives_a_device_leaving():
    d = _driver("fedavg", 3)
    tasks = {dev: d.device_idle(dev) for dev in ("a", "b", "c")}
    d.update_arrived("a", _work(d, tasks["a"]))
    d.update_arrived("b", _work(d, tasks["b"]))
    report = d.device_gone("c")  # the last one owed: the round completes without it
    assert report is not None and report.partial and report.num_updates == 2 and d.version == 1
    # its late update from the old round is dropped, never merged
    before = _state(d.model)
    a = d.update_arrived("c", _work(d, tasks["c"]))
    assert not a.accepted and a.reason == "late" and _same(before, _state(d.model))
    # a round whose whole cohort leaves before delivering ends with no merge, and the next one starts
    tasks = {dev: d.device_idle(dev) for dev in ("a", "b", "e")}
    for dev in tasks:
        assert d.device_gone(dev) is None
    assert d.version == 1 and d.cohort == set()
    t = d.device_idle("f")
    assert t is not None and t.base_version == 1
    assert d.update_arrived("f", _work(d, t)).merge is not None and d.version == 2


def test_fedavg_cohort_closes_at_first_delivery():
    d = _driver("fedavg", 4)
    ta, tb = d.device_idle("a"), d.device_idle("b")
    d.update_arrived("a", _work(d, ta))
    assert d.device_idle("c") is None  # the round is running; no new members
    assert d.update_arrived("b", _work(d, tb)).merge is not None


def test_checkpoint_restore_keeps_version_buffer_and_tasks():
    d = _driver("ftte", 3)
    t0 = d.device_idle("a")
    d.update_arrived("a", _work(d, t0))
    t1 = d.device_idle("b")
    state = d.state_dict()
    import json
    json.dumps(state["meta"])  # JSON-able apart from the buffered update bytes
    m2 = d.model.copy()
    d2 = RoundDriver(m2, _sparse(m2), make_strategy("ftte", buffer_size=3), TaskConfig(), seed=1)
    d2.load_state_dict(state)
    assert d2.version == d.version and d2.buffered == 1
    assert d2.update_arrived("b", _work(d2, t1)).accepted
    assert not d2.update_arrived("a", _work(d2, t0)).accepted  # already delivered before the crash
    t2 = d2.device_idle("c")
    assert t2.id not in (t0.id, t1.id)
    assert d2.update_arrived("c", _work(d2, t2)).merge.num_updates == 3


def test_same_events_same_results_any_thread_count():
    outs = []
    for threads in (1, 2, 1):
        K.set_num_threads(threads)
        d = _driver("ftte", 2)
        for i in range(6):
            t = d.device_idle(f"d{i % 3}")
            d.update_arrived(t.device_id, _work(d, t, seed=i))
        outs.append(_state(d.model))
    assert _same(outs[0], outs[1]) and _same(outs[0], outs[2])


_TRAINING_KERNELS = ("dense_forward", "dense_backward", "relu_forward", "softmax_xent_forward", "sgd_update_rows")


@pytest.mark.skipif(not all(hasattr(K, n) for n in _TRAINING_KERNELS), reason="training kernels not built yet")
@pytest.mark.parametrize("name", ["ftte", "fedbuff", "fedavg"])
def test_end_to_end_real_training(name):
    """Real Trainer-produced updates through the driver improve a real model."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0)).astype(np.int32)
    m = _model()
    sub = ft.Subset.of(m, {"fc1": {"rows": "all", "bias": True}, "fc2": {"rows": "all", "bias": True}})
    d = RoundDriver(m, sub, make_strategy(name, buffer_size=3), TaskConfig(lr=0.2, local_epochs=2, batch_size=16),
                    max_versions=12)
    loss0, _ = m.evaluate(x, y)
    devices = {f"d{i}": (m.copy(), x[i::4], y[i::4]) for i in range(4)}
    queue = [t for t in (d.device_idle(dev) for dev in devices) if t is not None]
    while queue and not d.done:
        t = queue.pop(0)
        local, xs, ys = devices[t.device_id]
        u = run_task(local, t, xs, ys)
        assert u.peak_memory_bytes and u.peak_memory_bytes > 0 and u.num_samples == len(xs)
        a = d.update_arrived(t.device_id, u, nbytes=u.nbytes)
        assert a.accepted, a.message
        busy = {q.device_id for q in queue}  # only idle devices ask for work
        for dev in (devices if d.strategy.synchronous else [t.device_id]):
            nt = d.device_idle(dev) if dev not in busy else None
            if nt is not None:
                queue.append(nt)
    loss1, acc1 = m.evaluate(x, y)
    assert d.version == 12 and loss1 < loss0 and acc1 > 0.6
    assert d.stats()["bytes_in"] > 0
