"""Issue 9, finding 4: one agent never aborts a run; bad AGENT_INFOs cost one line (finding 3)."""
import asyncio
import logging

import pytest

from ftte_core import data as ftdata
from ftte_core import messages as M
from ftte_core.channel import Channel
from ftte_core.protocol import generate_key
from ftte_hub import fleet as fleet_mod
from ftte_hub.fleet import parse_agent_info
from ftte_hub.train import TrainConfig, TrainError, run_train

from slowdev import scaled
from test_hub_fakes import FakeAgent, digits_split

pytest.importorskip("onnx", reason="the hub needs the onnx package (none for armv7)")

KEY = generate_key()


def _cfg(tmp_path, val, peers, **kw):
    p = tmp_path / "val.npz"
    ftdata.save_npz(p, val)
    base = dict(model="mlp", val_data=str(p), out=str(tmp_path / "run"), peers=peers, mdns=False, buffer=2,
                max_versions=3, batch_size=16, wait_timeout=scaled(20.0))
    base.update(kw)
    return TrainConfig(**base)


class InfoAgent(FakeAgent):
    """A fake agent whose AGENT_INFO carries ``extra`` fields (overriding the good ones)."""

    def __init__(self, *a, extra=None, raw_info=None, **kw):
        super().__init__(*a, **kw)
        self.extra, self.raw_info = dict(extra or {}), raw_info

    async def _serve(self, ch: Channel):
        if self.raw_info is not None:
            await ch.send(M.AGENT_INFO, self.raw_info)
            try:
                t, body = await ch.recv(timeout=5)
                if t == M.ERROR:
                    self.not_used = M.decode_json(body, M.ERROR)
            except Exception:
                pass
            return
        real_send = ch.send

        async def send(msg_type, body=b""):
            if msg_type == M.AGENT_INFO and self.extra:
                import json
                info = json.loads(body)
                info.update(self.extra)
                body = json.dumps(info).encode()
            await real_send(msg_type, body)
        ch.send = send
        await super()._serve(ch)


def test_too_small_agents_are_not_used_and_the_run_goes_on(tmp_path, caplog):
    val, parts = digits_split(3)

    async def main():
        good = FakeAgent(KEY, parts[0], "good")
        byte = FakeAgent(KEY, parts[1], "byte", budget=1)
        kib = FakeAgent(KEY, parts[2], "kib", budget=10 << 10)
        agents = [good, byte, kib]
        for a in agents:
            await a.start()
        try:
            s = await asyncio.wait_for(run_train(_cfg(tmp_path, val, [a.address for a in agents], min_agents=1), KEY), scaled(120))
            return s, agents
        finally:
            for a in agents:
                await a.close()

    with caplog.at_level(logging.INFO, logger="ftte_hub"):
        summary, (good, byte, kib) = asyncio.run(main())
    assert summary["version"] == 3 and summary["m_min"] == 64 << 20  # the search used the usable agent's budget
    for a in (byte, kib):
        assert a.not_used is not None and a.tasks == 0
        assert "raise --memory-budget to at least" in a.not_used["reason"]
        assert summary["agents"][a.agent_id]["not_used"]
    assert good.tasks > 0
    lines = [r.getMessage() for r in caplog.records if "fake-kib (kib) not used" in r.getMessage()]
    assert len(lines) == 1 and "raise --memory-budget to at least" in lines[0]


def test_min_agents_counts_usable_agents_only(tmp_path):
    val, parts = digits_split(2)

    async def main():
        good = FakeAgent(KEY, parts[0], "good")
        tiny = FakeAgent(KEY, parts[1], "tiny", budget=1)
        for a in (good, tiny):
            await a.start()
        try:
            await run_train(_cfg(tmp_path, val, [good.address, tiny.address], min_agents=2, wait_timeout=3.0), KEY)
        finally:
            for a in (good, tiny):
                await a.close()

    with pytest.raises(TrainError, match=r"only 1 of 2 usable agents"):
        asyncio.run(main())


def test_agent_with_mismatched_data_is_not_used_with_one_line(tmp_path, caplog):
    val, parts = digits_split(3)

    async def main():
        good = FakeAgent(KEY, parts[0], "good")
        shape = InfoAgent(KEY, parts[1], "shape", extra={"input_shape": [3, 32, 32], "num_classes": 10})
        classes = InfoAgent(KEY, parts[2], "classes", extra={"input_shape": [1, 8, 8], "num_classes": 100})
        agents = [good, shape, classes]
        for a in agents:
            await a.start()
        try:
            s = await asyncio.wait_for(run_train(_cfg(tmp_path, val, [a.address for a in agents], min_agents=1), KEY), scaled(120))
            return s, agents
        finally:
            for a in agents:
                await a.close()

    with caplog.at_level(logging.INFO, logger="ftte_hub"):
        summary, (good, shape, classes) = asyncio.run(main())
    assert summary["version"] == 3
    assert shape.tasks == 0 and "shape [3, 32, 32]" in shape.not_used["reason"]
    assert classes.tasks == 0 and "100 classes" in classes.not_used["reason"]
    assert summary["agents"]["shape"]["not_used"] and summary["agents"]["classes"]["not_used"]
    assert sum("fake-shape (shape) not used" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("body, needle", [
    (b'{"agent_id": "deep", "memory_budget": 1, "x": ' + b"[" * 100000 + b"]" * 100000 + b"}", "limit"),
    (b'{"agent_id": "deep", "memory_budget": 1, "x": ' + b"[" * 20000 + b"]" * 20000 + b"}", "nested deeper"),
    (b'{"agent_id": "deep", "memory_budget": 1, "x": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}", "nested deeper"),
    (b'{"agent_id": "big", "memory_budget": 1' + b"0" * 4000 + b"}", "memory_budget"),
    (b'{"agent_id": "fast", "memory_budget": 1000, "speed": 1' + b"0" * 400 + b"}", "speed"),
    (b'{"agent_id": "many", "memory_budget": 1000, "num_samples": 1' + b"0" * 300 + b"}", "num_samples"),
    (b'{"agent_id": "neg", "memory_budget": -5}', "memory_budget"),
    (b'{"agent_id": "str", "memory_budget": "64MiB"}', "memory_budget"),
    (b'{"agent_id": "flt", "memory_budget": 1.5}', "memory_budget"),
    (b'{"agent_id": "spd", "memory_budget": 10, "speed": "fast"}', "speed"),
    (b'{"agent_id": "pend", "memory_budget": 10, "pending": true}', "pending"),
    (b'{"agent_id": "shp", "memory_budget": 10, "input_shape": [1, -8]}', "input_shape"),
    (b'{"agent_id": "mdl", "memory_budget": 10, "models": {"a": 1}}', "models"),
])
def test_malformed_agent_info_is_one_message_error(body, needle):
    with pytest.raises(M.MessageError, match=needle) as e:
        parse_agent_info(body)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_good_agent_info_parses():
    info = parse_agent_info(b'{"agent_id": "a", "memory_budget": 1048576, "speed": 2, "num_classes": 10, '
                            b'"input_shape": [1, 8, 8], "name": "pi", "models": ["x"], "note": "[{\\"]"}')
    assert info["speed"] == 2.0 and isinstance(info["speed"], float) and info["input_shape"] == [1, 8, 8]


def test_hostile_agent_infos_cost_one_line_each_and_the_run_goes_on(tmp_path, caplog):
    # before: RecursionError / OverflowError escaped the session and ended its dial loop silently
    val, parts = digits_split(1)
    bodies = {"deep": b'{"agent_id": "deep", "memory_budget": 1, "x": ' + b"[" * 20000 + b"]" * 20000 + b"}",
              "huge": b'{"agent_id": "huge", "memory_budget": 1' + b"0" * 300 + b"}",
              "fast": b'{"agent_id": "fast", "memory_budget": 67108864, "speed": 1' + b"0" * 400 + b"}"}

    async def main():
        good = FakeAgent(KEY, parts[0], "good")
        bad = [InfoAgent(KEY, None, name, raw_info=body) for name, body in bodies.items()]
        for a in [good] + bad:
            await a.start()
        try:
            cfg = _cfg(tmp_path, val, [good.address] + [a.address for a in bad], min_agents=1)
            return await asyncio.wait_for(run_train(cfg, KEY), scaled(120)), bad
        finally:
            for a in [good] + bad:
                await a.close()

    with caplog.at_level(logging.INFO, logger="ftte_hub"):
        summary, bad = asyncio.run(main())
    assert summary["version"] == 3
    for a in bad:
        assert a.connections >= 1 and a.not_used is not None  # it was told why (ERROR)
        mine = [r for r in caplog.records if f":{a.port} refused" in r.getMessage()]
        assert sum(r.levelno == logging.WARNING for r in mine) == 1  # re-dials do not repeat the warning


def test_mdns_addresses_are_capped(monkeypatch, caplog):
    monkeypatch.setattr(fleet_mod, "MAX_MDNS_ADDRESSES", 5)

    async def main():
        f = fleet_mod.Fleet(KEY, fleet_mod.FleetSettings(connect_timeout=0.5))
        f.coordinator = None
        for i in range(50):
            f.add_address("127.0.0.1", 1000 + i, "mdns")
        f.add_address("127.0.0.1", 2000, "peer")        # --peer is never capped
        n = len(f._addresses)
        f.remove_address("127.0.0.1", 1000)
        f.add_address("127.0.0.1", 1100, "mdns")        # room again after a service went away
        m = len(f._addresses)
        await f.stop("test", grace=1.0)
        return n, m, f.mdns_overflow

    with caplog.at_level(logging.INFO, logger="ftte_hub"):
        n, m, overflow = asyncio.run(main())
    assert n == 6 and m == 6 and overflow == 45
    assert sum("ignoring the rest" in r.getMessage() for r in caplog.records) == 1


def test_a_tarpit_address_holds_its_socket_only_for_the_handshake_timeout(monkeypatch):
    # a neighbour that accepts and never answers: the dial times out, closes the socket, retries
    monkeypatch.setattr(fleet_mod, "HELLO_TIMEOUT", 0.3)
    monkeypatch.setattr(fleet_mod, "BACKOFF_MIN", 0.05)

    async def main():
        conns, ended = [], []

        async def tarpit(reader, writer):
            conns.append(writer)
            await reader.read()  # until the hub closes its end
            ended.append(writer)
            writer.close()

        server = await asyncio.start_server(tarpit, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        f = fleet_mod.Fleet(KEY, fleet_mod.FleetSettings(connect_timeout=0.5))
        f.add_address("127.0.0.1", port, "mdns")
        await asyncio.sleep(2.0)
        open_now = len(conns) - len(ended)
        loop_alive = not f._addresses[("127.0.0.1", port)].done()
        await f.stop("test", grace=1.0)
        server.close()
        await server.wait_closed()
        return len(conns), open_now, loop_alive, f.dial_errors

    n, open_now, alive, errors = asyncio.run(main())
    assert n >= 2 and alive and open_now <= 1
    assert any("handshake" in m for m in errors.values())


def test_validation_data_with_fewer_classes_than_the_agents_is_a_warning(tmp_path, caplog):
    # an ONNX model with 10 outputs, validation data with 5 classes, agents with 10
    import ftte_core as ft

    val, parts = digits_split(2)
    keep = val.y < 5
    few = ftdata.Dataset(val.x[keep], val.y[keep], 5, "val5")
    path = tmp_path / "mlp10.onnx"
    ft.save_onnx(ft.zoo("mlp", (1, 8, 8), 10), str(path))

    async def main():
        agents = [InfoAgent(KEY, parts[i], f"a{i}", extra={"num_classes": 10}) for i in range(2)]
        for a in agents:
            await a.start()
        try:
            cfg = _cfg(tmp_path, few, [a.address for a in agents], min_agents=2, model=str(path))
            return await asyncio.wait_for(run_train(cfg, KEY), scaled(120)), agents
        finally:
            for a in agents:
                await a.close()

    with caplog.at_level(logging.INFO, logger="ftte_hub"):
        summary, agents = asyncio.run(main())
    assert summary["version"] == 3 and all(a.tasks > 0 and a.not_used is None for a in agents)
    warn = [r.getMessage() for r in caplog.records if "the validation data has 5 classes, agent(s)" in r.getMessage()]
    assert len(warn) == 1 and "up to 10: accuracy measures only the validation data's classes" in warn[0]


def test_waiting_for_agents_says_what_discovery_has_seen(tmp_path, caplog, monkeypatch):
    from ftte_hub import train as train_mod

    monkeypatch.setattr(train_mod, "WAIT_DIAGNOSE_S", 0.5)
    monkeypatch.setattr(train_mod, "WAIT_REPORT_S", 0.3)
    val, _ = digits_split(1)
    with caplog.at_level(logging.INFO, logger="ftte_hub"):
        with pytest.raises(TrainError, match=r"only 0 of 1 usable agents after 2 s \(mDNS off, 1 address\(es\) failing "
                                             r"\(127\.0\.0\.1:9: .*\)"):
            asyncio.run(run_train(_cfg(tmp_path, val, ["127.0.0.1:9"], wait_timeout=2.0, connect_timeout=0.5), KEY))
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for agents")]
    assert "--peer" not in waiting[0]          # not in the first lines
    assert any("mDNS off" in m and "127.0.0.1:9" in m and "name agents with --peer HOST:PORT" in m for m in waiting)
