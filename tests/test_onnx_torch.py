"""Real PyTorch exports (tests/data/make_torch_exports.py, PyTorch 2.13): they import, agree with
the logits PyTorch computed, train, and export back. torch itself is not needed."""
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
import ftte_core as ft  # noqa: E402
from ftte_core.onnx_io import load_model, to_onnx  # noqa: E402

DATA = Path(__file__).parent / "data"
IO = np.load(DATA / "torch_exports_io.npz", allow_pickle=False)


@pytest.mark.parametrize("name,batchnorms", [("torch_preserve_opset13.onnx", 4), ("torch_eval_opset17.onnx", 1)])
def test_a_real_torch_export_imports_trains_and_exports(name, batchnorms):
    model = load_model(DATA / name)
    # PRESERVE keeps every BatchNorm (and aliases equal initializers through Identity nodes, which
    # the import once refused); EVAL fuses those after a Conv, leaving the Linear's BatchNorm1d
    assert sum(layer.kind == "batchnorm" for layer in model.layers) == batchnorms
    np.testing.assert_allclose(model.predict(IO["x"]), IO["logits"], rtol=1e-5, atol=1e-6)
    # a subset named the way the file names its nodes: the block's depthwise conv and its batch norm
    names = {layer.name for layer in model.param_layers}
    spec = {"block_dw_Conv": {"rows": [0, 3, 5], "bias": True}, "fc_Gemm": {"rows": "all", "bias": True}}
    if batchnorms == 4:
        assert "block_b2_BatchNormalization" in names
        spec["block_b2_BatchNormalization"] = {"rows": "all", "bias": True}
    subset = ft.Subset.of(model, spec)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3, 16, 16)).astype(np.float32)
    y = rng.integers(0, 5, 16)
    frozen = model.layer("stem_Conv").weight.copy()
    tr = ft.Trainer(model, subset, lr=0.1)
    ft.set_num_threads(1)  # kernel scratch is predicted exactly at one thread (an upper bound on more)
    try:
        losses = [tr.step(x, y) for _ in range(15)]
    finally:
        ft.set_num_threads(0)
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(model.layer("stem_Conv").weight, frozen)
    assert tr.memory.as_dict() == ft.predict_memory(model, subset, batch_size=16, threads=1)
    again = load_model(to_onnx(model))
    np.testing.assert_array_equal(again.predict(x), model.predict(x))
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(to_onnx(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, model.predict(x), rtol=1e-4, atol=1e-5)
