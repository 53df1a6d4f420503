"""The model file's int8 storage (format version 3) and the hub's int8 install of a model
(``modelfile.install_bytes``): a round trip keeps the storage exactly, a device trains from the
install exactly as from the float32 file under frozen="int8", the subset's (origin) values are
the same in both, each malformed form is refused in one line, and the hub sends the install
only to agents that read it."""
import json
import struct

import numpy as np
import pytest

import ftte_core as ft
from ftte_core import modelfile
from ftte_core.graph import Conv1d, Conv2d, Dense, Flatten, Model, ReLU
from ftte_core.local import LocalWorker, TaskConfig
from ftte_core.modelfile import ModelFileError, install_bytes, model_from_bytes, model_to_bytes
from ftte_core.subset import Subset
from ftte_core.update import decode_update, subset_values

from test_int8 import _threads


def _conv_model(seed=0):
    """conv2d (6 channels, 3x3 on 5x5) -> relu -> flatten -> dense 10."""
    r = np.random.default_rng(seed)
    layers = [Conv2d("conv", r.standard_normal((6, 1, 3, 3)).astype(np.float32), None, padding=(1, 1, 1, 1)),
              ReLU("r"), Flatten("f"), Dense("fc", r.standard_normal((10, 6 * 5 * 5)).astype(np.float32) * 0.1)]
    return Model(layers, (1, 5, 5), name="tiny-cnn")


def _mlp(seed=0):
    return ft.zoo("mlp", (16,), 4, hidden=(24, 20), seed=seed)


def _held(model):
    """Each weight's storage: ("f", w) / ("int8", q, scale) / ("mixed", q, scale, rows, trained)."""
    out = []
    for layer in model.param_layers:
        if layer.is_mixed:
            out.append(("mixed", layer.weight_q, layer.weight_scale, layer.trained_rows, layer.weight_trained))
        elif layer.is_int8:
            out.append(("int8", layer.weight_q, layer.weight_scale))
        else:
            out.append(("f", layer.weight))
    return out


def _assert_same_storage(a, b):
    for x, y in zip(_held(a), _held(b)):
        assert x[0] == y[0]
        for u, v in zip(x[1:], y[1:]):
            assert u.dtype == v.dtype
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("make", [_mlp, _conv_model])
def test_int8_and_mixed_weights_round_trip_exactly_as_version_3(make):
    model = make()
    first, second = model.param_layers[0], model.param_layers[1]
    first.mix_weight(np.array([0, 3, 4], np.int32))
    second.quantize_weight()
    blob = model_to_bytes(model, int8_storage=True)
    assert struct.unpack_from("<H", blob, 4)[0] == modelfile.INT8_FORMAT_VERSION
    back = model_from_bytes(blob)
    _assert_same_storage(model, back)
    assert back.param_layers[0]._weight is None and back.param_layers[1]._weight is None  # no float copy
    x = np.random.default_rng(1).standard_normal((5,) + tuple(model.input_shape)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x), back.predict(x))
    assert model_to_bytes(back, int8_storage=True) == blob
    # without int8_storage (and for a model with none): version 2, the dequantised values
    plain = model_to_bytes(model)
    assert struct.unpack_from("<H", plain, 4)[0] == modelfile.FORMAT_VERSION
    np.testing.assert_array_equal(model_from_bytes(plain).param_layers[1].weight, second.weight)
    assert struct.unpack_from("<H", model_to_bytes(make(), int8_storage=True), 4)[0] == modelfile.FORMAT_VERSION


def test_a_task_from_the_int8_install_equals_the_task_from_the_float32_file():
    """The device's training is the same bit for bit: the install holds what Trainer(frozen="int8")
    would have made of the float32 weights, and the subset's rows exactly."""
    model = _mlp(3)
    subset = Subset.of(model, {"fc2": {"rows": [1, 5, 6, 11], "bias": True}, "fc3": {"rows": "all", "bias": True}})
    plain, install = model_to_bytes(model), install_bytes(model, subset, "int8")
    assert len(install) < 0.55 * len(plain)
    assert install_bytes(model, subset, "float32") == plain
    assert install_bytes(model, subset, "int8") == install  # deterministic: a resumed hub rebuilds it
    from_plain, from_install = model_from_bytes(plain), model_from_bytes(install)
    origin = subset_values(from_plain, Subset.from_dict(from_plain, subset.to_dict()))
    origin_i = subset_values(from_install, Subset.from_dict(from_install, subset.to_dict()))
    assert origin.keys() == origin_i.keys()
    for k in origin:
        np.testing.assert_array_equal(origin[k], origin_i[k])
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 16)).astype(np.float32), rng.integers(0, 4, 32).astype(np.int32)
    cfg = TaskConfig(batch_size=8, frozen="int8")
    updates = []
    want = ft.predict_memory(model, subset, batch_size=8, frozen="int8", threads=1)["total"]
    for m in (from_plain, from_install):
        sub = Subset.from_dict(m, subset.to_dict())
        with _threads(1):
            result = LocalWorker(m, sub).run(origin, 0, x, y, cfg, bits=32)
        updates.append(decode_update(result.update))
        assert result.memory.total == want  # what the hub priced, whichever file the device holds
    for k in updates[0]:
        np.testing.assert_array_equal(updates[0][k], updates[1][k])
    _assert_same_storage(from_plain, from_install)  # the float32 device now holds what the install held


def test_the_install_of_a_tier_keeps_only_that_tiers_rows_float32():
    model = _mlp(4)
    small = Subset.of(model, {"fc3": {"rows": "all", "bias": True}})
    big = Subset.of(model, {"fc2": {"rows": [0, 2], "bias": True}, "fc3": {"rows": "all", "bias": True}})
    a, b = model_from_bytes(install_bytes(model, small, "int8")), model_from_bytes(install_bytes(model, big, "int8"))
    assert [(layer.is_int8, layer.is_mixed) for layer in a.param_layers] == [(True, False), (True, False), (False, False)]
    assert [(layer.is_int8, layer.is_mixed) for layer in b.param_layers] == [(True, False), (False, True), (False, False)]
    np.testing.assert_array_equal(b.param_layers[1].trained_rows, [0, 2])
    np.testing.assert_array_equal(model.param_layers[1].weight, _mlp(4).param_layers[1].weight)  # model untouched


def _v3(model_rows=(0, 3)):
    model = _mlp(5)
    model.param_layers[0].quantize_weight()
    model.param_layers[1].mix_weight(np.array(model_rows, np.int32))
    blob = model_to_bytes(model, int8_storage=True)
    hlen = struct.unpack_from("<I", blob, 8)[0]
    return blob, json.loads(blob[12:12 + hlen]), blob[12 + hlen:]


def _rebuild(head, arrays, version=3):
    h = json.dumps(head).encode()
    return struct.pack("<4sHHI", b"FTMD", version, 0, len(h)) + h + arrays


def _arrays_offset_of(head, layer_index):
    """Byte offset, in the arrays, of layer ``layer_index``'s weight (MLP: dense layers only)."""
    off = 0
    for spec in head["layers"][:layer_index]:
        for entry in spec["params"] + spec["constants"]:
            n = int(np.prod(entry[1]))
            if len(entry) == 2:
                off += 4 * n
            elif entry[2] == "int8":
                off += n + 4 * entry[1][0]
            else:
                r, per_row = entry[3], n // entry[1][0]
                off += (entry[1][0] - r) * (per_row + 4) + 4 * r + 4 * r * per_row
    return off


def test_malformed_int8_storage_is_refused_in_one_line():
    blob, head, arrays = _v3()
    fc1, fc2 = head["layers"][0], head["layers"][2]
    assert fc1["params"][0][2] == "int8" and fc2["params"][0][2:] == ["mixed", 2]
    cases = []

    def case(mutate, match, arr=arrays, version=3):
        h = json.loads(json.dumps(head))
        mutate(h)
        cases.append((_rebuild(h, arr, version), match))

    case(lambda h: h["layers"][0]["params"][0].__setitem__(2, "int4"), "storage must be")
    case(lambda h: h["layers"][2]["params"][0].__setitem__(3, 99), "storage must be")
    case(lambda h: h["layers"][2]["params"][0].__setitem__(3, -1), "storage must be")
    case(lambda h: h["layers"][2]["params"][0].__setitem__(3, 0), "storage must be")    # not mixed: say int8
    case(lambda h: h["layers"][2]["params"][0].__setitem__(3, h["layers"][2]["params"][0][1][0]), "storage must be")
    case(lambda h: h["layers"][0]["params"][1].append("int8"), "only its weight may be stored int8")
    case(lambda h: None, "must be \\[name, shape\\]", version=2)          # int8 storage needs version 3
    cases.append((blob[:-3], "truncated"))
    cases.append((blob + b"\0", "trailing bytes"))
    i0 = _arrays_offset_of(head, 0)
    rows1, cols1 = head["layers"][0]["params"][0][1]
    bad = bytearray(arrays)
    bad[i0] = 0x80                                                        # level -128
    cases.append((_rebuild(head, bytes(bad)), "-128"))
    bad = bytearray(arrays)
    struct.pack_into("<f", bad, i0 + rows1 * cols1, float("nan"))          # a NaN scale
    cases.append((_rebuild(head, bytes(bad)), "scales must be finite"))
    bad = bytearray(arrays)
    struct.pack_into("<f", bad, i0 + rows1 * cols1, -1.0)                  # a negative scale
    cases.append((_rebuild(head, bytes(bad)), "scales must be finite and >= 0"))
    i2 = _arrays_offset_of(head, 2)
    o2, per2 = head["layers"][2]["params"][0][1][0], head["layers"][2]["params"][0][1][1]
    rows_at = i2 + (o2 - 2) * (per2 + 4)
    bad = bytearray(arrays)
    struct.pack_into("<ii", bad, rows_at, 3, 3)                            # a row twice
    cases.append((_rebuild(head, bytes(bad)), "unique"))
    bad = bytearray(arrays)
    struct.pack_into("<i", bad, rows_at, o2)                               # a row out of range
    cases.append((_rebuild(head, bytes(bad)), "unique and in"))
    bad = bytearray(arrays)
    struct.pack_into("<f", bad, rows_at + 8, float("inf"))                 # a trained value
    cases.append((_rebuild(head, bytes(bad)), "NaN or Inf"))
    for data, match in cases:
        with pytest.raises(ModelFileError, match=match) as e:
            model_from_bytes(data)
        assert "\n" not in str(e.value)


def test_a_grouped_convolution_cannot_arrive_mixed():
    r = np.random.default_rng(0)
    model = Model([Conv2d("dw", r.standard_normal((4, 1, 3, 3)).astype(np.float32), None, padding=(1, 1, 1, 1),
                          group=4), Flatten("f"), Dense("fc", r.standard_normal((3, 4 * 4 * 4)).astype(np.float32))],
                  (4, 4, 4))
    model.param_layers[0].quantize_weight()  # int8 is fine for a depthwise weight ...
    blob = model_to_bytes(model, int8_storage=True)
    assert model_from_bytes(blob).param_layers[0].is_int8
    model = Model([Conv2d("g", r.standard_normal((4, 2, 3, 3)).astype(np.float32), None, padding=(1, 1, 1, 1),
                          group=2), Flatten("f"), Dense("fc", r.standard_normal((3, 4 * 4 * 4)).astype(np.float32))],
                  (4, 4, 4))
    model.param_layers[0].mix_weight(np.array([1], np.int32))  # the layer allows it; the file does not
    with pytest.raises(ModelFileError, match="grouped convolution cannot hold mixed"):
        model_from_bytes(model_to_bytes(model, int8_storage=True))


def test_conv1d_weights_travel_int8_too():
    r = np.random.default_rng(2)
    model = Model([Conv1d("c", r.standard_normal((5, 2, 3)).astype(np.float32), None, padding=(1, 1)), Flatten("f"),
                   Dense("fc", r.standard_normal((3, 5 * 7)).astype(np.float32))], (2, 7))
    model.param_layers[0].mix_weight(np.array([4, 1], np.int32))
    back = model_from_bytes(model_to_bytes(model, int8_storage=True))
    _assert_same_storage(model, back)


def test_the_hub_sends_each_agent_the_newest_install_it_reads():
    from ftte_hub.fleet import Fleet, FleetSettings, parse_agent_info
    fleet = Fleet(b"k" * 32, FleetSettings())
    fleet.model_blob, fleet.model_hash = b"float", "f" * 64
    fleet.installs = {3: [(b"int8", "a" * 64)], 4: [(b"int8-trained", "b" * 64)]}
    base = {"agent_id": "a1", "memory_budget": 1 << 20}
    old = parse_agent_info(json.dumps(base).encode())
    v3 = parse_agent_info(json.dumps({**base, "model_format": 3}).encode())
    v4 = parse_agent_info(json.dumps({**base, "model_format": 4}).encode())
    later = parse_agent_info(json.dumps({**base, "model_format": 9}).encode())
    odd = parse_agent_info(json.dumps({**base, "model_format": "3"}).encode())
    assert old["model_format"] == 2 and v3["model_format"] == 3 and odd["model_format"] == 2
    assert fleet.model_for(old) == (b"float", "f" * 64)
    assert fleet.model_for(v3) == (b"int8", "a" * 64)          # an agent of format 3 never gets version 4
    assert fleet.model_for(v4) == fleet.model_for(later) == (b"int8-trained", "b" * 64)
    fleet.installs = {}  # a float32-frozen run (or --float32-install): everyone gets the float32 file
    assert fleet.model_for(v4) == (b"float", "f" * 64)


def test_reading_an_install_never_holds_its_int8_weights_as_float32():
    """The reader checks sizes by shape: an int8 weight is not dequantised on the way (a large
    frozen layer would otherwise exist twice on the device, once as float32)."""
    import tracemalloc

    model = ft.zoo("mlp", (64,), 10, hidden=(512, 512), seed=0)
    subset = Subset.of(model, {"fc3": {"rows": "all", "bias": True}})
    install = install_bytes(model, subset, "int8")
    float_weights = 4 * model.num_params()
    tracemalloc.start()
    try:
        back = model_from_bytes(install)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert back.param_layers[1].is_int8
    assert peak < 0.5 * float_weights, (peak, float_weights)   # int8 levels + scales + JSON, no float copy


def test_the_weight_limit_counts_an_install_as_its_float32_weights():
    # The agent refuses a model whose weights cannot fit its budget (max_param_bytes, in float32
    # bytes). An install stores most weights int8, so its arrays are about a quarter of that: the
    # limit must still be measured in float32, or a v3 file would pass a gate 4x looser.
    model = _mlp()
    subset = Subset.of(model, {"fc3": {"rows": "all", "bias": True}})
    blob = install_bytes(model, subset, "int8")
    full = model_to_bytes(model)
    as_float32 = 4 * sum(p.size for layer in model.param_layers for p in layer.params().values())
    assert len(blob) < 0.5 * len(full)
    with pytest.raises(modelfile.ModelTooLarge) as e:
        model_from_bytes(blob, max_param_bytes=as_float32 - 1)
    assert e.value.param_bytes == as_float32 and "as float32" in str(e.value)
    with pytest.raises(modelfile.ModelTooLarge):   # the float32 file at the same limit, as before
        model_from_bytes(full, max_param_bytes=as_float32 - 1)
    model_from_bytes(blob, max_param_bytes=as_float32)
