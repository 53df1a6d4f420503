"""Lightweight fake agents for load tests: many asyncio servers in one process, the real protocol.

Each fake serves one TCP port on 127.0.0.1 and speaks ``ftte_core.channel.Channel`` +
``ftte_core.messages`` exactly as ``ftte-agent`` does (AGENT_INFO first, MODEL once, TASK ->
UPDATE, ACK, PING -> PONG, STOP/ERROR end the session), but does not train: for each subset it
builds one valid int8 update (small non-zero deltas, shapes from the TASK) and re-stamps its
task_id / base_version / device_id per task, so a fake costs the TASK decode, the UPDATE
serialisation and the encryption, nothing more. ``--train-ms`` adds a think time per task.

It records, per task, when its UPDATE was written and when the agent's next TASK arrived (for the
hub's merge-and-redispatch latency), and per connection the message-body bytes against the bytes
on the wire (for the protocol overhead).

    python benchmarks/fake_agents.py --agents 200 --key fleet.key --budget 8MiB --out fakes.json
      prints "ready HOST:PORT HOST:PORT ..." once every port listens, then serves until every fake
      has been told STOP, or SIGTERM/SIGINT, and writes its measurements to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from ftte_core import messages as M
from ftte_core.channel import Channel, ChannelClosed, ChannelError
from ftte_core.modelfile import content_hash
from ftte_core.protocol import PROTOCOL_VERSION, read_key
from ftte_core.search import parse_size
from ftte_core.update import TensorDelta, Update


@dataclass
class FakeStats:
    tasks: int = 0
    updates_sent: int = 0
    accepted: int = 0
    rejected: Dict[str, int] = field(default_factory=dict)
    not_used: int = 0
    models: int = 0
    pings: int = 0
    sessions: int = 0
    stopped: int = 0
    errors: List[tuple] = field(default_factory=list)   # (perf_counter, one-line message)
    body_bytes: int = 0       # message bodies, both directions (what the application asked to move)
    wire_bytes: int = 0       # bytes on the socket, both directions (handshake, framing, tags included)
    unacknowledged_at_stop: int = 0   # UPDATEs still without an ACK when STOP came (a real agent resends them)
    frames: int = 0           # messages, both directions (each costs FRAME_OVERHEAD bytes of framing and tag)


class UpdateTemplates:
    """One encoded delta per subset (by fingerprint), shared by every fake in the process."""

    def __init__(self, seed: int = 0):
        self._rng = np.random.default_rng(seed)
        self._by_subset: Dict[str, List[TensorDelta]] = {}

    def tensors_for(self, task: M.TaskMessage) -> List[TensorDelta]:
        tensors = self._by_subset.get(task.subset_fingerprint)
        if tensors is None:
            tensors = []
            for key, values in task.values.items():
                rows, cols = values.shape
                data = self._rng.integers(-3, 4, size=(rows, cols), dtype=np.int8)
                scales = np.full(rows, 1e-4, dtype=np.float32)  # tiny steps: the global model stays sane
                tensors.append(TensorDelta(key=key, bits=8, data=data, scales=scales, shape=(rows, cols)))
            self._by_subset[task.subset_fingerprint] = tensors
        return tensors


class FakeFleet:
    def __init__(self, n: int, key: bytes, budget: int, train_ms: float = 0.0, num_samples: int = 100,
                 host: str = "127.0.0.1", seed: int = 0, first_id: int = 0):
        self.n, self.key, self.budget, self.host, self.first_id = n, key, budget, host, first_id
        self.train_s = train_ms / 1000.0
        self.num_samples = num_samples
        self.templates = UpdateTemplates(seed)
        self.rng = random.Random(seed)
        self.stats = FakeStats()
        self.update_sent_at: Dict[str, float] = {}   # task id -> perf_counter after its UPDATE was written
        self.next_task_at: Dict[str, float] = {}     # task id -> perf_counter when the agent's next TASK arrived
        self.servers: List[asyncio.base_events.Server] = []
        self.addresses: List[str] = []
        self.all_stopped = asyncio.Event()
        self._stopped_agents = set()
        self._known_models: set = set()

    async def start(self) -> List[str]:
        for i in range(self.first_id, self.first_id + self.n):
            agent_id = f"fake-{i:04d}"
            server = await asyncio.start_server(lambda r, w, a=agent_id: self._serve(a, r, w), self.host, 0,
                                                backlog=64)
            self.servers.append(server)
            self.addresses.append(f"{self.host}:{server.sockets[0].getsockname()[1]}")
        return self.addresses

    async def close(self) -> None:
        for server in self.servers:
            server.close()

    async def _serve(self, agent_id: str, reader, writer) -> None:
        stats = self.stats
        try:
            ch = await Channel.open(reader, writer, "server", self.key, timeout=10)
        except ChannelError as e:
            stats.errors.append((time.perf_counter(), f"{agent_id}: {e}"))
            return
        stats.sessions += 1
        body_bytes = 0
        frames = 0
        previous_task: Optional[str] = None
        unacknowledged: set = set()    # task ids whose UPDATE went out and got no ACK yet

        async def send(msg_type: int, body: bytes) -> None:
            nonlocal body_bytes, frames
            body_bytes += len(body)
            frames += 1
            await ch.send(msg_type, body)

        try:
            await send(M.AGENT_INFO, M.encode_json({
                "agent_id": agent_id, "name": agent_id, "protocol": PROTOCOL_VERSION,
                "memory_budget": self.budget, "speed": 1.0, "slowdown": 1.0, "models": sorted(self._known_models),
                "pending": 0, "num_samples": self.num_samples, "arch": "fake", "software": "fake_agents"}))
            while True:
                msg_type, body = await ch.recv()
                now = time.perf_counter()
                body_bytes += len(body)
                frames += 1
                if msg_type == M.TASK:
                    task = M.decode_task(body)
                    stats.tasks += 1
                    if previous_task is not None:
                        self.next_task_at[previous_task] = now
                    previous_task = task.task_id
                    if self.train_s:
                        await asyncio.sleep(self.train_s * self.rng.uniform(0.5, 1.5))
                    update = Update(base_version=task.base_version, subset_fingerprint=task.subset_fingerprint,
                                    num_samples=self.num_samples, loss=1.0, tensors=self.templates.tensors_for(task),
                                    stats={}, peak_memory_bytes=self.budget // 2, device_id=agent_id,
                                    task_id=task.task_id)
                    await send(M.UPDATE, update.to_bytes())
                    unacknowledged.add(task.task_id)
                    self.update_sent_at[task.task_id] = time.perf_counter()
                    stats.updates_sent += 1
                elif msg_type == M.ACK:
                    ack = M.decode_json(body, M.ACK, {"accepted": bool})
                    unacknowledged.discard(ack.get("task_id"))
                    if ack["accepted"]:
                        stats.accepted += 1
                    else:
                        stats.rejected[ack.get("reason", "?")] = stats.rejected.get(ack.get("reason", "?"), 0) + 1
                elif msg_type == M.MODEL:
                    stats.models += 1
                    self._known_models.add(content_hash(body))
                elif msg_type == M.PING:
                    stats.pings += 1
                    await send(M.PONG, body)
                elif msg_type == M.NOT_USED:
                    stats.not_used += 1
                elif msg_type == M.STOP:
                    stats.stopped += 1
                    stats.unacknowledged_at_stop += len(unacknowledged)
                    self._stopped_agents.add(agent_id)
                    if len(self._stopped_agents) >= self.n:
                        self.all_stopped.set()
                    break
                elif msg_type == M.ERROR:
                    stats.errors.append((time.perf_counter(), f"{agent_id}: hub sent ERROR {body[:200]!r}"))
                    break
        except ChannelClosed:
            pass
        except (ChannelError, M.MessageError) as e:
            stats.errors.append((time.perf_counter(), f"{agent_id}: {e}"))
        finally:
            stats.body_bytes += body_bytes
            stats.wire_bytes += ch.bytes_sent + ch.bytes_received
            stats.frames += frames
            await ch.close()

    def report(self) -> dict:
        s = self.stats
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"cpu_s": usage.ru_utime + usage.ru_stime,"agents": self.n, "tasks": s.tasks, "updates_sent": s.updates_sent, "accepted": s.accepted,
                "rejected": s.rejected, "not_used": s.not_used, "models": s.models, "pings": s.pings,
                "sessions": s.sessions, "stopped": s.stopped,
                "unacknowledged_at_stop": s.unacknowledged_at_stop, "errors": s.errors[:1000], "error_count": len(s.errors),
                "body_bytes": s.body_bytes, "wire_bytes": s.wire_bytes, "frames": s.frames,
                "update_sent_at": self.update_sent_at, "next_task_at": self.next_task_at}


async def serve(args) -> None:
    key = read_key(args.key)
    fleet = FakeFleet(args.agents, key, parse_size(args.budget), args.train_ms, args.num_samples, seed=args.seed,
                      first_id=args.first_id)
    addresses = await fleet.start()
    print("ready " + " ".join(addresses), flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, fleet.all_stopped.set)
    try:
        await asyncio.wait_for(fleet.all_stopped.wait(), args.max_seconds)
    except asyncio.TimeoutError:
        print(f"fake_agents: stopping after --max-seconds {args.max_seconds:g}", file=sys.stderr)
    await asyncio.sleep(0.2)  # let the last sessions add their byte counts
    await fleet.close()
    with open(args.out + ".tmp", "w") as f:
        json.dump(fleet.report(), f)
    os.replace(args.out + ".tmp", args.out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--agents", type=int, default=200, help="fake agents (one port each)")
    p.add_argument("--key", required=True, help="fleet key file")
    p.add_argument("--budget", default="64MiB", help="memory budget every fake reports")
    p.add_argument("--train-ms", type=float, default=0.0, help="mean think time per task in ms (uniform 0.5x-1.5x)")
    p.add_argument("--num-samples", type=int, default=100, help="sample count each update reports")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-id", type=int, default=0, help="agent ids are fake-NNNN from this number on")
    p.add_argument("--max-seconds", type=float, default=600.0, help="give up serving after this many seconds")
    p.add_argument("--out", required=True, help="JSON file for the measurements")
    args = p.parse_args(argv)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
