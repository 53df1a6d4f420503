"""The fleet's messages: what travels inside the encrypted frames of ``protocol.Connection``.

Both programs speak it: the hub (``ftte_hub``) opens the TCP connection, the agent
(``ftte_agent``) serves it. Every message is one protocol frame ``type u8 | body``; bodies are
UTF-8 JSON objects, except MODEL (a ``modelfile`` blob), TASK (JSON header + float32 arrays or one
downlink frame, below) and UPDATE (``update.Update.to_bytes()``).

Conversation (hub = H, agent = A), after the handshake:

    A -> H  AGENT_INFO   {agent_id, name, protocol, memory_budget, speed, models: [hash...], pending, ...}
    A -> H  UPDATE       for each update kept from an earlier connection (state dir), oldest first
    H -> A  ACK          for each UPDATE: {task_id, accepted, reason, message, version}; then A deletes it
    H -> A  NOT_USED     {reason, needed_bytes, budget_bytes}: the chosen subset does not fit; A idles
       or   MODEL        the run's model (only if its hash is not in A's ``models``)
    H -> A  TASK         train the subset from these values; A persists the UPDATE before sending it
    A -> H  UPDATE / TASK_FAILED {task_id, run_id, message}
    H -> A  ACK, then the next TASK (or STOP {reason} when the run is over: A cancels its training)
    either  PING {t} -> PONG {t}: heartbeats, independent of how long a task takes
    either  ERROR {message}: a one-line reason, then the sender closes

Fields (JSON bodies; sizes in bytes):

    AGENT_INFO   agent_id str (stable across restarts: the hub's device id), name str, protocol int
                 (protocol.PROTOCOL_VERSION), memory_budget int, speed float (measured training
                 GFLOP/s), slowdown float, models [str] (cached model hashes), pending int,
                 num_samples int, arch str, software str; optional downlink {format: 1, and when it
                 holds canonical values: stream str, version int, checksum str; when it holds a
                 mirror (a direct step's result): stream str, checksum str, no version} (docs/protocol.md)
    NOT_USED     reason str, needed_bytes int, budget_bytes int
    MODEL        a modelfile blob; its hash is modelfile.content_hash(blob)
    TASK         see encode_task; ``model_hash`` names the MODEL it applies to, ``run_id`` the
                 hub's run (random, kept across a resume); task ids are unique across runs
    UPDATE       Update bytes with task_id, run_id (the TASK's) and device_id (= agent_id) set
    ACK          task_id str, run_id str (the UPDATE's), accepted bool, reason str ("" when
                 accepted; "other_run": the update belongs to another run and is dropped unmerged),
                 message str, version int
    TASK_FAILED  task_id str, run_id str, message str (a reason worded for a person); downlink "resync"
                 when the task's downlink frame did not apply (the agent now holds nothing: send a snapshot)
    STOP         reason str
    PING, PONG   t float (the sender's clock; PONG echoes PING's)
    ERROR        message str

A status query (`ftte-hub agents`: ``protocol.FLAG_QUERY`` in the client's HELLO) is not a
conversation: the agent sends one AGENT_INFO with the status fields hub (the connected hub's
"ip:port" or null), hub_since (its clock), training (tasks in progress), tasks_done,
tasks_failed and uptime (seconds) added, then closes.

The hub never sees data: UPDATE carries the encoded delta and summary numbers only.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import numpy as np

from . import downlink as DL
from .local import TaskConfig

AGENT_INFO = 1
MODEL = 2
TASK = 3
UPDATE = 4
ACK = 5
NOT_USED = 6
TASK_FAILED = 7
STOP = 8
PING = 9
PONG = 10
ERROR = 11

NAMES = {AGENT_INFO: "AGENT_INFO", MODEL: "MODEL", TASK: "TASK", UPDATE: "UPDATE", ACK: "ACK",
         NOT_USED: "NOT_USED", TASK_FAILED: "TASK_FAILED", STOP: "STOP", PING: "PING", PONG: "PONG",
         ERROR: "ERROR"}

MAX_JSON_BYTES = 1 << 20
SERVICE_TYPE = "_ftte._tcp.local."   # mDNS / DNS-SD service type the agents advertise
DEFAULT_AGENT_PORT = 7850

_PREFIX = struct.Struct("<I")         # TASK: JSON header length
MAX_TASK_TENSORS = 4096
MAX_TASK_ID_CHARS = 128
RUN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")   # also a directory name in the agent's state dir
MODEL_HASH_RE = re.compile(r"[0-9a-f]{64}")


class MessageError(ValueError):
    """A message body that does not parse or does not say what its type requires (one line)."""


def name(msg_type: int) -> str:
    return NAMES.get(msg_type, f"type {msg_type}")


def encode_json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def decode_json(body: bytes, msg_type: int, required: Mapping[str, type] = ()) -> Dict[str, Any]:
    """A JSON object body; ``required`` maps keys to the type each must have (int accepts no bool)."""
    if len(body) > MAX_JSON_BYTES:
        raise MessageError(f"{name(msg_type)}: {len(body)}-byte body is over the {MAX_JSON_BYTES}-byte limit")
    try:
        obj = json.loads(bytes(body).decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise MessageError(f"{name(msg_type)}: body is not JSON ({str(e).splitlines()[0]})") from None
    except RecursionError:  # nested deeper than the interpreter's stack: no message needs that
        raise MessageError(f"{name(msg_type)}: body is JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise MessageError(f"{name(msg_type)}: body must be a JSON object, got {type(obj).__name__}")
    for key, typ in dict(required).items():
        v = obj.get(key)
        ok = isinstance(v, typ) and not (typ in (int, float, (int, float)) and isinstance(v, bool))
        if not ok:
            raise MessageError(f"{name(msg_type)}: field {key!r} must be {getattr(typ, '__name__', typ)}, got {v!r:.60}")
    return obj


def _no_constant(c):
    raise ValueError(f"{c} is not allowed")


# -- TASK ------------------------------------------------------------------------------------------
@dataclass
class TaskMessage:
    task_id: str                         # unique across runs (the hub prefixes it with its run id)
    base_version: int
    model_hash: str                      # which model the task's subset belongs to (content hash)
    subset: Dict[str, Dict[str, Any]]    # Subset.to_dict()
    subset_fingerprint: str
    config: TaskConfig
    seed: int
    bits: int
    values: Dict[str, np.ndarray]        # key -> float32 [R, F], Subset.tensors order
    run_id: str = ""                     # the hub's run; required on the wire (RUN_ID_RE)
    downlink: Optional[DL.Frame] = None  # instead of values: a downlink frame (the agent resolves it)


def task_header(msg: TaskMessage, values_entry: list, downlink: bool) -> bytes:
    """The TASK's JSON header (``values_entry``: [[key, [R, F]], ...], empty with a downlink frame)."""
    head = {"task_id": msg.task_id, "run_id": msg.run_id, "base_version": int(msg.base_version), "model_hash": msg.model_hash,
            "subset": msg.subset, "subset_fingerprint": msg.subset_fingerprint, "config": msg.config.as_dict(),
            "seed": int(msg.seed), "bits": int(msg.bits), "values": values_entry}
    if downlink:
        head["downlink"] = True
    return encode_json(head)


def assemble_task(header: bytes, tail) -> bytes:
    """u32 LE header length | header | tail (float32 values, or one downlink frame)."""
    return b"".join([_PREFIX.pack(len(header)), header, tail])


def encode_task(msg: TaskMessage, downlink_blob: Optional[bytes] = None) -> bytes:
    """JSON header length u32 LE | header | float32 LE arrays in header order, or (``downlink_blob``,
    ``downlink.encode_frame`` bytes) the header with ``"downlink": true``, no values, and the frame."""
    if downlink_blob is not None:
        return assemble_task(task_header(msg, [], True), downlink_blob)
    values = {k: np.ascontiguousarray(v, dtype="<f4") for k, v in msg.values.items()}
    header = task_header(msg, [[k, [int(d) for d in v.shape]] for k, v in values.items()], False)
    return assemble_task(header, b"".join(v.tobytes() for v in values.values()))


def decode_task(body) -> TaskMessage:
    """Parse a TASK body; any defect raises MessageError with a one-line reason."""
    try:
        mv = memoryview(body).cast("B")
    except (TypeError, ValueError):
        raise MessageError(f"TASK: expected bytes, got {type(body).__name__}") from None
    n = mv.nbytes
    if n < _PREFIX.size:
        raise MessageError(f"TASK: {n}-byte body is shorter than its length prefix")
    (hlen,) = _PREFIX.unpack_from(mv, 0)
    if hlen > MAX_JSON_BYTES or _PREFIX.size + hlen > n:
        raise MessageError(f"TASK: header length {hlen} does not fit the {n}-byte body")
    head = decode_json(bytes(mv[_PREFIX.size:_PREFIX.size + hlen]), TASK, {
        "task_id": str, "run_id": str, "base_version": int, "model_hash": str, "subset": dict,
        "subset_fingerprint": str, "config": dict, "seed": int, "bits": int, "values": list})
    if not 0 < len(head["task_id"]) <= MAX_TASK_ID_CHARS:
        raise MessageError(f"TASK: task_id must be 1 to {MAX_TASK_ID_CHARS} characters, got {len(head['task_id'])}")
    if not RUN_ID_RE.fullmatch(head["run_id"]):
        raise MessageError(f"TASK: run_id must be 1 to 64 letters, digits, '-' or '_', got {head['run_id'][:80]!r}")
    if not MODEL_HASH_RE.fullmatch(head["model_hash"]):
        raise MessageError(f"TASK: model_hash must be 64 lowercase hex digits, got {head['model_hash'][:80]!r}")
    if not 0 <= head["base_version"] < 1 << 62 or not 0 <= head["seed"] < 1 << 64:
        raise MessageError("TASK: base_version and seed must be non-negative integers below 2^62 and 2^64")
    if head["bits"] not in (4, 8, 32):
        raise MessageError(f"TASK: bits must be 4, 8 or 32, got {head['bits']}")
    if len(head["values"]) > MAX_TASK_TENSORS:
        raise MessageError(f"TASK: {len(head['values'])} tensors is over the limit of {MAX_TASK_TENSORS}")
    try:
        config = TaskConfig.from_dict(head["config"])
    except ValueError as e:
        raise MessageError(f"TASK: {e}") from None
    offset = _PREFIX.size + hlen
    values: Dict[str, np.ndarray] = {}
    frame = None
    if "downlink" in head:
        if head["downlink"] is not True or head["values"]:
            raise MessageError("TASK: downlink must be true and values empty when present")
        try:
            frame = DL.decode_frame(mv[offset:], max_bytes=n)
        except DL.DownlinkError as e:
            raise MessageError(f"TASK: {e}") from None
        if frame.version != head["base_version"]:
            raise MessageError(f"TASK: the downlink frame is version {frame.version}, the task's base version "
                               f"{head['base_version']}")
        offset = n
    for entry in head["values"]:
        try:
            key, (rows, cols) = entry
        except (TypeError, ValueError, IndexError, KeyError, OverflowError):  # not [key, [rows, cols]]
            raise MessageError(f"TASK: bad value entry {entry!r:.80}") from None
        if not isinstance(key, str) or not all(isinstance(d, int) and not isinstance(d, bool) for d in (rows, cols)):
            raise MessageError(f"TASK: value entry {entry!r:.80} must be [name, [rows, columns]] with whole numbers")
        if rows < 0 or cols < 0 or key in values:
            raise MessageError(f"TASK: bad or repeated value entry {entry!r:.80}")
        size = 4 * rows * cols
        if offset + size > n:
            raise MessageError(f"TASK: value {key!r} [{rows}, {cols}] runs past the end of the {n}-byte body")
        arr = np.frombuffer(mv[offset:offset + size], dtype="<f4").astype(np.float32).reshape(rows, cols)
        if not np.all(np.isfinite(arr)):
            raise MessageError(f"TASK: value {key!r} holds NaN or Inf")
        values[key] = arr
        offset += size
    if offset != n:
        raise MessageError(f"TASK: {n - offset} bytes left over after the values")
    return TaskMessage(task_id=head["task_id"], run_id=head["run_id"], base_version=head["base_version"], model_hash=head["model_hash"],
                       subset=head["subset"], subset_fingerprint=head["subset_fingerprint"], config=config,
                       seed=head["seed"], bits=head["bits"], values=values, downlink=frame)
