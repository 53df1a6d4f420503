"""Downlink deltas: what a task carries down when the device already holds most of it.

The hub keeps one canonical, quantised stream of the trained subset's values (``DownlinkStream``).
Its origin is the subset's values in the run's model file, which every device has (MODEL). When a
task is issued at version v, the stream publishes v: the difference between the hub's float
values and the stream's latest canonical values is quantised to int8 (or packed int4: the hub's
``--downlink-bits``) with one float32 scale per row (nearest rounding, the C++ codec), and

    canonical_v = canonical_prev + levels * scale          (float32, row by row)

That is error feedback: what the quantisation lost is still in the next difference, so the
canonical values never drift away from the hub's. A device that holds canonical_a receives the
steps from a to v and applies them with the same float32 operations (``apply_step``: one
multiply, one add, done by NumPy on both sides), so it holds canonical_v bit for bit; every frame
names the checksum of its base and of its result (``values_checksum``: SHA-256 of the values),
and the device verifies both. Devices train from canonical_v (their UPDATE is a delta against
it); the hub merges those deltas into its float values as before.

A frame is a ``snapshot`` (float32 values), a ``delta`` chain (quantised steps) from the device's
version, or a ``direct`` step; the hub sends whichever is smallest, and a snapshot whenever it does
not know what the device holds (its version is unknown or too old for the bounded history and it
keeps no mirror of the device, or a frame did not check). Rows whose step is exactly zero carry
their scale (0) and no levels.

Direct steps (per-device mirrors). A device typically comes back several versions behind, and a
chain of k steps costs about k times one step. So the hub also remembers, per device, the exact
float32 values the device holds (its *mirror*: a canonical version's values, or the result of an
earlier direct step) and may send ONE step from the mirror to the latest canonical values:

    mirror' = mirror + Q(canonical_v - mirror)             (the same quantiser and ``apply_step``)

Both sides then hold mirror' bit for bit (the frame names the checksums of mirror and mirror').
mirror' is not canonical_v (it is within one quantisation step of it); the next direct step is
computed against the exact mirror' again, so what one step loses the next one carries (error
feedback per device). The device trains from mirror' and its UPDATE is a delta against mirror',
so the hub's merge (current values + weighted deltas) is unchanged; staleness counts versions
(the task's version v, which mirror' stands for). A device that holds a mirror names no version in
AGENT_INFO, only its stream and checksum (``Held.describe``); a hub that no longer has those
values (restart, mirror dropped) sends a snapshot.

Wire format (``encode_frame``; little-endian; no pickle):

    magic "FTDL" | version u16 = 1 | flags u16 = 0 | header length u32 | JSON header | data
    header: {"stream": id, "kind": "snapshot"|"delta"|"direct", "version": v, "checksum": hex32,
             "tensors": [[key, R, F], ...],
             delta only: "base": a (an int, or null = the model file's values), "base_checksum": hex32,
                         "steps": [version of each step, increasing, the last = v; empty when a = v],
                         "bits": 8 | 4
             direct only: "from": "held" (the values this device holds, whatever their version) |
                          "origin" (the model file's values), "base_checksum": hex32, "bits": 8 | 4}
                         ("checksum" is then that of mirror', not of canonical_v; v names the task's version)
    data: snapshot: per tensor float32 [R, F]
          delta, direct (one step): per step, per tensor: scales float32 [R], then the levels of the n rows whose scale
                 is not 0, in row order: int8 [n, F] (-127..127), or int4 uint8 [n, (F+1)//2]
                 (-7..7, two's complement nibbles, element 2i low, 2i+1 high)

``decode_frame`` checks every size against the bytes it was given before reading an array and
raises ``DownlinkError`` (one line) for anything malformed; ``resolve`` refuses a frame whose base
or result does not check. ``frame_bytes`` gives the exact size of a frame without building it,
for the simulator (``downlink_bytes``).
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from . import _kernels as K
from .binfmt import PREFIX, split_prefixed

MAGIC = b"FTDL"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 4096
MAX_STEPS = 256                 # steps in one delta frame
MAX_ELEMENTS = 1 << 31          # per tensor
DEFAULT_HISTORY = 64            # steps the hub keeps
STREAM_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
CHECKSUM_RE = re.compile(r"[0-9a-f]{32}")
_KEY_LIMIT = 256
_DIMS = struct.Struct("<II")

Values = Dict[str, np.ndarray]


class DownlinkError(ValueError):
    """A downlink frame that is malformed, or does not fit what this side holds (one line)."""


# -- values, checksums, steps ----------------------------------------------------------------------
def values_checksum(values: Mapping[str, np.ndarray]) -> str:
    """32 hex digits of SHA-256 over each tensor's key, shape and float32 little-endian bytes, in order."""
    h = hashlib.sha256()
    for key, v in values.items():
        a = np.ascontiguousarray(v, dtype="<f4")
        h.update(key.encode("utf-8") + b"\0")
        h.update(_DIMS.pack(*a.shape))
        h.update(a.data)
    return h.hexdigest()[:32]


@dataclass
class StepTensor:
    scales: np.ndarray      # float32 [R]; 0 = the row does not change
    levels: np.ndarray      # the rows whose scale is not 0, in order: int8 [n, F], or (int4) uint8
                            # [n, (F+1)//2], two levels per byte, low nibble first (the update codec's packing)

    @property
    def nbytes(self) -> int:
        return self.scales.nbytes + self.levels.nbytes


Step = Dict[str, StepTensor]


def quantise_step(target: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], bits: int = 8) -> Step:
    """int8 (or packed int4) levels with one scale per row of ``target - base`` (nearest rounding,
    scale = max|row| / 127 or / 7); ValueError on NaN/Inf."""
    if bits not in (8, 4):
        raise ValueError(f"quantise_step: bits must be 8 or 4, got {bits}")
    step: Step = {}
    for key, b in base.items():
        t = np.ascontiguousarray(target[key], dtype=np.float32)
        b = np.ascontiguousarray(b, dtype=np.float32)
        if t.shape != b.shape or t.ndim != 2:
            raise ValueError(f"quantise_step: {key!r} has shape {t.shape}, the base {b.shape}")
        R, F = b.shape
        q = np.empty((R, F), np.int8) if bits == 8 else np.empty((R, (F + 1) // 2), np.uint8)
        scales = np.empty(R, np.float32)
        try:
            (K.encode_int8 if bits == 8 else K.encode_int4)(t, b, None, q, scales, False, 0)
        except ValueError as e:
            raise ValueError(f"quantise_step: {key!r}: {e}") from None
        step[key] = StepTensor(scales, np.ascontiguousarray(q[scales != 0]))
    return step


def apply_step(base: Mapping[str, np.ndarray], step: Step) -> Values:
    """New arrays: base + levels * scale, row by row, in float32 (the same operations on every side)."""
    out: Values = {}
    for key, b in base.items():
        st = step[key]
        new = np.array(b, dtype=np.float32, copy=True)
        rows = np.flatnonzero(st.scales)
        if rows.size:
            change = _levels_f32(st.levels, b.shape[1]) * st.scales[rows, None]
            new[rows] = new[rows] + change
        out[key] = new
    return out


def _levels_f32(levels: np.ndarray, F: int) -> np.ndarray:
    """The levels as float32 [n, F] (exact small integers): int8 directly, packed int4 through the
    codec's own unpacking (unit scales)."""
    if levels.dtype == np.int8:
        return levels.astype(np.float32)
    out = np.empty((levels.shape[0], F), np.float32)
    if levels.shape[0]:
        K.decode_int4(np.ascontiguousarray(levels), np.ones(levels.shape[0], np.float32), out)
    return out


def step_bytes(step: Step) -> int:
    return sum(t.nbytes for t in step.values())


def _finite(values: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.all(np.isfinite(v))) for v in values.values())


# -- frames ----------------------------------------------------------------------------------------
@dataclass
class Frame:
    stream: str
    kind: str                                  # "snapshot" | "delta" | "direct"
    version: int
    checksum: str
    shapes: List[Tuple[str, int, int]]         # (key, R, F) in order
    snapshot: Optional[Values] = None          # kind == "snapshot"
    base: Optional[int] = None                 # kind == "delta": None = the model file's values
    base_checksum: str = ""
    steps: Optional[List[Tuple[int, Step]]] = None
    bits: int = 8                              # delta, direct: 8 (int8 levels) or 4 (packed int4)
    source: str = ""                           # kind == "direct": "held" or "origin" (its base)

    @property
    def needs_origin(self) -> bool:
        """The frame applies to the model file's values (the agent reads them from its cached model)."""
        return (self.kind == "delta" and self.base is None) or (self.kind == "direct" and self.source == "origin")


def _header(frame: Frame) -> bytes:
    head = {"stream": frame.stream, "kind": frame.kind, "version": int(frame.version), "checksum": frame.checksum,
            "tensors": [[k, int(r), int(f)] for k, r, f in frame.shapes]}
    if frame.kind == "delta":
        head["base"] = None if frame.base is None else int(frame.base)
        head["base_checksum"] = frame.base_checksum
        head["steps"] = [int(v) for v, _s in frame.steps]
        head["bits"] = int(frame.bits)
    elif frame.kind == "direct":
        head["from"] = frame.source
        head["base_checksum"] = frame.base_checksum
        head["bits"] = int(frame.bits)
    return json.dumps(head, separators=(",", ":"), allow_nan=False).encode()


def encode_frame(frame: Frame) -> bytes:
    header = _header(frame)
    parts = [PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header)), header]
    if frame.kind == "snapshot":
        for key, _r, _f in frame.shapes:
            parts.append(np.ascontiguousarray(frame.snapshot[key], dtype="<f4").tobytes())
    else:
        for _v, step in frame.steps:
            for key, _r, _f in frame.shapes:
                t = step[key]
                parts.append(np.ascontiguousarray(t.scales, dtype="<f4").tobytes())
                parts.append(np.ascontiguousarray(t.levels, dtype=np.int8 if frame.bits == 8 else np.uint8).tobytes())
    return b"".join(parts)


def frame_bytes(frame: Frame) -> int:
    """len(encode_frame(frame)), without building the bytes."""
    n = PREFIX.size + len(_header(frame))
    if frame.kind == "snapshot":
        return n + sum(4 * r * f for _k, r, f in frame.shapes)
    return n + sum(step_bytes(s) for _v, s in frame.steps)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def decode_frame(buf, max_bytes: int = 1 << 28) -> Frame:
    """Parse a frame; every defect raises DownlinkError with a one-line reason."""
    mv, hbytes, off = split_prefixed(buf, "downlink frame", MAGIC, FORMAT_VERSION, max_bytes, MAX_HEADER_BYTES,
                                     DownlinkError)
    n = mv.nbytes
    try:
        head = json.loads(hbytes.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise DownlinkError(f"downlink header is not JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(head, dict):
        raise DownlinkError("downlink header must be a JSON object")
    kind = head.get("kind")
    want = {"stream", "kind", "version", "checksum", "tensors"} | (
        {"base", "base_checksum", "steps", "bits"} if kind == "delta" else
        {"from", "base_checksum", "bits"} if kind == "direct" else set())
    if kind not in ("snapshot", "delta", "direct") or set(head) != want:
        raise DownlinkError(f"downlink header must have exactly the fields {sorted(want)} "
                            f"(kind snapshot, delta or direct)")
    stream, version, checksum = head["stream"], head["version"], head["checksum"]
    if not isinstance(stream, str) or not STREAM_RE.fullmatch(stream):
        raise DownlinkError("downlink stream id must be 1 to 64 letters, digits, '-' or '_'")
    if not _is_int(version) or not 0 <= version < 1 << 62:
        raise DownlinkError("downlink version must be a non-negative integer below 2^62")
    if not isinstance(checksum, str) or not CHECKSUM_RE.fullmatch(checksum):
        raise DownlinkError("downlink checksum must be 32 lowercase hex digits")
    tlist = head["tensors"]
    if not isinstance(tlist, list) or not 0 < len(tlist) <= MAX_TENSORS:
        raise DownlinkError(f"downlink tensors must be a list of 1 to {MAX_TENSORS} entries")
    shapes, seen = [], set()
    for entry in tlist:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and _is_int(entry[1]) and _is_int(entry[2])):
            raise DownlinkError(f"downlink tensor entry {str(entry)[:60]} must be [key, rows, columns]")
        key, R, F = entry
        if not key or len(key) > _KEY_LIMIT or key in seen:
            raise DownlinkError(f"downlink tensor key {key[:40]!r} is empty, too long or repeated")
        if R < 1 or F < 1 or R * F > MAX_ELEMENTS:
            raise DownlinkError(f"downlink tensor {key[:40]!r}: shape [{R}, {F}] is out of range")
        seen.add(key)
        shapes.append((key, R, F))
    frame = Frame(stream=stream, kind=kind, version=version, checksum=checksum, shapes=shapes)
    if kind == "snapshot":
        need = sum(4 * R * F for _k, R, F in shapes)
        if off + need != n:
            raise DownlinkError(f"downlink snapshot needs {need} data bytes, the frame has {n - off}")
        frame.snapshot = {}
        for key, R, F in shapes:
            a = np.frombuffer(mv[off:off + 4 * R * F], dtype="<f4").astype(np.float32).reshape(R, F)
            if not np.all(np.isfinite(a)):
                raise DownlinkError(f"downlink snapshot {key[:40]!r} holds NaN or Inf")
            frame.snapshot[key] = a
            off += 4 * R * F
        return frame
    base_checksum, bits = head["base_checksum"], head["bits"]
    if not _is_int(bits) or bits not in (8, 4):
        raise DownlinkError("downlink bits must be 8 or 4")
    if not isinstance(base_checksum, str) or not CHECKSUM_RE.fullmatch(base_checksum):
        raise DownlinkError("downlink base_checksum must be 32 lowercase hex digits")
    if kind == "direct":
        if head["from"] not in ("held", "origin"):
            raise DownlinkError("downlink direct step: from must be \"held\" or \"origin\"")
        frame.source, frame.base_checksum, frame.bits = head["from"], base_checksum, bits
        step, off = _read_step(mv, off, shapes, bits, version)
        frame.steps = [(version, step)]
        if off != n:
            raise DownlinkError(f"downlink frame: {n - off} bytes left over after the data")
        return frame
    base, steps = head["base"], head["steps"]
    if base is not None and (not _is_int(base) or not 0 <= base <= version):
        raise DownlinkError("downlink base must be null or a non-negative integer, at most the version")
    if not isinstance(steps, list) or len(steps) > MAX_STEPS or not all(_is_int(v) for v in steps):
        raise DownlinkError(f"downlink steps must be a list of at most {MAX_STEPS} versions")
    if not steps and base != version:
        raise DownlinkError("downlink: a delta without steps must have its base at the frame's version")
    lo = -1 if base is None else base
    for v in steps:
        if not lo < v < 1 << 62:
            raise DownlinkError("downlink step versions must increase from the base")
        lo = v
    if steps and steps[-1] != version:
        raise DownlinkError("downlink: the last step must be the frame's version")
    frame.base, frame.base_checksum, frame.steps, frame.bits = base, base_checksum, [], bits
    for v in steps:
        step, off = _read_step(mv, off, shapes, bits, v)
        frame.steps.append((v, step))
    if off != n:
        raise DownlinkError(f"downlink frame: {n - off} bytes left over after the data")
    return frame


def _read_step(mv: memoryview, off: int, shapes, bits: int, v: int) -> Tuple[Step, int]:
    """One step's tensors from ``mv`` at ``off`` (every size checked before it is read)."""
    n = mv.nbytes
    step: Step = {}
    for key, R, F in shapes:
        width = F if bits == 8 else (F + 1) // 2
        if off + 4 * R > n:
            raise DownlinkError(f"downlink step {v} {key[:40]!r}: scales run past the end of the frame")
        scales = np.frombuffer(mv[off:off + 4 * R], dtype="<f4").astype(np.float32)
        off += 4 * R
        if not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise DownlinkError(f"downlink step {v} {key[:40]!r}: scales hold NaN, Inf or negative values")
        rows = int(np.count_nonzero(scales))
        if off + rows * width > n:
            raise DownlinkError(f"downlink step {v} {key[:40]!r}: levels run past the end of the frame")
        levels = np.frombuffer(mv[off:off + rows * width], dtype=np.int8 if bits == 8 else np.uint8)
        levels = levels.reshape(rows, width)
        off += rows * width
        if bits == 8 and np.any(levels == -128):
            raise DownlinkError(f"downlink step {v} {key[:40]!r} holds level -128, outside [-127, 127]")
        if bits == 4 and (np.any(levels & 0x0F == 0x08) or np.any(levels >> 4 == 0x08)):
            raise DownlinkError(f"downlink step {v} {key[:40]!r} holds level -8, outside [-7, 7]")
        step[key] = StepTensor(scales, levels)
    return step, off


def _no_constant(c):
    raise ValueError(f"{c} is not allowed")


def resolve(frame: Frame, held: Optional["Held"], origin: Optional[Mapping[str, np.ndarray]]) -> Values:
    """The values the frame describes (canonical, or for a direct step the device's new mirror),
    checked against its checksums.

    ``held``: what this side holds (for a delta from a version, or a direct step from "held");
    ``origin``: the model file's values of the subset (``frame.needs_origin``). DownlinkError when
    the base is not what the frame needs, shapes differ, a value is not finite, or a checksum does
    not match: the caller then asks for a snapshot.
    """
    if frame.kind == "snapshot":
        values = frame.snapshot
    else:
        if frame.kind == "direct" and frame.source == "held":
            if held is None or held.values is None or held.checksum != frame.base_checksum:
                have = "nothing" if held is None else f"values {held.checksum}"
                raise DownlinkError(f"downlink direct step from values {frame.base_checksum}; this side holds {have}")
            base = held.values
        elif frame.needs_origin:
            if origin is None:
                raise DownlinkError(f"downlink {frame.kind} from the model file's values, which this side "
                                    f"does not have")
            base = origin
        else:
            if held is None or held.stream != frame.stream or held.version != frame.base:
                have = "nothing" if held is None else f"version {held.version} of stream {held.stream}"
                raise DownlinkError(f"downlink delta from version {frame.base} of stream {frame.stream}; this "
                                    f"side holds {have}")
            base = held.values
        if [(k, *np.shape(base.get(k, ()))) for k, _r, _f in frame.shapes] != frame.shapes or len(base) != len(frame.shapes):
            raise DownlinkError(f"downlink {frame.kind}: its tensors do not match the values it applies to")
        if values_checksum(base) != frame.base_checksum:
            raise DownlinkError(f"downlink {frame.kind}: the base values do not match checksum {frame.base_checksum}")
        values = dict(base)
        for _v, step in frame.steps:
            values = apply_step(values, step)
        if not _finite(values):
            raise DownlinkError(f"downlink {frame.kind}: the result holds NaN or Inf")
    if values_checksum(values) != frame.checksum:
        raise DownlinkError(f"downlink: the values do not match checksum {frame.checksum} (version {frame.version})")
    return values


# -- both sides: what a side holds -----------------------------------------------------------------
@dataclass
class Held:
    stream: str
    version: Optional[int]              # None: a mirror (a direct step's result), no canonical version
    checksum: str
    values: Optional[Values] = None     # the agent keeps them; the hub a Mirror

    def describe(self) -> Dict[str, object]:
        """For AGENT_INFO: which version this agent holds (a mirror: no "version", only the checksum)."""
        if self.version is None:
            return {"stream": self.stream, "checksum": self.checksum}
        return {"stream": self.stream, "version": int(self.version), "checksum": self.checksum}


def held_after(frame: Frame, values: Values) -> Held:
    """What a side holds once ``frame`` resolved to ``values`` (a direct step: a mirror, no version)."""
    return Held(frame.stream, None if frame.kind == "direct" else frame.version, frame.checksum, values)


def parse_held(obj) -> Optional[Tuple[str, Optional[int], str]]:
    """(stream, version or None for a mirror, checksum) from an AGENT_INFO ``downlink`` object, or
    None if it names none. MessageError-free: anything malformed reads as 'holds nothing' (the hub
    then sends a snapshot)."""
    if not isinstance(obj, dict):
        return None
    s, v, c = obj.get("stream"), obj.get("version"), obj.get("checksum")
    if "version" not in obj:
        v = None
    elif not (_is_int(v) and 0 <= v < 1 << 62):
        return None
    if isinstance(s, str) and STREAM_RE.fullmatch(s) and isinstance(c, str) and CHECKSUM_RE.fullmatch(c):
        return s, v, c
    return None


# -- hub side --------------------------------------------------------------------------------------
ORIGIN = -1      # a device that holds the model file's values (it has the MODEL) and nothing newer


@dataclass
class _Entry:
    base: int                # ORIGIN or a version
    version: int
    step: Step
    checksum: str            # of the canonical values after the step
    nbytes: int


class DownlinkStream:
    """The hub's canonical stream for one run's subset in this process.

    ``publish(version, values)`` makes version ``version`` canonical (idempotent per version);
    ``frame_for(held_version, version)`` is the smallest frame that brings a device from
    ``held_version`` (ORIGIN, a version, or None for 'unknown') to ``version``. History is bounded
    (``history`` steps, and fewer bytes of steps than one snapshot: a longer chain would never be
    sent); a device further behind gets a snapshot.
    """

    def __init__(self, origin: Mapping[str, np.ndarray], stream_id: str, history: int = DEFAULT_HISTORY,
                 bits: int = 8):
        if not STREAM_RE.fullmatch(stream_id):
            raise ValueError("stream_id must be 1 to 64 letters, digits, '-' or '_'")
        if bits not in (8, 4):
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        self.bits = int(bits)
        self.stream_id = stream_id
        self.history = max(1, int(history))
        self.origin = {k: np.array(v, dtype=np.float32, copy=True) for k, v in origin.items()}
        self.origin_checksum = values_checksum(self.origin)
        self.shapes = [(k, int(v.shape[0]), int(v.shape[1])) for k, v in self.origin.items()]
        self.snapshot_bytes = sum(4 * r * f for _k, r, f in self.shapes)
        self.version = ORIGIN
        self.values: Values = self.origin
        self.checksum = self.origin_checksum
        self.entries: deque = deque()
        self.history_bytes = 0
        self._checksums: Dict[int, str] = {ORIGIN: self.origin_checksum}

    def publish(self, version: int, values: Mapping[str, np.ndarray]) -> Values:
        """Canonical values at ``version`` (a new step from the latest, unless ``version`` is the latest)."""
        version = int(version)
        if version == self.version:
            return self.values
        if version < self.version:
            raise ValueError(f"publish: version {version} is older than the stream's {self.version}")
        step = quantise_step(values, self.values, self.bits)
        new = apply_step(self.values, step)
        checksum = values_checksum(new)
        entry = _Entry(self.version, version, step, checksum, step_bytes(step))
        self.entries.append(entry)
        self.history_bytes += entry.nbytes
        self._checksums[version] = checksum
        # a chain that is not smaller than a snapshot is never sent: keep only steps that can be,
        # so the history never holds more than about one copy of the values
        while self.entries and (len(self.entries) > self.history or self.history_bytes >= self.snapshot_bytes):
            old = self.entries.popleft()
            self.history_bytes -= old.nbytes
            self._checksums.pop(old.base, None)
        self.version, self.values, self.checksum = version, new, checksum
        return new

    def checksum_of(self, version: int) -> Optional[str]:
        return self._checksums.get(int(version))

    def _chain(self, held: Optional[int]) -> Optional[List[_Entry]]:
        if held is None:
            return None
        if held == self.version:
            return []      # it holds the latest: the frame only names it
        for i, e in enumerate(self.entries):
            if e.base == held:
                return list(self.entries)[i:]
        return None

    def frame_for(self, held: Optional[int], version: Optional[int] = None) -> Frame:
        """A frame from ``held`` to the latest version (which must be ``version`` when given)."""
        if version is not None and int(version) != self.version:
            raise ValueError(f"frame_for: version {version} is not the stream's latest ({self.version}); publish it")
        if self.version == ORIGIN:
            raise ValueError("frame_for: nothing published yet")
        chain = self._chain(held)
        snap = Frame(self.stream_id, "snapshot", self.version, self.checksum, list(self.shapes), snapshot=self.values)
        if chain is None:
            return snap
        delta = Frame(self.stream_id, "delta", self.version, self.checksum, list(self.shapes),
                      base=None if held == ORIGIN else int(held), base_checksum=self._checksums[held],
                      steps=[(e.version, e.step) for e in chain], bits=self.bits)
        if len(chain) > MAX_STEPS or frame_bytes(delta) >= frame_bytes(snap):
            return snap
        return delta

    def held_after(self, frame: Frame) -> int:
        return frame.version

    def direct_frame(self, mirror: Optional["Mirror"], held: Optional[int] = None) -> Optional[Tuple[Frame, Values]]:
        """(a direct step from what the device holds to the latest canonical values, the device's
        values after it), or None when the hub does not know those values: ``held`` ORIGIN (the
        model file's values, "from": "origin"), else ``mirror`` of this stream ("from": "held")."""
        if self.version == ORIGIN:
            raise ValueError("direct_frame: nothing published yet")
        if held == ORIGIN:
            base, base_checksum, source = self.origin, self.origin_checksum, "origin"
        elif mirror is not None and mirror.stream == self.stream_id:
            base, base_checksum, source = mirror.values, mirror.checksum, "held"
        else:
            return None
        if mirror is not None and source == "held" and mirror.version == self.version:
            # already one step from this version: nothing new to say (a zero step; it trains from mirror)
            step = {k: StepTensor(np.zeros(r, np.float32), np.zeros((0, f if self.bits == 8 else (f + 1) // 2),
                                                                     np.int8 if self.bits == 8 else np.uint8))
                    for k, r, f in self.shapes}
        else:
            step = quantise_step(self.values, base, self.bits)
        after = apply_step(base, step)
        frame = Frame(self.stream_id, "direct", self.version, values_checksum(after), list(self.shapes),
                      base_checksum=base_checksum, steps=[(self.version, step)], bits=self.bits, source=source)
        return frame, after

    def frame_for_device(self, held: Optional[int], mirror: Optional["Mirror"] = None,
                         direct: bool = True) -> "Sent":
        """The smallest frame that brings a device to the latest version: a snapshot, the canonical
        chain from ``held`` (ORIGIN, a version, or None), or (``direct``) one direct step from the
        values the hub knows it holds (``held`` ORIGIN, or ``mirror``). Ties go to the canonical
        frames (a device at a canonical version can take chains later). Returns the frame, what the
        device holds after it (a Mirror) and its canonical version then (None after a direct step).
        A chain of at most one step is never replaced (a direct step is no smaller and would leave
        the device off the canonical values)."""
        frame = self.frame_for(held)
        best = frame_bytes(frame)
        # a chain of at most one step is a direct step's size and lands on canonical values
        if direct and not (frame.kind == "delta" and len(frame.steps) <= 1):
            got = self.direct_frame(mirror, held)
            if got is not None and frame_bytes(got[0]) < best:
                return Sent(got[0], Mirror(self.stream_id, got[0].checksum, got[1], self.version), None)
        return Sent(frame, Mirror(self.stream_id, self.checksum, self.values, self.version), self.version)


@dataclass
class Mirror:
    """The exact float32 values a device holds, as the hub knows them (a canonical version's values
    or a direct step's result), and their checksum; per stream (ftte-tiered: per tier's subset)."""
    stream: str
    checksum: str
    values: Values
    version: Optional[int] = None   # the canonical version the values stand for (None: not known)


@dataclass
class Sent:
    frame: Frame
    mirror: Mirror               # what the device holds once the frame resolves
    version: Optional[int]       # its canonical version then; None after a direct step


def downlink_bytes(stream: DownlinkStream, held: Optional[int], version: int,
                   values: Mapping[str, np.ndarray]) -> Tuple[int, int]:
    """(bytes of the frame a task at ``version`` carries to a device holding ``held``, what it holds after).

    The simulator's hook: publishes ``version`` (``values`` = the hub's float values then) and sizes
    the frame the fleet would send, exactly (``frame_bytes``). ``held``: ORIGIN for a device that
    has the model file and nothing newer, None for unknown (a snapshot), else the version it holds.
    """
    stream.publish(version, values)
    frame = stream.frame_for(held, version)
    return frame_bytes(frame), frame.version


class DownlinkCounter:
    """The simulator's view of the fleet's downlink: one stream, what each device holds.

        counter = DownlinkCounter(subset_values(model, subset))     # every device starts at ORIGIN
        nbytes, values = counter.task(device_id, task.base_version, task.values)
        ... the device trains from ``values`` (the values a real agent would hold: canonical, or
            after a direct step its mirror) ...

    ``nbytes`` is exactly the frame the hub's fleet would put in that TASK (``frame_bytes`` of the
    frame ``DownlinkStream.frame_for_device`` picks, the fleet's own choice; the TASK's JSON header
    comes on top, as for float32 values). ``direct=False``: canonical frames only (the hub's
    ``--no-direct-steps``). ``forget(device_id)``: the device lost what it held (a restart): its
    next task carries a snapshot. ``kinds`` counts the frames sent by kind.
    """

    def __init__(self, origin: Mapping[str, np.ndarray], bits: int = 8, history: int = DEFAULT_HISTORY,
                 direct: bool = True):
        self.stream = DownlinkStream(origin, "sim", history=history, bits=bits)
        self.direct = bool(direct)
        self.held: Dict[str, Optional[int]] = {}
        self.mirrors: Dict[str, Optional[Mirror]] = {}
        self.kinds: Dict[str, int] = {"snapshot": 0, "delta": 0, "direct": 0}
        self.last_frame: Optional[Frame] = None

    def task(self, device_id: str, version: int, values: Mapping[str, np.ndarray]) -> Tuple[int, Values]:
        self.stream.publish(version, values)
        sent = self.stream.frame_for_device(self.held.get(device_id, ORIGIN), self.mirrors.get(device_id),
                                            self.direct)
        self.held[device_id], self.mirrors[device_id] = sent.version, sent.mirror
        self.kinds[sent.frame.kind] += 1
        self.last_frame = sent.frame
        return frame_bytes(sent.frame), sent.mirror.values

    def forget(self, device_id: str) -> None:
        self.held[device_id] = None
        self.mirrors[device_id] = None
