"""`ftte-hub agents`: the status query (protocol flag, the agent's answer) and the listing.

The process tests run real ftte-agent processes on loopback (--peer) with a fake hub from
test_agent.py holding the agent's session, and check that a query during training leaves that
session and the task alone.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ftte_core import messages as M
from ftte_core.protocol import (FLAG_QUERY, Connection, HandshakeError, HandshakeComplete, generate_key, read_key,
                                write_key)
from ftte_hub.agents import (format_table, parse_status, query_agent, row_from_status, row_from_txt, short_size,
                             survey)
from ftte_hub.cli import main
from ftte_hub.discovery import txt_properties
from slowdev import scaled
from test_agent_check import key_and_data
from test_agent import RUN, TIMEOUT, ack, hello, make_model, model_to_bytes, recv_skip_pings, start_agent, \
    task_message


# -- the handshake flag --------------------------------------------------------------------------
def _handshake(client: Connection, server: Connection):
    server.receive_data(client.initiate())
    events = client.receive_data(server.data_to_send())
    events += server.receive_data(client.data_to_send())
    return events


def test_query_flag_reaches_the_server_and_the_session_works():
    key = generate_key()
    client, server = Connection("client", key, flags=FLAG_QUERY), Connection("server", key)
    events = _handshake(client, server)
    assert any(isinstance(e, HandshakeComplete) for e in events)
    assert server.peer_flags == FLAG_QUERY and client.peer_flags == 0
    msgs = server.receive_data(client.send(M.PING, b"{}"))
    assert msgs[0].type == M.PING


def test_unknown_flags_are_refused_and_a_server_sets_none():
    key = generate_key()
    with pytest.raises(ValueError, match="not valid for a server"):
        Connection("server", key, flags=FLAG_QUERY)
    with pytest.raises(ValueError, match="not valid for a client"):
        Connection("client", key, flags=0x02)
    client, server = Connection("client", key), Connection("server", key)
    client._hello = client._hello[:7] + b"\x02" + client._hello[8:]   # a flag this version does not know
    with pytest.raises(HandshakeError, match="unknown flags 0x02"):
        server.receive_data(client.initiate())


# -- parsing and presenting ----------------------------------------------------------------------
def _status(**over):
    info = {"agent_id": "0123456789abcdef", "name": "pi-kitchen", "protocol": 1, "memory_budget": 64 << 20,
            "speed": 1.25, "models": ["a" * 64], "pending": 2, "num_samples": 300, "arch": "aarch64",
            "software": "ftte-agent 0.1.0", "input_shape": [1, 8, 8], "num_classes": 10,
            "hub": "192.168.1.10:40000", "training": 1, "tasks_done": 5, "tasks_failed": 0}
    info.update(over)
    return json.dumps(info).encode()


def test_parse_status_bounds_every_field():
    s = parse_status(_status())
    assert s["hub"] == "192.168.1.10:40000" and s["training"] == 1 and s["arch"] == "aarch64"
    s = parse_status(_status(hub="\x1b[2J", training=-1, tasks_done=True, arch=["x"]))
    assert s["hub"] is None and s["training"] is None and s["tasks_done"] is None and s["arch"] == ""
    with pytest.raises(M.MessageError, match="memory_budget"):
        parse_status(_status(memory_budget="lots"))


def test_rows_and_table():
    r = row_from_status(("10.0.0.7", 7850), "mdns", parse_status(_status()))
    r["addresses"] = [r["address"], "10.0.0.8:7850"]
    assert r["samples"] == 300 and r["models"] == 1 and r["input_shape"] == [1, 8, 8]
    assert r["model_hashes"] == ["a" * 16]
    t = row_from_txt(("10.0.0.9", 7850), txt_properties({b"id": b"feedfacefeedface", b"name": b"pi-zero",
                                                         b"budget": b"524288", b"speed": b"nan", b"arch": b"armv7l",
                                                         b"proto": b"1", b"bad": b"\xff"}))
    assert t["memory_budget"] == 524288 and t["speed"] is None and t["via"] == "mdns" and t["samples"] is None
    t["addresses"] = [t["address"]]
    text = format_table([r, t])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["NAME", "ID", "ADDRESS"]
    assert "pi-kitchen" in lines[1] and "10.0.0.7:7850 +1" in lines[1] and "64 MiB" in lines[1]
    assert "1x8x8" in lines[1] and "192.168.1.10:40000 (training 1)" in lines[1]
    assert "pi-zero" in lines[2] and "512 KiB" in lines[2]
    assert short_size(1536 << 10) == "1.5 MiB" and short_size(100) == "100 B"


def test_survey_of_nothing_and_a_closed_port():
    rows, notes = asyncio.run(survey(generate_key(), [("127.0.0.1", 1)], None, 1.0, mdns=False))
    assert len(rows) == 1 and rows[0]["error"] and rows[0]["agent_id"] is None
    rows, notes = asyncio.run(survey(None, [], None, 0.1, mdns=False))
    assert rows == [] and notes == []


@pytest.mark.parametrize("args, message", [
    (["--peer", "host:port"], "--peer: peer 'host:port': port 'port' is not a number"),
    (["--interface", "eth0"], "--interface 'eth0' is not an IPv4 address"),
    (["--key", "/nonexistent/fleet.key"], "does not exist"),
])
def test_bad_input_is_one_line(args, message):
    res = CliRunner().invoke(main, ["agents", *args])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftte-hub: error:") and message in lines[0], res.output


# -- real agents on loopback ---------------------------------------------------------------------
@pytest.fixture()
def fleet(tmp_path):
    return key_and_data(tmp_path)


def agents_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftte_hub.cli", "agents", *args], capture_output=True, text=True,
                          timeout=scaled(60))


@pytest.mark.slow
def test_query_during_training_leaves_the_hub_session_and_task_alone(fleet):
    # slowdown: the agent holds the task (training, then emulating a slow device) long enough to be asked
    agent = start_agent(fleet["key"], fleet["data"], fleet["root"] / "state", "--slowdown", "200")
    try:
        key = read_key(fleet["key"])

        async def go():
            ch, info = await hello(agent.port, fleet["key"])
            hub_addr = "%s:%d" % ch.writer.get_extra_info("sockname")[:2]
            model, subset = make_model()
            await ch.send(M.MODEL, model_to_bytes(model))
            await ch.send(M.TASK, M.encode_task(task_message(model, subset, f"{RUN}-t1")))
            seen = []
            for _ in range(50):     # until the task is in progress (it is from TASK until UPDATE)
                s = await query_agent("127.0.0.1", agent.port, key, TIMEOUT)
                seen.append(s)
                if s["training"]:
                    break
                await asyncio.sleep(0.05)
            status = seen[-1]
            assert status["agent_id"] == info["agent_id"] and status["hub"] == hub_addr
            assert status["training"] == 1 and status["num_samples"] == 120
            # the CLI, while the task trains: the row names the hub
            res = await asyncio.to_thread(agents_cli, "--key", str(fleet["key"]), "--peer",
                                          f"127.0.0.1:{agent.port}", "--timeout", "1", "--json")
            rows = [r for r in json.loads(res.stdout) if r["address"] == f"127.0.0.1:{agent.port}"]
            assert len(rows) == 1 and rows[0]["hub"] == hub_addr and rows[0]["error"] is None, res.stdout + res.stderr
            assert rows[0]["samples"] == 120 and rows[0]["input_shape"] == [1, 8, 8] and rows[0]["num_classes"] == 10
            # the hub's session is intact and the task's UPDATE arrives on it
            t, body = await recv_skip_pings(ch, timeout=scaled(120))
            assert t == M.UPDATE, M.name(t)
            await ack(ch, f"{RUN}-t1")
            await ch.send(M.PING, M.encode_json({"t": 2.5}))
            t, body = await recv_skip_pings(ch)
            assert t == M.PONG
            await ch.close()
        asyncio.run(asyncio.wait_for(go(), scaled(240)))
        agent.wait_for(r"answered a status query")
        assert not [ln for ln in agent.lines if "supersedes" in ln or "cancelled" in ln], "\n".join(agent.lines)
        assert sum("connected" in ln and "hub " in ln for ln in agent.lines) == 1, "\n".join(agent.lines)
    finally:
        assert agent.stop() == 0
    assert not [ln for ln in agent.lines if "Traceback" in ln], "\n".join(agent.lines)


@pytest.mark.slow
def test_cli_with_and_without_key_and_wrong_key(fleet):
    agent = start_agent(fleet["key"], fleet["data"], fleet["root"] / "state")
    try:
        peer = f"127.0.0.1:{agent.port}"
        res = agents_cli("--key", str(fleet["key"]), "--peer", peer, "--timeout", "1")
        assert res.returncode == 0, res.stderr
        line = [ln for ln in res.stdout.splitlines() if peer in ln]
        assert line and "test-agent" in line[0] and "1x8x8" in line[0] and " 120 " in line[0] and "none" in line[0]
        # without the key: the peer's port is open, nothing more is known
        res = agents_cli("--peer", peer, "--timeout", "1", "--json")
        rows = [r for r in json.loads(res.stdout) if r["address"] == peer]
        assert rows[0]["error"] is None and rows[0]["via"] == "tcp" and rows[0]["samples"] is None
        # another fleet's key: one line naming the failure, exit 1 when nothing answered
        other = fleet["root"] / "other.key"
        write_key(other, generate_key())
        res = agents_cli("--key", str(other), "--peer", peer, "--timeout", "1", "--json")
        rows = [r for r in json.loads(res.stdout) if r["address"] == peer]
        assert "key" in rows[0]["error"], rows
        agent.wait_for(r"answered a status query")
    finally:
        assert agent.stop() == 0


def test_in_process_query_keeps_the_session_and_is_bounded(tmp_path):
    """The agent's own handler on loopback: a hub session, then queries; the session object stays."""
    import numpy as np

    from ftte_agent.server import MAX_QUERIES, Agent, AgentSettings
    from ftte_agent.state import StateDir
    from ftte_core.channel import Channel
    from ftte_core.data import Dataset
    from ftte_hub.agents import QueryError

    key = generate_key()
    data = Dataset(np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1], np.int32), 2, "tiny")
    agent = Agent(AgentSettings(key=key, data=data, name="t", state=StateDir(tmp_path / "state"),
                                memory_budget=1 << 20, speed=1.0, arch="armv7l"))

    async def main():
        server = await asyncio.start_server(agent.handle_connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            hub = await Channel.open(r, w, "client", key, timeout=TIMEOUT)
            assert (await hub.recv(timeout=TIMEOUT))[0] == M.AGENT_INFO
            session = agent.session
            status = await query_agent("127.0.0.1", port, key, TIMEOUT)
            rows, _ = await survey(key, [("127.0.0.1", port)], None, TIMEOUT, mdns=False)
            agent.queries = MAX_QUERIES                  # as if that many were being answered
            with pytest.raises(QueryError):
                await query_agent("127.0.0.1", port, key, TIMEOUT)
            agent.queries = 0
            await hub.send(M.PING, M.encode_json({"t": 1.0}))
            pong = await recv_skip_pings(hub)
            assert agent.session is session and pong[0] == M.PONG
            await hub.close()
            return status, rows, "%s:%d" % hub.writer.get_extra_info("sockname")[:2]
        finally:
            await agent.shutdown()
            server.close()
            await server.wait_closed()

    status, rows, hub_addr = asyncio.run(asyncio.wait_for(main(), scaled(30)))
    assert status["hub"] == hub_addr and status["training"] == 0 and status["num_samples"] == 4
    assert len(rows) == 1 and rows[0]["error"] is None and rows[0]["arch"] == "armv7l"
    assert rows[0]["hub"] == hub_addr and rows[0]["samples"] == 4 and rows[0]["source"] == "peer"
