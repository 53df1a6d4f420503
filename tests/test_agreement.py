"""FTTE's agreement damping (``agreement_damping`` = kappa): a buffer whose stale updates agree
(rho, ``FTTE.agreement``) takes a step scaled by sum n_k (1 + tau_k)^(-kappa rho) / sum n_k."""
import math

import numpy as np
import pytest

import ftte_core as ft
from ftte_core.strategies import FTTE, FTTETiered, make_strategy
from ftte_core.update import decode_tensor64, encode_update, subset_values


def _model():
    return ft.zoo("mlp", (8,), 3, hidden=(6,), seed=0)


def _sparse(model):
    return ft.Subset.of(model, {"fc1": {"rows": [0, 2, 5], "bias": True}, "fc2": {"rows": "all", "bias": True}})


def _updates(model, subset, bases, shared, noise, samples=None, seed=0):
    """One update per base version: shared x a common step + noise x its own, float32 (exact)."""
    rng = np.random.default_rng(seed)
    base = subset_values(model, subset)
    common = {k: rng.standard_normal(v.shape) for k, v in base.items()}
    out = []
    for k, b in enumerate(bases):
        work = model.copy()
        for key, _l, view, rows in subset.tensors(work):
            r = rows if rows is not None else np.arange(view.shape[0])
            step = shared * common[key] + noise * rng.standard_normal(base[key].shape)
            view[r] = base[key] + (0.01 * step).astype(np.float32)
        n = 10 if samples is None else samples[k]
        out.append(encode_update(work, subset, base, b, n, 1.0, bits=32, seed=k, device_id=f"d{k}", task_id=f"t{k}"))
    return out


def _reference_rho(updates, samples):
    """rho from the decoded deltas directly (NumPy, float64): 1 - S / ((n_eff - 1) ||m||^2), in [0, 1]."""
    D = np.stack([np.concatenate([decode_tensor64(t).ravel() for t in u.tensors]) for u in updates])
    p = np.asarray(samples, float) / np.sum(samples)
    m = p @ D
    spread = float(p @ np.sum((D - m) ** 2, axis=1))
    n_eff = 1.0 / float(p @ p)
    return min(max(1.0 - spread / ((n_eff - 1.0) * float(m @ m)), 0.0), 1.0)


@pytest.mark.parametrize("shared, noise", [(1.0, 0.0), (1.0, 0.5), (1.0, 2.0), (0.0, 1.0)])
def test_agreement_matches_the_numpy_reference(shared, noise):
    m = _model()
    sub = _sparse(m)
    samples = [10, 30, 20, 10, 40, 25]
    ups = _updates(m, sub, [0] * 6, shared, noise, samples)
    rho = FTTE().agreement(ups, samples)
    assert rho == pytest.approx(_reference_rho(ups, samples), abs=1e-9)
    if noise == 0.0:
        assert rho == pytest.approx(1.0)     # one shared step
    if shared == 0.0:
        assert rho < 0.5                     # independent noise: little left to agree on


def test_agreement_is_lower_the_more_the_deltas_scatter():
    m = _model()
    sub = _sparse(m)
    rhos = [FTTE().agreement(_updates(m, sub, [0] * 8, 1.0, noise, seed=3)) for noise in (0.1, 0.5, 1.0, 3.0)]
    assert all(a > b for a, b in zip(rhos, rhos[1:])), rhos
    assert FTTE().agreement(_updates(m, sub, [0], 1.0, 1.0)) == 0.0   # one update: nothing to compare


def _moved(strategy, version, ups):
    m = _model()
    sub = _sparse(m)
    before = subset_values(m, sub)
    strategy.merge(m, sub, ups, version)
    after = subset_values(m, sub)
    return math.sqrt(sum(float(np.sum((after[k].astype(np.float64) - before[k]) ** 2)) for k in before))


@pytest.mark.parametrize("noise", [0.0, 0.7])
def test_merge_is_scaled_by_the_agreement_factor(noise):
    m = _model()
    sub = _sparse(m)
    bases = [0, 2, 5, 5]          # merged at version 6: staleness 6, 4, 1, 1
    ups = _updates(m, sub, bases, 1.0, noise, seed=1)
    plain = FTTE(4, base_step_budget=None, variance=False)
    damped = FTTE(4, base_step_budget=None, variance=False, agreement_damping=0.8)
    rho = damped.agreement(ups)
    tau = 6 - np.array(bases, float)
    want = float(np.mean((1.0 + tau) ** (-0.8 * rho)))
    assert damped.agreement_factor(ups, 6) == pytest.approx(want)
    assert plain.agreement_factor(ups, 6) == 1.0
    assert want < 1.0
    assert _moved(damped, 6, ups) == pytest.approx(want * _moved(plain, 6, ups), rel=1e-5)
    fresh = _updates(m, sub, [6] * 4, 1.0, noise, seed=1)   # fresh updates: nothing re-applied
    assert damped.agreement_factor(fresh, 6) == pytest.approx(1.0)


def test_agreement_damping_is_validated_and_reported():
    s = make_strategy("ftte", agreement_damping=0.5)
    assert s.params()["agreement_damping"] == 0.5 and "agreement_damping=0.5" in s.describe()
    assert make_strategy("ftte").params()["agreement_damping"] == 0.0
    for bad in (-1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="agreement_damping"):
            FTTE(agreement_damping=bad)
    with pytest.raises(ValueError, match="agreement_damping is not built for the tiered merge"):
        FTTETiered(agreement_damping=0.5)


def test_simulator_gives_agreement_damping_to_plain_ftte_only(monkeypatch):
    import ftte_hub.simulate as sim
    made = {}

    def recording(name, **kw):
        made[name] = s = make_strategy(name, **kw)
        return s
    monkeypatch.setattr(sim, "make_strategy", recording)
    cfg = sim.SimConfig(clients=6, strategies=["ftte", "ftte-tiered"], max_versions=2, async_version_cap=4, seed=0,
                        agreement_damping=0.7, threads=1)
    res = sim.simulate(cfg, log=lambda m: None)
    assert res["ftte_agreement_damping"] == 0.7
    assert made["ftte"].agreement_damping == 0.7 and made["ftte-tiered"].agreement_damping == 0.0
    off = sim.simulate(sim.SimConfig(clients=6, strategies=["ftte"], max_versions=2, async_version_cap=4, seed=0,
                                     threads=1, agreement_damping=0.0), log=lambda m: None)
    assert off["ftte_agreement_damping"] == 0.0 and made["ftte"].agreement_damping == 0.0
