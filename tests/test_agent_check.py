"""`ftte-agent --check`: each check on its own (light), and the whole command (slow: measures speed)."""
from __future__ import annotations

import os
import socket
import struct

import pytest
from click.testing import CliRunner

from ftte_agent.check import (Line, check_data, check_key, check_mdns, check_models, check_port, mdns_query_packet,
                              multicast_echo, zoo_memory)
from ftte_agent.cli import main
from ftte_core.data import Dataset, load_bundled, save_npz
from ftte_core.protocol import generate_key, write_key
from mdns_support import multicast_unavailable


def key_and_data(tmp_path):
    """A fleet key file and 120 digits samples in tmp_path (also used by test_hub_agents.py)."""
    key = tmp_path / "fleet.key"
    write_key(key, generate_key())
    ds = load_bundled("digits")
    data = tmp_path / "local.npz"
    save_npz(data, Dataset(ds.x[:120].copy(), ds.y[:120].copy(), ds.num_classes, "local"))
    return {"key": key, "data": data, "root": tmp_path}


@pytest.fixture()
def files(tmp_path):
    return key_and_data(tmp_path)


def test_key_checks(files):
    key = str(files["key"])
    assert check_key(key).status == "ok" and "mode 600" in check_key(key).text
    os.chmod(key, 0o620)
    assert check_key(key).status == "warn"
    os.chmod(key, 0o644)
    line = check_key(key)
    assert line.status == "FAIL" and "chmod o-rwx" in line.text
    bad = files["root"] / "bad.key"
    bad.write_text("ftte-fleet-key v1\nnot hex\n")
    assert check_key(str(bad)).status == "FAIL"
    line = check_key(str(files["root"] / "missing.key"))
    assert line.status == "FAIL" and "ftte-hub keygen" in line.text


def test_data_checks(files):
    line, data = check_data(str(files["data"]))
    assert line.status == "ok" and "120 samples of shape 1x8x8" in line.text and "10 classes" in line.text
    ds = load_bundled("digits")
    keep = ds.y[:200] != 3
    skewed = files["root"] / "skewed.npz"
    save_npz(skewed, Dataset(ds.x[:200][keep], ds.y[:200][keep], ds.num_classes, "skewed"))
    line, data = check_data(str(skewed))
    assert line.status == "warn" and "no samples of class 3" in line.text and data is not None
    junk = files["root"] / "junk.npz"
    junk.write_bytes(b"not a zip file")
    line, data = check_data(str(junk))
    assert line.status == "FAIL" and data is None and "\n" not in line.text


def test_model_lines_follow_the_cost_model(files):
    _, data = check_data(str(files["data"]))
    full, smallest, note = zoo_memory("cnn", data)
    assert 0 < smallest < full and note == ""
    lines = check_models(full, data, ["cnn", "mlp"])
    cnn = [ln for ln in lines if ln.text.startswith("cnn:")]
    assert cnn[0].status == "ok" and "full training fits" in cnn[0].text
    lines = check_models(smallest, data, ["cnn"])
    cnn = [ln for ln in lines if ln.text.startswith("cnn:")]
    assert cnn[0].status == "ok" and "trains a subset" in cnn[0].text
    lines = check_models(1024, data, ["cnn", "mlp"])
    assert lines[-1].status == "FAIL" and "trains no zoo model" in lines[-1].text
    assert all(ln.status == "warn" for ln in lines[:-1])


def test_port_checks():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        port = s.getsockname()[1]
        line = check_port(port, ["127.0.0.1"])
        assert line.status == "FAIL" and f"127.0.0.1:{port}" in line.text and "--port" in line.text
    finally:
        s.close()
    assert check_port(0, ["0.0.0.0"]).status == "ok"
    assert check_port(port, ["127.0.0.1"]).status == "ok"


def test_mdns_query_packet_is_a_ptr_question():
    pkt = mdns_query_packet(0x1234)
    qid, flags, qd, an, ns, ar = struct.unpack_from(">HHHHHH", pkt)
    assert (qid, flags, qd, an, ns, ar) == (0x1234, 0, 1, 0, 0, 0)
    assert pkt[12:] == b"\x05_ftte\x04_tcp\x05local\x00" + struct.pack(">HH", 12, 1)


def test_mdns_checks():
    assert check_mdns(False, [])[0].status == "ok"
    why = multicast_echo("127.0.0.1", timeout=1.0)
    if multicast_unavailable():
        assert why is not None and "multicast" in why
        assert check_mdns(True, ["127.0.0.1"])[0].status == "FAIL"
    elif why is not None:
        pytest.skip(f"multicast loopback does not work here: {why}")
    else:
        assert check_mdns(True, ["127.0.0.1"])[0] == Line("ok", "mdns", "multicast works on 127.0.0.1")


@pytest.mark.slow
def test_check_command(files):
    args = ["--check", "--key", str(files["key"]), "--data", str(files["data"]), "--memory-budget", "1MiB",
            "--port", "0", "--no-mdns"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    topics = [ln.split()[1] for ln in lines[:-1]]
    assert topics[:3] == ["key", "data", "memory"] and "speed" in topics and topics[-2:] == ["port", "mdns"]
    assert lines[-1] == "ready" and all(ln.split()[0] in ("ok", "warn") for ln in lines[:-1])
    os.chmod(files["key"], 0o644)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and res.output.strip().splitlines()[0].startswith("FAIL  key")
    assert "Traceback" not in res.output
