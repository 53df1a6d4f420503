"""The fleet on an emulated LAN: hub and agents in separate network namespaces (tests/netlan.py).

Root only (CI runs as root and installs iproute2, nftables, ethtool and ping); elsewhere those tests
are skipped with the reason. The last test (any user) keeps benchmarks/hub_load.py and its fake
agents working against the real hub over loopback. Every process runs inside a namespace on a private 10.77.x.0/24,
so nothing reaches the host's interfaces.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import netlan  # noqa: E402
from slowdev import flag, scaled  # noqa: E402

_UNAVAILABLE = netlan.why_unavailable()
if _UNAVAILABLE and os.environ.get("FTTE_REQUIRE_LAN") == "1":
    # CI runs as root with the tools installed: a skip there would hide a broken set-up
    raise RuntimeError(f"FTTE_REQUIRE_LAN=1 but the LAN tests cannot run: {_UNAVAILABLE}")
needs_netns = pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or "")

DELAY_MS = 30.0
LOSS_PERCENT = 5.0


@pytest.fixture
def lan():
    with netlan.Lan() as lan:
        yield lan


# -- plumbing ------------------------------------------------------------------------------------
@needs_netns
def test_hosts_reach_each_other_across_the_bridge(lan):
    a, b = lan.add_host("a"), lan.add_host("b")
    stats = lan.ping(a, b, count=5, interval=0.02)
    assert stats["received"] == 5, stats
    assert stats["rtt_avg_ms"] < 10, stats


@needs_netns
def test_impaired_link_adds_its_delay_and_loses_frames(lan):
    a = lan.add_host("a")
    slow = lan.add_host("slow", delay_ms=DELAY_MS, loss_percent=20)
    # resolve ARP first: with 20 % loss each way an unanswered ARP request (~36 %) would hold back
    # the 1 s burst of pings below and drop them all while the kernel retries it
    for _ in range(10):
        if lan.ping(a, slow, count=3, interval=0.2)["received"]:
            break
    stats = lan.ping(a, slow, count=100, interval=0.01)
    # the relay holds each direction DELAY_MS, so a round trip is at least twice that
    assert stats["rtt_min_ms"] >= 2 * DELAY_MS - 1, stats
    # not much more (the mean is no measure here: a lost ARP frame holds a ping back a whole second)
    assert stats["rtt_min_ms"] < 2 * DELAY_MS + 20, stats
    # 20 % each way: about 36 % of echoes lost; 100 pings keep this far from flaky
    assert 0.10 <= stats["loss"] <= 0.65, stats


@needs_netns
def test_tcp_crosses_the_impaired_link_intact(lan):
    """Checksums and segmentation survive the relay: a byte stream arrives whole under loss."""
    a = lan.add_host("a")
    slow = lan.add_host("slow", delay_ms=DELAY_MS, loss_percent=LOSS_PERCENT)
    server = lan.popen(slow, [sys.executable, "-c", textwrap.dedent("""
        import hashlib, socket, sys
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 7000)); s.listen(); print("listening", flush=True)
        c, _ = s.accept(); h = hashlib.sha256()
        while True:
            d = c.recv(65536)
            if not d: break
            h.update(d)
        print(h.hexdigest(), flush=True)
    """)], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    payload_script = ("import hashlib, socket; d = bytes(range(256)) * 4096; "
                      f"s = socket.create_connection(('{slow.ip}', 7000), timeout=20); s.sendall(d); s.close(); "
                      "print(hashlib.sha256(d).hexdigest())")
    sent = lan.run(a, [sys.executable, "-c", payload_script], timeout=scaled(60))
    assert sent.returncode == 0, sent.stderr
    received, _ = server.communicate(timeout=scaled(60))
    assert received.strip() == sent.stdout.strip()


_REGISTER = textwrap.dedent("""
    import asyncio, socket, sys
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
    ip, name = sys.argv[1], sys.argv[2]
    async def main():
        zc = AsyncZeroconf(ip_version=IPVersion.V4Only, interfaces=[ip])
        info = AsyncServiceInfo("_ftte._tcp.local.", f"{name}._ftte._tcp.local.", addresses=[socket.inet_aton(ip)],
                                port=7850, properties={"name": name}, server=f"{name}.local.")
        await (await zc.async_register_service(info))
        print("registered", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test closes stdin
        await zc.async_unregister_service(info); await zc.async_close()
    asyncio.run(main())
""")

_BROWSE = textwrap.dedent("""
    import asyncio, sys
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
    ip, want, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    async def main():
        zc = AsyncZeroconf(ip_version=IPVersion.V4Only, interfaces=[ip])
        found, names = {}, asyncio.Queue()
        def on_change(zeroconf, service_type, name, state_change):
            names.put_nowait(name)
        browser = AsyncServiceBrowser(zc.zeroconf, "_ftte._tcp.local.", handlers=[on_change])
        loop = asyncio.get_running_loop(); deadline = loop.time() + limit
        while len(found) < want and loop.time() < deadline:
            try:
                name = await asyncio.wait_for(names.get(), deadline - loop.time())
            except asyncio.TimeoutError:
                break
            info = AsyncServiceInfo("_ftte._tcp.local.", name)
            if await info.async_request(zc.zeroconf, 3000):
                found[name] = info.parsed_scoped_addresses()
        for name, addrs in sorted(found.items()):
            print(name, ",".join(addrs), flush=True)
        await browser.async_cancel(); await zc.async_close()
    asyncio.run(main())
""")


@needs_netns
def test_mdns_service_in_one_namespace_is_found_from_others(lan):
    agent_a, agent_b = lan.add_host("agent-a"), lan.add_host("agent-b", delay_ms=DELAY_MS, loss_percent=LOSS_PERCENT)
    hub = lan.add_host("hub")
    registrars = []
    for host in (agent_a, agent_b):
        proc = lan.popen(host, [sys.executable, "-c", _REGISTER, host.ip, host.name],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "registered"
        registrars.append(proc)
    browse = lan.run(hub, [sys.executable, "-c", _BROWSE, hub.ip, "2", "15"], timeout=scaled(40))
    assert browse.returncode == 0, browse.stderr
    found = dict(line.split(" ", 1) for line in browse.stdout.strip().splitlines())
    assert found == {f"{agent_a.name}._ftte._tcp.local.": agent_a.ip,
                     f"{agent_b.name}._ftte._tcp.local.": agent_b.ip}, browse.stdout
    for proc in registrars:
        proc.stdin.close()
        proc.wait(timeout=scaled(10))


@needs_netns
def test_namespaces_are_gone_after_close():
    with netlan.Lan(prefix=f"fttegone{os.getpid()}") as lan:
        lan.add_host("a")
        lan.add_host("b", delay_ms=5)
        made = set(lan._namespaces)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(line.split()[0] in made for line in listed.splitlines() if line.strip())


# -- the fleet on the emulated LAN -----------------------------------------------------------------
ACCURACY_FLOOR = 0.80   # digits, 3 agents, versions of K=3: 15 versions reached 0.85-0.93 here
# Long enough for the agent behind the lossy link: the two fast agents made 15 versions in ~1 s on
# an AVX-512 machine, and one TCP retransmission timeout on the slow link (200 ms and up, doubling)
# then left its first update out of the run in 3 of 12 runs. 60 versions give it ~4 s; a slower
# machine slows the fast agents, not the link, so the margin only grows there.
MAX_VERSIONS = 60
RUN_TIMEOUT_S = 150


def _write_fleet_files(root):
    from ftte_core import data as ftdata
    from ftte_core.protocol import generate_key, write_key
    key = root / "fleet.key"
    write_key(key, generate_key())
    ds = ftdata.load_bundled("digits")
    train, val = ftdata.train_val_split(ds, val_fraction=0.2, seed=0)
    parts = ftdata.partition_dirichlet(train, 3, alpha=1.0, seed=0, min_size=20)
    ftdata.save_npz(root / "val.npz", val)
    paths = []
    for i, part in enumerate(parts):
        paths.append(root / f"agent{i}.npz")
        ftdata.save_npz(paths[-1], part)
    return key, root / "val.npz", paths


def _tail(path, lines=15):
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@needs_netns
@pytest.mark.slow
def test_hub_trains_agents_across_namespaces_with_one_impaired_link(lan, tmp_path):
    """Hub and 3 agents in 4 namespaces; discovery over mDNS only; one agent behind delay + loss."""
    key, val, data = _write_fleet_files(tmp_path)
    hub = lan.add_host("hub")
    agents = [lan.add_host("agent-a"), lan.add_host("agent-b"),
              lan.add_host("agent-slow", delay_ms=DELAY_MS, loss_percent=LOSS_PERCENT)]
    for host, path in zip(agents, data):
        log = open(tmp_path / f"{host.name}.log", "w")
        lan.popen(host, [sys.executable, "-m", "ftte_agent.cli", "--key", str(key), "--data", str(path),
                         "--state-dir", str(tmp_path / f"state-{host.name}"), "--name", host.name,
                         "--interface", host.ip, "--memory-budget", "64MiB"],
                  stdout=log, stderr=subprocess.STDOUT)
    out = tmp_path / "hub-out"
    t0 = time.monotonic()
    with open(tmp_path / "hub.log", "w") as log:
        hub_proc = lan.popen(hub, [sys.executable, "-m", "ftte_hub.cli", "train", "--key", str(key), "--model", "mlp",
                                   "--val-data", str(val), "--out", str(out), "--min-agents", "3", "--buffer", "3",
                                   "--max-versions", str(MAX_VERSIONS), "--interface", hub.ip, "--wait-timeout", flag(60),
                                   "--log-format", "json"],
                             stdout=log, stderr=subprocess.STDOUT)
        try:
            code = hub_proc.wait(timeout=scaled(RUN_TIMEOUT_S))
        except subprocess.TimeoutExpired:
            code = None
    logs = "\n".join(f"--- {name}\n{_tail(tmp_path / f'{name}.log')}" for name in ["hub"] + [h.name for h in agents])
    assert code == 0, f"hub exit {code} after {time.monotonic() - t0:.0f} s\n{logs}"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["version"] == MAX_VERSIONS, summary
    assert summary["accuracy"] >= ACCURACY_FLOOR, summary
    assert (out / "model.onnx").stat().st_size > 0
    # every agent was found over mDNS at its own namespace's address and contributed, the one behind
    # the delaying, lossy link included
    hub_log = (tmp_path / "hub.log").read_text()
    for host in agents:
        assert f"at {host.ip}:" in hub_log, f"{host.name} ({host.ip}) never reached the hub\n{logs}"
    by_name = {st.get("name"): st for st in summary["agents"].values()}
    for host in agents:
        assert by_name.get(host.name, {}).get("accepted", 0) >= 1, (host.name, summary["agents"])


def test_hub_load_benchmark_runs_against_the_real_hub(tmp_path):
    """A tiny hub_load run: every fake update is accepted and every figure of the table is there."""
    pytest.importorskip("onnx", reason="the hub needs the onnx package (none for armv7)")
    bench = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "hub_load.py")
    r = subprocess.run([sys.executable, bench, "--agents", "6", "--updates", "30", "--buffer", "3", "--train-ms", "0",
                        "--fake-procs", "2", "--subset-params", "20000", "--keep", str(tmp_path)],
                       capture_output=True, text=True, timeout=scaled(120))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["updates accepted / sent"].startswith("30 / "), table
    assert table["merges (versions)"].startswith("10 "), table
    for row in ("merge->next TASK, median", "merge->next TASK, p99", "updates/s", "hub peak RSS",
                "protocol overhead, framing+tag"):
        assert table[row] != "n/a" and row in r.stdout, (row, table)
    assert "fake-agent errors during the run" not in table, table
    # the overhead is real framing: 21 bytes per message over ~7 MB of bodies is a few hundredths of a percent
    assert 0 < float(table["protocol overhead, framing+tag"].split()[0]) < 1.0


@needs_netns
def test_namespaces_of_a_killed_run_are_removed_and_live_ones_kept():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"ftte{dead.pid}h1"
    live = f"ftte{os.getpid()}h99"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = netlan.remove_stale_namespaces()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        assert stale in removed and stale not in listed
        assert live not in removed and live in listed
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
