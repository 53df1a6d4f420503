"""FTTE's per-base step budget: the updates computed from one base version move the model by at
most ``base_step_budget`` mean deltas in all, over every merge (docs/aggregation.md).

Without it a fleet's first wave (every device's first task at version 0) merges buffer after
buffer of deltas computed at one point and overshoots (issue 12's accuracy swings)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

import ftte_core as ft
from ftte_core.scheduler import RoundDriver, TaskConfig
from ftte_core.strategies import FTTE, make_strategy
from ftte_core.update import encode_update, load_values


def _model():
    return ft.zoo("mlp", (8,), 3, hidden=(6,), seed=0)


def _sparse(model):
    return ft.Subset.of(model, {"fc1": {"rows": [0, 2, 5], "bias": True}, "fc2": {"rows": "all", "bias": True}})


def _driver(budget=FTTE.BASE_STEP_BUDGET, k=2, model=None):
    m = model if model is not None else _model()
    strategy = FTTE(k, server_lr=2.0, age_exponent=0.5, base_step_budget=budget)
    return RoundDriver(m, _sparse(m), strategy, TaskConfig(), seed=1)


def _same_step(driver, task, scale=0.01):
    """Every device's delta is the same step (as in a first wave of like devices), up to rounding."""
    rng = np.random.default_rng(0)
    local = driver.model.copy()
    load_values(local, task.subset, task.values)
    for _key, _l, view, rows in task.subset.tensors(local):
        r = rows if rows is not None else np.arange(view.shape[0])
        view[r] += (scale * rng.standard_normal((r.size, view.shape[1]))).astype(np.float32)
    return encode_update(local, task.subset, dict(task.values), task.base_version, 10, 0.5, bits=task.bits,
                         seed=task.seed, device_id=task.device_id, task_id=task.id)


def _first_wave(driver, devices=10):
    """Every device takes its first task at the current version; their updates, not yet delivered."""
    tasks = [driver.device_idle(f"d{i}") for i in range(devices)]
    return [(t.device_id, _same_step(driver, t)) for t in tasks]


def _flat(model, subset):
    return np.concatenate([(view[rows] if rows is not None else view).ravel().astype(np.float64)
                           for _k, _l, view, rows in subset.tensors(model)])


def _wave_steps(driver, wave):
    """(sum of the merge coefficients the wave's updates got, how far the model moved)."""
    start = _flat(driver.model, driver.subset)
    total = 0.0
    for dev, u in wave:
        a = driver.update_arrived(dev, u)
        assert a.accepted, a.message
        if a.merge is not None:
            total += sum(a.merge.alphas)
    return total, float(np.linalg.norm(_flat(driver.model, driver.subset) - start))


def test_a_first_wave_from_one_base_takes_at_most_the_budget_in_all():
    d = _driver()
    wave = _first_wave(d)
    norm = max(float(np.linalg.norm(np.concatenate([
        (t.data.astype(np.float64) * (t.scales[:, None] if t.scales is not None else 1)).ravel()
        for t in u.tensors]))) for _dev, u in wave)
    total, moved = _wave_steps(d, wave)
    assert d.version == 5 and total == pytest.approx(1.0, rel=1e-6)  # five merges, one mean delta in all
    assert moved <= 1.0 * norm * (1 + 1e-5)

    off = _driver(budget=None)
    wave = _first_wave(off)
    total_off, moved_off = _wave_steps(off, wave)
    # without the budget: 2 * sum_{tau < 5} (1 + tau)^-0.5 = 6.46 mean deltas, the overshoot
    assert total_off == pytest.approx(2 * sum((1 + t) ** -0.5 for t in range(5)), rel=1e-6)
    assert moved_off > 3 * moved


def test_only_the_spent_base_is_held_back_and_its_updates_keep_their_shares():
    s = FTTE(4, base_step_budget=1.0)
    ups = [SimpleNamespace(base_version=b) for b in (3, 3, 4, 5)]
    f, steps = s.budget_factors(ups, np.array([0.3, 0.1, 0.5, 0.6]), {3: 0.8, 4: 1.0})
    np.testing.assert_allclose(f, [0.5, 0.5, 0.0, 1.0])  # base 3 has 0.2 left of 0.4 asked, base 4 none
    assert steps == pytest.approx({3: 0.2, 4: 0.0, 5: 0.6})
    f, steps = FTTE(4, base_step_budget=None).budget_factors(ups, np.ones(4), {3: 5.0})
    np.testing.assert_array_equal(f, np.ones(4))
    assert steps == {}


def test_the_ledger_holds_only_versions_in_flight_and_survives_a_checkpoint():
    d = _driver()
    wave = _first_wave(d, devices=6)
    for dev, u in wave[:2]:  # one merge: base 0 spent its whole budget (g = 1, server lr 2)
        d.update_arrived(dev, u)
    assert d.version == 1 and d._base_steps == pytest.approx({0: 1.0})
    state = json.loads(json.dumps(d.state_dict()["meta"]))
    assert state["base_steps"] == [[0, pytest.approx(1.0)]]

    resumed = _driver(model=d.model.copy())
    resumed.load_state_dict({"meta": state, "buffer": []})
    assert resumed._base_steps == pytest.approx({0: 1.0})
    start = _flat(resumed.model, resumed.subset)
    for dev, u in wave[2:]:
        a = resumed.update_arrived(dev, u)
        assert a.accepted and (a.merge is None or sum(a.merge.alphas) == 0.0)
    assert resumed.version == 3 and np.array_equal(_flat(resumed.model, resumed.subset), start)
    # every task of version 0 is delivered: nothing from it can arrive, so the ledger forgets it
    assert resumed._base_steps == {} and "base_steps" not in resumed.state_dict()["meta"]


def test_the_budget_is_a_parameter_with_an_off_switch_in_params_and_describe():
    on = make_strategy("ftte")
    assert on.params()["base_step_budget"] == FTTE.BASE_STEP_BUDGET and "base_budget=1" in on.describe()
    off = make_strategy("ftte", base_step_budget=0)
    assert off.params()["base_step_budget"] is None and "base_budget=off" in off.describe()
    d = _driver()
    assert d.policy()["strategy"]["base_step_budget"] == 1.0
    assert ("strategy.base_step_budget", 1.0, None) in _driver(budget=None).policy_differences(d.policy())
    for bad in (-1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="base_step_budget"):
            FTTE(2, base_step_budget=bad)
    with pytest.raises(ValueError, match="base_step_budget"):
        make_strategy("ftte-tiered", base_step_budget=1.0)
    assert make_strategy("ftte-tiered").params()["base_step_budget"] is None


def test_the_hub_passes_its_budget_to_plain_ftte_only_and_a_resume_rebuilds_it():
    from ftte_hub.train import budget_option
    assert budget_option("ftte", None) == {} and budget_option("ftte", 0.0) == {"base_step_budget": 0.0}
    assert budget_option("ftte-novar", 2) == {"base_step_budget": 2.0}
    for other in ("ftte-tiered", "fedbuff", "fedavg-full"):
        assert budget_option(other, 0.5) == {}
    off = make_strategy("ftte", 4, **budget_option("ftte", 0.0))
    assert off.base_step_budget is None and "base_budget=off" in off.describe()
    assert make_strategy("ftte", 4, **budget_option("ftte", 0.25)).base_step_budget == 0.25
    assert make_strategy("fedbuff", 4, **budget_option("fedbuff", 0.25)).name == "fedbuff"
