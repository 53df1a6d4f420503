"""The hub's durable state (checkpoint.py): what a damaged, cut or old journal or checkpoint reads as.

The seeded mutation tests are in test_fuzz.py; these are the exact cases: a crash mid-write
(dropped, quietly), a damaged last record or a zeroed tail (dropped, with a warning naming file and
byte), damage anywhere else (a one-line CheckpointError), journals written by earlier hubs
(format 1: still read), and checkpoints with a missing, extra or altered entry.
"""
from __future__ import annotations

import io
import json
import logging
import struct
import zipfile
import zlib

import numpy as np
import pytest

ckpt = pytest.importorskip("ftte_hub.checkpoint")

RECORDS = [({"e": "task", "dev": "a1", "tid": "t1"}, b""),
           ({"e": "update", "dev": "a1", "nbytes": 40}, bytes(range(40))),
           ({"e": "gone", "dev": "a1"}, b"")]


@pytest.fixture
def logged(monkeypatch):
    """(level, message) of every line read_journal logs."""
    seen = []
    monkeypatch.setattr(ckpt, "event", lambda name, message, level=logging.INFO, fields=None:
                        seen.append((level, message)))
    return seen


def _read(path):
    return [(h, bytes(b)) for h, b in ckpt.read_journal(path)]


def _write_journal(path, records=RECORDS):
    j = ckpt.Journal(path)
    for h, b in records:
        j.write(h, b)
    j.close_now()
    return path.read_bytes()


def _starts(records=RECORDS, first=len(ckpt.JOURNAL_HEADER)):
    out, pos = [], first
    for h, b in records:
        out.append(pos)
        pos += len(ckpt.encode_record(h, b))
    return out


# -- format 2 ----------------------------------------------------------------------------------------
def test_a_journal_file_starts_with_its_magic_and_format_and_reads_back(tmp_path, logged):
    data = _write_journal(tmp_path / "j.log")
    assert data.startswith(b"FTTEJRNL" + struct.pack("<I", 2))
    assert _read(tmp_path / "j.log") == RECORDS and not logged
    empty = tmp_path / "empty.log"
    ckpt.Journal(empty).close_now()
    assert empty.read_bytes() == ckpt.JOURNAL_HEADER and _read(empty) == []


def test_reopening_a_journal_appends_without_a_second_header(tmp_path):
    path = tmp_path / "j.log"
    _write_journal(path, RECORDS[:1])
    _write_journal(path, RECORDS[1:])
    assert _read(path) == RECORDS


def test_cut_inside_the_last_record_drops_it_with_an_info_line_only(tmp_path, logged):
    """Every length a crash mid-write can leave of the last record: the others read, never an error."""
    path = tmp_path / "j.log"
    data = _write_journal(path)
    last = _starts()[-1]
    for cut in range(last, len(data)):
        path.write_bytes(data[:cut])
        logged.clear()
        assert _read(path) == RECORDS[:-1], cut
        assert all(level < logging.WARNING for level, _ in logged), cut
        assert len(logged) == (cut > last), cut  # "dropped the unfinished record at byte <last>"
        assert not logged or f"byte {last}" in logged[0][1]


def test_a_file_cut_inside_its_header_reads_as_empty(tmp_path):
    path = tmp_path / "j.log"
    for cut in range(len(ckpt.JOURNAL_HEADER) + 1):
        path.write_bytes(ckpt.JOURNAL_HEADER[:cut])
        assert _read(path) == []


@pytest.mark.parametrize("where", ["payload", "payload-crc"])
def test_a_damaged_complete_last_record_is_dropped_with_one_warning_naming_file_and_byte(tmp_path, logged, where):
    path = tmp_path / "j.log"
    bad = bytearray(_write_journal(path))
    last = _starts()[-1]
    bad[last + (14 if where == "payload" else 9)] ^= 0x10
    path.write_bytes(bytes(bad))
    assert _read(path) == RECORDS[:-1]
    warnings = [m for level, m in logged if level >= logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and f"byte {last}" in warnings[0]
    assert "\n" not in warnings[0]


@pytest.mark.parametrize("zeros", [1, 12, 4096])
def test_a_zeroed_tail_is_dropped_with_a_warning(tmp_path, logged, zeros):
    """A power cut can leave unsynced appended blocks as zeros (never acknowledged: never fsynced)."""
    path = tmp_path / "j.log"
    data = _write_journal(path)
    path.write_bytes(data + bytes(zeros))
    assert _read(path) == RECORDS
    assert [level for level, _ in logged] == [logging.INFO if zeros < 12 else logging.WARNING]
    # a complete last record zeroed in place: dropped, with a warning
    last = _starts()[-1]
    path.write_bytes(data[:last] + bytes(len(data) - last))
    logged.clear()
    assert _read(path) == RECORDS[:-1] and logged[0][0] == logging.WARNING


def test_damage_before_the_last_record_is_an_error_naming_file_and_byte(tmp_path):
    path = tmp_path / "j.log"
    good = _write_journal(path)
    starts = _starts()
    for offset, match in ((2, "length field"), (5, "length field"), (9, "checksum"), (16, "checksum")):
        bad = bytearray(good)
        bad[starts[1] + offset] ^= 0x04
        path.write_bytes(bytes(bad))
        with pytest.raises(ckpt.CheckpointError, match=match) as info:
            _read(path)
        assert str(path) in str(info.value) and f"byte {starts[1]}" in str(info.value), offset


def test_deeply_nested_json_header_with_a_good_checksum_is_a_checkpoint_error(tmp_path):
    h = b"[" * 100_000 + b"]" * 100_000
    payload = struct.pack("<I", len(h)) + h
    length = struct.pack("<I", len(payload))
    rec = length + struct.pack("<II", zlib.crc32(length), zlib.crc32(payload)) + payload
    path = tmp_path / "j.log"
    path.write_bytes(ckpt.JOURNAL_HEADER + rec)
    with pytest.raises(ckpt.CheckpointError, match="nested too deeply"):
        _read(path)


def test_a_header_length_past_the_record_is_a_checkpoint_error(tmp_path):
    payload = struct.pack("<I", 1000) + b'{"e":"gone","dev":"a"}'
    length = struct.pack("<I", len(payload))
    path = tmp_path / "j.log"
    path.write_bytes(ckpt.JOURNAL_HEADER + length + struct.pack("<II", zlib.crc32(length), zlib.crc32(payload)) + payload)
    with pytest.raises(ckpt.CheckpointError, match="overruns"):
        _read(path)


def test_a_newer_format_or_a_damaged_file_header_is_one_clear_line(tmp_path):
    path = tmp_path / "j.log"
    good = _write_journal(path)
    path.write_bytes(good[:8] + struct.pack("<I", 3) + good[12:])
    with pytest.raises(ckpt.CheckpointError, match="has format 3; this ftte-hub reads formats 1 and 2"):
        _read(path)
    for pos in range(len(ckpt.JOURNAL_HEADER)):
        bad = bytearray(good)
        bad[pos] ^= 0x20
        path.write_bytes(bytes(bad))
        with pytest.raises(ckpt.CheckpointError) as info:
            _read(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


# -- format 1 (earlier hubs) ---------------------------------------------------------------------
def _v1_record(header, blob=b"") -> bytes:
    """As the hub before format 2 wrote them: ``u32 length | u32 crc32 | u32 hlen | JSON | blob``."""
    h = json.dumps(header, separators=(",", ":")).encode()
    payload = struct.pack("<I", len(h)) + h + blob
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def test_a_format_1_journal_from_an_earlier_hub_is_still_read(tmp_path, logged):
    path = tmp_path / "00000003.log"
    data = b"".join(_v1_record(h, b) for h, b in RECORDS)
    path.write_bytes(data)
    assert _read(path) == RECORDS and not logged
    path.write_bytes(b"")
    assert _read(path) == []


def test_a_format_1_journal_with_a_torn_tail_drops_it_with_a_warning(tmp_path, logged):
    """Format 1 cannot tell a torn write from a damaged length: never silent."""
    path = tmp_path / "00000003.log"
    data = b"".join(_v1_record(h, b) for h, b in RECORDS)
    last = len(data) - len(_v1_record(*RECORDS[-1]))
    for cut in range(last + 1, len(data)):
        path.write_bytes(data[:cut])
        logged.clear()
        assert _read(path) == RECORDS[:-1], cut
        assert [level for level, _ in logged] == [logging.WARNING] and f"byte {last}" in logged[0][1]


def test_a_format_1_journal_damaged_in_the_middle_or_at_its_start_is_an_error(tmp_path):
    path = tmp_path / "00000003.log"
    data = bytearray(b"".join(_v1_record(h, b) for h, b in RECORDS))
    first = len(_v1_record(*RECORDS[0]))
    mid = bytearray(data)
    mid[first + 12] ^= 0x01
    path.write_bytes(bytes(mid))
    with pytest.raises(ckpt.CheckpointError, match=f"byte {first} fails its checksum"):
        _read(path)
    path.write_bytes(bytes(data[:first - 1]))  # the first record torn: not even a journal of format 1
    with pytest.raises(ckpt.CheckpointError, match="neither a FTTEJRNL header nor a complete record"):
        _read(path)


# -- checkpoint ----------------------------------------------------------------------------------
def _parts():
    meta = {"format": ckpt.FORMAT, "version": 3, "model_hash": "ab" * 32, "driver": {"version": 3}}
    params = {"fc.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "fc.bias": np.ones(3, np.float32)}
    return meta, params, [b"update one", b"update two"]


def _rezip(path, edit):
    """Rewrite the checkpoint's zip with ``edit(name -> bytes)`` applied (a valid zip, other content)."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    edit(members)
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)


def _npy(arr) -> bytes:
    f = io.BytesIO()
    np.save(f, arr)
    return f.getvalue()


def test_checkpoint_round_trips_and_its_meta_lists_its_entries(tmp_path):
    meta, params, buffer = _parts()
    ckpt.save_checkpoint(tmp_path, meta, params, buffer)
    with np.load(tmp_path / ckpt.CHECKPOINT) as z:
        stored = json.loads(bytes(z["meta"]))
    assert sorted(stored["contents"]["params"]) == ["fc.bias", "fc.weight"]
    assert stored["contents"]["params"]["fc.weight"]["shape"] == [3, 4]
    assert [e["bytes"] for e in stored["contents"]["buffer"]] == [10, 10]
    got_meta, got_params, got_buffer = ckpt.load_checkpoint(tmp_path)
    assert got_meta == meta and got_buffer == buffer  # the list is the loader's, not the caller's
    assert all(np.array_equal(got_params[k], v) for k, v in params.items()) and got_params.keys() == params.keys()


@pytest.mark.parametrize("name", ["p:fc.weight.npy", "buf:1.npy", "buf:0.npy"])
def test_a_checkpoint_missing_an_entry_is_refused_naming_it(tmp_path, name):
    ckpt.save_checkpoint(tmp_path, *_parts())
    _rezip(tmp_path / ckpt.CHECKPOINT, lambda m: m.pop(name))
    with pytest.raises(ckpt.CheckpointError, match=f"missing, e.g. '{name[:-4]}'") as info:
        ckpt.load_checkpoint(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_a_checkpoint_with_an_extra_or_altered_entry_is_refused(tmp_path):
    ckpt.save_checkpoint(tmp_path, *_parts())
    _rezip(tmp_path / ckpt.CHECKPOINT, lambda m: m.update({"buf:2.npy": _npy(np.zeros(3, np.uint8))}))
    with pytest.raises(ckpt.CheckpointError, match="does not name: 'buf:2'"):
        ckpt.load_checkpoint(tmp_path)
    ckpt.save_checkpoint(tmp_path, *_parts())
    _rezip(tmp_path / ckpt.CHECKPOINT,
           lambda m: m.update({"p:fc.bias.npy": _npy(np.array([1, 1, 2], np.float32))}))
    with pytest.raises(ckpt.CheckpointError, match="'p:fc.bias' differs"):
        ckpt.load_checkpoint(tmp_path)
    ckpt.save_checkpoint(tmp_path, *_parts())
    _rezip(tmp_path / ckpt.CHECKPOINT, lambda m: m.update({"buf:0.npy": m["buf:1.npy"]}))
    with pytest.raises(ckpt.CheckpointError, match="'buf:0' differs"):
        ckpt.load_checkpoint(tmp_path)


def test_a_checkpoint_without_a_list_of_entries_from_an_earlier_hub_loads_as_before(tmp_path):
    meta, params, buffer = _parts()
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    arrays.update({f"p:{k}": v for k, v in params.items()})
    arrays.update({f"buf:{i}": np.frombuffer(b, dtype=np.uint8) for i, b in enumerate(buffer)})
    np.savez(tmp_path / ckpt.CHECKPOINT, **arrays)
    got_meta, got_params, got_buffer = ckpt.load_checkpoint(tmp_path)
    assert got_meta == meta and got_buffer == buffer and got_params.keys() == params.keys()


def test_every_flip_in_the_zip_directory_is_refused_or_loads_the_original(tmp_path):
    """The central directory and end record: what made a checkpoint load with no parameters."""
    meta, params, buffer = _parts()
    ckpt.save_checkpoint(tmp_path, meta, params, buffer)
    good = (tmp_path / ckpt.CHECKPOINT).read_bytes()
    directory = good.find(b"PK\x01\x02")
    assert directory > 0
    for pos in range(directory, len(good)):
        bad = bytearray(good)
        bad[pos] ^= 1 << (pos % 8)
        (tmp_path / ckpt.CHECKPOINT).write_bytes(bytes(bad))
        try:
            got_meta, got_params, got_buffer = ckpt.load_checkpoint(tmp_path)
        except ckpt.CheckpointError as e:
            assert "\n" not in str(e)
            continue
        assert got_meta == meta and got_buffer == buffer and got_params.keys() == params.keys(), pos
        assert all(np.array_equal(got_params[k], v) for k, v in params.items()), pos


@pytest.mark.parametrize("contents", [{"params": {"w": {"shape": [1e999], "crc32": 1}}, "buffer": []},
                                      {"params": [], "buffer": []}, "nothing", {"buffer": [{"bytes": 1}]}],
                         ids=["huge-dim", "params-not-a-dict", "not-a-dict", "no-crc"])
def test_a_malformed_list_of_entries_is_a_checkpoint_error(tmp_path, contents):
    meta = json.dumps({"format": ckpt.FORMAT, "contents": contents}).replace("Infinity", "1e999")
    np.savez(tmp_path / ckpt.CHECKPOINT, meta=np.frombuffer(meta.encode(), dtype=np.uint8))
    with pytest.raises(ckpt.CheckpointError, match="list of entries is malformed"):
        ckpt.load_checkpoint(tmp_path)
