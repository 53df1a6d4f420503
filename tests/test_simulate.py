import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from ftte_hub.cli import main as hub_cli
from ftte_hub.report import write_results
from ftte_hub.simulate import SimConfig, load_profiles, simulate

SMALL = dict(clients=12, stragglers=0.5, max_versions=4, buffer=3, samples_per_device=24, local_epochs=1.0,
             async_version_cap=30)


def _strip_wall(results):
    out = json.loads(json.dumps(results))
    for r in out["strategies"].values():
        r.pop("wall_seconds")
    return out


@pytest.fixture(scope="module")
def small_run():
    return simulate(SimConfig(strategies=("ftte", "fedbuff", "fedavg"), seed=3, **SMALL), log=lambda m: None)


def test_results_have_the_documented_fields(small_run):
    r = small_run
    for key in ("strategies", "target_accuracy", "clients", "stragglers", "seed", "dataset", "start"):
        assert key in r
    assert r["clients"] == 12 and r["seed"] == 3 and r["dataset"] == "digits"
    assert r["ftte_base_step_budget"] == 0.5  # plain ftte's per-base step budget, the simulator's default
    assert r["start"].startswith("pretrained centrally on ") and r["pretrained"]
    best_final = max(s["final_accuracy"] for s in r["strategies"].values())
    assert r["target_accuracy"] == pytest.approx(0.95 * best_final)
    for name, s in r["strategies"].items():
        for key in ("time_to_target_s", "final_accuracy", "best_accuracy", "peak_device_memory_bytes",
                    "bytes_down_total", "bytes_up_total", "merges"):
            assert key in s, (name, key)
        versions = s["curve_versions"]
        assert versions == sorted(versions) and versions[-1] == s["merges"] and len(versions) == len(s["curve"])
        times = [p[0] for p in s["curve"]]
        downs, ups = [p[2] for p in s["curve"]], [p[3] for p in s["curve"]]
        assert downs == sorted(downs) and ups == sorted(ups) and downs[-1] <= s["bytes_down_total"]
        assert times == sorted(times)
        # FedAvg runs its max_versions rounds; its finishing time is everyone's budget
        if name == "fedavg":
            assert s["merges"] == 4 and times[-1] == pytest.approx(r["time_budget_s"], abs=1e-3)
        else:
            assert times[-1] <= r["time_budget_s"] + 1e-3 and 0 < s["merges"] <= 30
        assert s["bytes_up_total"] > 0 and s["bytes_down_total"] > 0
        if s["time_to_target_s"] is not None:
            first = next(p for p in s["curve"] if p[1] >= round(r["target_accuracy"], 4))
            assert first[0] == s["time_to_target_s"] and first[2] + first[3] == s["bytes_to_target"]


def test_ftte_is_sparse_int8_and_lighter_than_the_baselines(small_run):
    s = small_run["strategies"]
    f, avg = s["ftte"], s["fedavg"]
    assert f["trainable_params"] < avg["trainable_params"]
    # int8 deltas of a subset against float32 deltas of the full model
    assert f["bytes_up_per_task"] < 0.25 * avg["bytes_up_per_task"]
    assert f["peak_device_memory_bytes"] <= small_run["memory_budget_min"]
    assert f["peak_device_memory_bytes"] < avg["peak_device_memory_bytes"]
    # the engine's own record agrees with the cost model for every strategy
    for r in s.values():
        assert abs(r["peak_device_memory_bytes"] - r["peak_device_memory_predicted_bytes"]) <= \
            0.1 * r["peak_device_memory_bytes"]
    assert s["fedavg"]["mean_staleness"] == 0.0


def test_update_bits_4_packs_ftte_uplink_deltas_as_int4(small_run):
    """--update-bits 4: the simulated devices encode their deltas as the fleet's int4 updates do
    (two levels a byte and one scale per row), so each task's upload is about half the int8 one;
    the baselines' float32 deltas do not change."""
    r4 = simulate(SimConfig(strategies=("ftte", "fedavg"), seed=3, update_bits=4, **SMALL), log=lambda m: None)
    assert r4["ftte_update_bits"] == 4 and small_run["ftte_update_bits"] == 8
    up8, up4 = small_run["strategies"]["ftte"]["bytes_up_per_task"], r4["strategies"]["ftte"]["bytes_up_per_task"]
    assert 0.45 * up8 < up4 < 0.65 * up8, (up8, up4)
    assert r4["strategies"]["fedavg"]["bytes_up_per_task"] == small_run["strategies"]["fedavg"]["bytes_up_per_task"]
    assert r4["strategies"]["ftte"]["final_accuracy"] > 0.5


def test_the_install_is_counted_as_the_model_frame_the_hub_sends(small_run):
    """An ftte device's first task carries the model file once, as the hub's MODEL frame: with
    frozen weights int8, the int8 install (``modelfile.install_bytes``); --float32-install: the
    float32 file. The baselines ship the model with each task and install nothing."""
    from ftte_core.modelfile import model_to_bytes
    from ftte_core.zoo import zoo

    plain = simulate(SimConfig(strategies=("ftte",), seed=3, int8_install=False, **SMALL), log=lambda m: None)
    assert small_run["ftte_int8_install"] and not plain["ftte_int8_install"]
    assert small_run["ftte_frozen"] == "int8"  # M_min is the Pi 4 share: the search holds fc1 int8
    f8, f32 = small_run["strategies"]["ftte"], plain["strategies"]["ftte"]
    float_file = len(model_to_bytes(zoo("mlp", (1, 8, 8), 10)))
    assert f32["install_bytes_per_device"] == float_file
    assert f8["install_bytes_per_device"] < 0.6 * float_file
    for r in (f8, f32):
        assert r["install_bytes_total"] > 0 and r["install_bytes_total"] % r["install_bytes_per_device"] == 0
    for name in ("fedbuff", "fedavg"):
        assert small_run["strategies"][name]["install_bytes_total"] == 0


def test_same_seed_same_results_different_seed_differs(small_run):
    again = simulate(SimConfig(strategies=("ftte", "fedbuff", "fedavg"), seed=3, **SMALL), log=lambda m: None)
    assert _strip_wall(again) == _strip_wall(small_run)
    other = simulate(SimConfig(strategies=("ftte",), seed=4, **SMALL), log=lambda m: None)
    assert other["strategies"]["ftte"]["curve"] != small_run["strategies"]["ftte"]["curve"]


def test_outputs_written(small_run, tmp_path):
    paths = write_results(small_run, str(tmp_path))
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["strategies"].keys() == small_run["strategies"].keys()
    md = (tmp_path / "results.md").read_text()
    assert "Target accuracy" in md and "| ftte |" in md and "| fedavg |" in md
    f, a = small_run["strategies"]["ftte"], small_run["strategies"]["fedavg"]
    if f["bytes_to_target"] is not None and a["bytes_to_target"]:
        assert f"bytes moved until the target (down + up, installs included): " \
               f"{f['bytes_to_target'] / a['bytes_to_target']:.2f}x" in md
    root = ET.parse(paths["svg"]).getroot()
    assert root.tag.endswith("svg")
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 3


def test_cli_simulate_runs_and_rejects_bad_input(tmp_path):
    runner = CliRunner()
    out = tmp_path / "sim"
    res = runner.invoke(hub_cli, ["simulate", "--clients", "8", "--max-versions", "2", "--buffer", "2",
                                  "--strategies", "ftte,ftte-noage,ftte-novar", "--samples-per-device", "16",
                                  "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert set(json.loads((out / "results.json").read_text())["strategies"]) == {"ftte", "ftte-noage", "ftte-novar"}
    bad = runner.invoke(hub_cli, ["simulate", "--strategies", "ftte,fedprox", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown strategy fedprox" in bad.output
    missing = runner.invoke(hub_cli, ["simulate", "--clients", "4", "--dataset", str(tmp_path / "nope.npz"),
                                      "--out", str(out)])
    assert missing.exit_code == 2 and "error" in missing.output and "Traceback" not in missing.output
    tiny = runner.invoke(hub_cli, ["simulate", "--clients", "4", "--memory-budget", "1KiB", "--out", str(out)])
    assert tiny.exit_code == 2 and "too small" in tiny.output and "needs" in tiny.output


def test_profiles_from_a_file(tmp_path):
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"profiles": {"node": {"flops_per_s": 1e9, "memory_budget": 600000,
                                                      "down_bps": 1e6, "up_bps": 1e6}}}))
    profiles = load_profiles(str(good))
    assert list(profiles) == ["node"] and profiles["node"].dropout_per_s == 0.0
    r = simulate(SimConfig(strategies=("ftte",), profiles_path=str(good), **SMALL), log=lambda m: None)
    assert r["memory_budget_min"] == 600000
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"profiles": {"node": {"flops_per_s": -1, "memory_budget": 1, "down_bps": 1,
                                                     "up_bps": 1}}}))
    with pytest.raises(ValueError, match="positive"):
        load_profiles(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="expected"):
        load_profiles(str(bad))
    node = {"flops_per_s": 1e9, "memory_budget": 600000, "down_bps": 1e6, "up_bps": 1e6}
    for profiles, why in (([], "expected"), ({"node": [1]}, "expected"), ({"node": {**node, "speed": 1}}, "expected"),
                          ({"node": {**node, "flops_per_s": "fast"}}, "finite numbers"),
                          ({"node": {**node, "up_bps": True}}, "finite numbers"),
                          ({"node": {**node, "rejoin_s": -1}}, ">= 0"),
                          ({"node": {**node, "weight": 0}}, "weight 0")):
        bad.write_text(json.dumps({"profiles": profiles}))
        with pytest.raises(ValueError, match=why):  # one line each, never a TypeError/AttributeError traceback
            load_profiles(str(bad))
    shipped = load_profiles()
    assert {"pi-zero-2w", "pi4", "pi5", "jetson"} <= set(shipped)


def test_ftte_hub_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "ftte_hub.cli", "simulate", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--stragglers" in proc.stdout and "default: 0.9" in proc.stdout
