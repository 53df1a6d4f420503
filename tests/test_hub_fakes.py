"""Fake agents for the hub tests: asyncio servers speaking Channel + messages, training with LocalWorker.

No tests here; test_hub*.py import it. Each fake can misbehave in one way (``behaviour``).
"""
from __future__ import annotations

import asyncio
import os
from typing import List, Optional, Tuple

import numpy as np

from ftte_core import data as ftdata
from ftte_core import downlink as DL
from ftte_core import messages as M
from ftte_core.channel import Channel, ChannelError
from ftte_core.local import LocalWorker
from ftte_core.modelfile import content_hash, model_from_bytes
from ftte_core.subset import Subset
from ftte_core.update import Update, subset_values
from slowdev import scaled

BEHAVIOURS = ("good", "garbage", "nan", "wrong_shape", "silent", "bad_info", "raw_garbage", "unexpected", "fails", "slow")


def digits_split(n_agents: int, seed: int = 0):
    """(validation Dataset, [per-agent Dataset]) from the bundled digits, label-skewed."""
    ds = ftdata.load_bundled("digits")
    train, val = ftdata.train_val_split(ds, val_fraction=0.2, seed=seed)
    parts = ftdata.partition_dirichlet(train, n_agents, alpha=1.0, seed=seed, min_size=20)
    return val, parts


class FakeAgent:
    def __init__(self, key: bytes, data: Optional[ftdata.Dataset], agent_id: str, budget: int = 64 << 20,
                 behaviour: str = "good", models: Optional[List[str]] = None, pending: Optional[List[bytes]] = None,
                 downlink: str = "off", delay: float = 0.05, model_format: Optional[int] = None):
        assert behaviour in BEHAVIOURS, behaviour
        self.delay = delay                    # behaviour "slow": seconds added to every task
        # behaviour "slow" with lag_behind = (other agents, n): hold each task until the others have
        # sent n more updates (at most `delay` s), so that it comes back versions behind whatever
        # the machine's speed (a fixed sleep does not: under emulation a merge may outlast it)
        self.lag_behind: Optional[Tuple[List["FakeAgent"], int]] = None
        self.updates_sent = 0
        # lose: forgets what it holds every third task; chains: an agent from before direct steps
        assert downlink in ("off", "on", "lose", "chains"), downlink
        self.downlink = downlink
        self.model_format = model_format      # the newest model file version it says it reads (None: says nothing)
        self.held: Optional[DL.Held] = None
        self.frames: List[str] = []           # kind of every downlink frame received ("snapshot", "delta", "direct")
        self.resyncs = 0
        self.blobs = {}                       # hash -> model file bytes (the origin of a stream)
        self.key, self.data, self.agent_id, self.budget, self.behaviour = key, data, agent_id, budget, behaviour
        self.models = {}                      # hash -> Model (its "state dir")
        self.announce = list(models or [])
        self.pending = list(pending or [])    # update bytes to deliver on connect
        self.acks: List[dict] = []
        self.not_used: Optional[dict] = None
        self.stopped: Optional[str] = None
        self.tasks = 0
        self.subsets: List[dict] = []         # the subset of every TASK (ftte-tiered: the agent's tier)
        self.model_downloads = 0
        self.connections = 0
        self.server = None
        self.port = 0
        self._handlers = set()

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for t in list(self._handlers):
                t.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self.server.wait_closed()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, reader, writer):
        self._handlers.add(asyncio.current_task())
        try:
            ch = await Channel.open(reader, writer, "server", self.key, timeout=scaled(5))
        except ChannelError:
            writer.close()
            return
        self.connections += 1
        try:
            await self._serve(ch)
        except (ChannelError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(asyncio.current_task())
            ch.abort()

    async def _serve(self, ch: Channel):
        if self.behaviour == "raw_garbage":  # bytes that are no frame at all
            ch.writer.write(os.urandom(300))
            await ch.writer.drain()
            await ch.recv(timeout=scaled(5))
            return
        if self.behaviour == "bad_info":
            await ch.send(M.AGENT_INFO, b'{"agent_id": 7}')
            await ch.recv(timeout=scaled(5))
            return
        info = {"agent_id": self.agent_id, "name": f"fake-{self.agent_id}", "protocol": 1,
                "memory_budget": self.budget, "speed": 1.0, "slowdown": 1.0,
                "models": self.announce + list(self.models), "pending": len(self.pending),
                "num_samples": 0 if self.data is None else len(self.data), "arch": "test", "software": "fake"}
        if self.model_format is not None:
            info["model_format"] = self.model_format
        if self.downlink != "off":
            info["downlink"] = {"format": 1, "direct": self.downlink != "chains",
                                **(self.held.describe() if self.held is not None else {})}
        await ch.send(M.AGENT_INFO, M.encode_json(info))
        deferred = []   # what the hub sends while kept updates wait for their ACK (MODEL, TASK): served after
        while self.pending:
            await ch.send(M.UPDATE, self.pending[0])
            while True:
                t, body = await ch.recv(timeout=scaled(10))
                if t == M.ACK:
                    self.acks.append(M.decode_json(body, M.ACK))
                    self.pending.pop(0)
                    break
                if t == M.PING:
                    await ch.send(M.PONG, body)
                else:
                    deferred.append((t, bytes(body)))
        worker = None
        while True:
            t, body = deferred.pop(0) if deferred else await ch.recv(timeout=scaled(60))
            if t == M.PING:
                await ch.send(M.PONG, body)
            elif t == M.MODEL:
                self.model_downloads += 1
                self.models[content_hash(bytes(body))] = model_from_bytes(body)
                self.blobs[content_hash(bytes(body))] = bytes(body)
            elif t == M.TASK:
                task = M.decode_task(body)
                self.tasks += 1
                self.subsets.append(task.subset)
                if self.behaviour == "silent":
                    continue
                if self.behaviour == "fails":
                    await ch.send(M.TASK_FAILED, M.encode_json({"task_id": task.task_id, "message": "out of memory"}))
                    continue
                if self.behaviour == "unexpected":  # a message only a hub may send
                    await ch.send(M.STOP, M.encode_json({"reason": "nonsense"}))
                    continue
                if self.behaviour == "slow":
                    await self._lag()
                if task.downlink is not None and not await self._resolve(ch, task):
                    continue
                model = self.models[task.model_hash]
                if worker is None:
                    worker = LocalWorker(model, Subset.from_dict(model, task.subset))
                res = worker.run(task.values, task.base_version, self.data.x, self.data.y, task.config,
                                 bits=task.bits, seed=task.seed, device_id=self.agent_id)
                res.update.task_id = task.task_id
                await ch.send(M.UPDATE, self._spoil(res.update))
                self.updates_sent += 1
            elif t == M.ACK:
                self.acks.append(M.decode_json(body, M.ACK))
            elif t == M.NOT_USED:
                self.not_used = M.decode_json(body, M.NOT_USED)
            elif t == M.STOP:
                self.stopped = M.decode_json(body, M.STOP)["reason"]
                await ch.close()
                return

    async def _lag(self) -> None:
        if self.lag_behind is None:
            await asyncio.sleep(self.delay)
            return
        others, n = self.lag_behind
        goal = sum(o.updates_sent for o in others) + n
        deadline = asyncio.get_running_loop().time() + self.delay
        while sum(o.updates_sent for o in others) < goal and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    async def _resolve(self, ch: Channel, task) -> bool:
        """As the real agent does: the frame against what it holds; TASK_FAILED resync if it does not fit."""
        self.frames.append(task.downlink.kind)
        if self.downlink == "lose" and self.tasks % 3 == 0:
            self.held = None
        origin = None
        if task.downlink.needs_origin:
            fresh = model_from_bytes(self.blobs[task.model_hash])
            origin = subset_values(fresh, Subset.from_dict(fresh, task.subset))
        try:
            values = DL.resolve(task.downlink, self.held, origin)
        except DL.DownlinkError as e:
            self.held = None
            self.resyncs += 1
            await ch.send(M.TASK_FAILED, M.encode_json({"task_id": task.task_id, "run_id": task.run_id,
                                                         "message": str(e), "downlink": "resync"}))
            return False
        self.held = DL.held_after(task.downlink, values)
        task.values = values
        return True

    def _spoil(self, update: Update) -> bytes:
        b = self.behaviour
        if b == "garbage":
            return os.urandom(200)
        if b == "nan":
            update.tensors[0].scales[0] = np.nan
            return update.to_bytes()
        if b == "wrong_shape":
            t = update.tensors[0]
            t.data, t.scales, t.shape = t.data[:-1], t.scales[:-1], (t.shape[0] - 1, t.shape[1])
            return update.to_bytes()
        return update.to_bytes()
