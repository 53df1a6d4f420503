"""What the agent process loads (issue 11: the agent, mDNS on, idle and training, <= 50 MiB peak RSS).

Every module an agent imports costs a device resident memory, so the agent leaves out what it
does not use at runtime (benchmarks/agent_memory.py measures the process):
- onnx / ftte_core.onnx_io: agents receive models in the native model file, never as ONNX;
- ssl and _hashlib: OpenSSL's Python bindings (libssl, libcrypto); the agent encrypts with
  libsodium (PyNaCl) and hashes with Python's built-in SHA-256 (ftte_agent/lean.py);
- cryptography: the protocol used it before libsodium (6.5 MiB against PyNaCl's 1.1; it may be
  installed, by the flower extra for one, but nothing in the agent may import it);
- numpy.ma: numpy 2 imports it for ``np.unique`` (subset rows are checked without it);
- ftte_core.search, fractions, decimal: the agent only parses a size (ftte_core.sizes);
- flwr: Flower belongs to a site hub's SuperNode (the optional `flower` extra), never to a device.
The agent also keeps every thread on glibc's main malloc arena (checked with malloc_info).
Each check runs in a fresh interpreter that does what an agent does: import its modules, parse
--memory-budget, run a handshake, build a task's subset from explicit rows, train it and encode
the update.
"""
import json
import os
import subprocess
import sys
import textwrap

from ftte_agent.lean import _builtin_hashes
from slowdev import scaled

NOT_LOADED = ("onnx", "ftte_core.onnx_io", "ssl", "_ssl", "_hashlib", "numpy.ma", "ftte_core.search",
              "fractions", "decimal", "flwr", "cryptography")

AGENT_LIKE = textwrap.dedent("""
    import ctypes, json, os, platform, sys, tempfile, threading
    import ftte_agent.cli  # first, as in `ftte-agent`: the entry point decides how asyncio and hashlib load
    import ftte_agent.advertise, ftte_agent.device, ftte_agent.server
    import zeroconf.asyncio
    import numpy as np
    from ftte_core.local import LocalWorker, TaskConfig
    from ftte_core.modelfile import content_hash
    from ftte_core.protocol import Connection, HandshakeComplete, generate_key
    from ftte_core.sizes import parse_size
    from ftte_core.subset import Subset
    from ftte_core.update import subset_values
    from ftte_core.zoo import zoo


    def malloc_heaps():
        # glibc's malloc_info XML has one <heap nr=...> per arena; None off glibc
        if platform.libc_ver()[0] != "glibc":
            return None
        libc = ctypes.CDLL(None)
        libc.fopen.restype = ctypes.c_void_p
        libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        fd, path = tempfile.mkstemp()
        os.close(fd)
        fp = libc.fopen(path.encode(), b"w")
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        with open(path) as f:
            text = f.read()
        os.unlink(path)
        return text.count("<heap nr=")


    assert parse_size("64MiB") == 64 << 20
    key = generate_key()
    c, s = Connection("client", key), Connection("server", key)
    s.receive_data(c.initiate())
    assert c.receive_data(s.data_to_send()) == [HandshakeComplete("server")]
    assert s.receive_data(c.data_to_send()) == [HandshakeComplete("client")]
    model = zoo("mlp", (8,), 3, seed=0, hidden=(6,))
    subset = Subset.from_dict(model, {"fc1": {"rows": [0, 2, 5], "bias": False}, "fc2": {"rows": "all", "bias": True}})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    y = rng.integers(0, 3, 16).astype(np.int32)
    result = LocalWorker(model, subset).run(subset_values(model, subset), 0, x, y,
                                            TaskConfig(lr=0.05, batch_size=8, local_epochs=1.0), bits=8, seed=1)
    assert result.steps == 2 and result.update.stats["delta_l2"] > 0
    t = threading.Thread(target=lambda: bytearray(1 << 17))  # a thread's first malloc: its own arena, unless capped
    t.start()
    t.join()
    print(json.dumps({"modules": sorted(sys.modules), "sha256": content_hash(b"abc"),
                      "malloc_heaps": malloc_heaps()}))
""")


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(300))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loaded_by_numpy_itself() -> set:
    # numpy 1.x (Debian's python3-numpy on 32-bit ARM, where pip has no wheel) imports numpy.ma
    # and, through numpy.random, hashlib's OpenSSL backend at `import numpy`: the agent can't avoid those
    return set(_run("import json, sys, numpy; print(json.dumps({'modules': sorted(sys.modules)}))")["modules"])


def test_the_agent_does_not_load_what_it_does_not_use():
    out = _run(AGENT_LIKE)
    loaded = set(out["modules"])
    # a Python built without its own digests keeps OpenSSL's (ftte_agent/lean.py)
    not_loaded = set(NOT_LOADED) - (set() if _builtin_hashes() else {"_hashlib"}) - _loaded_by_numpy_itself()
    assert not loaded & not_loaded, sorted(loaded & not_loaded)
    assert not any(m.startswith(("onnx", "cryptography")) for m in loaded)
    # every thread allocates from glibc's main arena (ftte_agent/lean.py: single_malloc_arena),
    # unless the environment sets its own MALLOC_ARENA_MAX (which the agent leaves alone)
    if not os.environ.get("MALLOC_ARENA_MAX"):
        assert out["malloc_heaps"] in (None, 1), out["malloc_heaps"]
    # Python's built-in SHA-256 gives the same digests as OpenSSL's
    assert out["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_ssl_stays_importable_after_the_agent_cli():
    out = _run("import ftte_agent.cli, ssl, hashlib, json, sys; ssl.create_default_context(); "
               "print(json.dumps({'modules': sorted(sys.modules), 'sha256': hashlib.sha256(b'abc').hexdigest()}))")
    assert "ssl" in out["modules"]


def test_a_process_that_loaded_ssl_first_is_left_as_it_is():
    out = _run("import ssl, hashlib, asyncio.base_events as b, ftte_agent.cli, json, sys; "
               "print(json.dumps({'modules': sorted(sys.modules), 'asyncio_tls': b.ssl is not None, "
               "'sha256': hashlib.sha256(b'abc').hexdigest()}))")
    assert out["asyncio_tls"] and "_hashlib" in out["modules"]
