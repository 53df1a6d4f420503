"""Update codec: encode/decode against NumPy, the wire format, and strict parsing of bad bytes."""
import json
import struct

import numpy as np
import pytest

import ftte_core as ft
from ftte_core import _kernels as K
from ftte_core.update import (MAGIC, TensorDelta, Update, UpdateError, UpdateRejected, check_update, decode_update,
                              encode_update, load_values, subset_values)


def _setup(seed=0, bias_rows=True):
    model = ft.zoo("mlp", (8,), 3, hidden=(6,), seed=seed)
    subset = ft.Subset.of(model, {"fc1": {"rows": [1, 3, 4], "bias": bias_rows}, "fc2": {"rows": "all", "bias": True}})
    return model, subset


def _perturb(model, subset, seed=1, scale=0.05):
    """Stand-in for local training: move every trainable value by a random amount."""
    rng = np.random.default_rng(seed)
    true = {}
    for key, _l, view, rows in subset.tensors(model):
        r = rows if rows is not None else np.arange(view.shape[0])
        d = (scale * rng.standard_normal((r.size, view.shape[1]))).astype(np.float32)
        before = view[r].copy()
        view[r] += d
        true[key] = view[r] - before
    return true


def _update(bits=8, seed=0, **kw):
    model, subset = _setup()
    base = subset_values(model, subset)
    true = _perturb(model, subset, seed + 1)
    u = encode_update(model, subset, base, 0, 20, 0.7, bits=bits, seed=seed, device_id="pi-1", task_id="t1", **kw)
    return model, subset, base, true, u


def test_subset_values_are_copies_in_subset_order():
    model, subset = _setup()
    vals = subset_values(model, subset)
    assert list(vals) == [k for k, *_ in subset.tensors(model)] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert vals["fc1.weight"].shape == (3, 8) and vals["fc1.bias"].shape == (1, 6) and vals["fc2.weight"].shape == (3, 6)
    np.testing.assert_array_equal(vals["fc1.weight"], model.layer("fc1").weight[[1, 3, 4]])
    vals["fc1.weight"][:] = 99
    assert not np.any(model.layer("fc1").weight == 99)
    other = ft.zoo("mlp", (8,), 3, hidden=(6,), seed=5)
    load_values(other, subset, subset_values(model, subset))
    np.testing.assert_array_equal(other.layer("fc1").weight[[1, 3, 4]], model.layer("fc1").weight[[1, 3, 4]])
    assert not np.array_equal(other.layer("fc1").weight[0], model.layer("fc1").weight[0])  # untouched rows stay


@pytest.mark.parametrize("bits,stochastic", [(8, False), (8, True), (4, False), (4, True), (32, False)])
def test_encode_decode_matches_numpy_delta(bits, stochastic):
    _, _, _, true, u = _update(bits, stochastic=stochastic)
    dec = decode_update(u)
    levels = {8: 127, 4: 7}.get(bits)
    for t in u.tensors:
        d = true[t.key]
        assert t.shape == d.shape and dec[t.key].dtype == np.float32
        if bits == 32:
            np.testing.assert_array_equal(dec[t.key], d)
            continue
        scale = np.abs(d).max(axis=1) / levels
        np.testing.assert_allclose(t.scales, scale, rtol=1e-6)
        # nearest: within half a step; stochastic: within one step
        err = np.abs(dec[t.key] - d)
        assert np.all(err <= scale[:, None] * (1.0 if stochastic else 0.5) * (1 + 1e-5) + 1e-12)
    assert u.stats["delta_l2"] == pytest.approx(np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in true.values())))


def test_stochastic_rounding_is_unbiased_over_seeds():
    model, subset = _setup()
    base = subset_values(model, subset)
    true = _perturb(model, subset, 3)
    acc = {k: np.zeros_like(v, dtype=np.float64) for k, v in true.items()}
    n = 400
    for s in range(n):
        for k, v in decode_update(encode_update(model, subset, base, 0, 1, 0.0, bits=4, seed=s)).items():
            acc[k] += v
    for k, d in true.items():
        step = np.abs(d).max(axis=1, keepdims=True) / 7
        # mean of n draws: standard error <= step / (2 sqrt n); allow 5 sigma
        assert np.all(np.abs(acc[k] / n - d) <= 5 * step / (2 * np.sqrt(n)) + 1e-7)


def test_encode_is_reproducible_and_thread_count_independent():
    outs = []
    for threads in (1, 2):
        K.set_num_threads(threads)
        outs.append(_update(8, seed=7)[-1].to_bytes())
    outs.append(_update(8, seed=7)[-1].to_bytes())
    assert outs[0] == outs[1] == outs[2]
    assert _update(8, seed=8)[-1].to_bytes() != outs[0]


def test_encode_rejects_non_finite_and_bad_bases():
    model, subset = _setup()
    base = subset_values(model, subset)
    model.layer("fc2").weight[1, 2] = np.nan
    for bits in (8, 4, 32):
        with pytest.raises(ValueError, match="NaN or Inf"):
            encode_update(model, subset, base, 0, 1, 0.0, bits=bits)
    model, subset = _setup()
    with pytest.raises(ValueError, match="bits"):
        encode_update(model, subset, base, 0, 1, 0.0, bits=16)
    bad = dict(base)
    bad["fc1.weight"] = bad["fc1.weight"][:2]
    with pytest.raises(ValueError, match="fc1.weight"):
        encode_update(model, subset, bad, 0, 1, 0.0)
    with pytest.raises(ValueError, match="loss"):
        encode_update(model, subset, base, 0, 1, float("nan"))


@pytest.mark.parametrize("bits", [8, 4, 32])
def test_bytes_round_trip(bits):
    *_, u = _update(bits, peak_memory_bytes=12345)
    buf = u.to_bytes()
    assert buf[:4] == MAGIC and u.nbytes == len(buf)
    v = Update.from_bytes(buf)
    assert (v.base_version, v.subset_fingerprint, v.num_samples, v.loss, v.device_id, v.task_id, v.peak_memory_bytes) == \
        (u.base_version, u.subset_fingerprint, u.num_samples, u.loss, u.device_id, u.task_id, 12345)
    assert v.stats == u.stats
    for a, b in zip(u.tensors, v.tensors):
        assert (a.key, a.bits, tuple(a.shape)) == (b.key, b.bits, tuple(b.shape))
        np.testing.assert_array_equal(a.data, b.data)
        assert b.data.flags.writeable and b.data.flags.c_contiguous
        if bits != 32:
            np.testing.assert_array_equal(a.scales, b.scales)
    assert v.to_bytes() == buf
    assert Update.from_bytes(bytearray(buf)).to_bytes() == buf and Update.from_bytes(memoryview(buf)).to_bytes() == buf


def test_payload_sizes_int8_vs_float():
    *_, u8 = _update(8)
    *_, u4 = _update(4)
    *_, u32 = _update(32)
    p = [sum(t.payload_bytes for t in u.tensors) for u in (u8, u4, u32)]
    assert p[0] < p[2] / 2 and p[1] < p[0]


def _parse_or_update_error(buf):
    try:
        Update.from_bytes(buf)
    except UpdateError as e:
        msg = str(e)
        assert msg and "\n" not in msg
        return False
    return True


def test_truncated_bytes_rejected():
    *_, u = _update(8)
    buf = u.to_bytes()
    for n in range(len(buf)):
        with pytest.raises(UpdateError):
            Update.from_bytes(buf[:n])
    with pytest.raises(UpdateError, match="describes"):
        Update.from_bytes(buf + b"\0")


def test_bit_flips_never_crash():
    for bits in (8, 4, 32):
        *_, u = _update(bits)
        buf = bytearray(u.to_bytes())
        for i in range(len(buf)):
            for b in (0, 3, 7):
                flipped = bytearray(buf)
                flipped[i] ^= 1 << b
                if _parse_or_update_error(bytes(flipped)):
                    # a flip the format cannot see (inside array data or a free-form string) still parses to
                    # something check_update can judge; it must not raise anything but UpdateRejected
                    model, subset = _setup()
                    try:
                        check_update(Update.from_bytes(bytes(flipped)), model, subset, 0)
                    except UpdateRejected:
                        pass


def test_random_and_hostile_bytes():
    rng = np.random.default_rng(0)
    for n in [0, 1, 11, 12, 13, 100, 1000, 5000]:
        for _ in range(20):
            assert not _parse_or_update_error(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    prefix = struct.Struct("<4sHHI")
    # valid prefix + random header bytes
    for _ in range(50):
        h = rng.integers(0, 256, 40, dtype=np.uint8).tobytes()
        assert not _parse_or_update_error(prefix.pack(MAGIC, 1, 0, len(h)) + h)
    with pytest.raises(UpdateError, match="magic"):
        Update.from_bytes(b"XXXX" + bytes(20))
    with pytest.raises(UpdateError, match="format version"):
        Update.from_bytes(prefix.pack(MAGIC, 99, 0, 0))
    with pytest.raises(UpdateError, match="header length"):
        Update.from_bytes(prefix.pack(MAGIC, 1, 0, 0xFFFFFFFF))
    with pytest.raises(UpdateError, match="limit"):
        Update.from_bytes(bytes(100), max_bytes=50)
    with pytest.raises(UpdateError, match="expected bytes"):
        Update.from_bytes(12)


def _reframe(u, edit_raw):
    """Re-frame u's arrays under a header whose raw JSON text was edited."""
    buf = u.to_bytes()
    hlen = struct.unpack_from("<I", buf, 8)[0]
    h = edit_raw(buf[12:12 + hlen])
    return buf[:8] + struct.pack("<I", len(h)) + h + buf[12 + hlen:]


def _with_header(u, edit):
    def go(raw):
        head = json.loads(raw)
        edit(head)
        return json.dumps(head).encode()
    return _reframe(u, go)


@pytest.mark.parametrize("edit,match", [
    (lambda h: h["tensors"][0]["shape"].__setitem__(0, 10 ** 6), "describes"),        # would need 8 MB: refused by length
    (lambda h: h["tensors"][0]["shape"].__setitem__(1, 2 ** 40), "shape"),
    (lambda h: h["tensors"][0].__setitem__("bits", 16), "bits"),
    (lambda h: h["tensors"][0].__setitem__("dtype", "<f8"), "dtype"),
    (lambda h: h["tensors"][1].__setitem__("key", "fc1.weight"), "key"),
    (lambda h: h.__setitem__("num_samples", -1), "num_samples"),
    (lambda h: h.__setitem__("num_samples", 1.5), "num_samples"),
    (lambda h: h.__setitem__("base_version", True), "base_version"),
    (lambda h: h.__setitem__("loss", "x"), "loss"),
    (lambda h: h.__setitem__("stats", {"a": "b"}), "stats"),
    (lambda h: h.__setitem__("extra", 1), "unexpected"),
    (lambda h: h.pop("loss"), "missing"),
    (lambda h: h.__setitem__("tensors", {}), "tensors"),
    (lambda h: h.__setitem__("device_id", "x" * 1000), "device_id"),
])
def test_bad_headers_rejected(edit, match):
    *_, u = _update(8)
    with pytest.raises(UpdateError, match=match):
        Update.from_bytes(_with_header(u, edit))


def test_non_finite_payloads_and_constants_rejected():
    *_, u = _update(32)
    u.tensors[0].data[0, 0] = np.inf
    with pytest.raises(UpdateError, match="NaN or Inf"):
        Update.from_bytes(u.to_bytes())
    *_, u = _update(8)
    u.tensors[1].scales[0] = np.nan
    with pytest.raises(UpdateError, match="scales"):
        Update.from_bytes(u.to_bytes())
    *_, u = _update(8)
    u.tensors[0].data[0, 0] = -128
    with pytest.raises(UpdateError, match="-128"):
        Update.from_bytes(u.to_bytes())
    *_, u = _update(8)
    u.loss = float("nan")
    with pytest.raises(UpdateError, match="NaN"):
        u.to_bytes()
    for text, match in [(b"NaN", "NaN"), (b"Infinity", "Infinity"), (b"1e999", "loss")]:
        buf = _reframe(_update(8)[-1], lambda raw: raw.replace(b'"loss":0.7', b'"loss":' + text))
        with pytest.raises(UpdateError, match=match):
            Update.from_bytes(buf)
    buf = _reframe(_update(8)[-1], lambda raw: raw.replace(b'"device_id"', b'"loss":1,"device_id"'))
    with pytest.raises(UpdateError, match="repeats"):
        Update.from_bytes(buf)


def test_check_update_accepts_good_and_names_each_defect():
    model, subset, _, _, u = _update(8)
    check_update(u, model, subset, 0)
    check_update(u, model, subset, 5, bits=8)

    def rejected(reason, mutate, version=0, bits=None):
        *_, v = _update(8)
        mutate(v)
        with pytest.raises(UpdateRejected) as e:
            check_update(v, model, subset, version, bits=bits)
        assert e.value.reason == reason and "\n" not in str(e.value)

    rejected("subset", lambda v: setattr(v, "subset_fingerprint", "0" * 16))
    rejected("future_version", lambda v: setattr(v, "base_version", 1))
    rejected("version", lambda v: setattr(v, "base_version", -1))
    rejected("samples", lambda v: setattr(v, "num_samples", 0))
    rejected("keys", lambda v: v.tensors.pop())
    rejected("keys", lambda v: v.tensors.append(TensorDelta("fc9.bias", 8, np.zeros((1, 3), np.int8), np.ones(1, np.float32), (1, 3))))
    rejected("keys", lambda v: v.tensors.reverse())
    rejected("shape", lambda v: setattr(v.tensors[0], "shape", (2, 8)))
    rejected("shape", lambda v: setattr(v.tensors[0], "data", v.tensors[0].data[:, :4].copy()))
    rejected("shape", lambda v: setattr(v.tensors[0], "data", v.tensors[0].data.astype(np.int16)))
    rejected("bits", lambda v: None, bits=4)
    rejected("non_finite", lambda v: v.tensors[2].scales.__setitem__(0, np.inf))
    rejected("non_finite", lambda v: setattr(v, "loss", float("nan")))
    with pytest.raises(UpdateRejected, match="expected an Update"):
        check_update(b"bytes", model, subset, 0)
    # a float update with a NaN value
    *_, v = _update(32)
    v.tensors[0].data[1, 1] = np.nan
    with pytest.raises(UpdateRejected) as e:
        check_update(v, model, subset, 0)
    assert e.value.reason == "non_finite"
    # another subset of the same model
    other = ft.Subset.of(model, {"fc2": {"rows": "all", "bias": True}})
    with pytest.raises(UpdateRejected) as e:
        check_update(u, model, other, 0)
    assert e.value.reason == "subset"
