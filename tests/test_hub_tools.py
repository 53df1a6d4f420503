"""`ftte-hub split`, `predict`, `evaluate` and the data-preparation examples of docs/data.md."""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import ftte_core as ft
from ftte_core import data as ftdata
from ftte_hub.cli import main as hub_cli
from slowdev import scaled

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return CliRunner().invoke(hub_cli, [str(a) for a in args])


def one_line_error(r, *needles):
    """Exit 2, one stderr line starting 'ftte-hub: error:' that contains each needle."""
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftte-hub: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in r.output


def tagged_data(path, n=240, classes=6, seed=0, num_classes=None):
    """x[:, 0] is the sample's index: a split's files can be traced back sample by sample."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5)).astype(np.float32)
    x[:, 0] = np.arange(n)
    y = rng.integers(0, classes, n).astype(np.int64)
    extra = {} if num_classes is None else {"num_classes": num_classes}
    np.savez(path, x=x, y=y, **extra)
    return x, y


def read_split(out):
    files = sorted(p.name for p in Path(out).iterdir() if p.suffix == ".npz")
    return {name: ftdata.load_npz(Path(out) / name) for name in files}


def check_partition(parts, x, y):
    """The files together hold every input sample exactly once, each with its own label."""
    ids = np.concatenate([p.x[:, 0] for p in parts.values()]).astype(np.int64)
    assert len(ids) == len(x) and np.array_equal(np.sort(ids), np.arange(len(x)))  # no loss, no duplicate
    for p in parts.values():
        i = p.x[:, 0].astype(np.int64)
        assert np.array_equal(p.x, x[i]) and np.array_equal(p.y, y[i])


# ----------------------------------------------------------------------------------------- split

@pytest.mark.parametrize("alpha", [None, 0.3])
def test_split_every_sample_once(tmp_path, alpha):
    x, y = tagged_data(tmp_path / "d.npz")
    extra = [] if alpha is None else ["--alpha", alpha]
    r = run("split", tmp_path / "d.npz", "--devices", 5, "--out", tmp_path / "s", *extra)
    assert r.exit_code == 0, r.output
    parts = read_split(tmp_path / "s")
    assert sorted(parts) == [f"device-{i}.npz" for i in range(5)] + ["val.npz"]
    check_partition(parts, x, y)
    assert len(parts["val.npz"]) == 48  # 20% of 240
    sizes = [len(parts[f"device-{i}.npz"]) for i in range(5)]
    assert min(sizes) >= 1
    if alpha is None:
        assert max(sizes) - min(sizes) <= 1
    # the table: one row per file plus the total, with per-class counts
    rows = {ln.split()[0]: ln.split()[1:] for ln in r.stdout.splitlines()[1:]}
    assert int(rows["total"][0]) == 240 and int(rows["val.npz"][0]) == 48
    for i in range(5):
        counts = np.bincount(parts[f"device-{i}.npz"].y, minlength=6)
        assert [int(v) for v in rows[f"device-{i}.npz"][2:]] == counts.tolist()


def test_split_dirichlet_skews_and_is_reproducible(tmp_path):
    tagged_data(tmp_path / "d.npz", n=600)
    for out, seed in (("a", 3), ("b", 3), ("c", 4)):
        r = run("split", tmp_path / "d.npz", "--devices", 4, "--alpha", 0.1, "--seed", seed, "--out", tmp_path / out)
        assert r.exit_code == 0, r.output
    a, b, c = (read_split(tmp_path / o) for o in "abc")
    assert all(np.array_equal(a[k].x, b[k].x) for k in a)
    assert any(len(a[k]) != len(c[k]) or not np.array_equal(a[k].x, c[k].x) for k in a)
    # alpha 0.1: some device misses a class or holds a very unequal mix
    hist = np.stack([np.bincount(a[f"device-{i}.npz"].y, minlength=6) for i in range(4)])
    shares = hist / hist.sum(axis=1, keepdims=True)
    assert shares.max() > 0.5 or (hist == 0).any()


def test_split_bundled_digits_and_val_zero(tmp_path):
    r = run("split", "digits", "--devices", 3, "--val", 0, "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    parts = read_split(tmp_path / "s")
    assert sorted(parts) == ["device-0.npz", "device-1.npz", "device-2.npz"]
    digits = ftdata.load_bundled("digits")
    got = np.concatenate([np.concatenate([p.x.reshape(len(p), -1), p.y[:, None]], axis=1) for p in parts.values()])
    want = np.concatenate([digits.x.reshape(len(digits), -1), digits.y[:, None]], axis=1)
    # the same multiset of (sample, label) rows
    assert np.array_equal(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])])


def test_split_keeps_image_bytes(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (50, 1, 4, 4), dtype=np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(50), 255  # unique samples, and a full-scale byte
    y = rng.integers(0, 3, 50)
    np.savez(tmp_path / "img.npz", x=x, y=y)
    assert run("split", tmp_path / "img.npz", "--devices", 3, "--out", tmp_path / "s").exit_code == 0
    got_x, got_y = [], []
    for p in sorted((tmp_path / "s").iterdir()):
        with np.load(p, allow_pickle=False) as f:
            assert f["x"].dtype == np.uint8 and f["y"].dtype == np.int32
            got_x.append(f["x"])
            got_y.append(f["y"])
    got_x, got_y = np.concatenate(got_x), np.concatenate(got_y)
    order = np.argsort(got_x[:, 0, 0, 0])
    assert np.array_equal(got_x[order], x) and np.array_equal(got_y[order], y)


def test_split_keeps_num_classes(tmp_path):
    tagged_data(tmp_path / "d.npz", classes=3, num_classes=12)
    r = run("split", tmp_path / "d.npz", "--devices", 2, "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    assert all(p.num_classes == 12 for p in read_split(tmp_path / "s").values())
    assert "most frequent" in r.stdout.splitlines()[0]  # 12 classes: top-k summary, not 12 columns


def test_split_force_replaces_and_removes_extra_shards(tmp_path):
    x, y = tagged_data(tmp_path / "d.npz")
    assert run("split", tmp_path / "d.npz", "--devices", 6, "--out", tmp_path / "s").exit_code == 0
    (tmp_path / "s" / "notes.txt").write_text("mine")
    one_line_error(run("split", tmp_path / "d.npz", "--devices", 2, "--out", tmp_path / "s"), "not empty", "--force")
    r = run("split", tmp_path / "d.npz", "--devices", 2, "--val", 0, "--out", tmp_path / "s", "--force")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path / "s")) == ["device-0.npz", "device-1.npz", "notes.txt"]
    check_partition(read_split(tmp_path / "s"), x, y)


def test_split_refuses_bad_input(tmp_path):
    tagged_data(tmp_path / "d.npz", n=20)
    d, out = tmp_path / "d.npz", tmp_path / "s"
    one_line_error(run("split", d, "--devices", 0, "--out", out), "--devices")
    one_line_error(run("split", d, "--devices", 21, "--out", out), "21 devices", "20 samples")
    one_line_error(run("split", d, "--devices", 20, "--out", out), "--val")  # 20 devices, but 4 samples kept back
    one_line_error(run("split", d, "--devices", 2, "--alpha", 0, "--out", out), "--alpha")
    one_line_error(run("split", d, "--devices", 2, "--alpha", -1, "--out", out), "--alpha")
    one_line_error(run("split", d, "--devices", 2, "--val", 1, "--out", out), "--val")
    one_line_error(run("split", d, "--devices", 2, "--val", -0.1, "--out", out), "--val")
    one_line_error(run("split", tmp_path / "missing.npz", "--devices", 2, "--out", out), "does not exist")
    with open(tmp_path / "p.npz", "wb") as f:
        pickle.dump({"x": [1, 2], "y": [0, 1]}, f)
    one_line_error(run("split", tmp_path / "p.npz", "--devices", 2, "--out", out), "pickle")
    np.savez(tmp_path / "obj.npz", x=np.array([[1], "a"], dtype=object), y=np.array([0, 1]))
    one_line_error(run("split", tmp_path / "obj.npz", "--devices", 2, "--out", out), "pickle")
    (tmp_path / "file").write_text("x")
    one_line_error(run("split", d, "--devices", 2, "--out", tmp_path / "file"), "not a directory")
    assert not out.exists()  # nothing written by any refused call
    r = run("split", d, "--devices", 20, "--val", 0, "--out", out)  # one sample each is fine
    assert r.exit_code == 0 and len(os.listdir(out)) == 20


def test_split_help_shows_defaults():
    r = run("split", "--help")
    assert r.exit_code == 0 and "[default: 0.2]" in r.output and "--alpha" in r.output


# --------------------------------------------------------------------------------- predict/evaluate

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small MLP trained a little on the digits (better than chance), saved as a run folder would."""
    pytest.importorskip("onnx", reason="predict/evaluate read ONNX models (no onnx wheels for 32-bit ARM)")
    root = tmp_path_factory.mktemp("model")
    ds = ftdata.load_bundled("digits")
    model = ft.zoo("mlp", ds.feature_shape, ds.num_classes, seed=0)
    trainer = ft.Trainer(model, lr=0.1)
    for epoch in range(2):
        for xb, yb in ftdata.batches(ds, 32, seed=epoch):
            trainer.step(xb, yb)
    (root / "run").mkdir()
    ft.save_onnx(model, str(root / "run" / "model.onnx"))
    ftdata.save_npz(root / "val.npz", ds.subset(np.arange(300)))
    np.savez(root / "x_only.npz", x=ds.x[:50])
    return root, model, ds


def test_predict_writes_classes_and_logits(trained, tmp_path):
    root, model, ds = trained
    r = run("predict", "--model", root / "run", "--data", root / "x_only.npz", "--out", tmp_path / "p.npz")
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "p.npz", allow_pickle=False) as p:
        logits, classes = p["logits"], p["class"]
    want = model.predict(ds.x[:50])
    assert logits.shape == (50, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(classes, np.argmax(logits, axis=1))
    assert "50 samples predicted" in r.stdout and "accuracy" not in r.stdout  # no labels in the file


def test_predict_prints_first_rows_and_batches(trained):
    root, model, ds = trained
    r = run("predict", "--model", root / "run" / "model.onnx", "--data", root / "val.npz", "--show", 3,
            "--batch-size", 7)
    assert r.exit_code == 0, r.output
    rows = [ln for ln in r.stdout.splitlines() if re.match(r"\s+\d+\s+\d+\s+[\d.]+\s+\d+\s", ln)]
    pred = np.argmax(model.predict(ds.x[:3]), axis=1)
    assert [int(ln.split()[1]) for ln in rows] == pred.tolist()
    assert "accuracy against the file's labels" in r.stdout and "297 more" in r.stdout


def test_evaluate_json_and_table(trained):
    root, model, ds = trained
    r = run("evaluate", "--model", root / "run", "--data", root / "val.npz", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    loss, acc = model.evaluate(ds.x[:300], ds.y[:300])
    assert out["samples"] == 300 and abs(out["accuracy"] - acc) < 1e-9 and abs(out["loss"] - loss) < 1e-4
    conf = np.array(out["confusion"])
    assert conf.shape == (10, 10) and conf.sum() == 300
    assert np.array_equal(conf.sum(axis=1), np.bincount(ds.y[:300], minlength=10))
    assert np.trace(conf) == round(acc * 300)
    for k in range(10):
        assert out["recall"][k] == pytest.approx(conf[k, k] / conf[k].sum())
        assert out["support"][k] == conf[k].sum()
    text = run("evaluate", "--model", root / "run", "--data", root / "val.npz")
    assert text.exit_code == 0 and f"accuracy {acc:.4f}" in text.stdout and "confusion" in text.stdout


def test_evaluate_and_predict_refuse_bad_input(trained, tmp_path):
    root, model, ds = trained
    np.savez(tmp_path / "wide.npz", x=np.zeros((4, 3, 5, 5), np.float32), y=np.zeros(4, np.int64))
    for cmd in ("evaluate", "predict"):
        one_line_error(run(cmd, "--model", root / "run", "--data", tmp_path / "wide.npz"),
                       "ftte-hub resample", "--shape 1x8x8")
    np.savez(tmp_path / "labels.npz", x=ds.x[:5], y=np.array([0, 1, 2, 3, 12]))
    one_line_error(run("evaluate", "--model", root / "run", "--data", tmp_path / "labels.npz"), "labels >= 10")
    r = run("predict", "--model", root / "run", "--data", tmp_path / "labels.npz")
    assert r.exit_code == 0 and "labels ignored" in r.stdout and "accuracy" not in r.stdout
    one_line_error(run("evaluate", "--model", tmp_path, "--data", root / "val.npz"), "model.onnx")
    one_line_error(run("evaluate", "--model", tmp_path / "none.onnx", "--data", root / "val.npz"), "does not exist")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    one_line_error(run("predict", "--model", tmp_path / "bad.onnx", "--data", root / "val.npz"), "bad.onnx")
    one_line_error(run("evaluate", "--model", root / "run", "--data", root / "x_only.npz"), "'y'")
    # same number of values as the model's input: reshaped, not refused (8x8 images into [64])
    np.savez(tmp_path / "flat.npz", x=ds.x[:4].reshape(4, 64), y=ds.y[:4])
    assert run("evaluate", "--model", root / "run", "--data", tmp_path / "flat.npz").exit_code == 0


# -------------------------------------------------------------------------------------- docs/data.md

def doc_block(marker: str) -> str:
    text = (ROOT / "docs" / "data.md").read_text()
    after = text[text.index(marker):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_docs_csv_example_works_and_splits(tmp_path, monkeypatch):
    (tmp_path / "readings.csv").write_text(
        "ax,ay,az,activity\n" + "".join(f"{i * 0.1:.2f},{-i * 0.2:.2f},{i % 3},{['walking', 'resting', 'running'][i % 3]}\n"
                                        for i in range(30)))
    monkeypatch.chdir(tmp_path)
    exec(compile(doc_block("csv-example"), "docs/data.md", "exec"), {})
    ds = ftdata.load_npz(tmp_path / "readings.npz")
    assert ds.x.shape == (30, 3) and ds.num_classes == 3
    assert ds.y.tolist() == [[2, 0, 1][i % 3] for i in range(30)]  # sorted names: resting, running, walking
    r = run("split", "readings.npz", "--devices", 3, "--out", "shards")
    assert r.exit_code == 0, r.output
    assert sum(len(p) for p in read_split(tmp_path / "shards").values()) == 30


class _FakeImage:
    """The little of Pillow's Image the example uses (open, convert, resize, the array protocol),
    reading .npy bytes saved under image names: the example's own logic still runs where Pillow is
    not installed."""

    def __init__(self, pixels):
        self.pixels = pixels

    @classmethod
    def open(cls, path):
        return cls(np.load(path, allow_pickle=False))

    def convert(self, mode):
        assert mode in ("RGB", "L")
        return self if mode == "RGB" else _FakeImage(self.pixels.mean(axis=2).astype(np.uint8))

    def resize(self, size):
        w, h = size  # Pillow's order: (width, height); nearest neighbour is enough here
        rows = np.arange(h) * self.pixels.shape[0] // h
        cols = np.arange(w) * self.pixels.shape[1] // w
        return _FakeImage(self.pixels[rows][:, cols])

    def __array__(self, dtype=None, copy=None):
        return self.pixels if dtype is None else self.pixels.astype(dtype)


def test_docs_image_example_works(tmp_path, monkeypatch):
    try:
        from PIL import Image
        save = lambda pixels, path: Image.fromarray(pixels).save(path)  # noqa: E731
    except ImportError:
        import sys
        import types
        pil = types.ModuleType("PIL")
        pil.Image = _FakeImage
        monkeypatch.setitem(sys.modules, "PIL", pil)
        save = lambda pixels, path: np.save(open(path, "wb"), pixels)  # noqa: E731
    for k, name in enumerate(["cat", "dog"]):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(3):
            pixels = np.zeros((10, 12, 3), np.uint8)
            pixels[..., 0], pixels[..., 2] = 40 * k + i, 200
            save(pixels, tmp_path / "photos" / name / f"{i}.png")
        (tmp_path / "photos" / name / "notes.txt").write_text("not an image")
    monkeypatch.chdir(tmp_path)
    exec(compile(doc_block("## From a folder of images"), "docs/data.md", "exec"), {})
    ds = ftdata.load_npz(tmp_path / "photos.npz")
    assert ds.x.shape == (6, 3, 32, 32) and ds.y.tolist() == [0, 0, 0, 1, 1, 1] and ds.num_classes == 2
    np.testing.assert_allclose(ds.x[4, 0], 41 / 255, rtol=1e-6)  # channel 0 (red) of dog/1.png, scaled
    np.testing.assert_allclose(ds.x[4, 2], 200 / 255, rtol=1e-6)


def test_shape_error_suggests_channels_last_for_nhwc_models():
    from ftte_hub.tools import ToolError, fit_input

    class Nhwc:  # an input [H, W, C] as a Keras model through tf2onnx takes
        input_shape = (32, 32, 3)

        def check_input(self, x):
            raise ValueError("shape")

    with pytest.raises(ToolError, match="--shape 32x32x3 --channels-last --out"):
        fit_input(Nhwc(), np.zeros((2, 1, 8, 8), np.float32), "digits")


def test_evaluate_many_classes_lists_top_confusions(tmp_path):
    pytest.importorskip("onnx", reason="evaluate reads ONNX models (no onnx wheels for 32-bit ARM)")
    model = ft.zoo("mlp", (6,), 25, seed=0)
    ft.save_onnx(model, str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((80, 6)).astype(np.float32), y=rng.integers(0, 25, 80))
    r = run("evaluate", "--model", tmp_path / "m.onnx", "--data", tmp_path / "d.npz")
    assert r.exit_code == 0, r.output
    assert "most frequent confusions" in r.stdout and "rows: true class" not in r.stdout
    assert len(json.loads(run("evaluate", "--model", tmp_path / "m.onnx", "--data", tmp_path / "d.npz",
                              "--json").stdout)["confusion"]) == 25


def test_real_process_exit_code_and_one_line(tmp_path):
    import subprocess
    import sys

    # the installed package (or the caller's PYTHONPATH): src/ holds no compiled kernels in a clean clone
    p = subprocess.run([sys.executable, "-m", "ftte_hub.cli", "split", "digits", "--devices", "5000", "--out",
                        str(tmp_path / "s")], capture_output=True, text=True, timeout=scaled(120))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "5000 devices" in p.stderr, p.stderr
