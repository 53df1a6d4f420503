"""The two misbehaving neighbours of the soak benchmark (benchmarks/soak.py), one process each.

``faulty``: an agent that holds the fleet key but sends bad updates. It serves one TCP port on
127.0.0.1 that the hub dials as a ``--peer``, speaks the real protocol (``ftte_core.channel`` +
``ftte_core.messages``, like benchmarks/fake_agents.py: AGENT_INFO first, MODEL, TASK -> UPDATE,
ACK, PING -> PONG) and answers every TASK with an UPDATE of the right keys and shapes whose
content is bad, the kind changing from task to task (``KINDS``, in a seeded order):

    scale_1e3        int8 levels up to +-127 with a row scale of 1e3 (a large but finite delta)
    scale_1e30       the same with a row scale of 1e30 (its norm overflows float32)
    scale_overflow   row scale 3.4e38: decoding 127 x 3.4e38 overflows to inf
    samples_inflated a small delta claiming num_samples = 2**61 (it would outweigh everyone)
    nan_scales       NaN row scales (the hub must reject it as malformed)

Every ACK it receives is appended to ``--acks`` as one JSON line (task_id, accepted, reason,
kind), flushed at once, so soak.py counts this agent's acknowledged updates like the real ones'.
It serves until SIGTERM/SIGINT; STOP and ERROR end a session, not the process (the hub is
restarted during a soak).

``stall``: a neighbour without the key that keeps TCP connections to each agent port open and
never sends a HELLO: at most ``--cap`` per port, one new connection per port every 1/``--rate``
seconds, the oldest closed first once at the cap. Connections the agent closes are noticed and
replaced. Ports that refuse (an agent killed by the soak) are retried at the same rate. Every
``--report`` seconds it writes a one-line JSON status (open connections, opened, refused, closed
by the agents) to stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import signal
import sys
import time
from typing import Deque, Dict, List

import numpy as np

from ftte_core import messages as M
from ftte_core.channel import Channel, ChannelClosed, ChannelError
from ftte_core.modelfile import content_hash
from ftte_core.protocol import PROTOCOL_VERSION, read_key
from ftte_core.update import TensorDelta, Update

KINDS = ("scale_1e3", "scale_1e30", "scale_overflow", "samples_inflated", "nan_scales")
LOOPBACK = "127.0.0.1"


# -- the faulty agent --------------------------------------------------------------------------------
def bad_tensors(task: M.TaskMessage, kind: str, rng: np.random.Generator) -> List[TensorDelta]:
    """Tensors with the task's keys and shapes, encoded at the task's bits, with bad content of ``kind``."""
    scale = {"scale_1e3": 1e3, "scale_1e30": 1e30, "scale_overflow": 3.4e38, "samples_inflated": 1e-3,
             "nan_scales": float("nan")}[kind]
    out = []
    for key, values in task.values.items():
        rows, cols = values.shape
        if task.bits == 32:
            # float deltas: the overflow kinds become huge finite values, NaN stays NaN
            level = rng.uniform(-1.0, 1.0, size=(rows, cols))
            data = np.clip(level * min(scale, 3.4e38), -3.4e38, 3.4e38).astype(np.float32) \
                if np.isfinite(scale) else np.full((rows, cols), np.nan, dtype=np.float32)
            out.append(TensorDelta(key=key, bits=32, data=data, scales=None, shape=(rows, cols)))
            continue
        if kind == "scale_overflow":
            levels = np.full((rows, cols), 127)
        else:
            levels = rng.integers(-127, 128, size=(rows, cols))
        if task.bits == 4:
            nib = (np.clip(levels // 18, -7, 7) & 0xF).astype(np.uint8)   # int4 two's complement nibbles
            if cols % 2:
                nib = np.concatenate([nib, np.zeros((rows, 1), np.uint8)], axis=1)
            data = (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)
        else:
            data = levels.astype(np.int8)
        scales = np.full(rows, scale, dtype=np.float32)
        out.append(TensorDelta(key=key, bits=task.bits, data=data, scales=scales, shape=(rows, cols)))
    return out


class FaultyAgent:
    def __init__(self, key: bytes, agent_id: str, budget: int, num_samples: int, acks_path: str, seed: int):
        self.key, self.agent_id, self.budget, self.num_samples = key, agent_id, budget, num_samples
        self.acks = open(acks_path, "a", buffering=1)
        self.rng = np.random.default_rng(seed)
        self.order = random.Random(seed)
        self.models: set = set()
        self.sent_kind: Dict[str, str] = {}
        self.tasks = 0

    def next_kind(self) -> str:
        # every kind once per cycle, cycles shuffled: each kind recurs, identical bad updates included
        if self.tasks % len(KINDS) == 0:
            self._cycle = list(KINDS)
            self.order.shuffle(self._cycle)
        kind = self._cycle[self.tasks % len(KINDS)]
        self.tasks += 1
        return kind

    async def serve(self, reader, writer) -> None:
        try:
            ch = await Channel.open(reader, writer, "server", self.key, timeout=10)
        except (ChannelError, OSError):
            return
        try:
            await ch.send(M.AGENT_INFO, M.encode_json({
                "agent_id": self.agent_id, "name": self.agent_id, "protocol": PROTOCOL_VERSION,
                "memory_budget": self.budget, "speed": 1.0, "slowdown": 1.0, "models": sorted(self.models),
                "pending": 0, "num_samples": self.num_samples, "arch": "faulty", "software": "soak_peers"}))
            while True:
                msg_type, body = await ch.recv()
                if msg_type == M.TASK:
                    task = M.decode_task(body)
                    kind = self.next_kind()
                    await asyncio.sleep(0.2)  # about an honest agent's pace, so it is one voice among several
                    update = Update(base_version=task.base_version, subset_fingerprint=task.subset_fingerprint,
                                    num_samples=2 ** 61 if kind == "samples_inflated" else self.num_samples,
                                    loss=1.0, tensors=bad_tensors(task, kind, self.rng), stats={},
                                    peak_memory_bytes=self.budget // 4, device_id=self.agent_id,
                                    task_id=task.task_id, run_id=task.run_id)
                    self.sent_kind[task.task_id] = kind
                    await ch.send(M.UPDATE, update.to_bytes())
                elif msg_type == M.ACK:
                    ack = M.decode_json(body, M.ACK, {"accepted": bool})
                    tid = str(ack.get("task_id", ""))
                    self.acks.write(json.dumps({"t": time.time(), "task_id": tid, "accepted": ack["accepted"],
                                                "reason": ack.get("reason", ""), "kind": self.sent_kind.get(tid, "?")})
                                    + "\n")
                elif msg_type == M.MODEL:
                    self.models.add(content_hash(body))
                elif msg_type == M.PING:
                    await ch.send(M.PONG, body)
                elif msg_type in (M.STOP, M.ERROR):
                    break
                # NOT_USED: stay connected and idle, as a real agent does
        except (ChannelClosed, ChannelError, M.MessageError, OSError):
            pass
        finally:
            await ch.close()


async def run_faulty(args) -> None:
    agent = FaultyAgent(read_key(args.key), args.agent_id, args.budget, args.num_samples, args.acks, args.seed)
    server = await asyncio.start_server(agent.serve, LOOPBACK, args.port, reuse_address=True)
    print(f"ready {LOOPBACK}:{server.sockets[0].getsockname()[1]}", flush=True)
    await _until_signalled()
    server.close()


# -- the stalled-handshake neighbour -----------------------------------------------------------------
class Staller:
    def __init__(self, ports: List[int], cap: int, rate: float):
        self.ports, self.cap, self.rate = ports, cap, rate
        self.open: Dict[int, Deque[asyncio.StreamWriter]] = {p: collections.deque() for p in ports}
        self.opened = 0
        self.refused = 0
        self.closed_by_agent = 0

    async def _hold(self, port: int) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 2.0)
        except (OSError, asyncio.TimeoutError):
            self.refused += 1
            return
        self.opened += 1
        conns = self.open[port]
        conns.append(writer)
        try:
            while await reader.read(4096):   # the agent may send its handshake bytes; never answered
                pass
            self.closed_by_agent += 1
        except (OSError, ConnectionError):
            self.closed_by_agent += 1
        finally:
            if writer in conns:
                conns.remove(writer)
            writer.close()

    async def run(self, report_every: float) -> None:
        held = set()
        last_report = time.monotonic()
        while True:
            for port in self.ports:
                conns = self.open[port]
                while len(conns) >= self.cap:
                    conns.popleft().close()
                t = asyncio.ensure_future(self._hold(port))
                held.add(t)
                t.add_done_callback(held.discard)
            await asyncio.sleep(1.0 / self.rate)
            if time.monotonic() - last_report >= report_every:
                last_report = time.monotonic()
                print(json.dumps({"open": sum(len(c) for c in self.open.values()), "opened": self.opened,
                                  "refused": self.refused, "closed_by_agent": self.closed_by_agent}), flush=True)


async def run_stall(args) -> None:
    staller = Staller([int(p) for p in args.ports.split(",")], args.cap, args.rate)
    task = asyncio.ensure_future(staller.run(args.report))
    await _until_signalled()
    task.cancel()
    print(json.dumps({"open": sum(len(c) for c in staller.open.values()), "opened": staller.opened,
                      "refused": staller.refused, "closed_by_agent": staller.closed_by_agent, "final": True}),
          flush=True)


# -- common ------------------------------------------------------------------------------------------
async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="role", required=True)
    f = sub.add_parser("faulty", help="an agent with the key that sends bad updates")
    f.add_argument("--key", required=True)
    f.add_argument("--port", type=int, default=0)
    f.add_argument("--agent-id", default="faulty-agent")
    f.add_argument("--budget", type=int, default=64 << 20, help="memory budget it declares, bytes")
    f.add_argument("--num-samples", type=int, default=300, help="sample count it declares")
    f.add_argument("--acks", required=True, help="JSON-lines file the ACKs it receives are appended to")
    f.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("stall", help="a keyless neighbour holding handshakes open")
    s.add_argument("--ports", required=True, help="comma-separated agent ports on 127.0.0.1")
    s.add_argument("--cap", type=int, default=64, help="most connections held per port")
    s.add_argument("--rate", type=float, default=8.0, help="new connections per second per port")
    s.add_argument("--report", type=float, default=30.0, help="seconds between status lines")
    args = p.parse_args(argv)
    try:
        asyncio.run(run_faulty(args) if args.role == "faulty" else run_stall(args))
    except KeyboardInterrupt:
        pass
    sys.stdout.flush()


if __name__ == "__main__":
    main()
