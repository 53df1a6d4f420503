"""FTTE's server-step decay (``lr_decay_merges``): the merge at version v is scaled by
1 / sqrt(1 + v / lr_decay_merges), in plain FTTE and in ftte-tiered; off by default."""
import math
import re

import numpy as np
import pytest

import ftte_core as ft
from ftte_core.strategies import FTTE, FTTETiered, make_strategy
from ftte_core.update import encode_update, subset_values


def _model():
    return ft.zoo("mlp", (8,), 3, hidden=(6,), seed=0)


def _sparse(model):
    return ft.Subset.of(model, {"fc1": {"rows": [0, 2, 5], "bias": True}, "fc2": {"rows": "all", "bias": True}})


def _updates(model, subset, base_version, n=3):
    rng = np.random.default_rng(0)
    base = subset_values(model, subset)
    out = []
    for k in range(n):
        work = model.copy()
        for key, _l, view, rows in subset.tensors(work):
            r = rows if rows is not None else np.arange(view.shape[0])
            view[r] = base[key] + (0.01 * rng.standard_normal(base[key].shape)).astype(np.float32)
        out.append(encode_update(work, subset, base, base_version, 10, 1.0, seed=k, device_id=f"d{k}",
                                 task_id=f"t{k}"))
    return out


def _moved(strategy, version):
    """How far one merge of the same three updates (all fresh: base = version) moves the model."""
    m = _model()
    sub = _sparse(m)
    before = subset_values(m, sub)
    strategy.merge(m, sub, _updates(m, sub, version), version)
    after = subset_values(m, sub)
    return math.sqrt(sum(float(np.sum((after[k].astype(np.float64) - before[k]) ** 2)) for k in before))


@pytest.mark.parametrize("make", [lambda **kw: FTTE(3, base_step_budget=None, **kw),
                                  lambda **kw: FTTETiered(3, **kw)])
def test_merge_is_scaled_by_the_decay(make):
    m = _model()
    plain, decayed = make(), make(lr_decay_merges=50)
    if isinstance(plain, FTTETiered):
        for s in (plain, decayed):
            s.set_tiers([_sparse(m)], [1])
    for version in (0, 50, 150):
        want = 1.0 / math.sqrt(1.0 + version / 50)
        assert decayed.lr_decay(version) == pytest.approx(want)
        assert plain.lr_decay(version) == 1.0
        assert _moved(decayed, version) == pytest.approx(want * _moved(plain, version), rel=1e-5)


def test_decay_is_validated_and_reported():
    s = make_strategy("ftte", lr_decay_merges=200)
    assert s.params()["lr_decay_merges"] == 200.0 and "lr_decay=200 merges" in s.describe()
    assert make_strategy("ftte").params()["lr_decay_merges"] is None
    assert make_strategy("ftte", lr_decay_merges=0).lr_decay(10**6) == 1.0  # 0: off
    for bad in (-1, float("nan"), float("inf"), True, "50"):
        with pytest.raises(ValueError, match="lr_decay_merges"):
            FTTE(lr_decay_merges=bad)


def test_simulator_gives_each_ftte_strategy_its_own_decay(monkeypatch):
    import ftte_hub.simulate as sim
    made = {}

    def recording(name, **kw):
        made[name] = s = make_strategy(name, **kw)
        return s
    monkeypatch.setattr(sim, "make_strategy", recording)
    cfg = sim.SimConfig(clients=6, strategies=["ftte", "ftte-tiered", "fedbuff"], max_versions=2, async_version_cap=4,
                        seed=0, ftte_lr_decay=2.0, tiered_lr_decay=0.5, threads=1)
    res = sim.simulate(cfg, log=lambda m: None)
    assert res["ftte_lr_decay_merges"] == 12.0  # 2 merges per device x 6 devices
    assert res["tiered_lr_decay_merges"] == 3.0
    assert made["ftte"].lr_decay_merges == 12.0 and made["ftte-tiered"].lr_decay_merges == 3.0
    assert not hasattr(made["fedbuff"], "lr_decay_merges")
    sim.simulate(sim.SimConfig(clients=6, strategies=["ftte-tiered"], max_versions=2, async_version_cap=4, seed=0,
                               threads=1, tiered_lr_decay=0), log=lambda m: None)
    assert made["ftte-tiered"].lr_decay_merges is None   # 0: off
    default = sim.simulate(sim.SimConfig(clients=6, strategies=["ftte"], max_versions=2, async_version_cap=4, seed=0,
                                         threads=1), log=lambda m: None)
    assert default["ftte_lr_decay_merges"] == sim.SimConfig.ftte_lr_decay * 6 == made["ftte"].lr_decay_merges
    off = sim.simulate(sim.SimConfig(clients=6, strategies=["ftte"], max_versions=2, async_version_cap=4, seed=0,
                                     threads=1, ftte_lr_decay=None), log=lambda m: None)
    assert off["ftte_lr_decay_merges"] is None and made["ftte"].lr_decay_merges is None


@pytest.mark.parametrize("field, strategy, value, message", [
    ("lr_decay", "fedavg", 3.0, "--lr-decay applies to the ftte strategies, not fedavg"),
    ("lr_decay", "ftte", float("inf"), "--lr-decay inf: a finite number"),
    ("lr_decay", "ftte", -1.0, "--lr-decay -1.0: a finite number"),
    ("agreement_damping", "fedbuff", 0.5, "--agreement-damping applies to plain ftte and its ablations, not fedbuff"),
    ("agreement_damping", "ftte-tiered", 0.5,
     "--agreement-damping applies to plain ftte and its ablations, not ftte-tiered"),
    ("agreement_damping", "ftte", float("nan"), "--agreement-damping nan: a finite number"),
])
def test_hub_refuses_a_decay_or_damping_it_cannot_use(tmp_path, field, strategy, value, message):
    """ftte-hub train --lr-decay / --agreement-damping: refused before anything starts (no folder,
    no network)."""
    import asyncio

    pytest.importorskip("onnx", reason="the hub needs the onnx package (none for armv7)")
    from ftte_core.protocol import generate_key
    from ftte_hub.train import TrainConfig, TrainError, run_train

    cfg = TrainConfig(model="mlp", val_data=str(tmp_path / "val.npz"), out=str(tmp_path / "run"), min_agents=1,
                      mdns=False, peers=["127.0.0.1:9"], strategy=strategy, **{field: value})
    with pytest.raises(TrainError, match=re.escape(message)):
        asyncio.run(run_train(cfg, generate_key()))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["simulate", "--lr-decay", "inf"], ["simulate", "--tiered-lr-decay", "nan"],
                                  ["train", "--key", "k", "--lr-decay", "inf"],
                                  ["train", "--key", "k", "--base-step-budget", "nan"]])
def test_cli_refuses_non_finite_decays_at_parse_time(argv):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ftte_hub.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2 and "must be a finite number" in proc.stderr, proc.stderr
