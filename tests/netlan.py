"""An emulated LAN for tests: network namespaces on one bridge, a delaying relay, nftables loss.

    with Lan() as lan:                                   # root only; see why_unavailable()
        hub = lan.add_host("hub")                        # namespace + veth on the bridge, 10.77.x.1
        slow = lan.add_host("slow", delay_ms=40, loss_percent=5)
        lan.run(hub, ["ping", "-c", "1", slow.ip])       # ip netns exec <ns> ...
        proc = lan.popen(slow, [sys.executable, "-m", "ftte_agent.cli", ...])

Topology. The bridge lives in a namespace of its own (the "switch"), so nothing is created in, or
changed on, the host's own namespace: its interfaces and routes are never touched. Every host
namespace gets ``lo`` up, one veth end named ``eth0`` with a private 10.x address, multicast on and
the route ``224.0.0.0/4 dev eth0`` (python-zeroconf needs it for its default interface choice).

Impaired link. A host with ``delay_ms`` is not plugged into the bridge directly: its ``eth0`` is
paired with ``in0`` in a relay namespace, whose ``out0`` is paired with a bridge port. The relay
(``python netlan.py relay``) reads every frame from one side with an AF_PACKET socket and writes
it to the other side ``delay_ms`` later, in both directions. Checksum and segmentation offloads are
turned off on every interface the relay touches: with them on, the kernel hands the relay frames
whose TCP/UDP checksum is still to be filled in (or 64 KiB super-frames), and TCP and mDNS then
fail silently. ``loss_percent`` adds an nftables ``netdev`` egress rule on the host's ``eth0``
(``numgen random mod 100 < N drop``) and the same rule on the relay's ``in0`` toward it, so each
direction loses that share of frames. This kernel has no netem, hence the relay.

Names are unique per process (pid-based) and everything is torn down on ``close()`` (also after a
failure: use the context manager or a fixture finalizer). Deleting a namespace deletes the veth
ends inside it, and with them their peers.
"""
from __future__ import annotations

import heapq
import ipaddress
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

RELAY_READY = "relay ready"
_COMMAND_TIMEOUT = 20.0


def why_unavailable() -> Optional[str]:
    """Why namespace tests cannot run here (a reason for pytest.skip), or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network-namespace tests need root (CI runs them as root)"
    missing = [tool for tool in ("ip", "nft", "ethtool") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install iproute2 nftables ethtool)"
    probe = f"ftteprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_OUR_NAMESPACE = re.compile(r"^ftte(\d+)(sw|h\d+|r\d+)$")


def remove_stale_namespaces() -> List[str]:
    """Delete namespaces an earlier run left behind (killed before its teardown): ours, by name,
    and only those whose creating process is gone."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    removed = []
    for line in listed.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _OUR_NAMESPACE.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    return removed


def sh(args: Sequence[str], timeout: float = _COMMAND_TIMEOUT) -> str:
    """Run a command; a failure raises RuntimeError with the command and its stderr (one line)."""
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[:300]}")
    return r.stdout


@dataclass
class Host:
    name: str
    ns: str
    ip: str
    delay_ms: float = 0.0
    loss_percent: float = 0.0
    relay_ns: Optional[str] = None


class Lan:
    """A bridge in its own namespace and hosts attached to it, addressed in a private /24."""

    def __init__(self, prefix: Optional[str] = None):
        pid = os.getpid()
        self.prefix = prefix or f"ftte{pid}"
        # any private subnet will do: each Lan has a bridge of its own, so runs never see each other
        self.subnet = ipaddress.ip_network(f"10.77.{pid % 250}.0/24")
        self.switch_ns = f"{self.prefix}sw"
        self.hosts: List[Host] = []
        self._namespaces: List[str] = []
        self._relays: List[subprocess.Popen] = []
        self._procs: List[subprocess.Popen] = []
        self._port = 0
        remove_stale_namespaces()
        try:
            self._add_namespace(self.switch_ns)
            sh(["ip", "-n", self.switch_ns, "link", "add", "br0", "type", "bridge"])
            sh(["ip", "-n", self.switch_ns, "link", "set", "br0", "up"])
        except BaseException:
            self.close()
            raise

    # -- building --------------------------------------------------------------------------------
    def add_host(self, name: str, delay_ms: float = 0.0, loss_percent: float = 0.0) -> Host:
        """A namespace with eth0 on the bridge (through the relay when the link is impaired)."""
        index = len(self.hosts) + 1
        ns = f"{self.prefix}h{index}"
        ip = str(self.subnet.network_address + index)
        self._add_namespace(ns)
        host = Host(name=name, ns=ns, ip=ip, delay_ms=delay_ms, loss_percent=loss_percent)
        if delay_ms > 0 or loss_percent > 0:
            host.relay_ns = f"{self.prefix}r{index}"
            self._add_namespace(host.relay_ns)
            # host eth0 <-> relay in0 ; relay out0 <-> bridge port
            sh(["ip", "-n", host.relay_ns, "link", "add", "in0", "type", "veth", "peer", "name", "eth0", "netns", ns])
            port = self._new_port()
            sh(["ip", "-n", host.relay_ns, "link", "add", "out0", "type", "veth", "peer", "name", port,
                "netns", self.switch_ns])
            for dev in ("in0", "out0"):
                self._no_offload(host.relay_ns, dev)
                sh(["ip", "-n", host.relay_ns, "link", "set", dev, "promisc", "on", "up"])
            self._no_offload(ns, "eth0")
            self._no_offload(self.switch_ns, port)
            self._plug(port)
            self._start_relay(host)
        else:
            port = self._new_port()
            sh(["ip", "-n", self.switch_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])
            self._plug(port)
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        sh(["ip", "-n", ns, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0"])
        sh(["ip", "-n", ns, "link", "set", "dev", "eth0", "multicast", "on", "up"])
        sh(["ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])
        if loss_percent > 0:
            self._drop(ns, "eth0", loss_percent)
            self._drop(host.relay_ns, "in0", loss_percent)
        self.hosts.append(host)
        return host

    def _add_namespace(self, ns: str) -> None:
        sh(["ip", "netns", "add", ns])
        self._namespaces.append(ns)

    def _new_port(self) -> str:
        self._port += 1
        return f"p{self._port}"

    def _plug(self, port: str) -> None:
        sh(["ip", "-n", self.switch_ns, "link", "set", port, "master", "br0"])
        sh(["ip", "-n", self.switch_ns, "link", "set", port, "up"])

    @staticmethod
    def _no_offload(ns: str, dev: str) -> None:
        sh(["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "rx", "off", "tso", "off",
            "gso", "off", "gro", "off"])

    @staticmethod
    def _drop(ns: str, dev: str, percent: float) -> None:
        rules = (f'table netdev ftteloss {{\n  chain egress {{\n    type filter hook egress device "{dev}" priority 0;\n'
                 f'    numgen random mod 100 < {int(round(percent))} drop\n  }}\n}}\n')
        r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, capture_output=True,
                           text=True, timeout=_COMMAND_TIMEOUT)
        if r.returncode != 0:
            raise RuntimeError(f"nft in {ns}: exit {r.returncode}: {' '.join(r.stderr.split())[:300]}")

    def _start_relay(self, host: Host) -> None:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.relay_ns, sys.executable, os.path.abspath(__file__), "relay",
             "in0", "out0", str(host.delay_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._relays.append(proc)
        line = proc.stdout.readline().strip()  # the relay prints one line once its sockets are bound
        if line != RELAY_READY:
            proc.kill()
            raise RuntimeError(f"delay relay did not start: {line} {proc.stderr.read()[:300]}")

    # -- using -----------------------------------------------------------------------------------
    @staticmethod
    def exec_args(host: Host, args: Sequence[str]) -> List[str]:
        return ["ip", "netns", "exec", host.ns, *args]

    def run(self, host: Host, args: Sequence[str], timeout: float = 30.0, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.exec_args(host, args), capture_output=True, text=True, timeout=timeout, **kw)

    def popen(self, host: Host, args: Sequence[str], **kw) -> subprocess.Popen:
        """A process in ``host``'s namespace; killed at ``close()`` if still running."""
        proc = subprocess.Popen(self.exec_args(host, args), **kw)
        self._procs.append(proc)
        return proc

    def ping(self, src: Host, dst: Host, count: int = 10, interval: float = 0.05) -> dict:
        """{"sent", "received", "loss", "rtt_avg_ms", ...} from ``ping`` run in ``src``."""
        r = self.run(src, ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "1", dst.ip],
                     timeout=count * interval + 30)
        return parse_ping(r.stdout)

    # -- tearing down ----------------------------------------------------------------------------
    def close(self) -> None:
        for proc in self._procs + self._relays:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._procs.clear()
        self._relays.clear()
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()

    def __enter__(self) -> "Lan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_ping(out: str) -> dict:
    """The summary of iputils ``ping -q`` output."""
    stats = {"sent": 0, "received": 0, "loss": 1.0, "rtt_min_ms": None, "rtt_avg_ms": None, "rtt_max_ms": None}
    for line in out.splitlines():
        if "packets transmitted" in line:
            parts = [p.strip() for p in line.split(",")]
            stats["sent"] = int(parts[0].split()[0])
            stats["received"] = int(parts[1].split()[0])
            stats["loss"] = 1.0 - stats["received"] / stats["sent"] if stats["sent"] else 1.0
        elif line.startswith(("rtt", "round-trip")):
            lo, avg, hi = (float(v) for v in line.split("=")[1].split()[0].split("/")[:3])
            stats.update(rtt_min_ms=lo, rtt_avg_ms=avg, rtt_max_ms=hi)
    return stats


# -- the delaying relay (runs inside the relay namespace) -----------------------------------------
_PACKET_OUTGOING = 4
_ETH_P_ALL = 0x0003


def relay(dev_a: str, dev_b: str, delay_ms: float) -> None:
    """Forward every frame between two interfaces, each held back ``delay_ms``. Runs until killed."""
    socks = {}
    for dev in (dev_a, dev_b):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((dev, 0))
        s.setblocking(False)
        socks[dev] = s
    other = {socks[dev_a]: socks[dev_b], socks[dev_b]: socks[dev_a]}
    delay = delay_ms / 1000.0
    queue: list = []  # (due, sequence, out socket, frame): the sequence keeps each direction in order
    sequence = 0
    print(RELAY_READY, flush=True)
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            try:
                out.send(frame)
            except OSError:
                pass  # a full queue on the far side is a lost frame, as on a wire
        timeout = max(0.0, queue[0][0] - now) if queue else None
        readable, _, _ = select.select(list(other), [], [], timeout)
        for s in readable:
            while True:
                try:
                    frame, addr = s.recvfrom(65536)
                except BlockingIOError:
                    break
                if addr[2] == _PACKET_OUTGOING:
                    continue  # our own transmissions echoed back to the socket
                sequence += 1
                heapq.heappush(queue, (time.monotonic() + delay, sequence, other[s], frame))


def measure(delay_ms: float, loss_percent: float, pings: int) -> None:
    """Print what the emulated links really do: ping RTT and loss, direct and through the relay."""
    with Lan() as lan:
        a, b = lan.add_host("a"), lan.add_host("b")
        slow = lan.add_host("slow", delay_ms=delay_ms, loss_percent=loss_percent)
        print(f"{'link':<44} {'sent':>5} {'lost':>7} {'rtt min/avg/max ms':>24}")
        for label, dst in (("bridge (direct)", b),
                           (f"relay, {delay_ms:g} ms each way, {loss_percent:g}% loss each way", slow)):
            st = lan.ping(a, dst, count=pings, interval=0.01)
            rtt = (f"{st['rtt_min_ms']:.2f}/{st['rtt_avg_ms']:.2f}/{st['rtt_max_ms']:.2f}"
                   if st["rtt_min_ms"] is not None else "-")
            print(f"{label:<44} {st['sent']:>5} {100 * st['loss']:>6.1f}% {rtt:>24}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "relay":
        try:
            relay(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        except KeyboardInterrupt:
            pass
    elif len(sys.argv) == 5 and sys.argv[1] == "measure":
        reason = why_unavailable()
        if reason:
            sys.exit(f"netlan: {reason}")
        measure(float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: netlan.py relay DEV_A DEV_B DELAY_MS | netlan.py measure DELAY_MS LOSS_PERCENT PINGS")
