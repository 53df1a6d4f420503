"""``protocol.Connection`` over asyncio streams: the one adapter the hub and the agent share.

The caller opens or accepts the TCP connection (sockets, addresses and retries belong to the
programs); this only moves bytes between the stream and the sans-IO protocol:

    reader, writer = await asyncio.open_connection(host, port)
    ch = await Channel.open(reader, writer, "client", key, timeout=10)   # handshake or ChannelError
    await ch.send(messages.PING, body)
    msg_type, body = await ch.recv()          # raises ChannelClosed at the end of the stream
    await ch.close()

Every failure is a ``ChannelError`` with a one-line reason naming the peer.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable, Deque, Optional, Tuple

from .protocol import DEFAULT_MAX_FRAME, Closed, Connection, HandshakeComplete, Message, ProtocolError
from .protocol import HandshakeCutShort as HandshakeCutShortError

READ_CHUNK = 1 << 16
CLOSE_LINGER = 1.0  # seconds close() waits for the peer's EOF after its close frame


class ChannelError(ConnectionError):
    """The connection failed: I/O error, timeout, or a protocol defect (one-line reason).

    ``cause``: the ``protocol.ProtocolError`` behind it, if any (for callers that tell kinds apart)."""

    def __init__(self, message: str, cause: Optional[BaseException] = None):
        super().__init__(message)
        self.cause = cause


class HandshakeTimeout(ChannelError):
    """The handshake did not finish in time; ``phase`` is "hello" (the peer's HELLO was late) or
    "handshake" (the whole handshake was)."""

    def __init__(self, message: str, phase: str):
        super().__init__(message)
        self.phase = phase


class HandshakeCutShort(ChannelError):
    """The peer closed the connection mid-handshake (busy, restarting, or not an FTTE peer; never a
    key mismatch, which is named as such)."""


class ChannelClosed(ChannelError):
    """The peer ended the stream (``clean`` tells an authenticated close from a cut)."""

    def __init__(self, message: str, clean: bool):
        super().__init__(message)
        self.clean = clean


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection, peer: str):
        self.reader, self.writer, self.conn, self.peer = reader, writer, conn, peer
        self._inbox: Deque[Tuple[int, bytes]] = deque()
        self._send_lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, role: str, key: bytes,
                   timeout: float = 10.0, max_frame: int = DEFAULT_MAX_FRAME, hello_timeout: Optional[float] = None,
                   on_hello: Optional[Callable[[], None]] = None, flags: int = 0) -> "Channel":
        """Run the handshake (``role``: "client" dials, "server" accepted). Closes the stream on failure.

        ``timeout`` bounds the whole handshake; ``hello_timeout`` (optional, shorter) bounds the wait
        for the peer's HELLO, so a server drops a silent connection long before ``timeout``.
        ``on_hello`` is called once when the peer's HELLO has arrived (the server has answered it).
        ``flags``: the client's HELLO flags (``protocol.FLAG_QUERY``); a server reads the client's
        as ``ch.conn.peer_flags``."""
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        ch = cls(reader, writer, Connection(role, key, max_frame=max_frame, flags=flags), peer)
        try:
            await asyncio.wait_for(ch._handshake(hello_timeout, on_hello), timeout)
        except asyncio.TimeoutError:
            ch.abort()
            raise HandshakeTimeout(f"{peer}: no handshake within {timeout:g} s", "handshake") from None
        except BaseException:
            ch.abort()
            raise
        return ch

    async def _handshake(self, hello_timeout: Optional[float], on_hello: Optional[Callable[[], None]]) -> None:
        if self.conn.role == "client":
            await self._write(self.conn.initiate())
        loop = asyncio.get_running_loop()
        hello_deadline = None if hello_timeout is None else loop.time() + hello_timeout
        hello_seen = False
        while True:
            if hello_seen or hello_deadline is None:
                events = await self._read_events()
            else:
                try:
                    events = await asyncio.wait_for(self._read_events(), max(0.0, hello_deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise HandshakeTimeout(f"{self.peer}: no HELLO within {hello_timeout:g} s "
                                           f"({self.conn.bytes_received} bytes received)", "hello") from None
            if not hello_seen and self.conn.peer_hello_received:
                hello_seen = True
                if on_hello is not None:
                    on_hello()
            for ev in events:
                if isinstance(ev, Message):
                    self._inbox.append((ev.type, ev.body))
            if any(isinstance(ev, HandshakeComplete) for ev in events):
                return

    @property
    def bytes_sent(self) -> int:
        return self.conn.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.conn.bytes_received

    async def send(self, msg_type: int, body: bytes = b"") -> None:
        async with self._send_lock:  # one frame at a time: frames from two tasks must not interleave
            try:
                data = self.conn.send(msg_type, body)
            except ProtocolError as e:
                raise ChannelError(f"{self.peer}: {e}") from None
            await self._write(data)

    async def recv(self, timeout: Optional[float] = None) -> Tuple[int, bytes]:
        """The next message; ``timeout`` seconds without one raises ChannelError."""
        while not self._inbox:
            try:
                events = await asyncio.wait_for(self._read_events(), timeout)
            except asyncio.TimeoutError:
                raise ChannelError(f"{self.peer}: nothing received for {timeout:g} s") from None
            for ev in events:
                if isinstance(ev, Message):
                    self._inbox.append((ev.type, ev.body))
                elif isinstance(ev, Closed):
                    pass  # the EOF that follows ends the stream
        return self._inbox.popleft()

    async def close(self, linger: float = CLOSE_LINGER, reader: Optional[asyncio.Future] = None) -> None:
        """Send the authenticated close (if possible) and close the stream. Never raises.

        After the close frame it half-closes and waits, at most ``linger`` seconds, for the peer's
        EOF: closing a socket that still holds unread bytes (a PING or UPDATE the peer sent
        meanwhile) makes the kernel send a reset, which can destroy the close frame in flight, so
        the peer would log a dropped connection instead of a clean end. Without ``reader`` it reads
        (and discards) until the EOF itself; a caller whose task keeps reading this channel (a recv
        loop) passes that task as ``reader``, and close() waits for it to end (it ends at the EOF)
        instead: two readers of one stream would collide."""
        if self._closed:
            return
        try:
            if self.conn.established and not self.conn.closed:
                async with self._send_lock:
                    self.writer.write(self.conn.close())
                    await asyncio.wait_for(self.writer.drain(), 2.0)
                if linger > 0 and self.writer.can_write_eof():
                    self.writer.write_eof()
                    if reader is not None:
                        await asyncio.wait([reader], timeout=linger)
                    else:
                        await asyncio.wait_for(self._discard_until_eof(), linger)
        except (ProtocolError, OSError, asyncio.TimeoutError, RuntimeError):
            pass
        self.abort()

    async def _discard_until_eof(self) -> None:
        while await self.reader.read(READ_CHUNK):
            pass

    def abort(self) -> None:
        """Close the stream now, without the close frame."""
        self._closed = True
        try:
            self.writer.close()
        except (OSError, RuntimeError):
            pass

    # -- internals ---------------------------------------------------------------------------------
    async def _write(self, data: bytes) -> None:
        if not data:
            return
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (OSError, RuntimeError) as e:
            raise ChannelError(f"{self.peer}: send failed: {e or type(e).__name__}") from None

    async def _read_events(self):
        try:
            data = await self.reader.read(READ_CHUNK)
        except (OSError, RuntimeError) as e:
            raise ChannelError(f"{self.peer}: receive failed: {e or type(e).__name__}") from None
        try:
            if not data:
                self.conn.receive_eof()
                raise ChannelClosed(f"{self.peer}: connection closed"
                                    + ("" if self.conn.clean_close else " without a close frame"),
                                    clean=self.conn.clean_close)
            try:
                events = self.conn.receive_data(data)
            finally:
                # flush handshake replies even after an error: the client's FIN lets a server with
                # another key report a wrong key instead of a bare EOF
                out = self.conn.data_to_send()
                if out:
                    self.writer.write(out)
        except HandshakeCutShortError as e:
            raise HandshakeCutShort(f"{self.peer}: {e}", cause=e) from None
        except ProtocolError as e:
            raise ChannelError(f"{self.peer}: {e}", cause=e) from None
        return events
