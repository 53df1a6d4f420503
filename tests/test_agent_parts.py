"""ftte-agent's parts in-process: state dir, memory rule, speed, TASK peeking, mDNS re-announcement."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import struct
import time

import pytest

from ftte_agent import device
from ftte_agent.admission import LOG_BURST, Admission, RefusalLog, source_of
from ftte_agent.advertise import Advertiser, instance_name
from ftte_agent.server import peek_task_id
from ftte_agent.state import MAX_CACHED_MODELS, StateDir, StateError, default_state_dir
from ftte_core import messages as M
from ftte_core.modelfile import content_hash, model_to_bytes
from ftte_core.zoo import zoo
from mdns_support import needs_multicast

MIB = 1 << 20


# -- memory rule and speed -------------------------------------------------------------------------
@pytest.mark.parametrize("available, cgroup, expect", [
    (100 * MIB, None, 25 * MIB),          # a quarter
    (40 * MIB, None, 16 * MIB),           # floor
    (20 * MIB, None, 10 * MIB),           # the floor never takes more than half
    (64 << 30, None, 1 << 30),            # cap
    (8 << 30, 200 * MIB, 50 * MIB),       # a tighter cgroup wins
    (100 * MIB, 8 << 30, 25 * MIB),       # a looser one does not
])
def test_default_memory_budget_rule(available, cgroup, expect):
    budget, rule = device.default_memory_budget(available, cgroup)
    assert budget == expect and ("cgroup" in rule) == (cgroup is not None and cgroup < available)


def test_memory_budget_falls_back_without_meminfo(tmp_path, monkeypatch):
    real = device.mem_available
    monkeypatch.setattr(device, "mem_available", lambda: None)
    monkeypatch.setattr(device, "cgroup_memory_available", lambda: None)
    assert device.default_memory_budget() == (device.BUDGET_FALLBACK, "MemAvailable unknown: fallback")
    monkeypatch.setattr(device, "mem_available", real)
    assert device.mem_available(str(tmp_path / "missing")) is None
    (tmp_path / "meminfo").write_text("MemTotal:  1000 kB\nMemAvailable:    2048 kB\n")
    assert device.mem_available(str(tmp_path / "meminfo")) == 2048 * 1024
    (tmp_path / "garbled").write_text("MemAvailable: lots\n")
    assert device.mem_available(str(tmp_path / "garbled")) is None


def _cgroup_tree(tmp_path, proc_lines, files):
    (tmp_path / "cgroup").write_text("\n".join(proc_lines) + "\n")
    for rel, text in files.items():
        f = tmp_path / "sys" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return str(tmp_path / "cgroup"), str(tmp_path / "sys")


@pytest.mark.parametrize("proc_lines, files, expect", [
    (["0::/system.slice/ftte-agent.service"],                      # v2, e.g. systemd MemoryMax=64M
     {"system.slice/ftte-agent.service/memory.max": "67108864\n",
      "system.slice/ftte-agent.service/memory.current": "50331648\n"}, 16 * MIB),
    (["0::/"], {"memory.max": "max\n", "memory.current": "5\n"}, None),   # v2 without a limit
    (["4:memory:/docker/abc", "0::/"],                              # v1 inside a container namespace
     {"memory/memory.limit_in_bytes": str(300 * MIB), "memory/memory.usage_in_bytes": str(100 * MIB)}, 200 * MIB),
    (["4:memory:/", "0::/"], {"memory/memory.limit_in_bytes": "9223372036854771712",
                              "memory/memory.usage_in_bytes": "1000"}, None),   # v1 unlimited
    (["garbage"], {}, None),
])
def test_cgroup_memory_headroom(tmp_path, proc_lines, files, expect):
    proc, root = _cgroup_tree(tmp_path, proc_lines, files)
    assert device.cgroup_memory_available(proc, root) == expect


def test_speed_benchmark_is_short_and_positive():
    t0 = time.perf_counter()
    gflops = device.measure_speed(0.1)
    assert gflops > 0.01 and time.perf_counter() - t0 < 2.0


# -- state dir ---------------------------------------------------------------------------------------
def test_agent_id_is_created_once_and_kept(tmp_path):
    a = StateDir(tmp_path / "s")
    assert StateDir(tmp_path / "s").agent_id == a.agent_id
    assert (tmp_path / "s" / "agent_id").read_text().strip() == a.agent_id
    (tmp_path / "s" / "agent_id").write_text("not hex!\n")
    b = StateDir(tmp_path / "s")
    assert b.agent_id != a.agent_id and len(b.agent_id) == 16


def test_unusable_state_dir_is_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError, match=r"state dir .*not writable"):
        StateDir(tmp_path / "file" / "sub")


def test_default_state_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir("pi-1") == tmp_path / "ftte-agent" / "pi-1"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_state_dir("pi-1") == tmp_path / ".local" / "state" / "ftte-agent" / "pi-1"


def test_model_cache_verifies_hash_and_deletes_corrupt_files(tmp_path):
    s = StateDir(tmp_path)
    blob = model_to_bytes(zoo("mlp", (4,), 2, hidden=(3,)))
    h = content_hash(blob)
    s.put_model(h, blob)
    assert s.has_model(h) and s.get_model(h) == blob and s.verified_models() == [h]
    s.model_path(h).write_bytes(blob[:-1] + b"\x01")
    assert s.get_model(h) is None and not s.model_path(h).exists()
    s.put_model(h, blob)
    (s.models_dir / ("0" * 64 + ".ftm")).write_bytes(blob)        # misnamed
    (s.models_dir / "junk.ftm").write_bytes(b"x")
    assert s.verified_models() == [h]
    assert sorted(p.name for p in s.models_dir.iterdir()) == [h + ".ftm"]
    assert s.get_model("../../etc/passwd") is None and not s.has_model("ABC")
    with pytest.raises(ValueError):
        s.model_path("../x")


def test_model_cache_keeps_the_most_recent(tmp_path):
    s = StateDir(tmp_path)
    hashes = []
    for i in range(MAX_CACHED_MODELS + 3):
        blob = f"model {i}".encode()
        h = content_hash(blob)
        s.put_model(h, blob)
        os.utime(s.model_path(h), ns=(10**18 + i, 10**18 + i))
        hashes.append(h)
    s.put_model(hashes[-1], b"model %d" % (MAX_CACHED_MODELS + 2))  # triggers pruning again
    kept = set(s.verified_models())
    assert len(kept) == MAX_CACHED_MODELS and hashes[-1] in kept and hashes[0] not in kept


@pytest.mark.parametrize("task_id", ["t-1", "../../etc/passwd", "a/b c%20d", "ünï cödé", "x" * 128, "."])
def test_pending_file_names_are_safe_and_round_trip(tmp_path, task_id):
    s = StateDir(tmp_path)
    path = s.put_pending("run-1", task_id, b"update")
    assert path.parent == s.pending_dir / "run-1" and path.name.endswith(".upd") and "/" not in path.name
    assert s.pending() == [("run-1", task_id, path)]
    assert s.drop_pending("run-1", task_id) and s.pending() == [] and not s.drop_pending("run-1", task_id)
    assert not (s.pending_dir / "run-1").exists()  # no empty directory per past run


def test_pending_rejects_empty_and_overlong_ids(tmp_path):
    s = StateDir(tmp_path)
    for bad in ["", "x" * 129]:
        with pytest.raises(ValueError):
            s.pending_path("run-1", bad)
        assert not s.drop_pending("run-1", bad)
    for bad_run in ["", "..", "a/b", "x" * 65]:
        with pytest.raises(ValueError):
            s.pending_path(bad_run, "t1")


def test_pending_is_oldest_first(tmp_path):
    s = StateDir(tmp_path)
    for i, (rid, tid) in enumerate([("r2", "c"), ("r1", "a"), ("r2", "b")]):
        os.utime(s.put_pending(rid, tid, b"u"), ns=(10**18 + i, 10**18 + i))
    assert [(r, t) for r, t, _ in s.pending()] == [("r2", "c"), ("r1", "a"), ("r2", "b")]


def test_pending_is_keyed_by_run_and_task(tmp_path):
    """The same task id in two runs is two updates; dropping one leaves the other."""
    s = StateDir(tmp_path)
    a, b = s.put_pending("run-a", "t1", b"a"), s.put_pending("run-b", "t1", b"b")
    assert a != b and {(r, t) for r, t, _ in s.pending()} == {("run-a", "t1"), ("run-b", "t1")}
    assert s.drop_pending("run-a", "t1") and [(r, t) for r, t, _ in s.pending()] == [("run-b", "t1")]
    assert b.read_bytes() == b"b"


def test_legacy_pending_files_are_listed_apart_and_never_as_pending(tmp_path):
    s = StateDir(tmp_path)
    (s.pending_dir / "t5.upd").write_bytes(b"from an agent before run ids")
    s.put_pending("run-a", "t5", b"u")
    assert [p.name for p in s.legacy_pending()] == ["t5.upd"]
    assert [(r, t) for r, t, _ in s.pending()] == [("run-a", "t5")]


# -- TASK peeking ------------------------------------------------------------------------------------
def test_peek_task_id_from_broken_bodies():
    head = json.dumps({"task_id": "t-9", "run_id": "run-1", "values": "nonsense"}).encode()
    assert peek_task_id(struct.pack("<I", len(head)) + head + b"\x00\x01") == ("t-9", "run-1")
    assert peek_task_id(b"\x01") == (None, "")
    assert peek_task_id(struct.pack("<I", 3) + b"{{{") == (None, "")
    assert peek_task_id(struct.pack("<I", 2) + b"[]") == (None, "")
    assert peek_task_id(struct.pack("<I", 0xFFFFFFFF)) == (None, "")
    head = json.dumps({"task_id": 5}).encode()
    assert peek_task_id(struct.pack("<I", len(head)) + head) == (None, "")
    head = json.dumps({"task_id": "t-9", "run_id": "../x"}).encode()
    assert peek_task_id(struct.pack("<I", len(head)) + head) == ("t-9", "")
    deep = b"[" * 100000 + b"]" * 100000
    assert peek_task_id(struct.pack("<I", len(deep)) + deep) == (None, "")


# -- mDNS ----------------------------------------------------------------------------------------------
def test_instance_name_is_a_valid_dns_label():
    assert instance_name("pi-1", "abcdef0123456789") == "pi-1-abcdef"
    long = instance_name("x" * 100 + ".bad name", "abcdef0123456789")
    assert len(long) <= 63 and long.endswith("-abcdef") and "." not in long and " " not in long


@needs_multicast
def test_readvertises_when_the_address_set_changes():
    """No address -> registered when 127.0.0.1 appears -> withdrawn when it goes, seen by a browser."""
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

    addresses = []
    agent_id = secrets.token_hex(8)  # a unique instance: other test runs may advertise on 127.0.0.1 too
    mine = instance_name("moving", agent_id) + "."

    async def go():
        events = asyncio.Queue()
        zc = AsyncZeroconf(ip_version=IPVersion.V4Only, interfaces=["127.0.0.1"])

        def on_change(zeroconf, service_type, name, state_change):
            if name.startswith(mine):
                events.put_nowait(state_change)
        browser = AsyncServiceBrowser(zc.zeroconf, [M.SERVICE_TYPE], handlers=[on_change])
        adv = Advertiser("moving", agent_id, 7851, {"id": agent_id}, poll_seconds=0.1,
                         list_addresses=lambda: list(addresses))
        task = asyncio.create_task(adv.run())
        try:
            await asyncio.sleep(0.5)
            assert events.empty() and adv.addresses == []
            addresses.append("127.0.0.1")
            assert await asyncio.wait_for(events.get(), 15) is ServiceStateChange.Added
            assert adv.addresses == ["127.0.0.1"]
            addresses.clear()
            assert await asyncio.wait_for(events.get(), 15) is ServiceStateChange.Removed
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await browser.async_cancel()
            await zc.async_close()
    asyncio.run(asyncio.wait_for(go(), 40))


# -- connection admission -------------------------------------------------------------------------
class _Conn:
    """A pending handshake's stand-in: records its eviction."""

    def __init__(self, admission, source, name):
        self.name, self.evicted = name, False
        self.p, self.victims = admission.admit(source, self.evict)

    def evict(self):
        self.evicted = True


def test_admission_a_flood_from_one_source_evicts_its_own_oldest_silent_connection():
    adm = Admission(max_pending=64, max_per_source=4)
    hub = _Conn(adm, "10.0.0.2", "hub")
    flood = [_Conn(adm, "10.0.0.9", f"f{i}") for i in range(4)]
    assert len(adm) == 5 and adm.count("10.0.0.9") == 4
    newer = _Conn(adm, "10.0.0.9", "f4")                 # at its source's bound: its oldest goes
    assert newer.victims == [flood[0].p] and flood[0].evicted and "4 handshakes pending from 10.0.0.9" in flood[0].p.evicted
    for i in range(200):                                  # a long flood never touches the hub
        _Conn(adm, "10.0.0.9", f"g{i}")
    assert not hub.evicted and adm.count("10.0.0.9") == 4 and len(adm) == 5


def test_admission_prefers_evicting_connections_that_sent_no_hello():
    """Same source as the hub (loopback, NAT): the hub's HELLO-sending handshake is kept."""
    adm = Admission(max_pending=64, max_per_source=4)
    silent = [_Conn(adm, "127.0.0.1", f"s{i}") for i in range(2)]
    hub = _Conn(adm, "127.0.0.1", "hub")
    adm.hello(hub.p)
    for i in range(50):
        _Conn(adm, "127.0.0.1", f"t{i}")
    assert all(s.evicted for s in silent) and not hub.evicted
    adm.done(hub.p)                                       # finished: its slot is free
    assert adm.count("127.0.0.1") == 3
    adm.done(hub.p)                                       # idempotent
    assert adm.count("127.0.0.1") == 3
    talkers = [_Conn(adm, "127.0.0.1", f"h{i}") for i in range(4)]
    for t in talkers:
        adm.hello(t.p)                                    # all with a HELLO: the oldest of them goes
    assert [t.evicted for t in talkers] == [False] * 4
    _Conn(adm, "127.0.0.1", "late")
    assert talkers[0].evicted and not talkers[1].evicted


def test_admission_global_bound_evicts_from_the_busiest_source():
    adm = Admission(max_pending=8, max_per_source=4)
    hub = _Conn(adm, "10.0.0.2", "hub")
    a = [_Conn(adm, "10.0.0.7", f"a{i}") for i in range(4)]
    b = [_Conn(adm, "10.0.0.8", f"b{i}") for i in range(3)]
    assert len(adm) == 8
    c = _Conn(adm, "10.0.0.3", "c")                        # a new source: room is made at 10.0.0.7
    assert c.victims == [a[0].p] and "8 handshakes pending" in a[0].p.evicted
    d = _Conn(adm, "10.0.0.4", "d")                        # now 7 and 8 hold 3 each: the older pending's source
    assert d.victims == [a[1].p]
    assert not hub.evicted and not any(x.evicted for x in b) and len(adm) == 8
    with pytest.raises(ValueError):
        Admission(max_pending=4, max_per_source=8)


def test_admission_global_bound_keeps_a_hello_sender_while_silent_ones_remain():
    """Many sources with one silent connection each; the hub's (HELLO sent) is the oldest pending."""
    adm = Admission(max_pending=8, max_per_source=4)
    hub = _Conn(adm, "10.0.0.2", "hub")
    adm.hello(hub.p)
    flood = [_Conn(adm, f"10.1.0.{i}", "f") for i in range(200)]
    assert not hub.evicted and sum(not f.evicted for f in flood) == 7


@pytest.mark.parametrize("host, source", [
    ("192.168.1.20", "192.168.1.20"),
    ("::ffff:192.168.1.20", "192.168.1.20"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("not-an-ip", "not-an-ip"),
])
def test_admission_source_of_an_address(host, source):
    assert source_of(host) == source


class _Clock:
    def __init__(self):
        self.t = 1000.0
        self.timers = []

    def __call__(self):
        return self.t

    def schedule(self, delay, fn):
        timer = _Timer(self.t + delay, fn)
        self.timers.append(timer)
        return timer

    def advance(self, dt):
        end = self.t + dt
        while True:
            due = sorted((t for t in self.timers if not t.cancelled and t.at <= end), key=lambda t: t.at)
            if not due:
                break
            self.timers.remove(due[0])
            self.t = max(self.t, due[0].at)   # each timer runs at its own time
            due[0].fn()
        self.t = end


class _Timer:
    def __init__(self, at, fn):
        self.at, self.fn, self.cancelled = at, fn, False

    def cancel(self):
        self.cancelled = True


def test_refusal_log_turns_a_flood_into_one_line_per_window(caplog):
    import logging
    clock = _Clock()
    logger = logging.getLogger("test_refusal_log")
    rl = RefusalLog(logger, window=10.0, burst=3, clock=clock, schedule=clock.schedule)
    with caplog.at_level("WARNING", logger="test_refusal_log"):
        rl.refused("10.0.0.2", "wrong fleet key", "10.0.0.2:5000: client did not prove the fleet key")
        assert caplog.messages == ["refused 10.0.0.2:5000: client did not prove the fleet key"]
        for _ in range(600):                          # a minute at 100 refusals a second
            for i in range(10):
                kind = "evicted for newer connections" if i % 4 else "no HELLO in time"
                rl.refused("127.0.0.1", kind, f"127.0.0.1:{40000 + i}: whatever")
            clock.advance(0.1)
        lines = list(caplog.messages)
        assert len(lines) <= 3 + 7, lines               # the burst, then one summary per 10 s
        summaries = [ln for ln in lines if ln.startswith("refused/evicted")]
        assert len(summaries) >= 5
        assert "in the last 10 s from 127.0.0.1 (" in summaries[1] and "evicted for newer connections" in summaries[1]
        assert "no HELLO in time" in summaries[1]
        clock.advance(30.0)                             # the flood is over: its last summary comes out
        summaries += [ln for ln in caplog.messages[len(lines):] if ln.startswith("refused/evicted")]
        assert sum(int(ln.split()[1]) for ln in summaries) + 3 == rl.total == 6001  # every refusal counted
        caplog.clear()
        rl.refused("10.0.0.5", "not an FTTE handshake", "10.0.0.5:80: not an FTTE peer")
        assert caplog.messages == ["refused 10.0.0.5:80: not an FTTE peer"]  # one line again, at once


def test_refusal_log_names_the_busiest_sources_and_counts_the_rest(caplog):
    import logging
    clock = _Clock()
    rl = RefusalLog(logging.getLogger("test_refusal_log2"), window=10.0, burst=0, clock=clock, schedule=clock.schedule)
    with caplog.at_level("WARNING", logger="test_refusal_log2"):
        for i in range(8):
            for _ in range(i + 1):
                rl.refused(f"10.0.0.{i}", "closed during the handshake", "x")
        clock.advance(10.0)
    (line,) = caplog.messages
    assert line.startswith("refused/evicted 36 unauthenticated connection(s) in the last 10 s from 10.0.0.7 (8 closed")
    assert "10.0.0.3 (4 closed during the handshake)" in line and "and 3 other source(s)" in line
    assert "10.0.0.2 " not in line


def test_a_stalled_handshake_flood_does_not_keep_a_hub_out_in_process(tmp_path, caplog):
    """The agent's own connection handler on loopback: 64 silent connections, each one the agent
    drops replaced at up to 20/s, and a hub's single attempt gets in (before: refused while 64
    were pending)."""
    import numpy as np

    from ftte_agent.server import Agent, AgentSettings
    from ftte_core.channel import Channel
    from ftte_core.data import Dataset
    from ftte_core.protocol import generate_key
    from handshake_flood import StalledHandshakes

    key = generate_key()
    data = Dataset(np.zeros((4, 3), np.float32), np.zeros(4, np.int32), 2, "tiny")
    agent = Agent(AgentSettings(key=key, data=data, name="t", state=StateDir(tmp_path / "state"),
                                memory_budget=1 << 20, speed=1.0))

    async def main():
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(agent.handle_connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        t0 = loop.time()                                  # unloaded: the slow-device allowance
        r, w = await asyncio.open_connection("127.0.0.1", port)
        ch = await Channel.open(r, w, "client", key, timeout=30)
        await ch.recv(timeout=30)
        await ch.close()
        unloaded = loop.time() - t0
        flood = StalledHandshakes("127.0.0.1", port, size=64, rate=20, total=400)
        await flood.start()
        await asyncio.sleep(0.5)
        t0 = loop.time()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            ch = await Channel.open(r, w, "client", key, timeout=30)   # one attempt, no retry
            msg_type, _ = await ch.recv(timeout=30)
            elapsed = loop.time() - t0
            await ch.close()
        finally:
            await flood.stop()
        await asyncio.sleep(0.1)
        pending = len(agent.admission)
        await agent.shutdown()
        server.close()
        await server.wait_closed()
        return msg_type, elapsed, unloaded, pending, flood

    with caplog.at_level("INFO", logger="ftte_agent"):
        msg_type, elapsed, unloaded, pending, flood = asyncio.run(main())
    assert msg_type == M.AGENT_INFO and elapsed < 5.0 + 20 * unloaded
    assert pending == 0 and flood.opened >= 64
    refusals = [r for r in caplog.records if r.getMessage().startswith("refused")]
    assert agent.refusals.total >= 48 and len(refusals) <= LOG_BURST + 1, [r.getMessage() for r in refusals]
# -- what the agent agrees to train -----------------------------------------------------------------
def _worker_and_data(seed=0):
    import numpy as np
    from ftte_core.data import load_bundled
    from ftte_core.local import LocalWorker
    from ftte_core.subset import Subset
    from ftte_core.update import subset_values
    model = zoo("mlp", (64,), 10, seed=seed, hidden=(16,))
    subset = Subset.of(model, {"fc2": {"rows": "all", "bias": True}})
    ds = load_bundled("digits")
    x, y = ds.x[:64].reshape(64, -1).astype(np.float32), ds.y[:64]
    return LocalWorker(model, subset), subset_values(model, subset), x, y


def test_step_limits_cap_steps_and_seconds_and_cancel_between_steps():
    import threading
    from ftte_core.local import StepLimits, TaskCancelled, TaskConfig
    worker, values, x, y = _worker_and_data()
    cfg = TaskConfig(lr=0.05, batch_size=16, local_epochs=1e5)       # 400,000 steps asked for
    res = worker.run(values, 0, x, y, cfg, limits=StepLimits(max_steps=7))
    assert (res.steps, res.planned_steps, res.capped) == (7, 400_000, "steps")
    t0 = time.monotonic()
    res = worker.run(values, 0, x, y, cfg, limits=StepLimits(max_seconds=0.2))
    assert res.capped == "seconds" and 1 <= res.steps < 400_000 and time.monotonic() - t0 < 30
    res = worker.run(values, 0, x, y, TaskConfig(batch_size=16), limits=StepLimits(max_steps=100))
    assert (res.steps, res.capped) == (4, "")                        # within the caps: trained as asked
    cancel = threading.Event()
    timer = threading.Timer(0.2, cancel.set)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(TaskCancelled):
        worker.run(values, 0, x, y, cfg, limits=StepLimits(cancel=cancel))
    assert time.monotonic() - t0 < 30
    with pytest.raises(TaskCancelled):  # already cancelled: nothing is trained at all
        worker.run(values, 0, x, y, cfg, limits=StepLimits(cancel=cancel))


def test_memory_check_refuses_over_budget_with_a_sentence():
    from ftte_agent.guard import MEMORY_MARGIN, check_memory, size_text, training_memory
    from ftte_core.local import TaskConfig, TaskError
    worker, _, _, _ = _worker_and_data()
    cfg = TaskConfig(batch_size=32)
    need = training_memory(worker.model, worker.subset, cfg, 200)
    assert check_memory(worker.model, worker.subset, cfg, 200, need) == need
    assert check_memory(worker.model, worker.subset, cfg, 200, int(need / (1 + MEMORY_MARGIN)) + 1) == need
    with pytest.raises(TaskError) as e:
        check_memory(worker.model, worker.subset, cfg, 200, need // 2)
    assert str(e.value) == (f"this task needs {size_text(need)} to train; the budget is {size_text(need // 2)} "
                            f"(--memory-budget)")
    # a device with fewer samples than the batch size trains smaller batches: less memory
    assert training_memory(worker.model, worker.subset, cfg, 4) < need
    assert size_text(83.2 * MIB) == "83.2 MiB" and size_text(64 * MIB) == "64 MiB" and size_text(900) == "900 bytes"
