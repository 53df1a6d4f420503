"""`ftte-hub simulate` with models other than mlp/cnn: a DAG, an ONNX file, zoo models at their
own input shape, and the digits resampled to fit (data.resample_to_shape)."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from ftte_core import data as ftdata
from ftte_core.zoo import zoo_names
from ftte_hub.cli import main as hub_cli
from ftte_hub.simulate import REFERENCE_SHAPES, SimConfig, simulate

import dag_models

TINY = dict(clients=4, stragglers=0.5, max_versions=2, buffer=2, samples_per_device=16, local_epochs=1.0,
            async_version_cap=6, batch_size=8, pretrain_fraction=0.0)


# -- resampling ----------------------------------------------------------------------------------
def _ds(x):
    x = np.asarray(x, np.float32)
    return ftdata.Dataset(x, np.arange(len(x)) % 2, 2, "t")


def test_resample_keeps_values_in_range_and_is_deterministic():
    digits = ftdata.load_bundled("digits").subset(np.arange(40))
    for shape in [(3, 32, 32), (1, 49, 10), (3, 48, 48), (3, 128), (1, 20), (640,), (10,)]:
        a, how = ftdata.resample_to_shape(digits, shape)
        b, _ = ftdata.resample_to_shape(digits, shape)
        assert a.x.shape == (40,) + shape and a.x.dtype == np.float32 and how.startswith("digits: samples [1, 8, 8]")
        np.testing.assert_array_equal(a.x, b.x)
        assert a.x.min() >= 0.0 and a.x.max() <= 1.0
        np.testing.assert_array_equal(a.y, digits.y)
    same, how = ftdata.resample_to_shape(digits, (1, 8, 8))
    assert same is digits and how is None
    flat, how = ftdata.resample_to_shape(digits, (64,))
    np.testing.assert_array_equal(flat.x, digits.x.reshape(40, 64))
    assert "reshaped" in how


def test_bilinear_with_half_pixel_centres():
    # a constant image stays constant; doubling a ramp gives the half-pixel-centre samples
    const, _ = ftdata.resample_to_shape(_ds(np.full((2, 1, 3, 3), 0.7)), (2, 6, 6))
    np.testing.assert_allclose(const.x, 0.7, rtol=1e-6)
    ramp = np.tile(np.arange(4, dtype=np.float32), (4, 1))[None, None].repeat(2, 0)  # [2, 1, 4, 4], columns 0..3
    up, how = ftdata.resample_to_shape(_ds(ramp), (3, 4, 8))
    # output column j samples the input at (j + 0.5) / 2 - 0.5, clamped to [0, 3]
    expect = np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, 3)
    for ch in range(3):  # the single channel repeated
        np.testing.assert_allclose(up.x[0, ch], np.tile(expect, (4, 1)), rtol=1e-6, atol=1e-6)
    assert "bilinear 4x4 -> 4x8" in how and "repeated over 3" in how
    # 1-D: the flattened pixels resampled, then repeated over the channels
    sig, how = ftdata.resample_to_shape(_ds(np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4).repeat(2, 0)), (2, 16))
    np.testing.assert_allclose(sig.x[0, 0], np.clip((np.arange(16) + 0.5) / 2 - 0.5, 0, 7), atol=1e-6)
    np.testing.assert_array_equal(sig.x[:, 0], sig.x[:, 1])
    assert "linear 8 -> 16" in how


def test_resample_refuses_what_it_cannot_map():
    with pytest.raises(ftdata.DataError, match="neither images nor flattened square images"):
        ftdata.resample_to_shape(_ds(np.zeros((2, 10))), (1, 4, 4))
    with pytest.raises(ftdata.DataError, match="have 2 channels; the model takes 3"):
        ftdata.resample_to_shape(_ds(np.zeros((2, 2, 4, 4))), (3, 8, 8))
    with pytest.raises(ftdata.DataError, match="1 to 3 positive dimensions"):
        ftdata.resample_to_shape(_ds(np.zeros((2, 4))), (1, 1, 2, 2))


# -- the simulator ---------------------------------------------------------------------------------
@pytest.mark.slow  # whole simulated fleets: skipped only under emulation (pi-check)
def test_simulate_a_residual_dag_on_upsampled_digits():
    """A DAG (conv + BatchNorm + residual Add) given as a Model at 3x12x12: the digits are resized."""
    lines = []
    model = dag_models.tiny_resnet((3, 12, 12), 10, seed=1)
    r = simulate(SimConfig(model=model, strategies=("ftte", "fedbuff"), seed=1, memory_budget=300 << 10, **TINY),
                 log=lines.append)
    assert r["model"] == "tiny_resnet" and r["input_shape"] == [3, 12, 12]
    assert "bilinear 8x8 -> 12x12" in r["data_resampled"] and "repeated over 3" in r["data_resampled"]
    assert any("data: digits: samples [1, 8, 8] resized" in ln for ln in lines)
    for name in ("ftte", "fedbuff"):
        s = r["strategies"][name]
        assert s["tasks"] > 0 and s["merges"] > 0 and 0.0 <= s["final_accuracy"] <= 1.0
    # the subset names layers as the ONNX file does (sanitised node names)
    names = [l.name for l in model.layers if l.has_params]
    chosen = r["strategies"]["ftte"]["subset"]
    assert chosen and all(part.split(":")[0] in names for part in chosen.split("; "))
    assert r["strategies"]["fedbuff"]["trainable_params"] == model.num_params()


@pytest.mark.slow  # whole simulated fleets: skipped only under emulation (pi-check)
def test_cli_simulate_an_onnx_dag_file(tmp_path):
    pytest.importorskip("onnx", reason="no onnx wheels for 32-bit ARM")
    ok, why = dag_models.onnx_dag_import_works()
    if not ok:
        pytest.skip(why)
    path = tmp_path / "resnet.onnx"
    path.write_bytes(dag_models.to_onnx_bytes(dag_models.tiny_resnet((3, 10, 10), 10, seed=2)))
    out = tmp_path / "sim"
    res = CliRunner().invoke(hub_cli, ["simulate", "--model", str(path), "--clients", "4", "--max-versions", "2",
                                       "--buffer", "2", "--samples-per-device", "16", "--strategies", "ftte",
                                       "--pretrain-fraction", "0", "--memory-budget", "400KiB", "--out", str(out)])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["input_shape"] == [3, 10, 10] and "bilinear 8x8 -> 10x10" in results["data_resampled"]
    assert "block_conv" in results["strategies"]["ftte"]["subset"] or "fc_Gemm" in results["strategies"]["ftte"]["subset"]


def test_reference_shapes_agree_with_the_zoo():
    import importlib
    zoo_module = importlib.import_module("ftte_core.zoo")  # the package's `zoo` attribute is the function
    if not hasattr(zoo_module, "default_shape"):
        pytest.skip("this build's zoo has no default shapes (branch wip-zoo adds them)")
    for name, shape in REFERENCE_SHAPES.items():
        assert tuple(zoo_module.default_shape(name)[0]) == shape, name


@pytest.mark.slow  # whole simulated fleets: skipped only under emulation (pi-check)
@pytest.mark.parametrize("name", sorted(REFERENCE_SHAPES))
def test_cli_simulate_zoo_reference_models_when_the_zoo_has_them(tmp_path, name):
    if name not in zoo_names():
        pytest.skip(f"zoo model {name!r} is not in this build's zoo (branch wip-zoo adds it)")
    shape = {"resnet8": "3x16x16", "mobilenetv1": "3x32x32", "dscnn": "1x49x10", "autoencoder": "640",
             "sensor1d": "3x64"}[name]  # small shapes keep the test quick
    out = tmp_path / "sim"
    # fedbuff only: the subset search takes minutes on mobilenetv1 (the DAG test above covers ftte)
    res = CliRunner().invoke(hub_cli, ["simulate", "--model", name, "--input-shape", shape, "--clients", "3",
                                       "--max-versions", "1", "--buffer", "2", "--samples-per-device", "8",
                                       "--strategies", "fedbuff", "--pretrain-fraction", "0", "--batch-size", "8",
                                       "--out", str(out)])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["input_shape"] == [int(d) for d in shape.split("x")]


def test_cli_simulate_refuses_bad_models_and_shapes_in_one_line(tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "sim")
    cases = [
        (["--model", "resnet9000"], "neither a zoo model"),
        (["--model", str(tmp_path / "missing.onnx")], "missing.onnx"),
        (["--input-shape", "3x"], "expected sizes joined by 'x'"),
        (["--input-shape", "1x2x3x4"], "1 to 3 positive sizes"),
        (["--model", "cnn", "--input-shape", "640"], "zoo model 'cnn' for input [640]"),
    ]
    for args, match in cases:
        res = runner.invoke(hub_cli, ["simulate", "--clients", "2", "--out", out] + args)
        assert res.exit_code == 2 and match in res.output and "Traceback" not in res.output, (args, res.output)
    pytest.importorskip("onnx")
    import ftte_core as ft
    path = tmp_path / "cnn.onnx"
    ft.save_onnx(ft.zoo("cnn", (1, 8, 8), 10), path)
    res = runner.invoke(hub_cli, ["simulate", "--model", str(path), "--input-shape", "3x16x16", "--out", out])
    assert res.exit_code == 2 and "fixes its own input shape" in res.output


@pytest.mark.slow  # whole simulated fleets: skipped only under emulation (pi-check)
def test_cli_simulate_an_onnx_chain_at_another_shape(tmp_path):
    """A CNN exported at 3x16x16 (a chain, importable on every branch): the digits are resized to it."""
    pytest.importorskip("onnx")
    import ftte_core as ft
    path = tmp_path / "cnn16.onnx"
    ft.save_onnx(ft.zoo("cnn", (3, 16, 16), 10, channels=(4, 8)), path)
    out = tmp_path / "sim"
    res = CliRunner().invoke(hub_cli, ["simulate", "--model", str(path), "--clients", "3", "--max-versions", "1",
                                       "--buffer", "2", "--samples-per-device", "8", "--strategies", "ftte",
                                       "--pretrain-fraction", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["input_shape"] == [3, 16, 16] and "repeated over 3" in results["data_resampled"]
    assert "resized to the model's input [3, 16, 16]" in res.output


def test_cli_resample_writes_data_at_a_models_shape(tmp_path):
    runner = CliRunner()
    out = tmp_path / "d.npz"
    res = runner.invoke(hub_cli, ["resample", "digits", "--shape", "3x12x12", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "bilinear 8x8 -> 12x12" in res.output
    ds = ftdata.load_npz(out)
    assert ds.feature_shape == (3, 12, 12) and len(ds) == len(ftdata.load_bundled("digits"))
    again = runner.invoke(hub_cli, ["resample", str(out), "--shape", "3x64", "--out", str(tmp_path / "s.npz")])
    assert again.exit_code == 0 and "each channel's 144 values, linear 144 -> 64" in again.output
    bad = runner.invoke(hub_cli, ["resample", str(tmp_path / "none.npz"), "--shape", "640", "--out", str(out)])
    assert bad.exit_code == 2 and "cannot read" in bad.output and "Traceback" not in bad.output


def test_train_says_how_to_resample_data_that_does_not_fit(tmp_path):
    pytest.importorskip("onnx")
    import ftte_core as ft
    from ftte_hub.train import TrainError, build_model
    path = tmp_path / "cnn16.onnx"
    ft.save_onnx(ft.zoo("cnn", (3, 16, 16), 10, channels=(4,)), path)
    val = ftdata.load_bundled("digits").subset(np.arange(20))
    with pytest.raises(TrainError, match=r"samples of shape \[1, 8, 8\] \(`ftte-hub resample DATA --shape 3x16x16"):
        build_model(str(path), val)
    fitted, _ = ftdata.resample_to_shape(val, (3, 16, 16))
    assert build_model(str(path), fitted).input_shape == (3, 16, 16)


def test_channels_last_models_get_channels_last_samples():
    """A Keras model via tf2onnx takes [H, W, C] and transposes it first: the digits follow."""
    from ftte_core.graph import Dense, Flatten, Model, Transpose
    from ftte_hub.simulate import channels_last
    digits = ftdata.load_bundled("digits").subset(np.arange(10))
    nhwc, how = ftdata.resample_to_shape(digits, (12, 12, 3), channels_last=True)
    nchw, _ = ftdata.resample_to_shape(digits, (3, 12, 12))
    np.testing.assert_array_equal(nhwc.x, nchw.x.transpose(0, 2, 3, 1))
    assert how.endswith("then channels moved last for the model's input [12, 12, 3]")
    keras_like = Model([Transpose("model_Transpose", (2, 0, 1)), Flatten("f"),
                        Dense("fc", np.ones((10, 432), np.float32))], (12, 12, 3))
    assert channels_last(keras_like)
    assert not channels_last(Model([Flatten("f"), Dense("fc", np.ones((10, 432), np.float32))], (3, 12, 12)))
    r = simulate(SimConfig(model=keras_like, strategies=("fedbuff",), seed=0, **TINY), log=lambda m: None)
    assert r["input_shape"] == [12, 12, 3] and "channels moved last" in r["data_resampled"]


@pytest.mark.slow  # whole simulated fleets: skipped only under emulation (pi-check)
def test_cli_simulate_gives_a_model_the_presets_cannot_hold_a_workable_budget(tmp_path):
    """DS-CNN's cheapest subset (605 KiB at batch 16 in one pass, 225 KiB in micro-batches of 2)
    does not fit a 192 KiB Pi Zero profile: the default run says so and searches under a quarter of
    full training instead; an explicit --memory-budget still refuses in one line."""
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps({"profiles": {"pi-zero-2w": {
        "flops_per_s": 1.5e9, "memory_budget": 196608, "down_bps": 1.5e6, "up_bps": 7.5e5, "latency_s": 0.008,
        "dropout_per_s": 0.0, "rejoin_s": 30.0, "weight": 1.0}}}))
    common = ["simulate", "--model", "dscnn", "--clients", "3", "--max-versions", "1", "--buffer", "2",
              "--samples-per-device", "16", "--strategies", "ftte", "--pretrain-fraction", "0", "--batch-size", "16",
              "--profiles", str(profiles)]
    res = CliRunner().invoke(hub_cli, common + ["--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "cannot train this model" in res.output and "--memory-budget sets it" in res.output
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["memory_budget_min"] > 192 * 1024
    res = CliRunner().invoke(hub_cli, common + ["--memory-budget", "128KiB", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "too small" in res.output and "Traceback" not in res.output, res.output
