"""Facts about this device: default memory budget, measured training speed, addresses, peak RSS.

Memory rule (the default of --memory-budget): a quarter of MemAvailable from /proc/meminfo,
capped at 1 GiB and at least 16 MiB; 64 MiB when /proc/meminfo cannot be read. A quarter leaves
the device's own work room to grow; the cap keeps big boxes from offering more than any subset
we search for needs.

Speed: a fixed micro-benchmark (full training steps of a 64-256-256-10 MLP, batch 32, for about
0.25 s) converted to GFLOP/s with ``cost.training_flops``; the same on every device, so hubs can
compare devices. --slowdown X divides it.
"""
from __future__ import annotations

import platform
import socket
import time
from typing import List, Optional, Tuple

import numpy as np

MIB = 1 << 20
BUDGET_SHARE = 0.25
BUDGET_CAP = 1 << 30
BUDGET_FLOOR = 16 * MIB
BUDGET_FALLBACK = 64 * MIB
BENCH_SECONDS = 0.25


def mem_available(path: str = "/proc/meminfo") -> Optional[int]:
    """MemAvailable in bytes, or None when unknown."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    parts = line.split()
                    return int(parts[1]) * 1024 if parts[2:3] == ["kB"] else int(parts[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_memory_budget(available: Optional[int] = None) -> Tuple[int, str]:
    """(budget bytes, the rule that produced it, for the log)."""
    if available is None:
        available = mem_available()
    if available is None:
        return BUDGET_FALLBACK, "MemAvailable unknown: fallback"
    budget = int(min(BUDGET_CAP, max(BUDGET_FLOOR, available * BUDGET_SHARE)))
    return budget, f"1/4 of MemAvailable {available // MIB} MiB, within [16 MiB, 1 GiB]"


def measure_speed(seconds: float = BENCH_SECONDS) -> float:
    """Training GFLOP/s of this device on the fixed benchmark model (before --slowdown)."""
    from ftte_core.cost import training_flops
    from ftte_core.trainer import Trainer
    from ftte_core.zoo import zoo

    model = zoo("mlp", (64,), 10, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 64)).astype(np.float32)
    y = rng.integers(0, 10, 32).astype(np.int32)
    trainer = Trainer(model, lr=0.01)
    trainer.step(x, y)  # first step allocates the buffers: not part of the rate
    flops_per_step = training_flops(model, batch_size=32)
    steps, start = 0, time.perf_counter()
    while True:
        trainer.step(x, y)
        steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return flops_per_step * steps / elapsed / 1e9


def arch() -> str:
    return platform.machine() or "unknown"


def host_name() -> str:
    return socket.gethostname().split(".")[0] or "agent"


def ipv4_addresses(include_loopback: bool = False) -> List[str]:
    """The host's IPv4 addresses now (ifaddr, which zeroconf already depends on)."""
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and (include_loopback or not ip.ip.startswith("127.")):
                out.append(ip.ip)
    return sorted(set(out))


def peak_rss() -> Optional[int]:
    """VmHWM (peak resident set) of this process in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
