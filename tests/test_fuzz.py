"""Seeded mutation fuzzing of every format the fleet parses (issue 9): updates, model files, TASK
bodies, protocol frames and handshakes, the hub's journal and checkpoint.

Not "nothing crashed": each mutant (a flipped bit, a truncation or an inserted byte; 300 per
format, fixed seeds) must be rejected with the format's own error type, or decode to exactly the
original. Where a format carries no integrity check of its own (updates, model files and TASK
bodies travel inside authenticated frames, so they need none on the wire), a flipped bit in a value
is invisible to the parser by design: those tests assert that only a same-length flip outside the
format's fixed prefix can ever be accepted, and that what it decodes to is a well-formed object.
"""
from __future__ import annotations

import json
import logging
import random
import struct
from typing import Iterator, Optional, Tuple

import numpy as np
import pytest

import ftte_core as ft
from ftte_core import messages as M
from ftte_core import protocol as P
from ftte_core.binfmt import PREFIX
from ftte_core.local import TaskConfig
from ftte_core.modelfile import MAGIC as MODEL_MAGIC, ModelFileError, model_from_bytes, model_to_bytes
from ftte_core.update import Update, UpdateError, encode_update, subset_values

COUNT = 300
KINDS = ("flip", "truncate", "insert")


def mutants(data: bytes, seed: int, count: int = COUNT,
            hot: Optional[Tuple[int, int]] = None) -> Iterator[Tuple[str, int, bytes]]:
    """(kind, position, mutated bytes): kinds in turn; half the positions in ``hot`` (a format's
    structural bytes, which uniform positions over a large array payload would rarely hit)."""
    rng = random.Random(seed)
    for i in range(count):
        kind = KINDS[i % 3]
        if hot is not None and rng.random() < 0.5:
            pos = rng.randrange(hot[0], hot[1])
        else:
            pos = rng.randrange(len(data))
        out = bytearray(data)
        if kind == "flip":
            out[pos] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            del out[pos:]
        else:
            out.insert(pos, rng.randrange(256))
        yield kind, pos, bytes(out)


def _one_line(e: BaseException) -> None:
    assert str(e) and "\n" not in str(e), repr(e)


# -- updates ---------------------------------------------------------------------------------------
def _update_bytes(bits: int) -> bytes:
    model = ft.zoo("mlp", (8,), 3, hidden=(6,), seed=0)
    subset = ft.Subset.of(model, {"fc1": {"rows": [1, 3, 4], "bias": True}, "fc2": {"rows": "all", "bias": True}})
    base = subset_values(model, subset)
    rng = np.random.default_rng(1)
    for _key, _layer, view, rows in subset.tensors(model):
        r = rows if rows is not None else np.arange(view.shape[0])
        view[r] += (0.05 * rng.standard_normal((r.size, view.shape[1]))).astype(np.float32)
    u = encode_update(model, subset, base, 3, 20, 0.7, bits=bits, seed=0, device_id="pi-1", task_id="t1",
                      peak_memory_bytes=1234)
    return u.to_bytes()


@pytest.mark.parametrize("bits", [8, 4, 32])
def test_update_mutants_are_rejected_unless_a_flip_in_a_value(bits):
    good = _update_bytes(bits)
    hlen = struct.unpack_from("<I", good, 8)[0]
    accepted = 0
    for kind, pos, bad in mutants(good, seed=100 + bits, hot=(0, PREFIX.size + hlen)):
        try:
            got = Update.from_bytes(bad)
        except UpdateError as e:
            _one_line(e)
            continue
        # the header's length fields and the exact total length catch every truncation and insertion
        assert kind == "flip" and pos >= PREFIX.size, (kind, pos)
        again = Update.from_bytes(got.to_bytes())  # a well-formed update, stable when re-encoded
        assert again.to_bytes() == got.to_bytes()
        accepted += 1
    assert accepted < COUNT // 3  # most flips hit structure or are out of range


# -- model files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,shape", [("cnn", (1, 8, 8)), ("mlp", (64,))])
def test_model_file_mutants_are_rejected_unless_a_flip_in_a_value(name, shape):
    good = model_to_bytes(ft.zoo(name, shape, 10, seed=2, **({"hidden": (16,)} if name == "mlp" else {})))
    hlen = struct.unpack_from("<I", good, 8)[0]
    for kind, pos, bad in mutants(good, seed=7, hot=(0, PREFIX.size + hlen)):
        try:
            got = model_from_bytes(bad)
        except ModelFileError as e:
            _one_line(e)
            continue
        assert kind == "flip" and pos >= PREFIX.size, (kind, pos)
        assert model_from_bytes(model_to_bytes(got)).summary() == got.summary()


def _model_file(header) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return PREFIX.pack(MODEL_MAGIC, 1, 0, len(h)) + h


@pytest.mark.parametrize("header", [
    b"[" * 100_000 + b"]" * 100_000,                                      # RecursionError
    b'{"name":"m","input_shape":[1e999],"layers":[]}',                    # OverflowError (int of inf)
    {"name": "m", "input_shape": [4], "layers": [{"kind": "dense", "name": "d", "params": [["weight", [2 ** 70]]]}]},
    {"name": "m", "input_shape": [1, 4, 4], "layers": [{"kind": "maxpool2d", "name": "p", "kernel": [1, 1],
                                                        "stride": [1e300 * 1e300, 1], "padding": [0, 0, 0, 0],
                                                        "ceil_mode": False, "params": []}]},
], ids=["deep-json", "infinite-dim", "huge-dim", "infinite-stride"])
def test_hostile_model_headers_raise_model_file_error(header):
    if isinstance(header, dict):
        header = json.dumps(header).encode()  # json writes inf as Infinity: spell it as a number instead
        header = header.replace(b"Infinity", b"1e999")
    with pytest.raises(ModelFileError) as info:
        model_from_bytes(_model_file(header))
    _one_line(info.value)


# -- TASK bodies -----------------------------------------------------------------------------------
def _task_body() -> bytes:
    model = ft.zoo("mlp", (8,), 3, hidden=(6,), seed=0)
    subset = ft.Subset.of(model, {"fc1": {"rows": [0, 2], "bias": True}, "fc2": {"rows": "all", "bias": False}})
    return M.encode_task(M.TaskMessage(
        task_id="run7-t12", base_version=4, model_hash="ab" * 32, subset=subset.to_dict(),
        subset_fingerprint=subset.fingerprint(), config=TaskConfig(lr=0.05, batch_size=16, max_steps=4), seed=9,
        bits=8, values=subset_values(model, subset)))


def test_task_mutants_are_rejected_unless_a_flip_in_a_value():
    good = _task_body()
    hlen = struct.unpack_from("<I", good, 0)[0]
    for kind, pos, bad in mutants(good, seed=11, hot=(0, 4 + hlen)):
        try:
            got = M.decode_task(bad)
        except M.MessageError as e:
            _one_line(e)
            continue
        assert kind == "flip" and pos >= 4, (kind, pos)
        assert M.decode_task(M.encode_task(got)).task_id == got.task_id


def test_downlink_task_mutants_are_rejected_or_read_back_exactly():
    """A TASK carrying a downlink frame: every mutation is a MessageError (DownlinkError inside) or
    a flip that decodes to a well-formed task whose frame encodes back to the mutated bytes."""
    from ftte_core import downlink as DL

    model = ft.zoo("mlp", (8,), 3, hidden=(6,), seed=0)
    subset = ft.Subset.of(model, {"fc1": {"rows": [0, 2], "bias": True}, "fc2": {"rows": "all", "bias": False}})
    origin = subset_values(model, subset)
    stream = DL.DownlinkStream(origin, "fuzz")
    rng = np.random.default_rng(0)
    for v in range(3):
        stream.publish(v, {k: x + 0.01 * rng.standard_normal(x.shape).astype(np.float32) for k, x in origin.items()})
    msg = M.TaskMessage(task_id="run7-t12", run_id="run7", base_version=2, model_hash="ab" * 32,
                        subset=subset.to_dict(), subset_fingerprint=subset.fingerprint(),
                        config=TaskConfig(lr=0.05, batch_size=16, max_steps=4), seed=9, bits=8, values={})
    good = M.encode_task(msg, downlink_blob=DL.encode_frame(stream.frame_for(DL.ORIGIN)))
    hlen = struct.unpack_from("<I", good, 0)[0]
    for kind, pos, bad in mutants(good, seed=12, hot=(0, 4 + hlen)):
        try:
            got = M.decode_task(bad)
        except M.MessageError as e:
            _one_line(e)
            continue
        assert kind == "flip" and pos >= 4, (kind, pos)   # a digit in the header, or a value bit
        assert DL.encode_frame(got.downlink) == bad[4 + hlen:]


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "a str, not bytes",
], ids=["deep-json", "deep-object", "not-bytes"])
def test_hostile_task_bodies_raise_message_error(body):
    if isinstance(body, bytes):
        body = struct.pack("<I", len(body)) + body
    with pytest.raises(M.MessageError) as info:
        M.decode_task(body)
    _one_line(info.value)


@pytest.mark.parametrize("entry", ['["k", {"a": 1}]', '{"a": 1}', '["k", [1e999, 1]]', '["k", [1, 1e999]]'])
def test_task_value_entries_that_are_not_key_and_shape_raise_message_error(entry):
    head = dict(task_id="t", run_id="run-a", base_version=0, model_hash="0" * 64, subset={}, subset_fingerprint="f",
                config=TaskConfig().as_dict(), seed=1, bits=8, values=[])
    raw = json.dumps(head).replace('"values": []', f'"values": [{entry}]').encode()
    with pytest.raises(M.MessageError, match="value entry"):
        M.decode_task(struct.pack("<I", len(raw)) + raw)


def test_deeply_nested_json_messages_raise_message_error():
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' + b"{\"b\":" * 50_000 + b"1" + b"}" * 50_001):
        with pytest.raises(M.MessageError, match="nested too deeply"):
            M.decode_json(body, M.AGENT_INFO)


# -- protocol: records and handshake ---------------------------------------------------------------
KEY = P.generate_key()
MESSAGES = [(M.TASK, b"task body " * 20), (M.PING, b'{"t":1.5}'), (M.UPDATE, bytes(range(256)) * 3)]


def _pair():
    c, s = P.Connection("client", KEY), P.Connection("server", KEY)
    s.receive_data(c.initiate())
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    assert c.established and s.established
    return c, s


def test_every_mutated_record_stream_is_rejected_and_no_altered_message_is_delivered():
    rng = random.Random(5)
    for trial in range(COUNT):
        c, s = _pair()
        stream = b"".join(c.send(t, body) for t, body in MESSAGES) + c.close()
        kind, pos, bad = list(mutants(stream, seed=trial, count=3))[trial % 3]
        delivered, error = [], None
        try:
            # split at a random point: the receiver must not care how TCP cut the bytes
            cut = rng.randrange(len(bad) + 1)
            for part in (bad[:cut], bad[cut:]):
                delivered += s.receive_data(part)
            s.receive_eof()
        except P.ProtocolError as e:
            error = e
        got = [(ev.type, bytes(ev.body)) for ev in delivered if isinstance(ev, P.Message)]
        assert got == MESSAGES[:len(got)], (kind, pos)  # never an altered or invented message
        if kind == "truncate" and error is None:
            assert not s.clean_close, pos  # cut at a frame boundary: told apart from a finished stream
        else:
            assert isinstance(error, (P.AuthenticationFailed, P.MalformedFrame, P.FrameTooLarge)), (kind, pos, error)


@pytest.mark.parametrize("flight", [0, 1, 2], ids=["hello-c", "hello-s+fin-s", "fin-c"])
def test_every_mutated_handshake_flight_fails_on_the_side_that_receives_it(flight):
    rng = random.Random(flight)
    for trial in range(COUNT // 3):
        c, s = P.Connection("client", KEY), P.Connection("server", KEY)
        receiver = s if flight in (0, 2) else c
        errors = {}

        def deliver(conn, data, index):
            if index == flight:
                data = list(mutants(data, seed=rng.randrange(1 << 30), count=3))[trial % 3][2]
            try:
                return conn.receive_data(data)
            except P.ProtocolError as e:
                errors.setdefault(id(conn), e)
                return []

        deliver(s, c.initiate(), 0)
        deliver(c, s.data_to_send(), 1)
        deliver(s, c.data_to_send(), 2)
        for conn in (c, s):
            if id(conn) not in errors:
                try:
                    conn.receive_eof()
                except P.ProtocolError as e:
                    errors[id(conn)] = e
        assert id(receiver) in errors, f"trial {trial}: a mutated flight {flight} was accepted"
        assert isinstance(errors[id(receiver)], P.HandshakeError), errors[id(receiver)]


# -- the hub's journal and checkpoint --------------------------------------------------------------
ckpt = pytest.importorskip("ftte_hub.checkpoint")

RECORDS = [({"e": "task", "dev": "a1", "tid": "t1"}, b""),
           ({"e": "update", "dev": "a1", "nbytes": 600}, bytes(range(200)) * 3),
           ({"e": "task", "dev": "a2", "tid": "t2"}, b""),
           ({"e": "gone", "dev": "a2"}, b""),
           ({"e": "update", "dev": "a1", "nbytes": 300}, bytes(range(100, 250)) * 2)]


def _journal(tmp_path, data: bytes):
    path = tmp_path / "00000001.log"
    path.write_bytes(data)
    return [(h, bytes(b)) for h, b in ckpt.read_journal(path)]


def _good_journal() -> bytes:
    return ckpt.JOURNAL_HEADER + b"".join(ckpt.encode_record(h, b) for h, b in RECORDS)


def _record_starts():
    starts, pos = [], len(ckpt.JOURNAL_HEADER)
    for h, b in RECORDS:
        starts.append(pos)
        pos += len(ckpt.encode_record(h, b))
    return starts, pos


@pytest.fixture
def journal_warnings(monkeypatch):
    """The warning lines read_journal logs (dropping a damaged last record is never silent)."""
    seen = []

    def event(name, message, level=logging.INFO, fields=None):
        if level >= logging.WARNING:
            seen.append(message)
    monkeypatch.setattr(ckpt, "event", event)
    return seen


def test_journal_mutants_are_rejected_or_read_as_a_prefix_of_the_records(tmp_path, journal_warnings):
    good = _good_journal()
    assert _journal(tmp_path, good) == RECORDS
    for kind, pos, bad in mutants(good, seed=3):
        journal_warnings.clear()
        try:
            got = _journal(tmp_path, bad)
        except ckpt.CheckpointError as e:
            _one_line(e)
            continue
        # the crcs cover every length, header and blob: a record is read exactly as written or not at all
        assert got == RECORDS[:len(got)], (kind, pos)
        # fewer records: only a cut file (a crash mid-write) is silent; a damaged record gets a warning
        assert got == RECORDS or kind == "truncate" or journal_warnings, (kind, pos)


def test_journal_flip_anywhere_is_an_error_or_a_warning_about_the_last_record(tmp_path, journal_warnings):
    """Only what a crash mid-write can leave, the last record, is ever dropped; never silently."""
    good = _good_journal()
    starts, _ = _record_starts()
    for pos in range(len(good)):
        bad = bytearray(good)
        bad[pos] ^= 1 << (pos % 8)
        journal_warnings.clear()
        try:
            got = _journal(tmp_path, bytes(bad))
        except ckpt.CheckpointError as e:
            _one_line(e)
            assert str(tmp_path) in str(e) and "byte" in str(e) or pos < starts[0], (pos, e)
            continue
        assert pos >= starts[-1] and got == RECORDS[:-1], pos
        assert len(journal_warnings) == 1 and f"byte {starts[-1]}" in journal_warnings[0], pos


def test_journal_flip_in_an_earlier_records_length_is_not_read_as_a_torn_tail(tmp_path):
    starts, _ = _record_starts()
    bad = bytearray(_good_journal())
    bad[starts[1] + 2] ^= 0x01  # record 2 of 5 now claims 64 KiB more than it has
    with pytest.raises(ckpt.CheckpointError, match=f"record at byte {starts[1]}") as info:
        _journal(tmp_path, bytes(bad))
    _one_line(info.value)


def test_journal_cut_at_any_byte_reads_the_complete_records_before_it_without_a_warning(tmp_path, journal_warnings):
    """A crash mid-write leaves a prefix of the file: never an error, never a record lost before the cut."""
    good = _good_journal()
    starts, end = _record_starts()
    for cut in range(len(good)):
        got = _journal(tmp_path, good[:cut])
        complete = sum(1 for s in starts[1:] + [end] if s <= cut)
        assert got == RECORDS[:complete], cut
    assert not journal_warnings


def _checkpoint_parts():
    meta = {"format": ckpt.FORMAT, "version": 7, "model_hash": "cd" * 32, "driver": {"round": 2}}
    params = {"fc1.weight": np.arange(24, dtype=np.float32).reshape(4, 6), "fc1.bias": np.ones(4, np.float32)}
    buffer = [_update_bytes(8), b"second"]
    return meta, params, buffer


def _load(tmp_path, data: bytes):
    (tmp_path / ckpt.CHECKPOINT).write_bytes(data)
    return ckpt.load_checkpoint(tmp_path)


def _same(got, want) -> bool:
    meta, params, buffer = got
    return (meta == want[0] and buffer == want[2] and params.keys() == want[1].keys()
            and all(np.array_equal(params[k], want[1][k]) for k in params))


def _checkpoint_outcomes(tmp_path):
    want = _checkpoint_parts()
    ckpt.save_checkpoint(tmp_path, *want)
    good = (tmp_path / ckpt.CHECKPOINT).read_bytes()
    assert _same(_load(tmp_path, good), want)
    for kind, pos, bad in mutants(good, seed=6):
        try:
            got = _load(tmp_path, bad)
        except ckpt.CheckpointError as e:
            _one_line(e)
            yield kind, pos, "rejected"
            continue
        yield kind, pos, "same" if _same(got, want) else "different"


def test_checkpoint_mutants_raise_checkpoint_error_and_nothing_else(tmp_path):
    outcomes = list(_checkpoint_outcomes(tmp_path))  # any other exception type fails here
    assert len(outcomes) == COUNT


def test_checkpoint_mutants_are_rejected_or_load_exactly_the_original(tmp_path):
    different = [(kind, pos) for kind, pos, outcome in _checkpoint_outcomes(tmp_path) if outcome == "different"]
    assert not different


@pytest.mark.parametrize("field", ["loss", "stats"])
def test_an_update_with_a_number_too_big_for_a_float_raises_update_error(field):
    head = {"base_version": 0, "subset_fingerprint": "f", "num_samples": 1, "loss": 0.5, "stats": {},
            "peak_memory_bytes": None, "device_id": "d", "task_id": "t", "tensors": []}
    if field == "loss":
        head["loss"] = 10 ** 400
    else:
        head["stats"] = {"steps": 10 ** 400}
    raw = json.dumps(head).encode()
    from ftte_core.update import MAGIC as UPDATE_MAGIC
    with pytest.raises(UpdateError, match="finite number"):
        Update.from_bytes(PREFIX.pack(UPDATE_MAGIC, 1, 0, len(raw)) + raw)
