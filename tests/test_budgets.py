"""Issue 12: baselines held to device budgets, ftte-tiered (nested subsets, per-parameter merge),
and the simulator's comparison fields. Tiny models and fleets: light enough for the default run."""
import numpy as np
import pytest

import ftte_core as ft
from ftte_core.local import TaskConfig
from ftte_core.scheduler import RoundDriver, run_task
from ftte_core.strategies import STRATEGIES, FTTETiered, MergeRefused, make_strategy, subset_contains
from ftte_core.subset import Subset
from ftte_core.update import decode_tensor64, encode_update, subset_values


def _model(seed=0):
    return ft.zoo("mlp", (16,), 4, seed=seed, hidden=(8,))


def _tiers(model):
    small = Subset.of(model, {"fc2": {"rows": [1, 3], "bias": True}})
    big = Subset.of(model, {"fc1": {"rows": [0, 2, 5], "bias": True}, "fc2": {"rows": "all", "bias": True}})
    return [small, big]


def _update(model, subset, rng, n, scale=0.1, version=0):
    base = subset_values(model, subset)
    moved = model.copy()
    for key, _layer, view, rows in subset.tensors(moved):
        if rows is None:
            view += scale * rng.standard_normal(view.shape).astype(np.float32)
        else:
            view[rows] += scale * rng.standard_normal((len(rows), view.shape[1])).astype(np.float32)
    return encode_update(moved, subset, base, version, num_samples=n, loss=0.5, bits=8, stochastic=False)


def test_strategy_names_held_and_full():
    for name in ("fedavg", "fedbuff"):
        held, full = make_strategy(name), make_strategy(name + "-full")
        assert held.name == name and held.budget_held and not held.sparse
        assert full.name == name + "-full" and not full.budget_held
        assert held.synchronous == full.synchronous
    assert {"ftte", "ftte-tiered", "fedavg-full", "fedbuff-full"} <= set(STRATEGIES)
    with pytest.raises(ValueError, match="no tiers"):
        RoundDriver(_model(), None, make_strategy("ftte-tiered"))


def test_tiers_must_be_nested_and_sizes_ascending():
    m = _model()
    small, big = _tiers(m)
    assert subset_contains(big, small) and not subset_contains(small, big)
    with pytest.raises(ValueError, match="nested"):
        FTTETiered(tiers=[big, small])
    with pytest.raises(ValueError, match="ascending"):
        FTTETiered(tiers=[small, big], tier_bytes=[200, 100])
    s = FTTETiered(tiers=[small, big], tier_bytes=[100, 200])
    assert [s.tier_for_budget(b) for b in (50, 100, 150, 200, 10**9, None)] == [None, 0, 0, 1, 1, 0]


def test_tiered_merge_weighs_each_row_over_the_updates_that_trained_it():
    """Against a float64 NumPy reference: rows of the small tier average all updates, rows only the
    big tier trains average the big-tier updates alone (age and variance off: weights n_k)."""
    m = _model(1)
    small, big = _tiers(m)
    strat = FTTETiered(buffer_size=3, tiers=[small, big], tier_bytes=[1, 2], age=False, variance=False)
    rng = np.random.default_rng(0)
    ups = [_update(m, small, rng, 10), _update(m, big, rng, 30), _update(m, big, rng, 20)]
    tier_of = [0, 1, 1]
    before = {k: v.copy() for k, v in subset_values(m, big).items()}
    expected = {}
    for key, _layer, view, rows in big.tensors(m):
        old = np.asarray(view[rows] if rows is not None else view, np.float64)
        num, den = np.zeros_like(old), np.zeros(old.shape[0])
        for u, t in zip(ups, tier_of):
            own = dict((x[0], x[3]) for x in [_tiers(m)[t].tensors(m)][0])
            if key not in own:
                continue
            d = decode_tensor64(next(x for x in u.tensors if x.key == key))
            pos = np.arange(old.shape[0]) if rows is None else np.searchsorted(rows, own[key])
            num[pos] += u.num_samples * d
            den[pos] += u.num_samples
        expected[key] = old + num / np.maximum(den, 1)[:, None]
    report = strat.merge(m, big, ups, current_version=0)
    for key, _layer, view, rows in big.tensors(m):
        got = view[rows] if rows is not None else view
        np.testing.assert_allclose(got, expected[key], rtol=1e-5, atol=1e-6)
    assert report.num_updates == 3 and report.factors["tier"] == [0, 1, 1]
    assert any(not np.allclose(before[k], v) for k, v in subset_values(m, big).items())


def test_tiered_merge_refuses_a_non_finite_result_and_keeps_the_model():
    m = _model(2)
    small, big = _tiers(m)
    strat = FTTETiered(buffer_size=2, tiers=[small, big], tier_bytes=[1, 2])
    rng = np.random.default_rng(1)
    ups = [_update(m, small, rng, 10), _update(m, big, rng, 10)]
    ups[1].tensors[0].scales[:] = np.float32(3e38)
    before = subset_values(m, big)
    with pytest.raises(MergeRefused):
        strat.merge(m, big, ups, current_version=0)
    for k, v in subset_values(m, big).items():
        np.testing.assert_array_equal(v, before[k])


def test_driver_gives_each_device_the_largest_tier_its_budget_holds():
    m = _model(3)
    small, big = _tiers(m)
    strat = make_strategy("ftte-tiered", buffer_size=2, tiers=[small, big], tier_bytes=[1000, 5000])
    driver = RoundDriver(m, None, strat, TaskConfig(lr=0.1, batch_size=4), max_versions=3, seed=1)
    budgets = {"tiny": 500, "mid": 2000, "big": 9000, "unknown": None}
    for dev, b in budgets.items():
        driver.device_joined(dev, {} if b is None else {"memory_budget": b})
    assert driver.device_idle("tiny") is None  # below the smallest tier: sits out
    tasks = {d: driver.device_idle(d) for d in ("mid", "big", "unknown")}
    assert tasks["mid"].subset == small and tasks["unknown"].subset == small and tasks["big"].subset == big
    assert tasks["big"].subset_fingerprint == big.fingerprint() != tasks["mid"].subset_fingerprint
    assert set(tasks["big"].values) > set(tasks["mid"].values)
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((8, 16)).astype(np.float32), rng.integers(0, 4, 8)
    state = driver.state_dict()
    assert any(len(rec) == 4 for rec in state["meta"]["outstanding"].values())  # the tier is checkpointed
    again = RoundDriver(m.copy(), None, strat, TaskConfig(lr=0.1, batch_size=4), max_versions=3, seed=1)
    again.load_state_dict(state)
    assert {r.tier for r in again._outstanding.values()} == {0, 1}
    a = driver.update_arrived("mid", run_task(m.copy(), tasks["mid"], x, y))
    assert a.accepted and a.merge is None
    # an update for the wrong tier is refused: the task named the small tier
    wrong = run_task(m.copy(), tasks["big"], x, y)
    wrong.task_id = tasks["unknown"].id
    assert driver.update_arrived("unknown", wrong).reason in ("subset", "wrong_device")
    b = driver.update_arrived("big", run_task(m.copy(), tasks["big"], x, y))
    assert b.accepted and b.merge is not None and driver.version == 1


@pytest.fixture(scope="module")
def budget_run():
    from ftte_hub.simulate import SimConfig, simulate
    cfg = SimConfig(clients=10, stragglers=0.5, max_versions=3, buffer=3, samples_per_device=16,
                    async_version_cap=12, seed=5, threads=1)
    return simulate(cfg, log=lambda m: None)


@pytest.mark.slow  # six strategies on a simulated fleet (~5-15 s here)
def test_simulator_holds_baselines_to_budgets_and_reports_the_comparison_fields(budget_run):
    r = budget_run
    s = r["strategies"]
    assert set(s) == {"ftte", "ftte-tiered", "fedbuff", "fedbuff-full", "fedavg", "fedavg-full"}
    full = r["full_step_memory_bytes"]
    # the presets: the smallest devices hold 20% of the full step
    assert min(r["device_budgets"].values()) <= 0.2 * full
    for name in ("fedavg-full", "fedbuff-full"):
        assert s[name]["participating_devices"] == 10 and s[name]["devices_sat_out"] == 0
    for name in ("fedavg", "fedbuff"):
        assert s[name]["participating_devices"] + s[name]["devices_sat_out"] == 10
        assert s[name]["devices_sat_out"] > 0
    for name, x in s.items():
        for key in ("curve", "participating_devices", "min_device_memory_bytes", "peak_device_memory_bytes",
                    "bytes_to_target", "time_to_target_s", "final_accuracy"):
            assert key in x, (name, key)
        c = x["curve"]
        assert c[0] == [0.0, round(r["start_accuracy"], 4), 0, 0]
        assert [p[0] for p in c] == sorted(p[0] for p in c)
        assert all(len(p) == 4 for p in c) and len(c) == len(x["curve_versions"]) == x["merges"] + 1
        assert c[-1][2] <= x["bytes_down_total"] and c[-1][3] <= x["bytes_up_total"]
        assert 0 < x["min_device_memory_bytes"] <= x["peak_device_memory_bytes"]
        if x["time_to_target_s"] is not None:
            hit = next(p for p in c if p[1] >= round(r["target_accuracy"], 4))
            assert x["time_to_target_s"] == hit[0] and x["bytes_to_target"] == hit[2] + hit[3]
            assert 0 <= x["round_bytes_to_target"] <= x["bytes_to_target"]  # 0: the start already reached it
        # the baselines ship the whole model with every task: nothing is installed apart
        assert x["install_bytes_total"] == 0 if not name.startswith("ftte") else x["install_bytes_total"] > 0
    tiers = s["ftte-tiered"]["tiers"]
    assert len(tiers) >= 2 and tiers[0]["trainable_params"] == s["ftte"]["trainable_params"]
    assert s["ftte-tiered"]["min_device_memory_bytes"] <= s["ftte"]["peak_device_memory_bytes"] * 1.1
    assert s["ftte"]["peak_device_memory_bytes"] < s["fedavg"]["peak_device_memory_bytes"]


def test_nested_tiers_are_nested_fit_their_budgets_and_end_at_the_full_model():
    from ftte_core.cost import predict_memory
    from ftte_core.search import BudgetTooSmall, importance_scores, nested_tiers, search_subset
    m = ft.zoo("mlp", (16,), 4, seed=4, hidden=(32, 16))
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((64, 16)).astype(np.float32), rng.integers(0, 4, 64)
    scores = importance_scores(m, x, y, seed=0)
    full = predict_memory(m, batch_size=8)["total"]
    # budgets between the cheapest subset and full training (the step keeps no whole gradients,
    # so fixed fractions of full training may fit nothing)
    with pytest.raises(BudgetTooSmall) as e:
        search_subset(m, scores, 1, batch_size=8)
    low = e.value.minimum_bytes
    budgets = [int(low + 0.5 * (full - low)), int(low + 0.8 * (full - low)), 2 * full]
    cheapest = search_subset(m, scores, budgets[0], batch_size=8).subset
    tiers = nested_tiers(m, scores, cheapest, budgets, 8, full)
    assert tiers[0][0] == cheapest and tiers[-1][0] == Subset.full(m) and tiers[-1][1] == full
    for (small, b_small), (big, b_big) in zip(tiers, tiers[1:]):
        assert subset_contains(big, small) and b_small < b_big
    for sub, nbytes in tiers[:-1]:
        assert nbytes == predict_memory(m, sub, 8)["total"] and nbytes <= max(b for b in budgets if b < full)


def test_each_tier_clips_against_its_own_median():
    """A full-model update is naturally far larger than one of w*: clipped against one median of
    a buffer mostly of w* updates it would be cut to a sliver; each tier keeps its own."""
    m = _model(5)
    small, big = _tiers(m)
    strat = make_strategy("ftte-tiered", buffer_size=4, tiers=[small, big], tier_bytes=[1000, 5000])
    driver = RoundDriver(m, None, strat, TaskConfig(lr=0.1, batch_size=4), seed=2)
    rng = np.random.default_rng(4)
    for i, budget in enumerate([2000, 2000, 2000, 9000]):
        driver.device_joined(f"d{i}", {"memory_budget": budget})
    tasks = [driver.device_idle(f"d{i}") for i in range(4)]
    arrivals = []
    for i, task in enumerate(tasks):
        u = _update(m, task.subset, rng, 10, scale=0.01 if i < 3 else 1.0)
        u.task_id = task.id
        arrivals.append(driver.update_arrived(f"d{i}", u))
    report = arrivals[-1].merge
    assert report is not None and report.clip == [1.0, 1.0, 1.0, 1.0]
    assert set(driver.state_dict()["meta"]["tier_norm_windows"]) == {"1"}
