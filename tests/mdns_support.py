"""Whether this platform's sockets can do IPv4 multicast, which mDNS needs.

qemu-user (scripts/pi-check's emulated Raspberry Pi userlands) does not translate the multicast
socket options: zeroconf fails there with "Protocol not available". A real Pi has no such limit,
so under emulation the mDNS tests are skipped with this reason instead of failing.
"""
import socket

import pytest


def multicast_unavailable() -> str:
    """'' when IPv4 multicast socket options work here, else the reason they do not."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        return ""
    except OSError as e:
        return f"no IPv4 multicast socket options here ({e.strerror}; qemu-user emulation lacks them), so no mDNS"
    finally:
        s.close()


needs_multicast = pytest.mark.skipif(bool(multicast_unavailable()), reason=multicast_unavailable() or "ok")
