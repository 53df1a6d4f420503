"""The round driver plus what makes its decisions durable: the journal and per-agent counts.

Sessions (fleet.py) call ``joined``, ``task_for``, ``update_from``, ``malformed_from`` and
``gone``; each call that changes the driver's state is journaled before it returns
(checkpoint.py), so a restarted hub replays the same calls over the last checkpoint and ends in
the same state. No sockets here.

A failure here is never one peer's fault: a journal that cannot be written (disk full, out of
file descriptors, permissions) or a round driver that raises means the run cannot go on safely,
so it is raised as ``RunFailure`` (one line) and ends the run, instead of costing one session.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Dict, Optional

from ftte_core.robust import declared_samples
from ftte_core.scheduler import AFTER_END, Arrival, RoundDriver, Task
from ftte_core.strategies import MergeReport
from ftte_core.update import Update, UpdateError

from .checkpoint import CheckpointError, Journal, journal_path, read_journal
from .logs import event


class RunFailure(Exception):
    """The run cannot go on (local I/O failure, a failing round driver); one line for a person."""


def io_failure(what: str, e: OSError) -> RunFailure:
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return RunFailure(f"cannot {what}{where}: {e.strerror or e}")


async def make_durable(journal: Optional[Journal], seq: int) -> None:
    """Wait until journal record ``seq`` is on disk (before its ACK); RunFailure if it cannot be."""
    if journal is None or not seq:
        return
    try:
        await journal.sync(seq)
    except OSError as e:
        raise io_failure("sync the journal", e) from None


def _driver_failure(what: str, e: Exception) -> RunFailure:
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return RunFailure(f"the round driver failed {what}: {type(e).__name__}: {msg}")


def new_agent_stats(name: str = "") -> Dict[str, Any]:
    """Per-agent counts (saved in the checkpoint). Added when first needed, so older checkpoints load:
    ``rejected_by_reason`` (reason -> count), ``staleness_sum`` (over accepted updates),
    ``update_bytes`` (UPDATE bodies received), ``dropped``, ``not_used``/``not_used_reason``."""
    return {"name": name, "tasks": 0, "accepted": 0, "rejected": 0, "samples": 0, "failed": 0}


def count_reason(st: Dict[str, Any], reason: str) -> None:
    by_reason = st.setdefault("rejected_by_reason", {})
    by_reason[reason] = by_reason.get(reason, 0) + 1


class Coordinator:
    def __init__(self, driver: RoundDriver, out_dir, agents: Optional[Dict[str, Dict[str, Any]]] = None):
        self.driver = driver
        self.out_dir = out_dir
        self.agents: Dict[str, Dict[str, Any]] = agents if agents is not None else {}
        self.journal: Optional[Journal] = None
        self.replaying = False
        # called synchronously right after a merge (the model already holds the new version)
        self.on_merge: Callable[[MergeReport], None] = lambda report: None

    def stats_for(self, agent_id: str) -> Dict[str, Any]:
        st = self.agents.get(agent_id)
        if st is None:
            st = self.agents[agent_id] = new_agent_stats()
        return st

    # -- journal ---------------------------------------------------------------------------------
    def open_journal(self) -> None:
        """Start logging events of the current version (after a checkpoint at this version)."""
        old = self.journal
        try:
            self.journal = Journal(journal_path(self.out_dir, self.driver.version))
        except OSError as e:
            raise io_failure("open the journal", e) from None
        if old is not None:
            try:
                asyncio.get_running_loop().create_task(old.close())
            except RuntimeError:
                old.close_now()

    def _log(self, header: Dict[str, Any], blob: bytes = b"") -> int:
        if self.replaying or self.journal is None:
            return 0
        try:
            return self.journal.write(header, blob)
        except OSError as e:
            raise io_failure("write the journal", e) from None

    # -- events ----------------------------------------------------------------------------------
    def joined(self, agent_id: str, info: Dict[str, Any]) -> None:
        """A usable agent is in session. Journaled with the sample count it declared: the driver caps
        that device's updates by it, so a replay must know it to weigh them the same way."""
        declared = declared_samples(info)
        budget = info.get("memory_budget")
        tiered = bool(self.driver.strategy.tiers) and isinstance(budget, int) and not isinstance(budget, bool)
        self._log({"e": "join", "dev": agent_id, **({"samples": declared} if declared is not None else {}),
                   # tiered: the budget picks the agent's tier, so a replay must issue the same tasks
                   **({"budget": budget} if tiered else {})})
        try:
            self.driver.device_joined(agent_id, info)
        except Exception as e:
            raise _driver_failure(f"when {agent_id} joined", e) from None

    def task_for(self, agent_id: str) -> Optional[Task]:
        try:
            task = self.driver.device_idle(agent_id)
        except Exception as e:
            raise _driver_failure(f"issuing a task to {agent_id}", e) from None
        if task is not None:
            self._log({"e": "task", "dev": agent_id, "tid": task.id})
            st = self.stats_for(agent_id)
            st["tasks"] += 1
            if self.driver.strategy.tiers:  # ftte-tiered: which tier the agent trains (status, summary)
                st["tier"] = self.driver.tier_index(task.subset_fingerprint)
        return task

    def update_from(self, agent_id: str, update: Update, raw: bytes, nbytes: int):
        """Hand an update to the driver; returns (arrival, journal, seq): await journal.sync(seq) before the ACK."""
        journal = self.journal
        seq = self._log({"e": "update", "dev": agent_id, "nbytes": int(nbytes)}, raw)
        try:
            arrival = self.driver.update_arrived(agent_id, update, nbytes=nbytes)
        except Exception as e:
            raise _driver_failure(f"on an update from {agent_id}", e) from None
        st = self.stats_for(agent_id)
        st["update_bytes"] = st.get("update_bytes", 0) + int(nbytes)
        if arrival.accepted:
            st["accepted"] += 1
            st["samples"] += int(arrival.samples)  # after the driver's caps: an inflated count stays out
            st["staleness_sum"] = st.get("staleness_sum", 0) + int(arrival.staleness or 0)
        elif arrival.reason not in AFTER_END:
            st["rejected"] += 1
            count_reason(st, arrival.reason)
        self._log_dropped(arrival.dropped)
        if arrival.merge is not None:
            if not self.replaying:
                self.open_journal()  # events from here on belong to the new version's checkpoint
            self._merged(arrival.merge)
        return arrival, journal, seq

    def malformed_from(self, agent_id: str, message: str, nbytes: int) -> int:
        """An UPDATE that does not parse: the driver counts it (journaled so a replay counts it too)."""
        seq = self._log({"e": "malformed", "dev": agent_id, "nbytes": int(nbytes), "msg": message[:200]})
        try:
            self.driver.update_arrived(agent_id, None, nbytes=nbytes)  # rejected as "malformed"
        except Exception as e:
            raise _driver_failure(f"on a malformed update from {agent_id}", e) from None
        st = self.stats_for(agent_id)
        st["rejected"] += 1
        count_reason(st, "malformed")
        st["update_bytes"] = st.get("update_bytes", 0) + int(nbytes)
        return seq

    def _log_dropped(self, dropped) -> None:
        """Acknowledged updates that a refused or failed merge dropped: one line each, counted per agent."""
        for d in list(dropped or ()) + self.driver.take_dropped():
            st = self.stats_for(d.device_id)
            st["dropped"] = st.get("dropped", 0) + 1
            if not self.replaying:
                event("update_dropped", f"update {d.task_id} from {st.get('name') or d.device_id} dropped at the "
                      f"merge ({d.reason}): {d.message}", logging.WARNING)

    def _merged(self, report: MergeReport) -> None:
        try:
            self.on_merge(report)
        except RunFailure:
            raise
        except OSError as e:
            raise io_failure("record the merge", e) from None
        except Exception as e:
            raise RunFailure(f"after merging version {report.version}: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from None

    def gone(self, agent_id: str) -> Optional[MergeReport]:
        self._log({"e": "gone", "dev": agent_id})
        try:
            report = self.driver.device_gone(agent_id)
        except Exception as e:
            raise _driver_failure(f"when {agent_id} left", e) from None
        self._log_dropped(())
        if report is not None:
            if not self.replaying:
                self.open_journal()
            self._merged(report)
        return report

    # -- replay ----------------------------------------------------------------------------------
    def replay(self, version: int) -> int:
        """Re-run the events of journal ``version`` (after the checkpoint at that version); returns events."""
        path = journal_path(self.out_dir, version)
        self.replaying = True
        n = 0
        try:
            for header, blob in read_journal(path):
                kind, dev = header.get("e"), str(header.get("dev", ""))
                if kind == "task":
                    task = self.task_for(dev)
                    if task is None or task.id != header.get("tid"):
                        raise CheckpointError(f"journal {path}: task {header.get('tid')!r} for {dev!r} does not "
                                              f"replay (got {task.id if task else None!r}); the checkpoint and "
                                              f"journal disagree")
                elif kind == "update":
                    try:
                        update = Update.from_bytes(blob)
                    except UpdateError as e:
                        raise CheckpointError(f"journal {path}: stored update does not parse ({e})") from None
                    self.update_from(dev, update, blob, int(header.get("nbytes", len(blob))))
                elif kind == "gone":
                    self.gone(dev)
                elif kind == "join":
                    samples, budget = header.get("samples"), header.get("budget")
                    self.joined(dev, {**({"samples": samples} if isinstance(samples, int) else {}),
                                      **({"memory_budget": budget} if isinstance(budget, int) else {})})
                elif kind == "malformed":
                    self.malformed_from(dev, str(header.get("msg", "")), int(header.get("nbytes", 0)))
                else:
                    raise CheckpointError(f"journal {path}: unknown event {kind!r}")
                n += 1
        finally:
            self.replaying = False
        return n


def log_rejection(agent: str, arrival: Arrival) -> None:
    if arrival.reason in AFTER_END:
        event("update_after_end", f"update {arrival.task_id or '?'} from {agent} came after the run ended "
              f"({arrival.reason}); not used", logging.INFO)
        return
    event("update_rejected", f"update {arrival.task_id or '?'} from {agent} rejected ({arrival.reason}): "
          f"{arrival.message}", logging.WARNING)
