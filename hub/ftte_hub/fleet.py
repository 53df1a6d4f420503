"""The hub's side of every agent connection: dial, authenticate, serve tasks, reconnect.

One dial loop per address (mDNS or --peer). A loop connects (the hub is the protocol "client"),
runs one session until the connection ends, and dials again with backoff (BACKOFF_MIN doubling
to BACKOFF_MAX). The session's device is the AGENT_INFO ``agent_id``. An agent serves one hub
connection at a time (a new authenticated one supersedes the old), so when a second address
answers with an agent id already in session, the new session replaces the old one, and the
address that lost is not dialled again while its agent is in session elsewhere.

Timeouts (see docs/hub.md): the hub sends PING every ``ping_interval`` s; a connection that
brings no message for ``dead_after`` s is dead; a task with no UPDATE after ``task_timeout`` s
is given up. Either way the session ends (the driver hears ``device_gone``) and the loop
re-dials; a late UPDATE for the given-up task is still accepted if it arrives (as stale work).
Anything bad from one peer ends that peer's session or rejects its update, with one log line;
every other session goes on. Nothing ends a dial loop silently: whatever a session raises (an
unexpected bug included) is one log line and a re-dial with backoff. What cannot be one peer's
fault ends the run instead (``RunFailure`` from the coordinator: the journal cannot be written,
the round driver failed): ``Fleet.fail`` hands the one-line reason to the run, which stops with a
non-zero exit rather than serving on with a state it can no longer make durable.

AGENT_INFO is bounded before anything uses it (``parse_agent_info``: body size, JSON nesting
depth, every number range-checked, see ``INFO_LIMITS``); mDNS may add at most
``MAX_MDNS_ADDRESSES`` addresses, so a neighbour advertising many services cannot exhaust the
hub's file descriptors (each dial holds one socket for at most the connect and handshake
timeouts).

Run scope: every TASK carries the run id (``run_id``, kept across a resume) and the driver's task
ids start with it; an UPDATE that belongs to another run (its ``run_id``, or for an update that
names no run, its task id) is dropped with one line and an ACK "other_run" before the driver
sees it (``foreign_run``).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import numpy as np

from ftte_core import downlink as DL
from ftte_core import messages as M
from ftte_core.channel import CLOSE_LINGER, Channel, ChannelClosed, ChannelError, HandshakeCutShort
from ftte_core.modelfile import model_from_bytes
from ftte_core.subset import Subset
from ftte_core.update import Update, UpdateError, subset_values

from .coordinator import Coordinator, RunFailure, log_rejection, make_durable
from .logs import event

BACKOFF_MIN = 0.5
BACKOFF_MAX = 10.0
HELLO_TIMEOUT = 10.0          # handshake, then AGENT_INFO
FAILED_TASK_BACKOFF_MAX = 30.0
MAX_RETIRED_MIRRORS = 1024    # mirrors of ended sessions kept for a reconnect (newest first; see Fleet.retire_mirror)
MAX_RETIRED_MIRROR_BYTES = 64 << 20  # ... and their values' bytes at most (a large model's subset is MBs each)
MAX_BIG_SENDS = 8             # TASK/MODEL frames being encrypted and written at once
MAX_MDNS_ADDRESSES = 256      # addresses mDNS may add (a flood of advertised services is ignored past it)
MAX_INFO_BYTES = 64 << 10     # an AGENT_INFO body
MAX_INFO_DEPTH = 8            # JSON nesting of an AGENT_INFO (the real one nests 2 deep)
# (low, high) for every number an AGENT_INFO may carry; anything outside refuses the agent
INFO_LIMITS = {
    "memory_budget": (0, 1 << 44),        # bytes (16 TiB)
    "speed": (0.0, 1e6),                  # GFLOP/s
    "slowdown": (0.0, 1e6),
    "pending": (0, 1 << 20),              # updates waiting on the agent
    "num_samples": (0, 1 << 40),
    "num_classes": (1, 1 << 20),
    "protocol": (0, 1 << 16),
}
MAX_INFO_MODELS = 1024
MAX_SHAPE_DIMS = 8
MAX_SHAPE_DIM = 1 << 24


@dataclass
class FleetSettings:
    ping_interval: float = 5.0
    dead_after: float = 30.0
    task_timeout: float = 600.0
    connect_timeout: float = 5.0


@dataclass
class Hooks:
    """Callbacks for benchmarks and tests (all optional; ``t`` is time.perf_counter())."""

    on_task_sent: Optional[Callable[[str, Any, float], None]] = None     # agent_id, Task, t
    on_update: Optional[Callable[[str, Any, float], None]] = None        # agent_id, Arrival, t (before ACK)
    on_merge: Optional[Callable[[Any, float], None]] = None              # MergeReport, t (right after the merge)
    on_metrics: Optional[Callable[[Dict[str, Any]], None]] = None        # the metrics.jsonl line
    on_ready: Optional[Callable[["Fleet"], None]] = None                 # setup done; fleet.add_address works
    on_status_url: Optional[Callable[[str], None]] = None                # the status page is served at this URL


class SessionEnd(Exception):
    """This session is over (one-line reason)."""


def one_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:300]


def json_depth(body: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in a JSON text (brackets inside strings do not count)."""
    depth = deepest = 0
    in_str = escaped = False
    for c in body:
        if in_str:
            if escaped:
                escaped = False
            elif c == 0x5C:      # backslash
                escaped = True
            elif c == 0x22:      # quote
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif c in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _number(info: Dict[str, Any], key: str, kind: type, required: bool = False):
    """``info[key]`` checked against INFO_LIMITS (ints must be ints; floats accept ints)."""
    if key not in info:
        if required:
            raise M.MessageError(f"AGENT_INFO: field {key!r} is missing")
        return None
    v = info[key]
    lo, hi = INFO_LIMITS[key]
    ok_type = (isinstance(v, int) if kind is int else isinstance(v, (int, float))) and not isinstance(v, bool)
    if not ok_type:
        raise M.MessageError(f"AGENT_INFO: field {key!r} must be {'an integer' if kind is int else 'a number'}, "
                             f"got {type(v).__name__}")
    if not (lo <= v <= hi):  # also refuses NaN; compares huge ints exactly, without overflow
        raise M.MessageError(f"AGENT_INFO: field {key!r} is outside {lo:g}..{hi:g}" if kind is float else
                             f"AGENT_INFO: field {key!r} is outside {lo}..{hi}")
    return kind(v)


def parse_agent_info(body: bytes) -> Dict[str, Any]:
    """The AGENT_INFO fields the hub uses, every one bounded; MessageError (one line) otherwise."""
    body = bytes(body)
    if len(body) > MAX_INFO_BYTES:
        raise M.MessageError(f"AGENT_INFO: {len(body)}-byte body is over the {MAX_INFO_BYTES}-byte limit")
    # json.loads recurses per nesting level: a deep body would raise RecursionError (or worse)
    if body.count(b"[") + body.count(b"{") > MAX_INFO_DEPTH and json_depth(body) > MAX_INFO_DEPTH:
        raise M.MessageError(f"AGENT_INFO: JSON nested deeper than {MAX_INFO_DEPTH} levels")
    try:
        info = M.decode_json(body, M.AGENT_INFO, {"agent_id": str})
    except RecursionError:  # belt and braces: the depth check above should make this unreachable
        raise M.MessageError("AGENT_INFO: JSON nested too deeply") from None
    aid = info["agent_id"]
    if not 0 < len(aid) <= 128 or not aid.isprintable():
        raise M.MessageError(f"AGENT_INFO: agent_id must be 1..128 printable characters, got {aid[:60]!r}")
    info["memory_budget"] = _number(info, "memory_budget", int, required=True)
    for key, kind in (("speed", float), ("slowdown", float), ("pending", int), ("num_samples", int),
                      ("num_classes", int), ("protocol", int)):
        v = _number(info, key, kind)
        if v is not None:
            info[key] = v
    models = info.get("models", [])
    if not isinstance(models, list) or len(models) > MAX_INFO_MODELS or \
            not all(isinstance(m, str) and len(m) <= 128 for m in models):
        raise M.MessageError(f"AGENT_INFO: models must be a list of at most {MAX_INFO_MODELS} model hashes")
    info["models"] = models
    dl = info.get("downlink")
    # the agent resolves downlink frames (format 1); what it holds, if anything (malformed: nothing)
    fmt = dl.get("format") if isinstance(dl, dict) else None
    info["downlink_format"] = 1 if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt == 1 else 0
    info["downlink_held"] = DL.parse_held(dl) if info["downlink_format"] else None
    # it resolves direct steps too (an agent from before them would refuse the frame kind)
    info["downlink_direct"] = bool(info["downlink_format"]) and dl.get("direct") is True
    # the newest model file version it reads (absent: 2, an agent from before int8 storage)
    fmt = info.get("model_format")
    info["model_format"] = fmt if isinstance(fmt, int) and not isinstance(fmt, bool) and 1 <= fmt <= 1000 else 2
    shape = info.get("input_shape")
    if shape is not None:
        if not (isinstance(shape, list) and 0 < len(shape) <= MAX_SHAPE_DIMS and
                all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_SHAPE_DIM for d in shape)):
            raise M.MessageError(f"AGENT_INFO: input_shape must be a list of 1..{MAX_SHAPE_DIMS} sizes in "
                                 f"1..{MAX_SHAPE_DIM}")
        info["input_shape"] = [int(d) for d in shape]
    name = info.get("name")
    info["name"] = name[:128] if isinstance(name, str) and name and name.isprintable() else aid
    return info


def budget_hint(nbytes: int) -> str:
    """``nbytes`` as an ``ftte-agent --memory-budget`` value, rounded up to whole KiB."""
    return f"{-(-int(nbytes) // 1024)}KiB"


class Fleet:
    def __init__(self, key: bytes, settings: FleetSettings, hooks: Optional[Hooks] = None):
        self.key = key
        self.settings = settings
        self.hooks = hooks or Hooks()
        self.ready = asyncio.Event()          # set once the driver, model and subset exist
        self.coordinator: Optional[Coordinator] = None
        self.needed_bytes = 0                 # predicted training memory of the run's subset
        self.needed_what = "this run's subset"   # (before the search: of the cheapest subset)
        self.model_blob = b""
        self.model_hash = ""
        # the same model as installed on agents that read int8 storage, by model file version
        # (3: the weights the tier does not train as the agent holds them anyway; 4: also the
        # trained rows int8, exactly, ``modelfile.install_bytes``), one per tier (ftte-tiered;
        # else one), as (bytes, hash). The float32 file for the others. The tier's subset has the
        # same (origin) values in all of them.
        self.installs: Dict[int, List[Tuple[bytes, str]]] = {}
        self.run_id = ""                      # this run's id ("" : no run scope, e.g. a bare test fleet)
        self.subset_dict: Dict[str, Any] = {}
        self.stopping = False
        self.stop_reason = ""
        self.infos: Dict[str, Dict[str, Any]] = {}      # every agent that introduced itself
        self.sessions: Dict[str, "Session"] = {}
        self.agent_joined = asyncio.Event()   # pulsed on every new AGENT_INFO (wait-for-agents)
        self._addresses: Dict[Tuple[str, int], asyncio.Task] = {}
        self._addr_agent: Dict[Tuple[str, int], str] = {}   # which agent answered at an address
        self._channels: Set[Channel] = set()
        self._closed_in = 0
        self._closed_out = 0
        self._task_values: Dict[str, Any] = {}   # subset fingerprint -> (values of one version, shapes, bytes)
        # the canonical streams, one per subset the run trains (ftte-tiered: one per tier; built at
        # a tier's first task), by subset fingerprint
        self.downlinks: Dict[str, DL.DownlinkStream] = {}
        self._subset_dicts: Dict[str, Dict[str, Any]] = {}   # subset fingerprint -> its TASK form
        self.downlink_enabled = True          # False: every task carries float32 values (as before)
        self.downlink_bits = 8                # the stream's steps: int8 or packed int4
        self.downlink_direct = True           # direct steps from each agent's mirror when smaller
        # what agents of ended sessions held (agent id -> Mirror), for their reconnect in this run
        self.retired_mirrors: "OrderedDict[str, DL.Mirror]" = OrderedDict()
        self._frames: Dict[Any, bytes] = {}   # encoded frames of a stream's latest version, by (stream, held version)
        self.big_sends = asyncio.Semaphore(MAX_BIG_SENDS)
        self.draining = False                 # stopping on a signal: no new tasks, in-flight updates still taken
        self.fatal = ""                       # why the run cannot go on (set once, by fail())
        self.on_fatal: Callable[[str], None] = lambda reason: None
        self.bytes_before: Tuple[int, int] = (0, 0)   # transport bytes of earlier processes (resume)
        self.model_input_shape: Optional[Tuple[int, ...]] = None
        self.model_classes: Optional[int] = None
        self.mdns_addresses: Set[Tuple[str, int]] = set()
        self.mdns_overflow = 0                # mDNS addresses ignored past MAX_MDNS_ADDRESSES
        self.dial_errors: Dict[Tuple[str, int], str] = {}   # the latest failure at each address
        self._not_usable_logged: Set[str] = set()
        self._refusals: Dict[Tuple[str, int], str] = {}     # the last refusal logged per address
        # for the status page: transport bytes of each agent's ended sessions (this process), and
        # when an agent that left was last heard from (wall-clock seconds)
        self.ended_bytes: Dict[str, Tuple[int, int]] = {}
        self.last_seen: Dict[str, float] = {}

    # -- addresses ---------------------------------------------------------------------------------
    def add_address(self, host: str, port: int, source: str) -> None:
        addr = (host, int(port))
        if self.stopping or addr in self._addresses:
            return
        if source == "mdns":
            if len(self.mdns_addresses) >= MAX_MDNS_ADDRESSES:
                if not self.mdns_overflow:
                    event("mdns_cap", f"mDNS announced more than {MAX_MDNS_ADDRESSES} agent addresses; ignoring "
                          f"the rest (a misconfigured or hostile neighbour?); name real agents with --peer",
                          logging.WARNING)
                self.mdns_overflow += 1
                return
            self.mdns_addresses.add(addr)
        event("address", f"agent address {host}:{port} ({source})", logging.DEBUG)
        task = asyncio.ensure_future(self._dial_loop(addr))
        self._addresses[addr] = task

    def remove_address(self, host: str, port: int) -> None:
        """An mDNS service went away: stop re-dialing it unless a session is running there."""
        addr = (host, int(port))
        if not any(s.addr == addr for s in self.sessions.values()):
            task = self._addresses.pop(addr, None)
            if task is not None:
                task.cancel()
            self.mdns_addresses.discard(addr)

    # -- counters ----------------------------------------------------------------------------------
    def bytes_totals(self) -> Tuple[int, int]:
        """(bytes received, bytes sent) on every connection so far, framing and encryption included."""
        return (self.bytes_before[0] + self._closed_in + sum(c.bytes_received for c in self._channels),
                self.bytes_before[1] + self._closed_out + sum(c.bytes_sent for c in self._channels))

    def active_agents(self) -> int:
        return sum(1 for s in self.sessions.values() if s.usable)

    def fail(self, reason: str) -> None:
        """The run cannot go on (a local failure, not one peer's): hand the one-line reason to the run."""
        if not self.fatal:
            self.fatal = reason
            self.on_fatal(reason)

    def why_not_used(self, info: Dict[str, Any]) -> Optional[str]:
        """Why this agent cannot take part in the run (one line saying what to change), or None."""
        shape = info.get("input_shape")
        if shape is not None and self.model_input_shape is not None and tuple(shape) != tuple(self.model_input_shape):
            return (f"its data has samples of shape {list(shape)}, the model takes {list(self.model_input_shape)}; "
                    f"give the agent data for this model (or train another model)")
        classes = info.get("num_classes")
        if classes is not None and self.model_classes is not None and classes > self.model_classes:
            return (f"its data has {classes} classes, the model has {self.model_classes} outputs; give the agent "
                    f"data with at most {self.model_classes} classes (or a model with {classes} outputs)")
        budget = int(info["memory_budget"])
        if budget < self.needed_bytes:
            from ftte_core.search import format_size
            return (f"its memory budget {format_size(budget)} is below the {format_size(self.needed_bytes)} "
                    f"{self.needed_what} needs; raise --memory-budget to at least {budget_hint(self.needed_bytes)}")
        return None

    def agent_addresses(self) -> Dict[str, Tuple[str, int]]:
        """Each agent's latest known address (the one it last answered at)."""
        return {aid: addr for addr, aid in self._addr_agent.items()}

    def retire_mirror(self, session: "Session") -> None:
        """Keep what an ended session's agent held, so that when it reconnects in this run naming
        the same values (stream and checksum) it gets direct steps again, not a snapshot. At most
        MAX_RETIRED_MIRRORS (the oldest go first); a mirror is a reference to arrays the hub holds
        anyway when it is a canonical version's values."""
        if session.mirror is None:
            return
        self.retired_mirrors[session.agent_id] = session.mirror
        self.retired_mirrors.move_to_end(session.agent_id)
        total = sum(_mirror_bytes(m) for m in self.retired_mirrors.values())
        while self.retired_mirrors and (len(self.retired_mirrors) > MAX_RETIRED_MIRRORS
                                        or total > MAX_RETIRED_MIRROR_BYTES):
            total -= _mirror_bytes(self.retired_mirrors.popitem(last=False)[1])

    def note_session_end(self, session: "Session") -> None:
        b_in, b_out = self.ended_bytes.get(session.agent_id, (0, 0))
        self.ended_bytes[session.agent_id] = (b_in + session.ch.bytes_received, b_out + session.ch.bytes_sent)
        self.last_seen[session.agent_id] = session.last_seen()

    def usable_sessions(self) -> list:
        """Agents in session that can take part (before the run starts: for --min-agents)."""
        out = []
        for aid, s in sorted(self.sessions.items()):
            why = self.why_not_used(s.info)
            if why is None:
                out.append(aid)
            elif aid not in self._not_usable_logged:
                self._not_usable_logged.add(aid)
                event("agent_not_counted", f"agent {s.name} ({aid}) does not count for --min-agents: {why}",
                      logging.WARNING)
        return out

    def in_flight(self) -> int:
        """Tasks sent and not yet answered (UPDATE or TASK_FAILED)."""
        return sum(1 for s in self.sessions.values() if s.task_id is not None)

    def wake(self, everyone: bool = False) -> None:
        """New work may exist (a merge, the run's end): sessions without a task look again."""
        for s in list(self.sessions.values()):
            if everyone or s.task_id is None:
                s.kick.set()

    async def stop(self, reason: str, grace: float = 5.0) -> None:
        """STOP to every agent in session, then end every dial loop."""
        self.stopping = True
        self.stop_reason = reason
        self.ready.set()
        self.wake(everyone=True)
        sessions = [s.done for s in self.sessions.values()]
        if sessions:
            await asyncio.wait(sessions, timeout=grace)
        late = [s.name for s in self.sessions.values() if not s.done.done()]
        if late:
            event("stop_slow", f"no clean end within {grace:g} s for {', '.join(late)}", logging.DEBUG)
        tasks = list(self._addresses.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace)

    def _subset_dict(self, task) -> Dict[str, Any]:
        """The task's subset as TASK carries it (ftte-tiered: the tier the driver chose for the
        agent's budget; otherwise the run's one subset), built once per subset."""
        fp = task.subset_fingerprint
        d = self._subset_dicts.get(fp)
        if d is None:
            d = self._subset_dicts[fp] = task.subset.to_dict() if task.subset is not None else self.subset_dict
        return d

    def model_for(self, info: Dict[str, Any]) -> Tuple[bytes, str]:
        """(MODEL bytes, their hash) for an agent: its tier's install of the newest model file
        version it reads (3 or 4), else the float32 file."""
        readable = [v for v in self.installs if v <= info.get("model_format", 2)]
        if not readable:
            return self.model_blob, self.model_hash
        installs = self.installs[max(readable)]
        strategy = self.coordinator.driver.strategy if self.coordinator is not None else None
        tier = strategy.tier_for_budget(int(info["memory_budget"])) if strategy is not None and strategy.tiers else 0
        return installs[tier] if tier is not None and tier < len(installs) else (self.model_blob, self.model_hash)

    def _message(self, task, model_hash: Optional[str] = None) -> M.TaskMessage:
        return M.TaskMessage(task_id=task.id, run_id=self.run_id, base_version=int(task.base_version),
                             model_hash=model_hash or self.model_hash, subset=self._subset_dict(task),
                             subset_fingerprint=task.subset_fingerprint, config=task.config, seed=int(task.seed),
                             bits=int(task.bits), values={})

    @property
    def downlink(self) -> Optional[DL.DownlinkStream]:
        """The canonical stream of a run with one subset, once built (ftte-tiered: the first tier's
        stream built; ``downlinks`` holds every tier's)."""
        return next(iter(self.downlinks.values()), None)

    def downlink_stream(self, task=None) -> DL.DownlinkStream:
        """The canonical stream of ``task``'s subset (None: the run's subset), from that subset's
        values in the run's model file (what agents hold). Each stream has its own id, so an agent
        that holds another tier's values is sent a snapshot, never a delta it cannot apply."""
        fp = task.subset_fingerprint if task is not None else ""
        stream = self.downlinks.get(fp)
        if stream is None:
            model = model_from_bytes(self.model_blob)
            subset = Subset.from_dict(model, self._subset_dict(task) if task is not None else self.subset_dict)
            stream = self.downlinks[fp] = DL.DownlinkStream(subset_values(model, subset), secrets.token_hex(8),
                                                            bits=self.downlink_bits)
        return stream

    def stream_for_budget(self, budget: int) -> Optional[DL.DownlinkStream]:
        """The stream an agent with this budget is served from (its tier's), if built yet."""
        driver = self.coordinator.driver if self.coordinator is not None else None
        if driver is None:
            return self.downlink
        strategy = driver.strategy
        tier = strategy.tier_for_budget(budget) if strategy.tiers else 0
        if tier is None:
            return None
        return self.downlinks.get(driver.tiers[tier].fingerprint())

    def task_body(self, task, model_hash: Optional[str] = None) -> bytes:
        """TASK bytes carrying ``task``'s float32 values (an agent without downlink support), the
        values' bytes built once per version (every task of a version carries the same values;
        only the JSON header differs)."""
        cached = self._task_values.get(task.subset_fingerprint)
        if cached is None or cached[0] is not task.values:
            arrays = {k: np.ascontiguousarray(v, dtype="<f4") for k, v in task.values.items()}
            shapes = [[k, [int(d) for d in v.shape]] for k, v in arrays.items()]
            cached = self._task_values[task.subset_fingerprint] = (
                task.values, shapes, b"".join(v.tobytes() for v in arrays.values()))
        return M.assemble_task(M.task_header(self._message(task, model_hash), cached[1], False), cached[2])

    def downlink_task_body(self, task, held: Optional[int], mirror: Optional[DL.Mirror] = None,
                           direct: bool = True, model_hash: Optional[str] = None) -> Tuple[bytes, DL.Sent]:
        """(TASK bytes for ``task`` carrying a downlink frame, what the agent holds after it).

        ``held``: the canonical version the agent holds (``downlink.ORIGIN``: the model file's
        values; None: none the hub knows); ``mirror``: the exact values the hub knows it holds, if
        any; ``direct``: it resolves direct steps. The frame is the smallest that brings it to the
        task's version (``DownlinkStream.frame_for_device``, the simulator's choice too): a chain of
        int8 steps, a direct step from its values (``direct`` and ``downlink_direct``), or a
        snapshot. Publishing happens here, so call it right after the task is issued (before any
        await: the stream only moves forward). Canonical frames are built once per (held,
        version); direct steps per task.
        """
        stream = self.downlink_stream(task)
        if stream.version != task.base_version:
            stream.publish(task.base_version, task.values)
            for k in [k for k in self._frames if k[0] == stream.stream_id]:
                del self._frames[k]
        sent = stream.frame_for_device(held, mirror, direct and self.downlink_direct)
        if sent.frame.kind == "direct":
            blob = DL.encode_frame(sent.frame)
        else:
            blob = self._frames.get((stream.stream_id, held))
            if blob is None:
                blob = self._frames[(stream.stream_id, held)] = DL.encode_frame(sent.frame)
        return M.assemble_task(M.task_header(self._message(task, model_hash), [], True), blob), sent

    def foreign_run(self, update: Update) -> str:
        """Why ``update`` is not of this run ("" when it is): its run id differs, or it names no run
        and its task id is not one of this run's (the driver prefixes them with the run id)."""
        if not self.run_id:
            return ""
        if update.run_id:
            return "" if update.run_id == self.run_id else f"it was trained for run {update.run_id[:64]}"
        prefix = self.coordinator.driver.task_prefix if self.coordinator is not None else ""
        if prefix and update.task_id.startswith(prefix):
            return ""
        return "it names no run and its task id is not one of this run's"

    # -- dialling ----------------------------------------------------------------------------------
    async def _dial_loop(self, addr: Tuple[str, int]) -> None:
        host, port = addr
        delay = BACKOFF_MIN
        last_error = None
        while not self.stopping:
            if self.coordinator is not None and self.coordinator.driver.done:
                return  # the run is over; fleet.stop() follows
            other = self.sessions.get(self._addr_agent.get(addr, ""))
            if other is not None and other.addr != addr:
                # the same agent is in session at another address: dialling here would supersede it
                await asyncio.wait([other.done], timeout=BACKOFF_MAX)
                continue
            ch = None
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                        self.settings.connect_timeout)
                ch = await Channel.open(reader, writer, "client", self.key, timeout=HELLO_TIMEOUT)
            except Exception as e:  # refused, unreachable, wrong key, out of fds...: retry, never end the loop
                msg = "connect timed out" if isinstance(e, asyncio.TimeoutError) else one_line(e)
                if isinstance(e, HandshakeCutShort):  # the agent hung up mid-handshake: busy, not a key problem
                    msg = "the agent cut the handshake short (busy with other connections, or restarting)"
                elif not isinstance(e, (OSError, asyncio.TimeoutError, ChannelError)):
                    msg = f"{type(e).__name__}: {msg}"
                self.dial_errors[addr] = msg
                if msg != last_error:  # one line per new kind of failure, not one per retry
                    event("connect_failed", f"cannot use agent at {host}:{port}: {msg} (retrying)", logging.WARNING)
                    last_error = msg
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            last_error = None
            self.dial_errors.pop(addr, None)
            self._channels.add(ch)
            try:
                outcome = await self._serve(ch, addr)
            except RunFailure as e:
                self.fail(str(e))
                return
            except Exception as e:  # a bug in a session must cost that connection, never the dial loop
                event("session_failed", f"agent at {host}:{port}: session failed ({type(e).__name__}: "
                      f"{one_line(e)}); reconnecting", logging.WARNING)
                outcome = "bad"
            finally:
                self._channels.discard(ch)
                self._closed_in += ch.bytes_received
                self._closed_out += ch.bytes_sent
            if self.stopping or outcome == "stopped":
                return
            delay = BACKOFF_MIN if outcome in ("served", "superseded") else min(delay * 2, BACKOFF_MAX)
            await asyncio.sleep(delay)

    async def _serve(self, ch: Channel, addr: Tuple[str, int]) -> str:
        host, port = addr
        try:
            try:
                msg_type, body = await ch.recv(timeout=HELLO_TIMEOUT)
                if msg_type != M.AGENT_INFO:
                    raise M.MessageError(f"expected AGENT_INFO first, got {M.name(msg_type)}")
                info = parse_agent_info(body)
            except M.MessageError as e:
                self._refused(addr, f"agent at {host}:{port} refused: {e}")
                await _send_error(ch, str(e))
                return "bad"
            except ChannelError as e:
                self._refused(addr, f"agent at {host}:{port}: {one_line(e)}")
                return "bad"
            except Exception as e:  # parse_agent_info bounds everything; this is a last line of defence
                self._refused(addr, f"agent at {host}:{port} refused: unreadable AGENT_INFO "
                              f"({type(e).__name__}: {one_line(e)})")
                await _send_error(ch, "unreadable AGENT_INFO")
                return "bad"
            self._refusals.pop(addr, None)
            aid = info["agent_id"]
            self._addr_agent[addr] = aid
            old = self.sessions.get(aid)
            if old is not None:
                # the agent has already dropped the old connection for this one
                event("same_agent", f"{host}:{port} is agent {info['name']} ({aid}) again, in session at "
                      f"{old.addr[0]}:{old.addr[1]}; the new connection replaces the old one")
                old.supersede()
                await asyncio.wait([old.done], timeout=HELLO_TIMEOUT)
            session = Session(self, ch, aid, info, addr)
            self.sessions[aid] = session
            self.infos[aid] = info
            self.agent_joined.set()
            self.agent_joined = asyncio.Event()
            speed = info.get("speed")
            speed = f"{speed:.2f} GFLOP/s" if speed is not None else "speed unknown"
            event("agent_joined", f"agent {info['name']} ({aid}) at {host}:{port}: budget "
                  f"{info['memory_budget'] / 2**20:.1f} MiB, {speed}, {info.get('pending', 0)} pending update(s)")
            try:
                await session.run()
                return "stopped" if self.stopping else "served"
            except RunFailure:
                raise
            except Exception as e:
                if not session.superseded:
                    return self._session_ended(session, e)
                event("agent_superseded", f"agent {info['name']} ({aid}): the connection via {host}:{port} "
                      f"was replaced", logging.DEBUG)
                return "superseded"
            finally:
                current = self.sessions.get(aid) is session
                if current:
                    del self.sessions[aid]
                self.note_session_end(session)
                self.retire_mirror(session)
                if not session.done.done():
                    session.done.set_result(None)
                if current and session.joined and self.coordinator is not None and not self.stopping and not self.fatal:
                    self.coordinator.gone(aid)
                    self.wake()  # FedAvg: a round may have ended without it
        finally:
            await ch.close()


    def _refused(self, addr: Tuple[str, int], message: str) -> None:
        """One warning per address and reason; the re-dials that meet the same refusal are debug lines."""
        repeat = self._refusals.get(addr) == message
        self._refusals[addr] = message
        self.dial_errors[addr] = message
        event("agent_refused", message + (" (again)" if repeat else ""), logging.DEBUG if repeat else logging.WARNING)

    @staticmethod
    def _session_ended(session: "Session", e: Exception) -> str:
        who = f"agent {session.name} ({session.agent_id})"
        if isinstance(e, ChannelClosed):
            event("agent_left", f"{who} disconnected" + ("" if e.clean else " (connection cut)"), logging.WARNING)
            return "served"
        if isinstance(e, (SessionEnd, ChannelError)):
            event("agent_left", f"{who}: {e if isinstance(e, SessionEnd) else one_line(e)}", logging.WARNING)
        else:  # not the peer's doing: say what broke, so it can be reported
            event("agent_left", f"{who}: session failed ({type(e).__name__}: {one_line(e)}); reconnecting",
                  logging.WARNING)
        return "served" if session.served else "bad"


def _mirror_bytes(mirror: DL.Mirror) -> int:
    return sum(int(v.nbytes) for v in mirror.values.values())


async def _send_error(ch: Channel, message: str) -> None:
    try:
        await ch.send(M.ERROR, M.encode_json({"message": message[:500]}))
    except Exception:  # the connection is being dropped anyway
        pass


class Session:
    """One connected agent: its reader, its task loop and its heartbeat."""

    def __init__(self, fleet: Fleet, ch: Channel, agent_id: str, info: Dict[str, Any], addr: Tuple[str, int]):
        self.fleet, self.ch, self.agent_id, self.info, self.addr = fleet, ch, agent_id, info, addr
        self.name = info["name"]
        self.kick = asyncio.Event()
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.task_id: Optional[str] = None
        self.task_sent_at = 0.0
        self.usable = False
        self.joined = False            # the driver knows this device (device_joined was called)
        self.served = False            # at least one update or task went through
        self.not_before = 0.0          # after failed tasks: wait before the next one
        self.failures = 0
        self.last_rx = time.monotonic()
        self.superseded = False
        self.no_update_in_flight = asyncio.Event()  # clear while an UPDATE waits for its fsync and ACK
        self.no_update_in_flight.set()
        self.downlink = bool(info.get("downlink_format"))   # the agent resolves downlink frames
        self.direct = bool(info.get("downlink_direct"))     # ... and direct steps
        self.held: Optional[int] = DL.ORIGIN   # the canonical version the agent holds (None: none the hub knows)
        self.mirror: Optional[DL.Mirror] = None  # the exact values it holds, when the hub knows them
        self.sent_on_held = False              # its current task's frame builds on what it held (not a snapshot)
        self.stop_sent = False                 # STOP went out: the close frame follows, nothing else
        self.model_hash = ""                   # the model file this agent was given (Fleet.model_for)
        self.reader_task: Optional[asyncio.Future] = None

    def last_seen(self) -> float:
        """When the agent last sent anything (wall-clock seconds)."""
        return time.time() - (time.monotonic() - self.last_rx)

    def supersede(self) -> None:
        """The agent took a newer connection from this hub: end this session quietly."""
        self.superseded = True
        self.ch.abort()

    async def run(self) -> None:
        worker = asyncio.ensure_future(self._worker())
        self.reader_task = asyncio.ensure_future(self._reader())
        tasks = [self.reader_task, worker, asyncio.ensure_future(self._heartbeat())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if self.stop_sent and worker not in done:
                # the reader met the agent's EOF after STOP: let the worker finish its close
                # (bounded: close() waits at most CLOSE_LINGER for the reader, which has ended)
                await asyncio.wait([worker], timeout=CLOSE_LINGER + 5.0)
                done = {t for t in tasks if t.done()}
            if worker in done and not worker.cancelled() and worker.exception() is None:
                return  # STOP was sent: whatever the reader or heartbeat hit after that is no news
            for t in done:
                t.result()  # re-raise the reason this session ended
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- receiving ---------------------------------------------------------------------------------
    async def _reader(self) -> None:
        fleet = self.fleet
        while True:
            msg_type, body = await self.ch.recv(timeout=fleet.settings.dead_after)
            self.last_rx = time.monotonic()
            if msg_type == M.PING:
                if not self.stop_sent:
                    await self.ch.send(M.PONG, body)
            elif msg_type == M.PONG:
                pass
            elif msg_type == M.UPDATE:
                await fleet.ready.wait()
                if fleet.stopping:
                    # not acknowledged, so the agent keeps it for the next run; read on until the
                    # agent's EOF, since closing with its bytes unread would reset the connection
                    continue
                self.no_update_in_flight.clear()
                try:
                    await self._on_update(body)
                finally:
                    self.no_update_in_flight.set()
            elif msg_type == M.TASK_FAILED:
                self._on_task_failed(body)
            elif msg_type == M.ERROR:
                try:
                    msg = M.decode_json(body, M.ERROR, {"message": str})["message"]
                except M.MessageError:
                    msg = "(unreadable ERROR)"
                raise SessionEnd(f"agent reported an error: {msg[:300]}")
            else:
                await _send_error(self.ch, f"unexpected {M.name(msg_type)} from an agent")
                raise SessionEnd(f"sent an unexpected {M.name(msg_type)}; dropped")

    async def _on_update(self, body: bytes) -> None:
        fleet = self.fleet
        coord = fleet.coordinator
        raw = bytes(body)
        try:
            update = Update.from_bytes(raw)
        except UpdateError as e:
            event("update_rejected", f"update from {self.name} ({self.agent_id}) rejected (malformed): {e}",
                  logging.WARNING)
            await make_durable(coord.journal, coord.malformed_from(self.agent_id, str(e), len(raw)))
            current, self.task_id = self.task_id, None
            await self.ch.send(M.ACK, M.encode_json({"task_id": current or "", "accepted": False,
                                                      "reason": "malformed", "message": str(e)[:300],
                                                      "version": coord.driver.version}))
            self.kick.set()
            return
        foreign = fleet.foreign_run(update)
        if foreign:  # never reaches the driver: an old run's update can share nothing with this one
            event("update_other_run", f"update {update.task_id[:80] or '?'} from {self.name} ({self.agent_id}) "
                  f"dropped: {foreign}; this run is {fleet.run_id}", logging.WARNING)
            await self.ch.send(M.ACK, M.encode_json({
                "task_id": update.task_id, "run_id": update.run_id, "accepted": False, "reason": "other_run",
                "message": f"{foreign}; this hub runs {fleet.run_id}", "version": coord.driver.version}))
            return
        arrival, journal, seq = coord.update_from(self.agent_id, update, raw, len(raw))
        if fleet.hooks.on_update:
            fleet.hooks.on_update(self.agent_id, arrival, time.perf_counter())
        if not arrival.accepted:
            log_rejection(f"{self.name} ({self.agent_id})", arrival)
        await make_durable(journal, seq)  # the ACK promises the update survives a crash
        self.served = True
        await self.ch.send(M.ACK, M.encode_json({"task_id": arrival.task_id or update.task_id, "run_id": update.run_id,
                                                  "accepted": arrival.accepted,
                                                  "reason": arrival.reason, "message": arrival.message[:300],
                                                  "version": coord.driver.version}))
        if self.task_id is not None and update.task_id in (self.task_id, ""):
            self.task_id = None
            self.failures = 0
            self.kick.set()

    def _on_task_failed(self, body: bytes) -> None:
        try:
            msg = M.decode_json(body, M.TASK_FAILED, {"task_id": str, "message": str})
        except M.MessageError as e:
            raise SessionEnd(str(e)) from None
        event("task_failed", f"agent {self.name} ({self.agent_id}) failed task {msg['task_id']}: "
              f"{msg['message'][:300]}", logging.WARNING)
        if self.fleet.coordinator is not None:
            self.fleet.coordinator.stats_for(self.agent_id)["failed"] += 1
        resync = msg.get("downlink") == "resync"
        if resync:  # its values did not check: the next task brings a snapshot
            self.held, self.mirror = None, None
        if msg["task_id"] == self.task_id:
            self.task_id = None
            # a delta that did not resolve is retried at once with a snapshot; a failed snapshot (or
            # anything else) backs off, so an agent that always fails cannot make the hub spin
            if not (resync and self.sent_on_held):
                self.failures += 1
                self.not_before = time.monotonic() + min(FAILED_TASK_BACKOFF_MAX, 0.5 * 2 ** self.failures)
            self.kick.set()

    # -- sending -----------------------------------------------------------------------------------
    async def _worker(self) -> None:
        fleet = self.fleet
        await fleet.ready.wait()
        if fleet.stopping:
            await self._stop()
            return
        coord = fleet.coordinator
        st = coord.stats_for(self.agent_id)
        st["name"] = self.name
        budget = int(self.info["memory_budget"])
        why = fleet.why_not_used(self.info)
        if why is not None:
            event("agent_not_used", f"agent {self.name} ({self.agent_id}) not used: {why}", logging.WARNING)
            await self.ch.send(M.NOT_USED, M.encode_json({
                "reason": why, "needed_bytes": int(fleet.needed_bytes), "budget_bytes": budget}))
            st["not_used"] = True
            st["not_used_reason"] = why
            while not fleet.stopping:
                await self.kick.wait()
                self.kick.clear()
            await self._stop()
            return
        coord.joined(self.agent_id, self.info)
        self.joined = True
        self.usable = True
        self.held, self.mirror = self._held_on_arrival()
        model_blob, self.model_hash = fleet.model_for(self.info)
        if self.model_hash not in self.info["models"]:
            async with fleet.big_sends:
                await self.ch.send(M.MODEL, model_blob)
        while True:
            if fleet.stopping or coord.driver.done:
                await self._stop()
                return
            wait = self.not_before - time.monotonic()
            if self.task_id is None and wait <= 0 and not fleet.draining:
                task = coord.task_for(self.agent_id)
                if task is not None:
                    self.task_id, self.task_sent_at = task.id, time.monotonic()
                    if self.downlink and fleet.downlink_enabled:  # built before any await: the stream only moves on
                        body, sent = fleet.downlink_task_body(task, self.held, self.mirror, self.direct,
                                                              model_hash=self.model_hash)
                        self.held, self.mirror = sent.version, sent.mirror
                        self.sent_on_held = sent.frame.kind != "snapshot"
                    else:
                        body = fleet.task_body(task, self.model_hash)
                    async with fleet.big_sends:  # bounds the TASK bytes in flight (a burst of 200 is 80 MB)
                        await self.ch.send(M.TASK, body)
                    self.served = True
                    if fleet.hooks.on_task_sent:
                        fleet.hooks.on_task_sent(self.agent_id, task, time.perf_counter())
            try:
                await asyncio.wait_for(self.kick.wait(), timeout=max(wait, 0.05) if wait > 0 else None)
            except asyncio.TimeoutError:
                pass
            self.kick.clear()

    def _held_on_arrival(self) -> Tuple[Optional[int], Optional[DL.Mirror]]:
        """What the agent holds as it joins: (its canonical version, its values) as far as this hub
        knows them. The version it names in AGENT_INFO if that is in this hub's stream (same
        stream, same checksum); its values if they are what it held when its last session in this
        run ended (``Fleet.retire_mirror``: same stream, same checksum; also what a mirror, which
        names no version, needs). Else the model file's values (ORIGIN): the hub knows nothing
        else of what it holds, so no frame builds on it."""
        named = self.info.get("downlink_held")
        retired = self.fleet.retired_mirrors.pop(self.agent_id, None)
        stream = self.fleet.stream_for_budget(int(self.info["memory_budget"]))
        if named is None or stream is None or named[0] != stream.stream_id:
            return DL.ORIGIN, None
        mirror = retired if retired is not None and (retired.stream, retired.checksum) == (named[0], named[2]) else None
        if named[1] is not None and stream.checksum_of(named[1]) == named[2]:
            return named[1], mirror
        if mirror is not None:
            return None, mirror
        return DL.ORIGIN, None

    async def _stop(self) -> None:
        # An update being made durable gets its ACK before STOP; otherwise the agent would keep an
        # update the hub already counts and offer it to the next run.
        try:
            await asyncio.wait_for(self.no_update_in_flight.wait(), timeout=5.0)
        except asyncio.TimeoutError:
            pass
        reason = self.fleet.stop_reason or "the run is over"
        self.stop_sent = True  # nothing else is sent now (PING, PONG): the close frame is next
        await self.ch.send(M.STOP, M.encode_json({"reason": reason}))
        # the reader task reads on to the agent's EOF meanwhile (an UPDATE still on its way is not
        # left unread, which would make the kernel reset the connection under the STOP)
        await self.ch.close(reader=self.reader_task)

    async def _heartbeat(self) -> None:
        s = self.fleet.settings
        while True:
            await asyncio.sleep(min(s.ping_interval, 1.0, s.task_timeout / 2) if self.task_id else s.ping_interval)
            now = time.monotonic()
            if self.task_id is not None and now - self.task_sent_at > s.task_timeout:
                raise SessionEnd(f"no UPDATE for task {self.task_id} after {s.task_timeout:g} s "
                                 f"(--task-timeout); giving it up and reconnecting")
            if now - self.last_rx >= s.ping_interval * 0.9 and not self.stop_sent:
                await self.ch.send(M.PING, M.encode_json({"t": time.time()}))
