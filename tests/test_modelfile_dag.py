"""Model files (format version 2) carry the DAG: every layer kind, each layer's inputs, frozen
constants; and a hostile header cannot get past the bounds."""
import json
import math
import re
import struct

import numpy as np
import pytest

import ftte_core as ft
from ftte_core import _kernels as K
from ftte_core import binfmt, modelfile
from ftte_core.graph import (AvgPool2d, BatchNorm, Binary, Clip, Concat, Conv1d, Conv2d, Dense, Dropout, Flatten,
                             GlobalAvgPool, HardSigmoid, HardSwish, LeakyReLU, MaxPool2d, Model, Pad, ReLU, Reshape,
                             Sigmoid, Tanh, Transpose)

needs_activations = pytest.mark.skipif(not hasattr(K, "clip_forward"),
                                       reason="the leaky_relu/hard_sigmoid/clip/hard_swish kernels (branch wip-act)")


def _rand(rng, *shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def every_kind_model(seed=0) -> Model:
    """One layer of every kind the model file knows, wired as a DAG (residual adds, a concat,
    a value read twice); input [8, 8, 2] in NHWC order, as tf2onnx writes Keras models."""
    r = np.random.default_rng(seed)
    pos = lambda *s: (r.random(s, dtype=np.float32) + 0.5)
    L, I = [], []

    def add(layer, *ins):
        L.append(layer)
        I.append(ins)
        return len(L)  # the value this layer writes

    v = add(Transpose("/input/Transpose", (2, 0, 1)), 0)                                   # [2, 8, 8]
    v = add(Pad("pad", (0, 1, 1, 0, 1, 1), value=0.25), v)                                 # [2, 10, 10]
    v = add(Conv2d("conv1", _rand(r, 4, 2, 3, 3), _rand(r, 4)), v)                         # [4, 8, 8]
    v = add(BatchNorm("bn1", pos(4), _rand(r, 4), _rand(r, 4), pos(4), eps=1e-3), v)
    a = add(Clip("relu6", 0.0, 6.0), v)
    v = add(Conv2d("dw", _rand(r, 4, 1, 3, 3), _rand(r, 4), padding=(1, 1, 1, 1), group=4), a)
    v = add(Conv2d("grouped", _rand(r, 4, 2, 1, 1), None, group=2), v)
    v = add(Binary("res_add", "add"), a, v)                                                # residual
    v = add(LeakyReLU("lrelu", 0.1), v)
    m = add(Binary("scale", "mul", const=pos(4, 1, 1)), v)
    v = add(Binary("one_minus", "sub", const=np.float32(1.0), const_first=True), m)
    v = add(HardSigmoid("hsig", 0.25, 0.4), v)
    v = add(Binary("gate", "mul"), m, v)
    p = add(MaxPool2d("mp", (2, 2)), v)                                                    # [4, 4, 4]
    v = add(AvgPool2d("ap", (2, 2), (1, 1), (0, 0, 1, 1), count_include_pad=True), p)
    v = add(HardSwish("hswish"), v)
    v = add(Concat("cat"), p, v)                                                           # [8, 4, 4]
    v = add(Reshape("to1d", (8, 16)), v)
    v = add(Conv1d("c1d", _rand(r, 6, 8, 3), _rand(r, 6), padding=(1, 1)), v)              # [6, 16]
    v = add(MaxPool2d("mp1d", (2,)), v)                                                    # [6, 8]
    s = add(AvgPool2d("ap1d", (2,), ceil_mode=True), v)                                    # [6, 4]
    v = add(Conv1d("dw1d", _rand(r, 6, 1, 3), _rand(r, 6), group=6), s)                    # [6, 2]
    v = add(GlobalAvgPool("gap"), v)                                                       # [6, 1]
    v = add(Flatten("flat"), v)                                                            # [6]
    g = add(GlobalAvgPool("gap_flat", keepdims=False), s)                                  # [6]
    v = add(Binary("sum", "add"), v, g)
    v = add(Binary("minus", "sub", const=_rand(r, 6)), v)
    v = add(Dense("fc1", _rand(r, 5, 6), _rand(r, 5)), v)
    v = add(BatchNorm("bn_fc", pos(5), _rand(r, 5), _rand(r, 5), pos(5)), v)
    v = add(Sigmoid("sig"), v)
    v = add(Tanh("tanh"), v)
    v = add(ReLU("relu"), v)
    v = add(Dropout("drop", 0.3), v)
    v = add(Clip("clip_hi", hi=3.0), v)
    add(Dense("fc2", _rand(r, 3, 5), _rand(r, 3)), v)
    return Model(L, (8, 8, 2), name="every-kind", inputs=I)


def _head(blob):
    _, _, _, hlen = struct.unpack_from("<4sHHI", blob, 0)
    return json.loads(blob[12:12 + hlen]), hlen


def _with_header(blob, edit):
    head, hlen = _head(blob)
    edit(head)
    h = json.dumps(head).encode()
    return blob[:8] + struct.pack("<I", len(h)) + h + blob[12 + hlen:]


def _layer(head, name):
    return next(l for l in head["layers"] if l["name"] == name)


@needs_activations
def test_every_kind_round_trips_and_predicts_identically():
    model = every_kind_model()
    assert not model.is_chain
    blob = modelfile.model_to_bytes(model)
    assert struct.unpack_from("<H", blob, 4)[0] == modelfile.FORMAT_VERSION == 2
    back = modelfile.model_from_bytes(blob)
    assert [(l.kind, l.name) for l in back.layers] == [(l.kind, l.name) for l in model.layers]
    assert back.inputs == model.inputs and back.shapes == model.shapes and back.name == model.name
    assert {l.kind for l in back.layers} >= set(modelfile.KINDS)  # the model really holds every kind
    for a, b in zip(model.layers, back.layers):
        for k, v in {**a.params(), **a.constants()}.items():
            np.testing.assert_array_equal({**b.params(), **b.constants()}[k], v)
    clip = back.layer("clip_hi")
    assert clip.lo == -math.inf and clip.hi == 3.0
    x = np.random.default_rng(1).random((7,) + model.input_shape, dtype=np.float32) * 4 - 2
    np.testing.assert_array_equal(back.predict(x), model.predict(x))
    assert modelfile.model_to_bytes(back) == blob  # stable bytes: the agent's cache key does not drift
    # the weights of the read model train (owned, writable): one step changes them
    before = back.layer("conv1").weight.copy()
    ft.Trainer(back, lr=0.1, seed=0).train(x, np.arange(7) % 3, epochs=1, batch_size=7)
    assert not np.array_equal(before, back.layer("conv1").weight)


def test_clip_bounds_survive_json_without_infinities():
    model = Model([Flatten("f"), Clip("lo_only", lo=-1.0), Dense("fc", np.ones((2, 4), np.float32))], (4,))
    blob = modelfile.model_to_bytes(model)
    head, _ = _head(blob)
    assert _layer(head, "lo_only")["lo"] == -1.0 and _layer(head, "lo_only")["hi"] is None
    assert b"Infinity" not in blob and b"NaN" not in blob
    if hasattr(K, "clip_forward"):
        back = modelfile.model_from_bytes(blob)
        assert back.layer("lo_only").hi == math.inf


def _v1_blob(model: Model) -> bytes:
    """A model file as version 1 wrote it: a chain, no "inputs", no "constants"."""
    blob = modelfile.model_to_bytes(model)
    head, hlen = _head(blob)
    for spec in head["layers"]:
        spec.pop("inputs"), spec.pop("constants")
        spec.pop("group", None), spec.pop("keepdims", None)
    h = json.dumps(head).encode()
    return binfmt.PREFIX.pack(b"FTMD", 1, 0, len(h)) + h + blob[12 + hlen:]


def test_version_1_chain_files_are_still_read():
    for model in (ft.zoo("cnn", (1, 8, 8), 10, seed=3), ft.zoo("mlp", (64,), 10, seed=4)):
        old = _v1_blob(model)
        back = modelfile.model_from_bytes(old)
        assert back.is_chain and back.shapes == model.shapes
        x = np.random.default_rng(0).random((3,) + model.input_shape, dtype=np.float32)
        np.testing.assert_array_equal(back.predict(x), model.predict(x))
    # a version-1 file cannot hold the new kinds
    dag = Model([Flatten("f"), Binary("plus", "add", const=np.ones(4, np.float32)),
                 Dense("fc", np.ones((2, 4), np.float32))], (2, 2))
    blob = modelfile.model_to_bytes(dag)
    head, hlen = _head(blob)
    h = json.dumps(head).encode()
    v1 = binfmt.PREFIX.pack(b"FTMD", 1, 0, len(h)) + h + blob[12 + hlen:]
    with pytest.raises(modelfile.ModelFileError, match="kind 'add' needs model file format version 2"):
        modelfile.model_from_bytes(v1)


def test_a_version_1_reader_refuses_a_new_file_by_its_version():
    blob = modelfile.model_to_bytes(ft.zoo("mlp", (4,), 2, hidden=(3,)))
    with pytest.raises(modelfile.ModelFileError, match=re.escape("unsupported model file format version 2 "
                                                                 "(this side reads 1)")):
        binfmt.split_prefixed(blob, "model file", b"FTMD", 1, 1 << 20, 1 << 20, modelfile.ModelFileError)
    with pytest.raises(modelfile.ModelFileError, match=re.escape("format version 5 (this side reads 1, 2, 3 and 4)")):
        modelfile.model_from_bytes(blob[:4] + struct.pack("<H", 5) + blob[6:])


def _small_dag():
    """conv -> bn -> relu, plus a residual add, then pooling and a classifier (all kernels on main)."""
    r = np.random.default_rng(5)
    layers = [Conv2d("conv", _rand(r, 2, 2, 3, 3), None, padding=(1, 1, 1, 1)),
              BatchNorm("bn", np.ones(2, np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32),
                        np.ones(2, np.float32)),
              ReLU("relu"), Binary("add", "add"), Pad("pad", (0, 1, 1, 0, 1, 1)), Transpose("tr", (0, 2, 1)),
              Reshape("rs", (2, 49)), GlobalAvgPool("gap", keepdims=False), Dense("fc", _rand(r, 3, 2))]
    inputs = [(0,), (1,), (2,), (3, 0), (4,), (5,), (6,), (7,), (8,)]
    return Model(layers, (2, 5, 5), name="small", inputs=inputs)


def test_small_dag_round_trips_on_any_kernel_build():
    model = _small_dag()
    back = modelfile.model_from_bytes(modelfile.model_to_bytes(model))
    assert back.inputs == model.inputs
    x = np.random.default_rng(2).random((4, 2, 5, 5), dtype=np.float32)
    np.testing.assert_array_equal(back.predict(x), model.predict(x))


def test_hostile_dag_headers_give_one_line_errors():
    base = modelfile.model_to_bytes(_small_dag())


    def edit(layer_name, **fields):
        return lambda h: _layer(h, layer_name).update(fields)

    cases = [
        # inputs: earlier values only (a forward reference or a cycle cannot be written), bounded lists
        ("inputs [3, 5] is outside the limit [0, 3]", edit("add", inputs=[3, 5])),
        ("inputs [4, 0] is outside the limit [0, 3]", edit("add", inputs=[4, 0])),  # itself: a cycle
        ("inputs [-1] is outside the limit", edit("conv", inputs=[-1])),
        ("inputs must be a list of 1 to 64 integers", edit("add", inputs=[])),
        ("inputs must be a list of 1 to 64 integers", edit("add", inputs=[3, "0"])),
        ("inputs must be a list of 1 to 64 integers", edit("add", inputs=[3, True])),
        ("inputs must be a list of 1 to 64 integers", edit("add", inputs=[0] * 65)),
        ("inputs must be a list of 1 to 64 integers", edit("add", inputs=3)),
        ("takes 2 inputs, the file lists 1", edit("add", inputs=[3])),
        ("takes 1 input, the file lists 2", edit("relu", inputs=[2, 1])),
        ("a layer lacks the field 'inputs'", lambda h: _layer(h, "relu").pop("inputs")),
        ("is never used", edit("relu", inputs=[1])),  # the batch norm's output then feeds nobody
        # pads, perm, reshape targets, group
        ("pads [0, 65, 1, 0, 1, 1] is outside the limit [0, 64]", edit("pad", pads=[0, 65, 1, 0, 1, 1])),
        ("pads [0, 1, 1, 0, 1, 1048576] is outside", edit("pad", pads=[0, 1, 1, 0, 1, 1 << 20])),
        ("pads must be a list of 2 to 8 integers", edit("pad", pads=[1] * 10)),
        ("even count", edit("pad", pads=[0, 1, 1])),
        ("layer 'pad': 2 axes of pads for an input of shape (2, 5, 5)", edit("pad", pads=[0, 1, 0, 1])),
        ("layer 'pad': value must be a finite number", edit("pad", value="nan")),
        ("perm [0, 3, 1] is outside the limit [0, 2]", edit("tr", perm=[0, 3, 1])),
        ("is not a permutation", edit("tr", perm=[0, 1, 1])),
        ("perm must be a list of 1 to 4 integers", edit("tr", perm=[0, 1, 2, 3, 4])),
        ("reshape target [1048576, 1048576] has 1,099,511,627,776 elements, over the limit",
         edit("rs", shape=[1 << 20, 1 << 20])),
        ("shape must be a list of 1 to 4 integers", edit("rs", shape=[1, 1, 1, 1, 98])),
        ("cannot reshape", edit("rs", shape=[2, 48])),
        ("group [0] is outside the limit [1, 2]", edit("conv", group=0)),
        ("group [1000000] is outside the limit [1, 2]", edit("conv", group=1000000)),
        ("expects input [4, H, W]", edit("conv", group=2)),  # weight [2, 2, ..] with group 2 reads 4 channels
        # numbers that must be finite, booleans that must be booleans
        ("eps must be a finite number >= 0", edit("bn", eps=-1.0)),
        ("eps must be a finite number >= 0", edit("bn", eps="1e-5")),
        ("keepdims must be true or false", edit("gap", keepdims=0)),
        # arrays: the right names per kind, finite, bounded
        ("a batchnorm layer's constants are ['mean', 'var'], got ['mean']",
         lambda h: _layer(h, "bn")["constants"].pop()),
        ("a relu layer's constants are [], got ['mean']",
         lambda h: _layer(h, "relu").update(constants=[["mean", [2]]])),
        ("'mean' appears twice", lambda h: _layer(h, "bn")["constants"].append(["mean", [2]])),
        ("bad shape", lambda h: _layer(h, "bn")["constants"].__setitem__(0, ["mean", [1, 1, 1, 1, 1, 2]])),
        ("mean shape [536870912] has 536,870,912 elements, over the limit",
         lambda h: _layer(h, "bn")["constants"].__setitem__(0, ["mean", [1 << 29]])),
        ("unknown kind 'lstm'", edit("relu", kind="lstm")),
        ("its name must be a string", edit("relu", name=7)),
    ]
    wrong = []
    for match, change in cases:
        try:
            modelfile.model_from_bytes(_with_header(base, change))
            wrong.append((match, "accepted"))
        except modelfile.ModelFileError as e:
            if match not in str(e) or "\n" in str(e):
                wrong.append((match, str(e)))
    assert not wrong
    # JSON's NaN and Infinity tokens are refused by the parser itself; 1e400 parses as inf
    head, hlen = _head(base)
    for token, match in (("NaN", "bad model header: NaN is not a JSON number"),
                         ("-Infinity", "bad model header: -Infinity is not a JSON number"),
                         ("1e400", "layer 'bn': eps must be a finite number >= 0, got inf")):
        text = json.dumps(head).replace('"eps": 1e-05', f'"eps": {token}').encode()
        assert token.encode() in text
        with pytest.raises(modelfile.ModelFileError, match=re.escape(match)):
            modelfile.model_from_bytes(base[:8] + struct.pack("<I", len(text)) + text + base[12 + hlen:])


def test_non_finite_constants_and_weights_are_refused():
    model = _small_dag()
    blob = bytearray(modelfile.model_to_bytes(model))
    head, hlen = _head(bytes(blob))
    # the arrays in file order: conv weight, bias, bn weight, bias, mean, var, ...
    offset = 12 + hlen + 4 * (2 * 2 * 3 * 3 + 2 + 2 + 2)
    for value in (float("nan"), float("inf")):
        bad = bytearray(blob)
        bad[offset:offset + 4] = struct.pack("<f", value)
        with pytest.raises(modelfile.ModelFileError, match=re.escape("bn.mean holds NaN or Inf")):
            modelfile.model_from_bytes(bytes(bad))


def test_constants_count_against_the_weight_limit():
    const = np.ones((64, 8, 8), np.float32)
    model = Model([Binary("shift", "add", const=const), Flatten("f"), Dense("fc", np.ones((2, 4096), np.float32))],
                  (64, 8, 8))
    blob = modelfile.model_to_bytes(model)
    weights = 4 * (2 * 4096 + 2)
    with pytest.raises(modelfile.ModelTooLarge) as e:
        modelfile.model_from_bytes(blob, max_param_bytes=weights + 100)
    assert e.value.param_bytes == weights + const.nbytes
    assert modelfile.model_from_bytes(blob, max_param_bytes=weights + const.nbytes).num_params() == weights // 4


def test_value_shapes_of_a_dag_are_bounded_not_only_the_chain():
    """A branch off the main path (not the last layer's input) that would blow up is refused."""
    limit = modelfile.LIMITS["sample_elements"]
    w = np.ones((1024, 1, 1, 1), np.float32)
    wide = Model([Conv2d("wide", w, None, padding=(64,) * 4), GlobalAvgPool("g", keepdims=False),
                  Dense("fc", np.ones((1, 1024), np.float32)), Binary("join", "add"), Flatten("f")],
                 (1, 8, 8), inputs=[(0,), (1,), (2,), (3, 3), (4,)])
    assert 1024 * 136 * 136 > limit
    with pytest.raises(modelfile.ModelFileError, match=r"layer 'wide': output shape \[1024, 136, 136\] .* over"):
        modelfile.model_from_bytes(modelfile.model_to_bytes(wide))
    with pytest.raises(modelfile.ModelFileError, match="over the limit"):
        modelfile.check_model_size(wide)


def test_random_corruption_of_a_dag_header_never_escapes_as_another_error():
    blob = bytearray(modelfile.model_to_bytes(_small_dag()))
    _, hlen = _head(bytes(blob))
    rng = np.random.default_rng(0)
    for _ in range(400):
        bad = bytearray(blob)
        for i in rng.integers(0, 12 + hlen, size=3):
            bad[int(i)] = int(rng.integers(0, 256))
        try:
            modelfile.model_from_bytes(bytes(bad))
        except modelfile.ModelFileError as e:
            assert "\n" not in str(e)
