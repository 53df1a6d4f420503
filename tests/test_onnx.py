"""ONNX import/export against onnxruntime.

Two references: onnxruntime (the ground truth for what an ONNX file means) and a float64 NumPy
forward of our own Model written here, so the importer's reading of each op is checked apart
from the C++ kernels; then ``model.predict`` (the kernels) is checked against onnxruntime too.
"""
import os
import pathlib

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ftte_core.graph import Dropout, Model  # noqa: E402
from ftte_core.onnx_io import OnnxImportError, load_model, save_onnx, to_onnx  # noqa: E402
from ftte_core.zoo import zoo  # noqa: E402

OPSET = 13


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------

def _windows(xp, kh, kw, sh, sw, oh, ow):
    """[N, C, oh, ow, kh*kw] view of every pooling/conv window of a padded input."""
    cols = [xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] for i in range(kh) for j in range(kw)]
    return np.stack(cols, axis=-1)


def _pad_for(layer_pad, k, s, size, out):
    """Explicit pads plus the extra tail a ceil_mode window may hang over (not part of the input)."""
    pt, pb = layer_pad
    need = (out - 1) * s + k - (size + pt + pb)
    return pt, pb, max(0, need)


def np_forward(model: Model, x: np.ndarray) -> np.ndarray:
    h = np.asarray(x, np.float64).reshape((x.shape[0],) + model.input_shape)
    for layer, s_in, s_out in zip(model.layers, model.shapes[:-1], model.shapes[1:]):
        k = layer.kind
        if k == "dense":
            h = h @ layer.weight.astype(np.float64).T + layer.bias
        elif k == "conv2d":
            w = layer.weight.astype(np.float64)
            oc, c, kh, kw = w.shape
            pt, pl, pb, pr = layer.padding
            xp = np.pad(h, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
            win = _windows(xp, kh, kw, *layer.stride, s_out[1], s_out[2])  # N C oh ow kh*kw
            h = np.einsum("ncxyk,ock->noxy", win, w.reshape(oc, c, kh * kw)) + layer.bias[None, :, None, None]
        elif k in ("maxpool2d", "avgpool2d"):
            (kh, kw), (sh, sw) = layer.kernel, layer.stride
            pt, pl, pb, pr = layer.padding
            _, hh, ww = s_in
            _, oh, ow = s_out
            _, _, eh = _pad_for((pt, pb), kh, sh, hh, oh)
            _, _, ew = _pad_for((pl, pr), kw, sw, ww, ow)
            pads = ((0, 0), (0, 0), (pt, pb + eh), (pl, pr + ew))
            if k == "maxpool2d":
                h = _windows(np.pad(h, pads, constant_values=-np.inf), kh, kw, sh, sw, oh, ow).max(-1)
            else:
                total = _windows(np.pad(h, pads), kh, kw, sh, sw, oh, ow).sum(-1)
                ones = np.ones((1, 1, hh, ww))
                if layer.count_include_pad:  # explicit pads count, the ceil-mode overhang does not
                    cnt = np.pad(np.pad(ones, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=1),
                                 ((0, 0), (0, 0), (0, eh), (0, ew)))
                else:
                    cnt = np.pad(ones, pads)
                h = total / _windows(cnt, kh, kw, sh, sw, oh, ow).sum(-1)
        elif k == "global_avgpool":
            h = h.mean(axis=(2, 3), keepdims=True)
        elif k == "relu":
            h = np.maximum(h, 0)
        elif k == "sigmoid":
            h = 1 / (1 + np.exp(-h))
        elif k == "tanh":
            h = np.tanh(h)
        elif k == "flatten":
            h = h.reshape(h.shape[0], -1)
        elif k == "dropout":
            pass
        else:
            raise AssertionError(k)
        assert h.shape[1:] == tuple(s_out), (layer, h.shape, s_out)
    return h


def run_ort(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# export of zoo models
# ------------------------------------------------------------------------------------------------

ZOO = [("mlp", (64,), {}), ("mlp", (784,), {"hidden": (128,)}), ("mlp", (1, 8, 8), {"hidden": (32,)}),
       ("cnn", (1, 8, 8), {}), ("cnn", (1, 28, 28), {}), ("cnn", (3, 32, 32), {"hidden": (24,)})]
ZOO_IDS = [f"{n}-{'x'.join(map(str, s))}" for n, s, _ in ZOO]


def _zoo_model(name, shape, opts, seed=3):
    m = zoo(name, shape, 10, seed=seed, **opts)
    # non-zero biases so the export of biases is actually tested
    rng = np.random.default_rng(seed)
    for layer in m.param_layers:
        layer.bias[:] = rng.normal(0, 0.1, layer.bias.shape)
    return m


@pytest.mark.parametrize("name,shape,opts", ZOO, ids=ZOO_IDS)
def test_zoo_export_matches_ort_and_reimports(tmp_path, name, shape, opts):
    m = _zoo_model(name, shape, opts)
    path = tmp_path / "m.onnx"
    save_onnx(m, path)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == OPSET
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "input" and out.name == "logits"
    assert inp.type.tensor_type.shape.dim[0].dim_param == "N"
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == list(shape)
    assert out.type.tensor_type.shape.dim[0].dim_param == "N"
    assert out.type.tensor_type.shape.dim[1].dim_value == 10
    assert {i.name for i in proto.graph.initializer} == {f"{k}" for k in m.state()}

    rng = np.random.default_rng(0)
    for batch in (1, 7):
        x = rng.normal(size=(batch,) + shape).astype(np.float32)
        got = run_ort(proto, x)
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, np_forward(m, x), atol=1e-4, rtol=1e-4)

    back = load_model(path)
    assert [l.name for l in back.layers] == [l.name for l in m.layers]
    assert [l.kind for l in back.layers] == [l.kind for l in m.layers]
    assert back.input_shape == m.input_shape and back.shapes == m.shapes
    for key, value in m.state().items():
        np.testing.assert_array_equal(back.state()[key], value)


@pytest.mark.parametrize("name,shape,opts", ZOO, ids=ZOO_IDS)
def test_zoo_predict_matches_ort(tmp_path, name, shape, opts):
    m = _zoo_model(name, shape, opts)
    save_onnx(m, tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    back = load_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    for batch in (1, 7):
        x = rng.normal(size=(batch,) + shape).astype(np.float32)
        ref = run_ort(proto, x)
        assert np.max(np.abs(m.predict(x) - ref)) <= 1e-4
        np.testing.assert_array_equal(back.predict(x), m.predict(x))


def test_export_writes_current_weights_and_skips_dropout(tmp_path):
    m = zoo("mlp", (12,), 4, hidden=(6,))
    m.layers.insert(2, Dropout("drop", 0.5))
    m = Model(m.layers, m.input_shape, name="withdrop")
    m.layer("fc1").weight *= 3.0
    m.layer("fc2").bias[:] = [1, 2, 3, 4]
    proto = to_onnx(m)
    assert "Dropout" not in [n.op_type for n in proto.graph.node]
    assert [n.op_type for n in proto.graph.node] == ["Gemm", "Relu", "Gemm"]
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    np.testing.assert_array_equal(inits["fc1.weight"], m.layer("fc1").weight)
    np.testing.assert_array_equal(inits["fc2.bias"], [1, 2, 3, 4])
    x = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
    np.testing.assert_allclose(run_ort(proto, x), np_forward(m, x), atol=1e-5)
    # a trailing dropout: the previous node must still produce "logits"
    m2 = Model(m.layers + [Dropout("drop_end", 0.2)], m.input_shape)
    proto2 = to_onnx(m2)
    assert proto2.graph.node[-1].output[0] == "logits"
    onnx.checker.check_model(proto2)


def test_export_pool_attributes_as_the_layer_has_them():
    from ftte_core.graph import AvgPool2d, Conv2d, Flatten, MaxPool2d
    rng = np.random.default_rng(0)
    layers = [Conv2d("c", rng.normal(size=(4, 2, 3, 2)).astype(np.float32), rng.normal(size=4),
                     stride=(2, 1), padding=(1, 0, 2, 1)),
              MaxPool2d("mp", (3, 2), (2, 1), (1, 0, 1, 1), ceil_mode=True),
              AvgPool2d("ap", (2, 2), (1, 2), (0, 1, 1, 0), ceil_mode=True, count_include_pad=True),
              Flatten("f")]
    shape = (2, 9, 7)
    s = shape
    for l in layers:
        s = l.out_shape(s)
    from ftte_core.graph import Dense
    layers.append(Dense("fc", rng.normal(size=(3, s[0])).astype(np.float32)))
    m = Model(layers, shape)
    proto = to_onnx(m)
    a = {n.name: {x.name: helper.get_attribute_value(x) for x in n.attribute} for n in proto.graph.node}
    assert a["c"]["strides"] == [2, 1] and a["c"]["pads"] == [1, 0, 2, 1] and a["c"]["kernel_shape"] == [3, 2]
    assert a["mp"] == {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 0, 1, 1], "ceil_mode": 1}
    assert a["ap"]["count_include_pad"] == 1 and a["ap"]["ceil_mode"] == 1 and a["ap"]["strides"] == [1, 2]
    back = load_model(proto)
    assert back.shapes == m.shapes
    for lb, lm in zip(back.layers, m.layers):
        assert vars(lb).keys() == vars(lm).keys()
        for k, v in vars(lm).items():
            if isinstance(v, np.ndarray):
                np.testing.assert_array_equal(getattr(lb, k), v)
            else:
                assert getattr(lb, k) == v, (lm.name, k)


def test_save_is_atomic_and_overwrites(tmp_path):
    m = zoo("mlp", (8,), 3, hidden=(4,))
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    save_onnx(m, str(path))
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]  # no temp files left behind
    assert load_model(path).state().keys() == m.state().keys()
    with pytest.raises(ValueError, match="opset"):
        save_onnx(m, path, opset=7)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]
    with pytest.raises(OSError):
        save_onnx(m, tmp_path / "no" / "such" / "dir.onnx")


def test_export_other_opsets_load_in_ort():
    m = zoo("cnn", (1, 8, 8), 5, seed=1)
    x = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    for opset in (11, 17):
        proto = to_onnx(m, opset=opset)
        assert proto.opset_import[0].version == opset
        np.testing.assert_allclose(run_ort(proto, x), np_forward(m, x), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# import of hand-built graphs
# ------------------------------------------------------------------------------------------------

def make_model(nodes, inits, in_shape, out_dim, out_name=None, batch="batch", opset=OPSET):
    out_name = out_name or nodes[-1].output[0]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *in_shape])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, out_dim])],
        initializer=[numpy_helper.from_array(np.asarray(v, dtype=v.dtype if isinstance(v, np.ndarray) else None), k)
                     for k, v in inits.items()])
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))


def _f(rng, *shape, scale=0.5):
    return rng.normal(0, scale, shape).astype(np.float32)


def _i64(*v):
    return np.array(v, np.int64)


def variant_gemm(rng):
    n = [helper.make_node("Gemm", ["x", "W1", "C1"], ["h1"], name="gemm_tb1", alpha=0.7, beta=1.3, transB=1),
         helper.make_node("Relu", ["h1"], ["h2"], name="act"),
         helper.make_node("Gemm", ["h2", "W2", "C2"], ["y"], name="gemm_tb0", alpha=1.5, beta=0.5, transB=0)]
    inits = {"W1": _f(rng, 9, 11), "C1": _f(rng, 9), "W2": _f(rng, 9, 5), "C2": _f(rng, 1, 5)}
    return make_model(n, inits, (11,), 5), ["gemm_tb1", "act", "gemm_tb0"]


def variant_matmul_add(rng):
    n = [helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
         helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
         helper.make_node("Tanh", ["a1"], ["t1"], name="tanh"),
         helper.make_node("MatMul", ["t1", "W2"], ["m2"], name="mm2"),
         helper.make_node("Add", ["b2", "m2"], ["a2"], name="add2"),  # bias first
         helper.make_node("Sigmoid", ["a2"], ["s2"], name=""),
         helper.make_node("MatMul", ["s2", "W3"], ["y"], name="mm3")]  # no bias
    inits = {"W1": _f(rng, 7, 6), "b1": _f(rng, 6), "W2": _f(rng, 6, 4), "b2": _f(rng, 1, 4), "W3": _f(rng, 4, 3)}
    return make_model(n, inits, (7,), 3), ["mm1", "tanh", "mm2", "sigmoid1", "mm3"]


def variant_conv_strided(rng):
    n = [helper.make_node("Conv", ["x", "K", "B"], ["c"], name="conv/0", kernel_shape=[3, 3], strides=[2, 2],
                          pads=[1, 0, 2, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Flatten", ["r"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "W", "C"], ["y"], name="fc", transB=1)]
    # (2, 9, 8) -> oh = (9+3-3)//2+1 = 5, ow = (8+1-3)//2+1 = 4
    inits = {"K": _f(rng, 4, 2, 3, 3), "B": _f(rng, 4), "W": _f(rng, 3, 4 * 5 * 4, scale=0.1), "C": _f(rng, 3)}
    return make_model(n, inits, (2, 9, 8), 3), ["conv_0", "relu", "flat", "fc"]


def _conv_same(rng, mode):
    n = [helper.make_node("Conv", ["x", "K"], ["c"], name="c", kernel_shape=[4, 3], strides=[2, 3], auto_pad=mode),
         helper.make_node("Sigmoid", ["c"], ["s"], name="s"),
         helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"),
         helper.make_node("Flatten", ["g"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "W", "C"], ["y"], name="fc", transB=1)]
    inits = {"K": _f(rng, 5, 3, 4, 3), "W": _f(rng, 4, 5, scale=2.0), "C": _f(rng, 4)}
    return make_model(n, inits, (3, 7, 8), 4), ["c", "s", "gap", "flat", "fc"]


def variant_conv_same_upper(rng):
    return _conv_same(rng, "SAME_UPPER")


def variant_conv_same_lower(rng):
    return _conv_same(rng, "SAME_LOWER")


def variant_maxpool_ceil(rng):
    n = [helper.make_node("Conv", ["x", "K", "B"], ["c"], name="c", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("MaxPool", ["c"], ["p"], name="mp", kernel_shape=[3, 3], strides=[2, 2],
                          pads=[1, 0, 0, 1], ceil_mode=1),
         helper.make_node("Reshape", ["p", "shape"], ["f"], name="rs"),
         helper.make_node("Gemm", ["f", "W", "C"], ["y"], name="fc", transB=1)]
    # (2, 8, 9) -> conv (3, 8, 9) -> pool: h = ceil((8+1-3)/2)+1 = 4, w = ceil((9+1-3)/2)+1 = 5
    inits = {"K": _f(rng, 3, 2, 3, 3), "B": _f(rng, 3), "shape": _i64(0, -1),
             "W": _f(rng, 6, 3 * 4 * 5, scale=0.2), "C": _f(rng, 6)}
    return make_model(n, inits, (2, 8, 9), 6), ["c", "mp", "rs", "fc"]


def _avgpool(rng, cip, ceil, pads):
    n = [helper.make_node("AveragePool", ["x"], ["p"], name="ap", kernel_shape=[3, 2], strides=[2, 2],
                          pads=pads, count_include_pad=cip, ceil_mode=ceil),
         helper.make_node("Flatten", ["p"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "W", "C"], ["y"], name="fc", transB=1)]
    shape = (2, 7, 6)
    hh = (7 + pads[0] + pads[2] - 3)
    ww = (6 + pads[1] + pads[3] - 2)
    oh = (-(-hh // 2) if ceil else hh // 2) + 1
    ow = (-(-ww // 2) if ceil else ww // 2) + 1
    if ceil and (oh - 1) * 2 >= 7 + pads[0]:
        oh -= 1
    if ceil and (ow - 1) * 2 >= 6 + pads[1]:
        ow -= 1
    inits = {"W": _f(rng, 3, 2 * oh * ow), "C": _f(rng, 3)}
    return make_model(n, inits, shape, 3), ["ap", "flat", "fc"]


def variant_avgpool_cip0_ceil(rng):
    return _avgpool(rng, 0, 1, [1, 1, 0, 1])


def variant_avgpool_cip1(rng):
    return _avgpool(rng, 1, 0, [1, 1, 1, 0])


def variant_avgpool_cip0(rng):
    return _avgpool(rng, 0, 0, [1, 0, 1, 1])


def variant_avgpool_cip1_ceil(rng):
    return _avgpool(rng, 1, 1, [0, 1, 1, 0])

def variant_dropout_identity_softmax(rng):
    n = [helper.make_node("Constant", [], ["ratio"], value=numpy_helper.from_array(np.array(0.3, np.float32))),
         helper.make_node("Gemm", ["x", "W1", "C1"], ["h"], name="fc1", transB=1),
         helper.make_node("Dropout", ["h", "ratio"], ["d"], name="drop"),
         helper.make_node("Identity", ["d"], ["i"], name="id"),
         helper.make_node("Tanh", ["i"], ["t"], name="tanh"),
         helper.make_node("Constant", [], ["shape"], value_ints=[-1, 8]),
         helper.make_node("Reshape", ["t", "shape"], ["r"], name="rs"),
         helper.make_node("Gemm", ["r", "W2"], ["z"], name="fc2", transB=1),
         helper.make_node("Softmax", ["z"], ["y"], name="sm", axis=-1)]
    inits = {"W1": _f(rng, 8, 10), "C1": _f(rng, 8), "W2": _f(rng, 6, 8, scale=1.5)}
    return make_model(n, inits, (10,), 6), ["fc1", "drop", "tanh", "rs", "fc2"]


def variant_gemm_then_add_reshape_nf(rng):
    # Gemm without C followed by a bias Add; Reshape to a fixed [N, F] (a batch-1 export)
    n = [helper.make_node("Reshape", ["x", "shape"], ["f"], name="rs"),
         helper.make_node("Gemm", ["f", "W"], ["g"], name="fc", transB=1),
         helper.make_node("Add", ["g", "b"], ["y"], name="bias")]
    inits = {"shape": _i64(1, 12), "W": _f(rng, 5, 12), "b": _f(rng, 5)}
    return make_model(n, inits, (3, 2, 2), 5, batch=1), ["rs", "fc"]


VARIANTS = [v for k, v in sorted(globals().items()) if k.startswith("variant_")]
VARIANT_IDS = [v.__name__[len("variant_"):] for v in VARIANTS]


def _check_variant_against_ort(variant, use_kernels):
    rng = np.random.default_rng(7)
    proto, names = variant(rng)
    onnx.checker.check_model(proto, full_check=True)
    m = load_model(proto.SerializeToString())
    assert [l.name for l in m.layers] == names
    in_shape = tuple(d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:])
    assert m.input_shape == in_shape
    fixed_batch = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    for batch in ([fixed_batch] if fixed_batch else [1, 5]):
        x = rng.normal(size=(batch,) + in_shape).astype(np.float32)
        ref = run_ort(proto, x)
        ours = m.predict(x) if use_kernels else np_forward(m, x)
        if proto.graph.node[-1].op_type == "Softmax":
            ours = softmax(np.asarray(ours, np.float64))
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    return m


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_import_matches_ort_numpy_reference(variant):
    _check_variant_against_ort(variant, use_kernels=False)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_import_matches_ort_kernels(variant):
    m = _check_variant_against_ort(variant, use_kernels=True)
    # and a round trip through our own export keeps the numbers
    again = load_model(to_onnx(m))
    x = np.random.default_rng(2).normal(size=(1,) + m.input_shape).astype(np.float32)
    np.testing.assert_array_equal(again.predict(x), m.predict(x))


def test_import_details():
    rng = np.random.default_rng(0)
    proto, _ = variant_gemm(rng)
    W1 = numpy_helper.to_array(proto.graph.initializer[0])
    m = load_model(proto)
    np.testing.assert_allclose(m.layer("gemm_tb1").weight, 0.7 * W1, rtol=1e-6)
    assert m.layer("gemm_tb0").weight.shape == (5, 9)  # transB=0 -> transposed to [out, in]
    proto, _ = variant_dropout_identity_softmax(rng)
    m = load_model(proto)
    assert m.layer("drop").p == pytest.approx(0.3)
    assert m.num_classes == 6
    proto, _ = variant_conv_same_upper(rng)
    assert load_model(proto).layer("c").padding == (1, 0, 2, 1)  # H 7/2 -> 4: pad 3 = 1+2; W 8/3 -> 3: pad 1 = 0+1
    proto, _ = variant_conv_same_lower(rng)
    assert load_model(proto).layer("c").padding == (2, 1, 1, 0)


def test_import_sources(tmp_path):
    proto, _ = variant_gemm(np.random.default_rng(0))
    path = tmp_path / "g.onnx"
    onnx.save(proto, str(path))
    for src in (proto, proto.SerializeToString(), str(path), path, pathlib.PurePath(path)):
        assert [l.kind for l in load_model(src).layers] == ["dense", "relu", "dense"]


def test_layer_names_sanitised_unique_and_generated():
    rng = np.random.default_rng(0)
    n = [helper.make_node("Relu", ["x"], ["a"], name="block.1/relu:0"),
         helper.make_node("Relu", ["a"], ["b"], name="block.1/relu:0"),
         helper.make_node("Sigmoid", ["b"], ["c"]),
         helper.make_node("Sigmoid", ["c"], ["d"]),
         helper.make_node("Gemm", ["d", "W"], ["y"], name="!!!", transB=1)]
    m = load_model(make_model(n, {"W": _f(rng, 2, 4)}, (4,), 2))
    assert [l.name for l in m.layers] == ["block.1_relu_0", "block.1_relu_0_2", "sigmoid1", "sigmoid2", "gemm1"]
    # state keys are "<layer>.<weight|bias>": the part after the last dot
    assert {k.rsplit(".", 1)[1] for k in m.state()} == {"weight", "bias"}


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------

def _dense_tail(rng, feat, out=3):
    return [helper.make_node("Gemm", ["h", "Wt", "Ct"], ["y"], name="tail", transB=1)], \
        {"Wt": _f(rng, out, feat), "Ct": _f(rng, out)}


def test_unsupported_op_names_op_and_node():
    rng = np.random.default_rng(0)
    tail, inits = _dense_tail(rng, 4)
    proto = make_model([helper.make_node("LSTM", ["x"], ["h"], name="lstm_1")] + tail, inits, (4,), 3)
    with pytest.raises(OnnxImportError, match=r"unsupported ONNX op 'LSTM' at node 'lstm_1'"):
        load_model(proto)
    proto = make_model([helper.make_node("Elu", ["x"], ["h"])] + tail, inits, (4,), 3)
    with pytest.raises(OnnxImportError, match=r"'Elu' at node '#0"):
        load_model(proto)
    proto = make_model([helper.make_node("Gelu", ["x"], ["h"], name="g", domain="com.microsoft")] + tail,
                       inits, (4,), 3)
    with pytest.raises(OnnxImportError, match=r"com.microsoft.Gelu' at node 'g'"):
        load_model(proto)
    assert issubclass(OnnxImportError, ValueError)


def test_conv_bad_group_and_dilation_rejected():
    rng = np.random.default_rng(0)
    tail, inits = _dense_tail(rng, 6 * 6 * 6)
    # group 3 does not divide the 2 input channels (group 2 is fine: tests/test_onnx_dag.py)
    conv = helper.make_node("Conv", ["x", "K"], ["c"], name="grouped", group=3, kernel_shape=[3, 3])
    flat = helper.make_node("Flatten", ["c"], ["h"], name="f")
    proto = make_model([conv, flat] + tail, dict(inits, K=_f(rng, 6, 1, 3, 3)), (2, 8, 8), 3)
    with pytest.raises(OnnxImportError, match=r"group=3.*at node 'grouped'"):
        load_model(proto)
    conv = helper.make_node("Conv", ["x", "K"], ["c"], name="dil", dilations=[2, 2])
    tail, inits = _dense_tail(rng, 4 * 4 * 4)
    proto = make_model([conv, flat] + tail, dict(inits, K=_f(rng, 4, 2, 3, 3)), (2, 8, 8), 3)
    with pytest.raises(OnnxImportError, match=r"dilations.*at node 'dil'"):
        load_model(proto)


def test_graph_shapes_the_engine_cannot_take():
    """The graph may branch and join (tests/test_onnx_dag.py); these are still refused."""
    rng = np.random.default_rng(0)
    tail, inits = _dense_tail(rng, 4)
    # a weight that is computed, not constant (x @ x^T style)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="r"),
             helper.make_node("MatMul", ["r", "r"], ["h"], name="mm")] + tail
    with pytest.raises(OnnxImportError, match=r"MatMul weight 'r' must be an initializer or Constant at node 'mm'"):
        load_model(make_model(nodes, inits, (4,), 3))
    # two data inputs
    proto = make_model([helper.make_node("Relu", ["x"], ["h"], name="r")] + tail, inits, (4,), 3)
    proto.graph.input.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 4]))
    with pytest.raises(OnnxImportError, match="exactly one data input"):
        load_model(proto)
    # a node reading a tensor nobody computes
    nodes = [helper.make_node("Add", ["x", "ghost"], ["h"], name="add")] + tail
    with pytest.raises(OnnxImportError, match=r"'ghost'.*at node 'add'"):
        load_model(make_model(nodes, inits, (4,), 3))
    # the output is a constant, not computed from the input
    nodes = [helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.ones((1, 3), np.float32)))]
    with pytest.raises(OnnxImportError, match="constant"):
        load_model(make_model(nodes, {}, (4,), 3))


def test_dead_nodes_are_dropped():
    rng = np.random.default_rng(0)
    tail, inits = _dense_tail(rng, 4)
    # x also feeds a dead end (even one of an unsupported op): it never reaches the output
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="r"),
             helper.make_node("Elu", ["x"], ["s"], name="side")] + tail
    assert [l.name for l in load_model(make_model(nodes, inits, (4,), 3)).layers] == ["r", "tail"]
    # the graph output is an inner tensor: the nodes after it are dead
    proto = make_model([helper.make_node("Relu", ["x"], ["h"], name="r")] + tail, inits, (4,), 4, out_name="h")
    m = load_model(proto)
    assert [l.name for l in m.layers] == ["r"] and m.num_classes == 4


def test_softmax_in_the_middle_rejected():
    rng = np.random.default_rng(0)
    tail, inits = _dense_tail(rng, 4)
    nodes = [helper.make_node("Softmax", ["x"], ["h"], name="early_softmax")] + tail
    with pytest.raises(OnnxImportError, match=r"early_softmax.*must be the last node"):
        load_model(make_model(nodes, inits, (4,), 3))


@pytest.mark.parametrize("shape", [(-1, 4, -1), (2, -1, 1), (-1, 5), (0, 7), (3, 4)])
def test_reshape_that_moves_the_batch_axis_rejected(shape):
    rng = np.random.default_rng(0)
    tail, inits = _dense_tail(rng, 12)
    nodes = [helper.make_node("Reshape", ["x", "s"], ["h"], name="rs")] + tail
    with pytest.raises(OnnxImportError, match=r"Reshape to .* at node 'rs'"):
        load_model(make_model(nodes, dict(inits, s=_i64(*shape)), (3, 4), 3))


def test_other_unsupported_attributes_rejected():
    rng = np.random.default_rng(0)
    tail, inits = _dense_tail(rng, 4)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], name="ta", transA=1)] + tail
    with pytest.raises(OnnxImportError, match=r"transA.*at node 'ta'"):
        load_model(make_model(nodes, dict(inits, W=_f(rng, 4, 4)), (4,), 3))
    tail, inits = _dense_tail(rng, 2 * 3 * 4)
    nodes = [helper.make_node("Flatten", ["x"], ["h"], name="f2", axis=2)] + tail
    with pytest.raises(OnnxImportError, match=r"axis 2.*at node 'f2'"):
        load_model(make_model(nodes, inits, (2, 3, 4), 3))
    tail, inits = _dense_tail(rng, 2 * 2 * 2)
    nodes = [helper.make_node("MaxPool", ["x"], ["p", "idx"], name="mpi", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["h"], name="f")] + tail
    with pytest.raises(OnnxImportError, match=r"indices.*at node 'mpi'"):
        load_model(make_model(nodes, inits, (2, 4, 4), 3))
    # a dense layer that does not fit its input
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], name="bad", transB=1)] + _dense_tail(rng, 4)[0]
    with pytest.raises(OnnxImportError, match=r"at node 'bad'"):
        load_model(make_model(nodes, dict(_dense_tail(rng, 4)[1], W=_f(rng, 4, 5)), (4,), 3))


def test_unreadable_inputs(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffthis is not a protobuf\x12\x99" * 10)
    with pytest.raises(OnnxImportError, match="junk.onnx"):
        load_model(junk)
    with pytest.raises(OnnxImportError, match="not a valid ONNX model"):
        load_model(b"\x08\x07garbage\xff\xff")
    with pytest.raises(OnnxImportError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(OnnxImportError, match="path, bytes or onnx.ModelProto"):
        load_model(42)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(OnnxImportError):
        load_model(empty)



def test_malformed_nodes_give_clear_errors():
    rng = np.random.default_rng(0)
    tail, inits = _dense_tail(rng, 4)
    nodes = [helper.make_node("Gemm", ["x"], ["h"], name="half")] + tail
    with pytest.raises(OnnxImportError, match=r"Gemm needs at least 2 inputs.*'half'"):
        load_model(make_model(nodes, inits, (4,), 3))
    tail, inits = _dense_tail(rng, 2 * 4 * 4)
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], name="mp0", kernel_shape=[2, 2], strides=[0, 1]),
             helper.make_node("Flatten", ["p"], ["h"], name="f")] + tail
    with pytest.raises(OnnxImportError, match=r"strides.*'mp0'"):
        load_model(make_model(nodes, inits, (2, 4, 4), 3))
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], name="big", kernel_shape=[9, 9]),
             helper.make_node("Flatten", ["p"], ["h"], name="f")] + tail
    with pytest.raises(OnnxImportError, match=r"larger than.*'big'"):
        load_model(make_model(nodes, inits, (2, 4, 4), 3))
    # the weight of a Gemm given as an int tensor
    tail, inits = _dense_tail(rng, 4)
    nodes = [helper.make_node("Gemm", ["x", "Wi"], ["h"], name="intw", transB=1)] + tail
    with pytest.raises(OnnxImportError, match=r"dtype int64.*'intw'"):
        load_model(make_model(nodes, dict(inits, Wi=np.ones((4, 4), np.int64)), (4,), 3))
    # a model that does not end in class scores
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    proto = make_model(nodes, {}, (2, 3, 3), 3)
    with pytest.raises(OnnxImportError, match="classifier"):
        load_model(proto)
    # a symbolic non-batch dim
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], {}, ("F",), 3)
    with pytest.raises(OnnxImportError, match="fixed sizes"):
        load_model(proto)


def test_external_data(tmp_path):
    src = zoo("mlp", (16,), 4, hidden=(8,))
    proto = to_onnx(src)
    path = tmp_path / "m.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    m = load_model(path)  # by path: the weights file next to it is read
    np.testing.assert_array_equal(m.layer("fc1").weight, src.layer("fc1").weight)
    with pytest.raises(OnnxImportError, match="external data"):
        load_model(path.read_bytes())  # bytes cannot say where their weights live
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(OnnxImportError, match="m.onnx"):
        load_model(path)


# ------------------------------------------------------------------------------------------------
# imported models train (issue 9, finding 11)
# ------------------------------------------------------------------------------------------------

def _assert_trainable(model):
    for key, arr in model.state().items():
        f = arr.flags
        assert arr.dtype == np.float32, key
        assert f.writeable and f.owndata and f.c_contiguous and f.aligned, (key, f)


@pytest.mark.parametrize("name,shape", [("cnn", (1, 8, 8)), ("mlp", (64,))])
def test_a_loaded_zoo_model_trains_and_its_weights_change(tmp_path, name, shape):
    import ftte_core as ft
    path = tmp_path / f"{name}.onnx"
    save_onnx(zoo(name, shape, 10, seed=1), path)
    model = load_model(path)
    _assert_trainable(model)
    before = {k: v.copy() for k, v in model.state().items()}
    subset = ft.Subset.of(model, {layer.name: {"rows": "all", "bias": True} for layer in model.param_layers})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96,) + shape).astype(np.float32)
    y = rng.integers(0, 10, 96)
    loss0, _ = model.evaluate(x, y)
    stats = ft.Trainer(model, subset, lr=0.05).train(x, y, epochs=2, batch_size=16)
    assert stats.steps == 12
    loss1, _ = model.evaluate(x, y)
    assert np.isfinite(loss1) and loss1 != loss0
    for key, arr in model.state().items():
        assert not np.array_equal(arr, before[key]), f"{key} did not change"


def test_weights_read_from_onnx_do_not_alias_the_proto(tmp_path):
    proto = to_onnx(zoo("cnn", (1, 8, 8), 10, seed=1))
    model = load_model(proto)
    model.layers[0].weight[...] = 0.0  # writing must not reach the proto's bytes
    again = load_model(proto)
    assert np.any(again.layers[0].weight != 0.0)
