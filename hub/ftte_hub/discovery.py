"""Where the agents are: mDNS/DNS-SD browsing (python-zeroconf, IPv4) and static HOST:PORT peers.

Discovery only reports addresses; the fleet dials them and learns who answers from AGENT_INFO,
so two addresses of one agent (mDNS and a --peer, two interfaces) end up as one device.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from ftte_core.messages import DEFAULT_AGENT_PORT, SERVICE_TYPE

from .logs import event

RESOLVE_TIMEOUT_MS = 3000
MAX_SERVICES = 1024        # service names remembered (a flood of announcements cannot grow memory)
MAX_RESOLVING = 64         # resolutions at once

Found = Callable[[str, int, str], None]   # host, port, source ("mdns" | "peer")
Lost = Callable[[str, int], None]
Record = Callable[[str, List[Tuple[str, int]], Dict[str, str]], None]   # service name, addresses, TXT
MAX_TXT_CHARS = 256        # a TXT value kept for the operator (an agent's are short)


def parse_peer(text: str) -> Tuple[str, int]:
    """("host", port) from "host:port", "host" (default port) or "[v6]:port"; ValueError with one line."""
    s = str(text).strip()
    if not s:
        raise ValueError("empty peer address")
    host, port = s, str(DEFAULT_AGENT_PORT)
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"peer {text!r}: unclosed '['")
        host, rest = s[1:end], s[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"peer {text!r}: expected ':PORT' after ']'")
            port = rest[1:]
    elif s.count(":") == 1:
        host, port = s.split(":")
    if not host:
        raise ValueError(f"peer {text!r}: no host")
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"peer {text!r}: port {port!r} is not a number") from None
    if not 0 < p < 65536:
        raise ValueError(f"peer {text!r}: port {p} is outside 1..65535")
    return host, p


class MdnsBrowser:
    """Browse ``SERVICE_TYPE`` on the given IPv4 interfaces (None: all) and report each resolved address."""

    def __init__(self, on_found: Found, on_lost: Optional[Lost] = None, interfaces: Optional[Sequence[str]] = None,
                 on_record: Optional[Record] = None):
        self.on_found, self.on_lost, self.on_record = on_found, on_lost, on_record
        self.interfaces = list(interfaces) if interfaces else None
        self._aiozc = None
        self._browser = None
        self._tasks: Set[asyncio.Task] = set()
        self._known: dict = {}  # service name -> [(host, port)]
        self.answers = 0        # services resolved so far (for "waiting for agents" diagnostics)

    async def start(self) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        kw = {"ip_version": IPVersion.V4Only}
        if self.interfaces:
            kw["interfaces"] = self.interfaces
        self._aiozc = AsyncZeroconf(**kw)
        self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        event("mdns_browse", f"browsing mDNS for {SERVICE_TYPE} on "
              f"{', '.join(self.interfaces) if self.interfaces else 'all IPv4 interfaces'}")

    def _on_change(self, zeroconf, service_type: str, name: str, state_change) -> None:
        # called from zeroconf's loop callbacks: must not block; resolve in a task
        from zeroconf import ServiceStateChange

        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            if len(self._tasks) >= MAX_RESOLVING or (name not in self._known and len(self._known) >= MAX_SERVICES):
                return  # a flood: the fleet caps dialled addresses too (fleet.MAX_MDNS_ADDRESSES)
            t = asyncio.ensure_future(self._resolve(service_type, name))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        elif state_change is ServiceStateChange.Removed:
            for host, port in self._known.pop(name, []):
                if self.on_lost is not None:
                    self.on_lost(host, port)

    async def _resolve(self, service_type: str, name: str) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(service_type, name)
        try:
            ok = await info.async_request(self._aiozc.zeroconf, RESOLVE_TIMEOUT_MS)
        except Exception as e:  # zeroconf raises several kinds on shutdown or bad records
            event("mdns_error", f"mDNS: cannot resolve {name}: {e or type(e).__name__}", logging.WARNING)
            return
        if not ok or not info.port:
            event("mdns_error", f"mDNS: {name} did not resolve within {RESOLVE_TIMEOUT_MS} ms", logging.WARNING)
            return
        addrs = info.parsed_scoped_addresses(IPVersion.V4Only)
        found: List[Tuple[str, int]] = [(a, int(info.port)) for a in addrs[:8]]
        self._known[name] = found
        self.answers += 1
        for host, port in found:
            self.on_found(host, port, "mdns")
        if self.on_record is not None:
            self.on_record(name, found, txt_properties(info.properties))

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
            if self._aiozc is not None:
                await self._aiozc.async_close()
        except Exception:  # shutting down: nothing useful to do with a failure here
            pass


def txt_properties(props) -> Dict[str, str]:
    """An mDNS record's TXT properties as printable text (bytes decoded, values cut short, junk dropped)."""
    out: Dict[str, str] = {}
    for k, v in list((props or {}).items())[:32]:
        try:
            key = k.decode("utf-8") if isinstance(k, bytes) else str(k)
            val = "" if v is None else (v.decode("utf-8") if isinstance(v, bytes) else str(v))
        except UnicodeDecodeError:
            continue
        if key.isprintable() and val.isprintable():
            out[key[:64]] = val[:MAX_TXT_CHARS]
    return out
