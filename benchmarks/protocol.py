"""Fleet protocol cost: encrypt+decrypt throughput and per-frame overhead.

    python benchmarks/protocol.py            # 1 MB messages (and a few other sizes)
    python benchmarks/protocol.py --reps 51

Throughput: one Connection pair after a real handshake; a timed batch is ``send`` on the client
then ``receive_data`` of the whole frame on the server (so it includes framing, buffering and
the copies the sans-IO layer makes, not just ChaCha20-Poly1305). Median over `reps` batches with
the 10th-90th percentile spread; MB = 10**6 bytes of payload. Overhead: wire bytes per frame
minus payload (4-byte length + 1-byte type + 16-byte tag = 21) as a share of the payload.
The handshake cost (one HKDF, two HMACs, 144 bytes on the wire) is timed separately.
"""
import argparse
import os
import platform
import statistics
import time

from ftte_core import protocol as P

ap = argparse.ArgumentParser()
ap.add_argument("--reps", type=int, default=21)
ap.add_argument("--sizes", default="1000000,100000,10000,1000,100",
                help="payload bytes per message, comma-separated (the first is the headline)")
args = ap.parse_args()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


key = P.generate_key()


def pair():
    c, s = P.Connection("client", key), P.Connection("server", key)
    s.receive_data(c.initiate())
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    assert c.established and s.established
    return c, s


# handshake
times = []
wire = 0
for _ in range(200):
    t0 = time.perf_counter()
    c, s = P.Connection("client", key), P.Connection("server", key)
    a = c.initiate()
    s.receive_data(a)
    b = s.data_to_send()
    c.receive_data(b)
    d = c.data_to_send()
    s.receive_data(d)
    times.append(time.perf_counter() - t0)
    wire = len(a) + len(b) + len(d)
print(f"# {platform.machine()}, Python {platform.python_version()}, PyNaCl {__import__('nacl').__version__} "
      "(libsodium)")
print(f"handshake (both sides, in-process): median {statistics.median(times) * 1e6:.0f} us, "
      f"{wire} bytes on the wire")
print()
print(f"{'payload B':>10} {'frame B':>10} {'overhead B':>10} {'overhead %':>10} "
      f"{'MB/s median':>12} {'p10-p90':>17}")
for size in [int(x) for x in args.sizes.split(",")]:
    c, s = pair()
    body = os.urandom(size)
    n = max(1, 20_000_000 // max(size, 1) // 4)  # ~5 MB per batch
    n = min(n, 2000)
    rates = []
    frame_len = len(c.send(1, body))
    c, s = pair()
    for _ in range(args.reps):
        t0 = time.perf_counter()
        for _ in range(n):
            ev = s.receive_data(c.send(1, body))
        dt = time.perf_counter() - t0
        assert len(ev) == 1 and len(ev[0].body) == size
        rates.append(n * size / dt / 1e6)
    over = frame_len - size
    print(f"{size:>10} {frame_len:>10} {over:>10} {100 * over / size:>9.4f}% "
          f"{statistics.median(rates):>12.1f} {pct(rates, 0.1):>8.1f}-{pct(rates, 0.9):<8.1f}")
