"""ftte-agent as a real process on loopback, driven by a fake hub written here with Channel + messages."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ftte_core import messages as M
from ftte_core.channel import Channel, ChannelClosed, ChannelError
from ftte_core.cost import predict_memory
from ftte_core.data import Dataset, load_bundled, save_npz
from ftte_core.local import LocalWorker, TaskConfig
from ftte_core.modelfile import content_hash, install_bytes, model_to_bytes, quantize_trained_rows
from ftte_core.protocol import PROTOCOL_VERSION, Connection, generate_key, read_key, write_key
from ftte_core.subset import Subset
from ftte_core.update import Update, check_update, subset_values
from ftte_core.zoo import zoo
from mdns_support import needs_multicast
from slowdev import scaled

# every time limit here is a figure for a fast host, scaled to this machine's measured speed
# (slowdev.py): the suite also runs in emulated ARM userlands, tens of times slower
TIMEOUT = scaled(15.0)
RUN = "run-a"                      # the fake hub's run id


# -- the agent process ---------------------------------------------------------------------------
class AgentProc:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()
        m = self.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        self.port = int(m.group(1))

    def _pump(self):
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = TIMEOUT, start: int = 0):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._alive_reader()):
                    raise AssertionError(f"no log line matching {pattern!r}; log:\n" + "\n".join(self.lines[-40:]))
                self._cond.wait(min(left, 0.2))

    def __repr__(self) -> str:
        # pytest prints this in a failed `assert a.stop() == 0`, cut to 240 characters: the end of
        # the agent's last two log lines fits whole
        tail = " | ".join(line[-90:] for line in self.lines[-2:])
        return f"<agent exit {self.proc.returncode}; last log lines: {tail}>"

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.lines[-n:])

    def _alive_reader(self) -> bool:
        return not self.proc.stderr.closed and self.proc.poll() is None

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(scaled(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(scaled(5))
        return self.proc.returncode


def agent_cmd(key, data, state, *extra):
    return [sys.executable, "-m", "ftte_agent.cli", "--key", str(key), "--data", str(data), "--state-dir", str(state),
            "--port", "0", "--interface", "127.0.0.1", "--name", "test-agent", *extra]


def start_agent(key, data, state, *extra, mdns=False) -> AgentProc:
    args = list(extra) + ([] if mdns else ["--no-mdns"])
    proc = subprocess.Popen(agent_cmd(key, data, state, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        return AgentProc(proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    key = root / "fleet.key"
    write_key(key, generate_key())
    ds = load_bundled("digits")
    local = Dataset(ds.x[:200].copy(), ds.y[:200].copy(), ds.num_classes, "local")
    data = root / "local.npz"
    save_npz(data, local)
    return {"root": root, "key": key, "data": data, "local": local}


@pytest.fixture(scope="module")
def agent(fleet):
    a = start_agent(fleet["key"], fleet["data"], fleet["root"] / "state-shared")
    yield a
    rc = a.stop()
    if os.environ.get("FTTE_AGENT_TEST_LOG"):
        Path(os.environ["FTTE_AGENT_TEST_LOG"]).write_text("\n".join(a.lines) + "\n")
    assert rc == 0
    assert not [ln for ln in a.lines if "Traceback" in ln or "Logging error" in ln], "\n".join(a.lines)


# -- the fake hub --------------------------------------------------------------------------------
def make_model(seed=0):
    model = zoo("mlp", (64,), 10, seed=seed, hidden=(32,))
    subset = Subset.of(model, {"fc2": {"rows": "all", "bias": True}, "fc1": {"rows": [0, 3, 5], "bias": False}})
    return model, subset


def task_message(model, trained, task_id, version=0, **over) -> M.TaskMessage:
    fields = dict(task_id=task_id, run_id=RUN, base_version=version, model_hash=content_hash(model_to_bytes(model)),
                  subset=trained.to_dict(), subset_fingerprint=trained.fingerprint(),
                  config=TaskConfig(lr=0.05, batch_size=16, max_steps=4), seed=7, bits=8,
                  values=subset_values(model, trained))
    fields.update(over)
    return M.TaskMessage(**fields)


async def connect(port, key, timeout=TIMEOUT) -> Channel:
    if isinstance(key, Path):
        key = read_key(key)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return await Channel.open(reader, writer, "client", key, timeout=timeout)


async def hello(port, key):
    ch = await connect(port, key)
    t, body = await ch.recv(timeout=TIMEOUT)
    assert t == M.AGENT_INFO, M.name(t)
    return ch, M.decode_json(body, t)


async def recv_skip_pings(ch, timeout=TIMEOUT):
    while True:
        t, body = await ch.recv(timeout=timeout)
        if t != M.PING:
            return t, body


async def answer_to(ch, model, subset, task_id, config, blob):
    """(type, body bytes) of the agent's answer to one TASK on the model file ``blob`` (pings skipped)."""
    await ch.send(M.TASK, M.encode_task(task_message(model, subset, task_id, config=config,
                                                     model_hash=content_hash(blob))))
    t, body = await recv_skip_pings(ch)
    return t, bytes(body)


async def train_one(ch, model, subset, task_id, send_model=True):
    if send_model:
        await ch.send(M.MODEL, model_to_bytes(model))
    await ch.send(M.TASK, M.encode_task(task_message(model, subset, task_id)))
    t, body = await recv_skip_pings(ch)
    assert t == M.UPDATE, (M.name(t), bytes(body)[:200])
    return Update.from_bytes(body)


async def ack(ch, task_id, accepted=True, reason="", run_id=RUN):
    await ch.send(M.ACK, M.encode_json({"task_id": task_id, "run_id": run_id, "accepted": accepted, "reason": reason,
                                        "message": reason, "version": 1}))


async def still_serving(port, key):
    """A good hub still gets AGENT_INFO and a PONG."""
    ch, info = await hello(port, key)
    await ch.send(M.PING, M.encode_json({"t": 1.5}))
    t, body = await recv_skip_pings(ch)
    assert t == M.PONG and M.decode_json(body, t)["t"] == 1.5
    await ch.close()
    return info


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, scaled(60)))


# -- tests ---------------------------------------------------------------------------------------
def test_agent_info_fields(agent, fleet):
    async def go():
        ch, info = await hello(agent.port, fleet["key"])
        await ch.close()
        return info
    info = run(go())
    assert re.fullmatch(r"[0-9a-f]{16}", info["agent_id"])
    assert info["name"] == "test-agent"
    assert info["protocol"] == PROTOCOL_VERSION
    assert isinstance(info["memory_budget"], int) and info["memory_budget"] >= 16 << 20
    assert isinstance(info["speed"], float) and info["speed"] > 0
    assert info["slowdown"] == 1.0
    assert isinstance(info["models"], list) and isinstance(info["pending"], int)
    assert info["num_samples"] == 200
    assert info["arch"] and info["software"].startswith("ftte-agent")
    assert info["input_shape"] == [1, 8, 8] and info["num_classes"] == 10


def test_task_trains_and_update_passes_check(agent, fleet):
    model, subset = make_model()

    async def go():
        ch, _ = await hello(agent.port, fleet["key"])
        upd = await train_one(ch, model, subset, "t-check")
        await ack(ch, "t-check")
        await ch.close()
        return upd
    upd = run(go())
    check_update(upd, model, subset, current_version=0, bits=8)
    assert upd.task_id == "t-check" and upd.num_samples == 200
    assert re.fullmatch(r"[0-9a-f]{16}", upd.device_id)
    assert upd.stats["steps"] == 4 and upd.stats["train_seconds"] > 0 and upd.stats["delta_l2"] > 0
    assert upd.peak_memory_bytes and upd.peak_memory_bytes > 0
    assert np.isfinite(upd.loss)


def test_model_cached_across_connections_and_restarts(fleet, tmp_path):
    model, subset = make_model(seed=3)
    h = content_hash(model_to_bytes(model))
    state = tmp_path / "state"
    a = start_agent(fleet["key"], fleet["data"], state)
    try:
        async def first():
            ch, info = await hello(a.port, fleet["key"])
            assert h not in info["models"]
            await train_one(ch, model, subset, "c1")
            await ack(ch, "c1")
            await ch.close()
            ch, info = await hello(a.port, fleet["key"])  # second connection: no MODEL needed
            assert h in info["models"]
            await train_one(ch, model, subset, "c2", send_model=False)
            await ack(ch, "c2")
            await ch.close()
            return info["agent_id"]
        agent_id = run(first())
        assert (state / "models" / f"{h}.ftm").is_file()
        assert a.stop() == 0
    finally:
        a.stop()
    b = start_agent(fleet["key"], fleet["data"], state)
    try:
        async def after_restart():
            ch, info = await hello(b.port, fleet["key"])
            assert h in info["models"] and info["agent_id"] == agent_id
            upd = await train_one(ch, model, subset, "c3", send_model=False)
            await ack(ch, "c3")
            await ch.close()
            return upd
        check_update(run(after_restart()), model, subset, current_version=0)
    finally:
        assert b.stop() == 0


def test_corrupt_cached_model_is_deleted_and_task_fails_cleanly(fleet, tmp_path):
    model, subset = make_model(seed=4)
    blob = model_to_bytes(model)
    h = content_hash(blob)
    state = tmp_path / "state"
    (state / "models").mkdir(parents=True)
    (state / "models" / f"{h}.ftm").write_bytes(blob[:-4] + b"\0\0\0\1")
    a = start_agent(fleet["key"], fleet["data"], state)
    try:
        async def go():
            ch, info = await hello(a.port, fleet["key"])
            assert h not in info["models"]
            await ch.send(M.TASK, M.encode_task(task_message(model, subset, "corrupt")))
            t, body = await recv_skip_pings(ch)
            assert t == M.TASK_FAILED
            msg = M.decode_json(body, t)
            assert msg["task_id"] == "corrupt" and "send MODEL first" in msg["message"]
            await ch.close()
        run(go())
        assert not (state / "models" / f"{h}.ftm").exists()
    finally:
        assert a.stop() == 0


def test_model_corrupted_while_running_makes_the_hub_resend_it(fleet, tmp_path):
    model, subset = make_model(seed=10)
    other_subset = Subset.of(model, {"fc2": {"rows": "all", "bias": False}})
    blob = model_to_bytes(model)
    h = content_hash(blob)
    state = tmp_path / "state"
    a = start_agent(fleet["key"], fleet["data"], state)
    try:
        async def go():
            ch, _ = await hello(a.port, fleet["key"])
            await train_one(ch, model, subset, "before")
            await ack(ch, "before")
            (state / "models" / f"{h}.ftm").write_bytes(blob[:100])  # the SD card lost it
            # a new subset needs the model file again
            await ch.send(M.TASK, M.encode_task(task_message(model, other_subset, "after")))
            t, body = await recv_skip_pings(ch)
            assert t == M.TASK_FAILED and "corrupt" in M.decode_json(body, t)["message"]
            t, body = await recv_skip_pings(ch)
            assert t == M.ERROR and "reconnect" in M.decode_json(body, t)["message"]
            with pytest.raises(ChannelError):
                await recv_skip_pings(ch)
            ch.abort()
            ch, info = await hello(a.port, fleet["key"])
            assert h not in info["models"]
            upd = await train_one(ch, model, other_subset, "again")  # MODEL sent again
            await ack(ch, "again")
            await ch.close()
            return upd
        check_update(run(go()), model, other_subset, current_version=0)
    finally:
        assert a.stop() == 0


def test_pending_update_survives_vanished_hub_and_ack_deletes_it(fleet, tmp_path):
    model, subset = make_model(seed=5)
    state = tmp_path / "state"
    # slowdown: the hub is gone well before the update is ready
    a = start_agent(fleet["key"], fleet["data"], state, "--slowdown", "40")
    try:
        async def vanish():
            ch, _ = await hello(a.port, fleet["key"])
            await ch.send(M.MODEL, model_to_bytes(model))
            await ch.send(M.TASK, M.encode_task(task_message(model, subset, "p1")))
            await asyncio.sleep(0.05)
            ch.abort()  # no close frame: the hub died
        run(vanish())
        a.wait_for(r"task p1: no hub connected")
        pending = list((state / "pending").glob("*/*.upd"))
        assert [(p.parent.name, p.name) for p in pending] == [(RUN, "p1.upd")]

        async def reconnect(do_ack):
            ch, info = await hello(a.port, fleet["key"])
            assert info["pending"] == 1
            t, body = await recv_skip_pings(ch)  # pending updates come right after AGENT_INFO
            assert t == M.UPDATE
            upd = Update.from_bytes(body)
            if do_ack:
                await ack(ch, upd.task_id, accepted=False, reason="too_stale")
                await still_alive(ch)
            await ch.close()
            return upd
        upd = run(reconnect(do_ack=False))  # not acknowledged: kept
        assert upd.task_id == "p1" and upd.run_id == RUN and pending[0].exists()
        check_update(upd, model, subset, current_version=3)
        mark = a.mark()
        run(reconnect(do_ack=True))
        assert not pending[0].exists()
        a.wait_for(r"update p1 rejected by the hub: too_stale", start=mark)
    finally:
        assert a.stop() == 0


async def still_alive(ch):
    await ch.send(M.PING, M.encode_json({"t": 2.0}))
    t, _ = await recv_skip_pings(ch)
    assert t == M.PONG


def test_pending_updates_go_out_oldest_first(fleet, tmp_path):
    from ftte_agent.state import StateDir
    model, subset = make_model(seed=6)
    state = StateDir(tmp_path / "state")
    # updates kept by an earlier run of the agent
    for i, tid in enumerate(["old", "mid", "new"]):
        upd = Update(base_version=i, subset_fingerprint=subset.fingerprint(), num_samples=5, loss=1.0, tensors=[],
                     task_id=tid, run_id=RUN)
        path = state.put_pending(RUN, tid, upd.to_bytes())
        os.utime(path, ns=(10**18 + i, 10**18 + i))
    state.put_pending(RUN, "torn", upd.to_bytes()[:-3])  # e.g. a disk that lost the end of a file
    a = start_agent(fleet["key"], fleet["data"], state.root)
    a.wait_for(r"pending update run-a/torn\.upd is unreadable .*; deleted")
    try:
        async def go():
            ch, info = await hello(a.port, fleet["key"])
            assert info["pending"] == 3
            order = []
            for _ in range(3):
                t, body = await recv_skip_pings(ch)
                assert t == M.UPDATE
                order.append(Update.from_bytes(body).task_id)
            for tid in order:
                await ack(ch, tid)
            await still_alive(ch)
            await ch.close()
            return order
        assert run(go()) == ["old", "mid", "new"]
        assert not list((state.root / "pending").iterdir())
    finally:
        assert a.stop() == 0


def test_wrong_key_refused_then_good_hub_served(agent, fleet):
    mark = agent.mark()

    async def go():
        with pytest.raises(ChannelError):
            await connect(agent.port, generate_key())
        return await still_serving(agent.port, fleet["key"])
    run(go())
    agent.wait_for(r"refused 127\.0\.0\.1:\d+: .*(key|authentic)", start=mark)


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(300), b"\x00" * 4])
def test_garbage_bytes_dropped_then_good_hub_served(agent, fleet, garbage):
    mark = agent.mark()

    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
        writer.write(garbage)
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(reader.read(), TIMEOUT)  # the agent hangs up
        writer.close()
        await still_serving(agent.port, fleet["key"])
    run(go())
    agent.wait_for(r"refused 127\.0\.0\.1:\d+", start=mark)


def test_stale_protocol_version_refused(agent, fleet):
    mark = agent.mark()

    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
        writer.write(struct.pack(">4sHBB32s32s", b"FTTE", PROTOCOL_VERSION - 1 if PROTOCOL_VERSION > 1 else 99,
                                 1, 0, os.urandom(32), os.urandom(32)))
        await writer.drain()
        await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
        await still_serving(agent.port, fleet["key"])
    run(go())
    agent.wait_for(r"refused .*version", start=mark)


def test_oversized_frame_dropped_then_good_hub_served(agent, fleet):
    mark = agent.mark()

    async def go():
        ch, _ = await hello(agent.port, fleet["key"])
        ch.writer.write(struct.pack(">I", 0x7FFFFFFF) + b"x" * 64)  # a record header far over the frame limit
        await ch.writer.drain()
        with pytest.raises(ChannelError):
            while True:
                await ch.recv(timeout=TIMEOUT)
        ch.abort()
        await still_serving(agent.port, fleet["key"])
    run(go())
    agent.wait_for(r"hub connection dropped: .*(limit|large|exceeds|max)", start=mark)


def test_replayed_frame_dropped_then_good_hub_served(agent, fleet):
    mark = agent.mark()

    async def go():
        ch, _ = await hello(agent.port, fleet["key"])
        frame = ch.conn.send(M.PING, M.encode_json({"t": 3.0}))
        ch.writer.write(frame)
        await ch.writer.drain()
        t, _ = await recv_skip_pings(ch)
        assert t == M.PONG  # the original was answered
        ch.writer.write(frame)  # the same record again: it must not authenticate
        await ch.writer.drain()
        with pytest.raises(ChannelError):
            while True:
                await ch.recv(timeout=TIMEOUT)
        ch.abort()
        await still_serving(agent.port, fleet["key"])
    run(go())
    agent.wait_for(r"hub connection dropped: .*(authenticat|tamper|replay)", start=mark)


def test_silent_half_open_connection_times_out(fleet, tmp_path):
    """Silence before the HELLO is cut at --hello-timeout; a HELLO then silence at --handshake-timeout."""
    a = start_agent(fleet["key"], fleet["data"], tmp_path / "state", "--hello-timeout", "0.5",
                    "--handshake-timeout", "1.5")
    try:
        async def go(say_hello):
            reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
            if say_hello:
                writer.write(Connection("client", read_key(fleet["key"])).initiate())
                await writer.drain()
            t0 = time.monotonic()
            await asyncio.wait_for(reader.read(), TIMEOUT)  # then says nothing: dropped
            writer.close()
            return time.monotonic() - t0
        assert 0.3 < run(go(False)) < scaled(5)
        a.wait_for(r"no HELLO within 0\.5 s")
        assert 1.3 < run(go(True)) < scaled(10)
        a.wait_for(r"no handshake within 1\.5 s")
    finally:
        assert a.stop() == 0


def _rss(pid: int):
    """Resident set size of a process in bytes (None where /proc has no figure)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@pytest.mark.slow
def test_a_keyless_neighbour_cannot_keep_the_hub_out(fleet, tmp_path):
    """Finding 5: 64 connections stalled in the handshake, each one the agent drops replaced at up
    to 20/s from loopback. A hub (retrying like the real one) gets in within 5 s (plus a
    slow-device allowance: 20x its unloaded handshake time), the agent's RSS grows < 5 MiB, and
    the flood costs a few log lines, not one per connection."""
    from ftte_agent.admission import LOG_BURST
    from handshake_flood import StalledHandshakes

    a = start_agent(fleet["key"], fleet["data"], tmp_path / "state")
    try:
        async def go():
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await still_serving(a.port, fleet["key"])        # warm: every import and code path done
            unloaded = loop.time() - t0
            rss0 = _rss(a.proc.pid)
            flood = StalledHandshakes("127.0.0.1", a.port, size=64, rate=20, total=64 + 20 * 60)
            await flood.start()
            try:
                await asyncio.sleep(1.0)                       # the flood at full size
                bound = 5.0 + 20 * unloaded
                t1 = loop.time()
                attempts = 0
                while True:
                    attempts += 1
                    try:
                        ch, _ = await hello(a.port, fleet["key"])
                        break
                    except ChannelError:
                        if loop.time() - t1 > bound:
                            raise AssertionError(f"the hub did not get in within {bound:.1f} s "
                                                 f"({attempts} attempts)") from None
                        await asyncio.sleep(0.5)               # the hub's first backoff
                got_in = loop.time() - t1
                await ch.close()
                await asyncio.sleep(3.0)                       # the flood goes on
                rss1 = _rss(a.proc.pid)
            finally:
                await flood.stop()
            return unloaded, bound, got_in, attempts, rss0, rss1, flood

        mark = a.mark()
        unloaded, bound, got_in, attempts, rss0, rss1, flood = run(go())
        print(f"unloaded handshake {unloaded * 1e3:.1f} ms; the hub got in after {got_in:.3f} s "
              f"({attempts} attempt(s), bound {bound:.1f} s); flood opened {flood.opened}, the agent "
              f"dropped {flood.dropped}; RSS {rss0} -> {rss1} bytes")
        assert got_in < bound
        assert flood.opened > 64 and flood.dropped > 0
        if rss0 is not None and rss1 is not None:
            assert rss1 - rss0 < 5 << 20, (rss0, rss1)
        a.wait_for(r"refused/evicted \d+ unauthenticated connection\(s\) in the last 10 s from 127\.0\.0\.1 \(",
                   timeout=scaled(30), start=mark)
        refused = [ln for ln in a.lines[mark:] if "refused" in ln]
        assert len(refused) <= LOG_BURST + 3, "\n".join(refused)   # the burst, then one summary per 10 s
        assert not [ln for ln in a.lines if "Traceback" in ln]
    finally:
        assert a.stop() == 0


def test_a_low_entropy_key_stops_the_agent_with_one_line(fleet, tmp_path):
    key = tmp_path / "zero.key"
    key.write_text("ftte-fleet-key v1\n" + "00" * 32 + "\n")
    key.chmod(0o600)
    r = subprocess.run(agent_cmd(key, fleet["data"], tmp_path / "state", "--no-mdns"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"ftte-agent: error: key file {key}: low-entropy key (all 32 bytes "
                                                 f"are 0x00); make a new one with `ftte-hub keygen`")
    assert "Traceback" not in r.stderr


def nan_task_body(model, subset, task_id):
    body = bytearray(M.encode_task(task_message(model, subset, task_id)))
    body[-4:] = struct.pack("<f", float("nan"))
    return bytes(body)


def test_bad_tasks_fail_cleanly_and_agent_keeps_serving(agent, fleet):
    model, subset = make_model(seed=8)
    other, _ = make_model(seed=9)
    values = subset_values(model, subset)
    wrong_shape = {k: (np.zeros((v.shape[0] + 1, v.shape[1]), np.float32) if k == "fc2.weight" else v)
                   for k, v in values.items()}
    missing = {k: v for k, v in values.items() if k != "fc2.bias"}
    bad_subset = {"fc9": {"rows": [0], "bias": True}}
    cases = {
        "nan": nan_task_body(model, subset, "nan"),
        "shape": M.encode_task(task_message(model, subset, "shape", values=wrong_shape)),
        "missing": M.encode_task(task_message(model, subset, "missing", values=missing)),
        "unknown-model": M.encode_task(task_message(other, subset, "unknown-model")),
        "fingerprint": M.encode_task(task_message(model, subset, "fingerprint", subset_fingerprint="0" * 16)),
        "subset": M.encode_task(task_message(model, subset, "subset", subset=bad_subset)),
    }
    expect = {"nan": "NaN", "shape": "shape", "missing": "missing", "unknown-model": "send MODEL first",
              "fingerprint": "fingerprint", "subset": "subset"}

    async def go():
        ch, _ = await hello(agent.port, fleet["key"])
        await ch.send(M.MODEL, model_to_bytes(model))
        got = {}
        for tid, body in cases.items():
            await ch.send(M.TASK, body)
            t, reply = await recv_skip_pings(ch)
            assert t == M.TASK_FAILED, (tid, M.name(t))
            msg = M.decode_json(reply, t)
            got[msg["task_id"]] = msg["message"]
        upd = await train_one(ch, model, subset, "good-after-bad", send_model=False)  # same connection still works
        await ack(ch, "good-after-bad")
        await ch.close()
        return got, upd
    got, upd = run(go())
    for tid, word in expect.items():
        assert word.lower() in got[tid].lower(), (tid, got[tid])
        assert "\n" not in got[tid]
    check_update(upd, model, subset, current_version=0)


def test_undecodable_task_and_bad_model_get_error(agent, fleet):
    async def go():
        replies = []
        for t_send, body in [(M.TASK, b"\x05\x00"), (M.MODEL, b"FTMD" + b"\xff" * 40)]:
            ch, _ = await hello(agent.port, fleet["key"])
            await ch.send(t_send, body)
            t, reply = await recv_skip_pings(ch)
            assert t == M.ERROR
            replies.append(M.decode_json(reply, t)["message"])
            with pytest.raises(ChannelClosed):
                await recv_skip_pings(ch)
            ch.abort()
        await still_serving(agent.port, fleet["key"])
        return replies
    task_err, model_err = run(go())
    assert task_err.startswith("TASK:") and model_err.startswith("MODEL:")


def test_not_used_and_stop_keep_the_connection(agent, fleet):
    mark = agent.mark()

    model, subset = make_model(seed=12)

    async def go():
        ch, _ = await hello(agent.port, fleet["key"])
        await ch.send(M.NOT_USED, M.encode_json({"reason": "budget", "needed_bytes": 9 << 20, "budget_bytes": 1 << 20}))
        await train_one(ch, model, subset, "before-stop")
        await ack(ch, "before-stop")
        await ch.send(M.STOP, M.encode_json({"reason": "target accuracy reached"}))
        await still_alive(ch)
        # the next run: the released model is loaded again from the cache
        upd = await train_one(ch, model, subset, "after-stop", send_model=False)
        await ack(ch, "after-stop")
        await ch.close()
        return upd
    check_update(run(go()), model, subset, current_version=0)
    agent.wait_for(r"not used by hub .*needs 9437184 bytes, budget 1048576 bytes", start=mark)
    agent.wait_for(r"stopped the run: target accuracy reached", start=mark)


def test_newer_hub_connection_supersedes_older(agent, fleet):
    async def go():
        old, _ = await hello(agent.port, fleet["key"])
        new, _ = await hello(agent.port, fleet["key"])
        with pytest.raises(ChannelError):  # the old one is closed by the agent
            await recv_skip_pings(old, timeout=scaled(5))
        await still_alive(new)
        await new.close()
    run(go())


def test_agent_pings_and_drops_silent_hub(fleet, tmp_path):
    a = start_agent(fleet["key"], fleet["data"], tmp_path / "state", "--ping-interval", "0.2",
                    "--silence-timeout", "1")
    try:
        async def go():
            ch, _ = await hello(a.port, fleet["key"])
            t, _ = await ch.recv(timeout=scaled(5))
            assert t == M.PING
            t0 = time.monotonic()
            with pytest.raises(ChannelError):  # never answers: dropped after ~1 s of silence
                while True:
                    await ch.recv(timeout=scaled(10))
            return time.monotonic() - t0
        assert run(go()) < scaled(5)
        a.wait_for(r"nothing received for 1 s")
    finally:
        assert a.stop() == 0


@needs_multicast
def test_mdns_advertisement_with_txt(fleet, tmp_path):
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    a = start_agent(fleet["key"], fleet["data"], tmp_path / "state", "--memory-budget", "48MiB", "--slowdown", "2",
                    mdns=True)
    # other fleets on this host may advertise on 127.0.0.1 too: look for this agent's own instance
    mine = "test-agent-" + (tmp_path / "state" / "agent_id").read_text().strip()[:6] + "."
    try:
        async def browse():
            zc = AsyncZeroconf(ip_version=IPVersion.V4Only, interfaces=["127.0.0.1"])
            found, removed = asyncio.Queue(), asyncio.Queue()

            def on_change(zeroconf, service_type, name, state_change):
                if not name.startswith(mine):
                    return
                if state_change is ServiceStateChange.Added:
                    found.put_nowait(name)
                elif state_change is ServiceStateChange.Removed:
                    removed.put_nowait(name)
            browser = AsyncServiceBrowser(zc.zeroconf, [M.SERVICE_TYPE], handlers=[on_change])
            try:
                name = await asyncio.wait_for(found.get(), 20)
                info = AsyncServiceInfo(M.SERVICE_TYPE, name)
                assert await info.async_request(zc.zeroconf, 3000)
                txt = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
                addrs = info.parsed_scoped_addresses()
                port = info.port
                a.stop()  # SIGTERM: the agent withdraws the service
                gone = await asyncio.wait_for(removed.get(), 10)
                return name, txt, addrs, port, gone
            finally:
                await browser.async_cancel()
                await zc.async_close()
        name, txt, addrs, port, gone = run(browse())
    finally:
        a.stop()
    assert a.proc.returncode == 0
    assert port == a.port and addrs == ["127.0.0.1"]
    assert re.fullmatch(r"[0-9a-f]{16}", txt["id"]) and name.startswith(f"test-agent-{txt['id'][:6]}.")
    assert name.startswith(mine)
    assert txt["name"] == "test-agent" and txt["proto"] == str(PROTOCOL_VERSION)
    assert txt["budget"] == str(48 << 20) and float(txt["speed"]) > 0 and txt["arch"]
    assert gone == name


def test_agent_imports_neither_onnx_nor_hub():
    code = ("import sys, ftte_agent.cli, ftte_agent.server, ftte_agent.advertise, ftte_agent.state, "
            "ftte_agent.device; bad = [m for m in ('onnx', 'onnxruntime', 'ftte_hub') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(60))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("what, make, expect", [
    ("key", lambda p: p.write_text("not a key\n"), "key file"),
    ("key", lambda p: None, "does not exist"),
    ("data", lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"), "data file"),
    ("data", lambda p: np.savez(p, x=np.zeros((3, 2), np.float32)), "data file"),
    ("data", lambda p: np.savez(p, x=np.zeros((0, 2), np.float32), y=np.zeros(0, np.int64)), "no samples"),
    ("data", lambda p: np.savez(p, x=np.full((3, 2), np.nan, np.float32), y=np.zeros(3, np.int64)), "non-finite"),
    ("data", lambda p: np.savez(p, x=np.array([{}] * 3, dtype=object), y=np.zeros(3, np.int64)), "pickle"),
])
def test_bad_key_or_data_fails_fast_with_one_line(fleet, tmp_path, what, make, expect):
    bad = tmp_path / ("bad.key" if what == "key" else "bad.npz")
    make(bad)
    key = bad if what == "key" else fleet["key"]
    data = bad if what == "data" else fleet["data"]
    r = subprocess.run(agent_cmd(key, data, tmp_path / "state", "--no-mdns"), capture_output=True, text=True,
                       timeout=scaled(60))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ftte-agent: error:") and expect in lines[0], r.stderr


@pytest.mark.parametrize("args, expect", [
    (["--memory-budget", "lots"], "--memory-budget"),
    (["--interface", "eth0"], "IPv4"),
    (["--interface", "192.0.2.1"], "cannot listen on 192.0.2.1:"),   # not an address of this host
    (["--slowdown", "0.5"], "slowdown"),
    (["--name", "../../etc"], "--name"),
    (["--name", "x" * 64], "--name"),
])
def test_bad_options_fail_with_one_line(fleet, tmp_path, args, expect):
    r = subprocess.run(agent_cmd(fleet["key"], fleet["data"], tmp_path / "state", "--no-mdns", *args),
                       capture_output=True, text=True, timeout=scaled(60))
    assert r.returncode != 0 and expect in r.stderr


def test_port_in_use_fails_with_one_line(agent, fleet, tmp_path):
    cmd = agent_cmd(fleet["key"], fleet["data"], tmp_path / "state", "--no-mdns")
    cmd[cmd.index("--port") + 1] = str(agent.port)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=scaled(60))
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (f"ftte-agent: error: cannot listen on 127.0.0.1:{agent.port}: "
                                                 "Address already in use")


def test_sigterm_mid_task_exits_zero_promptly_with_json_logs(fleet, tmp_path):
    import json
    model, subset = make_model(seed=11)
    a = start_agent(fleet["key"], fleet["data"], tmp_path / "state", "--log-format", "json", "--log-level", "debug",
                    "--max-task-steps", "0")  # a task that trains until the signal
    try:
        async def go():
            ch, _ = await hello(a.port, fleet["key"])
            await ch.send(M.MODEL, model_to_bytes(model))
            long = task_message(model, subset, "long", config=TaskConfig(batch_size=16, local_epochs=1e5))
            await ch.send(M.TASK, M.encode_task(long))
            await asyncio.sleep(0.1)
            return ch
        run(go())
        a.wait_for(r"task long: training")
        time.sleep(0.3)
        t0 = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(scaled(10)) == 0 and time.monotonic() - t0 < scaled(5)
    finally:
        a.stop()
    records = [json.loads(line) for line in a.lines]  # every line is one JSON object
    assert {"t", "level", "logger", "msg"} <= set(records[0])
    assert any(r["msg"].startswith("listening on 127.0.0.1:") for r in records)
    assert records[-1]["msg"] == "stopped (abandoned the task in training)"


def test_heartbeats_flow_while_a_long_task_trains(fleet, tmp_path):
    model, subset = make_model(seed=13)
    a = start_agent(fleet["key"], fleet["data"], tmp_path / "state", "--ping-interval", "0.3",
                    "--max-task-steps", "0")  # a task that trains for the whole test
    try:
        async def go():
            ch, _ = await hello(a.port, fleet["key"])
            await ch.send(M.MODEL, model_to_bytes(model))
            long = task_message(model, subset, "long", config=TaskConfig(batch_size=16, local_epochs=1e5))
            await ch.send(M.TASK, M.encode_task(long))
            await asyncio.sleep(0.5)
            pings, t0 = 0, time.monotonic()
            for i in range(3):
                await ch.send(M.PING, M.encode_json({"t": float(i)}))
                while True:
                    t, body = await ch.recv(timeout=scaled(2))
                    assert t in (M.PING, M.PONG), M.name(t)  # no UPDATE: still training
                    if t == M.PING:
                        pings += 1
                    else:
                        assert M.decode_json(body, t)["t"] == float(i)
                        break
                await asyncio.sleep(0.3)
            ch.abort()
            return pings, time.monotonic() - t0
        pings, seconds = run(go())
        assert seconds < scaled(4) and pings >= 1
    finally:
        assert a.stop() == 0


def test_tasks_sent_back_to_back_are_trained_in_order(agent, fleet):
    model, subset = make_model(seed=14)

    async def go():
        ch, _ = await hello(agent.port, fleet["key"])
        await ch.send(M.MODEL, model_to_bytes(model))
        for tid in ("q1", "q2", "q3"):
            await ch.send(M.TASK, M.encode_task(task_message(model, subset, tid)))
        got = []
        for _ in range(3):
            t, body = await recv_skip_pings(ch)
            assert t == M.UPDATE
            got.append(Update.from_bytes(body).task_id)
            await ack(ch, got[-1])
        await ch.close()
        return got
    assert run(go()) == ["q1", "q2", "q3"]


def test_sigint_exits_zero(fleet, tmp_path):
    a = start_agent(fleet["key"], fleet["data"], tmp_path / "state")
    a.proc.send_signal(signal.SIGINT)
    assert a.proc.wait(scaled(10)) == 0
    a.wait_for(r"stopped$")


def test_state_dir_write_failures_fail_one_task_or_connection(fleet, tmp_path):
    """As if the disk filled up: the task or connection fails with one line, the agent serves on."""
    import shutil
    model, subset = make_model(seed=15)
    other, _ = make_model(seed=16)
    state = tmp_path / "state"
    a = start_agent(fleet["key"], fleet["data"], state)
    try:
        async def go():
            ch, _ = await hello(a.port, fleet["key"])
            await ch.send(M.MODEL, model_to_bytes(model))
            shutil.rmtree(state / "pending")
            (state / "pending").write_text("not a directory")
            await ch.send(M.TASK, M.encode_task(task_message(model, subset, "nowhere")))
            t, body = await recv_skip_pings(ch)
            assert t == M.TASK_FAILED and "cannot keep the update" in M.decode_json(body, t)["message"]
            (state / "pending").unlink()
            (state / "pending").mkdir()
            shutil.rmtree(state / "models")
            (state / "models").write_text("not a directory")
            await ch.send(M.MODEL, model_to_bytes(other))
            t, body = await recv_skip_pings(ch)
            assert t == M.ERROR and "agent error" in M.decode_json(body, t)["message"]
            ch.abort()
            (state / "models").unlink()
            (state / "models").mkdir()
            ch, _ = await hello(a.port, fleet["key"])
            upd = await train_one(ch, model, subset, "after-disk-trouble")
            await ack(ch, "after-disk-trouble")
            await ch.close()
            return upd
        check_update(run(go()), model, subset, current_version=0)
        a.wait_for(r"connection ended by an internal error: NotADirectoryError")
    finally:
        assert a.stop() == 0
    assert not [ln for ln in a.lines if "Traceback" in ln]


def test_a_flood_of_tasks_is_bounded(fleet, tmp_path):
    from ftte_agent.server import MAX_TASKS
    model, subset = make_model(seed=17)
    a = start_agent(fleet["key"], fleet["data"], tmp_path / "state", "--slowdown", "30")
    try:
        async def go():
            ch, _ = await hello(a.port, fleet["key"])
            await ch.send(M.MODEL, model_to_bytes(model))
            n = MAX_TASKS + 2
            for i in range(n):
                await ch.send(M.TASK, M.encode_task(task_message(model, subset, f"f{i}")))
            updates, busy = [], []
            while len(updates) + len(busy) < n:
                t, body = await recv_skip_pings(ch, timeout=scaled(30))
                if t == M.UPDATE:
                    updates.append(Update.from_bytes(body).task_id)
                    await ack(ch, updates[-1])
                else:
                    assert t == M.TASK_FAILED
                    msg = M.decode_json(body, t)
                    assert "busy" in msg["message"]
                    busy.append(msg["task_id"])
            await ch.close()
            return updates, busy
        updates, busy = run(go())
        assert updates == [f"f{i}" for i in range(MAX_TASKS)] and busy == [f"f{MAX_TASKS}", f"f{MAX_TASKS + 1}"]
    finally:
        assert a.stop() == 0


# -- the agent protects itself (issue 9, finding 6) ------------------------------------------------
def hungry_model(channels=32, padding=64, seed=0):
    """A model file of a few kilobytes whose padded convolution needs ~36 MiB per 32 channels to train at
    batch 16."""
    from ftte_core.graph import Conv2d, Dense, Flatten, GlobalAvgPool, Model
    rng = np.random.default_rng(seed)
    conv = Conv2d("conv", rng.normal(size=(channels, 1, 1, 1)).astype(np.float32), padding=(padding,) * 4)
    model = Model([conv, GlobalAvgPool("gap"), Flatten("flat"),
                   Dense("fc", (0.1 * rng.normal(size=(10, channels))).astype(np.float32))], (1, 8, 8), name="hungry")
    return model, Subset.of(model, {"conv": {"rows": "all", "bias": True}, "fc": {"rows": "all", "bias": True}})


def rss_peak(pid) -> int:
    """VmHWM: the process's peak resident memory so far, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_a_task_over_the_memory_budget_is_refused_before_anything_is_allocated(fleet, tmp_path):
    # 96 channels: ~109 MiB at the task's batch of 16, well over the budget with its margin (72 MiB)
    model, subset = hungry_model(channels=96)
    blob = model_to_bytes(model)
    assert len(blob) < 8192
    a = start_agent(fleet["key"], fleet["data"], tmp_path / "state", "--memory-budget", "64MiB")
    try:
        async def go():
            ch, _ = await hello(a.port, fleet["key"])
            await still_alive(ch)
            before = rss_peak(a.proc.pid)
            await ch.send(M.MODEL, blob)
            await ch.send(M.TASK, M.encode_task(task_message(model, subset, "hungry")))
            t, body = await recv_skip_pings(ch)
            after = rss_peak(a.proc.pid)
            assert t == M.TASK_FAILED, M.name(t)
            msg = M.decode_json(body, t)
            # the agent still trains what fits, on the same connection
            upd = await train_one(ch, *make_model(seed=20), "fits")
            await ack(ch, "fits")
            await ch.close()
            return msg, after - before, upd
        msg, grown, upd = run(go())
    finally:
        assert a.stop() == 0
    assert msg["task_id"] == "hungry" and msg["run_id"] == RUN
    assert re.fullmatch(r"this task needs \d+(\.\d)? MiB to train; the budget is 64 MiB \(--memory-budget\)",
                        msg["message"]), msg["message"]
    assert grown < 16 << 20, f"peak RSS grew by {grown / 2**20:.1f} MiB"  # before: by ~145 MiB; here ~1.5
    assert upd.task_id == "fits"
    assert len([ln for ln in a.lines if "task hungry" in ln]) == 1


def test_a_tiny_model_file_with_absurd_padding_is_refused_in_one_line(agent, fleet):
    model, _ = hungry_model(channels=1, padding=700)
    blob = model_to_bytes(model)
    assert len(blob) < 1024
    mark = agent.mark()

    async def go():
        ch, _ = await hello(agent.port, fleet["key"])
        await ch.send(M.MODEL, blob)
        t, body = await recv_skip_pings(ch)
        assert t == M.ERROR
        ch.abort()
        await still_serving(agent.port, fleet["key"])
        return M.decode_json(body, t)["message"]
    reason = run(go())
    assert reason.startswith("MODEL: layer 'conv': padding [700, 700, 700, 700] is outside the limit"), reason
    agent.wait_for(r"sent a bad message: MODEL: layer 'conv': padding", start=mark)


def test_a_task_asking_for_more_steps_than_the_cap_trains_the_cap_and_delivers(fleet, tmp_path):
    model, subset = make_model(seed=21)
    a = start_agent(fleet["key"], fleet["data"], tmp_path / "state", "--max-task-steps", "50")
    try:
        async def go():
            ch, _ = await hello(a.port, fleet["key"])
            await ch.send(M.MODEL, model_to_bytes(model))
            huge = task_message(model, subset, "huge", config=TaskConfig(batch_size=16, local_epochs=1e5))
            await ch.send(M.TASK, M.encode_task(huge))
            t, body = await recv_skip_pings(ch)
            assert t == M.UPDATE, M.name(t)
            upd = Update.from_bytes(body)
            await ack(ch, "huge")
            await ch.close()
            return upd
        upd = run(go())
        a.wait_for(r"task huge: asked for 1250000 steps; trained 50 \(--max-task-steps\)")
    finally:
        assert a.stop() == 0
    assert upd.stats["steps"] == 50 and upd.stats["planned_steps"] == 1_250_000
    check_update(upd, model, subset, current_version=0)


def test_a_task_over_the_time_cap_stops_and_delivers_what_it_has(fleet, tmp_path):
    model, subset = make_model(seed=22)
    a = start_agent(fleet["key"], fleet["data"], tmp_path / "state", "--max-task-steps", "0",
                    "--max-task-seconds", "0.5")
    try:
        async def go():
            ch, _ = await hello(a.port, fleet["key"])
            await ch.send(M.MODEL, model_to_bytes(model))
            long = task_message(model, subset, "long", config=TaskConfig(batch_size=16, local_epochs=1e6))
            await ch.send(M.TASK, M.encode_task(long))
            t, body = await recv_skip_pings(ch, timeout=scaled(60))
            assert t == M.UPDATE, M.name(t)
            upd = Update.from_bytes(body)
            await ack(ch, "long")
            await ch.close()
            return upd
        upd = run(go())
        a.wait_for(r"task long: stopped after \d+ of 12500000 steps at the 0\.5 s limit \(--max-task-seconds\)")
    finally:
        assert a.stop() == 0
    assert 1 <= upd.stats["steps"] < 12_500_000 and upd.stats["train_seconds"] < 30
    check_update(upd, model, subset, current_version=0)


@pytest.mark.parametrize("config, expect", [
    ({"local_epochs": 1e7}, "local_epochs must be above 0 and at most 1e+06, got 1e+07"),
    ({"lr": "fast"}, "lr must be a finite number, got fast"),
    ({"lr": 1e9}, "lr must be above 0 and at most 100, got 1e+09"),
    ({"batch_size": 10 ** 12}, "batch_size must be between 1 and 65536"),
    ({"batch_size": 16.5}, "batch_size must be a whole number"),
    ({"momentum": 1.5}, "momentum must be at least 0 and below 1"),
    ({"max_steps": -3}, "max_steps must be between 1 and"),
    ({"weight_decay": True}, "weight_decay must be a finite number"),
])
def test_out_of_range_task_settings_are_refused_with_a_reason(agent, fleet, config, expect):
    model, subset = make_model(seed=23)
    body = bytearray(M.encode_task(task_message(model, subset, "settings")))
    (hlen,) = struct.unpack_from("<I", body)
    import json
    head = json.loads(bytes(body[4:4 + hlen]))
    head["config"].update(config)
    new_head = json.dumps(head).encode()
    body = struct.pack("<I", len(new_head)) + new_head + bytes(body[4 + hlen:])

    async def go():
        ch, _ = await hello(agent.port, fleet["key"])
        await ch.send(M.MODEL, model_to_bytes(model))
        await ch.send(M.TASK, body)
        t, reply = await recv_skip_pings(ch)
        assert t == M.TASK_FAILED, M.name(t)
        await still_alive(ch)  # refused at once: nothing is training
        await ch.close()
        return M.decode_json(reply, t)
    msg = run(go())
    assert msg["task_id"] == "settings" and msg["run_id"] == RUN
    assert msg["message"].startswith("TASK: " + expect), msg["message"]


def test_task_failed_reasons_are_worded_for_a_person(agent, fleet):
    """No Python exception text: failures the agent knows get a sentence, the rest a plain fallback."""
    model, subset = make_model(seed=24)
    values = {k: np.full_like(v, 3e37) for k, v in subset_values(model, subset).items()}
    cases = {
        "diverges": M.encode_task(task_message(model, subset, "diverges", values=values,
                                               config=TaskConfig(lr=50.0, batch_size=16, max_steps=4))),
        # (fingerprints of their own: a worker is cached per model and subset fingerprint)
        "bad-subset": M.encode_task(task_message(model, subset, "bad-subset", subset={"fc2": 5},
                                                 subset_fingerprint="1" * 16)),
        "no-layer": M.encode_task(task_message(model, subset, "no-layer", subset={"nope": {"rows": [0], "bias": True}},
                                               subset_fingerprint="2" * 16)),
    }

    async def go():
        ch, _ = await hello(agent.port, fleet["key"])
        await ch.send(M.MODEL, model_to_bytes(model))
        got = {}
        for tid, body in cases.items():
            await ch.send(M.TASK, body)
            t, reply = await recv_skip_pings(ch)
            assert t == M.TASK_FAILED, (tid, M.name(t))
            got[tid] = M.decode_json(reply, t)["message"]
        await ch.close()
        return got
    got = run(go())
    assert got["diverges"].startswith("training diverged:"), got
    assert got["bad-subset"] == "the task's subset is malformed: it must map layer names to {rows, bias}", got
    assert got["no-layer"].startswith("the task's subset does not fit the model:"), got
    for message in got.values():
        assert not re.search(r"\b[A-Z][A-Za-z]*(Error|Exception)\b|Traceback|^\w+: '", message), message


def test_failure_reason_fallbacks_never_show_python_exception_text():
    from ftte_agent.guard import failure_reason
    from ftte_core.local import TaskError
    assert failure_reason(TaskError("this task needs 83.2 MiB to train")) == "this task needs 83.2 MiB to train"
    for e in (KeyError("x"), TypeError("'NoneType' object is not subscriptable"), RuntimeError("boom"),
              IndexError("list index out of range"), ValueError("could not broadcast input array")):
        reason = failure_reason(e)
        assert reason == "training stopped on an internal error in the agent; the agent's log has the details"
    assert "ran out of memory" in failure_reason(MemoryError(), 64 << 20)
    assert failure_reason(OSError(28, "No space left on device")).endswith("No space left on device")
    assert "diverged" in failure_reason(OverflowError("math range error"))


def test_stop_cancels_training_and_discards_the_partial_result(fleet, tmp_path):
    """Before: training went on after STOP, and the next run began with 'rejected (unknown_task)'."""
    model, subset = make_model(seed=25)
    state = tmp_path / "state"
    a = start_agent(fleet["key"], fleet["data"], state, "--max-task-steps", "0", "--log-level", "debug")
    try:
        async def go():
            ch, _ = await hello(a.port, fleet["key"])
            await ch.send(M.MODEL, model_to_bytes(model))
            long = task_message(model, subset, "long", config=TaskConfig(batch_size=16, local_epochs=1e6))
            await ch.send(M.TASK, M.encode_task(long))
            await asyncio.get_running_loop().run_in_executor(None, a.wait_for, r"task long: training")
            await ch.send(M.STOP, M.encode_json({"reason": "the run is over"}))
            await asyncio.get_running_loop().run_in_executor(
                None, a.wait_for, r"task long: training stopped; the partial result is discarded")
            # the next run: its task trains at once, and nothing of the stopped one comes back
            upd = await train_one(ch, model, subset, "next", send_model=False)
            await ack(ch, "next")
            await ch.close()
            return upd
        upd = run(go())
    finally:
        assert a.stop() == 0
    assert upd.task_id == "next"
    assert not list((state / "pending").rglob("*.upd"))
    a.wait_for(r"task long: cancelled \(the hub stopped the run\)")


def test_a_task_of_another_run_cancels_the_old_runs_training(fleet, tmp_path):
    model, subset = make_model(seed=26)
    state = tmp_path / "state"
    a = start_agent(fleet["key"], fleet["data"], state, "--max-task-steps", "0", "--log-level", "debug")
    try:
        async def go():
            ch, _ = await hello(a.port, fleet["key"])
            await ch.send(M.MODEL, model_to_bytes(model))
            long = task_message(model, subset, "t1", config=TaskConfig(batch_size=16, local_epochs=1e6))
            await ch.send(M.TASK, M.encode_task(long))
            # the old run's task is training (and the model cached) before its hub dies: a cut
            # that came earlier could take the MODEL and TASK still unread with it
            await asyncio.get_running_loop().run_in_executor(None, a.wait_for, r"task t1: training")
            ch.abort()  # that hub died without STOP; a new run's hub comes
            ch, _ = await hello(a.port, fleet["key"])
            await ch.send(M.TASK, M.encode_task(task_message(model, subset, "t1", run_id="run-b")))
            t, body = await recv_skip_pings(ch)
            assert t == M.UPDATE, (M.name(t), bytes(body[:300]))
            upd = Update.from_bytes(body)
            await ack(ch, "t1", run_id="run-b")
            await still_alive(ch)
            await ch.close()
            return upd
        upd = run(go())
        a.wait_for(r"task t1: cancelled \(the hub now runs run-b\)")
    finally:
        assert a.stop() == 0
    assert (upd.task_id, upd.run_id) == ("t1", "run-b")
    assert not list((state / "pending").rglob("*.upd"))


# -- run-scoped ids (issue 9, finding 7) ---------------------------------------------------------
def test_updates_are_kept_per_run_and_another_runs_update_is_dropped_on_ack(fleet, tmp_path):
    from ftte_agent.state import StateDir
    model, subset = make_model(seed=27)
    state = StateDir(tmp_path / "state")
    old = Update(base_version=0, subset_fingerprint=subset.fingerprint(), num_samples=5, loss=1.0, tensors=[],
                 task_id="t1", run_id="run-old")
    os.utime(state.put_pending("run-old", "t1", old.to_bytes()), ns=(10**18, 10**18))
    legacy = Update(base_version=0, subset_fingerprint=subset.fingerprint(), num_samples=5, loss=1.0, tensors=[],
                    task_id="t2")
    (state.pending_dir / "t2.upd").write_bytes(legacy.to_bytes())  # kept by an agent before run ids
    a = start_agent(fleet["key"], fleet["data"], state.root)
    a.wait_for(r"pending/: 1 update file\(s\) from an agent version without run ids are ignored")
    try:
        async def go():
            ch, info = await hello(a.port, fleet["key"])
            assert info["pending"] == 1
            t, body = await recv_skip_pings(ch)
            assert t == M.UPDATE
            kept = Update.from_bytes(body)
            # this run's task t1 trains while the old run's t1 is still kept: two updates, two runs
            await ch.send(M.MODEL, model_to_bytes(model))
            await ch.send(M.TASK, M.encode_task(task_message(model, subset, "t1")))
            t, body = await recv_skip_pings(ch)
            assert t == M.UPDATE
            fresh = Update.from_bytes(body)
            assert {(r, t_) for r, t_, _ in state.pending()} == {("run-old", "t1"), (RUN, "t1")}
            await ch.send(M.ACK, M.encode_json({"task_id": "t1", "run_id": "run-old", "accepted": False,
                                                "reason": "other_run", "message": "this hub runs run-a",
                                                "version": 0}))
            await still_alive(ch)
            assert [(r, t_) for r, t_, _ in state.pending()] == [(RUN, "t1")]
            await ack(ch, "t1")
            await still_alive(ch)
            await ch.close()
            return kept, fresh
        kept, fresh = run(go())
        a.wait_for(r"update t1 of run run-old dropped by the hub: it belongs to another run")
    finally:
        assert a.stop() == 0
    assert (kept.task_id, kept.run_id) == ("t1", "run-old") and (fresh.task_id, fresh.run_id) == ("t1", RUN)
    assert state.pending() == [] and (state.pending_dir / "t2.upd").exists()
    assert not [ln for ln in a.lines if "Traceback" in ln]


def test_a_task_without_a_run_id_is_refused(agent, fleet):
    model, subset = make_model(seed=28)

    async def go():
        ch, _ = await hello(agent.port, fleet["key"])
        await ch.send(M.TASK, M.encode_task(task_message(model, subset, "no-run", run_id="")))
        t, body = await recv_skip_pings(ch)
        await ch.close()
        return t, M.decode_json(body, t)
    t, msg = run(go())
    assert t == M.TASK_FAILED and msg["task_id"] == "no-run" and msg["message"].startswith("TASK: run_id must be")


def test_a_model_whose_weights_alone_exceed_the_budget_is_refused_on_arrival(fleet, tmp_path):
    big = zoo("mlp", (64,), 10, seed=29, hidden=(4096, 512))       # ~10 MiB of weights
    a = start_agent(fleet["key"], fleet["data"], tmp_path / "state", "--memory-budget", "1MiB")
    try:
        async def go():
            ch, _ = await hello(a.port, fleet["key"])
            await ch.send(M.MODEL, model_to_bytes(big))
            t, body = await recv_skip_pings(ch)
            ch.abort()
            return t, bytes(body)
        try:
            t, body = run(go())
        except Exception as e:  # a timeout or a dropped connection: say what the agent saw
            raise AssertionError(f"{type(e).__name__}: {e}; the agent's log:\n{a.log_tail()}") from e
    finally:
        assert a.stop() == 0
    assert t == M.ERROR, f"{M.name(t)} {body[:300]!r}; the agent's log:\n{a.log_tail()}"
    reason = M.decode_json(body, t)["message"]
    assert re.fullmatch(r"MODEL: the model's weights alone are \d+(\.\d)? MiB \(\d+(\.\d)? MiB even as int8\); "
                        r"the budget is 1 MiB \(--memory-budget\)",
                        reason), reason
    assert not list((tmp_path / "state" / "models").iterdir())  # not cached


def test_a_model_over_the_budget_as_float32_but_not_as_int8_is_cached(fleet, tmp_path):
    """The hub admits a device whose budget holds w* with int8 frozen layers although the model's
    float32 weights do not fit (found with ftte-tiered: such an agent refused MODEL and re-dialled
    forever); the agent must take the model and leave the pricing to each task's own check.
    Then the same model as the hub installs it for such a run (format version 3: the weights the
    subset does not train int8; version 4: the trained rows too, exactly, from the hub's quantised
    start; the agent says it reads both): the same task gives the same update, bit for bit."""
    model = zoo("mlp", (64,), 10, seed=30, hidden=(256, 256))     # 332 KiB of float32 weights
    a = start_agent(fleet["key"], fleet["data"], tmp_path / "state", "--memory-budget", "200KiB")
    head = Subset.of(model, {"fc2": {"rows": [3, 9], "bias": True}, "fc3": {"rows": "all", "bias": True}})
    quantize_trained_rows(model, [head])
    blobs = [model_to_bytes(model), install_bytes(model, head, "int8", model_format=3),
             install_bytes(model, head, "int8")]
    assert len(blobs[1]) < 0.45 * len(blobs[0]) and len(blobs[2]) < len(blobs[1]) - 2 * 256 * 3
    try:
        async def go():
            ch, info = await hello(a.port, fleet["key"])
            assert info["model_format"] == 4
            got = []
            for i, blob in enumerate(blobs):
                await ch.send(M.MODEL, blob)
                config = TaskConfig(lr=0.05, batch_size=16, max_steps=2, frozen="int8")
                got.append(await answer_to(ch, model, head, f"int8-fits-{i}", config, blob))
            ch.abort()
            return got
        got = run(go())
    finally:
        assert a.stop() == 0
    for t, body in got:
        assert t == M.UPDATE, (M.name(t), body[:300])
    assert sorted(p.read_bytes() for p in (tmp_path / "state" / "models").iterdir()) == sorted(blobs)
    u, *others = (Update.from_bytes(body) for _t, body in got)
    for v in others:
        assert [x.key for x in u.tensors] == [x.key for x in v.tensors]
        for x, y in zip(u.tensors, v.tensors):
            np.testing.assert_array_equal(x.data, y.data)
            np.testing.assert_array_equal(x.scales, y.scales)


def test_a_task_that_fits_only_in_micro_batches_trains(fleet, tmp_path):
    """A device whose budget no one-pass step of the subset fits: the agent refuses the task in one
    pass, and trains it when the task says micro-batches (the hub's search picks them for such a
    device), with the same update as the one-pass step would give, up to float rounding."""
    model = zoo("mlp", (64,), 10, seed=30, hidden=(256, 256))
    head = Subset.of(model, {"fc2": {"rows": [3, 9], "bias": True}, "fc3": {"rows": "all", "bias": True}})
    cost = {m: predict_memory(model, head, 16, frozen="int8", micro_batch=m)["total"] for m in (0, 2)}
    # the agent allows guard.MEMORY_MARGIN (1/8) over its budget; whole KiB for --memory-budget
    budget = -(-int(cost[2] / 1.125) // 1024) * 1024
    assert cost[2] <= budget * 1.125 < cost[0], cost  # (168 KiB on x86-64)
    a = start_agent(fleet["key"], fleet["data"], tmp_path / "state", "--memory-budget", f"{budget // 1024}KiB")
    blob = install_bytes(model, head, "int8")
    try:
        async def go():
            ch, _info = await hello(a.port, fleet["key"])
            await ch.send(M.MODEL, blob)
            got = []
            for micro in (0, 2):
                config = TaskConfig(lr=0.05, batch_size=16, max_steps=2, frozen="int8", micro_batch=micro)
                got.append(await answer_to(ch, model, head, f"micro-{micro}", config, blob))
            ch.abort()
            return got
        (t0, b0), (t2, b2) = run(go())
    finally:
        assert a.stop() == 0
    refused = f"to train; the budget is {budget // 1024} KiB".encode()
    assert t0 == M.TASK_FAILED and refused in b0, (M.name(t0), b0[:300])
    assert t2 == M.UPDATE, (M.name(t2), b2[:300])
    u = Update.from_bytes(b2)
    ref = model.copy()  # the same two steps in one pass, in process, on the agent's data and seed
    res = LocalWorker(ref, head).run(subset_values(ref, head), 0, fleet["local"].x, fleet["local"].y,
                                     TaskConfig(lr=0.05, batch_size=16, max_steps=2, frozen="int8"), seed=7)
    assert [x.key for x in u.tensors] == [x.key for x in res.update.tensors]
    for x, y in zip(u.tensors, res.update.tensors):  # equal up to one quantisation level
        got, want = x.data * x.scales[:, None], y.data * y.scales[:, None]
        np.testing.assert_allclose(got, want, rtol=0, atol=1.01 * float(np.max(y.scales)), err_msg=x.key)
        assert np.abs(got - want).mean() < 0.05 * np.abs(want).mean()


@pytest.mark.slow
def test_downlink_frames_reconstruct_the_hubs_canonical_values(fleet, tmp_path):
    """A real agent resolves downlink frames to exactly the hub's canonical values (it says so by
    checksum on the next connection), refuses a delta from a base it does not hold with
    TASK_FAILED downlink=resync, and recovers from a snapshot."""
    from ftte_core import downlink as DL

    a = start_agent(fleet["key"], fleet["data"], tmp_path / "state")
    model, subset = make_model()
    stream = DL.DownlinkStream(subset_values(model, subset), "hub-stream")
    rng = np.random.default_rng(0)
    true = subset_values(model, subset)

    def next_version(v):
        for k in true:
            true[k] = (true[k] + 0.01 * rng.standard_normal(true[k].shape)).astype(np.float32)
        stream.publish(v, true)

    async def task(ch, tid, v, held):
        frame = stream.frame_for(held, v)
        await ch.send(M.TASK, M.encode_task(task_message(model, subset, tid, version=v, values={}),
                                            downlink_blob=DL.encode_frame(frame)))
        t, body = await recv_skip_pings(ch)
        return frame, t, body

    async def go():
        ch, info = await hello(a.port, fleet["key"])
        assert info["downlink"] == {"format": 1, "direct": True}   # holds nothing yet
        await ch.send(M.MODEL, model_to_bytes(model))
        next_version(0)
        frame, t, body = await task(ch, "d0", 0, DL.ORIGIN)  # from the model file's values
        assert frame.kind == "delta" and t == M.UPDATE, (M.name(t), bytes(body)[:200])
        upd = Update.from_bytes(body)
        assert upd.base_version == 0
        await ack(ch, "d0")
        next_version(3)
        frame, t, body = await task(ch, "d1", 3, 0)           # a chain of one step from version 0
        assert frame.kind == "delta" and [v for v, _ in frame.steps] == [3] and t == M.UPDATE
        await ack(ch, "d1")
        await ch.close()
        ch, info = await hello(a.port, fleet["key"])          # it names what it holds: the hub's canonical v3
        assert info["downlink"] == {"format": 1, "direct": True, "stream": "hub-stream", "version": 3,
                                    "checksum": stream.checksum}
        next_version(4)
        frame, t, body = await task(ch, "d2", 4, 3)
        assert t == M.UPDATE
        await ack(ch, "d2")
        next_version(5)
        wrong = stream.frame_for(4, 5)
        wrong.base, wrong.base_checksum = 2, stream.checksum_of(4)   # a base it does not hold
        await ch.send(M.TASK, M.encode_task(task_message(model, subset, "d3", version=5, values={}),
                                            downlink_blob=DL.encode_frame(wrong)))
        t, body = await recv_skip_pings(ch)
        failed = M.decode_json(body, t)
        assert t == M.TASK_FAILED and failed["downlink"] == "resync" and "holds version 4" in failed["message"]
        frame, t, body = await task(ch, "d4", 5, None)        # the fallback: a snapshot
        assert frame.kind == "snapshot" and t == M.UPDATE
        await ack(ch, "d4")
        await ch.close()
        ch, info = await hello(a.port, fleet["key"])
        assert info["downlink"]["version"] == 5 and info["downlink"]["checksum"] == stream.checksum
        # direct steps: three versions behind, one step from what it holds (v5's values)
        mirror = DL.Mirror("hub-stream", stream.checksum, stream.values, 5)
        for v in (6, 7, 8):
            next_version(v)
        sent = stream.frame_for_device(5, mirror)
        assert sent.frame.kind == "direct" and sent.frame.source == "held"
        await ch.send(M.TASK, M.encode_task(task_message(model, subset, "d5", version=8, values={}),
                                            downlink_blob=DL.encode_frame(sent.frame)))
        t, body = await recv_skip_pings(ch)
        assert t == M.UPDATE and Update.from_bytes(body).base_version == 8, (M.name(t), bytes(body)[:200])
        await ack(ch, "d5")
        await ch.close()
        ch, info = await hello(a.port, fleet["key"])          # a mirror: stream and checksum, no version
        assert info["downlink"] == {"format": 1, "direct": True, "stream": "hub-stream",
                                    "checksum": sent.mirror.checksum}
        next_version(9)
        again = stream.frame_for_device(None, sent.mirror)    # error feedback: from the exact mirror
        assert again.frame.kind == "direct"
        await ch.send(M.TASK, M.encode_task(task_message(model, subset, "d6", version=9, values={}),
                                            downlink_blob=DL.encode_frame(again.frame)))
        t, body = await recv_skip_pings(ch)
        assert t == M.UPDATE
        await ack(ch, "d6")
        next_version(10)
        stale = stream.frame_for_device(None, sent.mirror)    # from the mirror it no longer holds
        await ch.send(M.TASK, M.encode_task(task_message(model, subset, "d7", version=10, values={}),
                                            downlink_blob=DL.encode_frame(stale.frame)))
        t, body = await recv_skip_pings(ch)
        failed = M.decode_json(body, t)
        assert t == M.TASK_FAILED and failed["downlink"] == "resync" and "direct step from values" in failed["message"]
        await ch.close()

    try:
        run(go())
    finally:
        assert a.stop() == 0
    assert not [ln for ln in a.lines if "Traceback" in ln], "\n".join(a.lines)
