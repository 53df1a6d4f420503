"""ONNX import/export of DAG-shaped graphs, built with onnx.helper the way torch.onnx.export and
tf2onnx write them (torch is not a test dependency).

Every graph goes the same way: import -> ``predict`` against onnxruntime on the original file ->
export -> onnx.checker -> onnxruntime on the exported file -> re-import predicts identically.
"""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ftte_core import _kernels as K  # noqa: E402
from ftte_core.onnx_io import OnnxImportError, load_model, to_onnx  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
# the new activation kernels land from another branch; the integrator removes this skip
needs_act = pytest.mark.skipif(not hasattr(K, "clip_forward"), reason="activation kernels (clip etc.) not built")


# ------------------------------------------------------------------------------------------------
# building graphs
# ------------------------------------------------------------------------------------------------

def _scope(module_name):
    """torch's node scope for a module: 'layer1.conv1' -> 'layer1/conv1' (initializers keep the dots)."""
    return module_name.replace(".", "/")


class G:
    """A graph under construction: torch-style node names ('/block/conv/Conv'), tensors named
    after their node, initializers named like state-dict keys."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], {}

    def w(self, name, *shape, scale=0.5):
        self.inits[name] = self.rng.normal(0, scale, shape).astype(np.float32)
        return name

    def c(self, name, value, dtype=np.float32):
        self.inits[name] = np.asarray(value, dtype)
        return name

    def op(self, op, inputs, name, **attrs):
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    def const_node(self, name, value, dtype=np.float32):
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node("Constant", [], [out], name=name,
                                           value=numpy_helper.from_array(np.asarray(value, dtype))))
        return out

    def conv(self, x, name, cin, cout, k, group=1, dims=2, **attrs):
        kshape = (k,) * dims
        w = self.w(f"{name}.weight", cout, cin // group, *kshape, scale=1.0 / np.sqrt(cin // group * k ** dims))
        b = self.w(f"{name}.bias", cout, scale=0.1)
        return self.op("Conv", [x, w, b], f"/{_scope(name)}/Conv", kernel_shape=list(kshape), group=group, **attrs)

    def bn(self, x, name, c, eps=1e-5):
        scale = self.c(f"{name}.weight", self.rng.uniform(0.5, 1.5, c))
        shift = self.c(f"{name}.bias", self.rng.normal(0, 0.1, c))
        mean = self.c(f"{name}.running_mean", self.rng.normal(0, 0.1, c))
        var = self.c(f"{name}.running_var", self.rng.uniform(0.5, 1.5, c))
        return self.op("BatchNormalization", [x, scale, shift, mean, var], f"/{_scope(name)}/BatchNormalization",
                       epsilon=eps, momentum=0.9)

    def gemm(self, x, name, fin, fout):
        w = self.w(f"{name}.weight", fout, fin, scale=1.0 / np.sqrt(fin))
        b = self.w(f"{name}.bias", fout, scale=0.1)
        return self.op("Gemm", [x, w, b], f"/{_scope(name)}/Gemm", alpha=1.0, beta=1.0, transB=1)

    def head(self, x, c, classes=5):
        """GlobalAveragePool -> Flatten -> Gemm, as torch writes adaptive_avg_pool + flatten + linear."""
        g = self.op("GlobalAveragePool", [x], "/pool/GlobalAveragePool")
        f = self.op("Flatten", [g], "/flatten/Flatten", axis=1)
        return self.gemm(f, "fc", c, classes)

    def model(self, in_shape, out, classes, opset=13, batch="batch_size", outputs=None):
        graph = helper.make_graph(
            self.nodes, "torch_jit",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *in_shape])],
            outputs or [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, classes])],
            initializer=[numpy_helper.from_array(v, k) for k, v in self.inits.items()])
        opsets = [helper.make_opsetid("", opset)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))


def run_ort(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def roundtrip(proto, batches=(1, 5), export_opsets=(None, 19), seed=1):
    """The whole check (export at the default opset and at 19, the newest the import is for);
    returns the imported model."""
    onnx.checker.check_model(proto, full_check=True)
    m = load_model(proto.SerializeToString())
    in_shape = tuple(d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:])
    assert m.input_shape == in_shape
    last_op = proto.graph.node[-1].op_type
    rng = np.random.default_rng(seed)
    for batch in batches:
        x = rng.normal(size=(batch,) + in_shape).astype(np.float32)
        ours = m.predict(x)
        ref = run_ort(proto, x)
        if last_op == "Softmax":
            ours = softmax(ours.astype(np.float64))
        elif last_op == "LogSoftmax":
            ours = np.log(softmax(ours.astype(np.float64)))
        np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)
        for opset in export_opsets:
            exported = to_onnx(m, opset)
            onnx.checker.check_model(exported, full_check=True)
            np.testing.assert_allclose(run_ort(exported, x), m.predict(x), rtol=RTOL, atol=ATOL)
            back = load_model(exported.SerializeToString())
            kept = [l for l in m.layers if l.kind != "dropout"]  # export drops Dropout (inference)
            assert [(l.name, l.kind) for l in back.layers] == [(l.name, l.kind) for l in kept]
            if len(kept) == len(m.layers):
                assert back.inputs == m.inputs and back.shapes == m.shapes
            np.testing.assert_array_equal(back.predict(x), m.predict(x))
    return m


# ------------------------------------------------------------------------------------------------
# exporter-shaped graphs
# ------------------------------------------------------------------------------------------------

def resnet_block(opset=13):
    """Conv-BN-ReLU-Conv-BN + shortcut, ReLU (ResNet-8's basic block, BN kept unfolded)."""
    g = G(0)
    h = g.op("Relu", [g.bn(g.conv("input", "conv1", 3, 8, 3, pads=[1] * 4), "bn1", 8)], "/relu/Relu")
    a = g.op("Relu", [g.bn(g.conv(h, "layer1.conv1", 8, 8, 3, pads=[1] * 4), "layer1.bn1", 8)], "/layer1/relu/Relu")
    b = g.bn(g.conv(a, "layer1.conv2", 8, 8, 3, pads=[1] * 4), "layer1.bn2", 8)
    s = g.op("Add", [b, h], "/layer1/Add")
    r = g.op("Relu", [s], "/layer1/relu_1/Relu")
    return g.model((3, 8, 8), g.head(r, 8), 5, opset=opset)


def test_residual_block():
    m = roundtrip(resnet_block())
    assert not m.is_chain
    add = m.index("layer1_Add")
    assert m.describe_inputs(add) == "layer1_bn2_BatchNormalization, relu_Relu"
    # a BatchNorm is a layer named after its node, with the file's statistics (not folded)
    bn = m.layer("layer1_bn1_BatchNormalization")
    assert bn.kind == "batchnorm" and bn.eps == pytest.approx(1e-5)
    assert set(m.state()) >= {"layer1_bn1_BatchNormalization.weight", "layer1_bn1_BatchNormalization.bias"}


def test_residual_model_trains_one_step():
    from ftte_core.trainer import Trainer
    m = load_model(resnet_block())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 5, 4).astype(np.int32)
    before = m.layer("conv1_Conv").weight.copy()
    loss = Trainer(m).step(x, y)
    assert np.isfinite(loss)
    assert not np.array_equal(before, m.layer("conv1_Conv").weight)
    # a subset that stops inside the residual block, by the names the file's nodes gave
    from ftte_core.subset import Subset
    bn = m.layer("layer1_bn2_BatchNormalization")
    scale, frozen = bn.weight.copy(), m.layer("layer1_conv1_Conv").weight.copy()
    subset = Subset.of(m, {"layer1_conv2_Conv": {"rows": 0.5, "bias": True},
                           "layer1_bn2_BatchNormalization": {"rows": "all", "bias": True},
                           "fc_Gemm": {"rows": "all", "bias": True}})
    assert np.isfinite(Trainer(m, subset).step(x, y))
    assert not np.array_equal(scale, bn.weight)
    np.testing.assert_array_equal(frozen, m.layer("layer1_conv1_Conv").weight)


def _relu6(g, x, name, bounds):
    if bounds == "constant_nodes":
        lo, hi = g.const_node(f"{name}/Constant", 0.0), g.const_node(f"{name}/Constant_1", 6.0)
    else:
        lo, hi = g.c(f"{name}.min", 0.0), g.c(f"{name}.max", 6.0)
    return g.op("Clip", [x, lo, hi], f"{name}/Clip")


@needs_act
@pytest.mark.parametrize("opset", [11, 13])
def test_depthwise_separable_with_relu6(opset):
    g = G(1)
    h = _relu6(g, g.bn(g.conv("input", "stem", 3, 8, 3, strides=[2, 2], pads=[1] * 4), "stem.bn", 8), "/stem/relu6",
               "constant_nodes")
    d = g.conv(h, "dw", 8, 8, 3, group=8, pads=[1] * 4)             # depthwise
    d = _relu6(g, g.bn(d, "dw.bn", 8), "/dw/relu6", "constant_nodes")
    p = _relu6(g, g.conv(d, "pw", 8, 16, 1), "/pw/relu6", "initializers")
    m2 = g.conv(p, "dw2", 16, 32, 3, group=16, pads=[0, 0, 1, 1])   # depthwise, channel multiplier 2
    gr = g.conv(m2, "grouped", 32, 16, 3, group=4, pads=[1] * 4)   # grouped
    m = roundtrip(g.model((3, 12, 12), g.head(gr, 16), 5, opset=opset), export_opsets=(None, 11, 19))
    assert m.layer("dw_Conv").mode == "depthwise" and m.layer("dw2_Conv").mode == "depthwise"
    assert m.layer("grouped_Conv").mode == "grouped" and m.layer("grouped_Conv").group == 4
    assert (m.layer("stem_relu6_Clip").lo, m.layer("stem_relu6_Clip").hi) == (0.0, 6.0)


@needs_act
def test_conv1d_net():
    """A 1-D sensor model on [N, 3, 128]: Conv1d, MaxPool1d, depthwise Conv1d, AvgPool1d, ReLU6
    from initializer bounds, GlobalAveragePool."""
    g = G(2)
    h = g.op("Relu", [g.bn(g.conv("input", "c1", 3, 8, 5, dims=1, pads=[2, 2]), "bn1", 8)], "/r1/Relu")
    h = g.op("MaxPool", [h], "/mp/MaxPool", kernel_shape=[2], strides=[2])
    h = g.conv(h, "dw", 8, 8, 3, group=8, dims=1, strides=[2], pads=[1, 1])
    h = _relu6(g, h, "/r2", "initializers")
    h = g.op("AveragePool", [h], "/ap/AveragePool", kernel_shape=[3], strides=[2], pads=[1, 1],
             count_include_pad=0, ceil_mode=1)
    m = roundtrip(g.model((3, 128), g.head(h, 8, 6), 6), export_opsets=(None, 17, 19))
    kinds = [l.kind for l in m.layers]
    assert kinds[:5] == ["conv1d", "batchnorm", "relu", "maxpool1d", "conv1d"]
    assert "avgpool1d" in kinds and "global_avgpool" in kinds
    assert m.shapes[m.index("pool_GlobalAveragePool") + 1] == (8, 1)


def test_gemm_batchnorm_relu():
    """The MLPerf anomaly-detection autoencoder's layer: Gemm -> BatchNormalization -> ReLU."""
    g = G(3)
    h = g.op("Relu", [g.bn(g.gemm("input", "enc.0", 40, 16), "enc.1", 16, eps=1e-3)], "/enc/2/Relu")
    h = g.op("Relu", [g.bn(g.gemm(h, "enc.3", 16, 8), "enc.4", 8)], "/enc/5/Relu")
    m = roundtrip(g.model((40,), g.gemm(h, "out", 8, 4), 4))
    assert [l.kind for l in m.layers] == ["dense", "batchnorm", "relu"] * 2 + ["dense"]
    assert m.layer("enc_1_BatchNormalization").eps == pytest.approx(1e-3)


def test_squeeze_excite_mul_by_channel_tensor():
    g = G(4)
    x = g.op("Relu", [g.conv("input", "c", 3, 8, 3, pads=[1] * 4)], "/r/Relu")
    s = g.op("GlobalAveragePool", [x], "/se/GlobalAveragePool")           # [N, 8, 1, 1]
    s = g.op("Relu", [g.conv(s, "se.fc1", 8, 4, 1)], "/se/Relu")
    s = g.op("Sigmoid", [g.conv(s, "se.fc2", 4, 8, 1)], "/se/Sigmoid")
    y = g.op("Mul", [s, x], "/se/Mul")  # the small operand first: it must come second in the layer
    m = roundtrip(g.model((3, 6, 6), g.head(y, 8, 3), 3))
    i = m.index("se_Mul")
    assert m.in_shapes(i) == [(8, 6, 6), (8, 1, 1)]


def test_silu():
    g = G(5)
    c = g.conv("input", "c", 2, 6, 3)
    y = g.op("Mul", [c, g.op("Sigmoid", [c], "/act/Sigmoid")], "/act/Mul")
    m = roundtrip(g.model((2, 7, 7), g.head(y, 6, 4), 4))
    assert [l.kind for l in m.layers][:3] == ["conv2d", "sigmoid", "mul"]


@pytest.mark.parametrize("axis", [1, -3])
def test_concat_of_two_branches(axis):
    g = G(6)
    x = g.op("Relu", [g.conv("input", "stem", 3, 4, 3, pads=[1] * 4)], "/stem/Relu")
    a = g.op("Relu", [g.conv(x, "b1", 4, 3, 1)], "/b1/Relu")
    b = g.op("MaxPool", [g.conv(x, "b2", 4, 5, 3, pads=[1] * 4)], "/b2/MaxPool", kernel_shape=[3, 3],
             pads=[1] * 4)
    y = g.op("Concat", [a, b, x], "/cat/Concat", axis=axis)
    m = roundtrip(g.model((3, 6, 6), g.head(y, 12, 3), 3))
    assert m.describe_inputs(m.index("cat_Concat")) == "b1_Relu, b2_MaxPool, stem_Relu"


@pytest.mark.parametrize("opset", [10, 11, 18])
def test_pad_before_conv(opset):
    g = G(7)
    pads = [0, 0, 1, 2, 0, 0, 2, 1]
    if opset < 11:
        p = g.op("Pad", ["input"], "/pad/Pad", mode="constant", pads=pads, value=0.5)
    elif opset < 18:
        p = g.op("Pad", ["input", g.const_node("/pad/Constant", pads, np.int64),
                         g.const_node("/pad/Constant_1", 0.5)], "/pad/Pad", mode="constant")
    else:  # opset 18: pads for the listed axes only
        p = g.op("Pad", ["input", g.c("pads", [1, 2, 2, 1], np.int64), g.c("value", 0.5),
                         g.c("axes", [2, -1], np.int64)], "/pad/Pad", mode="constant")
    m = roundtrip(g.model((2, 5, 5), g.head(g.conv(p, "c", 2, 3, 3), 3, 4), 4, opset=opset),
                  export_opsets=(None, 10, 19))
    pad = m.layer("pad_Pad")
    assert pad.pads == (0, 1, 2, 0, 2, 1) and pad.value == 0.5


@pytest.mark.parametrize("opset", [13, 18])
def test_reduce_mean_keepdims_0(opset):
    g = G(8)
    c = g.op("Relu", [g.conv("input", "c", 3, 6, 3)], "/r/Relu")
    if opset < 18:
        r = g.op("ReduceMean", [c], "/gap/ReduceMean", axes=[-2, -1], keepdims=0)
    else:
        r = g.op("ReduceMean", [c, g.c("axes", [2, 3], np.int64)], "/gap/ReduceMean", keepdims=0)
    m = roundtrip(g.model((3, 6, 6), g.gemm(r, "fc", 6, 3), 3, opset=opset), export_opsets=(None, 18, 19))
    assert m.layer("gap_ReduceMean").keepdims is False


def test_keras_nhwc_input_with_transpose():
    """tf2onnx: NHWC input, Transpose to NCHW, convs, ReduceMean, MatMul + Add, Softmax."""
    g = G(9)
    t = g.op("Transpose", ["input"], "model/conv2d/Conv2D__6", perm=[0, 3, 1, 2])
    c = g.op("Relu", [g.conv(t, "model/conv2d/Conv2D", 3, 6, 3, pads=[1] * 4)], "model/conv2d/Relu")
    r = g.op("ReduceMean", [c], "model/global_average_pooling2d/Mean", axes=[2, 3], keepdims=0)
    mm = g.op("MatMul", [r, g.w("model/dense/MatMul/ReadVariableOp:0", 6, 4)], "model/dense/MatMul")
    a = g.op("Add", [mm, g.w("model/dense/BiasAdd/ReadVariableOp:0", 4)], "model/dense/BiasAdd")
    y = g.op("Softmax", [a], "model/dense/Softmax", axis=-1)
    m = roundtrip(g.model((7, 5, 3), y, 4, batch="unk__12"))
    assert m.input_shape == (7, 5, 3)
    assert m.layers[0].kind == "transpose" and m.layers[0].perm == (2, 0, 1)
    assert [l.name for l in m.layers][-1] == "model_dense_MatMul"  # the bias Add folds into it


@pytest.mark.parametrize("opset", [11, 13])
def test_views_squeeze_unsqueeze_reshape(opset):
    g = G(10)
    c = g.conv("input", "c", 2, 4, 3, pads=[1] * 4)                              # [N, 4, 4, 6]
    r = g.op("Reshape", [c, g.c("shape", [0, 8, -1], np.int64)], "/view/Reshape")  # [N, 8, 12]
    c1 = g.conv(r, "c1", 8, 4, 3, dims=1)                                        # [N, 4, 10]
    if opset < 13:
        u = g.op("Unsqueeze", [c1], "/u/Unsqueeze", axes=[2])
    else:
        u = g.op("Unsqueeze", [c1, g.c("uaxes", [-2], np.int64)], "/u/Unsqueeze")  # [N, 4, 1, 10]
    p = g.op("GlobalAveragePool", [u], "/p/GlobalAveragePool")                  # [N, 4, 1, 1]
    if opset < 13:
        s = g.op("Squeeze", [p], "/s/Squeeze", axes=[2, 3])
    else:
        s = g.op("Squeeze", [p, g.c("saxes", [2, 3], np.int64)], "/s/Squeeze")   # [N, 4]
    m = roundtrip(g.model((2, 4, 6), g.gemm(s, "fc", 4, 3), 3, opset=opset))
    assert [m.shapes[m.index(n) + 1] for n in ("view_Reshape", "u_Unsqueeze", "s_Squeeze")] == \
        [(8, 12), (4, 1, 10), (4,)]


@needs_act
def test_activations_and_constants():
    """LeakyRelu, HardSigmoid, HardSwish (opset 14), Add/Sub/Mul with constants and tensors,
    Dropout, Identity, LogSoftmax at the end."""
    g = G(11)
    c = g.conv("input", "c", 3, 4, 3)
    a = g.op("LeakyRelu", [c], "/a/LeakyRelu", alpha=0.1)
    b = g.op("HardSigmoid", [c], "/b/HardSigmoid", alpha=0.25, beta=0.4)
    h = g.op("HardSwish", [c], "/h/HardSwish")
    d = g.op("Sub", [a, b], "/d/Sub")
    d = g.op("Sub", [d, g.op("GlobalAveragePool", [h], "/d/GlobalAveragePool")], "/d/Sub_1")  # [4,1,1] onto [4,H,W]
    e = g.op("Mul", [g.c("scale", g.rng.normal(size=(4, 1, 1))), d], "/e/Mul")  # per-channel constant first
    f = g.op("Sub", [g.c("one", 1.0), e], "/f/Sub")                               # constant - tensor
    k = g.op("Add", [f, g.c("shift", g.rng.normal(size=(1, 4, 1, 1)))], "/k/Add")  # with a batch axis of 1
    k = g.op("Identity", [g.op("Dropout", [k, g.c("ratio", 0.25)], "/drop/Dropout")], "/id/Identity")
    o = g.gemm(g.op("Flatten", [k], "/flat/Flatten"), "fc", 4 * 4 * 4, 5)
    y = g.op("LogSoftmax", [o], "/out/LogSoftmax", axis=1)
    m = roundtrip(g.model((3, 6, 6), y, 5, opset=14), export_opsets=(None, 17, 19))
    assert to_onnx(m).opset_import[0].version == 14  # the default rises to what HardSwish needs
    with pytest.raises(ValueError, match="opset 13 cannot hold layers of kind \\['hard_swish'\\]"):
        to_onnx(m, 13)
    f_layer = m.layer("f_Sub")
    assert f_layer.const_first and f_layer.kind == "sub"
    assert m.layer("drop_Dropout").p == 0.25


@needs_act
def test_clip_bounds_as_attributes_and_one_sided():
    g = G(12)
    x = g.op("Clip", ["input"], "/c1/Clip", min=-0.5, max=0.75)  # opset 10: attributes
    x = g.op("Relu", [x], "/r/Relu")
    m = roundtrip(g.model((6,), g.gemm(x, "fc", 6, 3), 3, opset=10), export_opsets=(None, 10, 19))
    assert (m.layer("c1_Clip").lo, m.layer("c1_Clip").hi) == (-0.5, 0.75)
    g = G(13)
    x = g.op("Clip", ["input", "", g.c("hi", 0.3)], "/c2/Clip")  # no min: unbounded below
    m = roundtrip(g.model((6,), g.gemm(x, "fc", 6, 3), 3, opset=13), export_opsets=(None, 10, 19))
    assert m.layer("c2_Clip").lo == -np.inf and m.layer("c2_Clip").hi == pytest.approx(0.3)


def test_gemm_trans_b_and_add_bias_fold():
    g = G(14)
    h = g.op("Gemm", ["input", g.w("W", 6, 5)], "/fc1/Gemm", transB=0, alpha=0.5)  # no C: the Add is its bias
    h = g.op("Add", [g.c("b", g.rng.normal(size=(1, 5))), h], "/fc1/Add")
    h = g.op("Mul", [g.op("Relu", [h], "/r/Relu"), g.c("s", g.rng.normal(size=5))], "/s/Mul")
    m = roundtrip(g.model((6,), g.gemm(h, "fc2", 5, 3), 3))
    assert [l.kind for l in m.layers] == ["dense", "relu", "mul", "dense"]
    assert m.layer("fc1_Gemm").weight.shape == (5, 6)
    # the Gemm's output read twice (once through an Identity): the Add is not its bias
    g = G(15)
    h = g.op("Gemm", ["input", g.w("W", 5, 6)], "/fc1/Gemm", transB=1)
    i = g.op("Identity", [h], "/id/Identity")
    a = g.op("Add", [i, g.c("b", g.rng.normal(size=5))], "/fc1/Add")
    y = g.op("Mul", [a, h], "/m/Mul")
    m = roundtrip(g.model((6,), g.gemm(y, "fc2", 5, 3), 3))
    assert [l.kind for l in m.layers] == ["dense", "add", "mul", "dense"]


@pytest.mark.parametrize("opset", [11, 13])
def test_torch_view_batch_minus_one(opset):
    """x.view(x.size(0), -1) with a dynamic batch: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    g = G(15)
    c = g.op("Relu", [g.conv("input", "c", 2, 3, 3)], "/r/Relu")
    shp = g.op("Shape", [c], "/Shape")
    n = g.op("Gather", [shp, g.const_node("/Constant", 0, np.int64)], "/Gather", axis=0)
    if opset < 13:
        u = g.op("Unsqueeze", [n], "/Unsqueeze", axes=[0])
    else:
        u = g.op("Unsqueeze", [n, g.const_node("/Constant_1", [0], np.int64)], "/Unsqueeze")
    cat = g.op("Concat", [u, g.const_node("/Constant_2", [-1], np.int64)], "/Concat", axis=0)
    f = g.op("Reshape", [c, cat], "/Reshape")
    m = roundtrip(g.model((2, 5, 5), g.gemm(f, "fc", 27, 4), 4, opset=opset))
    assert [l.kind for l in m.layers] == ["conv2d", "relu", "flatten", "dense"]


def test_keras_conv1d_channels_last_input():
    """tf2onnx on a Keras Conv1D model: [N, L, C] input, Transpose to [N, C, L], 1-D convs."""
    g = G(18)
    t = g.op("Transpose", ["input"], "model/conv1d/Conv1D__5", perm=[0, 2, 1])
    c = g.op("Relu", [g.conv(t, "model/conv1d/Conv1D", 3, 8, 5, dims=1, pads=[2, 2])], "model/conv1d/Relu")
    p = g.op("MaxPool", [c], "model/max_pooling1d/MaxPool", kernel_shape=[2], strides=[2])
    r = g.op("ReduceMean", [p], "model/global_average_pooling1d/Mean", axes=[2], keepdims=0)
    mm = g.op("MatMul", [r, g.w("model/dense/MatMul/ReadVariableOp:0", 8, 6)], "model/dense/MatMul")
    a = g.op("Add", [mm, g.w("model/dense/BiasAdd/ReadVariableOp:0", 6)], "model/dense/BiasAdd")
    m = roundtrip(g.model((64, 3), g.op("Softmax", [a], "model/dense/Softmax"), 6, batch="unk__7"))
    assert m.layers[0].kind == "transpose" and m.layers[0].perm == (1, 0)
    assert [l.kind for l in m.layers[1:]] == ["conv1d", "relu", "maxpool1d", "global_avgpool", "dense"]


def test_keras_dscnn_one_channel_input_and_flatten_transpose():
    """tf2onnx on a DS-CNN: [N, 49, 10, 1] input (its Transpose to NCHW only moves the size-1 channel
    axis: a reshape), and Transpose back to NHWC of a 1x1 map before Keras' Flatten."""
    g = G(16)
    t = g.op("Transpose", ["input"], "model/conv2d/Conv2D__5", perm=[0, 3, 1, 2])
    c = g.op("Relu", [g.bn(g.conv(t, "model/conv2d/Conv2D", 1, 8, 3, strides=[2, 2], pads=[1] * 4),
                           "model/batch_normalization/FusedBatchNormV3", 8, eps=1e-3)], "model/re_lu/Relu")
    d = g.op("Relu", [g.conv(c, "model/depthwise_conv2d/depthwise", 8, 8, 3, group=8, pads=[1] * 4)],
             "model/re_lu_1/Relu")
    p = g.op("AveragePool", [d], "model/average_pooling2d/AvgPool", kernel_shape=[25, 5], strides=[25, 5])
    back = g.op("Transpose", [p], "model/average_pooling2d/AvgPool__20", perm=[0, 2, 3, 1])
    f = g.op("Reshape", [back, g.c("const_fold_opt__30", [-1, 8], np.int64)], "model/flatten/Reshape")
    mm = g.op("MatMul", [f, g.w("model/dense/MatMul/ReadVariableOp:0", 8, 12)], "model/dense/MatMul")
    a = g.op("Add", [mm, g.w("model/dense/BiasAdd/ReadVariableOp:0", 12)], "model/dense/BiasAdd")
    y = g.op("Softmax", [a], "model/dense/Softmax")
    m = roundtrip(g.model((49, 10, 1), y, 12, batch="unk__30"))
    assert "transpose" not in [l.kind for l in m.layers]
    assert m.layer("model_depthwise_conv2d_depthwise_Conv").mode == "depthwise"


@needs_act
def test_hardswish_as_torch_writes_it_before_opset_14():
    """x * clip(x + 3, 0, 6) / 6: Add, Clip, Mul of two tensors, Div by a constant."""
    g = G(17)
    c = g.conv("input", "c", 2, 4, 3, pads=[1] * 4)
    a = g.op("Add", [c, g.const_node("/act/Constant", 3.0)], "/act/Add")
    k = g.op("Clip", [a, g.const_node("/act/Constant_1", 0.0), g.const_node("/act/Constant_2", 6.0)], "/act/Clip")
    h = g.op("Div", [g.op("Mul", [c, k], "/act/Mul"), g.const_node("/act/Constant_3", 6.0)], "/act/Div")
    m = roundtrip(g.model((2, 5, 5), g.head(h, 4, 3), 3, opset=13))
    assert [l.kind for l in m.layers][:5] == ["conv2d", "add", "clip", "mul", "mul"]


def test_dotted_layer_names_survive_export_and_import():
    """Zoo models name layers "block1.conv1"; the file must give them back (subsets name them)."""
    from ftte_core.graph import BatchNorm, Binary, Conv2d, Dense, Flatten, GlobalAvgPool, Model, ReLU
    rng = np.random.default_rng(0)
    layers = [Conv2d("stem.conv", rng.normal(size=(4, 2, 3, 3)).astype(np.float32), padding=(1, 1, 1, 1)),
              BatchNorm("stem.bn", np.ones(4), np.zeros(4), np.zeros(4), np.ones(4)),
              ReLU("stem.relu"),
              Conv2d("block1.conv1", rng.normal(size=(4, 4, 3, 3)).astype(np.float32), padding=(1, 1, 1, 1)),
              Binary("block1.add", "add"),
              GlobalAvgPool("pool"), Flatten("flatten"),
              Dense("fc", rng.normal(size=(3, 4)).astype(np.float32))]
    m = Model(layers, (2, 5, 5), inputs=[(0,), (1,), (2,), (3,), (4, 3), (5,), (6,), (7,)])
    back = load_model(to_onnx(m))
    assert [l.name for l in back.layers] == [l.name for l in m.layers]
    assert back.inputs == m.inputs
    assert set(back.state()) == set(m.state())


# ------------------------------------------------------------------------------------------------
# refused
# ------------------------------------------------------------------------------------------------

def _refused(g, out, in_shape, classes, match, opset=13, **kw):
    with pytest.raises(OnnxImportError, match=match):
        load_model(g.model(in_shape, out, classes, opset=opset, **kw))


def test_div_of_two_tensors_refused():
    g = G()
    d = g.op("Div", ["input", g.op("Relu", ["input"], "/r/Relu")], "/d/Div")
    _refused(g, g.gemm(d, "fc", 4, 3), (4,), 3,
             r"Div is only supported as a graph tensor divided by a constant.*'/d/Div'")


def test_unsupported_op_names_the_node():
    g = G()
    u = g.op("Resize", ["input", "", g.c("scales", [1, 1, 2, 2])], "/up/Resize", mode="nearest")
    _refused(g, g.head(u, 3), (3, 4, 4), 5, r"unsupported ONNX op 'Resize' at node '/up/Resize'")


def test_transpose_not_at_the_input_refused():
    g = G()
    r = g.op("Relu", ["input"], "/r/Relu")
    t = g.op("Transpose", [r], "/t/Transpose", perm=[0, 2, 3, 1])
    _refused(g, g.head(t, 4), (3, 4, 4), 5, r"Transpose is only supported on the graph input.*'/t/Transpose'")
    g = G()
    t = g.op("Transpose", ["input"], "/t/Transpose", perm=[1, 0, 2, 3])
    _refused(g, g.head(t, 4), (3, 4, 4), 5, r"batch axis must stay first.*'/t/Transpose'")


def test_concat_on_a_non_channel_axis_refused():
    g = G()
    a = g.op("Relu", ["input"], "/a/Relu")
    y = g.op("Concat", [a, "input"], "/cat/Concat", axis=2)
    _refused(g, g.head(y, 3), (3, 4, 4), 5, r"Concat on axis 2.*'/cat/Concat'")


def test_pad_reflect_and_batch_axis_refused():
    g = G()
    p = g.op("Pad", ["input", g.c("pads", [0, 0, 1, 1, 0, 0, 1, 1], np.int64)], "/pad/Pad", mode="reflect")
    _refused(g, g.head(p, 3), (3, 4, 4), 5, r"Pad mode 'reflect'.*'/pad/Pad'")
    g = G()
    p = g.op("Pad", ["input", g.c("pads", [1, 0, 0, 0, 0, 0, 0, 0], np.int64)], "/pad/Pad", mode="constant")
    _refused(g, g.head(p, 3), (3, 4, 4), 5, r"batch axis.*'/pad/Pad'")


def test_clip_bounds_computed_at_run_time_refused():
    g = G()
    hi = g.op("Relu", ["input"], "/hi/Relu")
    y = g.op("Clip", ["input", "", hi], "/clip/Clip")
    _refused(g, g.gemm(y, "fc", 4, 3), (4,), 3, r"Clip max '/hi/Relu_output_0' must be an initializer.*'/clip/Clip'")


def test_two_outputs_refused():
    g = G()
    a = g.op("Relu", ["input"], "/a/Relu")
    b = g.op("Sigmoid", ["input"], "/b/Sigmoid")
    outs = [helper.make_tensor_value_info(t, TensorProto.FLOAT, ["N", 4]) for t in (a, b)]
    with pytest.raises(OnnxImportError, match="exactly one output"):
        load_model(g.model((4,), a, 4, outputs=outs))


def test_sub_with_a_larger_second_operand_refused():
    g = G()
    s = g.op("GlobalAveragePool", ["input"], "/s/GlobalAveragePool")
    d = g.op("Sub", [s, "input"], "/d/Sub")
    _refused(g, g.head(d, 3), (3, 4, 4), 5,
             r"Sub of per-sample shapes \(3, 1, 1\) - \(3, 4, 4\).*second operand is larger.*'/d/Sub'")


def test_reduce_mean_over_channels_refused():
    g = G()
    r = g.op("ReduceMean", ["input"], "/r/ReduceMean", axes=[1], keepdims=0)
    _refused(g, g.op("Flatten", [r], "/f/Flatten"), (3, 4, 4), 16, r"ReduceMean over axes \[1\].*'/r/ReduceMean'")


def test_batchnorm_in_training_mode_refused():
    g = G()
    y = g.bn("input", "bn", 4)
    g.nodes[-1].attribute.append(helper.make_attribute("training_mode", 1))
    _refused(g, g.gemm(y, "fc", 4, 3), (4,), 3, r"training_mode=1.*'/bn/BatchNormalization'", opset=15)


# ------------------------------------------------------------------------------------------------
# mutated graphs: an error names the node, or the model agrees with onnxruntime
# ------------------------------------------------------------------------------------------------

def _mutate(rng, proto):
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    nodes = p.graph.node
    tensors = ["", "input"] + [t for n in nodes for t in n.output]
    for _ in range(rng.integers(1, 4)):
        n = nodes[rng.integers(len(nodes))]
        r = rng.random()
        if r < 0.3 and n.attribute:
            a = n.attribute[rng.integers(len(n.attribute))]
            if a.type == onnx.AttributeProto.INTS and a.ints:
                a.ints[rng.integers(len(a.ints))] = int(rng.integers(-3, 6))
            elif a.type == onnx.AttributeProto.INT:
                a.i = int(rng.integers(-3, 6))
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = float(rng.choice([-1.0, 0.0, np.nan, 1e30]))
        elif r < 0.5 and n.input:
            n.input[rng.integers(len(n.input))] = str(rng.choice(tensors))
        elif r < 0.6 and n.input:
            del n.input[-1]
        elif r < 0.7:
            n.op_type = str(rng.choice(["Relu", "Add", "Concat", "Squeeze", "Reshape", "Transpose", "Pad", "Clip",
                                        "Gather", "Shape", "Slice", "ReduceMean", "Conv", "MaxPool", "Div"]))
        elif r < 0.85 and p.graph.initializer:
            init = p.graph.initializer[rng.integers(len(p.graph.initializer))]
            arr = numpy_helper.to_array(init).reshape(-1)
            init.CopyFrom(numpy_helper.from_array(arr[:rng.integers(0, arr.size + 1)].copy(), init.name))
        else:
            n.attribute.append(helper.make_attribute("axes", [int(v) for v in rng.integers(-4, 4, rng.integers(1, 4))]))
    return p


@needs_act
def test_mutated_graphs_give_one_line_errors_or_agree_with_ort():
    bases = [resnet_block()]
    for build in (test_depthwise_separable_with_relu6, test_conv1d_net, test_views_squeeze_unsqueeze_reshape,
                  test_torch_view_batch_minus_one, test_pad_before_conv):
        captured = []  # the graphs these tests build: run them with roundtrip swapped for a recorder
        global roundtrip
        saved, roundtrip = roundtrip, lambda proto, *a, **k: captured.append(proto) or load_model(proto)
        try:
            build(13) if "opset" in build.__code__.co_varnames[:build.__code__.co_argcount] else build()
        finally:
            roundtrip = saved
        bases += captured
    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(150):
        p = _mutate(rng, bases[rng.integers(len(bases))])
        try:
            m = load_model(p)
        except OnnxImportError as e:
            assert "\n" not in str(e)
            continue
        x = rng.normal(size=(2,) + m.input_shape).astype(np.float32)
        ours = m.predict(x)  # an accepted model must run
        try:
            ref = run_ort(p, x)
        except Exception:  # onnxruntime refuses some mutants we accept (e.g. an out-of-spec attribute)
            continue
        if ref.shape == ours.shape and np.all(np.isfinite(ref)):
            np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4)
            compared += 1
    assert compared > 10
