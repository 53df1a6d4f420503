"""The hub/agent contract: model files, message bodies, and the protocol over asyncio streams."""
import asyncio
import json
import re
import struct
import time

import numpy as np
import pytest

import ftte_core as ft
from ftte_core import messages as M
from ftte_core import modelfile
from ftte_core.channel import Channel, ChannelClosed, ChannelError, HandshakeCutShort, HandshakeTimeout
from ftte_core.graph import AvgPool2d, Dense, Dropout, Flatten, MaxPool2d, Model, ReLU, Sigmoid, Tanh
from ftte_core.local import TaskConfig
from ftte_core.protocol import Connection, generate_key
from slowdev import scaled


# -- model files -------------------------------------------------------------------------------------
def _odd_model():
    rng = np.random.default_rng(3)
    from ftte_core.graph import Conv2d, GlobalAvgPool
    layers = [
        Conv2d("c1", rng.standard_normal((4, 1, 3, 3)).astype(np.float32), None, stride=(1, 1), padding=(1, 1, 1, 1)),
        Tanh("t1"), MaxPool2d("mp", (2, 2), (2, 2), (0, 0, 1, 1), ceil_mode=True),
        AvgPool2d("ap", (2, 2), (1, 1), (1, 0, 0, 1), ceil_mode=False, count_include_pad=True),
        Sigmoid("s1"), Dropout("d", 0.25), GlobalAvgPool("g"), Flatten("f"),
        Dense("fc", rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(3).astype(np.float32)),
        ReLU("r"),
    ]
    return Model(layers, (1, 9, 7), name="odd")


@pytest.mark.parametrize("make", [lambda: ft.zoo("mlp", (64,), 10, seed=1),
                                  lambda: ft.zoo("cnn", (1, 28, 28), 10, seed=2), _odd_model])
def test_model_file_round_trip_predicts_identically(make):
    model = make()
    blob = modelfile.model_to_bytes(model)
    back = modelfile.model_from_bytes(blob)
    assert [(l.kind, l.name) for l in back.layers] == [(l.kind, l.name) for l in model.layers]
    assert back.input_shape == model.input_shape and back.name == model.name
    x = np.random.default_rng(0).random((5,) + model.input_shape, dtype=np.float32)
    np.testing.assert_array_equal(back.predict(x), model.predict(x))
    assert modelfile.model_to_bytes(back) == blob  # stable: the agent's cache key does not drift
    assert modelfile.content_hash(blob) == modelfile.content_hash(bytes(blob))


def test_model_file_rejects_bad_bytes():
    blob = modelfile.model_to_bytes(ft.zoo("mlp", (64,), 10))
    prefix = struct.Struct("<4sHHI")
    _, _, _, hlen = prefix.unpack_from(blob, 0)
    cases = {
        "shorter than": blob[:5],
        "not a model file": b"XXXX" + blob[4:],
        "format version 9": blob[:4] + struct.pack("<H", 9) + blob[6:],
        "flags": blob[:6] + struct.pack("<H", 1) + blob[8:],
        "does not fit": blob[:8] + struct.pack("<I", len(blob)) + blob[12:],
        "truncated": blob[:-4],
        "trailing": blob + b"\0\0\0\0",
        "bad model header": blob[:12] + b"{" * hlen + blob[12 + hlen:],
    }
    for match, bad in cases.items():
        with pytest.raises(modelfile.ModelFileError, match=match):
            modelfile.model_from_bytes(bad)
    nan = bytearray(blob)
    nan[12 + hlen:12 + hlen + 4] = struct.pack("<f", float("nan"))
    with pytest.raises(modelfile.ModelFileError, match="NaN"):
        modelfile.model_from_bytes(bytes(nan))
    head = json.loads(blob[12:12 + hlen])
    head["layers"][0]["kind"] = "lstm"
    h = json.dumps(head).encode()
    with pytest.raises(modelfile.ModelFileError, match="unknown kind 'lstm'"):
        modelfile.model_from_bytes(blob[:8] + struct.pack("<I", len(h)) + h + blob[12 + hlen:])
    head["layers"][0]["kind"] = "dense"
    head["layers"][0]["params"][0][1] = [1, 2, 3, 4, 5]
    h = json.dumps(head).encode()
    with pytest.raises(modelfile.ModelFileError, match="bad shape"):
        modelfile.model_from_bytes(blob[:8] + struct.pack("<I", len(h)) + h + blob[12 + hlen:])
    with pytest.raises(modelfile.ModelFileError, match="over the limit"):
        modelfile.model_from_bytes(blob, max_bytes=100)


def _with_header(blob: bytes, edit) -> bytes:
    """``blob`` with its JSON header changed by ``edit(head)`` (the arrays stay as they are)."""
    _, _, _, hlen = struct.unpack_from("<4sHHI", blob, 0)
    head = json.loads(blob[12:12 + hlen])
    edit(head)
    h = json.dumps(head).encode()
    return blob[:8] + struct.pack("<I", len(h)) + h + blob[12 + hlen:]


def _conv_model(padding=(1, 1, 1, 1), stride=(1, 1), kernel=3, channels=2, input_shape=(1, 8, 8)):
    from ftte_core.graph import Conv2d, GlobalAvgPool
    w = np.ones((channels, input_shape[0], kernel, kernel), np.float32)
    return Model([Conv2d("conv", w, None, stride=stride, padding=padding), GlobalAvgPool("g"), Flatten("f"),
                  Dense("fc", np.ones((3, channels), np.float32))], input_shape, name="c")


def test_a_small_model_file_cannot_describe_unbounded_memory():
    """Issue 9: a 466-byte file with a conv padded by 700 made a 64 MiB agent reach 220 MiB RSS."""
    limits = modelfile.LIMITS
    base = modelfile.model_to_bytes(_conv_model())
    cases = [
        ("padding [700, 700, 700, 700] is outside the limit",
         lambda h: h["layers"][0].update(padding=[700] * 4)),
        ("stride [1, 65] is outside the limit", lambda h: h["layers"][0].update(stride=[1, 65])),
        ("padding must be a list of 4 integers", lambda h: h["layers"][0].update(padding=[1, 1, 1.5, 1])),
        ("padding must be a list of 4 integers", lambda h: h["layers"][0].update(padding=[True, 1, 1, 1])),
        ("input shape", lambda h: h.update(input_shape=[1, 1 << 20, 1 << 20])),
        ("empty dimension", lambda h: h.update(input_shape=[1, 0, 8])),
    ]
    for match, edit in cases:
        with pytest.raises(modelfile.ModelFileError, match=re.escape(match)):
            modelfile.model_from_bytes(_with_header(base, edit))
    # a dense layer of 2^40 output rows with no weight bytes would make a 4 TiB bias of zeros
    dense = modelfile.model_to_bytes(ft.zoo("mlp", (4,), 2, hidden=(3,)))
    def empty_rows(h):
        h["layers"][0]["params"] = [["weight", [1 << 40, 0]]]
    with pytest.raises(modelfile.ModelFileError, match="empty dimension"):
        modelfile.model_from_bytes(_with_header(dense, empty_rows))
    # a pooling window beyond the limit
    pool = Model([MaxPool2d("mp", (2, 2)), Flatten("f"), Dense("fc", np.ones((2, 4), np.float32))], (1, 4, 4))
    with pytest.raises(modelfile.ModelFileError, match=r"kernel \[65, 2\] is outside the limit"):
        modelfile.model_from_bytes(_with_header(modelfile.model_to_bytes(pool),
                                                lambda h: h["layers"][0].update(kernel=[65, 2])))
    # within every per-layer limit, but the chain of shapes implies too many elements per sample
    wide = _conv_model(padding=(64,) * 4, kernel=1, channels=1024, input_shape=(1, 8, 8))
    assert 1024 * 136 * 136 > limits["sample_elements"]
    with pytest.raises(modelfile.ModelFileError, match="output shape .* over the limit"):
        modelfile.model_from_bytes(modelfile.model_to_bytes(wide))
    # what the limits allow still parses
    ok = _conv_model(padding=(limits["padding"],) * 4, stride=(limits["stride"], 2))
    assert modelfile.model_from_bytes(modelfile.model_to_bytes(ok)).shapes == ok.shapes


def test_model_file_random_corruption_never_escapes_as_another_error():
    blob = bytearray(modelfile.model_to_bytes(ft.zoo("mlp", (16,), 4, hidden=(8,))))
    rng = np.random.default_rng(0)
    for _ in range(300):
        bad = bytearray(blob)
        for i in rng.integers(0, 200, size=3):  # the prefix and header, where structure lives
            bad[int(i)] = int(rng.integers(0, 256))
        try:
            modelfile.model_from_bytes(bytes(bad))
        except modelfile.ModelFileError:
            pass


# -- messages -----------------------------------------------------------------------------------------
def _task(**over):
    model = ft.zoo("mlp", (64,), 10)
    subset = ft.Subset.of(model, {"fc2": {"rows": [0, 3, 5], "bias": True}})
    from ftte_core.update import subset_values
    kw = dict(task_id="t7", run_id="run-1", base_version=3, model_hash="ab" * 32, subset=subset.to_dict(),
              subset_fingerprint=subset.fingerprint(), config=TaskConfig(lr=0.1, batch_size=8), seed=11, bits=8,
              values=subset_values(model, subset))
    kw.update(over)
    return M.TaskMessage(**kw)


def test_task_round_trip():
    msg = _task()
    back = M.decode_task(M.encode_task(msg))
    assert (back.task_id, back.run_id, back.base_version, back.model_hash, back.seed, back.bits) == (
        "t7", "run-1", 3, "ab" * 32, 11, 8)
    assert back.subset == msg.subset and back.subset_fingerprint == msg.subset_fingerprint
    assert back.config == msg.config
    assert list(back.values) == list(msg.values)
    for k in msg.values:
        np.testing.assert_array_equal(back.values[k], msg.values[k])
        assert back.values[k].dtype == np.float32


def test_task_rejects_bad_bodies():
    good = M.encode_task(_task())
    (hlen,) = struct.unpack_from("<I", good)
    head = json.loads(good[4:4 + hlen])

    def with_head(h, tail=None):
        b = json.dumps(h).encode()
        return struct.pack("<I", len(b)) + b + (good[4 + hlen:] if tail is None else tail)

    cases = [
        (b"\1\0", "shorter than"),
        (struct.pack("<I", 10 ** 6) + good[4:], "does not fit"),
        (good[:-4], "runs past the end"),
        (good + b"\0", "left over"),
        (with_head({**head, "bits": 5}), "bits must be"),
        (with_head({**head, "seed": True}), "'seed' must be int"),
        (with_head({**head, "config": {"lr": -1.0}}), "lr must be above 0"),
        (with_head({**head, "config": {"lr": 0.1, "evil": 1}}), "unknown task settings"),
        (with_head({k: v for k, v in head.items() if k != "task_id"}), "'task_id' must be str"),
        (with_head({**head, "values": [head["values"][0], head["values"][0]]}), "repeated"),
        (with_head({**head, "values": [[head["values"][0][0], [1.5, 2]]]}), "whole numbers"),
        (with_head({**head, "values": [[head["values"][0][0], ["3", "2"]]]}), "whole numbers"),
        (with_head({**head, "run_id": "../etc"}), "run_id must be"),
        (with_head({k: v for k, v in head.items() if k != "run_id"}), "'run_id' must be str"),
        (with_head({**head, "model_hash": "h" * 64}), "model_hash must be 64 lowercase hex digits"),
        (with_head({**head, "task_id": ""}), "task_id must be 1 to 128"),
        (with_head({**head, "base_version": -1}), "base_version and seed"),
        (struct.pack("<I", 3) + b"[1]" + good[4 + hlen:], "JSON object"),
        (struct.pack("<I", 3) + b"NaN", "not JSON"),
    ]
    for body, match in cases:
        with pytest.raises(M.MessageError, match=match):
            M.decode_task(body)
    nan = bytearray(good)
    nan[4 + hlen:4 + hlen + 4] = struct.pack("<f", float("inf"))
    with pytest.raises(M.MessageError, match="NaN or Inf"):
        M.decode_task(bytes(nan))


def test_json_bodies():
    body = M.encode_json({"task_id": "t1", "accepted": True, "version": 4})
    assert M.decode_json(body, M.ACK, {"task_id": str, "accepted": bool, "version": int})["version"] == 4
    with pytest.raises(M.MessageError, match="ACK: field 'version' must be int"):
        M.decode_json(M.encode_json({"version": True}), M.ACK, {"version": int})
    with pytest.raises(M.MessageError, match="over the"):
        M.decode_json(b" " * (M.MAX_JSON_BYTES + 1), M.PING)
    with pytest.raises(M.MessageError, match="not JSON"):
        M.decode_json(b"\xff\xfe", M.PING)
    with pytest.raises(ValueError):
        M.encode_json({"t": float("nan")})
    assert M.name(M.TASK) == "TASK" and M.name(200) == "type 200"


# -- the channel ----------------------------------------------------------------------------------------
async def _serve(key, handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_channel_exchanges_messages_and_counts_bytes():
    key = generate_key()
    seen = {}

    async def main():
        async def handle(r, w):
            ch = await Channel.open(r, w, "server", key, timeout=scaled(5))
            t, body = await ch.recv(timeout=scaled(5))
            await ch.send(M.PONG, body)
            big_t, big = await ch.recv(timeout=scaled(5))
            seen["big"] = (big_t, len(big))
            try:
                await ch.recv(timeout=scaled(5))
            except ChannelClosed as e:
                seen["clean"] = e.clean

        server, port = await _serve(key, handle)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        ch = await Channel.open(r, w, "client", key, timeout=scaled(5))
        await ch.send(M.PING, M.encode_json({"t": 1.5}))
        reply = await ch.recv(timeout=scaled(5))
        await ch.send(M.MODEL, b"\x07" * 300_000)  # many reads on the other side
        await ch.close()
        await asyncio.sleep(0.1)
        server.close()
        await server.wait_closed()
        return reply, ch

    (t, body), ch = asyncio.run(main())
    assert t == M.PONG and json.loads(body) == {"t": 1.5}
    assert seen["big"] == (M.MODEL, 300_000)
    assert seen["clean"] is True
    assert ch.bytes_sent > 300_000 and ch.bytes_received > 0


@pytest.mark.parametrize("reading", [False, True], ids=["close-reads", "recv-reads"])
def test_a_message_that_crosses_the_close_frame_does_not_reset_the_connection(reading):
    """The hub sends STOP and closes while an agent's UPDATE is on its way. Were the hub's socket gone
    when that UPDATE arrived, its kernel would answer with a reset; an agent busy training reads
    the reset together with the STOP and the close frame, and asyncio then raises "connection reset"
    instead of handing over what was buffered (a CI run saw exactly that). close() therefore waits for the
    peer's EOF: reading itself, or (``reader=``) waiting for the closer's own recv task to meet it."""
    import threading
    key = generate_key()
    ended, ready = {}, threading.Event()

    def closer():  # its own thread and event loop: the other side blocks its loop like a busy agent
        async def handle(r, w):
            ch = await Channel.open(r, w, "server", key, timeout=scaled(5))
            await ch.recv(timeout=scaled(5))

            async def read_on():  # like the hub's session reader: everything until the peer's end
                while True:
                    await ch.recv(timeout=scaled(10))

            reader = asyncio.ensure_future(read_on()) if reading else None
            await asyncio.sleep(0)
            await ch.send(M.STOP, M.encode_json({"reason": "done"}))
            await ch.close(linger=scaled(5), reader=reader)
            time.sleep(0.5)  # the socket itself closes on the loop's next turn: the UPDATE lands before
            if reader is not None:
                ended["closer"] = (await asyncio.gather(reader, return_exceptions=True))[0]
            ended["closer_done"] = True

        async def serve():
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            ended["port"] = server.sockets[0].getsockname()[1]
            ready.set()
            deadline = time.monotonic() + scaled(10)
            while not ended.get("closer_done") and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            server.close()

        asyncio.run(serve())

    thread = threading.Thread(target=closer, daemon=True)
    thread.start()
    assert ready.wait(scaled(10))

    async def main():
        r, w = await asyncio.open_connection("127.0.0.1", ended["port"])
        ch = await Channel.open(r, w, "client", key, timeout=scaled(5))
        await ch.send(M.PING, b"{}")
        time.sleep(0.3)                        # busy training: STOP and the close frame arrive unread
        await ch.send(M.UPDATE, b"\x01" * 1000)
        time.sleep(0.6)                        # still busy when the closer's socket goes
        msg_type, _ = await ch.recv(timeout=scaled(5))
        try:
            await ch.recv(timeout=scaled(5))
        except ChannelError as e:
            ended["client"] = e
        await ch.close()
        return msg_type

    assert asyncio.run(main()) == M.STOP
    thread.join(scaled(10))
    assert isinstance(ended["client"], ChannelClosed) and ended["client"].clean, ended["client"]
    if reading:
        assert isinstance(ended["closer"], ChannelClosed), ended["closer"]


def test_channel_wrong_key_and_garbage_fail_with_one_line():
    key = generate_key()
    errors = []

    async def main():
        async def handle(r, w):
            try:
                await Channel.open(r, w, "server", key, timeout=2)
            except ChannelError as e:
                errors.append(str(e))

        server, port = await _serve(key, handle)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(ChannelError, match="fleet key"):
            await Channel.open(r, w, "client", generate_key(), timeout=2)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 100)
        await w.drain()
        await asyncio.sleep(0.2)
        w.close()
        r, w = await asyncio.open_connection("127.0.0.1", port)  # silent peer: the handshake times out
        await asyncio.sleep(2.3)
        w.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    assert len(errors) == 3, errors
    assert all("\n" not in e for e in errors)
    assert "fleet key" in errors[0]
    assert "no handshake within 2 s" in errors[2]


def test_channel_hello_timeout_is_short_and_the_rest_has_the_whole_bound():
    """A silent peer is dropped after ``hello_timeout``; one that sent its HELLO has ``timeout``."""
    key = generate_key()
    errors = []

    async def main():
        hellos = []

        async def handle(r, w):
            t0 = asyncio.get_running_loop().time()
            try:
                await Channel.open(r, w, "server", key, timeout=1.5, hello_timeout=0.3,
                                   on_hello=lambda: hellos.append(1))
            except ChannelError as e:
                errors.append((e, asyncio.get_running_loop().time() - t0, len(hellos)))

        server, port = await _serve(key, handle)
        r, w = await asyncio.open_connection("127.0.0.1", port)    # silent
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        r, w = await asyncio.open_connection("127.0.0.1", port)    # a HELLO, then silence
        w.write(Connection("client", key).initiate())
        await w.drain()
        assert len(await asyncio.wait_for(r.read(), 5)) > 0          # HELLO_S + FIN_S, then EOF
        w.close()
        r, w = await asyncio.open_connection("127.0.0.1", port)    # a good client: on_hello once more
        ch = await Channel.open(r, w, "client", key, timeout=5)
        await ch.close()
        await asyncio.sleep(0.05)
        server.close()
        await server.wait_closed()
        return hellos

    hellos = asyncio.run(main())
    (silent, t_silent, _), (stalled, t_stalled, hello_count) = errors
    assert isinstance(silent, HandshakeTimeout) and silent.phase == "hello"
    assert "no HELLO within 0.3 s" in str(silent) and 0.25 < t_silent < 1.4
    assert isinstance(stalled, HandshakeTimeout) and stalled.phase == "handshake"
    assert "no handshake within 1.5 s" in str(stalled) and t_stalled >= 1.4 and hello_count == 1
    assert hellos == [1, 1]


def test_channel_names_a_server_that_hangs_up_unanswered_a_cut_short_handshake():
    key = generate_key()

    async def main():
        async def handle(r, w):
            w.close()   # e.g. an agent busy with other handshakes

        server, port = await _serve(key, handle)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            with pytest.raises(HandshakeCutShort) as info:
                await Channel.open(r, w, "client", key, timeout=5)
        finally:
            server.close()
            await server.wait_closed()
        return str(info.value)

    text = asyncio.run(main())
    assert "handshake cut short" in text and "not a key mismatch" in text and "wrong" not in text


def test_hub_says_a_handshake_cut_short_is_not_a_key_problem():
    """An agent that hangs up mid-handshake (busy) gets a hub line saying so, not "wrong key?"."""
    import logging

    from ftte_hub.fleet import Fleet, FleetSettings

    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logging.getLogger("ftte_hub").addHandler(handler)

    async def main():
        async def handle(r, w):
            w.close()

        server, port = await _serve(None, handle)
        fleet = Fleet(generate_key(), FleetSettings())
        fleet.add_address("127.0.0.1", port, "test")
        for _ in range(200):  # the first dial fails at once; 10 s at most
            if lines:
                break
            await asyncio.sleep(0.05)
        await fleet.stop("test over", grace=2)
        server.close()
        await server.wait_closed()

    try:
        asyncio.run(main())
    finally:
        logging.getLogger("ftte_hub").removeHandler(handler)
    assert lines, "no connect_failed line"
    assert "cut the handshake short" in lines[0] and "busy" in lines[0] and "key" not in lines[0], lines[0]


def test_channel_recv_timeout_and_cut_connection():
    key = generate_key()

    async def main():
        async def handle(r, w):
            await Channel.open(r, w, "server", key, timeout=2)
            await asyncio.sleep(0.3)
            w.close()  # no close frame: a cut, not a finished stream

        server, port = await _serve(key, handle)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        ch = await Channel.open(r, w, "client", key, timeout=2)
        with pytest.raises(ChannelError, match="nothing received for 0.1 s"):
            await ch.recv(timeout=0.1)
        with pytest.raises(ChannelClosed, match="without a close frame") as info:
            await ch.recv(timeout=2)
        assert info.value.clean is False
        server.close()
        await server.wait_closed()

    asyncio.run(main())


# -- run-scoped updates ---------------------------------------------------------------------------
def test_update_carries_its_run_id_and_older_updates_still_parse():
    from ftte_core.update import Update, UpdateError
    base = dict(base_version=2, subset_fingerprint="0123456789abcdef", num_samples=5, loss=0.5, tensors=[],
                task_id="ab12cd34-t7", device_id="dev")
    old_bytes = Update(**base).to_bytes()
    assert b"run_id" not in old_bytes                     # an unset run id adds nothing: old bytes unchanged
    assert Update.from_bytes(old_bytes).run_id == ""
    scoped = Update(**base, run_id="ab12cd34ef567890")
    back = Update.from_bytes(scoped.to_bytes())
    assert back.run_id == "ab12cd34ef567890" and back.to_bytes() == scoped.to_bytes()
    blob = scoped.to_bytes()
    _, _, _, hlen = struct.unpack_from("<4sHHI", blob, 0)
    for bad in (5, "", "x" * 65, None):
        head = json.loads(blob[12:12 + hlen])
        head["run_id"] = bad
        h = json.dumps(head).encode()
        with pytest.raises(UpdateError, match="run_id"):
            Update.from_bytes(blob[:8] + struct.pack("<I", len(h)) + h + blob[12 + hlen:])


def test_task_config_bounds_every_number_from_the_wire():
    ok = TaskConfig.from_dict({"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "local_epochs": 2.5,
                               "batch_size": 64, "max_steps": None})
    assert (ok.lr, ok.momentum, ok.batch_size, ok.max_steps) == (0.1, 0.9, 64, None)
    assert TaskConfig.from_dict(TaskConfig().as_dict()) == TaskConfig()
    bad = [({"lr": 0}, "lr must be above 0"), ({"lr": float("inf")}, "lr must be a finite number"),
           ({"lr": [1]}, "lr must be a finite number"), ({"local_epochs": 1e7}, "local_epochs must be"),
           ({"local_epochs": -1}, "local_epochs must be"), ({"batch_size": 0}, "batch_size must be between"),
           ({"batch_size": "32"}, "batch_size must be a whole number"), ({"momentum": 1.0}, "momentum must be"),
           ({"weight_decay": -0.1}, "weight_decay must be"), ({"max_steps": 2 ** 40}, "max_steps must be"),
           ({"max_steps": True}, "max_steps must be a whole number"), ({"evil": 1}, "unknown task settings")]
    for d, match in bad:
        with pytest.raises(ValueError, match=match):
            TaskConfig.from_dict(d)


def test_model_weights_over_the_readers_limit_are_refused_before_any_array_is_copied():
    blob = modelfile.model_to_bytes(ft.zoo("mlp", (64,), 10, hidden=(32,)))
    weights = 4 * (64 * 32 + 32 + 32 * 10 + 10)
    assert modelfile.model_from_bytes(blob, max_param_bytes=weights).num_params() == weights // 4
    with pytest.raises(modelfile.ModelTooLarge, match=f"weights are {weights:,} bytes") as e:
        modelfile.model_from_bytes(blob, max_param_bytes=weights - 1)
    assert e.value.param_bytes == weights and isinstance(e.value, modelfile.ModelFileError)
