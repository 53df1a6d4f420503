"""The process's real memory while training agrees with the cost model (issue 11).

Each measurement runs benchmarks/real_memory.py's child in a fresh process (nothing another test
allocated or freed can be counted): build an MLP 784-2048-2048-10, reset the peak RSS
(/proc/self/clear_refs), train 20 steps at batch 32, read VmHWM. The growth over the pre-training
resident set must equal ``predict_memory``'s total minus the weights (resident before training)
within 10% plus a documented fixed allowance (``real_memory.allowance``). No timing is asserted;
the child's time limit is scaled to the machine (tests/slowdev.py) because emulated ARM userlands
are tens of times slower.
"""
import importlib.util
import os
import sys

import pytest

from slowdev import scaled

_BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "real_memory.py")
_spec = importlib.util.spec_from_file_location("real_memory", _BENCH)
real_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real_memory)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux /proc")

MIB = 1 << 20


def _measure(mode: str, momentum: float = 0.0) -> dict:
    # 20 steps of a 5.8M-parameter MLP take ~1 s here; the limit is for an emulated, busy machine
    r = real_memory.measure(mode, threads=1, steps=20, timeout=scaled(300), momentum=momentum)
    if "skip" in r:
        pytest.skip(r["skip"])
    # under qemu-user (pi-check) /proc/self/status is the emulator's process; it agrees there too
    # (emulated arm64 and armhf: 0.36-0.82 MiB beyond the prediction), so it is judged the same way
    assert r["steps"] == 20
    return r


def _explain(r: dict) -> str:
    return (f"{r['mode']}: grew {r['growth'] / MIB:.2f} MiB (anon {r['anon_growth'] / MIB:.2f}, file "
            f"{r['file_growth'] / MIB:.2f}), predicted {r['predicted_new'] / MIB:.2f} MiB new "
            f"({ {k: v for k, v in r['predicted'].items() if k != 'total'} }), allowance "
            f"{real_memory.allowance() / MIB:.2f} MiB")


@pytest.mark.parametrize("mode", ["sparse", "sparse_int8", "full"])
def test_growth_of_the_resident_set_agrees_with_the_cost_model(mode):
    # with momentum: the step keeps no gradients (SGD inside backward), so without velocity it
    # would hold under 1.1 MiB beyond the weights, too little for 10% to mean anything
    r = _measure(mode, momentum=0.9)
    # the trainer's own bookkeeping equals the prediction (1 thread): the process is what is judged
    assert r["recorded"] == r["predicted"]
    assert r["predicted_new"] > 4 * MIB  # large enough that 10% means something
    assert real_memory.agrees(r["growth"], r["predicted_new"]), _explain(r)


def test_the_allowance_covers_the_fixed_cost_of_training():
    """A model with almost nothing to allocate: its growth is the overhead the allowance stands for."""
    r = _measure("overhead")
    assert r["predicted_new"] < 64 * 1024
    assert r["growth"] - r["predicted_new"] <= real_memory.allowance(), _explain(r)
