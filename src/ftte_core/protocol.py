"""The fleet's wire protocol, sans-IO: bytes in, events and bytes out. No sockets here.

The agent and hub (asyncio) wrap one ``Connection`` per TCP connection:

    conn = Connection("client", key)               # the side that opens the TCP connection
    writer.write(conn.initiate())
    while data := await reader.read(65536):
        try:
            events = conn.receive_data(data)
        finally:
            writer.write(conn.data_to_send())      # handshake replies; flush even after an error
        for ev in events:                           # HandshakeComplete, Message, Closed
            ...
    conn.receive_eof()                              # EOF mid-handshake / mid-frame is an error
    writer.write(conn.send(MSG_TASK, body))         # only after HandshakeComplete

Handshake (details and the security argument: docs/protocol.md). Each side proves it holds the
32-byte pre-shared fleet key; every later byte is encrypted and authenticated with keys derived
for this connection alone:

    client -> server   HELLO_C  = b"FTTE" | version u16 | role u8 (1) | flags u8 (0; 1 = status query) | nonce_c 32 | epk_c 32
    server -> client   HELLO_S  = b"FTTE" | version u16 | role u8 (2) | flags u8 (0) | nonce_s 32 | epk_s 32
                       FIN_S    = HMAC-SHA256(mac_s, b"server finished" | SHA256(HELLO_C | HELLO_S))
    client -> server   FIN_C    = HMAC-SHA256(mac_c, b"client finished" | SHA256(HELLO_C | HELLO_S))

    aead_c2s | aead_s2c | mac_c | mac_s = HKDF-SHA256(ikm=key | X25519(eph, peer epk),
                 salt=nonce_c | nonce_s, info=b"ftte-fleet v1 keys" | SHA256(HELLO_C | HELLO_S), 128 bytes)

(epk: a fresh X25519 key per connection, so a fleet key stolen later does not decrypt recorded
traffic.) X25519 and ChaCha20-Poly1305 are libsodium's, through PyNaCl; SHA-256, HMAC and so HKDF
(RFC 5869) are the standard library's.

Records (both directions, only after the handshake): ``u32 big-endian length L | ciphertext (L
bytes)``, ciphertext = ChaCha20-Poly1305(aead_dir, nonce = 4 zero bytes | u64 BE counter,
plaintext = msg type u8 | body, AAD = the 4 header bytes). The counter starts at 0 in each
direction and is never sent: a replayed, dropped or reordered frame is decrypted with the wrong
nonce and fails authentication. Message type 0 is reserved for the authenticated close.

Every defect raises a ``ProtocolError`` (a ``ValueError``) subclass with a one-line reason; after
that the connection is dead and every further call raises ``ConnectionDead``.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import struct
from dataclasses import dataclass
from typing import List, Optional, Union

import nacl.bindings as sodium  # importing it runs sodium_init(): libsodium picks its fastest code
import nacl.exceptions
from nacl._sodium import ffi as _ffi, lib as _lib

from .atomic import atomic_write

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAGIC = b"FTTE"
KEY_BYTES = 32
NONCE_BYTES = 32
DEFAULT_MAX_FRAME = 64 << 20      # ciphertext bytes per frame; checked before the body is buffered
TAG_BYTES = 16
FRAME_OVERHEAD = 4 + 1 + TAG_BYTES  # header + message type + Poly1305 tag
MSG_CLOSE = 0                       # reserved: authenticated end of stream

ROLES = {"client": 1, "server": 2}
# Client HELLO flags. FLAG_QUERY: a read-only status query (`ftte-hub agents`): the agent answers
# with one AGENT_INFO and closes, and its hub session, if any, is left alone. The flags byte is in
# the handshake transcript, so no one without the key can set or clear it in transit.
FLAG_QUERY = 0x01
_CLIENT_FLAGS = FLAG_QUERY
_ROLE_NAMES = {v: k for k, v in ROLES.items()}
_HELLO = struct.Struct(">4sHBB32s32s")  # magic, version, role, flags, nonce, X25519 public key
_PREFIX = struct.Struct(">4sH")         # enough to tell a foreign or other-version peer early
_LEN = struct.Struct(">I")
_MAC_BYTES = 32
_KDF_INFO = b"ftte-fleet v1 keys"
_MAX_COUNTER = (1 << 64) - 1            # the last usable nonce; after it the connection must end

KEY_FILE_HEADER = "ftte-fleet-key v1"
_KEY_FILE_MAX = 4096


# -- errors ------------------------------------------------------------------------------------
class ProtocolError(ValueError):
    """Base of every protocol defect (one-line reason)."""


class HandshakeError(ProtocolError):
    """The peer did not prove it holds the fleet key, or broke the handshake."""


class KeyMismatch(HandshakeError):
    """The peer's FINISHED does not verify: the two sides hold different fleet keys."""


class HandshakeCutShort(HandshakeError):
    """The peer closed the connection before the handshake finished. Never a wrong key: a peer
    with another key finishes its half of the handshake, and the mismatch is named as such."""


class VersionMismatch(HandshakeError):
    """The peer speaks another protocol version (both are named)."""


class MalformedFrame(ProtocolError):
    """Bytes that cannot be a frame: too short, truncated at EOF, data after close, ..."""


class FrameTooLarge(ProtocolError):
    """A declared (or requested) frame length over ``max_frame``."""


class AuthenticationFailed(ProtocolError):
    """A frame failed AEAD authentication: tampered, replayed, reordered, dropped or wrong key."""


Replay = AuthenticationFailed  # replays are caught as authentication failures (counter nonces)


class CounterExhausted(ProtocolError):
    """2**64 frames in one direction: the connection must be re-established."""


class ConnectionDead(ProtocolError):
    """A call on a connection that already failed or closed."""


class KeyFileError(ValueError):
    """A fleet key file that is missing, unreadable or not a valid key."""


# -- fleet key ---------------------------------------------------------------------------------
def generate_key() -> bytes:
    """A fresh 32-byte fleet key from the OS CSPRNG (never one ``key_weakness`` would refuse)."""
    while True:
        key = secrets.token_bytes(KEY_BYTES)
        if key_weakness(key) is None:  # a random key fails with probability < 1e-13
            return key


_MIN_DISTINCT_BYTES = 8     # a random 32-byte key has ~30; 7 or fewer: p < 1e-36
_MAX_PATTERN = KEY_BYTES // 2


def key_weakness(key: bytes) -> Optional[str]:
    """Why ``key`` is not a random key (all-zero, a repeated byte or short pattern, counting bytes,
    few distinct bytes, typed text), or None. Each rule refuses a CSPRNG key with probability
    below 1e-13, so a refused key was made by hand or by a broken generator."""
    k = bytes(key)
    if len(set(k)) == 1:
        return f"all {len(k)} bytes are 0x{k[0]:02x}"
    for period in range(2, _MAX_PATTERN + 1):
        if k == (k[:period] * (len(k) // period + 1))[:len(k)]:
            return f"it repeats a {period}-byte pattern"
    steps = {(b - a) % 256 for a, b in zip(k, k[1:])}
    if len(steps) == 1:
        return f"its bytes count in steps of {steps.pop()}"
    if len(set(k)) < _MIN_DISTINCT_BYTES:
        return f"it uses only {len(set(k))} distinct byte values"
    if all(0x20 <= b < 0x7F for b in k):
        return "its bytes are all printable text (a typed password, not a random key)"
    return None


def write_key(path: Union[str, os.PathLike], key: bytes) -> None:
    """Write ``key`` as a 0600 text file (header line, then hex), atomically. A weak key (see
    ``key_weakness``) raises ValueError."""
    _check_key(key, "write_key")
    weak = key_weakness(key)
    if weak is not None:
        raise ValueError(f"write_key: refusing a low-entropy key ({weak}); use generate_key()")
    text = f"{KEY_FILE_HEADER}\n{bytes(key).hex()}\n".encode("ascii")
    atomic_write(path, lambda f: f.write(text), mode=0o600)


def read_key(path: Union[str, os.PathLike]) -> bytes:
    """Read a key written by ``write_key``; any defect raises KeyFileError naming the file."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise KeyFileError(f"key file {p}: not a regular file")
            raw = f.read(_KEY_FILE_MAX + 1)
    except FileNotFoundError:
        raise KeyFileError(f"key file {p} does not exist (create one with `ftte-hub keygen {p}`)") from None
    except IsADirectoryError:
        raise KeyFileError(f"key file {p}: is a directory") from None
    except PermissionError:
        raise KeyFileError(f"key file {p}: permission denied") from None
    except OSError as e:
        raise KeyFileError(f"key file {p}: cannot read ({e.strerror or e})") from None
    if len(raw) > _KEY_FILE_MAX:
        raise KeyFileError(f"key file {p}: over {_KEY_FILE_MAX} bytes, not a fleet key")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {p}: not ASCII text") from None
    lines = text.splitlines()
    if not lines or lines[0].strip() != KEY_FILE_HEADER:
        first = lines[0][:40] if lines else ""
        raise KeyFileError(f"key file {p}: first line is {first!r}, expected {KEY_FILE_HEADER!r}")
    body = [ln.strip() for ln in lines[1:] if ln.strip()]
    if len(body) != 1:
        raise KeyFileError(f"key file {p}: expected one hex key line after the header, found {len(body)}")
    hexkey = body[0]
    if len(hexkey) != 2 * KEY_BYTES:
        raise KeyFileError(f"key file {p}: key is {len(hexkey)} hex digits, expected {2 * KEY_BYTES}")
    try:
        key = bytes.fromhex(hexkey)
    except ValueError:
        raise KeyFileError(f"key file {p}: key is not hexadecimal") from None
    weak = key_weakness(key)
    if weak is not None:
        raise KeyFileError(f"key file {p}: low-entropy key ({weak}); make a new one with `ftte-hub keygen`")
    # The group bits are the service's way in (README: 0640 root:ftte); only others-access warns.
    if mode & 0o007:
        log.warning("key file %s is accessible to all users (mode %03o); chmod o-rwx it (0640 or 0600)",
                    p, mode & 0o777)
    elif mode & 0o020:
        log.warning("key file %s is writable by its group (mode %03o); chmod g-w it", p, mode & 0o777)
    return key


def _check_key(key, where: str) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        got = f"{len(key)} bytes" if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise ValueError(f"{where}: key must be {KEY_BYTES} bytes, got {got}")


# -- events ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HandshakeComplete:
    peer_role: str


@dataclass(frozen=True)
class Message:
    type: int
    body: bytearray    # bytes-like; received bodies are bytearrays (no copy is made to freeze them)


@dataclass(frozen=True)
class Closed:
    """The peer ended the stream with an authenticated close (nothing was cut off)."""


Event = Union[HandshakeComplete, Message, Closed]


# -- connection --------------------------------------------------------------------------------
_WAIT_HELLO, _WAIT_FIN, _OPEN, _CLOSED, _DEAD = "wait-hello", "wait-finished", "open", "closed", "dead"


class Connection:
    """One end of one connection. ``role`` is "client" (opens the TCP connection; the hub) or
    "server" (accepts it; the agent). Not thread-safe; one per connection."""

    def __init__(self, role: str, key: bytes, max_frame: int = DEFAULT_MAX_FRAME, flags: int = 0):
        if role not in ROLES:
            raise ValueError(f"Connection: role must be 'client' or 'server', got {role!r}")
        if flags & ~(_CLIENT_FLAGS if role == "client" else 0) or not 0 <= flags <= 0xFF:
            raise ValueError(f"Connection: flags 0x{flags:02x} are not valid for a {role}")
        _check_key(key, "Connection")
        if not isinstance(max_frame, int) or not FRAME_OVERHEAD - 4 <= max_frame <= 0xFFFFFFFF:
            raise ValueError(f"Connection: max_frame must be an int in [{FRAME_OVERHEAD - 4}, 2**32-1], "
                             f"got {max_frame!r}")
        self.role = role
        self.max_frame = max_frame
        self._psk = bytes(key)
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        # ephemeral X25519 secret: forward secrecy if the fleet key leaks later (libsodium clamps it)
        self._eph = secrets.token_bytes(KEY_BYTES)
        self.flags = flags
        self.peer_flags = 0              # the peer's HELLO flags, once it has arrived
        self._hello = _HELLO.pack(MAGIC, PROTOCOL_VERSION, ROLES[role], flags, self._nonce,
                                  sodium.crypto_scalarmult_base(self._eph))
        self._state = _WAIT_HELLO        # receive side; the send side needs only _handshake_done
        self._handshake_done = False
        self._initiated = False
        self._in = bytearray()
        self._out = bytearray()
        self._error: Optional[ProtocolError] = None
        self._peer_fin: Optional[bytes] = None     # the client's expected FIN_C (server side)
        self._send_aead = self._recv_aead = None
        self._send_ctr = self._recv_ctr = 0
        self.clean_close = False   # set by receive_eof: True if the peer sent close() first
        self._peer_sent_close = False
        self.bytes_sent = 0        # wire bytes produced / consumed, for overhead accounting
        self.bytes_received = 0
        if role == "server":
            self._initiated = True  # the server speaks only after the client's HELLO

    # -- public API ----------------------------------------------------------------------------
    @property
    def established(self) -> bool:
        return self._state == _OPEN

    @property
    def closed(self) -> bool:
        return self._state in (_CLOSED, _DEAD)

    @property
    def peer_hello_received(self) -> bool:
        """The peer's complete, well-formed HELLO has arrived (a server has answered it)."""
        return self._state in (_WAIT_FIN, _OPEN, _CLOSED) or self._handshake_done

    def initiate(self) -> bytes:
        """Client only, once: the HELLO to send first."""
        self._alive()
        if self.role != "client":
            raise ProtocolError("initiate(): only the client speaks first; the server waits for HELLO")
        if self._initiated:
            raise ProtocolError("initiate(): already called")
        self._initiated = True
        self._out += self._hello
        return self.data_to_send()

    def data_to_send(self) -> bytes:
        """Bytes queued by receive_data (handshake replies). Flush these even after an error: the
        client's FIN lets a server with another key report HandshakeError instead of a bare EOF."""
        out = bytes(self._out)
        self._out.clear()
        self.bytes_sent += len(out)
        return out

    def receive_data(self, data) -> List[Event]:
        """Feed bytes from the peer (any split). Returns the events they complete."""
        self._alive()
        if not self._initiated:
            raise ProtocolError("receive_data(): the client must call initiate() first")
        try:
            mv = memoryview(data).cast("B")
        except (TypeError, ValueError):
            raise ProtocolError(f"receive_data(): expected bytes, got {type(data).__name__}") from None
        self.bytes_received += mv.nbytes
        if self._state == _CLOSED and mv.nbytes:
            self._fail(MalformedFrame(f"{mv.nbytes} bytes arrived after the peer's close"))
        events: List[Event] = []
        try:
            if self._state == _OPEN and not self._in:
                # Fast path: whole frames are decrypted straight from the caller's buffer; only a
                # partial frame at the end is copied into ours.
                used = self._read_frames(mv, events)
                self._in += mv[used:]
            else:
                self._in += mv
                while self._step(events):
                    pass
        except ProtocolError as e:
            self._fail(e)
        return events

    def receive_eof(self) -> List[Event]:
        """The peer closed its side. Fine between frames; an error mid-handshake or mid-frame."""
        self._alive()
        if self._state in (_WAIT_HELLO, _WAIT_FIN):
            # A key mismatch is detected and named by a FINISHED that does not verify (both sides
            # send theirs before checking the other's), so a close here is never a wrong key.
            stage = "before its HELLO" if self._state == _WAIT_HELLO else "after its HELLO"
            self._fail(HandshakeCutShort(f"handshake cut short: the peer closed the connection {stage} "
                                         f"({self.bytes_received} bytes received); not a key mismatch"))
        if self._in:
            self._fail(MalformedFrame(f"connection closed inside a frame ({len(self._in)} bytes pending)"))
        # Not an error: the wrapper decides. ``clean_close`` tells a finished stream (the peer sent
        # close()) from one cut off by the network or an attacker.
        self.clean_close = self._peer_sent_close
        self._state = _CLOSED
        return []

    def send(self, msg_type: int, body=b"") -> bytes:
        """Encrypt one message. ``msg_type`` in 1..255 (0 is the reserved close)."""
        self._alive()
        if not self._handshake_done:
            raise ProtocolError(f"send(): handshake not complete (state {self._state}); nothing is sent before it")
        if not isinstance(msg_type, int) or isinstance(msg_type, bool) or not 1 <= msg_type <= 255:
            raise ValueError(f"send(): msg_type must be an int in 1..255, got {msg_type!r}")
        return self._seal(msg_type, body)

    def close(self) -> bytes:
        """An authenticated end-of-stream frame (so a cut-off stream is told apart from a finished one).
        After it nothing more can be sent."""
        self._alive()
        if not self._handshake_done:
            raise ProtocolError(f"close(): handshake not complete (state {self._state})")
        out = self._seal(MSG_CLOSE, b"")
        self._send_aead = None
        return out

    # -- internals -----------------------------------------------------------------------------
    def _alive(self) -> None:
        if self._state == _DEAD:
            raise ConnectionDead(f"connection is dead after: {self._error}")

    def _fail(self, err: ProtocolError):
        self._state = _DEAD
        self._error = err
        self._in.clear()
        self._send_aead = self._recv_aead = None
        self._psk = b""
        self._eph = None
        raise err

    def _seal(self, msg_type: int, body) -> bytes:
        if self._send_aead is None:
            raise ProtocolError("send(): this side already sent close()")
        try:
            blen = memoryview(body).nbytes
        except TypeError:
            raise ValueError(f"send(): body must be bytes-like, got {type(body).__name__}") from None
        length = 1 + blen + TAG_BYTES
        if length > self.max_frame:
            # A local mistake, not a peer's: raised without killing the connection (nothing was sent).
            raise FrameTooLarge(f"send(): message of {blen} bytes makes a {length}-byte frame, "
                                f"over max_frame {self.max_frame}")
        if self._send_ctr > _MAX_COUNTER:
            self._fail(CounterExhausted("send(): 2**64 frames sent; the nonce counter is exhausted"))
        header = _LEN.pack(length)
        ct = self._send_aead.encrypt(_nonce(self._send_ctr), b"".join((bytes((msg_type,)), body)), header)
        self._send_ctr += 1
        if self._out:  # pending handshake bytes go first
            self._out += header
            self._out += ct
            return self.data_to_send()
        self.bytes_sent += 4 + len(ct)
        return header + ct

    def _step(self, events: List[Event]) -> bool:
        """Consume one unit from the input buffer if complete; False when more bytes are needed."""
        if self._state == _WAIT_HELLO:
            return self._read_hello(events)
        if self._state == _WAIT_FIN:
            return self._read_client_fin(events)
        if self._state == _OPEN:
            with memoryview(self._in) as view:
                used = self._read_frames(view, events)
            del self._in[:used]
            return False
        if self._state == _CLOSED and self._in:
            raise MalformedFrame(f"{len(self._in)} bytes arrived after the peer's close")
        return False

    def _read_hello(self, events: List[Event]) -> bool:
        buf = self._in
        # Magic and version are checked as soon as they arrive, so a foreign or other-version peer
        # is named clearly even if its HELLO has another length.
        if not MAGIC.startswith(bytes(buf[:4])):
            raise HandshakeError(f"not an FTTE peer: first bytes {bytes(buf[:4])!r}, expected {MAGIC!r}")
        if len(buf) >= _PREFIX.size:
            _, version = _PREFIX.unpack_from(buf, 0)
            if version != PROTOCOL_VERSION:
                if self.role == "server":  # answer with our HELLO (public values only) so the
                    self._out += self._hello  # client can name both versions too

                raise VersionMismatch(f"peer speaks protocol version {version}, this side speaks "
                                      f"{PROTOCOL_VERSION}; upgrade the older side")
        need = _HELLO.size + (_MAC_BYTES if self.role == "client" else 0)
        if len(buf) < need:
            return False
        peer_hello = bytes(buf[:_HELLO.size])
        _, _, role, flags, peer_nonce, peer_pub = _HELLO.unpack(peer_hello)
        want = 2 if self.role == "client" else 1
        if role != want:
            raise HandshakeError(f"peer claims role {_ROLE_NAMES.get(role, role)!r}; a {self.role} "
                                 f"needs a {_ROLE_NAMES[want]!r}")
        if flags & ~(_CLIENT_FLAGS if self.role == "server" else 0):
            raise HandshakeError(f"peer HELLO has unknown flags 0x{flags:02x}")
        self.peer_flags = flags
        if self.role == "client":
            hello_c, hello_s, nonce_c, nonce_s = self._hello, peer_hello, self._nonce, peer_nonce
        else:
            hello_c, hello_s, nonce_c, nonce_s = peer_hello, self._hello, peer_nonce, self._nonce
        if nonce_c == nonce_s:  # our own HELLO reflected back at us
            raise HandshakeError("peer echoed this side's nonce (reflection)")
        try:
            dh = sodium.crypto_scalarmult(self._eph, peer_pub)
        except nacl.exceptions.CryptoError:  # a low-order point: the all-zero secret, which libsodium refuses
            dh = bytes(KEY_BYTES)
        if hmac.compare_digest(dh, bytes(KEY_BYTES)):
            raise HandshakeError("peer sent an invalid X25519 public key")
        self._eph = None
        th = hashlib.sha256(hello_c + hello_s).digest()
        okm = hkdf_sha256(self._psk + dh, salt=nonce_c + nonce_s, info=_KDF_INFO + th, length=128)
        k_c2s, k_s2c, mac_c, mac_s = okm[:32], okm[32:64], okm[64:96], okm[96:]
        fin_c = hmac.new(mac_c, b"client finished" + th, hashlib.sha256).digest()
        fin_s = hmac.new(mac_s, b"server finished" + th, hashlib.sha256).digest()
        self._psk = b""  # not needed any more on this connection
        if self.role == "client":
            self._send_aead, self._recv_aead = _ChaCha20Poly1305(k_c2s), _ChaCha20Poly1305(k_s2c)
            got = bytes(buf[_HELLO.size:need])
            del buf[:need]
            # FIN_C goes out before FIN_S is checked: with a wrong key the server then sees a bad
            # FIN_C and fails with HandshakeError too, instead of an unexplained EOF.
            self._out += fin_c
            if not hmac.compare_digest(got, fin_s):
                raise KeyMismatch("server did not prove the fleet key (its FINISHED does not verify): "
                                     "wrong key on one side")
            self._state = _OPEN
            self._handshake_done = True
            events.append(HandshakeComplete(peer_role="server"))
        else:
            self._send_aead, self._recv_aead = _ChaCha20Poly1305(k_s2c), _ChaCha20Poly1305(k_c2s)
            del buf[:need]
            self._out += self._hello + fin_s
            self._peer_fin = fin_c
            self._state = _WAIT_FIN
        return True

    def _read_client_fin(self, events: List[Event]) -> bool:
        if len(self._in) < _MAC_BYTES:
            return False
        got = bytes(self._in[:_MAC_BYTES])
        del self._in[:_MAC_BYTES]
        expected, self._peer_fin = self._peer_fin, None
        if not hmac.compare_digest(got, expected):
            raise KeyMismatch("client did not prove the fleet key (its FINISHED does not verify): "
                                 "wrong key on one side")
        self._state = _OPEN
        self._handshake_done = True
        events.append(HandshakeComplete(peer_role="client"))
        return True

    def _read_frames(self, view: memoryview, events: List[Event]) -> int:
        """Decrypt every complete frame at the start of ``view``; returns the bytes consumed."""
        pos, n = 0, len(view)
        while n - pos >= 4:
            (length,) = _LEN.unpack_from(view, pos)
            if length > self.max_frame:  # before a single body byte is kept
                raise FrameTooLarge(f"peer declared a {length}-byte frame, over max_frame {self.max_frame}")
            if length < 1 + TAG_BYTES:
                raise MalformedFrame(f"frame of {length} bytes is shorter than the {1 + TAG_BYTES}-byte minimum")
            if n - pos - 4 < length:
                break
            if self._recv_ctr > _MAX_COUNTER:
                raise CounterExhausted("2**64 frames received; the nonce counter is exhausted")
            header = bytes(view[pos:pos + 4])
            pt = self._recv_aead.decrypt(_nonce(self._recv_ctr), view[pos + 4:pos + 4 + length], header)
            if pt is None:
                raise AuthenticationFailed(f"frame {self._recv_ctr} failed authentication "
                                           f"(tampered, replayed, reordered or dropped)")
            self._recv_ctr += 1
            pos += 4 + length
            if pt[0] == MSG_CLOSE:
                if len(pt) != 1:
                    raise MalformedFrame(f"close frame carries {len(pt) - 1} body bytes")
                if pos < n:
                    raise MalformedFrame(f"{n - pos} bytes arrived after the peer's close")
                self._state = _CLOSED
                self._peer_sent_close = True
                self._recv_aead = None
                events.append(Closed())
                break
            # The body is the plaintext without its type byte, not a copy of it: deleting a
            # bytearray's first byte moves its start, so a model file costs the agent one
            # plaintext, not two.
            msg_type = pt[0]
            del pt[:1]
            events.append(Message(msg_type, pt))
        return pos


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869): extract, then expand to ``length`` bytes (at most 255 blocks).

    Written out over the standard library's HMAC because libsodium has no HKDF binding in PyNaCl;
    tests check it against the RFC's test vectors."""
    if not 0 <= length <= 255 * 32:
        raise ValueError(f"hkdf_sha256: length must be in [0, 8160], got {length}")
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, block = bytearray(), b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes((i,)), hashlib.sha256).digest()
        okm += block
    return bytes(okm[:length])


class _ChaCha20Poly1305:
    """ChaCha20-Poly1305 (RFC 8439, 96-bit nonce) with one key: libsodium's, called through its
    cffi module so that the input is read in place and the output written once (PyNaCl's wrappers
    want ``bytes`` in and copy their result out: two extra copies of every frame, which for a
    model file on a small device is what sets the agent's peak)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise ValueError(f"ChaCha20-Poly1305 needs a {KEY_BYTES}-byte key, got {len(key)}")
        self._key = bytes(key)

    def encrypt(self, nonce: bytes, plaintext, aad: bytes) -> bytearray:
        src = _ffi.from_buffer(plaintext)
        out = bytearray(len(src) + TAG_BYTES)
        # the length out-parameters are optional (NULL): the output's length is known exactly
        if _lib.crypto_aead_chacha20poly1305_ietf_encrypt(
                _ffi.from_buffer(out), _ffi.NULL, src, len(src), aad, len(aad), _ffi.NULL, nonce, self._key) != 0:
            raise RuntimeError("libsodium: ChaCha20-Poly1305 encryption failed")
        return out

    def decrypt(self, nonce: bytes, ciphertext, aad: bytes) -> Optional[bytearray]:
        """The plaintext, or None if the tag does not verify."""
        src = _ffi.from_buffer(ciphertext)
        if len(src) < TAG_BYTES:
            return None
        out = bytearray(len(src) - TAG_BYTES)
        rc = _lib.crypto_aead_chacha20poly1305_ietf_decrypt(
            _ffi.from_buffer(out), _ffi.NULL, _ffi.NULL, src, len(src), aad, len(aad), nonce, self._key)
        return out if rc == 0 else None


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "big")
