"""The round driver: fleet events in, decisions out. Written once, driven by the simulator (virtual
clock) and by the networked hub (sockets); it knows neither clocks nor sockets.

    driver = RoundDriver(model, subset, make_strategy("ftte", buffer_size=10), TaskConfig(lr=0.05))
    driver.device_joined("pi-1", {"memory_budget": 64 << 20})
    task = driver.device_idle("pi-1")           # Task or None (FedAvg outside its cohort, or done)
    ... the device trains: update = run_task(device_model, task, x, y) ...
    arrival = driver.update_arrived("pi-1", update, nbytes=len(wire_bytes))
    if arrival.merge: evaluate, checkpoint, log arrival.merge
    driver.device_gone("pi-1"); driver.shutdown()

Semi-async strategies (FTTE, FedBuff): an idle device always gets a task at the current version;
accepted updates go into a buffer; the arrival that makes it hold exactly K merges it and the
version goes up by one. Synchronous FedAvg: a round hands tasks at version v to a cohort of up to
K devices (the cohort closes when it is full or when its first update arrives), waits for every
member still present, merges, v + 1. A member that leaves (``device_gone``) is no longer waited
for; a round whose members all left without delivering ends without a merge.

Each task may be delivered once. Rejected, never merged: unknown task, a task of another device,
a second delivery, a base version other than the task's or ahead of the hub, another subset,
wrong keys/shapes/bits, NaN/Inf, non-positive sample counts; FedAvg also drops late updates from
a round that already ended.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Set

import numpy as np

from .graph import Model
from .local import LocalWorker, TaskConfig  # one task-settings class for hub, agent and simulator
from .strategies import MergeReport, Strategy
from .subset import Subset
from .update import Update, UpdateRejected, check_update, subset_values

__all__ = ["Arrival", "RoundDriver", "Task", "TaskConfig", "run_task"]


@dataclass(frozen=True)
class Task:
    """Work for one device: train ``subset`` from ``values`` (shared by all tasks of a version; read-only)."""

    id: str
    device_id: str
    base_version: int
    values: Mapping[str, np.ndarray]
    config: Any                # the driver's task_config (a local.TaskConfig): lr, local_epochs, batch size...
    seed: int                  # this task's seed: local shuffling and stochastic rounding
    bits: int                  # how to encode the delta (8/4 quantised, 32 float)
    subset: Subset
    subset_fingerprint: str

    @property
    def payload_bytes(self) -> int:
        """Bytes of parameter values the task carries down (what a transport must move at least)."""
        return sum(v.nbytes for v in self.values.values())


@dataclass
class Arrival:
    accepted: bool
    reason: str = ""                      # "" when accepted, else a short code (see RoundDriver.stats)
    message: str = ""
    task_id: str = ""
    staleness: Optional[int] = None
    merge: Optional[MergeReport] = None   # set when this arrival triggered a merge


@dataclass
class _TaskRecord:
    device_id: str
    base_version: int
    round: int


@dataclass
class _Device:
    info: Dict[str, Any] = field(default_factory=dict)
    present: bool = True
    tasks_issued: int = 0
    accepted: int = 0
    rejected: int = 0


def _task_seed(base: int, n: int) -> int:
    x = (int(base) * 0x9E3779B97F4A7C15 + n * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFF


class RoundDriver:
    def __init__(self, model: Model, subset: Optional[Subset], strategy: Strategy,
                 task_config: Optional[TaskConfig] = None, max_versions: Optional[int] = None,
                 merge_partial_at_shutdown: bool = False, max_staleness: Optional[int] = None,
                 initial_version: int = 0, seed: Optional[int] = None):
        """``subset``: the hub's chosen subset (used by sparse strategies; full strategies train all).

        ``seed``: base of the per-task seeds (default: ``task_config.seed`` if it has one, else 0).

        ``max_versions``: stop handing out tasks (and merging) once the version reaches it.
        ``max_staleness``: optionally reject updates older than this many versions.
        ``initial_version``: where a resumed hub continues (versions never go back).
        """
        if max_versions is not None and max_versions < 0:
            raise ValueError(f"max_versions must be >= 0 or None, got {max_versions}")
        self.model = model
        self.strategy = strategy
        self.subset = strategy.training_subset(model, subset)
        self.subset.validate(model)
        self.fingerprint = self.subset.fingerprint()
        self.task_config = task_config if task_config is not None else TaskConfig()
        self.seed = int(seed if seed is not None else getattr(self.task_config, "seed", 0) or 0)
        self.max_versions = max_versions
        self.merge_partial_at_shutdown = bool(merge_partial_at_shutdown)
        self.max_staleness = max_staleness
        self.version = int(initial_version)
        self.closed = False

        self.devices: Dict[str, _Device] = {}
        self._outstanding: Dict[str, _TaskRecord] = {}
        self._consumed: Dict[str, str] = {}  # task id -> "delivered" | "expired"
        self._task_counter = 0
        self.task_prefix = ""          # e.g. the hub's run id: task ids unique across runs
        self._values: Optional[tuple] = None  # (version, read-only values) shared by that version's tasks
        self._buffer: List[Update] = []

        # FedAvg round state
        self._round = 0
        self._cohort: Set[str] = set()        # members still owing an update
        self._cohort_open = True

        # counters
        self.merges = 0
        self.merged_updates = 0
        self._staleness_sum = 0
        self.accepted = 0
        self.rejected: Counter = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.tasks_issued = 0
        self.history: List[MergeReport] = []

    # -- state -----------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.closed or (self.max_versions is not None and self.version >= self.max_versions)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def cohort(self) -> Set[str]:
        """FedAvg: the devices the running round still waits for."""
        return set(self._cohort)

    @property
    def mean_staleness(self) -> float:
        return self._staleness_sum / self.merged_updates if self.merged_updates else 0.0

    def stats(self) -> Dict[str, Any]:
        return {
            "strategy": self.strategy.name, "version": self.version, "merges": self.merges,
            "merged_updates": self.merged_updates, "mean_staleness": self.mean_staleness,
            "accepted": self.accepted, "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(self.rejected), "tasks_issued": self.tasks_issued,
            "outstanding_tasks": len(self._outstanding), "buffered": len(self._buffer),
            "devices_present": sum(d.present for d in self.devices.values()),
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
        }

    def count_bytes(self, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """Transport-measured traffic (the driver cannot know framing and encryption overhead)."""
        self.bytes_in += int(bytes_in)
        self.bytes_out += int(bytes_out)

    # -- events ----------------------------------------------------------------------------------
    def device_joined(self, device_id: str, info: Optional[Mapping[str, Any]] = None) -> None:
        dev = self.devices.get(device_id)
        if dev is None:
            self.devices[device_id] = _Device(dict(info or {}))
        else:
            dev.present = True
            if info:
                dev.info.update(info)

    def device_gone(self, device_id: str) -> Optional[MergeReport]:
        """The device left. Its tasks stay deliverable (semi-async: a late update is just stale).

        FedAvg: it is no longer waited for; if that completes the round, the merge happens here
        and its report is returned.
        """
        dev = self.devices.get(device_id)
        if dev is not None:
            dev.present = False
        if self.strategy.synchronous and device_id in self._cohort:
            self._cohort.discard(device_id)
            return self._maybe_end_round()
        return None

    def device_idle(self, device_id: str) -> Optional[Task]:
        """A task for this device, or None (done, or FedAvg with the device outside the running cohort)."""
        if self.done:
            return None
        if device_id not in self.devices or not self.devices[device_id].present:
            self.device_joined(device_id)
        if self.strategy.synchronous:
            if device_id in self._cohort:
                # it lost its task (e.g. restarted): reissue at the round's version, superseding the old one
                self._drop_outstanding(device_id, self._round)
            elif not self._cohort_open or len(self._cohort) >= self.strategy.buffer_size:
                return None
            self._cohort.add(device_id)
            if len(self._cohort) >= self.strategy.buffer_size:
                self._cohort_open = False
        return self._issue(device_id)

    def update_arrived(self, device_id: str, update: Update, nbytes: Optional[int] = None) -> Arrival:
        if nbytes is not None:
            self.bytes_in += int(nbytes)
        if self.closed:
            return self._reject(device_id, "shutdown", "the driver has shut down", "")
        if not isinstance(update, Update):
            return self._reject(device_id, "malformed", f"expected an Update, got {type(update).__name__}", "")
        tid = update.task_id or self._guess_task(device_id, update)
        rec = self._outstanding.get(tid)
        if rec is None:
            if self._consumed.get(tid) == "delivered":
                return self._reject(device_id, "duplicate", f"task {tid!r} was already delivered", tid)
            if tid in self._consumed:
                return self._reject(device_id, "late", f"task {tid!r} expired: its FedAvg round has ended", tid)
            return self._reject(device_id, "unknown_task", f"no task {tid[:40]!r} is outstanding", tid)
        if rec.device_id != device_id or (update.device_id and update.device_id != device_id):
            return self._reject(device_id, "wrong_device", f"task {tid!r} belongs to {rec.device_id!r}", tid)
        # from here on the task is spent, whatever the verdict: one delivery per task
        del self._outstanding[tid]
        self._consumed[tid] = "delivered"
        if update.base_version != rec.base_version:
            return self._reject(device_id, "version", f"task {tid!r} was at version {rec.base_version}, "
                                f"the update claims {update.base_version}", tid)
        if self.done:
            return self._reject(device_id, "done", f"the run reached max_versions={self.max_versions}", tid)
        try:
            check_update(update, self.model, self.subset, self.version, bits=self.strategy.bits,
                         fingerprint=self.fingerprint)
        except UpdateRejected as e:
            return self._reject(device_id, e.reason, str(e), tid)
        tau = self.version - update.base_version
        if self.max_staleness is not None and tau > self.max_staleness:
            return self._reject(device_id, "too_stale", f"staleness {tau} exceeds max_staleness={self.max_staleness}", tid)
        if self.strategy.synchronous and (rec.round != self._round or device_id not in self._cohort):
            return self._reject(device_id, "late", f"task {tid!r} belongs to round {rec.round}, which has ended", tid)

        self.accepted += 1
        if device_id in self.devices:
            self.devices[device_id].accepted += 1
        self._buffer.append(update)
        report = None
        if self.strategy.synchronous:
            self._cohort.discard(device_id)
            self._cohort_open = False  # the round has started delivering: no new members
            report = self._maybe_end_round()
        elif len(self._buffer) == self.strategy.buffer_size:
            report = self._merge(partial=False)
        return Arrival(True, task_id=tid, staleness=tau, merge=report)

    def shutdown(self) -> Optional[MergeReport]:
        """Stop: no more tasks or merges. Merges a partial buffer first if configured to."""
        report = None
        if not self.closed and self.merge_partial_at_shutdown and self._buffer and not self.done:
            report = self._merge(partial=True)
        self.closed = True
        self._buffer.clear()
        return report

    # -- checkpoint ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume after a crash: ``{"meta": JSON-able dict, "buffer": [update bytes]}``.

        Save it atomically together with the model after every merge *and* after every accepted
        arrival (acknowledged updates sit in the buffer until the merge). The model itself is not
        included: the caller checkpoints it (ONNX or state arrays) alongside.
        """
        meta = {
            "format": 1, "strategy": self.strategy.name, "subset_fingerprint": self.fingerprint,
            "version": self.version, "round": self._round, "task_counter": self._task_counter,
            "outstanding": {t: [r.device_id, r.base_version, r.round] for t, r in self._outstanding.items()},
            "consumed": dict(self._consumed), "cohort": sorted(self._cohort), "cohort_open": self._cohort_open,
            "merges": self.merges, "merged_updates": self.merged_updates, "staleness_sum": self._staleness_sum,
            "accepted": self.accepted, "rejected": dict(self.rejected), "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out, "tasks_issued": self.tasks_issued, "closed": self.closed,
        }
        return {"meta": meta, "buffer": [u.to_bytes() for u in self._buffer]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()`` (the model must already hold the checkpointed values)."""
        from .update import Update

        meta = state["meta"]
        if meta.get("format") != 1:
            raise ValueError(f"unknown driver checkpoint format {meta.get('format')!r}")
        if meta["strategy"] != self.strategy.name or meta["subset_fingerprint"] != self.fingerprint:
            raise ValueError(f"checkpoint is for {meta['strategy']} on subset {meta['subset_fingerprint']}, "
                             f"this driver runs {self.strategy.name} on {self.fingerprint}")
        if meta["version"] < self.version:
            raise ValueError(f"checkpoint version {meta['version']} is behind this driver's {self.version}")
        self.version = int(meta["version"])
        buffer = [Update.from_bytes(b) for b in state["buffer"]]
        for u in buffer:
            check_update(u, self.model, self.subset, self.version, bits=self.strategy.bits, fingerprint=self.fingerprint)
        self._buffer = buffer
        self._round, self._task_counter = int(meta["round"]), int(meta["task_counter"])
        self._outstanding = {t: _TaskRecord(str(d), int(v), int(r)) for t, (d, v, r) in meta["outstanding"].items()}
        self._consumed = dict(meta["consumed"])
        self._cohort, self._cohort_open = set(meta["cohort"]), bool(meta["cohort_open"])
        self.merges, self.merged_updates = int(meta["merges"]), int(meta["merged_updates"])
        self._staleness_sum, self.accepted = int(meta["staleness_sum"]), int(meta["accepted"])
        self.rejected = Counter(meta["rejected"])
        self.bytes_in, self.bytes_out = int(meta["bytes_in"]), int(meta["bytes_out"])
        self.tasks_issued, self.closed = int(meta["tasks_issued"]), bool(meta["closed"])
        self._values = None

    # -- internals -------------------------------------------------------------------------------
    def current_values(self) -> Dict[str, np.ndarray]:
        """The subset's values at the current version, computed once per version and shared read-only."""
        if self._values is None or self._values[0] != self.version:
            vals = subset_values(self.model, self.subset)
            for v in vals.values():
                v.setflags(write=False)
            self._values = (self.version, vals)
        return self._values[1]

    def _issue(self, device_id: str) -> Task:
        self._task_counter += 1
        tid = f"{self.task_prefix}t{self._task_counter}"
        self._outstanding[tid] = _TaskRecord(device_id, self.version, self._round)
        self.tasks_issued += 1
        self.devices[device_id].tasks_issued += 1
        return Task(id=tid, device_id=device_id, base_version=self.version, values=self.current_values(),
                    config=self.task_config, seed=_task_seed(self.seed, self._task_counter),
                    bits=self.strategy.bits, subset=self.subset, subset_fingerprint=self.fingerprint)

    def _guess_task(self, device_id: str, update: Update) -> str:
        """An update that names no task: the device's newest outstanding task at the update's base
        version (tasks of one device at one version carry identical values, so any of them fits)."""
        best = ""
        for tid, rec in self._outstanding.items():  # insertion order = issue order
            if rec.device_id == device_id and rec.base_version == update.base_version:
                best = tid
        return best

    def _drop_outstanding(self, device_id: str, round_: int) -> None:
        for tid in [t for t, r in self._outstanding.items() if r.device_id == device_id and r.round == round_]:
            del self._outstanding[tid]
            self._consumed[tid] = "expired"

    def _reject(self, device_id: str, reason: str, message: str, tid: str) -> Arrival:
        self.rejected[reason] += 1
        dev = self.devices.get(device_id)
        if dev is not None:
            dev.rejected += 1
        return Arrival(False, reason=reason, message=message, task_id=tid)

    def _maybe_end_round(self) -> Optional[MergeReport]:
        """FedAvg: the round ends when no member is still owed (closed, or everyone left)."""
        if self._cohort:
            return None
        if self._cohort_open and not self._buffer:
            return None  # nobody has joined or delivered yet
        report = None
        if self._buffer and not self.done:
            report = self._merge(partial=len(self._buffer) < self.strategy.buffer_size)
        else:
            self._buffer.clear()
        self._new_round()
        return report

    def _new_round(self) -> None:
        self._round += 1
        self._cohort = set()
        self._cohort_open = True
        for tid in [t for t, r in self._outstanding.items() if r.round < self._round]:
            del self._outstanding[tid]  # FedAvg never merges an old round's update
            self._consumed[tid] = "expired"

    def _merge(self, partial: bool) -> MergeReport:
        updates = self._buffer
        report = self.strategy.merge(self.model, self.subset, updates, self.version)  # raises: buffer kept
        self._buffer = []
        report.partial = partial
        self.version += 1
        report.version = self.version
        self.merges += 1
        self.merged_updates += len(updates)
        self._staleness_sum += sum(report.staleness)
        self.history.append(report)
        return report


# -- device side (simulator, agent, tests) ------------------------------------------------------------
def run_task(model: Model, task: Task, x: np.ndarray, y: np.ndarray, device_id: Optional[str] = None) -> Update:
    """Train ``task`` on local data with the engine (``LocalWorker``) and return the encoded update.

    ``model`` is the device's copy (its frozen part matches the hub's); the task's values are
    loaded into it first, so the same copy can run task after task. For many tasks on one device
    keep a ``LocalWorker`` instead (it reuses the trainer's buffers) and set ``update.task_id``.
    """
    res = LocalWorker(model, task.subset).run(dict(task.values), task.base_version, x, y, task.config,
                                              bits=task.bits, seed=task.seed,
                                              device_id=device_id if device_id is not None else task.device_id)
    res.update.task_id = task.id
    return res.update
