"""Aggregation strategies behind one narrow interface (Flower-style): FTTE, FedBuff, FedAvg.

A strategy says what devices train (``sparse``: the hub's subset, else the full model), how
deltas travel (``bits``), how many updates make a merge (``buffer_size``; FedAvg: the cohort),
whether the round is synchronous, and how to weight and merge a buffer. It holds no fleet
state: the round driver (scheduler.py) owns versions, buffers and cohorts.

The FTTE weighting is our own design (the paper's exact formula is not public); see
docs/aggregation.md for the formulas and the reasons.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import _kernels as K
from .graph import Model
from .subset import Subset
from .update import Update, decode_tensor


@dataclass
class MergeReport:
    """What one merge did (the driver fills ``version``, the version the merge produced)."""

    strategy: str
    num_updates: int
    weights: List[float]            # w_k as the strategy computed them
    alphas: List[float]             # what the merge kernel applied: server_lr * w_k
    staleness: List[int]
    num_samples: int
    mean_loss: float                # sample-weighted mean of the devices' training losses
    update_norm: float              # L2 norm of the change the merge made to the model
    device_ids: List[str] = field(default_factory=list)
    task_ids: List[str] = field(default_factory=list)
    factors: Dict[str, List[float]] = field(default_factory=dict)  # FTTE: "age", "variance", "data"
    partial: bool = False           # merged fewer than buffer_size updates (shutdown / shrunk cohort)
    version: int = -1

    @property
    def mean_staleness(self) -> float:
        return float(np.mean(self.staleness)) if self.staleness else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mean_staleness"] = self.mean_staleness
        return d


class Strategy:
    name: str = "strategy"
    synchronous: bool = False
    sparse: bool = False
    bits: int = 32
    buffer_size: int = 10

    def __init__(self, buffer_size: int = 10, server_lr: float = 1.0):
        if not isinstance(buffer_size, (int, np.integer)) or isinstance(buffer_size, bool) or buffer_size < 1:
            raise ValueError(f"{self.name}: buffer size must be an integer >= 1, got {buffer_size!r}")
        if not (isinstance(server_lr, (int, float)) and math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"{self.name}: server_lr must be a positive finite number, got {server_lr!r}")
        self.buffer_size = int(buffer_size)
        self.server_lr = float(server_lr)

    def training_subset(self, model: Model, hub_subset: Optional[Subset]) -> Subset:
        """What devices train under this strategy."""
        if self.sparse:
            if hub_subset is None:
                raise ValueError(f"{self.name} trains a subset; give the hub's subset")
            return hub_subset
        return Subset.full(model)

    def weights(self, updates: Sequence[Update], current_version: int) -> np.ndarray:
        raise NotImplementedError

    def _factors(self, updates, current_version) -> Dict[str, List[float]]:
        return {}

    def step_scale(self, updates: Sequence[Update], current_version: int) -> float:
        """Multiplies the whole merge step (1: the weights alone set its size)."""
        return 1.0

    def merge(self, model: Model, subset: Subset, updates: Sequence[Update], current_version: int) -> MergeReport:
        """model[subset] += server_lr * sum_k w_k * delta_k, one fused kernel call per tensor.

        ``updates`` must already have passed ``check_update`` (the driver does that on arrival).
        """
        updates = list(updates)
        if not updates:
            raise ValueError(f"{self.name}: nothing to merge")
        w = np.asarray(self.weights(updates, current_version), dtype=np.float64)
        if w.shape != (len(updates),) or not np.all(np.isfinite(w)):
            raise ValueError(f"{self.name}: weights must be {len(updates)} finite numbers, got {w}")
        alphas = (self.server_lr * self.step_scale(updates, current_version) * w).astype(np.float32)
        sq = 0.0
        for i, (key, layer, view, rows) in enumerate(subset.tensors(model)):
            # the kernel writes through `view`; a reshape that had to copy would lose the merge
            assert np.may_share_memory(view, layer.weight if key.endswith(".weight") else layer.bias), key
            before = view[rows] if rows is not None else view.copy()  # a copy either way
            parts = [u.tensors[i] for u in updates]
            if any(p.key != key for p in parts):
                raise ValueError(f"{self.name}: update tensors are not in the subset's order at {key!r}")
            for bits in sorted({p.bits for p in parts}):  # one call per tensor unless a buffer mixes bit widths
                idx = [k for k, p in enumerate(parts) if p.bits == bits]
                a = np.ascontiguousarray(alphas[idx])
                if bits == 32:
                    K.merge_float(view, rows, [parts[k].data for k in idx], a)
                else:
                    fn = K.merge_int8 if bits == 8 else K.merge_int4
                    fn(view, rows, [parts[k].data for k in idx], [parts[k].scales for k in idx], a)
            before -= view[rows] if rows is not None else view
            sq += float(np.einsum("ij,ij->", before, before, dtype=np.float64))
        n = np.array([u.num_samples for u in updates], dtype=np.float64)
        losses = np.array([u.loss for u in updates], dtype=np.float64)
        return MergeReport(
            strategy=self.name, num_updates=len(updates), weights=w.tolist(), alphas=alphas.astype(float).tolist(),
            staleness=[int(current_version - u.base_version) for u in updates], num_samples=int(n.sum()),
            mean_loss=float((n * losses).sum() / n.sum()), update_norm=math.sqrt(sq),
            device_ids=[u.device_id for u in updates], task_ids=[u.task_id for u in updates],
            factors=self._factors(updates, current_version),
            partial=len(updates) < self.buffer_size)

    def describe(self) -> str:
        return f"{self.name}(K={self.buffer_size}, server_lr={self.server_lr})"

    def __repr__(self) -> str:
        return self.describe()


def _staleness(updates: Sequence[Update], current_version: int) -> np.ndarray:
    tau = np.array([current_version - u.base_version for u in updates], dtype=np.float64)
    if np.any(tau < 0):
        raise ValueError("an update's base version is ahead of the current version")
    return tau


class FTTE(Strategy):
    """Sparse subset, int8 (or int4) deltas, buffer of K, weight = data x age x variance (our design).

    w_k ∝ n_k · (1 + τ_k)^(-a) · 1 / (1 + b·d_k), normalised to sum 1, where
    d_k = ||D_k - D̄||² / mean_j ||D_j - D̄||² and D̄ = Σ_j n_j D_j / Σ_j n_j (decoded deltas).
    The step is then scaled by the buffer's sample-weighted mean age factor
    g = Σ n_k (1 + τ_k)^(-a) / Σ n_k, so a buffer of stale updates moves the model less (with
    normalised weights alone, ten equally stale updates would still take a full step).
    """

    sparse = True
    synchronous = False

    def __init__(self, buffer_size: int = 10, server_lr: float = 1.0, age: bool = True, variance: bool = True,
                 age_exponent: float = 1.0, variance_strength: float = 1.0, bits: int = 8, name: str = "ftte"):
        self.name = name
        super().__init__(buffer_size, server_lr)
        if bits not in (4, 8):
            raise ValueError(f"{name}: bits must be 8 or 4, got {bits}")
        for label, v in (("age_exponent", age_exponent), ("variance_strength", variance_strength)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: {label} must be a finite number >= 0, got {v!r}")
        self.bits = int(bits)
        self.age, self.variance = bool(age), bool(variance)
        self.age_exponent, self.variance_strength = float(age_exponent), float(variance_strength)

    # Relative spread below which the buffer's deltas count as identical (float32 round-off of the
    # weighted mean is ~1e-7 relative; squared distances at that level are noise, not signal).
    SPREAD_FLOOR = 1e-10

    def age_factors(self, updates: Sequence[Update], current_version: int) -> np.ndarray:
        tau = _staleness(updates, current_version)
        if not self.age:
            return np.ones_like(tau)
        return (1.0 + tau) ** (-self.age_exponent)

    def outlier_distances(self, updates: Sequence[Update]) -> np.ndarray:
        """d_k: squared distance of each decoded delta from the sample-weighted mean, over the mean of those."""
        K_ = len(updates)
        if K_ < 2:
            return np.zeros(K_)
        p = np.array([u.num_samples for u in updates], dtype=np.float64)
        p = (p / p.sum()).astype(np.float32)
        dist = np.zeros(K_)
        energy = 0.0
        for i in range(len(updates[0].tensors)):
            R, F = updates[0].tensors[i].shape
            D = np.empty((K_, R * F), np.float32)  # decoded in place by the C++ decoders, one tensor at a time
            for k, u in enumerate(updates):
                decode_tensor(u.tensors[i], out=D[k].reshape(R, F))
            energy += sum(float(np.dot(row, row)) for row in D) / K_
            mean = p[0] * D[0]
            for k in range(1, K_):  # K axpys: far faster here than numpy's float32 vector-matrix product
                mean += p[k] * D[k]
            D -= mean  # float32 differences: their error stays at ulp level of the deltas
            dist += [float(np.dot(row, row)) for row in D]
        spread = dist.mean()
        if energy == 0.0 or spread <= self.SPREAD_FLOOR * energy:
            return np.zeros(K_)
        return dist / spread

    def variance_factors(self, updates: Sequence[Update]) -> np.ndarray:
        if not self.variance:
            return np.ones(len(updates))
        return 1.0 / (1.0 + self.variance_strength * self.outlier_distances(updates))

    def step_scale(self, updates: Sequence[Update], current_version: int) -> float:
        data = np.array([u.num_samples for u in updates], dtype=np.float64)
        return float(np.dot(data, self.age_factors(updates, current_version)) / data.sum())

    def _all_factors(self, updates, current_version):
        data = np.array([u.num_samples for u in updates], dtype=np.float64)
        return data, self.age_factors(updates, current_version), self.variance_factors(updates)

    def weights(self, updates: Sequence[Update], current_version: int) -> np.ndarray:
        cached = self._cached
        data, age, var = cached if cached is not None else self._all_factors(updates, current_version)
        raw = data * age * var
        return raw / raw.sum()

    def merge(self, model, subset, updates, current_version):
        # weights() and the report both need the factors; compute them once (the variance pass decodes).
        data, age, var = self._all_factors(list(updates), current_version)
        self._cached = (data, age, var)
        try:
            return super().merge(model, subset, updates, current_version)
        finally:
            self._cached = None

    _cached = None

    def _factors(self, updates, current_version):
        data, age, var = self._cached if self._cached is not None else self._all_factors(updates, current_version)
        return {"data": data.tolist(), "age": age.tolist(), "variance": var.tolist()}

    def describe(self) -> str:
        return (f"{self.name}(K={self.buffer_size}, server_lr={self.server_lr}, bits={self.bits}, "
                f"age={'(1+tau)^-%g' % self.age_exponent if self.age else 'off'}, "
                f"variance={'b=%g' % self.variance_strength if self.variance else 'off'})")


class FedBuff(Strategy):
    """Buffered async baseline: full model, float32 deltas, w_k = (1/sqrt(1+τ_k)) / K (not normalised)."""

    name = "fedbuff"
    sparse = False
    synchronous = False
    bits = 32

    def weights(self, updates: Sequence[Update], current_version: int) -> np.ndarray:
        tau = _staleness(updates, current_version)
        return 1.0 / np.sqrt(1.0 + tau) / len(updates)


class FedAvg(Strategy):
    """Synchronous baseline: full model, float32 deltas, w_k = n_k / Σ n; waits for its cohort."""

    name = "fedavg"
    sparse = False
    synchronous = True
    bits = 32

    def __init__(self, cohort_size: int = 10, server_lr: float = 1.0):
        super().__init__(cohort_size, server_lr)

    @property
    def cohort_size(self) -> int:
        return self.buffer_size

    def weights(self, updates: Sequence[Update], current_version: int) -> np.ndarray:
        n = np.array([u.num_samples for u in updates], dtype=np.float64)
        return n / n.sum()


STRATEGIES = ("ftte", "ftte-noage", "ftte-novar", "fedbuff", "fedavg")


def make_strategy(name: str, buffer_size: int = 10, **kw) -> Strategy:
    """Build a strategy by name: ftte | ftte-noage | ftte-novar | fedbuff | fedavg."""
    key = str(name).strip().lower()
    if key == "ftte":
        return FTTE(buffer_size, **kw)
    if key == "ftte-noage":
        return FTTE(buffer_size, age=False, name="ftte-noage", **kw)
    if key == "ftte-novar":
        return FTTE(buffer_size, variance=False, name="ftte-novar", **kw)
    if key == "fedbuff":
        return FedBuff(buffer_size, **kw)
    if key == "fedavg":
        return FedAvg(buffer_size, **kw)
    raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
