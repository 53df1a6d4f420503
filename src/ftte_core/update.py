"""What travels between hub and devices: subset values down, encoded deltas up.

Down: ``subset_values(model, subset)`` -> {key: float32 [R, F]} in ``Subset.tensors`` order.
Up:   ``encode_update(...)`` -> ``Update``: per tensor the delta new - base, int8 or packed int4
      with one float32 scale per row (the C++ codec), or plain float32 for the baselines.

Wire format of ``Update.to_bytes()`` (no pickle; everything little-endian):

    magic   4 bytes  b"FTUP"
    version u16      FORMAT_VERSION
    flags   u16      0 (reserved; non-zero is rejected)
    hlen    u32      length of the JSON header
    header  hlen     UTF-8 JSON: metadata and per tensor {key, bits, shape [R, F], dtype}; the
                     metadata's "run_id" (the hub run the task came from) is present only when set
    arrays           per tensor in header order: data (int8 [R,F] | uint8 [R,(F+1)//2] | <f4 [R,F]),
                     then for bits 8/4 the scales (<f4 [R])

``Update.from_bytes`` checks the total length against the header before touching any array,
so garbage never makes it allocate more than ``len(buf)`` (itself capped by ``max_bytes``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from . import _kernels as K
from .binfmt import PREFIX, split_prefixed
from .graph import Model
from .subset import Subset

MAGIC = b"FTUP"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 4096
MAX_ELEMENTS = 1 << 31  # per tensor
DEFAULT_MAX_BYTES = 1 << 28  # 256 MiB: far above any subset a Pi trains
_DTYPES = {8: "int8", 4: "uint8", 32: "<f4"}
_STR_LIMIT = 256


class UpdateError(ValueError):
    """Bytes that are not a well-formed update (one-line reason)."""


class UpdateRejected(ValueError):
    """A well-formed update that does not fit this model/subset/version. ``reason`` is a short code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class TensorDelta:
    key: str
    bits: int                      # 8, 4 (quantised with per-row scales) or 32 (float32 delta)
    data: np.ndarray               # int8 [R,F] | uint8 [R,(F+1)//2] | float32 [R,F]
    scales: Optional[np.ndarray]   # float32 [R] for bits 8/4, None for 32
    shape: tuple                   # (R, F) of the delta itself

    @property
    def payload_bytes(self) -> int:
        return self.data.nbytes + (0 if self.scales is None else self.scales.nbytes)


@dataclass
class Update:
    base_version: int
    subset_fingerprint: str
    num_samples: int
    loss: float
    tensors: List[TensorDelta]
    stats: Dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: Optional[int] = None
    device_id: str = ""
    task_id: str = ""
    run_id: str = ""               # the hub's run this update was trained for ("" = unknown: older agents)

    # -- wire format ---------------------------------------------------------------------------
    def _header(self) -> bytes:
        head = {
            "base_version": int(self.base_version), "subset_fingerprint": str(self.subset_fingerprint),
            "num_samples": int(self.num_samples), "loss": float(self.loss),
            "stats": {str(k): float(v) for k, v in self.stats.items()},
            "peak_memory_bytes": None if self.peak_memory_bytes is None else int(self.peak_memory_bytes),
            "device_id": str(self.device_id), "task_id": str(self.task_id),
            "tensors": [{"key": t.key, "bits": int(t.bits), "shape": [int(t.shape[0]), int(t.shape[1])],
                         "dtype": _DTYPES[t.bits]} for t in self.tensors],
        }
        if self.run_id:  # absent when unset, so updates kept by older agents keep their exact bytes
            head["run_id"] = str(self.run_id)
        try:
            return json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
        except ValueError:
            raise UpdateError("update metadata holds NaN or Inf (loss or stats); it cannot be sent") from None

    def to_bytes(self) -> bytes:
        header = self._header()
        parts = [PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header)), header]
        for t in self.tensors:
            parts.append(np.ascontiguousarray(t.data, dtype=np.dtype(_DTYPES[t.bits])).tobytes())
            if t.bits != 32:
                parts.append(np.ascontiguousarray(t.scales, dtype="<f4").tobytes())
        return b"".join(parts)

    @property
    def nbytes(self) -> int:
        """Size on the wire: len(to_bytes()), computed without building the bytes."""
        return PREFIX.size + len(self._header()) + sum(t.payload_bytes for t in self.tensors)

    @classmethod
    def from_bytes(cls, buf, max_bytes: int = DEFAULT_MAX_BYTES) -> "Update":
        """Parse and validate; any defect raises UpdateError with a one-line reason."""
        mv, header, pos = split_prefixed(buf, "update", MAGIC, FORMAT_VERSION, max_bytes, MAX_HEADER_BYTES,
                                         UpdateError)
        n = mv.nbytes
        try:
            head = json.loads(header.decode("utf-8"),
                              parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
        except UpdateError:
            raise
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise UpdateError(f"header is not valid JSON: {str(e).splitlines()[0][:120]}") from None
        meta, specs = _parse_header(head)
        sizes = [(_data_bytes(bits, shape), 0 if bits == 32 else 4 * shape[0]) for _, bits, shape in specs]
        expected = pos + sum(a + b for a, b in sizes)
        if expected != n:
            raise UpdateError(f"update is {n} bytes but its header describes {expected}")
        tensors = []
        for (key, bits, shape), (dbytes, sbytes) in zip(specs, sizes):
            R, F = shape
            raw = np.frombuffer(mv, dtype=np.dtype(_DTYPES[bits]), count=dbytes // np.dtype(_DTYPES[bits]).itemsize,
                                offset=pos)
            data = raw.astype(_DTYPES[bits] if bits != 32 else np.float32).reshape(R, -1)  # copy: owned + aligned
            pos += dbytes
            scales = None
            if bits != 32:
                scales = np.frombuffer(mv, dtype="<f4", count=R, offset=pos).astype(np.float32)
                pos += sbytes
                if not np.all(np.isfinite(scales)) or np.any(scales < 0):
                    raise UpdateError(f"tensor {key!r}: scales must be finite and >= 0")
                if bits == 8 and np.any(data == -128):
                    raise UpdateError(f"tensor {key!r}: int8 level -128 is outside the codec's [-127, 127]")
            elif not np.all(np.isfinite(data)):
                raise UpdateError(f"tensor {key!r}: float deltas hold NaN or Inf")
            tensors.append(TensorDelta(key, bits, data, scales, (R, F)))
        return cls(tensors=tensors, **meta)


def _reject_constant(name):
    raise UpdateError(f"header holds {name}, which is not a finite number")


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise UpdateError(f"header repeats the field {k!r}")
        out[k] = v
    return out


def _data_bytes(bits: int, shape) -> int:
    R, F = shape
    return R * ((F + 1) // 2) if bits == 4 else R * F * (1 if bits == 8 else 4)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _finite_number(v) -> bool:
    """A JSON number that is finite as a float; a huge integer is not (float() would overflow)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _parse_header(head):
    if not isinstance(head, dict):
        raise UpdateError("header must be a JSON object")
    need = {"base_version", "subset_fingerprint", "num_samples", "loss", "stats", "peak_memory_bytes",
            "device_id", "task_id", "tensors"}
    missing, extra = need - head.keys(), head.keys() - need - {"run_id"}
    if missing or extra:
        raise UpdateError(f"header fields wrong: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for name in ("base_version", "num_samples"):
        if not _is_int(head[name]) or not 0 <= head[name] < 1 << 62:
            raise UpdateError(f"{name} must be a non-negative integer, got {str(head[name])[:40]}")
    for name in ("subset_fingerprint", "device_id", "task_id"):
        if not isinstance(head[name], str) or len(head[name]) > _STR_LIMIT:
            raise UpdateError(f"{name} must be a string of at most {_STR_LIMIT} characters")
    run_id = head.get("run_id", "")
    if not isinstance(run_id, str) or "run_id" in head and not 0 < len(run_id) <= 64:
        raise UpdateError("run_id must be a string of 1 to 64 characters when present")
    loss = head["loss"]
    if not _finite_number(loss):
        raise UpdateError("loss must be a finite number")
    stats = head["stats"]
    if not isinstance(stats, dict) or len(stats) > 64:
        raise UpdateError("stats must be an object with at most 64 entries")
    for k, v in stats.items():
        if len(k) > _STR_LIMIT or not _finite_number(v):
            raise UpdateError(f"stats[{k[:40]!r}] must be a finite number")
    peak = head["peak_memory_bytes"]
    if peak is not None and (not _is_int(peak) or not 0 <= peak < 1 << 62):
        raise UpdateError("peak_memory_bytes must be null or a non-negative integer")
    tlist = head["tensors"]
    if not isinstance(tlist, list) or len(tlist) > MAX_TENSORS:
        raise UpdateError(f"tensors must be a list of at most {MAX_TENSORS} entries")
    specs, seen = [], set()
    for i, t in enumerate(tlist):
        if not isinstance(t, dict) or set(t) != {"key", "bits", "shape", "dtype"}:
            raise UpdateError(f"tensors[{i}] must have exactly the fields key, bits, shape, dtype")
        key, bits, shape, dtype = t["key"], t["bits"], t["shape"], t["dtype"]
        if not isinstance(key, str) or not key or len(key) > _STR_LIMIT or key in seen:
            raise UpdateError(f"tensors[{i}].key must be a new non-empty string of at most {_STR_LIMIT} characters")
        seen.add(key)
        if bits not in (4, 8, 32) or not _is_int(bits):
            raise UpdateError(f"tensor {key!r}: bits must be 4, 8 or 32, got {str(bits)[:20]}")
        if dtype != _DTYPES[bits]:
            raise UpdateError(f"tensor {key!r}: dtype {str(dtype)[:20]!r} does not match bits {bits} ({_DTYPES[bits]})")
        if (not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(d) and d >= 1 for d in shape)
                or shape[0] * shape[1] > MAX_ELEMENTS):
            raise UpdateError(f"tensor {key!r}: shape must be [R, F] with 1 <= R*F <= {MAX_ELEMENTS}")
        specs.append((key, bits, (shape[0], shape[1])))
    meta = {k: head[k] for k in ("base_version", "subset_fingerprint", "num_samples", "device_id", "task_id",
                                 "peak_memory_bytes")}
    meta["run_id"] = run_id
    meta["loss"] = float(loss)
    meta["stats"] = {k: float(v) for k, v in stats.items()}
    return meta, specs


# -- hub side: what a task carries down ------------------------------------------------------------
def subset_values(model: Model, subset: Subset) -> Dict[str, np.ndarray]:
    """Copies of the subset's current values, {key: float32 [R, F]} in ``Subset.tensors`` order."""
    out = {}
    for key, _layer, view, rows in subset.tensors(model):
        out[key] = np.ascontiguousarray(view[rows] if rows is not None else view, dtype=np.float32).copy()
    return out


def load_values(model: Model, subset: Subset, values: Dict[str, np.ndarray]) -> None:
    """Write task values into a (device-side) model: the inverse of ``subset_values``."""
    for key, _layer, view, rows in subset.tensors(model):
        src = values.get(key)
        want = (rows.size if rows is not None else view.shape[0], view.shape[1])
        if src is None or src.shape != want:
            raise ValueError(f"values[{key!r}] must have shape {want}, got {None if src is None else src.shape}")
        if rows is None:
            view[...] = src
        else:
            view[rows] = src


# -- device side: encode -------------------------------------------------------------------------
def _tensor_seed(seed: int, index: int) -> int:
    # Distinct, reproducible stochastic-rounding streams per tensor (the codec keys on (seed, row, col)).
    return (int(seed) * 0x9E3779B1 + index * 0x85EBCA77 + 1) & 0xFFFFFFFFFFFFFFFF


#: elements per block when checking a delta: its float32/float64 temporaries stay near 0.2 MB
#: whatever the tensor's size (a whole-tensor float64 copy was the agent's peak memory)
_CHECK_BLOCK = 1 << 14


def _delta_sum_of_squares(key: str, view: np.ndarray, rows: Optional[np.ndarray], base: np.ndarray) -> float:
    """Sum over the selected rows of (new - base)^2 in float64, block by block; ValueError on NaN/Inf."""
    R, F = base.shape
    step = max(1, _CHECK_BLOCK // max(F, 1))
    sq = 0.0
    for a in range(0, R, step):
        b = min(R, a + step)
        new = view[a:b] if rows is None else view[rows[a:b]]
        delta = (new - base[a:b]).ravel()
        if not np.all(np.isfinite(delta)):
            raise ValueError(f"encode_update: the delta of {key!r} holds NaN or Inf")
        delta = delta.astype(np.float64)
        sq += float(np.dot(delta, delta))
    return sq


def encode_update(model: Model, subset: Subset, base_values: Dict[str, np.ndarray], base_version: int,
                  num_samples: int, loss: float, bits: int = 8, stochastic: bool = True, seed: int = 0,
                  device_id: str = "", task_id: str = "", peak_memory_bytes: Optional[int] = None) -> Update:
    """Delta of ``model``'s subset against ``base_values`` (what the task brought), encoded.

    bits 8 / 4: per-row-scaled int8 / packed int4 from the C++ codec (stochastic rounding by
    default: unbiased, so averaging many updates does not accumulate rounding bias); bits 32:
    plain float32 deltas. Raises ValueError if a delta holds NaN/Inf.
    """
    if bits not in (4, 8, 32):
        raise ValueError(f"bits must be 4, 8 or 32, got {bits}")
    tensors, sq = [], 0.0
    for i, (key, _layer, view, rows) in enumerate(subset.tensors(model)):
        base = base_values.get(key)
        R, F = (rows.size if rows is not None else view.shape[0]), view.shape[1]
        if base is None or base.shape != (R, F) or base.dtype != np.float32:
            raise ValueError(f"base_values[{key!r}] must be float32 {(R, F)}, got "
                             f"{None if base is None else (base.dtype, base.shape)}")
        base = np.ascontiguousarray(base)
        sq += _delta_sum_of_squares(key, view, rows, base)
        if bits == 32:
            delta = (view if rows is None else view[rows]) - base
            tensors.append(TensorDelta(key, 32, delta.astype(np.float32, copy=False), None, (R, F)))
            continue
        scales = np.empty(R, np.float32)
        if bits == 8:
            q = np.empty((R, F), np.int8)
            K.encode_int8(np.ascontiguousarray(view), base, rows, q, scales, stochastic, _tensor_seed(seed, i))
        else:
            q = np.empty((R, (F + 1) // 2), np.uint8)
            K.encode_int4(np.ascontiguousarray(view), base, rows, q, scales, stochastic, _tensor_seed(seed, i))
        tensors.append(TensorDelta(key, bits, q, scales, (R, F)))
    loss = float(loss)
    if not math.isfinite(loss):
        raise ValueError(f"encode_update: loss must be finite, got {loss}")
    return Update(base_version=int(base_version), subset_fingerprint=subset.fingerprint(),
                  num_samples=int(num_samples), loss=loss, tensors=tensors,
                  stats={"delta_l2": math.sqrt(sq)}, peak_memory_bytes=peak_memory_bytes,
                  device_id=str(device_id), task_id=str(task_id))


# -- hub side: check and decode --------------------------------------------------------------------
def expected_shapes(model: Model, subset: Subset) -> Dict[str, tuple]:
    return {key: ((rows.size if rows is not None else view.shape[0]), view.shape[1])
            for key, _l, view, rows in subset.tensors(model)}


def check_update(update: Update, model: Model, subset: Subset, current_version: int,
                 bits: Optional[int] = None, fingerprint: Optional[str] = None) -> None:
    """Raise UpdateRejected (with a ``reason`` code) unless ``update`` can be merged now.

    ``fingerprint``: pass ``subset.fingerprint()`` when checking many updates (it hashes the subset).
    """
    if not isinstance(update, Update):
        raise UpdateRejected("malformed", f"expected an Update, got {type(update).__name__}")
    fp = fingerprint if fingerprint is not None else subset.fingerprint()
    if update.subset_fingerprint != fp:
        raise UpdateRejected("subset", f"update is for subset {update.subset_fingerprint[:16]!r}, the hub trains {fp!r}")
    if not _is_int(update.base_version) or update.base_version < 0:
        raise UpdateRejected("version", f"base_version must be a non-negative integer, got {update.base_version!r}")
    if update.base_version > current_version:
        raise UpdateRejected("future_version",
                             f"base_version {update.base_version} is ahead of the current version {current_version}")
    if not _is_int(update.num_samples) or update.num_samples <= 0:
        raise UpdateRejected("samples", f"num_samples must be a positive integer, got {update.num_samples!r}")
    if not isinstance(update.loss, (int, float, np.integer, np.floating)) or not math.isfinite(update.loss):
        raise UpdateRejected("non_finite", f"loss must be finite, got {update.loss!r}")
    shapes = expected_shapes(model, subset)
    keys = [t.key for t in update.tensors]
    if keys != list(shapes):
        missing, extra = [k for k in shapes if k not in keys], [k for k in keys if k not in shapes]
        raise UpdateRejected("keys", f"update tensors {keys} do not match the subset's {list(shapes)} "
                             f"(missing {missing}, unexpected {extra})")
    for t in update.tensors:
        R, F = shapes[t.key]
        if tuple(t.shape) != (R, F):
            raise UpdateRejected("shape", f"tensor {t.key!r} has shape {tuple(t.shape)}, the subset needs {(R, F)}")
        if t.bits not in (4, 8, 32) or (bits is not None and t.bits != bits):
            raise UpdateRejected("bits", f"tensor {t.key!r} is {t.bits}-bit, expected {bits if bits else '4, 8 or 32'}")
        want_dtype = {8: np.int8, 4: np.uint8, 32: np.float32}[t.bits]
        want_shape = (R, (F + 1) // 2) if t.bits == 4 else (R, F)
        if not isinstance(t.data, np.ndarray) or t.data.dtype != want_dtype or t.data.shape != want_shape:
            raise UpdateRejected("shape", f"tensor {t.key!r} data must be {np.dtype(want_dtype)} {want_shape}")
        if t.bits == 32:
            if t.scales is not None:
                raise UpdateRejected("shape", f"tensor {t.key!r} is float32 and must carry no scales")
            if not np.all(np.isfinite(t.data)):
                raise UpdateRejected("non_finite", f"tensor {t.key!r} holds NaN or Inf")
        else:
            s = t.scales
            if not isinstance(s, np.ndarray) or s.dtype != np.float32 or s.shape != (R,):
                raise UpdateRejected("shape", f"tensor {t.key!r} scales must be float32 ({R},)")
            if not np.all(np.isfinite(s)) or np.any(s < 0):
                raise UpdateRejected("non_finite", f"tensor {t.key!r} scales hold NaN, Inf or negative values")
            if t.bits == 8 and np.any(t.data == -128):
                raise UpdateRejected("shape", f"tensor {t.key!r} holds int8 level -128, outside [-127, 127]")


def decode_tensor(t: TensorDelta, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The float32 [R, F] delta (into ``out`` if given: C-contiguous float32 [R, F])."""
    R, F = t.shape
    if out is None:
        out = np.empty((R, F), np.float32)
    if t.bits == 32:
        np.copyto(out, t.data)
    else:
        (K.decode_int8 if t.bits == 8 else K.decode_int4)(np.ascontiguousarray(t.data), np.ascontiguousarray(t.scales), out)
    return out


def decode_update(update: Update) -> Dict[str, np.ndarray]:
    """{key: float32 [R, F] delta} (for statistics and tests; the merge never materialises this)."""
    return {t.key: decode_tensor(t) for t in update.tensors}


def decode_tensor64(t: TensorDelta, out: Optional[np.ndarray] = None, factor: float = 1.0) -> np.ndarray:
    """The float64 [R, F] delta (times ``factor``; into ``out`` if given): levels times scales
    multiplied in float64, so a huge row scale cannot overflow here (float32 would: 3.4e38 x 127
    is inf)."""
    R, F = t.shape
    if out is None:
        out = np.empty((R, F), np.float64)
    if t.bits == 32:
        np.multiply(t.data, factor, out=out, casting="unsafe") if factor != 1.0 else np.copyto(out, t.data)
        return out
    levels = t.data if t.bits == 8 else _int4_levels(t)
    np.multiply(levels, np.asarray(t.scales, dtype=np.float64)[:, None] * factor, out=out)
    return out


def _int4_levels(t: TensorDelta) -> np.ndarray:
    """The int4 levels as float32 [R, F] (exact; the unpacking lives in C++: unit scales give the levels)."""
    R, F = t.shape
    out = np.empty((R, F), np.float32)
    K.decode_int4(np.ascontiguousarray(t.data), np.ones(R, np.float32), out)
    return out


def _levels(t: TensorDelta) -> np.ndarray:
    """The integer levels of a quantised tensor as float64 [R, F] (exact: |level| <= 127)."""
    src = t.data if t.bits == 8 else _int4_levels(t)
    return np.asarray(src, dtype=np.float64).reshape(t.shape)


def measure_update(update: Update):
    """(L2 norm, largest |value|) of the decoded delta, both computed in float64.

    Cheap: for quantised rows ||row||^2 = scale^2 * sum(level^2), so nothing is materialised
    beyond the levels of one tensor. A non-finite result means the update cannot be decoded.
    """
    sq, peak = 0.0, 0.0
    for t in update.tensors:
        if t.bits == 32:
            d = np.asarray(t.data, dtype=np.float64)
            sq += float(np.einsum("ij,ij->", d, d))
            peak = max(peak, float(np.max(np.abs(d))) if d.size else 0.0)
            continue
        lv = _levels(t)
        s = np.asarray(t.scales, dtype=np.float64)
        sq += float(np.dot(s * s, np.einsum("ij,ij->i", lv, lv)))
        peak = max(peak, float(np.max(s * np.max(np.abs(lv), axis=1))) if lv.size else 0.0)
    return math.sqrt(sq) if math.isfinite(sq) else math.inf, peak
