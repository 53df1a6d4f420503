"""Time limits for tests that start real processes, scaled to how fast this machine really is.

The suite also runs in emulated Raspberry Pi userlands (scripts/pi-check: qemu-user, tens of times
slower than the x86 host) and on real Pis. A fixed "20 s task timeout" or "120 s run" tuned on a
fast host fails there although nothing is wrong. So:

* ``slowdown()`` measures, once per test process, the training speed of this machine with the
  agent's own benchmark (``ftte_agent.device.measure_speed``: zoo "mlp" training steps, the work
  these tests' agents do) and divides a reference speed by it. The reference is a speed at which
  the suite's base figures hold with room to spare (this project's x86 host measures 12-35
  GFLOP/s, the low end with every core busy); a faster machine gets 1, never less.
  ``FTTE_TEST_SLOWDOWN=<factor>`` overrides the measurement (e.g. for a CI runner known to be slow).
* ``scaled(seconds)`` is a base figure times that factor: use it for every deadline and for
  every time-based flag given to a hub or agent under test (--task-timeout, --wait-timeout, ...).
* ``wait_for_progress`` waits on progress rather than a total: it fails only when the watched
  value (log lines, metrics.jsonl lines) has not changed for a stall limit, so a long but moving
  run is never cut off; an overall cap (many stall limits) still bounds a livelock.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable, Hashable

#: GFLOP/s of the agent benchmark at which the suite's base time limits hold with room to spare
REFERENCE_GFLOPS = 10.0
#: the factor never exceeds this (a benchmark disturbed by a paused VM must not make a wait endless)
MAX_SLOWDOWN = 200.0


def _measure_gflops() -> float:
    from ftte_agent.device import measure_speed

    # best of three: a neighbouring process stealing the core makes one sample slow, not the machine
    return max(measure_speed(0.2) for _ in range(3))


@functools.lru_cache(maxsize=None)
def slowdown() -> float:
    """How many times slower than the reference this machine trains (>= 1)."""
    forced = os.environ.get("FTTE_TEST_SLOWDOWN", "").strip()
    if forced:
        try:
            value = float(forced)
        except ValueError:
            raise ValueError(f"FTTE_TEST_SLOWDOWN must be a number, got {forced!r}") from None
        return min(MAX_SLOWDOWN, max(1.0, value))
    gflops = _measure_gflops()
    return min(MAX_SLOWDOWN, max(1.0, REFERENCE_GFLOPS / max(gflops, 1e-6)))


def scaled(seconds: float) -> float:
    """A base time limit (tuned on a fast host) for this machine."""
    return float(seconds) * slowdown()


def flag(seconds: float) -> str:
    """``scaled(seconds)`` as a command-line value."""
    return f"{scaled(seconds):.1f}"


def wait_for_progress(done: Callable[[], object], progress: Callable[[], Hashable], what: str,
                      stall: float = 60.0, describe: Callable[[], str] = lambda: "",
                      poll: float = 0.1, max_stalls: int = 30):
    """Wait until ``done()`` is truthy (returns it). Fails when ``progress()`` has not changed for
    ``scaled(stall)`` seconds, or after ``max_stalls`` stall limits in all."""
    limit = scaled(stall)
    start = last_change = time.monotonic()
    seen = progress()
    while True:
        result = done()
        if result:
            return result
        now = time.monotonic()
        current = progress()
        if current != seen:
            seen, last_change = current, now
        if now - last_change > limit:
            raise AssertionError(f"no progress towards {what} for {limit:.0f} s (slowdown x{slowdown():.1f})"
                                 + _details(describe))
        if now - start > limit * max_stalls:
            raise AssertionError(f"{what}: still not done after {now - start:.0f} s although progressing"
                                 + _details(describe))
        time.sleep(poll)


def _details(describe: Callable[[], str]) -> str:
    text = describe()
    return f"; {text}" if text else ""
