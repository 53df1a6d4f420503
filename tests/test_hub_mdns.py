"""The hub finds an agent over mDNS (python-zeroconf bound to 127.0.0.1, IPv4 only) and trains with it."""
import asyncio
import socket

from ftte_core import data as ftdata
from ftte_core.messages import SERVICE_TYPE
from ftte_core.protocol import generate_key
from ftte_hub.discovery import parse_peer
from ftte_hub.train import TrainConfig, run_train

from test_hub_fakes import FakeAgent, digits_split
from mdns_support import needs_multicast
from slowdev import scaled
import pytest

# The hub reads and writes ONNX models; 32-bit ARM has no onnx wheels (docs/raspberry-pi.md).
pytest.importorskip("onnx", reason="the hub needs the onnx package (none for armv7)")

KEY = generate_key()


def test_parse_peer():
    assert parse_peer("pi4.local:7000") == ("pi4.local", 7000)
    assert parse_peer("10.0.0.7") == ("10.0.0.7", 7850)
    assert parse_peer("[fe80::1]:99") == ("fe80::1", 99)
    for bad, msg in (("pi:0", "outside"), ("pi:http", "not a number"), (":80", "no host"), ("", "empty")):
        try:
            parse_peer(bad)
        except ValueError as e:
            assert msg in str(e)
        else:
            raise AssertionError(bad)


@needs_multicast
def test_agent_registered_over_mdns_is_found_and_trains(tmp_path):
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    val, parts = digits_split(1)
    vp = tmp_path / "val.npz"
    ftdata.save_npz(vp, val)

    async def main():
        agent = FakeAgent(KEY, parts[0], "mdns-a0")
        await agent.start()
        zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        info = AsyncServiceInfo(SERVICE_TYPE, f"fake-mdns-a0.{SERVICE_TYPE}", addresses=[socket.inet_aton("127.0.0.1")],
                                port=agent.port, properties={"id": "mdns-a0", "proto": "1"}, server="fake-mdns-a0.local.")
        await (await zc.async_register_service(info))
        try:
            cfg = TrainConfig(model="mlp", val_data=str(vp), out=str(tmp_path / "run"), min_agents=1, mdns=True,
                              interfaces=["127.0.0.1"], buffer=1, max_versions=2, batch_size=16, wait_timeout=scaled(20.0))
            return await asyncio.wait_for(run_train(cfg, KEY), scaled(40)), agent
        finally:
            await zc.async_unregister_service(info)
            await zc.async_close()
            await agent.close()

    summary, agent = asyncio.run(main())
    assert summary["version"] == 2 and summary["agents"]["mdns-a0"]["accepted"] == 2
    assert agent.stopped
