"""The trained rows travel int8 too (model file version 4, "int8-trained"): the hub starts a run
that installs int8 from the int8 round trip of its trained rows (``quantize_trained_rows``), so
the install carries those rows as int8 levels and a scale, exactly. The device's trained rows
equal the hub's bit for bit and it trains as on the hub's float32 model; the writer verifies
every row and keeps float32 what no int8 row reproduces; malformed storage is refused in one
line; an agent of format 3 still gets the version-3 install; the digits MLP's install shrinks."""
import asyncio
import json
import struct

import numpy as np
import pytest

import ftte_core as ft
from ftte_core import modelfile
from ftte_core.graph import dequantize_rows, exact_int8_rows, quantize_rows, round_trip_rows
from ftte_core.local import LocalWorker, TaskConfig
from ftte_core.modelfile import (ModelFileError, install_bytes, model_from_bytes, model_to_bytes,
                                 quantize_trained_rows)
from ftte_core.subset import Subset
from ftte_core.update import decode_update, subset_values

from test_int8 import _threads


def _bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _digits_mlp_and_subset():
    """The simulator's digits MLP (64 -> 256 -> 256 -> 10) and an ftte-like subset: a third of the
    last hidden layer's rows and the whole output layer."""
    model = ft.zoo("mlp", (64,), 10, hidden=(256, 256), seed=0)
    subset = Subset.of(model, {"fc2": {"rows": list(range(0, 256, 3)), "bias": True},
                               "fc3": {"rows": "all", "bias": True}})
    return model, subset


def test_a_quantised_start_installs_its_trained_rows_int8_and_exactly():
    model, subset = _digits_mlp_and_subset()
    before = {k: v.copy() for k, v in model.state().items()}
    n = quantize_trained_rows(model, [subset])
    assert n == 86 * 256 + 10 * 256
    for key, v in model.state().items():   # the trained rows, and only they, moved to their round trip
        if key == "fc2.weight":
            rows = subset.get("fc2").rows
            np.testing.assert_array_equal(_bits(v[rows]), _bits(round_trip_rows(before[key][rows])))
            others = np.setdiff1d(np.arange(256), rows)
            np.testing.assert_array_equal(_bits(v[others]), _bits(before[key][others]))
        elif key == "fc3.weight":
            np.testing.assert_array_equal(_bits(v), _bits(round_trip_rows(before[key])))
        else:
            np.testing.assert_array_equal(_bits(v), _bits(before[key]))
    v3 = install_bytes(model, subset, "int8", model_format=3)
    v4 = install_bytes(model, subset, "int8")
    assert struct.unpack_from("<H", v3, 4)[0] == 3 and struct.unpack_from("<H", v4, 4)[0] == 4
    assert install_bytes(model, subset, "int8") == v4            # deterministic: a resumed hub rebuilds it
    head = json.loads(v4[12:12 + struct.unpack_from("<I", v4, 8)[0]])
    forms = {s["name"]: s["params"][0][2:] for s in head["layers"] if s["params"]}
    assert forms == {"fc1": ["int8"], "fc2": ["int8-trained", 86, 0], "fc3": ["int8-trained", 10, 0]}
    # the device's trained rows (its downlink origin) are the hub's, bit for bit
    device = model_from_bytes(v4)
    assert device.layer("fc2").is_mixed and not device.layer("fc3").is_mixed and not device.layer("fc3").is_int8
    hub_values = subset_values(model, subset)
    dev_values = subset_values(device, Subset.from_dict(device, subset.to_dict()))
    assert hub_values.keys() == dev_values.keys()
    for k in hub_values:
        np.testing.assert_array_equal(_bits(hub_values[k]), _bits(dev_values[k]))
    # the frozen rows are held as from the version-3 install (and as Trainer(frozen="int8") makes them)
    old = model_from_bytes(v3)
    for a, b in zip(old.param_layers, device.param_layers):
        np.testing.assert_array_equal(_bits(a.weight), _bits(b.weight))
    if old.layer("fc2").is_mixed:
        np.testing.assert_array_equal(old.layer("fc2").weight_q, device.layer("fc2").weight_q)
        np.testing.assert_array_equal(old.layer("fc2").weight_scale, device.layer("fc2").weight_scale)
    # a task trains the same from the install as from the hub's float32 model, bit for bit
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((48, 64)).astype(np.float32), rng.integers(0, 10, 48).astype(np.int32)
    cfg = TaskConfig(batch_size=16, frozen="int8")
    updates = []
    for m in (model.copy(), device):
        with _threads(1):
            result = LocalWorker(m, Subset.from_dict(m, subset.to_dict())).run(hub_values, 0, x, y, cfg, bits=32)
        updates.append(decode_update(result.update))
    assert updates[0].keys() == updates[1].keys()
    for k in updates[0]:
        np.testing.assert_array_equal(_bits(updates[0][k]), _bits(updates[1][k]))


def test_the_digits_mlp_install_drops_by_the_trained_rows_float32_bytes():
    model, subset = _digits_mlp_and_subset()
    quantize_trained_rows(model, [subset])
    v3, v4 = len(install_bytes(model, subset, "int8", model_format=3)), len(install_bytes(model, subset, "int8"))
    trained_rows, values = 86 + 10, (86 + 10) * 256
    # each trained value 1 byte instead of 4, less a scale per trained row, the whole output
    # layer's row indices (float32 in version 3, it had none) and a few header bytes
    assert v3 - v4 >= 3 * values - 4 * trained_rows - 4 * 10 - 64, (v3, v4)
    assert v4 < 0.75 * v3


def test_a_start_not_quantised_keeps_the_version_3_install():
    """Nothing is int8 among the trained rows: the version-4 writer says it as version 3 did."""
    model, subset = _digits_mlp_and_subset()
    assert install_bytes(model, subset, "int8") == install_bytes(model, subset, "int8", model_format=3)
    assert install_bytes(model, subset, "int8", model_format=2) == model_to_bytes(model)


def test_a_trained_row_that_is_not_exactly_int8_is_stored_float32():
    """The writer checks each row: one that dequantising does not give back bit for bit (here, a
    row nudged by one ulp after the round trip) stays float32, never silently changed."""
    model, subset = _digits_mlp_and_subset()
    quantize_trained_rows(model, [subset])
    w = model.layer("fc3")._weight
    w[4, 7] = np.nextafter(w[4, 7], np.float32(np.inf))
    blob = install_bytes(model, subset, "int8")
    head = json.loads(blob[12:12 + struct.unpack_from("<I", blob, 8)[0]])
    assert [s["params"][0][2:] for s in head["layers"] if s["name"] == "fc3"] == [["int8-trained", 10, 1]]
    back = model_from_bytes(blob).layer("fc3").weight
    np.testing.assert_array_equal(_bits(back), _bits(w))


def test_the_scale_is_recovered_when_max_over_127_misses_it_by_an_ulp():
    """levels * s rounds to float32, and max|row| / 127 rounds again: for about one scale in a
    hundred that is not s. The float32 neighbours are tried, and each candidate is verified."""
    rng = np.random.default_rng(1)
    scales = rng.uniform(1e-3, 1.0, 4000).astype(np.float32)
    q = rng.integers(-127, 128, (4000, 9)).astype(np.int8)
    q[:, 0] = 127
    rows = dequantize_rows(q, scales)
    naive = (np.max(np.abs(rows), axis=1) / np.float32(127)).astype(np.float32)
    missed = naive != scales
    assert missed.sum() >= 5                       # the case happens ...
    got_q, got_s, exact = exact_int8_rows(rows)
    assert exact.all()                              # ... and every row is still recovered exactly
    np.testing.assert_array_equal(_bits(dequantize_rows(got_q, got_s)), _bits(rows))
    _, _, exact = exact_int8_rows(rng.standard_normal((50, 9)).astype(np.float32))
    assert not exact.any()                          # values no int8 row gives: none claimed exact
    zero = exact_int8_rows(np.zeros((2, 5), np.float32))
    assert zero[2].all() and not zero[1].any()
    q2, s2 = quantize_rows(rows)                     # the quantiser's own output is found as it is
    assert exact_int8_rows(dequantize_rows(q2, s2))[2].all()


def test_ftte_tiered_quantises_the_rows_any_tier_trains():
    model = ft.zoo("mlp", (16,), 4, hidden=(24, 20), seed=2)
    small = Subset.of(model, {"fc3": {"rows": "all", "bias": True}})
    big = Subset.of(model, {"fc2": {"rows": [0, 2, 7], "bias": True}, "fc3": {"rows": "all", "bias": True}})
    fc1 = model.layer("fc1").weight.copy()
    quantize_trained_rows(model, [small, big])
    np.testing.assert_array_equal(model.layer("fc1").weight, fc1)     # no tier trains it
    for sub, fc2_form in ((small, ["int8"]), (big, ["int8-trained", 3, 0])):
        blob = install_bytes(model, sub, "int8")
        head = json.loads(blob[12:12 + struct.unpack_from("<I", blob, 8)[0]])
        forms = {s["name"]: s["params"][0][2:] for s in head["layers"] if s["params"]}
        assert forms == {"fc1": ["int8"], "fc2": fc2_form, "fc3": ["int8-trained", 4, 0]}
    with pytest.raises(ValueError, match="float32 model"):
        quantize_trained_rows(model_from_bytes(install_bytes(model, big, "int8")), [big])


# -- malformed "int8-trained" storage ------------------------------------------------------------
def _v4():
    model = ft.zoo("mlp", (16,), 4, hidden=(24, 20), seed=5)
    subset = Subset.of(model, {"fc2": {"rows": [1, 4, 6], "bias": True}, "fc3": {"rows": "all", "bias": True}})
    quantize_trained_rows(model, [subset])
    w = model.layer("fc2")._weight
    w[6, 0] = np.nextafter(w[6, 0], np.float32(1))   # row 6 stays float32: F = 1
    blob = install_bytes(model, subset, "int8")
    hlen = struct.unpack_from("<I", blob, 8)[0]
    return blob, json.loads(blob[12:12 + hlen]), blob[12 + hlen:]


def _rebuild(head, arrays, version=4):
    h = json.dumps(head).encode()
    return struct.pack("<4sHHI", b"FTMD", version, 0, len(h)) + h + arrays


def test_malformed_int8_trained_storage_is_refused_in_one_line():
    blob, head, arrays = _v4()
    fc2 = head["layers"][2]["params"][0]
    assert fc2[2:] == ["int8-trained", 3, 1] and model_from_bytes(blob).layer("fc2").is_mixed
    o, per = fc2[1]                                   # 20 rows of 24
    at = int(16 * 24 + 4 * 24 + 24 * 4)              # fc1 int8 (levels, scales) + its bias: fc2's arrays
    levels, scales = at, at + (o - 1) * per
    trained = scales + 4 * (o - 1)
    float_rows = trained + 4 * 3
    float_vals = float_rows + 4
    cases = []

    def header(mutate, match, version=4):
        h = json.loads(json.dumps(head))
        mutate(h["layers"][2]["params"][0])
        cases.append((_rebuild(h, arrays, version), match))

    def data(pos, fmt, value, match):
        bad = bytearray(arrays)
        struct.pack_into(fmt, bad, pos, *value)
        cases.append((_rebuild(head, bytes(bad)), match))

    header(lambda e: e.__setitem__(3, 0), "storage must be")             # no trained row
    header(lambda e: e.__setitem__(3, o + 1), "storage must be")         # more trained rows than rows
    header(lambda e: e.__setitem__(3, 2.5), "storage must be")           # not an integer
    header(lambda e: e.__setitem__(4, 3), "storage must be")             # every trained row float32
    header(lambda e: e.__setitem__(4, -1), "storage must be")
    header(lambda e: e.__setitem__(4, True), "storage must be")
    header(lambda e: e.pop(), "storage must be")                         # [name, shape, form, R]
    header(lambda e: e.append(0), "must be \\[name, shape\\]")           # too long
    header(lambda e: None, "must be \\[name, shape\\]", version=3)      # the form needs version 4
    data(levels, "<b", (-128,), "-128")
    data(scales, "<f", (float("nan"),), "scales must be finite")
    data(scales, "<f", (float("inf"),), "scales must be finite")
    data(scales + 4, "<f", (-0.5,), "scales must be finite and >= 0")
    data(trained, "<ii", (1, 1), "unique")                               # a trained row twice
    data(trained, "<i", (o,), "unique and in")                           # out of range
    data(trained, "<i", (-1,), "unique and in")
    data(float_rows, "<i", (2,), "among the trained rows")               # float32 row 2 does not train
    data(float_rows, "<i", (o + 5,), "among the trained rows")
    data(float_vals, "<f", (float("nan"),), "NaN or Inf")
    cases.append((blob[:float_vals + 12 + struct.unpack_from("<I", blob, 8)[0]], "truncated"))
    cases.append((blob[:-1], "truncated"))
    cases.append((blob + b"\0\0\0\0", "trailing bytes"))
    bias = json.loads(json.dumps(head))
    bias["layers"][2]["params"][1] += ["int8-trained", 1, 0]
    cases.append((_rebuild(bias, arrays), "only its weight may be stored int8"))
    for bad, match in cases:
        with pytest.raises(ModelFileError, match=match) as e:
            model_from_bytes(bad)
        assert "\n" not in str(e.value)


def test_float32_rows_must_be_ascending():
    model = ft.zoo("mlp", (16,), 4, hidden=(24, 20), seed=6)
    subset = Subset.of(model, {"fc2": {"rows": [1, 4, 6], "bias": True}})
    quantize_trained_rows(model, [subset])
    w = model.layer("fc2")._weight
    for r in (4, 6):
        w[r, 0] = np.nextafter(w[r, 0], np.float32(1))
    blob = install_bytes(model, subset, "int8")
    hlen = struct.unpack_from("<I", blob, 8)[0]
    head, arrays = json.loads(blob[12:12 + hlen]), bytearray(blob[12 + hlen:])
    assert head["layers"][2]["params"][0][2:] == ["int8-trained", 3, 2]
    at = 16 * 24 + 4 * 24 + 24 * 4 + (20 - 2) * (24 + 4) + 4 * 3
    assert struct.unpack_from("<ii", arrays, at) == (4, 6)
    struct.pack_into("<ii", arrays, at, 6, 4)
    with pytest.raises(ModelFileError, match="ascending"):
        model_from_bytes(_rebuild(head, bytes(arrays)))


def test_the_weight_limit_counts_an_int8_trained_install_as_float32():
    model, subset = _digits_mlp_and_subset()
    quantize_trained_rows(model, [subset])
    blob = install_bytes(model, subset, "int8")
    as_float32 = 4 * model.num_params()
    with pytest.raises(modelfile.ModelTooLarge):
        model_from_bytes(blob, max_param_bytes=as_float32 - 1)
    model_from_bytes(blob, max_param_bytes=as_float32)


# -- the hub ---------------------------------------------------------------------------------------
def test_the_hub_starts_quantised_and_sends_each_agent_the_install_it_reads(tmp_path):
    """A tight budget: ftte trains with frozen weights int8. The run's model file holds the
    quantised start; an agent of format 4 gets the version-4 install, one of format 3 the
    version-3 one, one that says nothing the float32 file; all three hold the same trained
    values (the downlink resolves from each one's origin without a resync). The hub is stopped
    and resumed from its checkpoint: each agent still got one MODEL."""
    pytest.importorskip("onnx", reason="the hub needs the onnx package")
    from ftte_hub import checkpoint as ckpt
    from ftte_hub.fleet import Hooks
    from ftte_hub.train import run_train

    from test_hub_fakes import FakeAgent, digits_split
    from test_hub_train import KEY, _config
    from slowdev import scaled

    val, parts = digits_split(3)
    formats = (4, 3, None)
    agents = [FakeAgent(KEY, parts[i], f"a{i}", budget=340 << 10, downlink="on", model_format=f)
              for i, f in enumerate(formats)]

    async def first_run():   # "crashes" after its second merge
        for a in agents:
            await a.start()
        merges = []
        hooks = Hooks(on_merge=lambda report, t: merges.append(report))
        run = asyncio.ensure_future(run_train(_config(tmp_path, val, agents, strategy="ftte", buffer=2,
                                                      max_versions=1000), KEY, hooks))
        deadline = asyncio.get_running_loop().time() + scaled(120)
        while len(merges) < 2 and not run.done() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.001)
        assert len(merges) >= 2, run.exception() if run.done() else "no second merge in time"
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)

    async def resumed():
        try:
            cfg = _config(tmp_path, val, agents, strategy="ftte", buffer=2, max_versions=6)
            return await asyncio.wait_for(run_train(cfg, KEY), scaled(300))
        finally:
            for a in agents:
                await a.close()

    async def main():   # one loop: the agents serve both hubs
        await first_run()
        initial = (tmp_path / "run" / ckpt.INITIAL_MODEL).read_bytes()
        return initial, await resumed()

    initial, summary = asyncio.run(main())
    meta = ckpt.load_checkpoint(tmp_path / "run")[0]
    assert meta["task_config"]["frozen"] == "int8"
    assert (tmp_path / "run" / ckpt.INITIAL_MODEL).read_bytes() == initial   # the resume wrote no other
    start = model_from_bytes(initial)
    subset = Subset.from_dict(start, meta["subset"])
    for layer in start.param_layers:   # the run's file holds every trained row as its int8 round trip
        ls = subset.get(layer.name)
        if ls is not None and ls.rows.size:
            assert exact_int8_rows(layer.weight[ls.rows])[2].all(), layer.name
    want = {"a0": install_bytes(start, subset, "int8"), "a1": install_bytes(start, subset, "int8", model_format=3),
            "a2": initial}
    origin = subset_values(start, subset)
    for a, version in zip(agents, (4, 3, 2)):
        # one MODEL across the restart: the resumed hub rebuilt the same bytes (found cached by
        # hash), from the run's file, quantising nothing again
        assert a.model_downloads == 1 and list(a.blobs.values()) == [want[a.agent_id]], a.agent_id
        assert struct.unpack_from("<H", want[a.agent_id], 4)[0] == version
        held = model_from_bytes(next(iter(a.blobs.values())))   # (a.models trained on in place)
        got = subset_values(held, Subset.from_dict(held, meta["subset"]))
        for k in origin:
            np.testing.assert_array_equal(_bits(origin[k]), _bits(got[k]))
        assert a.tasks >= 1 and a.resyncs == 0
    assert len(want["a0"]) < len(want["a1"]) < len(initial)
    assert summary["version"] == 6 and all(a.connections >= 2 for a in agents)
