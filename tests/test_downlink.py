"""Downlink deltas (ftte_core.downlink): the canonical stream, its frames, and what each side holds."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from ftte_core import downlink as DL
from ftte_core import messages as M
from ftte_core.binfmt import PREFIX
from ftte_core.local import TaskConfig


def _values(rng, shapes=((6, 9), (4, 1), (3, 5))):
    return {f"t{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}


def _walk(rng, values, scale=0.01):
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in values.items()}


def _ref_quantise(target, base):
    """NumPy reference of one step: nearest rounding half away from zero, scale = max|d| / 127."""
    out = {}
    for k, b in base.items():
        d = target[k].astype(np.float32) - b
        m = np.max(np.abs(d), axis=1).astype(np.float32)
        scale = (m / np.float32(127)).astype(np.float32)
        inv = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
        x = (d * inv[:, None]).astype(np.float32)
        q = np.clip(np.sign(x) * np.floor(np.abs(x) + np.float32(0.5)), -127, 127).astype(np.int8)
        out[k] = (scale, q)
    return out


def test_step_matches_numpy_reference_and_applies_exactly():
    rng = np.random.default_rng(0)
    base = _values(rng)
    target = _walk(rng, base)
    target["t1"] = base["t1"].copy()                    # a row block that does not change at all
    step = DL.quantise_step(target, base)
    ref = _ref_quantise(target, base)
    for k in base:
        scale, q = ref[k]
        np.testing.assert_array_equal(step[k].scales, scale)
        np.testing.assert_array_equal(step[k].levels, q[scale != 0])
    assert step["t1"].levels.shape == (0, 1) and not step["t1"].scales.any()   # unchanged rows carry no levels
    new = DL.apply_step(base, step)
    for k in base:
        expect = base[k] + q_dec(ref[k])
        np.testing.assert_array_equal(new[k], expect)
        # nearest rounding: within half a step of the target
        assert np.all(np.abs(new[k] - target[k]) <= ref[k][0][:, None] * 0.5 + 1e-7)


def q_dec(ref):
    scale, q = ref
    return (q.astype(np.float32) * scale[:, None]).astype(np.float32)


def test_stream_error_feedback_keeps_canonical_close_and_frames_round_trip():
    rng = np.random.default_rng(1)
    origin = _values(rng)
    stream = DL.DownlinkStream(origin, "s1", history=4)
    true = dict(origin)
    held = None
    for v in range(12):
        true = _walk(rng, true)
        stream.publish(v, true)
        frame = stream.frame_for(DL.ORIGIN if held is None else held.version, v)
        blob = DL.encode_frame(frame)
        assert len(blob) == DL.frame_bytes(frame)
        got = DL.decode_frame(blob)
        values = DL.resolve(got, held, origin)
        held = DL.Held(got.stream, got.version, got.checksum, values)
        for k in true:  # the agent holds exactly the hub's canonical values ...
            np.testing.assert_array_equal(values[k], stream.values[k])
        # ... which stay within one quantisation step of the hub's float values (no drift)
        assert max(float(np.max(np.abs(values[k] - true[k]))) for k in true) < 5e-4
        assert got.kind == "delta"
    assert stream.checksum == DL.values_checksum(held.values)


def test_bookkeeping_chain_snapshot_and_history():
    rng = np.random.default_rng(2)
    origin = _values(rng, ((16, 32), (8, 1)))
    stream = DL.DownlinkStream(origin, "s2", history=3)
    true = dict(origin)
    for v in (0, 2, 5, 6, 9):           # versions without tasks are skipped: steps join published ones
        true = _walk(rng, true)
        stream.publish(v, true)
    assert [(e.base, e.version) for e in stream.entries] == [(2, 5), (5, 6), (6, 9)]
    assert stream.frame_for(None).kind == "snapshot"          # unknown: snapshot
    assert stream.frame_for(0).kind == "snapshot"             # older than the history
    assert stream.frame_for(DL.ORIGIN).kind == "snapshot"     # the origin's steps are gone
    f = stream.frame_for(5)
    assert f.kind == "delta" and [v for v, _ in f.steps] == [6, 9] and f.base == 5
    same = stream.frame_for(9)
    assert same.kind == "delta" and same.steps == [] and same.base == 9   # holds the latest: names it only
    assert DL.resolve(DL.decode_frame(DL.encode_frame(same)), DL.Held("s2", 9, stream.checksum, stream.values),
                      None)["t0"] is not None
    stream.publish(9, true)                                   # idempotent per version
    assert len(stream.entries) == 3
    with pytest.raises(ValueError):
        stream.publish(3, true)                               # the stream only moves forward
    with pytest.raises(ValueError):
        stream.frame_for(5, version=8)


def test_snapshot_when_the_chain_is_larger():
    rng = np.random.default_rng(3)
    origin = {"w": rng.standard_normal((2, 2)).astype(np.float32)}   # tiny rows: 4 B scale + 2 B levels per row
    stream = DL.DownlinkStream(origin, "s3", history=64)
    true = dict(origin)
    for v in range(6):
        true = _walk(rng, true)
        stream.publish(v, true)
    assert stream.frame_for(0).kind == "snapshot"   # five steps of 12 B + header outweigh 16 B of values
    snap = DL.decode_frame(DL.encode_frame(stream.frame_for(None)))
    np.testing.assert_array_equal(DL.resolve(snap, None, None)["w"], stream.values["w"])


def test_resolve_refuses_what_does_not_check():
    rng = np.random.default_rng(4)
    origin = _values(rng)
    stream = DL.DownlinkStream(origin, "s4")
    true = _walk(rng, origin)
    stream.publish(0, true)
    v0 = DL.Held("s4", 0, stream.checksum, stream.values)
    stream.publish(1, _walk(rng, true))
    frame = DL.decode_frame(DL.encode_frame(stream.frame_for(0)))
    with pytest.raises(DL.DownlinkError, match="holds nothing"):
        DL.resolve(frame, None, None)
    with pytest.raises(DL.DownlinkError, match="holds version 3"):
        DL.resolve(frame, DL.Held("s4", 3, v0.checksum, v0.values), None)
    with pytest.raises(DL.DownlinkError, match="stream"):
        DL.resolve(frame, DL.Held("other", 0, v0.checksum, v0.values), None)
    drifted = {k: v.copy() for k, v in v0.values.items()}
    drifted["t0"][0, 0] = np.nextafter(drifted["t0"][0, 0], np.float32(9))   # one ulp off
    with pytest.raises(DL.DownlinkError, match="base values"):
        DL.resolve(frame, DL.Held("s4", 0, v0.checksum, drifted), None)
    wrong = DL.decode_frame(DL.encode_frame(stream.frame_for(0)))
    wrong.checksum = "0" * 32
    with pytest.raises(DL.DownlinkError, match="do not match checksum"):
        DL.resolve(wrong, v0, None)
    assert DL.resolve(frame, v0, None)["t0"].dtype == np.float32
    with pytest.raises(DL.DownlinkError, match="model file"):
        DL.resolve(DL.decode_frame(DL.encode_frame(_origin_frame(origin))), None, None)


def _origin_frame(origin):
    s = DL.DownlinkStream(origin, "s5")
    s.publish(0, origin)
    return s.frame_for(DL.ORIGIN)


def _good_frame() -> bytes:
    rng = np.random.default_rng(5)
    origin = _values(rng, ((3, 16), (2, 1)))
    s = DL.DownlinkStream(origin, "fz")
    true = dict(origin)
    for v in range(3):
        true = _walk(rng, true)
        s.publish(v, true)
    frame = s.frame_for(1)
    assert frame.kind == "delta"
    return DL.encode_frame(frame)


def test_malformed_frames_are_refused_with_one_line():
    good = _good_frame()
    DL.decode_frame(good)
    rng = np.random.default_rng(6)
    refused = 0
    for i in range(300):
        bad = bytearray(good)
        kind = i % 3
        if kind == 0:
            pos = int(rng.integers(len(bad)))
            bad[pos] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            bad = bad[:int(rng.integers(len(bad)))]
        else:
            pos = int(rng.integers(len(bad) + 1))
            bad[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
        try:
            DL.decode_frame(bytes(bad))
        except DL.DownlinkError as e:
            assert "\n" not in str(e) and str(e)
            refused += 1
    assert refused > 150   # truncations and insertions always; flips in the data may still parse


@pytest.mark.parametrize("patch", [
    {"kind": "other"}, {"stream": "bad id!"}, {"version": -1}, {"version": 1 << 70}, {"checksum": "XY"},
    {"tensors": []}, {"tensors": [["a", 0, 3]]}, {"tensors": [["a", 1 << 20, 1 << 20]]},
    {"tensors": [["a", 2, 2], ["a", 2, 2]]}, {"steps": [2, 1]}, {"steps": list(range(300))}, {"base": 5},
    {"base": True}, {"extra": 1}, {"steps": [1]},
])
def test_hostile_headers(patch):
    good = _good_frame()
    _magic, _ver, _flags, hlen = PREFIX.unpack_from(good, 0)
    head = json.loads(good[PREFIX.size:PREFIX.size + hlen])
    head.update(patch)
    h = json.dumps(head).encode()
    bad = PREFIX.pack(DL.MAGIC, DL.FORMAT_VERSION, 0, len(h)) + h + good[PREFIX.size + hlen:]
    with pytest.raises(DL.DownlinkError):
        DL.decode_frame(bad)


def test_level_minus_128_and_negative_scales_are_refused():
    good = bytearray(_good_frame())
    _m, _v, _f, hlen = PREFIX.unpack_from(good, 0)
    off = PREFIX.size + hlen
    bad = bytearray(good)
    bad[off:off + 4] = struct.pack("<f", -1.0)
    with pytest.raises(DL.DownlinkError, match="negative"):
        DL.decode_frame(bytes(bad))
    bad = bytearray(good)
    bad[off + 12] = 0x80     # the first level after three scales of the first tensor
    with pytest.raises(DL.DownlinkError, match="-128"):
        DL.decode_frame(bytes(bad))


def test_task_carries_a_frame_and_checks_its_version():
    rng = np.random.default_rng(7)
    origin = _values(rng, ((3, 4),))
    s = DL.DownlinkStream(origin, "tk")
    s.publish(4, _walk(rng, origin))
    blob = DL.encode_frame(s.frame_for(DL.ORIGIN))
    msg = M.TaskMessage(task_id="r-t1", run_id="r", base_version=4, model_hash="ab" * 32, subset={},
                        subset_fingerprint="fp", config=TaskConfig(lr=0.1), seed=1, bits=8, values={})
    got = M.decode_task(M.encode_task(msg, downlink_blob=blob))
    assert got.values == {} and got.downlink.version == 4 and got.downlink.base is None
    msg.base_version = 5
    with pytest.raises(M.MessageError, match="version 4"):
        M.decode_task(M.encode_task(msg, downlink_blob=blob))
    msg.base_version = 4
    body = M.encode_task(msg, downlink_blob=blob)
    for cut in (len(body) - 1, len(body) - len(blob) + 3):
        with pytest.raises(M.MessageError):
            M.decode_task(body[:cut])


def test_downlink_bytes_counts_what_the_fleet_sends():
    rng = np.random.default_rng(8)
    origin = _values(rng)
    s = DL.DownlinkStream(origin, "sim")
    true = _walk(rng, origin)
    n0, held = DL.downlink_bytes(s, DL.ORIGIN, 0, true)
    assert held == 0 and n0 == len(DL.encode_frame(s.frame_for(DL.ORIGIN)))
    n_same, _ = DL.downlink_bytes(s, 0, 0, true)
    n_snap, _ = DL.downlink_bytes(s, None, 0, true)
    assert n_same < n0 < n_snap and n_snap > s.snapshot_bytes


def test_parse_held_reads_garbage_as_nothing():
    assert DL.parse_held({"stream": "a", "version": 3, "checksum": "0" * 32}) == ("a", 3, "0" * 32)
    for bad in (None, [], {"stream": "a"}, {"stream": "a", "version": True, "checksum": "0" * 32},
                {"stream": "a b", "version": 1, "checksum": "0" * 32}, {"stream": "a", "version": 1, "checksum": "z"}):
        assert DL.parse_held(bad) is None


def test_int4_stream_round_trips_and_stays_within_its_step():
    rng = np.random.default_rng(9)
    origin = _values(rng, ((8, 33), (4, 1)))          # an odd row length: the last byte's high nibble is padding
    stream = DL.DownlinkStream(origin, "q4", bits=4)
    true = dict(origin)
    held = None
    for v in range(8):
        true = _walk(rng, true)
        stream.publish(v, true)
        frame = stream.frame_for(DL.ORIGIN if held is None else held.version, v)
        blob = DL.encode_frame(frame)
        assert len(blob) == DL.frame_bytes(frame) and frame.kind == "delta" and frame.bits == 4
        got = DL.decode_frame(blob)
        values = DL.resolve(got, held, origin)
        held = DL.Held(got.stream, got.version, got.checksum, values)
        for k in true:
            np.testing.assert_array_equal(values[k], stream.values[k])
    # int4 levels: each row of the last step within half a level of its scale
    last = stream.entries[-1].step
    for k in true:
        np.testing.assert_array_equal(DL._levels_f32(last[k].levels, true[k].shape[1]).shape,
                                      (int(np.count_nonzero(last[k].scales)), true[k].shape[1]))
    # a nibble of -8 is refused
    bad = bytearray(DL.encode_frame(stream.frame_for(6)))
    _m, _v, _f, hlen = PREFIX.unpack_from(bad, 0)
    bad[PREFIX.size + hlen + 4 * 8] = 0x08
    with pytest.raises(DL.DownlinkError, match="-8"):
        DL.decode_frame(bytes(bad))


def test_counter_tracks_each_device():
    rng = np.random.default_rng(10)
    origin = _values(rng, ((16, 32),))
    c = DL.DownlinkCounter(origin, direct=False)      # canonical frames only (the hub's --no-direct-steps)
    true = _walk(rng, origin)
    n_a, vals = c.task("a", 0, true)
    n_a2, _ = c.task("a", 0, true)                # holds version 0 already
    true = _walk(rng, true)
    n_b, _ = c.task("b", 1, true)                 # from the origin: two steps
    c.forget("a")
    n_snap, vals1 = c.task("a", 1, true)
    assert n_a2 < n_a < n_b < n_snap and n_snap > c.stream.snapshot_bytes
    assert vals1 is c.stream.values and np.max(np.abs(vals1["t0"] - true["t0"])) < 1e-3


@pytest.mark.parametrize("downlink, fmt, held", [
    (None, 0, None), ({"format": 1}, 1, None), ({"format": 2}, 0, None), ("yes", 0, None),
    ({"format": 1, "stream": "s", "version": 4, "checksum": "a" * 32}, 1, ("s", 4, "a" * 32)),
    ({"format": 1, "stream": "s", "version": -4, "checksum": "a" * 32}, 1, None),
    ({"format": True, "stream": "s", "version": 4, "checksum": "a" * 32}, 0, None),
    # a mirror (a direct step's result) names no version; a null or bad version is not a mirror
    ({"format": 1, "stream": "s", "checksum": "b" * 32}, 1, ("s", None, "b" * 32)),
    ({"format": 1, "stream": "s", "version": None, "checksum": "b" * 32}, 1, None),
    ({"format": 1, "stream": "s", "version": "4", "checksum": "b" * 32}, 1, None),
    ({"format": 1, "stream": "s" * 65, "checksum": "b" * 32}, 1, None),
    ({"format": 1, "stream": "s", "checksum": "B" * 32}, 1, None),
])
def test_hub_reads_what_an_agent_holds_and_never_trusts_garbage(downlink, fmt, held):
    from ftte_hub.fleet import parse_agent_info

    info = {"agent_id": "a1", "memory_budget": 1 << 20}
    if downlink is not None:
        info["downlink"] = downlink
    got = parse_agent_info(json.dumps(info).encode())
    assert (got["downlink_format"], got["downlink_held"]) == (fmt, held)
    assert got["downlink_direct"] is False          # it did not say it resolves direct steps


@pytest.mark.parametrize("direct, takes", [(True, True), (False, False), ("true", False), (1, False)])
def test_hub_sends_direct_steps_only_to_agents_that_say_they_resolve_them(direct, takes):
    from ftte_hub.fleet import parse_agent_info

    info = {"agent_id": "a1", "memory_budget": 1 << 20, "downlink": {"format": 1, "direct": direct}}
    assert parse_agent_info(json.dumps(info).encode())["downlink_direct"] is takes


def test_history_holds_less_than_one_snapshot_of_steps():
    rng = np.random.default_rng(11)
    origin = _values(rng, ((16, 32),))           # a step is 16*32 + 64 = 576 B, a snapshot 2048 B
    stream = DL.DownlinkStream(origin, "hb", history=64)
    true = dict(origin)
    for v in range(10):
        true = _walk(rng, true)
        stream.publish(v, true)
        assert stream.history_bytes == sum(e.nbytes for e in stream.entries) < stream.snapshot_bytes
    assert len(stream.entries) == 3
    assert stream.frame_for(6).kind == "delta" and stream.frame_for(5).kind == "snapshot"
    assert stream.frame_for(9).kind == "delta"   # the latest needs no step at all


# -- direct steps (per-device mirrors) -------------------------------------------------------------
def _behind_stream(rng, versions=7, bits=8):
    """A stream published ``versions`` times, an agent that holds version 0 (canonical values)."""
    origin = _values(rng, ((32, 48), (32, 1)))
    stream = DL.DownlinkStream(origin, "dir", bits=bits)
    true = _walk(rng, origin, 0.05)
    stream.publish(0, true)
    held = DL.Held("dir", 0, stream.checksum, stream.values)
    mirror = DL.Mirror("dir", stream.checksum, stream.values, 0)
    for v in range(1, versions):
        true = _walk(rng, true, 0.05)
        stream.publish(v, true)
    return origin, stream, held, mirror, true


@pytest.mark.parametrize("bits", [8, 4])
def test_direct_step_round_trip_resolves_bit_for_bit_and_is_smaller_than_the_chain(bits):
    rng = np.random.default_rng(20)
    origin, stream, held, mirror, true = _behind_stream(rng, bits=bits)
    sent = stream.frame_for_device(0, mirror)
    chain = stream.frame_for(0)
    assert sent.frame.kind == "direct" and sent.frame.source == "held" and sent.version is None
    assert DL.frame_bytes(sent.frame) < DL.frame_bytes(chain)
    blob = DL.encode_frame(sent.frame)
    assert len(blob) == DL.frame_bytes(sent.frame)
    frame = DL.decode_frame(blob)
    assert DL.encode_frame(frame) == blob
    got = DL.resolve(frame, held, None)
    after = DL.held_after(frame, got)
    assert after.version is None and after.checksum == sent.mirror.checksum == DL.values_checksum(got)
    assert after.describe() == {"stream": "dir", "checksum": sent.mirror.checksum}
    scale = 127 if bits == 8 else 7
    for k in got:
        np.testing.assert_array_equal(got[k], sent.mirror.values[k])      # both sides: bit for bit
        # one quantisation step from the canonical values, which it is not
        err = np.abs(got[k] - stream.values[k])
        assert np.all(err <= np.max(np.abs(stream.values[k] - held.values[k]), axis=1)[:, None] / scale * 0.5 + 1e-6)
    # error feedback: the next direct step starts from the exact mirror, and the canonical
    # values did not move, so the step is a zero step (it trains from what it holds)
    again = stream.frame_for_device(None, sent.mirror)
    assert again.frame.kind == "direct" and not any(t.scales.any() for t in again.frame.steps[0][1].values())
    stream.publish(7, _walk(rng, true, 0.05))
    nxt = stream.frame_for_device(None, sent.mirror)
    got2 = DL.resolve(DL.decode_frame(DL.encode_frame(nxt.frame)), after, None)
    assert DL.values_checksum(got2) == nxt.mirror.checksum


def test_direct_step_from_the_model_files_values():
    rng = np.random.default_rng(21)
    origin, stream, _held, _mirror, _true = _behind_stream(rng)
    sent = stream.frame_for_device(DL.ORIGIN)            # a new device: the chain from the origin is long
    assert sent.frame.kind == "direct" and sent.frame.source == "origin" and sent.frame.needs_origin
    frame = DL.decode_frame(DL.encode_frame(sent.frame))
    with pytest.raises(DL.DownlinkError, match="model file"):
        DL.resolve(frame, None, None)
    got = DL.resolve(frame, None, origin)
    assert DL.values_checksum(got) == sent.mirror.checksum


def test_direct_step_refuses_values_it_was_not_built_on():
    rng = np.random.default_rng(22)
    origin, stream, held, mirror, _true = _behind_stream(rng)
    frame = DL.decode_frame(DL.encode_frame(stream.frame_for_device(0, mirror).frame))
    other = DL.Held("dir", None, "0" * 32, {k: v + 1 for k, v in held.values.items()})
    with pytest.raises(DL.DownlinkError, match="direct step from values"):
        DL.resolve(frame, other, None)
    with pytest.raises(DL.DownlinkError, match="direct step from values"):
        DL.resolve(frame, None, origin)
    # its checksum says yes, its values no
    lying = DL.Held("dir", 0, held.checksum, {k: v + 1 for k, v in held.values.items()})
    with pytest.raises(DL.DownlinkError, match="base values do not match"):
        DL.resolve(frame, lying, None)
    frame.checksum = "f" * 32                            # a result that does not check
    with pytest.raises(DL.DownlinkError, match="do not match checksum"):
        DL.resolve(frame, held, None)
    # the hub never builds on values it does not know: no mirror, no version = a snapshot
    assert stream.frame_for_device(None, None).frame.kind == "snapshot"
    assert stream.frame_for_device(None, DL.Mirror("other-stream", held.checksum, held.values)).frame.kind == "snapshot"
    assert stream.frame_for_device(0, mirror, direct=False).frame.kind == stream.frame_for(0).kind


def _direct_blob(rng):
    _origin, stream, _held, mirror, _true = _behind_stream(rng, versions=3)
    return DL.encode_frame(stream.frame_for_device(0, mirror).frame)


@pytest.mark.parametrize("change, match", [
    (lambda h: h.update({"from": "elsewhere"}), "from must be"),
    (lambda h: h.pop("from"), "exactly the fields"),
    (lambda h: h.update({"steps": [2]}), "exactly the fields"),
    (lambda h: h.update({"bits": 2}), "bits must be 8 or 4"),
    (lambda h: h.update({"base_checksum": "x"}), "base_checksum"),
    (lambda h: h.update({"kind": "mirror"}), "exactly the fields"),
])
def test_malformed_direct_headers_are_one_line_errors(change, match):
    blob = _direct_blob(np.random.default_rng(23))
    _m, _v, _f, hlen = PREFIX.unpack_from(blob, 0)
    head = json.loads(blob[PREFIX.size:PREFIX.size + hlen])
    change(head)
    new = json.dumps(head).encode()
    bad = PREFIX.pack(b"FTDL", 1, 0, len(new)) + new + blob[PREFIX.size + hlen:]
    with pytest.raises(DL.DownlinkError, match=match) as e:
        DL.decode_frame(bad)
    assert "\n" not in str(e.value)


def test_truncated_oversized_and_padded_direct_frames_are_refused():
    blob = _direct_blob(np.random.default_rng(24))
    for cut in (1, 7, len(blob) // 2):
        with pytest.raises(DL.DownlinkError):
            DL.decode_frame(blob[:-cut])
    with pytest.raises(DL.DownlinkError, match="left over"):
        DL.decode_frame(blob + b"\0")
    with pytest.raises(DL.DownlinkError):
        DL.decode_frame(blob, max_bytes=len(blob) - 1)
    _m, _v, _f, hlen = PREFIX.unpack_from(blob, 0)
    bad = bytearray(blob)
    bad[PREFIX.size + hlen:PREFIX.size + hlen + 4] = struct.pack("<f", float("nan"))
    with pytest.raises(DL.DownlinkError, match="NaN"):
        DL.decode_frame(bytes(bad))


def test_counter_sends_direct_steps_and_counts_the_encoded_bytes():
    """The simulator's count is the size of the frame the fleet would encode, and the device
    trains from the mirror values that frame gives it (not the hub's float values)."""
    rng = np.random.default_rng(25)
    origin = _values(rng, ((16, 32), (16, 1)))
    c = DL.DownlinkCounter(origin)
    held = {}
    true = origin
    for v in range(12):
        true = _walk(rng, true, 0.05)
        for d in ("a", "b", "c")[: 1 + v % 3]:          # "b" and "c" fall several versions behind
            n, vals = c.task(d, v, true)
            frame = DL.decode_frame(DL.encode_frame(c.last_frame))
            assert n == len(DL.encode_frame(c.last_frame))
            got = DL.resolve(frame, held.get(d), origin)
            held[d] = DL.held_after(frame, got)
            for k in vals:
                np.testing.assert_array_equal(got[k], vals[k])
    assert c.kinds["direct"] > 0 and c.kinds["snapshot"] == 0
    canonical = DL.DownlinkCounter(origin, direct=False)
    true = origin
    total = {True: 0, False: 0}
    rng = np.random.default_rng(26)
    c = DL.DownlinkCounter(origin)
    for v in range(12):
        true = _walk(rng, true, 0.05)
        for d in ("a", "b", "c")[: 1 + v % 3]:
            total[True] += c.task(d, v, true)[0]
            total[False] += canonical.task(d, v, true)[0]
    assert total[True] < total[False]
