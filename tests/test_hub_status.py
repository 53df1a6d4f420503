"""The live status page (hub/ftte_hub/status.py): its snapshot, and its HTTP server's limits.

Every bad request gets one short answer (or the connection is cut) within the server's own
timeouts, never a hang; a slow client never holds up another request. The run test further down
serves a real in-process run against fake agents and reads /status.json while it trains.
"""
import asyncio
import json
import logging
import re
import socket

import pytest

from ftte_hub import status as S
from ftte_hub.logs import event, log

from slowdev import scaled

ANSWER_TIMEOUT = 5.0   # a test waits at most this (scaled) for any answer: a hang fails, never blocks


def _snapshot_counter(payload=None):
    calls = []

    def snap():
        calls.append(1)
        return payload if payload is not None else {"version": len(calls), "accuracy": 0.5, "target_accuracy": None,
                                                    "agents": [{"name": "a", "state": "idle"}]}
    return snap, calls


async def _exchange(port, data: bytes, read=True):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), scaled(ANSWER_TIMEOUT)) if read else (reader, writer)
    finally:
        if read:
            writer.close()


def _status_of(raw: bytes) -> int:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", raw)
    assert m, raw[:200]
    return int(m.group(1))


def _body(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


def _serve(coro_fn, **kw):
    """Run ``coro_fn(server)`` against a StatusServer on 127.0.0.1:0, closing it after."""
    snap = kw.pop("snapshot", None) or _snapshot_counter()[0]

    async def main():
        server = S.StatusServer(snap, "127.0.0.1", 0, **kw)
        await server.start()
        try:
            return await asyncio.wait_for(coro_fn(server), scaled(30))
        finally:
            await asyncio.wait_for(server.close(), scaled(ANSWER_TIMEOUT))
    return asyncio.run(main())


# -- addresses and the ETA ---------------------------------------------------------------------
def test_status_addresses_parse_and_bad_ones_say_why():
    assert S.parse_status_address("127.0.0.1:8787") == ("127.0.0.1", 8787)
    assert S.parse_status_address("0.0.0.0:0") == ("0.0.0.0", 0)
    assert S.parse_status_address("hub.local:80") == ("hub.local", 80)
    assert S.parse_status_address("[::1]:8787") == ("::1", 8787)
    for bad, words in (("8787", "ADDRESS:PORT"), ("127.0.0.1:http", "number"), ("127.0.0.1:70000", "0..65535"),
                       ("::1:8787", "brackets"), ("[nope]:1", "IPv6"), (":8787", "ADDRESS:PORT")):
        with pytest.raises(ValueError, match=words):
            S.parse_status_address(bad)
    assert S.url_of("0.0.0.0", 8787) == "http://127.0.0.1:8787/" and S.url_of("::1", 5) == "http://[::1]:5/"


def test_eta_follows_the_trend_and_says_when_it_cannot():
    rising = [[v, 10.0 * v, 0.5 + 0.01 * v, 1.0] for v in range(10)]       # +0.001 accuracy per second
    e = S.eta(rising, now_s=90.0, target=0.7, max_versions=19)
    assert e["target_s"] == pytest.approx((0.7 - 0.59) / 0.001, rel=1e-6)
    assert e["max_versions_s"] == pytest.approx(100.0)                        # 10 versions at 0.1 per second
    flat = [[v, float(v), 0.5, 1.0] for v in range(10)]
    assert S.eta(flat, 9.0, 0.7, None)["target_s"] is None and "not rising" in S.eta(flat, 9.0, 0.7, None)["target_note"]
    assert S.eta(rising, 90.0, 0.55, None)["target_s"] == 0.0                 # already reached
    assert S.eta(rising, 90.0, None, None)["target_note"] == "no --target-accuracy"
    assert S.eta(rising[:2], 10.0, 0.9, None)["target_s"] is None            # too few merges yet
    assert S.eta([], 0.0, 0.9, 10)["max_versions_s"] is None


def test_recent_events_keep_the_last_lines_of_the_hub_log():
    events = S.RecentEvents(keep=3, keep_merges=2).attach()
    level = log.level
    log.setLevel(logging.INFO)
    try:
        event("agent_joined", "agent pi joined")
        for i in range(5):
            event("merge", f"version {i}")
        event("update_rejected", "an update was rejected", logging.WARNING)
        event("noise", "a debug line", logging.DEBUG)
    finally:
        events.detach()
        log.setLevel(level)
    # merge lines (the curve shows them) do not push the other events out
    assert [e["message"] for e in events.lines] == ["agent pi joined", "version 3", "version 4",
                                                    "an update was rejected"]
    assert events.lines[-1]["event"] == "update_rejected" and events.lines[-1]["level"] == "warning"


# -- the HTTP server ---------------------------------------------------------------------------
def test_page_and_json_are_served_and_the_page_loads_nothing_from_elsewhere():
    async def go(server):
        page = await _exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await _exchange(server.port, b"GET /status.json?t=1 HTTP/1.0\r\n\r\n")
        head = await _exchange(server.port, b"HEAD /status.json HTTP/1.1\r\n\r\n")
        return page, data, head

    page, data, head = _serve(go)
    assert _status_of(page) == 200 and b"Content-Type: text/html" in page
    html = _body(page).decode()
    assert "<svg" in html and "status.json" in html
    # offline on a LAN: no external script, style, font or image, and the CSP forbids them anyway
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", html), "the page references something external"
    assert "@import" not in html and "url(" not in html
    csp = re.search(rb"Content-Security-Policy: ([^\r]*)", page).group(1).decode()
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "unsafe" not in csp
    assert _status_of(data) == 200 and json.loads(_body(data))["agents"][0]["state"] == "idle"
    assert _status_of(head) == 200 and _body(head) == b""
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    assert length == len(_body(data))


@pytest.mark.parametrize("request_bytes, code", [
    (b"POST /status.json HTTP/1.1\r\n\r\n", 405),
    (b"DELETE / HTTP/1.1\r\n\r\n", 405),
    (b"GET /etc/passwd HTTP/1.1\r\n\r\n", 404),
    (b"GET /../status.json HTTP/1.1\r\n\r\n", 404),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"hello\r\n\r\n", 400),
    (b"GET  / HTTP/1.1\r\n\r\n", 400),
    (b"\xff\xfe / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 400),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(80)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nX: 1\r\n", 400),      # the client half-closes in the middle of the head
])
def test_bad_requests_get_one_clear_answer(request_bytes, code):
    async def go(server):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request_bytes)
        writer.write_eof()
        raw = await asyncio.wait_for(reader.read(), scaled(ANSWER_TIMEOUT))
        writer.close()
        return raw

    raw = _serve(go)
    assert _status_of(raw) == code
    assert raw.count(b"\nHTTP/1.1 ") == 0 and b"Connection: close" in raw  # one response
    if code == 405:
        assert b"Allow: GET, HEAD" in raw
    assert _body(raw).endswith(b"\n") and _body(raw).count(b"\n") == 1   # one line saying why


def test_a_slow_client_is_cut_off_and_never_holds_up_others():
    async def go(server):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HT")                       # ... and nothing more (slowloris)
        await writer.drain()
        # meanwhile another client is answered at once
        ok = await asyncio.wait_for(_exchange(server.port, b"GET /status.json HTTP/1.1\r\n\r\n"), scaled(2.0))
        raw = await asyncio.wait_for(reader.read(), scaled(ANSWER_TIMEOUT))
        writer.close()
        return ok, raw

    ok, raw = _serve(go, head_timeout=0.3)
    assert _status_of(ok) == 200
    assert _status_of(raw) == 408 and b"did not arrive within 0.3 s" in raw


def test_connections_over_the_cap_get_503_at_once():
    async def go(server):
        held = []
        for _ in range(2):
            held.append(await asyncio.open_connection("127.0.0.1", server.port))
        loop = asyncio.get_running_loop()
        end = loop.time() + scaled(ANSWER_TIMEOUT)
        while len(server._writers) < 2 and loop.time() < end:   # both are being served (waiting for a head)
            await asyncio.sleep(0.01)
        third = await _exchange(server.port, b"GET / HTTP/1.1\r\n\r\n")
        for reader, writer in held:  # the held ones time out on their own
            raw = await asyncio.wait_for(reader.read(), scaled(ANSWER_TIMEOUT))
            assert _status_of(raw) == 408
            writer.close()
        after = await _exchange(server.port, b"GET / HTTP/1.1\r\n\r\n")
        return third, after

    third, after = _serve(go, max_connections=2, head_timeout=scaled(0.5))
    assert _status_of(third) == 503 and b"Retry-After" in third
    assert _status_of(after) == 200


def test_a_client_that_never_reads_its_answer_is_dropped():
    try:  # an answer larger than the kernel's largest send buffer cannot vanish into it
        send_max = int(open("/proc/sys/net/ipv4/tcp_wmem").read().split()[2])
    except (OSError, ValueError, IndexError):
        send_max = 4 << 20
    big = {"version": 1, "accuracy": None, "target_accuracy": None, "agents": [], "pad": "x" * (send_max + (2 << 20))}

    async def go(server):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /status.json HTTP/1.1\r\n\r\n")
        await writer.drain()
        loop = asyncio.get_running_loop()
        end = loop.time() + scaled(ANSWER_TIMEOUT)
        while server._writers and loop.time() < end:   # the server gives up on it by itself
            await asyncio.sleep(0.05)
        gone = not server._writers
        other = await _exchange(server.port, b"HEAD / HTTP/1.1\r\n\r\n")
        writer.close()
        return gone, other

    gone, other = _serve(go, snapshot=lambda: big, write_timeout=0.3)
    assert gone and _status_of(other) == 200


def test_snapshots_are_built_at_most_once_per_interval():
    snap, calls = _snapshot_counter()

    async def go(server):
        bodies = [_body(await _exchange(server.port, b"GET /status.json HTTP/1.1\r\n\r\n")) for _ in range(5)]
        return bodies

    bodies = _serve(go, snapshot=snap, min_interval=60.0)
    assert len(calls) == 1 and len(set(bodies)) == 1


def test_a_failing_snapshot_answers_500_then_the_last_good_one(caplog):
    state = {"fail": True, "good": 0}

    def snap():
        if state["fail"]:
            raise RuntimeError("a bug in the snapshot")
        state["good"] += 1
        return {"version": state["good"], "agents": []}

    async def go(server):
        first = await _exchange(server.port, b"GET /status.json HTTP/1.1\r\n\r\n")
        state["fail"] = False
        server._json_at = -1e9
        good = await _exchange(server.port, b"GET /status.json HTTP/1.1\r\n\r\n")
        state["fail"] = True
        server._json_at = -1e9
        stale = await _exchange(server.port, b"GET /status.json HTTP/1.1\r\n\r\n")
        page = await _exchange(server.port, b"GET / HTTP/1.1\r\n\r\n")
        return first, good, stale, page

    with caplog.at_level(logging.WARNING, logger="ftte_hub"):
        first, good, stale, page = _serve(go, snapshot=snap)
    assert _status_of(first) == 500 and _status_of(page) == 200
    assert json.loads(_body(good))["version"] == 1 and _body(stale) == _body(good)
    assert sum("cannot build the snapshot" in r.getMessage() for r in caplog.records) == 1


def test_the_json_never_holds_nan():
    async def go(server):
        return await _exchange(server.port, b"GET /status.json HTTP/1.1\r\n\r\n")

    raw = _serve(go, snapshot=lambda: {"loss": S.finite(float("nan")), "accuracy": S.finite(float("inf"))})
    assert json.loads(_body(raw)) == {"loss": None, "accuracy": None}


def test_a_busy_port_or_a_bad_address_is_one_clear_line(tmp_path):
    from ftte_core import data as ftdata
    from ftte_hub.train import TrainConfig, TrainError, run_train

    ftdata.save_npz(tmp_path / "val.npz", ftdata.load_bundled("digits").subset(range(50)))

    async def go():
        holder = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = holder.sockets[0].getsockname()[1]
        cfg = TrainConfig(model="mlp", val_data=str(tmp_path / "val.npz"), out=str(tmp_path / "run"), mdns=False,
                          peers=["127.0.0.1:1"], status=f"127.0.0.1:{port}")
        try:
            with pytest.raises(TrainError) as e:
                await asyncio.wait_for(run_train(cfg, b"k" * 32), scaled(30))
            return str(e.value), port
        finally:
            holder.close()

    message, port = asyncio.run(go())
    assert message.startswith(f"cannot serve the status page on 127.0.0.1:{port}") and "\n" not in message
    with pytest.raises(TrainError, match="ADDRESS:PORT"):
        asyncio.run(run_train(TrainConfig(model="mlp", val_data="v.npz", out=str(tmp_path / "o"), mdns=False,
                                          peers=["h:1"], status="8787"), b"k" * 32))


# -- a real run in this process ---------------------------------------------------------------
@pytest.mark.slow
def test_status_json_follows_a_running_hub(tmp_path):
    """A run over fake agents with --status: /status.json shows the version rising, the curve, every
    agent's state (one refused for its budget, one sending NaN updates), and nothing secret."""
    pytest.importorskip("onnx", reason="the hub needs the onnx package (none for armv7)")
    from ftte_core import data as ftdata
    from ftte_core.protocol import generate_key
    from ftte_hub.fleet import Hooks
    from ftte_hub.train import TrainConfig, run_train
    from test_hub_fakes import FakeAgent, digits_split

    key = generate_key()
    val, parts = digits_split(3)
    ftdata.save_npz(tmp_path / "val.npz", val)
    seen = []
    urls = []

    async def watch():
        while not urls:
            await asyncio.sleep(0.01)
        port = int(urls[0].rsplit(":", 1)[1].strip("/"))
        while True:
            raw = await _exchange(port, b"GET /status.json HTTP/1.1\r\n\r\n")
            if _status_of(raw) == 200:   # (never 503 at this pace: the limit is 20 per second)
                seen.append(json.loads(_body(raw)))
            await asyncio.sleep(0.1)

    async def main():
        small = [p.subset(range(48)) for p in parts]   # a light run: little data, a small subset
        # each task takes at least 0.3 s, so the run trains for over a second however fast this
        # machine is (the snapshot is rebuilt at most every 0.5 s; a too quick run showed only "waiting")
        agents = [FakeAgent(key, small[0], "good0", budget=600 << 10, behaviour="slow", delay=0.3),
                  FakeAgent(key, small[1], "good1", budget=600 << 10, behaviour="slow", delay=0.3),
                  FakeAgent(key, small[2], "nan", behaviour="nan"), FakeAgent(key, small[2], "tiny", budget=1024)]
        for a in agents:
            await a.start()
        cfg = TrainConfig(model="mlp", val_data=str(tmp_path / "val.npz"), out=str(tmp_path / "run"), min_agents=3,
                          peers=[a.address for a in agents], mdns=False, buffer=2, max_versions=5, lr=0.1,
                          batch_size=16, ping_interval=1.0, dead_after=scaled(10.0), wait_timeout=scaled(20.0),
                          status="127.0.0.1:0", target_accuracy=0.99)
        watcher = asyncio.ensure_future(watch())
        try:
            return await asyncio.wait_for(run_train(cfg, key, Hooks(on_status_url=urls.append)), scaled(120))
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            for a in agents:
                await a.close()

    summary = asyncio.run(main())
    assert urls and urls[0].startswith("http://127.0.0.1:")
    training = [s for s in seen if s["phase"] == "training"]
    assert training, [s["phase"] for s in seen]
    last = training[-1]
    assert {"version", "accuracy", "target_accuracy", "agents"} <= set(last)
    assert last["target_accuracy"] == 0.99 and 0 < last["version"] <= summary["version"]
    versions = [s["version"] for s in training]
    assert versions == sorted(versions) and versions[-1] > versions[0]   # it updates while the run goes on
    # the curve holds the evaluated versions (evaluation follows the merges); version 0 is the start model
    assert [p[0] for p in last["curve"]] == list(range(last["accuracy_version"] + 1))
    assert last["accuracy_version"] <= last["version"]
    assert last["curve"][0][2] == pytest.approx(summary["start_accuracy"], abs=1e-6)
    by_id = {a["agent_id"]: a for a in last["agents"]}
    assert set(by_id) == {"good0", "good1", "nan", "tiny"}
    assert by_id["tiny"]["state"] == "not used" and "memory budget" in by_id["tiny"]["why"]
    assert by_id["good0"]["state"] in ("training", "idle") and by_id["good0"]["accepted"] > 0
    assert by_id["good0"]["bytes_out"] > 0 and by_id["good0"]["last_seen_s_ago"] is not None
    assert by_id["nan"]["rejected"] > 0 and sum(by_id["nan"]["rejected_by_reason"].values()) == by_id["nan"]["rejected"]
    assert last["subset"]["chosen"] and last["subset"]["trainable_params"] <= last["subset"]["params"]
    assert last["totals"]["rejected"] >= by_id["nan"]["rejected"]
    assert any(s["phase"] == "waiting" for s in seen) or seen[0]["version"] == 0
    # nothing secret: no key material in any form
    text = json.dumps(seen)
    assert key.hex() not in text and key.hex().upper() not in text
    assert __import__("base64").b64encode(key).decode() not in text


def test_demo_and_train_refuse_a_bad_status_address_in_one_line(tmp_path):
    # without onnx (32-bit ARM) both commands refuse first for that, in their own one line
    pytest.importorskip("onnx", reason="demo and train need the onnx package (none for armv7)")
    from click.testing import CliRunner

    from ftte_hub.cli import main

    runner = CliRunner()
    demo = runner.invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--status", "localhost"])
    assert demo.exit_code == 2 and "ADDRESS:PORT" in demo.output and demo.output.count("\n") == 1
    assert not (tmp_path / "demo").exists()   # refused before anything was made or started
    from ftte_core.protocol import generate_key, write_key

    write_key(tmp_path / "fleet.key", generate_key())
    train = runner.invoke(main, ["train", "--key", str(tmp_path / "fleet.key"), "--model", "mlp", "--val-data",
                                 "v.npz", "--out", str(tmp_path / "run"), "--status", "127.0.0.1:99999"])
    assert train.exit_code == 2 and "0..65535" in train.output and train.output.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_requests_past_the_rate_limit_get_503_and_cost_no_snapshot():
    snap, calls = _snapshot_counter()

    async def go(server):
        raws = await asyncio.gather(*[_exchange(server.port, b"GET /status.json HTTP/1.1\r\n\r\n") for _ in range(10)])
        return [_status_of(raw) for raw in raws], raws

    codes, raws = _serve(go, snapshot=snap, max_rate=3.0, min_interval=0.0)
    # a burst of 3 is answered (a little more on a slow machine: tokens come back at 3 per second)
    assert 3 <= codes.count(200) < 10 and set(codes) == {200, 503}
    assert all(b"too many requests" in raw for raw in raws if _status_of(raw) == 503)
    assert len(calls) == codes.count(200)


def test_the_curve_is_read_back_on_resume_and_stays_bounded(tmp_path):
    from ftte_hub import train as T
    from ftte_hub.fleet import Fleet, FleetSettings, Hooks

    cfg = T.TrainConfig(model="mlp", val_data="unused.npz", out=str(tmp_path))
    lines = [json.dumps({"version": v, "time_s": 1.5 * v, "accuracy": 0.1 * v, "loss": 2.0 - 0.1 * v})
             for v in (1, 2, 3)]
    (tmp_path / T.METRICS).write_text("\n".join(lines) + '\n{"version": 4, "time_s"')  # torn by a crash

    async def go():
        run = T._Run(cfg, Fleet(b"k" * 32, FleetSettings(), Hooks()), Hooks())
        run._read_metrics_versions()
        read_back = [list(p) for p in run.curve]
        for v in range(4, T.CURVE_POINTS + 500):
            run.add_curve_point(v, float(v), 0.5, float("nan"))
        return read_back, run.curve

    read_back, curve = asyncio.run(go())
    assert read_back == [[1, 1.5, 0.1, 1.9], [2, 3.0, 0.2, 1.8], [3, 4.5, 0.3, 1.7]]
    assert len(curve) <= T.CURVE_POINTS and curve[0][0] == 1 and curve[-1][0] == T.CURVE_POINTS + 499
    assert [p[0] for p in curve] == sorted(p[0] for p in curve)


def test_a_snapshot_before_the_start_is_valid_json_even_with_nan_in_the_curve(tmp_path):
    from ftte_hub import train as T
    from ftte_hub.fleet import Fleet, FleetSettings, Hooks

    async def go():
        run = T._Run(T.TrainConfig(model="mlp", val_data="v.npz", out=str(tmp_path), min_agents=3,
                                   target_accuracy=0.9), Fleet(b"k" * 32, FleetSettings(), Hooks()), Hooks())
        run.add_curve_point(0, 1.0, float("nan"), float("inf"))
        run.fleet.infos["gone-1"] = {"agent_id": "gone-1", "name": "pi-gone", "memory_budget": 1 << 20}
        return json.dumps(S.StatusView(run, S.RecentEvents()).snapshot(), allow_nan=False)

    snap = json.loads(asyncio.run(go()))
    assert snap["phase"] == "waiting" and "0 of 3" in snap["phase_detail"]
    assert snap["version"] == 0 and snap["accuracy"] is None and snap["target_accuracy"] == 0.9
    assert snap["curve"] == [[0, 1.0, None, None]] and snap["subset"]["chosen"] is False
    assert [(a["name"], a["state"]) for a in snap["agents"]] == [("pi-gone", "gone")]
