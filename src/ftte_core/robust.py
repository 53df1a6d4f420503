"""The bounds every update passes before it can move the model (docs/aggregation.md, "Robust rules").

A device that holds the fleet key can still be faulty (a buggy sensor, a bad build, a flipped
bit): its update may be huge, non-finite once decoded, or claim an absurd sample count. The
round driver applies these rules to every strategy alike:

- ``max_abs_delta``: an update with any decoded value beyond it is rejected (``overflow``);
- ``clip_multiple``: each update's L2 norm is clipped to this multiple of the running median of
  accepted norms (applied as a factor on its merge weight, never by rewriting its bytes);
- ``max_samples`` / ``sample_multiple``: ``num_samples`` is capped by a fleet-wide constant, by what
  the device declared when it joined, and by a multiple of the running median of accepted counts.

This module holds the numbers and the running medians; the driver (scheduler.py) applies them.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional

import numpy as np

# Fewer accepted values than this and a running median is not trusted alone (see RunningMedian.reference).
MIN_HISTORY = 3


@dataclass(frozen=True)
class RobustPolicy:
    clip_multiple: float = 2.0        # norm clip = this x median of accepted norms; 0 turns clipping off
    clip_window: int = 64             # how many recent accepted norms (and sample counts) the medians cover
    max_samples: int = 1 << 20        # fleet-wide cap on one update's num_samples (1,048,576)
    sample_multiple: float = 10.0     # num_samples cap = this x median of accepted counts; 0 turns it off
    max_abs_delta: float = 1e6        # any decoded delta value beyond this: rejected as "overflow"

    def __post_init__(self):
        for name in ("clip_multiple", "sample_multiple"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                    or 0 < v < 1:
                raise ValueError(f"{name} must be 0 (off) or a finite number >= 1, got {v!r}")
        for name in ("clip_window", "max_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        v = self.max_abs_delta
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"max_abs_delta must be a positive finite number, got {v!r}")

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RobustPolicy":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown robust settings {sorted(unknown)}")
        return cls(**d)


class RunningMedian:
    """The last ``window`` accepted values; ``reference()`` is their lower median.

    The lower median (not the mean) so that a minority of faulty values, however large, never
    moves it, and so that with two values the smaller one wins.
    """

    def __init__(self, window: int, values: Iterable[float] = ()):
        self.values: deque = deque((float(v) for v in values), maxlen=int(window))

    def add(self, value: float) -> None:
        self.values.append(float(value))

    def reference(self) -> Optional[float]:
        if not self.values:
            return None
        s = sorted(self.values)
        return s[(len(s) - 1) // 2]

    def __len__(self) -> int:
        return len(self.values)

    def to_list(self) -> List[float]:
        return list(self.values)


def clip_factors(norms: Iterable[float], reference: Optional[float], multiple: float) -> np.ndarray:
    """min(1, multiple * reference / norm) per update (1 when clipping is off or there is no reference)."""
    n = np.asarray(list(norms), dtype=np.float64)
    if not multiple or reference is None:
        return np.ones_like(n)
    limit = multiple * reference
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(n > limit, limit / n, 1.0)
    return np.clip(np.nan_to_num(c, nan=0.0), 0.0, 1.0)


def declared_samples(info: Optional[Mapping[str, Any]]) -> Optional[int]:
    """The sample count a device declared when it joined ("samples" or "num_samples"), if it is sane."""
    if not info:
        return None
    for key in ("samples", "num_samples"):
        v = info.get(key)
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 1 <= v < 1 << 62:
            return int(v)
    return None
