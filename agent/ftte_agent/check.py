"""`ftte-agent --check`: is this device ready to serve? One line per check, exit 1 on a problem.

Checks, in order (docs/agent.md): the key file (readable, well-formed, not weak, its permissions),
the data file (loads; shape, classes, samples per class), the memory budget and what it allows for
each zoo model under the cost model (full training, or only the smallest trainable subset: the
output layer's bias with the frozen layers held int8, which is also the hub's admission floor), the measured training speed, the
TCP port (free to listen on), and mDNS (multicast socket options on each address to advertise,
and an mDNS query sent to 224.0.0.251:5353 coming back through multicast loopback).

A line starts with ``ok``, ``warn`` (works, but worth a look) or ``FAIL`` (the agent would not
work, or not as the maker expects); any FAIL makes the exit status 1. Nothing is written and
nothing is sent but the one mDNS query (the same kind a hub's browser sends).
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import struct
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353
MDNS_ECHO_SECONDS = 1.0       # how long to wait for our own query to come back
CHECK_BATCH = 32              # the hub's default batch size (ftte-hub train --batch-size)


@dataclass
class Line:
    status: str      # "ok" | "warn" | "FAIL"
    topic: str
    text: str

    def __str__(self) -> str:
        return f"{self.status:<4}  {self.topic:<8} {self.text}"


def size_text(n: float) -> str:
    from .guard import size_text as text
    return text(n)


def check_key(path: str) -> Line:
    from ftte_core.protocol import KeyFileError, read_key

    quiet = logging.getLogger("ftte_core.protocol")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its permission warning becomes this check's own line
    try:
        read_key(path)
    except KeyFileError as e:
        return Line("FAIL", "key", str(e))
    finally:
        quiet.setLevel(level)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o007:
        return Line("FAIL", "key", f"{path}: a valid fleet key, but readable by every user (mode {mode:03o}): "
                                   f"chmod o-rwx {path} (0600, or 0640 for a service group)")
    if mode & 0o020:
        return Line("warn", "key", f"{path}: a valid fleet key, writable by its group (mode {mode:03o}): chmod g-w")
    return Line("ok", "key", f"{path}: a valid fleet key, mode {mode:03o}")


def check_data(path: str):
    """(Line, Dataset or None)."""
    import numpy as np

    from ftte_core.data import DataError, load_npz

    try:
        data = load_npz(path)
    except DataError as e:
        return Line("FAIL", "data", str(e)), None
    counts = np.bincount(data.y, minlength=data.num_classes)
    shape = "x".join(str(d) for d in data.feature_shape)
    text = (f"{path}: {len(data):,} samples of shape {shape} ({data.x.dtype}), {data.num_classes} classes, "
            f"{int(counts.min()):,}..{int(counts.max()):,} samples per class")
    if len(data) == 0:
        return Line("FAIL", "data", f"{path}: no samples"), None
    missing = [int(c) for c in np.flatnonzero(counts == 0)]
    if missing:
        text += f"; no samples of class {', '.join(map(str, missing[:8]))}{' ...' if len(missing) > 8 else ''}"
        return Line("warn", "data", text + " (fine for a label-skewed shard)"), data
    return Line("ok", "data", text), data


def zoo_memory(name: str, data):
    """(full training bytes, smallest trainable subset bytes, note) of zoo model ``name`` for ``data``."""
    from ftte_core.cost import predict_memory
    from ftte_core.search import micro_batch_options
    from ftte_core.subset import Subset
    from ftte_core.zoo import default_shape, zoo

    note = ""
    try:
        model = zoo(name, data.feature_shape, data.num_classes)
    except ValueError:  # a model with a fixed input layout (e.g. sensor1d's channels x samples)
        shape, _ = default_shape(name)
        model = zoo(name, shape, data.num_classes)
        note = f" (at its reference input {'x'.join(map(str, shape))}; this data would need `ftte-hub resample`)"
    batch = max(1, min(CHECK_BATCH, len(data)))
    full = int(predict_memory(model, Subset.full(model), batch_size=batch)["total"])
    last = model.param_layers[-1]
    # the hub's search may hold frozen layers int8 and, for a device no one-pass step fits, train in
    # micro-batches (ftte_hub.train.cheapest_subset_bytes)
    bias_only = Subset.of(model, {last.name: {"rows": [], "bias": True}})
    smallest = min(int(predict_memory(model, bias_only, batch_size=batch, frozen="int8", micro_batch=m)["total"])
                   for m in [0] + micro_batch_options(batch))
    return full, smallest, note


def check_models(budget: int, data, names: Optional[Sequence[str]] = None) -> List[Line]:
    """One line per zoo model (``names``: default all); a FAIL line when the budget trains none."""
    from ftte_core.zoo import zoo_names

    from .guard import MEMORY_MARGIN

    allowed = budget * (1 + MEMORY_MARGIN)   # what the agent accepts (guard.check_memory)
    lines, any_fits = [], False
    for name in names or zoo_names():
        try:
            full, smallest, note = zoo_memory(name, data)
        except (ValueError, MemoryError) as e:
            lines.append(Line("warn", "model", f"{name}: cannot be built for this data ({str(e).splitlines()[0][:200]})"))
            continue
        if full <= allowed:
            any_fits = True
            lines.append(Line("ok", "model", f"{name}: full training fits ({size_text(full)}){note}"))
        elif smallest <= allowed:
            any_fits = True
            lines.append(Line("ok", "model", f"{name}: trains a subset (full training needs {size_text(full)}, "
                                             f"the smallest subset {size_text(smallest)}){note}"))
        else:
            lines.append(Line("warn", "model", f"{name}: does not fit (its smallest trainable subset needs "
                                               f"{size_text(smallest)}){note}"))
    if not any_fits:
        lines.append(Line("FAIL", "memory", f"the budget {size_text(budget)} trains no zoo model at all; "
                                            f"raise --memory-budget"))
    return lines


def check_speed(slowdown: float) -> Line:
    from .device import measure_speed

    t0 = time.perf_counter()
    raw = measure_speed()
    took = time.perf_counter() - t0
    text = f"{raw:.2f} GFLOP/s training (zoo mlp benchmark, {took:.1f} s)"
    if slowdown > 1:
        text += f"; advertised {raw / slowdown:.2f} with --slowdown {slowdown:g}"
    return Line("ok", "speed", text)


def check_port(port: int, hosts: Sequence[str]) -> Line:
    if port == 0:
        return Line("ok", "port", "--port 0: any free port (the log names it)")
    for host in hosts:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as asyncio's server does
            s.bind((host, port))
            s.listen(1)
        except OSError as e:
            hint = " (another ftte-agent? choose another with --port)" if e.errno == errno.EADDRINUSE else ""
            return Line("FAIL", "port", f"cannot listen on {host}:{port}: {e.strerror or e}{hint}")
        finally:
            s.close()
    return Line("ok", "port", f"TCP port {port} is free on {', '.join(hosts)}")


def mdns_query_packet(query_id: int) -> bytes:
    """A DNS-SD browse query (PTR _ftte._tcp.local), as a hub sends."""
    name = b"".join(bytes([len(p)]) + p for p in (b"_ftte", b"_tcp", b"local")) + b"\x00"
    return struct.pack(">HHHHHH", query_id, 0, 1, 0, 0, 0) + name + struct.pack(">HH", 12, 1)


def multicast_echo(address: str, timeout: float = MDNS_ECHO_SECONDS) -> Optional[str]:
    """None when an mDNS query sent from ``address`` comes back through multicast loopback, else why not."""
    query_id = int.from_bytes(os.urandom(2), "big") or 1
    packet = mdns_query_packet(query_id)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)   # beside avahi or another agent
            except OSError:
                pass
        try:
            s.bind(("", MDNS_PORT))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                         socket.inet_aton(MDNS_GROUP) + socket.inet_aton(address))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        except OSError as e:
            return f"multicast socket setup failed ({e.strerror or e})"
        try:
            s.sendto(packet, (MDNS_GROUP, MDNS_PORT))
        except OSError as e:
            return f"cannot send to {MDNS_GROUP}:{MDNS_PORT} ({e.strerror or e}; no multicast route?)"
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return f"the query did not come back within {timeout:g} s (multicast loopback off, or filtered)"
            ready, _, _ = select.select([s], [], [], left)
            if ready:
                data, _ = s.recvfrom(9000)
                if data == packet:
                    return None
    finally:
        s.close()


def check_mdns(enabled: bool, interfaces: Sequence[str]) -> List[Line]:
    if not enabled:
        return [Line("ok", "mdns", "off (--no-mdns): the hub needs --peer ADDRESS:PORT")]
    from .device import ipv4_addresses

    try:
        addrs = list(interfaces) or ipv4_addresses()
    except Exception as e:  # ifaddr missing or the interfaces unreadable
        return [Line("FAIL", "mdns", f"cannot list this host's addresses ({e})")]
    if not addrs:
        return [Line("warn", "mdns", "no non-loopback IPv4 address yet: the agent will advertise when one "
                                     "appears (or give --interface)")]
    lines = []
    for a in addrs:
        why = multicast_echo(a)
        lines.append(Line("ok", "mdns", f"multicast works on {a}") if why is None else
                     Line("FAIL", "mdns", f"{a}: {why}; hubs will not find this agent over mDNS (use --no-mdns and "
                                          f"give the hub --peer {a}:PORT)"))
    return lines


def run_checks(key_path: str, data_path: str, budget: int, budget_rule: str, port: int, interfaces: Sequence[str],
               mdns: bool, slowdown: float, emit=print) -> bool:
    """Print one line per check through ``emit``; True when nothing FAILed."""
    ok = True

    def out(line: Line) -> None:
        nonlocal ok
        ok = ok and line.status != "FAIL"
        emit(str(line))

    out(check_key(key_path))
    line, data = check_data(data_path)
    out(line)
    out(Line("ok", "memory", f"budget {size_text(budget)} ({budget_rule})"))
    if data is not None:
        for line in check_models(budget, data):
            out(line)
    out(check_speed(slowdown))
    out(check_port(port, list(interfaces) or ["0.0.0.0"]))
    for line in check_mdns(mdns, interfaces):
        out(line)
    emit("ready" if ok else "not ready: fix the FAIL lines above")
    return ok
