"""Keep OpenSSL's Python bindings out of the agent process (issue 11: <= 50 MiB peak on a device).

The agent needs neither of them: its connections are authenticated and encrypted by
``ftte_core.protocol`` with libsodium (PyNaCl), never by TLS, and it hashes a few small things (model files, handshake transcripts) with SHA-256. Yet two
standard modules load the system's libssl/libcrypto as soon as they are imported:

- ``asyncio`` imports ``ssl`` (for TLS transports the agent never opens): 1.3 MiB;
- ``hashlib`` and ``hmac`` import ``_hashlib`` (OpenSSL's digests); Python's built-in SHA-256,
  SHA-512, BLAKE2 and MD5 give the same digests: another 3.3 MiB, most of it libcrypto's pages.
  (Where Python was built without its own digests, _hashlib is kept.)

``import_without_openssl()`` imports those three with ``ssl`` and ``_hashlib`` made unimportable,
then makes them importable again: the modules fall back as they are written to (asyncio without
TLS support, hashlib with its built-in constructors), and code that imports ``ssl`` later still gets
it. A module already imported is left as it is, so this changes nothing in a process that has
loaded them before (a test run, an embedding application). It must run before anything imports
asyncio, hashlib or hmac: ``ftte_agent.cli`` calls it first thing.

``single_malloc_arena()`` (also first thing, before NumPy and the kernels start their threads):
glibc gives each thread that allocates its own malloc arena (up to 8 per core), and memory freed
in one arena serves only the threads attached to it. The agent's allocations move between threads
(a MODEL is parsed in a short-lived thread, each task trains in another, the kernels' pool has its
own), so with one arena per thread what a finished task freed was not what the next one reused.
``M_ARENA_MAX = 1`` puts every thread on the main heap: about 0.5 MiB off the training peak
(benchmarks/agent_memory.py). The kernels' scratch comes from malloc on every call, possibly in
the pool's threads, yet training the zoo models showed no slowdown from the shared arena's lock
(2 threads, x86-64). An operator's own ``MALLOC_ARENA_MAX`` wins; off glibc this does nothing.

Elsewhere for the same target: the protocol's primitives come from libsodium through PyNaCl
(1.1 MiB, where the ``cryptography`` package with its own OpenSSL cost 6.5), and the agent drops
each received frame once dispatched (``server.Session.run``). Measured, evaluated and rejected, and what is left: docs/benchmarks.md
(agent_memory.py).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

#: (modules to import, the OpenSSL binding they must do without)
_PAIRS = ((("asyncio",), "ssl"), (("hashlib", "hmac"), "_hashlib"))


def _builtin_hashes() -> bool:
    """Python was built with its own code for every digest hashlib always offers (some
    distributions leave it out and rely on OpenSSL alone: then _hashlib must stay)."""
    sha2 = ["_sha2"] if sys.version_info >= (3, 12) else ["_sha256", "_sha512"]
    return all(importlib.util.find_spec(m) is not None for m in ["_md5", "_sha1", "_blake2", "_sha3"] + sha2)


def import_without_openssl() -> None:
    for modules, binding in _PAIRS:
        if binding in sys.modules or any(m in sys.modules for m in modules):
            continue  # too late, or someone already uses it: leave the process as it is
        if binding == "_hashlib" and not _builtin_hashes():
            continue
        sys.modules[binding] = None  # `import binding` raises ImportError while this holds
        try:
            for m in modules:
                importlib.import_module(m)
        finally:
            del sys.modules[binding]


_M_ARENA_MAX = -8   # glibc's <malloc.h>


def single_malloc_arena() -> bool:
    """Put every thread of this process on glibc's main malloc arena; True when it did."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):  # no ctypes, or a libc without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(_M_ARENA_MAX, 1) == 1
