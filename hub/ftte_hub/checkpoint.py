"""What the hub keeps on disk so a crash loses nothing that was acknowledged.

Layout of ``--out DIR``:

    initial-model.ftmd     the run's initial model (modelfile bytes; its hash names it to agents)
    checkpoint.npz         after every merge (atomic: write, fsync, rename; no pickle):
                             "meta"      uint8: UTF-8 JSON (driver state, subset, model hash, stats...)
                             "p:<key>"   float32 model parameters
                             "buf:<i>"   uint8: Update bytes of the driver's buffer
    journal/<V>.log        the round driver's events since the checkpoint at version V

The checkpoint's meta lists its other entries (``"contents"``: each parameter's shape and CRC-32,
each buffered update's size and CRC-32); a missing, extra or different entry is a
``CheckpointError``. Checkpoints written before that list existed are read as before.

A journal file is ``"FTTEJRNL" | u32 format (2)`` then records
``u32 length | u32 crc32(length field) | u32 crc32(payload) | payload``, payload =
``u32 header length | JSON header | blob``; headers: ``{"e": "task", "dev", "tid"}`` (a task was
issued), ``{"e": "update", "dev", "nbytes"}`` with the Update bytes as blob, ``{"e": "gone",
"dev"}``. An UPDATE is acknowledged only after its record is fsynced (``Journal.write``, then
``await Journal.sync``; concurrent writes share one fsync). The round driver is deterministic, so replaying the
journal over the checkpoint rebuilds its exact state, buffer and merges included.

Reading (``read_journal``): the length has its own check, so a damaged length is never mistaken
for the end of the file. A record the file ends inside (the hub died while writing it: never
acknowledged) is dropped with an info line. A damaged record followed by nothing but zero bytes
(what a power cut can leave of unsynced writes) is dropped with a warning naming the file and
byte: it may have been acknowledged, but no check can tell. Any other defect is a
``CheckpointError`` naming the file and byte. Journals of format 1 (no file header, the length
outside the CRC; written by earlier hubs) are still read, with a warning for any tail dropped,
since that format cannot tell a torn write from a damaged length.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ftte_core.atomic import atomic_write

from .logs import event

CHECKPOINT = "checkpoint.npz"
INITIAL_MODEL = "initial-model.ftmd"
JOURNAL_DIR = "journal"
FORMAT = 1
CONTENTS = "contents"            # the meta key listing the checkpoint's other entries
JOURNAL_MAGIC = b"FTTEJRNL"      # as a format-1 length it would be 1.1 GiB > MAX_RECORD: never ambiguous
JOURNAL_FORMAT = 2
_FILE = struct.Struct("<8sI")    # magic, format
JOURNAL_HEADER = _FILE.pack(JOURNAL_MAGIC, JOURNAL_FORMAT)
_REC = struct.Struct("<III")     # length, crc32 of the length field, crc32 of the payload
_LEN = struct.Struct("<I")
_REC_V1 = struct.Struct("<II")   # format 1: length, crc32 of the payload
_HLEN = struct.Struct("<I")
MAX_RECORD = 1 << 30


class CheckpointError(ValueError):
    """A checkpoint or journal that cannot be used (one-line reason naming the file)."""


# -- checkpoint ------------------------------------------------------------------------------------
def _crc(buf) -> int:
    return zlib.crc32(buf) & 0xFFFFFFFF


def save_checkpoint(out_dir, meta: Dict[str, Any], params: Dict[str, np.ndarray], buffer: List[bytes]) -> None:
    params32 = {k: np.ascontiguousarray(v, dtype="<f4") for k, v in params.items()}
    contents = {"params": {k: {"shape": list(a.shape), "crc32": _crc(a)} for k, a in params32.items()},
                "buffer": [{"bytes": len(b), "crc32": _crc(b)} for b in buffer]}
    meta = dict(meta, **{CONTENTS: contents})
    arrays = {"meta": np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), dtype=np.uint8)}
    for k, a in params32.items():
        arrays[f"p:{k}"] = a
    for i, b in enumerate(buffer):
        arrays[f"buf:{i}"] = np.frombuffer(b, dtype=np.uint8)
    atomic_write(Path(out_dir) / CHECKPOINT, lambda f: np.savez(f, **arrays))


def _listed_entries(path: Path, contents: Any) -> Dict[str, Tuple[Tuple[int, ...], int]]:
    """{entry name: (shape, crc32)} from a checkpoint's contents list."""
    try:
        out = {f"p:{k}": (tuple(int(d) for d in e["shape"]), int(e["crc32"])) for k, e in contents["params"].items()}
        out.update({f"buf:{i}": ((int(e["bytes"]),), int(e["crc32"])) for i, e in enumerate(contents["buffer"])})
    except (TypeError, KeyError, ValueError, AttributeError, OverflowError):
        raise CheckpointError(f"checkpoint {path} is corrupt (its list of entries is malformed); "
                              f"move it away to start afresh") from None
    return out


def load_checkpoint(out_dir) -> Optional[Tuple[Dict[str, Any], Dict[str, np.ndarray], List[bytes]]]:
    """(meta, params, buffer) or None when ``out_dir`` holds no checkpoint."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            files = list(z.files)
            if "meta" not in files:
                raise CheckpointError(f"checkpoint {path} has no 'meta' entry")
            meta = json.loads(bytes(z["meta"]).decode("utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise CheckpointError(f"checkpoint {path}: unknown format "
                                      f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
            listed = _listed_entries(path, meta.pop(CONTENTS)) if CONTENTS in meta else None
            if listed is not None:  # written with its list: exactly those entries, as saved
                _check_names(path, listed, [k for k in files if k != "meta"])
            params = {k[2:]: np.array(z[k], dtype=np.float32) for k in files if k.startswith("p:")}
            n_buf = sum(1 for k in files if k.startswith("buf:"))
            buffer = [bytes(z[f"buf:{i}"]) for i in range(n_buf)]
    except CheckpointError:
        raise
    except Exception as e:  # zipfile, numpy and JSON raise many kinds; all mean "unusable"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt ({msg}); move it away to start afresh") from None
    if listed is not None:
        got = {f"p:{k}": (v.shape, _crc(np.ascontiguousarray(v, dtype="<f4"))) for k, v in params.items()}
        got.update({f"buf:{i}": ((len(b),), _crc(b)) for i, b in enumerate(buffer)})
        for name, want in listed.items():
            if got[name] != want:
                raise CheckpointError(f"checkpoint {path} is corrupt (entry {name!r} differs from what was "
                                      f"saved: shape or CRC-32); move it away to start afresh")
    return meta, params, buffer


def _check_names(path: Path, listed: Dict[str, Any], present: List[str]) -> None:
    missing = [k for k in listed if k not in present]
    extra = [k for k in present if k not in listed]
    if missing or extra:
        what = (f"{len(missing)} listed entr{'y' if len(missing) == 1 else 'ies'} missing, e.g. {missing[0]!r}"
                if missing else f"an entry its list does not name: {extra[0]!r}")
        raise CheckpointError(f"checkpoint {path} is corrupt ({what}); move it away to start afresh")


# -- journal -----------------------------------------------------------------------------------------
def journal_path(out_dir, version: int) -> Path:
    return Path(out_dir) / JOURNAL_DIR / f"{int(version):08d}.log"


def journal_versions(out_dir) -> List[int]:
    d = Path(out_dir) / JOURNAL_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        if p.suffix == ".log" and p.stem.isdigit():
            out.append(int(p.stem))
    return sorted(out)


def _record_parts(header: Dict[str, Any], blob: bytes = b"") -> List[bytes]:
    h = json.dumps(header, separators=(",", ":")).encode()
    head = _HLEN.pack(len(h)) + h
    crc = zlib.crc32(blob, zlib.crc32(head))  # no copy of the (large) blob just to checksum it
    length = _LEN.pack(len(head) + len(blob))
    return [_REC.pack(len(head) + len(blob), zlib.crc32(length), crc), head, blob]


def encode_record(header: Dict[str, Any], blob: bytes = b"") -> bytes:
    """One record (a journal file is ``JOURNAL_HEADER`` followed by records)."""
    return b"".join(_record_parts(header, blob))


def read_journal(path) -> Iterator[Tuple[Dict[str, Any], bytes]]:
    """The records of one journal file, in order (see the module doc for what is dropped)."""
    path = Path(path)
    data = path.read_bytes()
    if JOURNAL_HEADER.startswith(data):
        return  # empty, or the hub died while writing the file header (before any record)
    if data.startswith(JOURNAL_MAGIC):
        (fmt,) = _LEN.unpack_from(data, len(JOURNAL_MAGIC)) if len(data) >= _FILE.size else (None,)
        if fmt != JOURNAL_FORMAT:
            raise CheckpointError(f"journal {path} has format {fmt}; this ftte-hub reads formats 1 and "
                                  f"{JOURNAL_FORMAT} (was it written by a newer one?)")
        yield from _records(path, data, _FILE.size)
    else:
        yield from _records_v1(path, data)


def _records(path: Path, data: bytes, pos: int) -> Iterator[Tuple[Dict[str, Any], bytes]]:
    n = len(data)
    while pos < n:
        if n - pos < _REC.size:
            _unfinished(path, pos)
            return
        length, length_crc, crc = _REC.unpack_from(data, pos)
        if zlib.crc32(data[pos:pos + _LEN.size]) != length_crc:
            if not any(data[pos:]):
                _damaged_tail(path, pos)
                return
            raise CheckpointError(f"journal {path}: the length field of the record at byte {pos} fails its "
                                  f"check; the journal is corrupt")
        if not _HLEN.size <= length <= MAX_RECORD:
            raise CheckpointError(f"journal {path}: record at byte {pos} claims {length} bytes")
        end = pos + _REC.size + length
        if end > n:
            _unfinished(path, pos)
            return
        payload = data[pos + _REC.size:end]
        if zlib.crc32(payload) != crc:
            if not any(data[end:]):
                _damaged_tail(path, pos)
                return
            raise CheckpointError(f"journal {path}: record at byte {pos} fails its checksum")
        yield _parse(path, pos, payload)
        pos = end


def _records_v1(path: Path, data: bytes) -> Iterator[Tuple[Dict[str, Any], bytes]]:
    """Format 1 (earlier hubs): ``u32 length | u32 crc32(payload) | payload``, no file header."""
    pos, n = 0, len(data)
    while pos < n:
        length = _REC_V1.unpack_from(data, pos)[0] if n - pos >= _REC_V1.size else None
        end = pos + _REC_V1.size + (length or 0)
        if pos == 0 and (length is None or end > n):
            raise CheckpointError(f"journal {path} is corrupt: neither a {JOURNAL_MAGIC.decode()} header nor a "
                                  f"complete record of format 1 at byte 0")
        if length is not None and length > MAX_RECORD:
            raise CheckpointError(f"journal {path}: record at byte {pos} claims {length} bytes")
        if length is None or end > n:
            event("journal_tail_dropped", f"journal {path} (format 1, from an earlier ftte-hub): dropped "
                  f"{n - pos} bytes at the end from byte {pos}: a record cut short by a crash, or damage this "
                  f"format cannot tell from one", logging.WARNING)
            return
        payload = data[pos + _REC_V1.size:end]
        if zlib.crc32(payload) != _REC_V1.unpack_from(data, pos)[1]:
            if pos > 0 and not any(data[end:]):
                _damaged_tail(path, pos)
                return
            raise CheckpointError(f"journal {path}: record at byte {pos} fails its checksum")
        yield _parse(path, pos, payload)
        pos = end


def _parse(path: Path, pos: int, payload: bytes) -> Tuple[Dict[str, Any], bytes]:
    try:
        (hlen,) = _HLEN.unpack_from(payload, 0)
        if _HLEN.size + hlen > len(payload):
            raise ValueError(f"header length {hlen} overruns the record")
        header = json.loads(payload[_HLEN.size:_HLEN.size + hlen].decode("utf-8"))
        if not isinstance(header, dict) or "e" not in header:
            raise ValueError("no event name")
    except RecursionError:
        raise CheckpointError(f"journal {path}: record at byte {pos} is unreadable (JSON nested too deeply)") from None
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"journal {path}: record at byte {pos} is unreadable ({e})") from None
    return header, payload[_HLEN.size + hlen:]


def _unfinished(path: Path, pos: int) -> None:
    event("journal_tail_dropped", f"journal {path}: dropped the unfinished record at byte {pos} (the hub stopped "
          f"while writing it, so it was never acknowledged)")


def _damaged_tail(path: Path, pos: int) -> None:
    event("journal_tail_dropped", f"journal {path}: dropped the damaged last record at byte {pos} (a crash while "
          f"it was written, or damage on disk: if it was an acknowledged update, that update is lost)",
          logging.WARNING)


class Journal:
    """Append-only event log of one checkpoint generation; ``write`` then ``await sync(seq)`` makes it durable."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if os.fstat(self.fd).st_size == 0:
            os.write(self.fd, JOURNAL_HEADER)  # 12 bytes: one write; a cut-short one reads as empty
        self._dir_synced = False
        self._written = 0   # records written
        self._synced = 0    # records known durable
        self._syncing: Optional[asyncio.Future] = None
        self.closed = False

    def write(self, header: Dict[str, Any], blob: bytes = b"") -> int:
        """Write one record now (the page cache survives a killed process); returns its sequence number."""
        parts = _record_parts(header, blob)
        total = sum(len(p) for p in parts)
        n = os.writev(self.fd, parts)
        if n < total:  # a short write (rare: signals, full disk): finish it byte-exact
            rest = memoryview(b"".join(parts))[n:]
            while rest:
                rest = rest[os.write(self.fd, rest):]
        self._written += 1
        return self._written

    async def sync(self, upto: int) -> None:
        """Return once record ``upto`` is on disk; one fsync covers every record written before it."""
        while self._synced < upto:
            if self._syncing is None:
                self._syncing = asyncio.ensure_future(self._fsync())
            await asyncio.shield(self._syncing)

    async def _fsync(self) -> None:
        target = self._written
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._make_durable)
            self._synced = max(self._synced, target)
        finally:
            self._syncing = None

    def _make_durable(self) -> None:
        os.fsync(self.fd)
        if not self._dir_synced:  # the new file's name too, or a power cut can lose it with its records
            _fsync_dir(self.path.parent)
            self._dir_synced = True

    async def close(self) -> None:
        if self.closed:
            return
        await self.sync(self._written)
        self.closed = True
        os.close(self.fd)

    def close_now(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                os.close(self.fd)
            except OSError:
                pass


def _fsync_dir(directory: Path) -> None:
    try:  # not possible on every platform/filesystem (as in ftte_core.atomic)
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
