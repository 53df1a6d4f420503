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
accepted updates go into a buffer; an arrival that makes it hold K or more merges it and the
version goes up by one. Synchronous FedAvg: a round hands tasks at version v to a cohort of up to
K devices (the cohort closes when it is full or when its first update arrives), waits for every
member still present, merges, v + 1. A member that leaves (``device_gone``) is no longer waited
for; a round whose members all left without delivering ends without a merge.

Each task may be delivered once. Rejected, never merged: unknown task, a task of another device,
a second delivery, a base version other than the task's or ahead of the hub, another subset,
wrong keys/shapes/bits, NaN/Inf, non-positive sample counts, decoded values beyond the overflow
bound; FedAvg also drops late updates from a round that already ended.

Robust by construction (robust.py, docs/aggregation.md): sample counts are capped on arrival,
each update's norm is clipped against the running median at the merge, and a merge is all or
nothing: one that would make the model non-finite, or that raises, is refused, the version is
kept, the offending updates are dropped (``Dropped``), and the run goes on.
"""
from __future__ import annotations

import json
import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import numpy as np

from .graph import Model
from .local import LocalWorker, TaskConfig  # one task-settings class for hub, agent and simulator
from .robust import MIN_HISTORY, RobustPolicy, RunningMedian, clip_factors, declared_samples
from .strategies import MergeRefused, MergeReport, Strategy
from .subset import Subset
from .update import Update, UpdateRejected, check_update, load_values, measure_update, subset_values

__all__ = ["Arrival", "Dropped", "RobustPolicy", "RoundDriver", "Task", "TaskConfig", "run_task"]

STATE_FORMAT = 2
TASK_EXPIRY_VERSIONS = 1000   # an outstanding task this many versions old expires (its update would be "late")
MAX_OUTSTANDING = 10000       # more outstanding tasks than this: the oldest expires
RECENT_TASKS = 1024           # spent task ids remembered by name (for "duplicate" vs "late")
HISTORY_LIMIT = 1000          # MergeReports kept in RoundDriver.history
DROP_LOG_LIMIT = 1000         # Dropped records kept until take_dropped()


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
    samples: Optional[int] = None         # accepted: the sample count it is weighed by (after the caps)
    dropped: List["Dropped"] = field(default_factory=list)  # accepted updates a refused/failed merge dropped


AFTER_END = ("shutdown", "done")   # reasons an update is refused only because the run had ended


@dataclass
class Dropped:
    """An accepted (acknowledged) update that a refused or failed merge dropped, never merged."""

    task_id: str
    device_id: str
    reason: str        # "merge_nonfinite" | "merge_failed"
    message: str


@dataclass
class _Buffered:
    update: Update
    norm: float        # decoded L2 norm (float64), measured on arrival
    samples: int       # num_samples after the caps
    task_id: str = ""  # the task it delivered (an update may name none: the driver matched it)
    device_id: str = ""  # who delivered it (an update may leave its own device_id empty)
    tier: int = 0      # tiered strategies: the subset it trained


@dataclass
class _TaskRecord:
    device_id: str
    base_version: int
    round: int
    tier: int = 0      # tiered strategies: the index of the subset the task trains


@dataclass
class _Device:
    info: Dict[str, Any] = field(default_factory=dict)
    present: bool = True
    tasks_issued: int = 0
    accepted: int = 0
    rejected: int = 0
    declared: Optional[int] = None   # the sample count it declared when it joined


def _task_seed(base: int, n: int) -> int:
    x = (int(base) * 0x9E3779B97F4A7C15 + n * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFF


class RoundDriver:
    def __init__(self, model: Model, subset: Optional[Subset], strategy: Strategy,
                 task_config: Optional[TaskConfig] = None, max_versions: Optional[int] = None,
                 merge_partial_at_shutdown: bool = False, max_staleness: Optional[int] = None,
                 initial_version: int = 0, seed: Optional[int] = None, robust: Optional[RobustPolicy] = None,
                 task_expiry_versions: int = TASK_EXPIRY_VERSIONS, max_outstanding: int = MAX_OUTSTANDING):
        """``subset``: the hub's chosen subset (used by sparse strategies; full strategies train all).

        ``seed``: base of the per-task seeds (default: ``task_config.seed`` if it has one, else 0).

        ``max_versions``: stop handing out tasks (and merging) once the version reaches it.
        ``max_staleness``: optionally reject updates older than this many versions.
        ``initial_version``: where a resumed hub continues (versions never go back).
        ``robust``: the bounds every update passes (``RobustPolicy()``: the documented defaults).
        ``task_expiry_versions`` / ``max_outstanding``: an outstanding task expires once the model
        is this many versions past its base version, and the oldest expires when more than this
        many are outstanding (a device that took tasks and vanished must not grow the state).
        """
        if max_versions is not None and max_versions < 0:
            raise ValueError(f"max_versions must be >= 0 or None, got {max_versions}")
        for name, v in (("task_expiry_versions", task_expiry_versions), ("max_outstanding", max_outstanding)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.model = model
        self.strategy = strategy
        self.subset = strategy.training_subset(model, subset)
        self.subset.validate(model)
        self.fingerprint = self.subset.fingerprint()
        # tiered strategies (ftte-tiered): nested subsets, a device trains the largest its budget holds;
        # self.subset is then the largest tier (what a merge may touch)
        self.tiers: List[Subset] = list(strategy.tiers) if strategy.tiers else [self.subset]
        for t in self.tiers:
            t.validate(model)
        self._tier_fingerprints = [t.fingerprint() for t in self.tiers]
        self.task_config = task_config if task_config is not None else TaskConfig()
        self.seed = int(seed if seed is not None else getattr(self.task_config, "seed", 0) or 0)
        self.max_versions = max_versions
        self.merge_partial_at_shutdown = bool(merge_partial_at_shutdown)
        self.max_staleness = max_staleness
        self.robust = robust if robust is not None else RobustPolicy()
        self.task_expiry_versions = int(task_expiry_versions)
        self.max_outstanding = int(max_outstanding)
        self.version = int(initial_version)
        self.closed = False
        self.policy_changes: List[Tuple[str, Any, Any]] = []  # what load_state_dict found changed

        self.devices: Dict[str, _Device] = {}
        self._outstanding: Dict[str, _TaskRecord] = {}   # insertion order = issue order
        self._recent: "OrderedDict[str, str]" = OrderedDict()  # recently spent task id -> "delivered" | "expired"
        self._task_counter = 0
        self.task_prefix = ""          # e.g. the hub's run id: task ids unique across runs
        self._values: Dict[int, tuple] = {}  # tier -> (version, read-only values) shared by that version's tasks
        self._buffer: List[_Buffered] = []
        # FTTE's per-base step budget: the step the updates of each base version took so far
        # (MergeReport.base_steps, summed). Only versions still in flight (an outstanding task or a
        # buffered update) are kept, so it never holds more than the tasks do.
        self._base_steps: Dict[int, float] = {}
        window = max(self.robust.clip_window, strategy.buffer_size)  # the buffer being merged is always inside
        self._norms = RunningMedian(window)
        # tiered: each tier above 0 clips against its own running median (an update of the full
        # model is naturally larger than one of w*; one median would clip every big-tier update)
        self._tier_norms: Dict[int, RunningMedian] = {}
        self._sample_counts = RunningMedian(window)
        self._drops: deque = deque(maxlen=DROP_LOG_LIMIT)  # not yet taken by take_dropped()
        self._call_drops: List[Dropped] = []               # drops made during the current event

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
        self.after_end = 0                    # updates that arrived after the run ended: not judged, not rejections
        self.dropped: Counter = Counter()     # accepted (acknowledged), then dropped by a refused/failed merge
        self.merge_failures = 0
        self.clipped = 0                      # merged updates whose norm was clipped
        self.samples_capped = 0               # accepted updates whose num_samples was capped
        self.bytes_in = 0
        self.bytes_out = 0
        self.tasks_issued = 0
        self.history: deque = deque(maxlen=HISTORY_LIMIT)  # the newest MergeReports

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
            "rejected_by_reason": dict(self.rejected), "after_end": self.after_end,
            "dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(self.dropped), "merge_failures": self.merge_failures,
            "clipped": self.clipped, "samples_capped": self.samples_capped, "tasks_issued": self.tasks_issued,
            "outstanding_tasks": len(self._outstanding), "buffered": len(self._buffer),
            "devices_present": sum(d.present for d in self.devices.values()),
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
        }

    def count_bytes(self, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """Transport-measured traffic (the driver cannot know framing and encryption overhead)."""
        self.bytes_in += int(bytes_in)
        self.bytes_out += int(bytes_out)

    def take_dropped(self) -> List[Dropped]:
        """Accepted updates dropped by refused or failed merges since the last call (one log line each)."""
        out = list(self._drops)
        self._drops.clear()
        return out

    # -- policy ----------------------------------------------------------------------------------
    def policy(self) -> Dict[str, Any]:
        """Everything that decides what this driver accepts and how it merges (JSON-able).

        Saved in ``state_dict()["meta"]["policy"]``; compare a checkpoint's with
        ``policy_differences`` before resuming under this one.
        """
        cfg = self.task_config
        task = cfg.as_dict() if hasattr(cfg, "as_dict") else dict(vars(cfg))
        return {
            "strategy": self.strategy.params(), "max_versions": self.max_versions,
            "max_staleness": self.max_staleness, "merge_partial_at_shutdown": self.merge_partial_at_shutdown,
            "seed": self.seed, "task_expiry_versions": self.task_expiry_versions,
            "max_outstanding": self.max_outstanding, "robust": self.robust.as_dict(),
            "task_config": json.loads(json.dumps(task)),
        }

    def policy_differences(self, saved: Optional[Mapping[str, Any]]) -> List[Tuple[str, Any, Any]]:
        """(key, saved value, this driver's value) for every setting that differs, keys dotted
        ("strategy.buffer_size", "task_config.lr"), sorted. A key missing on one side shows as None."""
        old, new = _flatten(saved or {}), _flatten(self.policy())
        return [(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]

    # -- events ----------------------------------------------------------------------------------
    def device_joined(self, device_id: str, info: Optional[Mapping[str, Any]] = None) -> None:
        """A device is present. ``info["samples"]`` (or ``"num_samples"``), if given, is the sample
        count it declares: its updates' ``num_samples`` are capped by it."""
        dev = self.devices.get(device_id)
        if dev is None:
            dev = self.devices[device_id] = _Device(dict(info or {}))
        else:
            dev.present = True
            if info:
                dev.info.update(info)
        declared = declared_samples(info)
        if declared is not None:
            dev.declared = declared

    def device_gone(self, device_id: str) -> Optional[MergeReport]:
        """The device left. Its tasks stay deliverable (semi-async: a late update is just stale).

        FedAvg: it is no longer waited for; if that completes the round, the merge happens here
        and its report is returned.
        """
        self._call_drops = []
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
        tier = 0
        if self.strategy.tiers:
            tier = self.strategy.tier_for_budget(self.devices[device_id].info.get("memory_budget"))
            if tier is None:
                return None  # its budget holds not even the smallest tier: it sits out
        if self.strategy.synchronous:
            if device_id in self._cohort:
                # it lost its task (e.g. restarted): reissue at the round's version, superseding the old one
                self._drop_outstanding(device_id, self._round)
            elif not self._cohort_open or len(self._cohort) >= self.strategy.buffer_size:
                return None
            self._cohort.add(device_id)
            if len(self._cohort) >= self.strategy.buffer_size:
                self._cohort_open = False
        return self._issue(device_id, tier)

    def update_arrived(self, device_id: str, update: Update, nbytes: Optional[int] = None) -> Arrival:
        self._call_drops = []
        if nbytes is not None:
            self.bytes_in += int(nbytes)
        if self.closed:
            return self._reject(device_id, "shutdown", "the driver has shut down", "")
        if not isinstance(update, Update):
            return self._reject(device_id, "malformed", f"expected an Update, got {type(update).__name__}", "")
        tid = update.task_id or self._guess_task(device_id, update)
        rec = self._outstanding.get(tid)
        if rec is None:
            spent = self._recent.get(tid)
            if spent == "delivered":
                return self._reject(device_id, "duplicate", f"task {tid!r} was already delivered", tid)
            if spent == "expired":
                return self._reject(device_id, "late", f"task {tid!r} expired before it was delivered", tid)
            n = _task_number(tid, self.task_prefix)
            if n is not None and n <= self._task_counter:
                return self._reject(device_id, "late", f"task {tid!r} is no longer outstanding "
                                    f"(delivered or expired long ago)", tid)
            return self._reject(device_id, "unknown_task", f"no task {tid[:40]!r} is outstanding", tid)
        if rec.device_id != device_id or (update.device_id and update.device_id != device_id):
            return self._reject(device_id, "wrong_device", f"task {tid!r} belongs to {rec.device_id!r}", tid)
        # from here on the task is spent, whatever the verdict: one delivery per task
        del self._outstanding[tid]
        self._remember(tid, "delivered")
        verdict = self._judge(device_id, update, rec, tid)
        if isinstance(verdict, Arrival):
            if self.strategy.synchronous and rec.round == self._round and device_id in self._cohort:
                # it delivered, badly: the round must not wait for it (asking again would only
                # get it the same task again, and a faulty device would hold the round forever)
                self._cohort.discard(device_id)
                self._cohort_open = False
                verdict.merge = self._maybe_end_round()
                verdict.dropped = list(self._call_drops)
            return verdict
        tau, norm = verdict

        samples = self._capped_samples(device_id, int(update.num_samples))
        self._norm_window(rec.tier).add(norm)
        self._sample_counts.add(samples)
        self.accepted += 1
        if device_id in self.devices:
            self.devices[device_id].accepted += 1
        self._buffer.append(_Buffered(update, norm, samples, tid, device_id, rec.tier))
        report = None
        if self.strategy.synchronous:
            self._cohort.discard(device_id)
            self._cohort_open = False  # the round has started delivering: no new members
            report = self._maybe_end_round()
        elif len(self._buffer) >= self.strategy.buffer_size:
            report = self._merge(partial=False)
        return Arrival(True, task_id=tid, staleness=tau, merge=report, samples=samples,
                       dropped=list(self._call_drops))

    def _judge(self, device_id: str, update: Update, rec: "_TaskRecord", tid: str):
        """A rejection ``Arrival`` for a spent task's update, or (staleness, decoded norm) if it may be buffered."""
        if update.base_version != rec.base_version:
            return self._reject(device_id, "version", f"task {tid!r} was at version {rec.base_version}, "
                                f"the update claims {update.base_version}", tid)
        if self.done:
            return self._reject(device_id, "done", f"the run reached max_versions={self.max_versions}", tid)
        try:
            check_update(update, self.model, self.tiers[rec.tier], self.version, bits=self.strategy.bits,
                         fingerprint=self._tier_fingerprints[rec.tier])
        except UpdateRejected as e:
            return self._reject(device_id, e.reason, str(e), tid)
        tau = self.version - update.base_version
        if self.max_staleness is not None and tau > self.max_staleness:
            return self._reject(device_id, "too_stale", f"staleness {tau} exceeds max_staleness={self.max_staleness}", tid)
        if self.strategy.synchronous and (rec.round != self._round or device_id not in self._cohort):
            return self._reject(device_id, "late", f"task {tid!r} belongs to round {rec.round}, which has ended", tid)
        norm, peak = measure_update(update)
        if not (math.isfinite(norm) and math.isfinite(peak)):
            return self._reject(device_id, "non_finite", "the decoded delta is not finite", tid)
        if peak > self.robust.max_abs_delta:
            return self._reject(device_id, "overflow", f"a decoded delta value is {peak:.3g}, beyond the bound "
                                f"{self.robust.max_abs_delta:g} (a huge row scale?)", tid)
        return tau, norm

    def shutdown(self) -> Optional[MergeReport]:
        """Stop: no more tasks or merges. Merges a partial buffer first if configured to."""
        self._call_drops = []
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
        included: the caller checkpoints it (ONNX or state arrays) alongside. Its size is bounded:
        spent task ids are kept only for the newest ``RECENT_TASKS`` (older ones are recognised
        from the task counter), outstanding tasks expire (``task_expiry_versions``,
        ``max_outstanding``) and the running medians hold a fixed window.
        """
        meta = {
            "format": STATE_FORMAT, "strategy": self.strategy.name, "subset_fingerprint": self.fingerprint,
            "version": self.version, "round": self._round, "task_counter": self._task_counter,
            "outstanding": {t: [r.device_id, r.base_version, r.round] + ([r.tier] if r.tier else [])
                            for t, r in self._outstanding.items()},
            "recent_tasks": [[t, why] for t, why in self._recent.items()],
            "cohort": sorted(self._cohort), "cohort_open": self._cohort_open,
            "merges": self.merges, "merged_updates": self.merged_updates, "staleness_sum": self._staleness_sum,
            "accepted": self.accepted, "rejected": dict(self.rejected), "after_end": self.after_end,
            "dropped": dict(self.dropped),
            "merge_failures": self.merge_failures, "clipped": self.clipped, "samples_capped": self.samples_capped,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "tasks_issued": self.tasks_issued,
            "closed": self.closed, "norm_window": self._norms.to_list(), "sample_window": self._sample_counts.to_list(),
            **({"tier_norm_windows": {str(t): w.to_list() for t, w in sorted(self._tier_norms.items())}}
               if self._tier_norms else {}),
            "buffer_samples": [b.samples for b in self._buffer],
            **({"base_steps": [[b, x] for b, x in sorted(self._base_steps.items())]} if self._base_steps else {}),
            "declared_samples": {d: dev.declared for d, dev in self.devices.items() if dev.declared is not None},
            # tiered: each device's budget decides its tier, so a journal replay issues the same tasks
            **({"device_budgets": {d: int(b) for d, dev in self.devices.items()
                                   if isinstance(b := dev.info.get("memory_budget"), (int, np.integer))
                                   and not isinstance(b, bool)}} if self.strategy.tiers else {}),
            "policy": self.policy(),
        }
        return {"meta": meta, "buffer": [b.update.to_bytes() for b in self._buffer]}

    def load_state_dict(self, state: Mapping[str, Any], on_policy_change: str = "apply") -> List[Tuple[str, Any, Any]]:
        """Resume from ``state_dict()`` (the model must already hold the checkpointed values).

        Returns ``policy_differences(saved policy)``: the settings in which this driver (built
        by the caller) differs from the checkpointed run; also kept in ``self.policy_changes``.
        ``on_policy_change="apply"`` resumes under this driver's policy (the caller logs each
        difference); ``"error"`` raises ValueError naming them and changes nothing. A format-1
        checkpoint recorded no policy: nothing to compare, returns [].
        """
        from .update import Update

        if on_policy_change not in ("apply", "error"):
            raise ValueError(f"on_policy_change must be 'apply' or 'error', got {on_policy_change!r}")
        meta = state["meta"]
        fmt = meta.get("format")
        if fmt not in (1, STATE_FORMAT):
            raise ValueError(f"unknown driver checkpoint format {fmt!r}")
        if meta["strategy"] != self.strategy.name or meta["subset_fingerprint"] != self.fingerprint:
            raise ValueError(f"checkpoint is for {meta['strategy']} on subset {meta['subset_fingerprint']}, "
                             f"this driver runs {self.strategy.name} on {self.fingerprint}")
        if meta["version"] < self.version:
            raise ValueError(f"checkpoint version {meta['version']} is behind this driver's {self.version}")
        diffs = self.policy_differences(meta["policy"]) if "policy" in meta else []
        if diffs and on_policy_change == "error":
            raise ValueError("the checkpoint's policy differs from this run's: " + "; ".join(
                f"{k} {old!r} -> {new!r}" for k, old, new in diffs))
        version = int(meta["version"])
        buffer = [Update.from_bytes(b) for b in state["buffer"]]
        for u in buffer:
            tier = self._tier_of(u)
            check_update(u, self.model, self.tiers[tier], version, bits=self.strategy.bits,
                         fingerprint=self._tier_fingerprints[tier])
        samples = meta.get("buffer_samples") or [u.num_samples for u in buffer]
        if len(samples) != len(buffer):
            raise ValueError(f"checkpoint holds {len(buffer)} buffered updates but {len(samples)} sample counts")
        self.version = version
        self._buffer = [_Buffered(u, measure_update(u)[0], int(n), u.task_id, u.device_id, self._tier_of(u))
                        for u, n in zip(buffer, samples)]
        self._round, self._task_counter = int(meta["round"]), int(meta["task_counter"])
        self._outstanding = {t: _TaskRecord(str(rec[0]), int(rec[1]), int(rec[2]), int(rec[3]) if len(rec) > 3 else 0)
                             for t, rec in meta["outstanding"].items()}
        recent = meta["recent_tasks"] if fmt != 1 else list(meta["consumed"].items())
        self._recent = OrderedDict((str(t), str(why)) for t, why in recent[-RECENT_TASKS:])
        self._cohort, self._cohort_open = set(meta["cohort"]), bool(meta["cohort_open"])
        self.merges, self.merged_updates = int(meta["merges"]), int(meta["merged_updates"])
        self._staleness_sum, self.accepted = int(meta["staleness_sum"]), int(meta["accepted"])
        self.rejected = Counter(meta["rejected"])
        self.after_end = int(meta.get("after_end", 0))
        self.dropped = Counter(meta.get("dropped", {}))
        self.merge_failures = int(meta.get("merge_failures", 0))
        self.clipped, self.samples_capped = int(meta.get("clipped", 0)), int(meta.get("samples_capped", 0))
        self.bytes_in, self.bytes_out = int(meta["bytes_in"]), int(meta["bytes_out"])
        self.tasks_issued, self.closed = int(meta["tasks_issued"]), bool(meta["closed"])
        window = max(self.robust.clip_window, self.strategy.buffer_size)
        norms = meta.get("norm_window", [b.norm for b in self._buffer if b.tier == 0])
        self._norms = RunningMedian(window, norms)
        self._tier_norms = {int(t): RunningMedian(window, w) for t, w in meta.get("tier_norm_windows", {}).items()}
        self._sample_counts = RunningMedian(window, meta.get("sample_window", [b.samples for b in self._buffer]))
        for d, n in meta.get("declared_samples", {}).items():
            self.devices.setdefault(d, _Device(present=False)).declared = int(n)
        for d, b in meta.get("device_budgets", {}).items():
            self.devices.setdefault(d, _Device(present=False)).info["memory_budget"] = int(b)
        # a checkpoint from before the per-base budget has no ledger: every version in flight then
        # starts with its whole budget again (at most one more budget's step each, once)
        self._base_steps = {int(b): float(x) for b, x in meta.get("base_steps", [])}
        self._prune_base_steps()
        self._values = {}
        self.policy_changes = diffs
        return diffs

    # -- internals -------------------------------------------------------------------------------
    def current_values(self, tier: Optional[int] = None) -> Dict[str, np.ndarray]:
        """The subset's values (a tier's, tiered) at the current version, computed once per version
        and shared read-only. ``tier`` None: the whole trained subset (the largest tier)."""
        key = len(self.tiers) - 1 if tier is None else int(tier)
        cached = self._values.get(key)
        if cached is None or cached[0] != self.version:
            vals = subset_values(self.model, self.tiers[key])
            for v in vals.values():
                v.setflags(write=False)
            cached = self._values[key] = (self.version, vals)
        return cached[1]

    def _norm_window(self, tier: int) -> RunningMedian:
        if tier == 0:
            return self._norms
        window = max(self.robust.clip_window, self.strategy.buffer_size)
        return self._tier_norms.setdefault(int(tier), RunningMedian(window))

    def tier_index(self, subset_fingerprint: str) -> int:
        """Which tier a subset fingerprint names (0 when it names none: single-subset strategies)."""
        fps = self._tier_fingerprints
        return fps.index(subset_fingerprint) if subset_fingerprint in fps else 0

    def _tier_of(self, update: Update) -> int:
        return self.tier_index(update.subset_fingerprint)

    def _issue(self, device_id: str, tier: int = 0) -> Task:
        while len(self._outstanding) >= self.max_outstanding:  # the oldest first: insertion order
            self._expire(next(iter(self._outstanding)))
        self._task_counter += 1
        tid = f"{self.task_prefix}t{self._task_counter}"
        self._outstanding[tid] = _TaskRecord(device_id, self.version, self._round, tier)
        self.tasks_issued += 1
        self.devices[device_id].tasks_issued += 1
        return Task(id=tid, device_id=device_id, base_version=self.version, values=self.current_values(tier),
                    config=self.task_config, seed=_task_seed(self.seed, self._task_counter),
                    bits=self.strategy.bits, subset=self.tiers[tier], subset_fingerprint=self._tier_fingerprints[tier])

    def _remember(self, tid: str, why: str) -> None:
        self._recent[tid] = why
        self._recent.move_to_end(tid)
        while len(self._recent) > RECENT_TASKS:
            self._recent.popitem(last=False)

    def _expire(self, tid: str) -> None:
        del self._outstanding[tid]
        self._remember(tid, "expired")

    def _expire_old_tasks(self) -> None:
        """Tasks issued ``task_expiry_versions`` or more versions ago (issue order = version order)."""
        limit = self.version - self.task_expiry_versions
        while self._outstanding:
            tid = next(iter(self._outstanding))
            if self._outstanding[tid].base_version > limit:
                break
            self._expire(tid)

    def _capped_samples(self, device_id: str, n: int) -> int:
        """num_samples, capped by the fleet-wide cap, the device's declared count and a multiple of
        the running median of accepted counts (once MIN_HISTORY counts are known)."""
        cap = self.robust.max_samples
        dev = self.devices.get(device_id)
        if dev is not None and dev.declared is not None:
            cap = min(cap, dev.declared)
        ref = self._sample_counts.reference()
        if self.robust.sample_multiple and ref is not None and len(self._sample_counts) >= MIN_HISTORY:
            cap = min(cap, max(1, int(self.robust.sample_multiple * ref)))
        if n > cap:
            self.samples_capped += 1
            return cap
        return n

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
            self._expire(tid)

    def _reject(self, device_id: str, reason: str, message: str, tid: str) -> Arrival:
        if reason in AFTER_END:  # the run was over when it came: says nothing about the update or its device
            self.after_end += 1
            return Arrival(False, reason=reason, message=message, task_id=tid)
        self.rejected[reason] += 1
        dev = self.devices.get(device_id)
        if dev is not None:
            dev.rejected += 1
        return Arrival(False, reason=reason, message=message, task_id=tid)

    def _drop(self, entries: List["_Buffered"], reason: str, message: str) -> None:
        for e in entries:
            self.dropped[reason] += 1
            d = Dropped(e.task_id or e.update.task_id, e.device_id or e.update.device_id, reason, message)
            self._drops.append(d)
            self._call_drops.append(d)

    def _maybe_end_round(self) -> Optional[MergeReport]:
        """FedAvg: the round ends when no member is still owed (closed, or everyone left)."""
        if self._cohort:
            return None
        if self._cohort_open and not self._buffer:
            return None  # nobody has joined or delivered yet
        report = None
        if self._buffer and not self.done:
            report = self._merge(partial=len(self._buffer) < self.strategy.buffer_size)
        self._buffer.clear()
        self._new_round()
        return report

    def _new_round(self) -> None:
        self._round += 1
        self._cohort = set()
        self._cohort_open = True
        for tid in [t for t, r in self._outstanding.items() if r.round < self._round]:
            self._expire(tid)  # FedAvg never merges an old round's update

    def _subset_finite(self) -> bool:
        return all(np.all(np.isfinite(view[rows] if rows is not None else view))
                   for _k, _l, view, rows in self.subset.tensors(self.model))

    def _merge(self, partial: bool) -> Optional[MergeReport]:
        """Merge the buffer, all or nothing. A merge refused as non-finite drops its culprits (or the
        whole buffer) and keeps the version; the rest merge now if they still may (a partial merge,
        FedAvg, or still >= K), else they wait. A merge that raises drops the buffer. Every dropped
        update is a ``Dropped`` (``Arrival.dropped``, ``take_dropped()``); the run goes on."""
        while self._buffer:
            entries = list(self._buffer)
            clip = np.ones(len(entries))
            for tier in {e.tier for e in entries}:
                idx = [k for k, e in enumerate(entries) if e.tier == tier]
                clip[idx] = clip_factors([entries[k].norm for k in idx], self._norm_window(tier).reference(),
                                         self.robust.clip_multiple)
            before = self.current_values()  # to undo any write of a strategy that fails half-way
            try:
                report = self.strategy.merge(self.model, self.subset, [e.update for e in entries], self.version,
                                             samples=[e.samples for e in entries], clip=clip,
                                             base_steps=self._base_steps)
                if not self._subset_finite():
                    raise MergeRefused(f"{self.strategy.name}: the merged model holds NaN or Inf; the model is kept")
            except MergeRefused as e:
                load_values(self.model, self.subset, before)
                self.merge_failures += 1
                bad = set(e.culprits) or set(range(len(entries)))
                self._drop([entries[k] for k in sorted(bad)], "merge_nonfinite", _one_line(e))
                self._buffer = [x for k, x in enumerate(entries) if k not in bad]
                if not (partial or self.strategy.synchronous) and len(self._buffer) < self.strategy.buffer_size:
                    return None
                continue
            except Exception as e:  # a strategy bug must not stall the run: drop the buffer, keep the version
                load_values(self.model, self.subset, before)
                self.merge_failures += 1
                self._drop(entries, "merge_failed", f"{self.strategy.name} merge failed: {type(e).__name__}: "
                           f"{_one_line(e)}")
                self._buffer = []
                return None
            self._buffer = []
            report.partial = partial or len(entries) < self.strategy.buffer_size
            report.norms = [e.norm for e in entries]
            if self.strategy.tiers:
                report.tiers = [int(e.tier) for e in entries]
            self.clipped += int(sum(c < 1.0 for c in report.clip))
            self.version += 1
            report.version = self.version
            self.merges += 1
            self.merged_updates += len(entries)
            self._staleness_sum += sum(report.staleness)
            self.history.append(report)
            for b, step in report.base_steps.items():
                self._base_steps[int(b)] = self._base_steps.get(int(b), 0.0) + float(step)
            self._expire_old_tasks()
            self._prune_base_steps()
            return report
        return None

    def _prune_base_steps(self) -> None:
        """Forget the step ledger of base versions no outstanding task or buffered update has: no
        update from them can arrive any more (tasks are issued at the current version only)."""
        if not self._base_steps:
            return
        live = {r.base_version for r in self._outstanding.values()} | {b.update.base_version for b in self._buffer}
        self._base_steps = {b: x for b, x in self._base_steps.items() if b in live}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _task_number(tid: str, prefix: str = "") -> Optional[int]:
    """The counter value of a task id this driver issues ("<prefix>t17" -> 17), else None."""
    if not isinstance(tid, str) or not tid.startswith(prefix):
        return None
    tid = tid[len(prefix):]
    if 1 < len(tid) <= 20 and tid[0] == "t" and tid[1:].isdigit():
        return int(tid[1:])
    return None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


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
