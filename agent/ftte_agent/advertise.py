"""mDNS / DNS-SD advertisement of one agent (python-zeroconf, IPv4 only).

The service ``<name>-<id6>._ftte._tcp.local.`` points at the agent's TCP port, with TXT
``id, name, proto, budget, speed, arch``. Addresses: the --interface addresses if given (those
present on the host), else every non-loopback IPv4 address of the host. They are polled every
``poll_seconds`` (5 s by default); when the set changes (DHCP lease, Wi-Fi roaming, a cable) the
service is unregistered and registered again on the new set, which is what re-announces it. With
no usable address yet (boot before DHCP) the agent waits and logs once.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable, Dict, List, Optional, Sequence

from ftte_core.messages import SERVICE_TYPE

from .device import ipv4_addresses

log = logging.getLogger("ftte_agent.mdns")

POLL_SECONDS = 5.0
_LABEL_MAX = 63


def instance_name(name: str, agent_id: str) -> str:
    suffix = "-" + agent_id[:6]
    clean = "".join(c if c.isalnum() or c in "-_" else "-" for c in name) or "agent"
    return clean[:_LABEL_MAX - len(suffix)] + suffix


class Advertiser:
    def __init__(self, name: str, agent_id: str, port: int, txt: Dict[str, str],
                 interfaces: Optional[Sequence[str]] = None, poll_seconds: float = POLL_SECONDS,
                 list_addresses: Callable[[], List[str]] = None):
        self.instance = instance_name(name, agent_id)
        self.service_name = f"{self.instance}.{SERVICE_TYPE}"
        self.host = f"ftte-{agent_id[:12]}.local."
        self.port = port
        self.txt = dict(txt)
        self.wanted = list(interfaces) if interfaces else None
        self.poll_seconds = poll_seconds
        self._list_addresses = list_addresses or self._current_addresses
        self.addresses: List[str] = []
        self._zc = None
        self._info = None

    def _current_addresses(self) -> List[str]:
        if self.wanted is None:
            return ipv4_addresses()
        present = set(ipv4_addresses(include_loopback=True))
        return sorted(ip for ip in self.wanted if ip in present)

    async def run(self) -> None:
        """Register, then follow address changes until cancelled (then unregister)."""
        waiting_logged = False
        try:
            while True:
                try:
                    addrs = self._list_addresses()
                except Exception as e:  # a transient error reading interfaces must not stop serving
                    log.warning("mDNS: cannot list addresses (%s); retrying", e)
                    addrs = self.addresses
                if addrs != self.addresses:
                    await self._unregister()
                    self.addresses = addrs
                    if addrs:
                        try:
                            await self._register(addrs)
                            waiting_logged = False
                        except Exception as e:  # e.g. the address vanished mid-way: retry at the next poll
                            log.warning("mDNS: cannot advertise on %s (%s); retrying", ",".join(addrs), e)
                            await self._unregister()
                            self.addresses = []
                if not addrs and not waiting_logged:
                    log.warning("mDNS: no usable IPv4 address yet; will advertise when one appears")
                    waiting_logged = True
                await asyncio.sleep(self.poll_seconds)
        finally:
            await asyncio.shield(self._unregister())

    async def _register(self, addrs: List[str]) -> None:
        from zeroconf import IPVersion, NonUniqueNameException, ServiceInfo
        from zeroconf.asyncio import AsyncZeroconf

        self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only, interfaces=list(addrs))
        self._info = ServiceInfo(SERVICE_TYPE, self.service_name, port=self.port, properties=self.txt,
                                 server=self.host, addresses=[socket.inet_aton(a) for a in addrs])
        try:
            await (await self._zc.async_register_service(self._info))
        except NonUniqueNameException:
            # a stale record of ours (e.g. after kill -9) can still hold the name: take a variant
            await (await self._zc.async_register_service(self._info, allow_name_change=True))
        log.info("mDNS: advertising %s on %s port %d", self._info.name, ",".join(addrs), self.port)

    async def _unregister(self) -> None:
        zc, info = self._zc, self._info
        self._zc = self._info = None
        if zc is None:
            return
        try:
            if info is not None:
                await (await zc.async_unregister_service(info))  # the inner task sends the goodbyes
            log.info("mDNS: withdrew %s", info.name if info else self.service_name)
        except Exception as e:
            log.warning("mDNS: unregister failed (%s)", e)
        finally:
            try:
                await zc.async_close()
            except Exception:
                pass
