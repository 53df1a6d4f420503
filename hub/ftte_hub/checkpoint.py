"""What the hub keeps on disk so a crash loses nothing that was acknowledged.

Layout of ``--out DIR``:

    initial-model.ftmd     the run's initial model (modelfile bytes; its hash names it to agents)
    checkpoint.npz         after every merge (atomic: write, fsync, rename; no pickle):
                             "meta"      uint8: UTF-8 JSON (driver state, subset, model hash, stats...)
                             "p:<key>"   float32 model parameters
                             "buf:<i>"   uint8: Update bytes of the driver's buffer
    journal/<V>.log        the round driver's events since the checkpoint at version V

A journal record is ``u32 length | u32 crc32 | u32 header length | JSON header | blob``; headers:
``{"e": "task", "dev", "tid"}`` (a task was issued), ``{"e": "update", "dev", "nbytes"}`` with
the Update bytes as blob, ``{"e": "gone", "dev"}``. An UPDATE is acknowledged only after its
record is fsynced (``Journal.append`` awaits it; concurrent appends share one fsync). The round
driver is deterministic, so replaying the journal over the checkpoint rebuilds its exact state,
buffer and merges included. A torn last record (a crash mid-write, never acknowledged) is
dropped; any other defect is a ``CheckpointError``.
"""
from __future__ import annotations

import asyncio
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ftte_core.atomic import atomic_write

CHECKPOINT = "checkpoint.npz"
INITIAL_MODEL = "initial-model.ftmd"
JOURNAL_DIR = "journal"
FORMAT = 1
_REC = struct.Struct("<II")
_HLEN = struct.Struct("<I")
MAX_RECORD = 1 << 30


class CheckpointError(ValueError):
    """A checkpoint or journal that cannot be used (one-line reason naming the file)."""


# -- checkpoint ------------------------------------------------------------------------------------
def save_checkpoint(out_dir, meta: Dict[str, Any], params: Dict[str, np.ndarray], buffer: List[bytes]) -> None:
    arrays = {"meta": np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), dtype=np.uint8)}
    for k, v in params.items():
        arrays[f"p:{k}"] = np.asarray(v, dtype=np.float32)
    for i, b in enumerate(buffer):
        arrays[f"buf:{i}"] = np.frombuffer(b, dtype=np.uint8)
    atomic_write(Path(out_dir) / CHECKPOINT, lambda f: np.savez(f, **arrays))


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
            params = {k[2:]: np.array(z[k], dtype=np.float32) for k in files if k.startswith("p:")}
            n_buf = sum(1 for k in files if k.startswith("buf:"))
            buffer = [bytes(z[f"buf:{i}"]) for i in range(n_buf)]
    except CheckpointError:
        raise
    except Exception as e:  # zipfile, numpy and JSON raise many kinds; all mean "unusable"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt ({msg}); move it away to start afresh") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    return meta, params, buffer


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
    return [_REC.pack(len(head) + len(blob), crc), head, blob]


def encode_record(header: Dict[str, Any], blob: bytes = b"") -> bytes:
    return b"".join(_record_parts(header, blob))


def read_journal(path) -> Iterator[Tuple[Dict[str, Any], bytes]]:
    """The records of one journal file, in order; a torn final record is skipped."""
    path = Path(path)
    data = path.read_bytes()
    pos, n = 0, len(data)
    while pos < n:
        if pos + _REC.size > n:
            return  # torn header at the end
        length, crc = _REC.unpack_from(data, pos)
        end = pos + _REC.size + length
        if length > MAX_RECORD or end > n:
            if end > n and length <= MAX_RECORD:
                return  # torn payload at the end
            raise CheckpointError(f"journal {path}: record at byte {pos} claims {length} bytes")
        payload = data[pos + _REC.size:end]
        if zlib.crc32(payload) != crc:
            if end == n:
                return  # the last record was being written when the hub died
            raise CheckpointError(f"journal {path}: record at byte {pos} fails its checksum")
        try:
            (hlen,) = _HLEN.unpack_from(payload, 0)
            header = json.loads(payload[_HLEN.size:_HLEN.size + hlen].decode("utf-8"))
            if not isinstance(header, dict) or "e" not in header:
                raise ValueError("no event name")
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            raise CheckpointError(f"journal {path}: record at byte {pos} is unreadable ({e})") from None
        yield header, payload[_HLEN.size + hlen:]
        pos = end


class Journal:
    """Append-only event log of one checkpoint generation; ``append(..., durable=True)`` awaits fsync."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
            await asyncio.get_running_loop().run_in_executor(None, os.fsync, self.fd)
            self._synced = max(self._synced, target)
        finally:
            self._syncing = None

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
