"""Sans-IO protocol: handshake, record layer and key files, pure bytes (no sockets)."""
import os
import stat
import struct

import pytest

from ftte_core import protocol as P
from ftte_core.protocol import (AuthenticationFailed, Closed, Connection, ConnectionDead, FrameTooLarge,
                                HandshakeComplete, HandshakeError, KeyFileError, MalformedFrame, Message,
                                ProtocolError, VersionMismatch)


def handshake(key_c=None, key_s=None, **kw):
    """Run the handshake; returns (client, server)."""
    key_c = key_c or KEY
    key_s = key_s or key_c
    c, s = Connection("client", key_c, **kw), Connection("server", key_s, **kw)
    assert s.receive_data(c.initiate()) == []
    ev_c = c.receive_data(s.data_to_send())
    assert ev_c == [HandshakeComplete("server")]
    ev_s = s.receive_data(c.data_to_send())
    assert ev_s == [HandshakeComplete("client")]
    assert c.established and s.established
    return c, s


KEY = P.generate_key()


# -- handshake ---------------------------------------------------------------------------------
def test_handshake_and_round_trips_both_directions():
    c, s = handshake()
    for body in (b"", b"x", os.urandom(1000), os.urandom(3 << 20)):
        assert s.receive_data(c.send(7, body)) == [Message(7, body)]
        assert c.receive_data(s.send(255, body)) == [Message(255, body)]
    # several frames in one chunk come out in order
    wire = c.send(1, b"a") + c.send(2, b"bb") + c.send(3, b"")
    assert s.receive_data(wire) == [Message(1, b"a"), Message(2, b"bb"), Message(3, b"")]


def test_hkdf_matches_rfc5869_test_vectors():
    ikm = b"\x0b" * 22
    # A.1: with salt and info
    assert P.hkdf_sha256(ikm, bytes(range(13)), bytes(range(0xF0, 0xFA)), 42).hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
    # A.3: no salt (HashLen zero bytes), no info
    assert P.hkdf_sha256(ikm, b"", b"", 42).hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8")
    assert P.hkdf_sha256(ikm, b"s", b"i", 128)[:42] == P.hkdf_sha256(ikm, b"s", b"i", 42)
    with pytest.raises(ValueError, match="length"):
        P.hkdf_sha256(ikm, b"", b"", 255 * 32 + 1)


def test_aead_matches_rfc8439_and_refuses_any_altered_byte():
    # RFC 8439, 2.8.2
    key, nonce = bytes(range(0x80, 0xA0)), bytes.fromhex("070000004041424344454647")
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
                 b"sunscreen would be it.")
    expected = bytes.fromhex(
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b"
        "1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
        "3ff4def08e4b7a9de576d26586cec64b6116" + "1ae10b594f09e26a7e902ecbd0600691")
    aead = P._ChaCha20Poly1305(key)
    ct = aead.encrypt(nonce, plaintext, aad)
    assert bytes(ct) == expected
    assert bytes(aead.decrypt(nonce, memoryview(ct), aad)) == plaintext
    for i in (0, len(ct) // 2, len(ct) - 1):   # body and tag
        bad = bytearray(ct)
        bad[i] ^= 1
        assert aead.decrypt(nonce, bad, aad) is None
    assert aead.decrypt(nonce, ct, aad[:-1]) is None
    assert aead.decrypt(bytes(12), ct, aad) is None
    assert aead.decrypt(nonce, ct[:15], aad) is None


def test_handshake_with_a_peer_built_on_the_cryptography_package():
    # Agents and hubs before the move to libsodium used the `cryptography` package for the same
    # primitives: a client written from the protocol's description with it must still get through
    # the handshake and exchange frames both ways (the wire format did not change).
    import hashlib
    import hmac
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import x25519
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    eph = x25519.X25519PrivateKey.generate()
    nonce_c = os.urandom(32)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    hello_c = struct.pack(">4sHBB32s32s", b"FTTE", P.PROTOCOL_VERSION, 1, 0, nonce_c, eph.public_key().public_bytes(*raw))
    s = Connection("server", KEY)
    assert s.receive_data(hello_c) == []
    reply = s.data_to_send()
    hello_s, fin_s = reply[:72], reply[72:]
    nonce_s, epk_s = hello_s[8:40], hello_s[40:72]
    th = hashlib.sha256(hello_c + hello_s).digest()
    dh = eph.exchange(x25519.X25519PublicKey.from_public_bytes(epk_s))
    okm = HKDF(algorithm=hashes.SHA256(), length=128, salt=nonce_c + nonce_s,
               info=b"ftte-fleet v1 keys" + th).derive(KEY + dh)
    k_c2s, k_s2c, mac_c, mac_s = okm[:32], okm[32:64], okm[64:96], okm[96:]
    assert fin_s == hmac.new(mac_s, b"server finished" + th, hashlib.sha256).digest()
    assert s.receive_data(hmac.new(mac_c, b"client finished" + th, hashlib.sha256).digest()) == [
        HandshakeComplete("client")]
    body = os.urandom(1000)
    ct = ChaCha20Poly1305(k_c2s).encrypt(bytes(12), bytes((7,)) + body, struct.pack(">I", 1 + len(body) + 16))
    assert s.receive_data(struct.pack(">I", len(ct)) + ct) == [Message(7, body)]
    wire = s.send(9, b"and back")
    (length,) = struct.unpack(">I", wire[:4])
    assert ChaCha20Poly1305(k_s2c).decrypt(bytes(12), wire[4:], wire[:4]) == b"\x09and back"
    assert length == len(wire) - 4


def test_a_received_body_is_the_plaintext_not_a_copy_of_it():
    # A model file arrives as one frame; on a small device every extra copy of it counts
    # (benchmarks/agent_memory.py --install): receiving a whole frame allocates its plaintext once.
    import tracemalloc
    c, s = handshake()
    body = os.urandom(4 << 20)
    wire = c.send(3, body)
    tracemalloc.start()
    try:
        (msg,) = s.receive_data(wire)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert msg == Message(3, body) and isinstance(msg.body, bytearray)
    assert peak < 1.25 * len(body), peak    # a copy of the body would make it 2x


def test_client_may_send_right_behind_its_finished():
    c, s = Connection("client", KEY), Connection("server", KEY)
    s.receive_data(c.initiate())
    assert c.receive_data(s.data_to_send()) == [HandshakeComplete("server")]
    wire = c.data_to_send() + c.send(9, b"early")
    assert s.receive_data(wire) == [HandshakeComplete("client"), Message(9, b"early")]


def test_every_byte_boundary_split_is_fine():
    c, s = Connection("client", KEY), Connection("server", KEY)
    hello = c.initiate()
    for i in range(len(hello)):
        assert s.receive_data(hello[i:i + 1]) == []
    reply = s.data_to_send()
    evs = []
    for i in range(len(reply)):
        evs += c.receive_data(reply[i:i + 1])
    assert evs == [HandshakeComplete("server")]
    wire = c.data_to_send() + c.send(5, b"hello world") + c.send(6, b"")
    evs = []
    for i in range(len(wire)):
        evs += s.receive_data(wire[i:i + 1])
    assert evs == [HandshakeComplete("client"), Message(5, b"hello world"), Message(6, b"")]
    # and every two-piece split of a frame
    frames = [c.send(4, bytes(range(40))) for _ in range(60)]
    for cut, f in enumerate(frames[:len(frames[0]) + 1]):
        assert s.receive_data(f[:cut]) + s.receive_data(f[cut:]) == [Message(4, bytes(range(40)))]


def test_connections_use_fresh_keys():
    c1, s1 = handshake()
    c2, s2 = handshake()
    f = c1.send(1, b"same")
    assert f != c2.send(1, b"same")  # same counter, same key file, different connection keys
    with pytest.raises(AuthenticationFailed):
        s2.receive_data(f)


@pytest.mark.parametrize("bad_side", ["client", "server"])
def test_wrong_key_fails_on_both_sides_and_nothing_is_delivered(bad_side):
    other = P.generate_key()
    c = Connection("client", other if bad_side == "client" else KEY)
    s = Connection("server", other if bad_side == "server" else KEY)
    s.receive_data(c.initiate())
    with pytest.raises(HandshakeError, match="server did not prove the fleet key"):
        c.receive_data(s.data_to_send())
    fin = c.data_to_send()  # the client's FIN still goes out, so the server can tell
    assert len(fin) == 32
    with pytest.raises(HandshakeError, match="client did not prove the fleet key"):
        s.receive_data(fin)
    for conn in (c, s):
        assert not conn.established
        with pytest.raises(ConnectionDead):
            conn.send(1, b"x")
        with pytest.raises(ConnectionDead):
            conn.receive_data(b"\0" * 40)


def test_nothing_sent_or_accepted_before_handshake():
    c, s = Connection("client", KEY), Connection("server", KEY)
    with pytest.raises(ProtocolError, match="handshake not complete"):
        c.send(1, b"x")
    s.receive_data(c.initiate())
    with pytest.raises(ProtocolError, match="handshake not complete"):
        s.send(1, b"x")  # the server has not verified the client yet
    # a record where the server expects the client's FIN is just a (failing) FIN, never a message
    with pytest.raises(HandshakeError):
        s.receive_data(b"\0\0\0\x20" + os.urandom(32))


def test_server_with_eof_during_handshake():
    c, s = Connection("client", KEY), Connection("server", KEY)
    assert not s.peer_hello_received
    s.receive_data(c.initiate())
    assert s.peer_hello_received and not s.established
    with pytest.raises(P.HandshakeCutShort, match="cut short: the peer closed the connection after its HELLO"):
        s.receive_eof()


def test_eof_before_the_peers_hello_is_a_cut_short_handshake_not_a_wrong_key():
    """An agent that closes a connection unanswered (busy) must not make the hub suggest a wrong key."""
    c = Connection("client", KEY)
    c.initiate()
    with pytest.raises(P.HandshakeCutShort) as info:
        c.receive_eof()
    text = str(info.value)
    assert "before its HELLO" in text and "0 bytes received" in text and "not a key mismatch" in text
    assert "wrong" not in text


def test_version_mismatch_names_both():
    c, s = Connection("client", KEY), Connection("server", KEY)
    hello = bytearray(c.initiate())
    struct.pack_into(">H", hello, 4, 7)
    with pytest.raises(VersionMismatch, match=r"version 7, this side speaks 1"):
        s.receive_data(bytes(hello[:6]))  # detected from the first 6 bytes
    # the server still answers with its HELLO, so an old client names both versions too
    reply = bytearray(s.data_to_send())
    assert len(reply) == 72
    c = Connection("client", KEY)
    c.initiate()
    struct.pack_into(">H", reply, 4, 2)
    with pytest.raises(VersionMismatch, match=r"peer speaks protocol version 2, this side speaks 1"):
        c.receive_data(bytes(reply))
    assert isinstance(VersionMismatch("x"), HandshakeError)


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n\r\n", os.urandom(80), b"\x16\x03\x01\x02\x00"])
def test_garbage_handshake(garbage):
    s = Connection("server", KEY)
    with pytest.raises(HandshakeError, match="not an FTTE peer"):
        s.receive_data(b"Z" + garbage)  # caught on the first byte
    s = Connection("server", KEY)
    assert s.receive_data(b"FT") == []
    with pytest.raises(HandshakeError, match="not an FTTE peer"):
        s.receive_data(b"X")


def test_wrong_roles_and_reflection():
    c1, c2 = Connection("client", KEY), Connection("client", KEY)
    h1 = c1.initiate()
    c2.initiate()
    with pytest.raises(HandshakeError, match="role"):
        c2.receive_data(h1 + b"\0" * 32)
    c = Connection("client", KEY)
    h = c.initiate()
    with pytest.raises(HandshakeError, match="role"):
        c.receive_data(h + b"\0" * 32)  # own HELLO reflected


def test_invalid_ephemeral_key_and_tampered_hello():
    c, s = Connection("client", KEY), Connection("server", KEY)
    hello = bytearray(c.initiate())
    hello[40:72] = bytes(32)  # X25519 point of small order: all-zero shared secret
    with pytest.raises(HandshakeError, match="invalid X25519"):
        s.receive_data(bytes(hello))
    # a man in the middle who changes any HELLO byte (nonce, ephemeral key) breaks the FINISHED check
    for pos in (10, 50):
        c, s = Connection("client", KEY), Connection("server", KEY)
        s.receive_data(c.initiate())
        reply = bytearray(s.data_to_send())
        reply[pos] ^= 1
        with pytest.raises(HandshakeError, match="did not prove"):
            c.receive_data(bytes(reply))
        with pytest.raises(HandshakeError, match="did not prove"):
            s.receive_data(c.data_to_send())


def test_bytes_like_input():
    c, s = handshake()
    f = bytearray(c.send(1, memoryview(b"abc")))
    assert s.receive_data(memoryview(f)) == [Message(1, b"abc")]
    f[:] = bytes(len(f))  # the caller may reuse its buffer: the body is our own copy
    c2, s2 = handshake()
    buf = bytearray(c2.send(2, b"xyz"))
    (ev,) = s2.receive_data(buf)
    buf[:] = bytes(len(buf))
    assert ev.body == b"xyz" and isinstance(ev.body, bytearray)  # the decrypted plaintext: ours alone


# -- record layer ------------------------------------------------------------------------------
def test_tampered_byte_anywhere_fails():
    n = len(handshake()[0].send(3, b"payload bytes"))
    for i in range(n):
        c, s = handshake()
        f = bytearray(c.send(3, b"payload bytes"))
        f[i] ^= 0x01
        with pytest.raises(ProtocolError):
            evs = s.receive_data(bytes(f))
            # a flipped length byte may just make the frame look longer: EOF then ends it
            assert evs == []
            s.receive_eof()


def test_tampered_ciphertext_is_authentication_failure_and_kills_connection():
    c, s = handshake()
    f = bytearray(c.send(3, b"payload"))
    f[10] ^= 0x80
    with pytest.raises(AuthenticationFailed, match="failed authentication"):
        s.receive_data(bytes(f))
    with pytest.raises(ConnectionDead, match="failed authentication"):
        s.receive_data(c.send(3, b"next"))


def test_replayed_frame_fails():
    c, s = handshake()
    f = c.send(1, b"pay me once")
    assert s.receive_data(f) == [Message(1, b"pay me once")]
    with pytest.raises(AuthenticationFailed):
        s.receive_data(f)


def test_reordered_and_dropped_frames_fail():
    c, s = handshake()
    f1, f2 = c.send(1, b"one"), c.send(1, b"two")
    with pytest.raises(AuthenticationFailed):
        s.receive_data(f2 + f1)
    c, s = handshake()
    f1, f2 = c.send(1, b"one"), c.send(1, b"two")
    with pytest.raises(AuthenticationFailed):
        s.receive_data(f2)  # f1 dropped


def test_reflected_frame_fails():
    c, s = handshake()
    with pytest.raises(AuthenticationFailed):
        c.receive_data(c.send(1, b"to myself"))  # per-direction keys


def test_truncated_and_garbage_records():
    c, s = handshake()
    f = c.send(2, b"0123456789")
    assert s.receive_data(f[:-3]) == []
    with pytest.raises(MalformedFrame, match="inside a frame"):
        s.receive_eof()
    c, s = handshake()
    with pytest.raises(MalformedFrame, match="shorter than"):
        s.receive_data(b"\0\0\0\x05hello")
    c, s = handshake()
    with pytest.raises(AuthenticationFailed):
        s.receive_data(b"\0\0\0\x20" + os.urandom(32))
    c, s = handshake()
    with pytest.raises(ProtocolError, match="expected bytes"):
        s.receive_data("text")


def test_oversized_declared_length_rejected_before_buffering():
    c, s = handshake(max_frame=1 << 20)
    with pytest.raises(FrameTooLarge, match="4294967295-byte frame, over max_frame 1048576"):
        s.receive_data(b"\xff\xff\xff\xff")  # only the header: nothing more is waited for
    assert len(s._in) == 0
    c, s = handshake(max_frame=1 << 20)
    with pytest.raises(FrameTooLarge):
        s.receive_data(struct.pack(">I", (1 << 20) + 1) + b"x" * 100)


def test_send_over_max_frame_is_local_error_connection_survives():
    c, s = handshake(max_frame=1000)
    with pytest.raises(FrameTooLarge, match="over max_frame 1000"):
        c.send(1, b"x" * 1000)
    body = b"y" * (1000 - 17)
    assert s.receive_data(c.send(1, body)) == [Message(1, body)]


def test_default_max_frame_is_64mib():
    assert P.DEFAULT_MAX_FRAME == 64 << 20
    c, s = handshake()
    with pytest.raises(FrameTooLarge):
        s.receive_data(struct.pack(">I", (64 << 20) + 1))


def test_counter_exhaustion():
    c, s = handshake()
    c._send_ctr = (1 << 64) - 1
    s._recv_ctr = (1 << 64) - 1
    assert s.receive_data(c.send(1, b"last")) == [Message(1, b"last")]
    with pytest.raises(P.CounterExhausted):
        c.send(1, b"one too many")


def test_authenticated_close():
    c, s = handshake()
    wire = c.send(1, b"bye") + c.close()
    assert s.receive_data(wire) == [Message(1, b"bye"), Closed()]
    s.receive_eof()
    assert s.clean_close and s.closed
    with pytest.raises(ProtocolError, match="already sent close"):
        c.send(1, b"more")
    assert c.receive_data(s.send(2, b"half-close still works")) == [Message(2, b"half-close still works")]
    # a cut-off stream is not a clean close
    c, s = handshake()
    s.receive_data(c.send(1, b"x"))
    s.receive_eof()
    assert not s.clean_close
    s.receive_eof()
    assert not s.clean_close
    with pytest.raises(MalformedFrame, match="after"):
        s.receive_data(b"x")
    # and nothing is accepted after the close
    c, s = handshake()
    with pytest.raises(MalformedFrame, match="after the peer's close"):
        s.receive_data(c.close() + b"\0")


def test_bad_arguments():
    with pytest.raises(ValueError, match="role"):
        Connection("hub", KEY)
    with pytest.raises(ValueError, match="32 bytes, got 16 bytes"):
        Connection("client", b"k" * 16)
    with pytest.raises(ValueError, match="32 bytes, got str"):
        Connection("client", "k" * 32)
    with pytest.raises(ValueError, match="max_frame"):
        Connection("client", KEY, max_frame=3)
    c, s = handshake()
    for bad in (0, 256, -1, True, 1.0):
        with pytest.raises(ValueError, match="msg_type"):
            c.send(bad, b"")
    with pytest.raises(ValueError, match="bytes-like"):
        c.send(1, "text")
    with pytest.raises(ProtocolError, match="only the client"):
        Connection("server", KEY).initiate()
    c = Connection("client", KEY)
    with pytest.raises(ProtocolError, match="initiate"):
        c.receive_data(b"x")
    c.initiate()
    with pytest.raises(ProtocolError, match="already"):
        c.initiate()


# -- key files ---------------------------------------------------------------------------------
def test_key_file_round_trip_and_mode(tmp_path):
    key = P.generate_key()
    assert len(key) == 32 and key != P.generate_key()
    path = tmp_path / "fleet.key"
    P.write_key(path, key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text().splitlines()[0] == "ftte-fleet-key v1"
    assert P.read_key(path) == key
    P.write_key(path, P.generate_key())  # overwrite keeps 0600
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(ValueError, match="32 bytes"):
        P.write_key(tmp_path / "short.key", b"abc")


@pytest.mark.parametrize("content, match", [
    (b"", "first line is ''"),
    (b"ftte-fleet-key v2\n" + b"00" * 32 + b"\n", "expected 'ftte-fleet-key v1'"),
    (b"ftte-fleet-key v1\n" + b"00" * 31 + b"\n", "62 hex digits, expected 64"),
    (b"ftte-fleet-key v1\n" + b"zz" * 32 + b"\n", "not hexadecimal"),
    (b"ftte-fleet-key v1\n", "found 0"),
    (b"ftte-fleet-key v1\n" + b"00" * 32 + b"\n" + b"11" * 32 + b"\n", "found 2"),
    (b"ftte-fleet-key v1\n\xff\xfe\n", "not ASCII"),
    (b"x" * 5000, "over 4096 bytes"),
])
def test_bad_key_files(tmp_path, content, match):
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=match):
        P.read_key(path)


def test_missing_unreadable_and_directory_key_files(tmp_path):
    with pytest.raises(KeyFileError, match="does not exist"):
        P.read_key(tmp_path / "nope.key")
    with pytest.raises(KeyFileError, match="directory|regular file"):
        P.read_key(tmp_path)
    path = tmp_path / "locked.key"
    P.write_key(path, KEY)
    os.chmod(path, 0)
    try:
        if os.geteuid() != 0:  # root reads anything
            with pytest.raises(KeyFileError, match="permission denied"):
                P.read_key(path)
    finally:
        os.chmod(path, 0o600)


def test_world_readable_key_warns(tmp_path, caplog):
    path = tmp_path / "open.key"
    P.write_key(path, KEY)
    os.chmod(path, 0o644)
    with caplog.at_level("WARNING", logger="ftte_core.protocol"):
        assert P.read_key(path) == KEY
    assert "accessible to all users" in caplog.text and "644" in caplog.text


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o440, 0o400])
def test_key_readable_by_its_group_only_is_accepted_quietly(tmp_path, caplog, mode):
    """The README installs the key 0640 root:ftte for the service: no warning for that."""
    path = tmp_path / "service.key"
    P.write_key(path, KEY)
    os.chmod(path, mode)
    with caplog.at_level("WARNING", logger="ftte_core.protocol"):
        assert P.read_key(path) == KEY
    assert caplog.text == ""


def test_group_writable_key_warns(tmp_path, caplog):
    path = tmp_path / "gw.key"
    P.write_key(path, KEY)
    os.chmod(path, 0o660)
    with caplog.at_level("WARNING", logger="ftte_core.protocol"):
        assert P.read_key(path) == KEY
    assert "writable by its group" in caplog.text


WEAK_KEYS = [
    (bytes(32), "all 32 bytes are 0x00"),
    (b"\xff" * 32, "all 32 bytes are 0xff"),
    (b"\x01\x02" * 16, "2-byte pattern"),
    (bytes(range(7)) * 4 + bytes(range(4)), "7-byte pattern"),
    (bytes.fromhex("deadbeefcafebabe0011223344556677") * 2, "16-byte pattern"),
    (bytes(range(32)), "count in steps of 1"),
    (bytes(range(255, 191, -2)), "count in steps of 254"),
    (bytes.fromhex("03c8c809515164c80303c851c80351c809fafa030351fa1b091b030951510909"), "7 distinct"),
    (b"correct horse battery staple!!!!", "printable text"),
]


@pytest.mark.parametrize("key, match", WEAK_KEYS, ids=[m.split()[-1] if " " in m else m for _, m in WEAK_KEYS])
def test_low_entropy_keys_are_refused_when_read_and_never_written(tmp_path, key, match):
    assert len(key) == 32
    path = tmp_path / "weak.key"
    path.write_text(f"ftte-fleet-key v1\n{key.hex()}\n")
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="low-entropy key") as info:
        P.read_key(path)
    assert match in str(info.value) and "ftte-hub keygen" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="low-entropy"):
        P.write_key(tmp_path / "other.key", key)


def test_generated_keys_are_never_weak(monkeypatch):
    assert all(P.key_weakness(P.generate_key()) is None for _ in range(2000))
    draws = iter([bytes(32), b"ab" * 16, KEY])  # a broken generator's output is drawn again
    monkeypatch.setattr(P.secrets, "token_bytes", lambda n: next(draws))
    assert P.generate_key() == KEY


def test_key_from_file_completes_handshake(tmp_path):
    path = tmp_path / "fleet.key"
    P.write_key(path, P.generate_key())
    handshake(P.read_key(path), P.read_key(path))


def test_fuzz_only_protocol_errors():
    """Random garbage and random mutations never escape as anything but ProtocolError."""
    import random
    rng = random.Random(4)
    c, s = handshake()
    good = c.send(1, b"abc" * 10)
    for trial in range(300):
        fresh_c, fresh_s = Connection("client", KEY), Connection("server", KEY)
        if trial % 3 == 0:  # mutated client HELLO + FIN stream into a server
            target, data = fresh_s, bytearray(fresh_c.initiate() + os.urandom(32))
        elif trial % 3 == 1:  # mutated server reply into a client
            fresh_s.receive_data(fresh_c.initiate())
            target, data = fresh_c, bytearray(fresh_s.data_to_send())
        else:  # mutated record into an established server
            _, target = handshake()
            data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[:rng.randrange(len(data))]
        try:
            target.receive_data(bytes(data))
            target.receive_eof()
        except ProtocolError:
            pass
