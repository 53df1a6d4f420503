"""Admission of unauthenticated connections: who holds a handshake slot, and how refusals are logged.

Anyone on the LAN can open TCP connections to the agent; only a holder of the fleet key can finish
the handshake. Until it finishes, a connection is *pending* and costs a slot. The bounds:

- time: the peer's HELLO must arrive within ``--hello-timeout`` (2 s) and the whole handshake must
  finish within ``--handshake-timeout`` (10 s); ``Channel.open`` enforces both.
- count: at most ``MAX_PER_SOURCE`` (16) pending handshakes per source (an IPv4 address, or an
  IPv6 /64, since one host owns a whole /64) and ``MAX_PENDING`` (64) in all.

A new connection is always admitted. When a bound is hit, an older pending handshake is
*evicted* instead: one of the new connection's own source when that source is at its bound,
otherwise one of the source holding the most (among sources with a connection that has sent no
HELLO, if there is one; ties: the source with the oldest pending handshake). Within that source,
connections that have not sent a HELLO go first, oldest first. So a flood
from one address evicts only its own connections, and a hub's handshake (it sends its HELLO at
once, and is then one round trip from done) is not the one a silent flood pushes out, even from
the same address.

Refusals are logged by ``RefusalLog``: one line each while they are rare, and under a flood one
summary line per window (10 s) per agent, so a neighbour cannot fill the journal.
"""
from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from ftte_core.channel import ChannelError, HandshakeCutShort, HandshakeTimeout
from ftte_core.protocol import HandshakeError, KeyMismatch, VersionMismatch

MAX_PENDING = 64             # pending handshakes in all
MAX_PER_SOURCE = 16          # pending handshakes per source address (IPv6: per /64)
LOG_WINDOW = 10.0            # seconds per refusal summary
LOG_BURST = 10               # refusals logged one by one per window before summarising
SUMMARY_SOURCES = 5          # sources named in a summary line; the rest are counted


def source_of(host: str) -> str:
    """The unit the per-source cap counts: the IPv4 address, or the /64 of an IPv6 address."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(eq=False)
class PendingHandshake:
    source: str
    seq: int
    evict: Callable[[], Any]        # ends this handshake (cancels its task)
    hello: bool = False             # the peer's HELLO has arrived
    evicted: str = ""               # why it was evicted ("" while it is not)


class Admission:
    """Bookkeeping of pending handshakes and the eviction rule (no I/O: tested in-process)."""

    def __init__(self, max_pending: int = MAX_PENDING, max_per_source: int = MAX_PER_SOURCE):
        if not 1 <= max_per_source <= max_pending:
            raise ValueError(f"Admission: need 1 <= max_per_source <= max_pending, got {max_per_source}, {max_pending}")
        self.max_pending = max_pending
        self.max_per_source = max_per_source
        self._pending: List[PendingHandshake] = []      # arrival order
        self._per_source: Counter = Counter()
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._pending)

    def count(self, source: str) -> int:
        return self._per_source[source]

    def admit(self, source: str, evict: Callable[[], Any]) -> Tuple[PendingHandshake, List[PendingHandshake]]:
        """Register a new connection; returns it and the pending handshakes evicted to make room
        (their ``evict`` has been called and ``evicted`` says why)."""
        victims: List[PendingHandshake] = []
        while self._per_source[source] >= self.max_per_source:
            victims.append(self._evict(self._victim(source),
                                       f"{self._per_source[source]} handshakes pending from {source}"))
        while len(self._pending) >= self.max_pending:
            victims.append(self._evict(self._victim(self._busiest()), f"{len(self._pending)} handshakes pending"))
        p = PendingHandshake(source, next(self._seq), evict)
        self._pending.append(p)
        self._per_source[source] += 1
        return p, victims

    def hello(self, p: PendingHandshake) -> None:
        p.hello = True

    def done(self, p: PendingHandshake) -> None:
        """The handshake ended (finished, failed or evicted); idempotent."""
        if p in self._pending:
            self._pending.remove(p)
            self._per_source[p.source] -= 1
            if not self._per_source[p.source]:
                del self._per_source[p.source]

    def _busiest(self) -> str:
        """The source to evict from at the global bound: one holding a silent connection if any
        does (a HELLO-sending handshake, like a hub's, goes last), then the most pending, then
        the oldest."""
        first: Dict[str, int] = {}
        silent: Set[str] = set()
        for p in self._pending:
            first.setdefault(p.source, p.seq)
            if not p.hello:
                silent.add(p.source)
        return max(self._per_source, key=lambda s: (s in silent, self._per_source[s], -first[s]))

    def _victim(self, source: str) -> PendingHandshake:
        mine = [p for p in self._pending if p.source == source]
        silent = [p for p in mine if not p.hello]
        return (silent or mine)[0]

    def _evict(self, p: PendingHandshake, why: str) -> PendingHandshake:
        self.done(p)
        p.evicted = why
        p.evict()
        return p


def refusal_kind(e: BaseException) -> str:
    """A short name for why a handshake failed, for the summary line."""
    if isinstance(e, HandshakeTimeout):
        return "no HELLO in time" if e.phase == "hello" else "handshake not finished in time"
    if isinstance(e, HandshakeCutShort):
        return "closed during the handshake"
    cause = e.cause if isinstance(e, ChannelError) else None
    if isinstance(cause, KeyMismatch):
        return "wrong fleet key"
    if isinstance(cause, VersionMismatch):
        return "other protocol version"
    if isinstance(cause, HandshakeError):
        return "not an FTTE handshake"
    if cause is not None:
        return "protocol error"
    return "connection error"


@dataclass
class _Window:
    start: float
    logged: int = 0
    counts: Dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    timer: Optional[Any] = None      # the call_later handle that ends the window
    timer_set: bool = False


class RefusalLog:
    """Logs refused or evicted connections: the first ``burst`` of a window one line each, the rest
    as one summary line when the window ends. A window that needed a summary makes the next one
    summary-only (until a whole window passes without refusals), so a steady flood costs one line
    per ``window`` seconds."""

    def __init__(self, logger: logging.Logger, window: float = LOG_WINDOW, burst: int = LOG_BURST,
                 clock: Callable[[], float] = time.monotonic,
                 schedule: Optional[Callable[[float, Callable[[], None]], Any]] = None):
        self.log = logger
        self.window = window
        self.burst = burst
        self.clock = clock
        self._schedule = schedule
        self._w: Optional[_Window] = None
        self._flooded = False
        self._last_end = float("-inf")
        self.total = 0               # every refusal noted

    def refused(self, source: str, kind: str, line: str) -> None:
        """One refused connection: ``line`` is its full one-line reason (starting with the peer)."""
        self.total += 1
        now = self.clock()
        if self._w is not None and now - self._w.start >= self.window:
            self.flush()
        if self._w is None:
            if now - self._last_end >= self.window:
                self._flooded = False    # a quiet window since the last summary
            self._w = _Window(start=now)
        w = self._w
        if not self._flooded and w.logged < self.burst:
            w.logged += 1
            self.log.warning("refused %s", line)
            return
        w.counts[source][kind] += 1
        if not w.timer_set:  # without an event loop the next call after the window summarises
            w.timer_set = True
            w.timer = self._call_later(max(0.0, w.start + self.window - now), self._on_timer)

    def flush(self) -> None:
        """End the current window: log its summary line, if it has one."""
        w, self._w = self._w, None
        if w is None:
            return
        if w.timer is not None:
            w.timer.cancel()
        self._last_end = self.clock()
        self._flooded = bool(w.counts)
        if not w.counts:
            return
        total = sum(sum(c.values()) for c in w.counts.values())
        ranked = sorted(w.counts.items(), key=lambda kv: -sum(kv[1].values()))
        parts = []
        for source, kinds in ranked[:SUMMARY_SOURCES]:
            detail = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
            parts.append(f"{source} ({detail})")
        more = len(ranked) - SUMMARY_SOURCES
        tail = f" and {more} other source(s)" if more > 0 else ""
        self.log.warning("refused/evicted %d unauthenticated connection(s) in the last %g s from %s%s",
                         total, self.window, "; ".join(parts), tail)

    def _on_timer(self) -> None:
        if self._w is not None:
            self._w.timer = None
            self.flush()

    def _call_later(self, delay: float, fn: Callable[[], None]) -> Any:
        if self._schedule is not None:
            return self._schedule(delay, fn)
        try:
            return asyncio.get_running_loop().call_later(delay, fn)
        except RuntimeError:
            return None
