"""The test helper that scales multi-process time limits (slowdev.py)."""
import itertools
import time

import pytest

import slowdev


def test_slowdown_is_measured_once_and_never_below_one():
    first = slowdev.slowdown()
    assert 1.0 <= first <= slowdev.MAX_SLOWDOWN
    assert slowdev.slowdown() == first  # cached: every test of a run uses the same factor
    assert slowdev.scaled(2.0) == pytest.approx(2.0 * first)


def test_an_override_is_clamped(monkeypatch):
    slowdev.slowdown.cache_clear()
    try:
        for value, want in (("0.2", 1.0), ("7.5", 7.5), ("1e9", slowdev.MAX_SLOWDOWN)):
            monkeypatch.setenv("FTTE_TEST_SLOWDOWN", value)
            slowdev.slowdown.cache_clear()
            assert slowdev.slowdown() == want
        monkeypatch.setenv("FTTE_TEST_SLOWDOWN", "fast")
        slowdev.slowdown.cache_clear()
        with pytest.raises(ValueError, match="FTTE_TEST_SLOWDOWN"):
            slowdev.slowdown()
    finally:
        monkeypatch.delenv("FTTE_TEST_SLOWDOWN")
        slowdev.slowdown.cache_clear()


def test_waiting_goes_on_while_progressing_and_stops_at_a_stall(monkeypatch):
    monkeypatch.setattr(slowdev, "slowdown", lambda: 1.0)
    counter = itertools.count()
    start = time.monotonic()
    # progress every poll, done after 0.5 s: longer than the 0.2 s stall limit, still fine
    assert slowdev.wait_for_progress(lambda: time.monotonic() - start > 0.5, lambda: next(counter), "a moving run",
                                     stall=0.2, poll=0.01)
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="no progress towards a stuck run for 0 s.*log tail"):
        slowdev.wait_for_progress(lambda: False, lambda: 0, "a stuck run", stall=0.2, poll=0.01,
                                  describe=lambda: "log tail")
    assert time.monotonic() - t0 < 2
    with pytest.raises(AssertionError, match="still not done"):
        slowdev.wait_for_progress(lambda: False, lambda: next(counter), "a livelock", stall=0.05, poll=0.01,
                                  max_stalls=4)
