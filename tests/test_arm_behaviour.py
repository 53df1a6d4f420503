"""Behaviour that can differ on ARM (issue 5), pinned so it is the same on every platform.

These run on the x86-64 host and, through scripts/pi-check, inside emulated Raspberry Pi
userlands (arm64 as a Cortex-A72, armhf as a Cortex-A7): what passes here proves the ARM case
there.

- ``char`` is unsigned on armhf and signed on x86-64/arm64: the int8/int4 codec and the update
  wire format must give the very same bytes, so golden byte strings computed on x86-64 are
  asserted everywhere (the inputs are exact binary fractions built from integers, never from a
  random generator or libm, so the inputs themselves are identical on every platform).
- alignment: numpy arrays need not be aligned (a view into a byte buffer at an odd offset), and
  update bytes arrive at any offset of a receive buffer. ARMv7 faults on some unaligned
  accesses, so the kernels run on misaligned views in a child process (a SIGBUS then fails one
  test instead of killing the run).
- float denormals: ARMv7 NEON flushes them to zero, x86 and AArch64 do not by default; kernels
  fed denormals must give finite results that agree with numpy to an absolute tolerance far
  below anything that matters.
- threads: the CPU count the kernels detect (qemu-user passes the host's affinity through),
  and FTTE_NUM_THREADS.
- byte order: the wire format is little-endian by definition, not by accident of the host.
"""
import hashlib
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ftte_core as ft
from ftte_core import _kernels as K
from ftte_core.update import FORMAT_VERSION, MAGIC, TensorDelta, Update, decode_update

F32 = np.float32


def _exact_matrix(R, F, mul, mod, shift, denom):
    """Integers (i * mul % mod - shift) / denom as float32: exact, identical on every platform."""
    i = np.arange(R * F, dtype=np.int64)
    return ((i * mul % mod - shift).astype(np.float64) / denom).astype(F32).reshape(R, F)


def _codec_case():
    """base and new [5, 7]: rows of different magnitude, one negative-only, one all-zero delta."""
    R, F = 5, 7
    base = _exact_matrix(R, F, 37, 101, 50, 64.0)
    delta = _exact_matrix(R, F, 53, 97, 48, 256.0)
    delta *= np.array([1.0, 8.0, 1 / 16, 1.0, 0.0], F32)[:, None]
    delta[3] = -np.abs(delta[3]) - F32(1 / 128)  # a row with only negative deltas
    new = (base + delta).astype(F32)
    return new, base


def _encode(bits, stochastic, seed):
    new, base = _codec_case()
    R, F = base.shape
    scales = np.empty(R, F32)
    if bits == 8:
        q = np.empty((R, F), np.int8)
        K.encode_int8(new, base, None, q, scales, stochastic, seed)
    else:
        q = np.empty((R, (F + 1) // 2), np.uint8)
        K.encode_int4(new, base, None, q, scales, stochastic, seed)
    return q, scales


# Computed on x86-64 (g++ 12, numpy 2.x); every platform must reproduce them byte for byte.
# Seeds above 2**63 check that 64-bit seeds survive a 32-bit platform's argument conversion.
GOLDEN_CODEC = {  # (bits, stochastic, seed): (levels hex, little-endian float32 row scales hex)
    (8, False, 0): ("810d9925b13dc856e06ff88110992da849c464df7ff581e899d0b1b900000000000000",
                    "0683c13af67a3d3ca552a9380683c13a00000000"),
    (8, True, 7): ("810d9925b03cc856e06ef88110992da849c464df7ff681e899d0b0b800000000000000",
                   "0683c13af67a3d3ca552a9380683c13a00000000"),
    (8, True, 2**63 + 12345): ("810d9925b03dc857e06ff88110992da949c364de7ff681e899d1b1b800000000000000",
                               "0683c13af67a3d3ca552a9380683c13a00000000"),
    (4, False, 0): ("192a3c0de506190ab3d4e6079fafcd0c00000000", "b76ddb3c6edb563e0000c03ab76ddb3c00000000"),
    (4, True, 7): ("192b3b0de406090ab2d4e60790bebd0c00000000", "b76ddb3c6edb563e0000c03ab76ddb3c00000000"),
    (4, True, 2**64 - 1): ("192b3b0ce4f6190ab2d4e60790bfcd0c00000000", "b76ddb3c6edb563e0000c03ab76ddb3c00000000"),
}
GOLDEN_UPDATE_SHA256 = "4a646f3921e5c147de4db696de199b3bde80faef049dfaa67d71b0a71dffff38"
GOLDEN_RANDOM_BITS = {(0, 0, 0): 1099029488, (7, 3, 5): 2820846332, (2**63 + 12345, 1, 6): 4099779163,
                      (2**64 - 1, 4, 0): 3592845169}


@pytest.mark.parametrize("bits,stochastic,seed", sorted(GOLDEN_CODEC, key=str))
def test_codec_golden_bytes(bits, stochastic, seed):
    q, scales = _encode(bits, stochastic, seed)
    want_q, want_s = GOLDEN_CODEC[(bits, stochastic, seed)]
    assert q.tobytes().hex() == want_q, "encoded levels differ from the x86-64 bytes"
    assert scales.astype("<f4").tobytes().hex() == want_s, "row scales differ from the x86-64 bytes"


@pytest.mark.parametrize("seed,r,c", [(0, 0, 0), (7, 3, 5), (2**63 + 12345, 1, 6), (2**64 - 1, 4, 0)])
def test_codec_random_bits_golden(seed, r, c):
    assert K.codec_random_bits(seed, r, c) == GOLDEN_RANDOM_BITS[(seed, r, c)]


def test_int8_levels_keep_their_sign():
    """Every int8 level decodes to level * scale (a char-signedness bug turns -1 into 255)."""
    levels = np.arange(-127, 128, dtype=np.int8).reshape(1, -1)
    scale = np.array([0.5], F32)
    out = np.empty(levels.shape, F32)
    K.decode_int8(levels, scale, out)
    np.testing.assert_array_equal(out, levels.astype(F32) * F32(0.5))
    target = np.zeros(levels.shape, F32)
    K.merge_int8(target, None, [levels], [scale], np.array([1.0], F32))
    np.testing.assert_array_equal(target, levels.astype(F32) * F32(0.5))


def test_int4_nibbles_are_twos_complement():
    """All 256 packed bytes: low nibble is element 2i, high nibble 2i+1, both sign-extended."""
    packed = np.arange(256, dtype=np.uint8).reshape(1, -1)
    want = np.empty((1, 512), F32)
    want[0, 0::2] = ((packed[0] & 0xF).astype(np.int16) ^ 8) - 8
    want[0, 1::2] = ((packed[0] >> 4).astype(np.int16) ^ 8) - 8
    out = np.empty((1, 512), F32)
    K.decode_int4(packed, np.array([1.0], F32), out)
    np.testing.assert_array_equal(out, want)


def test_stochastic_encode_is_unbiased_in_sign():
    """Negative deltas round to negative levels (never wrap to large positive ones)."""
    q, scales = _encode(8, True, 7)
    new, base = _codec_case()
    d = new - base
    assert np.all(np.sign(q[d < 0]) <= 0) and np.all(np.sign(q[d > 0]) >= 0)
    q4, _ = _encode(4, True, 7)
    lo = ((q4 & 0xF).astype(np.int16) ^ 8) - 8
    hi = ((q4 >> 4).astype(np.int16) ^ 8) - 8
    levels = np.stack([lo, hi], axis=2).reshape(q4.shape[0], -1)[:, :d.shape[1]]
    assert np.all(levels[d < 0] <= 0) and np.all(levels[d > 0] >= 0)


# ---------------------------------------------------------------- wire format
def _golden_update():
    q8, s8 = _encode(8, True, 7)
    q4, s4 = _encode(4, False, 0)
    new, base = _codec_case()
    return Update(base_version=3, subset_fingerprint="0123456789abcdef", num_samples=1437, loss=0.3125,
                  tensors=[TensorDelta("fc1.weight", 8, q8, s8, q8.shape),
                           TensorDelta("fc1.bias", 4, q4, s4, base.shape),
                           TensorDelta("fc2.weight", 32, (new - base).astype(F32), None, base.shape)],
                  stats={"delta_l2": 1.5}, peak_memory_bytes=123456, device_id="pi-0", task_id="t-9")


def test_update_wire_bytes_golden():
    blob = _golden_update().to_bytes()
    assert hashlib.sha256(blob).hexdigest() == GOLDEN_UPDATE_SHA256


def test_wire_format_is_little_endian():
    u = _golden_update()
    blob = u.to_bytes()
    magic, version, flags, hlen = struct.unpack_from("<4sHHI", blob, 0)
    assert (magic, version, flags) == (MAGIC, FORMAT_VERSION, 0)
    assert blob[4:6] == FORMAT_VERSION.to_bytes(2, "little")
    assert blob[8:12] == hlen.to_bytes(4, "little")
    # The first tensor's int8 data follows the header, then its scales as little-endian float32.
    pos = 12 + hlen + u.tensors[0].data.nbytes
    R = u.tensors[0].shape[0]
    scales = struct.unpack_from(f"<{R}f", blob, pos)
    np.testing.assert_array_equal(np.array(scales, F32), u.tensors[0].scales)


@pytest.mark.parametrize("offset", range(8))
def test_update_from_bytes_at_any_offset(offset):
    """Receive buffers put an update at any offset: parsing must not assume alignment."""
    u = _golden_update()
    blob = u.to_bytes()
    buf = bytearray(b"\xa5" * offset) + bytearray(blob) + bytearray(b"\x5a" * 3)
    view = memoryview(buf)[offset:offset + len(blob)]
    got = Update.from_bytes(view)
    assert got.to_bytes() == blob
    for a, b in zip(got.tensors, u.tensors):
        assert a.data.flags.aligned and (a.scales is None or a.scales.flags.aligned)
        np.testing.assert_array_equal(a.data, b.data)
    want = decode_update(u)
    for k, v in decode_update(got).items():
        np.testing.assert_array_equal(v, want[k])


# ---------------------------------------------------------------- alignment of kernel arguments
_MISALIGNED_CHILD = textwrap.dedent(r"""
    import sys
    import numpy as np
    from ftte_core import _kernels as K

    def view(shape, offset, fill=None, dtype=np.float32):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = bytearray(n + offset)
        a = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
        if fill is not None:
            a[...] = fill
        return a

    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((9, 37)).astype(np.float32)
    w0 = rng.standard_normal((11, 37)).astype(np.float32)
    b0 = rng.standard_normal(11).astype(np.float32)
    ok = 0
    for off in (1, 2, 3, 5, 6):
        x, w, b, y = view(x0.shape, off, x0), view(w0.shape, off, w0), view(b0.shape, off, b0), view((9, 11), off)
        assert not x.flags.aligned
        try:
            K.dense_forward(x, w, b, y)
        except ValueError as e:  # rejecting misaligned input with a clear error is acceptable too
            print("rejected", off, e); continue
        ref = x0.astype(np.float64) @ w0.astype(np.float64).T + b0
        assert np.allclose(y, ref, rtol=1e-4, atol=1e-4), ("dense_forward", off)
        c = view((9, 11), off, 0.0)
        K.sgemm(x, w, c, trans_b=True)
        assert np.allclose(c, x0.astype(np.float64) @ w0.astype(np.float64).T, rtol=1e-4, atol=1e-4), ("sgemm", off)
        r = view(x0.shape, off)
        K.relu_forward(x, r)
        assert np.array_equal(r, np.maximum(x0, 0)), ("relu", off)
        new = view(w0.shape, off, w0 + 0.25)
        q, s = view(w0.shape, off, dtype=np.int8), view((11,), off)
        K.encode_int8(new, w, None, q, s, False, 0)
        q2, s2 = np.empty(w0.shape, np.int8), np.empty(11, np.float32)
        K.encode_int8(np.ascontiguousarray(new), np.ascontiguousarray(w), None, q2, s2, False, 0)
        assert q.tobytes() == q2.tobytes() and s.tobytes() == s2.tobytes(), ("encode_int8", off)
        out = view(w0.shape, off)
        K.decode_int8(q, s, out)
        assert np.array_equal(out, q2.astype(np.float32) * s2[:, None]), ("decode_int8", off)
        ok += 1
    print("ok", ok)
""")


def test_kernels_on_misaligned_arrays():
    r = subprocess.run([sys.executable, "-c", _MISALIGNED_CHILD], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"child exited {r.returncode} (negative: killed by signal):\n{r.stdout}{r.stderr}"
    assert "ok" in r.stdout


# ---------------------------------------------------------------- denormals
TINY = np.finfo(F32).tiny          # smallest normal float32, ~1.18e-38
DENORM = F32(TINY / 4)             # a denormal
ATOL = 1e-35                       # far below any weight or activation that matters


def test_dense_with_denormal_inputs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 40)).astype(F32)
    x[::2, ::3] = DENORM
    w = (rng.standard_normal((5, 40)) * 1e-30).astype(F32)  # products underflow to denormals
    w[1] = DENORM
    b = np.array([DENORM, -DENORM, 0, 1e-38, 1], F32)
    y = np.empty((6, 5), F32)
    K.dense_forward(x, w, b, y)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.astype(np.float64).T + b, rtol=1e-4, atol=ATOL)
    dw, db, dx = np.empty((5, 40), F32), np.empty(5, F32), np.empty((6, 40), F32)
    dy = np.full((6, 5), DENORM, F32)
    K.dense_backward(x, w, dy, None, dw, db, dx)
    for a in (dw, db, dx):
        assert np.all(np.isfinite(a))
    np.testing.assert_allclose(dw, dy.T.astype(np.float64) @ x, rtol=1e-4, atol=ATOL)
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(0), rtol=1e-4, atol=ATOL)


def test_activations_and_loss_with_denormals():
    x = np.array([DENORM, -DENORM, TINY, -TINY, 0.0, -0.0, 1.0, -1.0], F32)
    y = np.empty_like(x)
    K.relu_forward(x, y)
    assert np.all(y >= 0) and np.all(np.isfinite(y))
    np.testing.assert_allclose(y, np.maximum(x, 0), rtol=0, atol=ATOL)
    logits = np.array([[DENORM, -DENORM, 0, TINY], [80.0, -80.0, DENORM, 0]], F32)
    probs = np.empty_like(logits)
    loss = K.softmax_xent_forward(logits, np.array([0, 1], np.int32), probs)
    assert np.isfinite(loss) and np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs[0], 0.25, rtol=1e-5)


def test_codec_with_denormal_deltas():
    """A row whose deltas are all denormal: scale may underflow, but nothing may become NaN."""
    base = np.zeros((3, 9), F32)
    new = np.zeros((3, 9), F32)
    new[0] = DENORM
    new[1, ::2] = -DENORM
    new[2] = np.linspace(-1, 1, 9, dtype=F32)
    for bits in (8, 4):
        scales = np.empty(3, F32)
        q = np.empty((3, 9) if bits == 8 else (3, 5), np.int8 if bits == 8 else np.uint8)
        enc = K.encode_int8 if bits == 8 else K.encode_int4
        enc(new, base, None, q, scales, True, 3)
        out = np.empty((3, 9), F32)
        (K.decode_int8 if bits == 8 else K.decode_int4)(q, scales, out)
        assert np.all(np.isfinite(scales)) and np.all(scales >= 0)
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out[:2], new[:2], rtol=0, atol=ATOL)
        step = 1 / (127 if bits == 8 else 7)
        assert np.all(np.abs(out[2] - new[2]) <= step + 1e-6)


def test_sgd_with_denormal_gradients():
    p = np.ones((4, 6), F32)
    g = np.full((4, 6), DENORM, F32)
    v = np.zeros((4, 6), F32)
    K.sgd_update_rows(p, None, g, v, 0.1, 0.9)
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(v))
    np.testing.assert_allclose(p, 1.0, rtol=0, atol=1e-7)
    np.testing.assert_allclose(v, g, rtol=0, atol=ATOL)


# ---------------------------------------------------------------- threads
def _usable_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def test_thread_count_detected():
    assert ft.get_num_threads() >= 1
    d = K.default_num_threads()
    assert 1 <= d <= max(_usable_cpus(), os.cpu_count() or 1)


def _child_threads(env_value):
    env = dict(os.environ)
    env.pop("FTTE_NUM_THREADS", None)
    if env_value is not None:
        env["FTTE_NUM_THREADS"] = env_value
    return subprocess.run([sys.executable, "-c", "import ftte_core as f; print(f.get_num_threads())"],
                          env=env, capture_output=True, text=True, timeout=300)


def test_ftte_num_threads_honoured():
    r = _child_threads("3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3"
    r = _child_threads(None)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) == K.default_num_threads()
    r = _child_threads("three")
    assert r.returncode != 0 and "FTTE_NUM_THREADS" in r.stderr


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 96)).astype(F32)
    w = rng.standard_normal((48, 96)).astype(F32)
    before = ft.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            ft.set_num_threads(n)
            assert ft.get_num_threads() == n
            y = np.empty((64, 48), F32)
            K.dense_forward(x, w, None, y)
            outs.append(y)
    finally:
        ft.set_num_threads(before)
    assert outs[0].tobytes() == outs[1].tobytes() == outs[2].tobytes()


def _downlink_golden_values(shift):
    """Exact binary fractions built from integers: the same float32 values on every platform."""
    out = {}
    for key, (R, F) in (("w", (5, 7)), ("b", (5, 1))):
        i = np.arange(R * F, dtype=np.float32).reshape(R, F)
        out[key] = ((i * np.float32(7919) + np.float32(shift)) % np.float32(251) - np.float32(125)) / np.float32(1024)
    return out


@pytest.mark.parametrize("bits, canonical, frame", [
    (8, "d3d51154b480b621eb32f14e9acd8493", "a5b48d109b2f2906638c4e34c3ead86e"),
    (4, "d0c989d30a2d26e9fd19406e82ac3d15", "500ad4fc61dc5f8563c292d9a377143f"),
])
def test_downlink_canonical_values_golden(bits, canonical, frame):
    """Downlink deltas need the hub (say x86-64) and every agent (arm64, armv7) to reach the very
    same canonical values: the steps' bytes and the values after applying them are pinned."""
    from ftte_core import downlink as DL

    origin = _downlink_golden_values(0)
    assert DL.values_checksum(origin) == "4310fccb53d7ccc9045f02fe8fa7433d"
    stream = DL.DownlinkStream(origin, "golden", bits=bits)
    stream.publish(0, _downlink_golden_values(3))
    stream.publish(1, _downlink_golden_values(11))
    blob = DL.encode_frame(stream.frame_for(DL.ORIGIN))
    assert (stream.checksum, hashlib.sha256(blob).hexdigest()[:32]) == (canonical, frame)
    got = DL.resolve(DL.decode_frame(blob), None, origin)       # what an agent computes
    assert DL.values_checksum(got) == canonical
