"""A keyless neighbour for tests: keeps N connections stalled in the handshake (they never send a
byte), opening a replacement for every one the agent drops, at most ``rate`` new connections a
second. Loopback only, bounded in count (``total`` connections at most) and in time (the caller
stops it).

    flood = StalledHandshakes("127.0.0.1", port, size=64, rate=20)
    await flood.start()          # the first ``size`` are opened at once
    ...
    await flood.stop()           # closes everything it opened
"""
from __future__ import annotations

import asyncio
from typing import Optional, Set


class StalledHandshakes:
    def __init__(self, host: str, port: int, size: int = 64, rate: float = 20.0, total: int = 2000):
        assert host in ("127.0.0.1", "::1", "localhost"), "the flood is for loopback only"
        self.host, self.port, self.size, self.rate, self.total = host, port, size, rate, total
        self.opened = 0              # connections opened so far
        self.dropped = 0             # connections the agent closed
        self.failed = 0              # connects that failed (e.g. the backlog was full)
        self._live: Set[asyncio.Task] = set()
        self._runner: Optional[asyncio.Task] = None
        self._stop = asyncio.Event()

    @property
    def live(self) -> int:
        return len(self._live)

    async def start(self) -> None:
        for _ in range(self.size):
            await self._open()
        self._runner = asyncio.create_task(self._refill())

    async def stop(self) -> None:
        self._stop.set()
        if self._runner is not None:
            await self._runner
        for t in list(self._live):
            t.cancel()
        await asyncio.gather(*self._live, return_exceptions=True)

    async def _refill(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), 1.0 / self.rate)
            except asyncio.TimeoutError:
                pass
            if not self._stop.is_set() and len(self._live) < self.size and self.opened < self.total:
                await self._open()

    async def _open(self) -> None:
        self.opened += 1
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 5.0)
        except (OSError, asyncio.TimeoutError):
            self.failed += 1
            return
        task = asyncio.create_task(self._hold(reader, writer))
        self._live.add(task)
        task.add_done_callback(self._live.discard)

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1 << 16)   # says nothing; returns when the agent hangs up
            self.dropped += 1
        except OSError:
            self.dropped += 1
        finally:
            writer.close()
