"""Byte sizes as people write them ("64MiB", "1.5 GB") and as logs print them.

Apart from ``search`` (which re-exports both) so that the agent can read ``--memory-budget``
without importing the subset search.
"""
from __future__ import annotations

import re
from typing import Union

import numpy as np

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "kib": 2 ** 10, "mb": 10 ** 6, "mib": 2 ** 20,
          "gb": 10 ** 9, "gib": 2 ** 30}
_SIZE_RE = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)$")


def parse_size(text: Union[str, int]) -> int:
    """Bytes from "64MiB", "1.5 GB", "512KiB", "1000B" or a plain integer (bytes).

    Units: B, KB/MB/GB (powers of 1000), KiB/MiB/GiB (powers of 1024); case does not matter.
    """
    if isinstance(text, bool):
        raise ValueError(f"size must be a number of bytes or a string like '64MiB', got {text!r}")
    if isinstance(text, (int, np.integer)):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return int(text)
    if not isinstance(text, str):
        raise ValueError(f"size must be a number of bytes or a string like '64MiB', got {type(text).__name__}")
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"cannot parse size {text!r}: expected a number and an optional unit "
                         "(B, KB, KiB, MB, MiB, GB, GiB), e.g. '64MiB'")
    number, unit = m.group(1), m.group(2).lower()
    if unit not in _UNITS:
        raise ValueError(f"cannot parse size {text!r}: unknown unit {m.group(2)!r} "
                         "(use B, KB, KiB, MB, MiB, GB or GiB)")
    # exact decimal arithmetic on integers (not fractions.Fraction: it imports decimal, 0.3 MiB on a device)
    whole, _, frac = number.partition(".")
    numerator, denominator = int((whole or "0") + frac) * _UNITS[unit], 10 ** len(frac)
    value, remainder = divmod(numerator, denominator)
    if remainder:
        raise ValueError(f"size {text!r} is not a whole number of bytes ({numerator / denominator:g})")
    return value


def format_size(n: int) -> str:
    """'12,345 bytes (12.1 KiB)' — exact bytes and a human unit."""
    n = int(n)
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n:,} bytes ({n / scale:.2f} {unit})"
    return f"{n:,} bytes"
