"""The round driver plus what makes its decisions durable: the journal and per-agent counts.

Sessions (fleet.py) call ``task_for``, ``update_from`` and ``gone``; each call is journaled
before it returns (checkpoint.py), so a restarted hub replays the same calls over the last
checkpoint and ends in the same state. No sockets here.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Dict, Optional

from ftte_core.scheduler import Arrival, RoundDriver, Task
from ftte_core.strategies import MergeReport
from ftte_core.update import Update, UpdateError

from .checkpoint import CheckpointError, Journal, journal_path, read_journal
from .logs import event


def new_agent_stats(name: str = "") -> Dict[str, Any]:
    return {"name": name, "tasks": 0, "accepted": 0, "rejected": 0, "samples": 0, "failed": 0}


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
        self.journal = Journal(journal_path(self.out_dir, self.driver.version))
        if old is not None:
            try:
                asyncio.get_running_loop().create_task(old.close())
            except RuntimeError:
                old.close_now()

    def _log(self, header: Dict[str, Any], blob: bytes = b"") -> int:
        if self.replaying or self.journal is None:
            return 0
        return self.journal.write(header, blob)

    # -- events ----------------------------------------------------------------------------------
    def task_for(self, agent_id: str) -> Optional[Task]:
        task = self.driver.device_idle(agent_id)
        if task is not None:
            self._log({"e": "task", "dev": agent_id, "tid": task.id})
            self.stats_for(agent_id)["tasks"] += 1
        return task

    def update_from(self, agent_id: str, update: Update, raw: bytes, nbytes: int):
        """Hand an update to the driver; returns (arrival, journal, seq): await journal.sync(seq) before the ACK."""
        journal = self.journal
        seq = self._log({"e": "update", "dev": agent_id, "nbytes": int(nbytes)}, raw)
        arrival = self.driver.update_arrived(agent_id, update, nbytes=nbytes)
        st = self.stats_for(agent_id)
        if arrival.accepted:
            st["accepted"] += 1
            st["samples"] += int(update.num_samples)
        else:
            st["rejected"] += 1
        if arrival.merge is not None:
            if not self.replaying:
                self.open_journal()  # events from here on belong to the new version's checkpoint
            self.on_merge(arrival.merge)
        return arrival, journal, seq

    def gone(self, agent_id: str) -> Optional[MergeReport]:
        self._log({"e": "gone", "dev": agent_id})
        report = self.driver.device_gone(agent_id)
        if report is not None:
            if not self.replaying:
                self.open_journal()
            self.on_merge(report)
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
                else:
                    raise CheckpointError(f"journal {path}: unknown event {kind!r}")
                n += 1
        finally:
            self.replaying = False
        return n


def log_rejection(agent: str, arrival: Arrival) -> None:
    event("update_rejected", f"update {arrival.task_id or '?'} from {agent} rejected ({arrival.reason}): "
          f"{arrival.message}", logging.WARNING)
