"""Serving hub connections: handshake, the conversation of ``ftte_core.messages``, and training.

One ``Agent`` per process. Each accepted TCP connection runs the handshake (``Channel``, role
"server"): the peer's HELLO within ``hello_timeout``, the whole handshake within
``handshake_timeout``. Pending handshakes are bounded per source address and in all; a new
connection evicts an older pending one rather than being refused (``admission``: a keyless
neighbour cannot keep the hub out). A peer that fails (wrong key, garbage, a stale protocol
version, silence, eviction) is dropped and logged, one line each while rare and one summary
line per 10 s under a flood; the agent keeps serving. An authenticated connection becomes the
*current* hub session and supersedes the previous one, so a restarted hub is never locked out by
a half-dead old connection.

A status query (``ftte-hub agents``: the client's HELLO carries ``protocol.FLAG_QUERY``) is
authenticated the same way but never becomes a session: the agent sends one AGENT_INFO with its
status (``Agent.status``: the connected hub, tasks training) and closes, within
``QUERY_SEND_TIMEOUT`` seconds. The hub session and any training are untouched, and at most
``MAX_QUERIES`` queries are answered at once (more are closed straight after their handshake).

Training belongs to the agent, not to a connection: a task keeps running when its connection
drops, its UPDATE is written to ``pending/<run>/`` before it is sent and deleted only when an ACK
names it (run id and task id), and every new session sends what is pending (oldest first) right
after AGENT_INFO. One task trains at a time, in a worker thread, so heartbeats keep flowing while
it runs.

The agent protects itself (``guard.py``): a task whose predicted training memory exceeds the
budget is refused before anything is allocated; training stops at ``--max-task-steps`` steps or
``--max-task-seconds`` seconds and delivers what it has; STOP (or a TASK of another hub run)
cancels training between two steps and discards the partial result; every TASK_FAILED reason is
a sentence for a person.

Timeouts (seconds, all options of ``ftte-agent``): HELLO 2, handshake 10; silence 60 (a hub connection that
sent nothing, not even a PING or PONG, for that long is dropped); the agent PINGs the hub every 20
so a live hub always has something to answer.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Set, Tuple

import numpy as np

from ftte_core import downlink as DL
from ftte_core import messages as M
from ftte_core.channel import Channel, ChannelClosed, ChannelError
from ftte_core.data import Dataset
from ftte_core.local import LocalWorker, StepLimits, TaskCancelled, TaskError, TaskResult
from ftte_core.modelfile import DEFAULT_MAX_BYTES as DEFAULT_MAX_MODEL_BYTES
from ftte_core.modelfile import READABLE_VERSIONS, ModelFileError, ModelTooLarge, content_hash, model_from_bytes
from ftte_core.protocol import DEFAULT_MAX_FRAME, FLAG_QUERY, PROTOCOL_VERSION
from ftte_core.subset import Subset
from ftte_core.update import Update, UpdateError, subset_values

from . import __version__
from .admission import Admission, RefusalLog, refusal_kind, source_of
from .device import peak_rss
from .guard import INT8_SHRINK, MEMORY_MARGIN, check_memory, failure_reason, weights_over_budget
from .state import StateDir

log = logging.getLogger("ftte_agent")

MAX_TASKS = 4                # tasks training or waiting; a hub sends one at a time, so more means a confused hub
MAX_QUERIES = 8              # status queries answered at once (each lasts one small frame)
QUERY_SEND_TIMEOUT = 5.0     # seconds to hand a status answer to a query client that does not read


@dataclass
class AgentSettings:
    key: bytes
    data: Dataset
    name: str
    state: StateDir
    memory_budget: int
    speed: float                       # GFLOP/s as advertised (already divided by slowdown)
    slowdown: float = 1.0
    arch: str = ""
    handshake_timeout: float = 10.0
    hello_timeout: float = 2.0
    silence_timeout: float = 60.0
    ping_interval: float = 20.0
    max_frame: int = DEFAULT_MAX_FRAME
    max_task_steps: Optional[int] = 100_000      # a task asking for more trains this many (None: no cap)
    max_task_seconds: Optional[float] = 600.0    # training stops after the step in progress (None: no cap)


class TaskFailure(Exception):
    """A task that cannot be trained (one-line reason for TASK_FAILED).

    ``resync``: the hub's picture of this agent is wrong (a cached model turned out corrupt), so
    the connection is closed after TASK_FAILED; the hub reconnects and reads a fresh AGENT_INFO.
    """

    def __init__(self, message: str, resync: bool = False):
        super().__init__(message)
        self.resync = resync


class _EndSession(Exception):
    pass


async def run_in_daemon_thread(fn, *args):
    """``asyncio.to_thread`` on a daemon thread: a long training step never holds up exit on SIGTERM."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(setter, value):
        if not fut.done():
            setter(value)

    def target():
        try:
            result = fn(*args)
        except BaseException as e:  # handed to the awaiting coroutine
            outcome = (fut.set_exception, e)
        else:
            outcome = (fut.set_result, result)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass  # the loop has closed: the agent is exiting

    threading.Thread(target=target, name="ftte-train", daemon=True).start()
    return await fut


def peek_task_id(body: bytes) -> Tuple[Optional[str], str]:
    """(task id, run id) of a TASK body that does not fully parse, so the failure can name the task."""
    try:
        (hlen,) = struct.unpack_from("<I", body, 0)
        if hlen > M.MAX_JSON_BYTES:
            return None, ""
        head = json.loads(bytes(body[4:4 + hlen]).decode("utf-8"))
        if not isinstance(head, dict):
            return None, ""
        tid, rid = head.get("task_id"), head.get("run_id")
        return (tid[:M.MAX_TASK_ID_CHARS] if isinstance(tid, str) and tid else None,
                rid if isinstance(rid, str) and M.RUN_ID_RE.fullmatch(rid) else "")
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError):
        return None, ""


class Agent:
    def __init__(self, settings: AgentSettings):
        self.s = settings
        self.state = settings.state
        self.session: Optional["Session"] = None
        self.admission = Admission()
        self.refusals = RefusalLog(log)
        self._train_lock = asyncio.Lock()
        self._worker: Optional[LocalWorker] = None
        self._worker_key: Optional[Tuple[str, str]] = None
        self._training: Set[asyncio.Task] = set()
        self._cancel: Dict[Tuple[str, str], threading.Event] = {}   # (run id, task id) -> set to cancel
        self.tasks_done = 0
        self.tasks_failed = 0
        self.downlink_held: Optional[DL.Held] = None   # the hub's values it holds (canonical, or a mirror)
        self.queries = 0             # status queries being answered now
        self.started = time.time()

    def check_pending(self) -> int:
        """At start: delete kept updates that no longer parse (one log line each); returns how many are left.

        Update files from agents before run ids are left alone and never sent (one line for all).
        """
        legacy = self.state.legacy_pending()
        if legacy:
            log.warning("pending/: %d update file(s) from an agent version without run ids are ignored: no hub run "
                        "can claim them (%s%s)", len(legacy), ", ".join(p.name for p in legacy[:3]),
                        ", ..." if len(legacy) > 3 else "")
        left = 0
        for run_id, task_id, path in self.state.pending():
            try:
                upd = Update.from_bytes(path.read_bytes())
                if upd.run_id != run_id or upd.task_id != task_id:
                    raise UpdateError(f"it names task {upd.task_id[:40]!r} of run {upd.run_id[:40]!r}")
                left += 1
            except (OSError, UpdateError) as e:
                log.warning("pending update %s/%s is unreadable (%s); deleted", run_id, path.name, _one_line(e))
                self.state.drop_pending(run_id, task_id)
        return left

    # -- connections ----------------------------------------------------------------------------
    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ch = await self._admit(reader, writer)
        if ch is None:
            return
        if ch.conn.peer_flags & FLAG_QUERY:
            await self.answer_query(ch)
            return
        session = Session(self, ch, asyncio.current_task())
        old, self.session = self.session, session
        if old is not None:
            log.info("hub %s supersedes the connection from %s", ch.peer, old.ch.peer)
            old.cancel()
        try:
            await session.run()
        finally:
            if self.session is session:
                self.session = None

    async def _admit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Optional[Channel]:
        """The handshake under the admission bounds: an authenticated channel, or None (logged)."""
        peername = writer.get_extra_info("peername")
        host = str(peername[0]) if isinstance(peername, tuple) else str(peername)
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        me = asyncio.current_task()
        pending, _ = self.admission.admit(source_of(host), me.cancel if me is not None else writer.close)
        try:
            return await Channel.open(reader, writer, "server", self.s.key, timeout=self.s.handshake_timeout,
                                      hello_timeout=self.s.hello_timeout, max_frame=self.s.max_frame,
                                      on_hello=lambda: self.admission.hello(pending))
        except asyncio.CancelledError:
            if not pending.evicted:
                raise
            writer.close()
            self.refusals.refused(pending.source, "evicted for newer connections",
                                  f"{peer}: evicted before finishing its handshake ({pending.evicted}; the "
                                  f"oldest {'silent ' if not pending.hello else ''}one makes room for a newer one)")
        except ChannelError as e:
            self.refusals.refused(pending.source, refusal_kind(e), str(e))
        except Exception as e:  # never let one peer take the server down
            writer.close()
            self.refusals.refused(pending.source, "internal error", f"{peer}: {type(e).__name__}: {_one_line(e)}")
        finally:
            self.admission.done(pending)
        return None

    async def answer_query(self, ch: Channel) -> None:
        """A read-only status query: one AGENT_INFO with ``status()``, then close. Never touches the session."""
        if self.queries >= MAX_QUERIES:
            log.info("status query from %s not answered: %d others in progress", ch.peer, self.queries)
            ch.abort()
            return
        self.queries += 1
        try:
            await asyncio.wait_for(ch.send(M.AGENT_INFO, M.encode_json(self.status())), QUERY_SEND_TIMEOUT)
            log.info("answered a status query from %s", ch.peer)
        except (ChannelError, asyncio.TimeoutError) as e:
            log.info("status query from %s: %s", ch.peer, "the client did not read the answer"
                     if isinstance(e, asyncio.TimeoutError) else _one_line(e))
        except Exception as e:  # one query must never cost the agent anything
            log.warning("status query from %s: %s: %s", ch.peer, type(e).__name__, _one_line(e))
        finally:
            self.queries -= 1
            await ch.close()

    def status(self) -> Dict[str, Any]:
        """AGENT_INFO plus what an operator asks (``ftte-hub agents``): who holds the session, what trains."""
        s = self.session
        return {**self.info(), "hub": s.ch.peer if s is not None else None,
                "hub_since": round(s.since, 3) if s is not None else None,
                "training": self.tasks_in_progress, "tasks_done": self.tasks_done,
                "tasks_failed": self.tasks_failed, "uptime": round(time.time() - self.started, 3)}

    @property
    def max_model_bytes(self) -> int:
        """Weights over this are refused when the model arrives: no task of it could fit the budget.
        The hub may train a model whose float32 weights exceed the budget, with its frozen layers
        held as int8 (a quarter of the bytes; the task's own check then prices it exactly), so only
        weights whose int8 form alone is over the budget are hopeless."""
        return int(self.s.memory_budget * (1 + MEMORY_MARGIN)) * INT8_SHRINK

    def info(self) -> Dict[str, Any]:
        d = self.s.data
        return {"agent_id": self.state.agent_id, "name": self.s.name, "protocol": PROTOCOL_VERSION,
                "memory_budget": int(self.s.memory_budget), "speed": float(self.s.speed),
                "slowdown": float(self.s.slowdown), "models": self.state.verified_models(),
                "pending": len(self.state.pending()), "num_samples": int(len(d)), "arch": self.s.arch,
                "software": f"ftte-agent {__version__}",
                # optional extras (not required by the contract): let a hub check the data fits its model
                "input_shape": [int(v) for v in d.feature_shape], "num_classes": int(d.num_classes),
                # the newest model file version it reads (3: weights stored int8, a smaller MODEL)
                "model_format": max(READABLE_VERSIONS),
                # this agent resolves downlink frames; the canonical version it holds, if any (a
                # mirror from a direct step: stream and checksum only)
                "downlink": {"format": DL.FORMAT_VERSION, "direct": True,
                             **(self.downlink_held.describe() if self.downlink_held is not None else {})}}

    # -- downlink --------------------------------------------------------------------------------
    async def resolve_downlink(self, task: M.TaskMessage) -> Optional[str]:
        """Turn the task's downlink frame into its values (``task.values``) and hold them; returns
        None, or why the frame did not apply (this agent then holds nothing: the hub sends a snapshot)."""
        frame = task.downlink
        try:
            origin = None
            if frame.needs_origin:
                origin = await run_in_daemon_thread(self._origin_values, task)
            values = DL.resolve(frame, self.downlink_held, origin)
        except DL.DownlinkError as e:
            self.downlink_held = None
            return str(e)
        self.downlink_held = DL.held_after(frame, values)   # a direct step's result: a mirror, no version
        task.values = values
        return None

    def _origin_values(self, task: M.TaskMessage) -> Dict[str, np.ndarray]:
        """The subset's values in the cached model file (what a stream starts from)."""
        blob = self.state.get_model(task.model_hash)
        if blob is None:
            raise DL.DownlinkError(f"downlink delta from model {task.model_hash[:16]}, which is not cached here")
        try:
            model = model_from_bytes(blob, max_param_bytes=self.max_model_bytes)
            return subset_values(model, Subset.from_dict(model, task.subset))
        except (ModelFileError, ValueError, KeyError, TypeError) as e:
            raise DL.DownlinkError(f"downlink delta from the model file's values: {_one_line(e)}") from None

    # -- tasks ------------------------------------------------------------------------------------
    @property
    def tasks_in_progress(self) -> int:
        return len(self._training)

    def start_task(self, task: M.TaskMessage) -> None:
        key = (task.run_id, task.task_id)
        cancel = self._cancel[key] = threading.Event()
        t = asyncio.create_task(self._run_task(task, cancel), name=f"task {task.task_id}")
        self._training.add(t)

        def done(t: asyncio.Task) -> None:
            self._training.discard(t)
            if self._cancel.get(key) is cancel:
                del self._cancel[key]
        t.add_done_callback(done)

    def cancel_tasks(self, why: str, keep_run: Optional[str] = None) -> int:
        """Cancel every task training or waiting (except those of ``keep_run``); returns how many."""
        n = 0
        for (run_id, task_id), ev in list(self._cancel.items()):
            if run_id != keep_run and not ev.is_set():
                ev.set()
                n += 1
                log.info("task %s: cancelled (%s)", task_id, why)
        return n

    async def _run_task(self, task: M.TaskMessage, cancel: threading.Event) -> None:
        key = (task.run_id, task.task_id)
        async with self._train_lock:
            if cancel.is_set():
                return  # cancelled while it waited for the one before it
            log.debug("task %s: training (run %s, version %d, model %s, subset %s)", task.task_id, task.run_id,
                      task.base_version, task.model_hash[:12], task.subset_fingerprint)
            start = time.perf_counter()
            try:
                result: TaskResult = await run_in_daemon_thread(self._train, task, cancel)
            except TaskCancelled:
                self._worker, self._worker_key = None, None  # the run is over: free its model and buffers
                log.info("task %s: training stopped; the partial result is discarded", task.task_id)
                return
            except TaskFailure as e:
                await self._task_failed(task, str(e), resync=e.resync)
                return
            except Exception as e:  # a bug or an engine error must cost one task, not the agent
                if not isinstance(e, TaskError):
                    log.warning("task %s: %s: %s", task.task_id, type(e).__name__, _one_line(e))  # for the operator
                await self._task_failed(task, failure_reason(e, self.s.memory_budget))
                return
            train_seconds = time.perf_counter() - start
            if self.s.slowdown > 1 and not await _sleep_unless(cancel, (self.s.slowdown - 1) * train_seconds):
                log.info("task %s: cancelled while emulating a slower device; the result is discarded",
                         task.task_id)
                return
            if result.capped == "steps":
                log.info("task %s: asked for %d steps; trained %d (--max-task-steps)", task.task_id,
                         result.planned_steps, result.steps)
            elif result.capped == "seconds":
                log.warning("task %s: stopped after %d of %d steps at the %g s limit (--max-task-seconds); "
                            "sending what it has", task.task_id, result.steps, result.planned_steps,
                            self.s.max_task_seconds)
            update = result.update
            update.task_id = task.task_id
            update.run_id = task.run_id
            update.device_id = self.state.agent_id
            update.stats.update({"train_seconds": train_seconds,
                                 "elapsed_seconds": time.perf_counter() - start,
                                 "steps": float(result.steps), "planned_steps": float(result.planned_steps)})
            try:
                blob = update.to_bytes()
            except UpdateError:  # the loss or a statistic is not finite
                await self._task_failed(task, "training diverged: the loss is not a finite number "
                                              "(a lower learning rate may help)")
                return
            try:
                self.state.put_pending(task.run_id, task.task_id, blob)
            except OSError as e:  # e.g. a full SD card: an update that cannot be kept is not sent
                await self._task_failed(task, f"cannot keep the update in the state dir: {e.strerror or e}")
                return
            self.tasks_done += 1
            log.info("task %s: trained %d steps in %.3f s, loss %.4f, update %d bytes, training memory %d bytes, "
                     "process peak RSS %s", task.task_id, result.steps, train_seconds, update.loss, len(blob),
                     update.peak_memory_bytes or 0, _mib(peak_rss()))
        session = self.session
        if session is None:
            log.info("task %s: no hub connected; the update stays in pending/ for the next one", task.task_id)
        else:
            await session.flush_pending_quietly(fresh={key})

    def _train(self, task: M.TaskMessage, cancel: threading.Event) -> TaskResult:
        """In the training thread: the worker for this model+subset (reused), the memory check, one run."""
        key = (task.model_hash, task.subset_fingerprint)
        if self._worker_key != key:
            self._worker, self._worker_key = None, None  # free the old model before loading the next
            self._worker = self._make_worker(task)
            self._worker_key = key
        x, y = self.s.data.x, self.s.data.y
        # before the trainer allocates anything for this batch size
        check_memory(self._worker.model, self._worker.subset, task.config, len(x), self.s.memory_budget)
        limits = StepLimits(max_steps=self.s.max_task_steps, max_seconds=self.s.max_task_seconds, cancel=cancel)
        return self._worker.run(task.values, task.base_version, x, y, task.config, bits=task.bits,
                                seed=task.seed, device_id=self.state.agent_id, limits=limits)

    def release_worker(self) -> None:
        """Free the model and training buffers between runs (a later task loads them again)."""
        if not self._train_lock.locked():
            self._worker, self._worker_key = None, None

    def _make_worker(self, task: M.TaskMessage) -> LocalWorker:
        was_cached = self.state.has_model(task.model_hash)
        blob = self.state.get_model(task.model_hash)
        if blob is None and was_cached:
            raise TaskFailure(f"cached model {task.model_hash[:16]} was corrupt and is deleted: reconnect and send "
                              f"MODEL first", resync=True)
        if blob is None:
            raise TaskFailure(f"model {task.model_hash[:16]} is not cached here: send MODEL first")
        try:
            model = model_from_bytes(blob, max_param_bytes=self.max_model_bytes)
        except ModelTooLarge as e:
            raise TaskFailure(weights_over_budget(e.param_bytes, self.s.memory_budget)) from None
        except ModelFileError as e:
            raise TaskFailure(f"cached model {task.model_hash[:16]}: {e}") from None
        try:
            subset = Subset.from_dict(model, task.subset)
        except (ValueError, KeyError) as e:
            raise TaskFailure(f"the task's subset does not fit the model: {_one_line(e)}") from None
        except TypeError:
            raise TaskFailure("the task's subset is malformed: it must map layer names to {rows, bias}") from None
        if subset.fingerprint() != task.subset_fingerprint:
            raise TaskFailure(f"subset fingerprint is {subset.fingerprint()}, the task says {task.subset_fingerprint}")
        d = self.s.data
        want = tuple(model.input_shape)
        have = tuple(d.feature_shape)
        if have != want and int(np.prod(have)) != int(np.prod(want)):
            raise TaskFailure(f"local data has samples of shape {list(have)}, the model expects {list(want)}")
        if int(d.y.max()) >= model.num_classes:
            raise TaskFailure(f"local data has labels up to {int(d.y.max())}, the model has {model.num_classes} classes")
        return LocalWorker(model, subset)

    async def _task_failed(self, task: M.TaskMessage, message: str, resync: bool = False) -> None:
        self.tasks_failed += 1
        log.warning("task %s failed: %s", task.task_id, message)
        session = self.session
        if session is not None:
            try:
                await session.ch.send(M.TASK_FAILED, M.encode_json({"task_id": task.task_id, "run_id": task.run_id,
                                                                    "message": message}))
            except ChannelError:
                return  # the session's own loop reports the broken connection
            if resync:
                await session._send_error("the model cache changed: reconnect for a fresh AGENT_INFO")
                log.info("closing the connection to %s so the hub reads the model cache again", session.ch.peer)
                session.cancel()

    async def shutdown(self) -> None:
        if self.session is not None:
            # the authenticated close: the hub sees a clean goodbye (the session's own task reads on
            # to the hub's EOF, so close() waits for it rather than reading beside it)
            await self.session.ch.close(reader=self.session.task)
            self.session.cancel()
        for t in list(self._training):
            t.cancel()


class Session:
    """One authenticated hub connection."""

    def __init__(self, agent: Agent, ch: Channel, task: Optional[asyncio.Task]):
        self.agent, self.ch, self.task = agent, ch, task
        self.since = time.time()
        self.state = agent.state
        self._sent: Set[Tuple[str, str]] = set()   # (run id, task id) of pending updates sent on this connection
        self._flush_lock = asyncio.Lock()
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        self.ch.abort()

    async def run(self) -> None:
        log.info("hub %s connected", self.ch.peer)
        pinger = asyncio.create_task(self._ping_loop())
        try:
            await self.ch.send(M.AGENT_INFO, M.encode_json(self.agent.info()))
            await self.flush_pending()
            while True:
                msg_type, body = await self.ch.recv(timeout=self.agent.s.silence_timeout)
                await self._dispatch(msg_type, body)
                # else a TASK's frame (the size of its values, which decode_task copied) stays alive
                # while the task trains, until the next message arrives (issue 11: peak memory)
                del body
        except ChannelClosed as e:
            log.info("hub %s", e)
        except ChannelError as e:
            log.warning("hub connection dropped: %s", e)
        except M.MessageError as e:
            log.warning("hub %s sent a bad message: %s", self.ch.peer, e)
            await self._send_error(str(e))
        except _EndSession:
            pass
        except asyncio.CancelledError:
            if not self._cancelled:
                raise
        except Exception as e:  # e.g. the state dir's disk is full: this connection ends, the agent serves on
            log.error("hub %s: connection ended by an internal error: %s: %s", self.ch.peer, type(e).__name__,
                      _one_line(e))
            await self._send_error(f"agent error: {type(e).__name__}: {_one_line(e)}")
        finally:
            pinger.cancel()
            await self.ch.close()

    async def _ping_loop(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.agent.s.ping_interval)
                await self.ch.send(M.PING, M.encode_json({"t": time.time()}))
        except ChannelError:
            pass

    async def _send_error(self, message: str) -> None:
        try:
            await self.ch.send(M.ERROR, M.encode_json({"message": message}))
        except ChannelError:
            pass

    # -- messages ---------------------------------------------------------------------------------
    async def _dispatch(self, msg_type: int, body: bytes) -> None:
        if msg_type == M.PING:
            ping = M.decode_json(body, msg_type)
            t = ping.get("t")
            await self.ch.send(M.PONG, M.encode_json({"t": t if isinstance(t, (int, float)) and math.isfinite(t) else 0.0}))
        elif msg_type == M.PONG:
            pass  # any frame resets the silence timer
        elif msg_type == M.MODEL:
            await self._on_model(body)
        elif msg_type == M.TASK:
            await self._on_task(body)
        elif msg_type == M.ACK:
            self._on_ack(M.decode_json(body, msg_type, {"task_id": str, "accepted": bool}))
        elif msg_type == M.NOT_USED:
            m = M.decode_json(body, msg_type)
            log.warning("not used by hub %s: %s (needs %s bytes, budget %s bytes); staying idle", self.ch.peer,
                        m.get("reason", "?"), m.get("needed_bytes", "?"), m.get("budget_bytes", "?"))
        elif msg_type == M.STOP:
            m = M.decode_json(body, msg_type)
            log.info("hub %s stopped the run: %s", self.ch.peer, str(m.get("reason", ""))[:300])
            self.agent.cancel_tasks("the hub stopped the run")
            self.agent.release_worker()
        elif msg_type == M.ERROR:
            m = M.decode_json(body, msg_type)
            log.warning("hub %s reported an error: %s", self.ch.peer, str(m.get("message", ""))[:300])
            raise _EndSession()
        else:
            log.warning("hub %s: ignored unexpected %s message (%d bytes)", self.ch.peer, M.name(msg_type), len(body))

    async def _on_model(self, body: bytes) -> None:
        blob = body  # the received plaintext itself (a bytearray no one else holds): a copy would double the peak
        model_hash = content_hash(blob)
        if self.state.has_model(model_hash):
            log.info("model %s: already cached", model_hash[:12])
            return
        try:
            model = await run_in_daemon_thread(model_from_bytes, blob, DEFAULT_MAX_MODEL_BYTES,
                                               self.agent.max_model_bytes)
        except ModelTooLarge as e:
            raise M.MessageError(f"MODEL: {weights_over_budget(e.param_bytes, self.agent.s.memory_budget)}") from None
        except ModelFileError as e:
            raise M.MessageError(f"MODEL: {e}") from None
        self.state.put_model(model_hash, blob)
        log.info("model %s: received and cached (%d bytes, %s, %d parameters)", model_hash[:12], len(blob),
                 model.name, model.num_params())

    async def _on_task(self, body: bytes) -> None:
        try:
            task = M.decode_task(body)
        except M.MessageError as e:
            task_id, run_id = peek_task_id(body)
            if task_id is None:
                raise
            await self._fail(task_id, run_id, str(e))
            return
        if task.downlink is not None:  # first: the hub counts on this agent holding the task's version
            why = await self.agent.resolve_downlink(task)
            if why is not None:
                await self._fail(task.task_id, task.run_id, why, resync=True)
                return
        try:
            self.state.pending_path(task.run_id, task.task_id)
        except ValueError as e:
            await self._fail(task.task_id, task.run_id, f"TASK: {e}")
            return
        if not self.state.has_model(task.model_hash):
            await self._fail(task.task_id, task.run_id, f"model {task.model_hash[:16]} is not cached here: "
                                                        f"send MODEL first")
            return
        # a hub of another run has taken over: what the old run's tasks would train, no one will merge
        self.agent.cancel_tasks(f"the hub now runs {task.run_id}", keep_run=task.run_id)
        if self.agent.tasks_in_progress >= MAX_TASKS:
            await self._fail(task.task_id, task.run_id, f"agent busy: {self.agent.tasks_in_progress} tasks are "
                                                        f"already training or waiting")
            return
        self.agent.start_task(task)

    async def _fail(self, task_id: str, run_id: str, message: str, resync: bool = False) -> None:
        self.agent.tasks_failed += 1
        log.warning("task %s refused: %s", task_id[:80], message)
        body = {"task_id": task_id, "run_id": run_id, "message": message}
        if resync:
            body["downlink"] = "resync"
        await self.ch.send(M.TASK_FAILED, M.encode_json(body))

    def _on_ack(self, ack: Dict[str, Any]) -> None:
        tid = ack["task_id"]
        rid = ack.get("run_id")
        if not isinstance(rid, str) or not rid:  # a hub that does not name the run: the update sent here
            sent = [r for r, t in self._sent if t == tid]
            rid = sent[0] if len(sent) == 1 else ""
        known = self.state.drop_pending(rid, tid)
        self._sent.discard((rid, tid))
        if not known:
            log.info("ACK for task %s, which has no kept update (already acknowledged?)", tid[:80])
        elif ack["accepted"]:
            log.info("update %s accepted (hub version %s)", tid, ack.get("version", "?"))
        elif ack.get("reason") == "other_run":
            log.warning("update %s of run %s dropped by the hub: it belongs to another run (%s)", tid, rid,
                        str(ack.get("message", ""))[:300])
        else:
            log.warning("update %s rejected by the hub: %s: %s", tid, ack.get("reason", "?"),
                        str(ack.get("message", ""))[:300])

    # -- pending updates --------------------------------------------------------------------------
    async def flush_pending(self, fresh: Set[Tuple[str, str]] = frozenset()) -> None:
        """Send every kept update not yet sent on this connection, oldest first (``fresh``: (run id,
        task id) trained during this connection, for the log)."""
        async with self._flush_lock:
            for run_id, task_id, path in self.state.pending():
                key = (run_id, task_id)
                if key in self._sent:
                    continue
                try:
                    blob = path.read_bytes()
                    upd = Update.from_bytes(blob)
                    if upd.run_id != run_id:
                        raise UpdateError(f"it names run {upd.run_id[:40]!r}")
                except FileNotFoundError:
                    continue  # acknowledged meanwhile
                except (OSError, UpdateError) as e:
                    log.warning("pending update %s/%s is unreadable (%s); deleted", run_id, path.name, _one_line(e))
                    self.state.drop_pending(run_id, task_id)
                    continue
                await self.ch.send(M.UPDATE, blob)
                self._sent.add(key)
                # a fresh update's delivery is routine; one kept from an earlier connection is news
                log.log(logging.DEBUG if key in fresh else logging.INFO, "update %s sent to %s (%d bytes)%s",
                        task_id, self.ch.peer, len(blob), "" if key in fresh else f", kept from earlier (run {run_id})")

    async def flush_pending_quietly(self, fresh: Set[Tuple[str, str]] = frozenset()) -> None:
        try:
            await self.flush_pending(fresh)
        except ChannelError as e:
            log.info("update kept for the next connection: %s", e)


async def _sleep_unless(cancel: threading.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``cancel`` is set first; True when the whole sleep passed."""
    end = time.monotonic() + seconds
    while not cancel.is_set():
        left = end - time.monotonic()
        if left <= 0:
            return True
        await asyncio.sleep(min(left, 0.05))
    return False


def _mib(n: Optional[int]) -> str:
    return "unknown" if n is None else f"{n / (1 << 20):.1f} MiB"


def _one_line(e: BaseException) -> str:
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
