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
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import _kernels as K
from .graph import Model
from .subset import Subset, subset_contains
from .update import TensorDelta, Update, decode_tensor64


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
    clip: List[float] = field(default_factory=list)   # per update: its norm clip factor (1 = not clipped)
    norms: List[float] = field(default_factory=list)  # per update: its decoded L2 norm (the driver fills it)
    tiers: List[int] = field(default_factory=list)    # tiered strategies, per update: the tier it trained (the driver fills it)
    # per base version among the merged updates: the step (sum of the merge coefficients) its
    # updates took in this merge, after FTTE's per-base step budget; the driver adds it to its
    # ledger. Empty for strategies without a budget.
    base_steps: Dict[int, float] = field(default_factory=dict)

    @property
    def mean_staleness(self) -> float:
        return float(np.mean(self.staleness)) if self.staleness else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mean_staleness"] = self.mean_staleness
        return d


class MergeRefused(ValueError):
    """The merge would leave a non-finite model; nothing was written.

    ``culprits``: indices (into the merged updates) of those that alone make it non-finite;
    empty when only their combination does.
    """

    def __init__(self, message: str, culprits: Sequence[int] = ()):
        super().__init__(message)
        self.culprits = list(culprits)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _fits_float32(a: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(a))) and (a.size == 0 or float(np.max(np.abs(a))) <= FLOAT32_MAX)


class Strategy:
    name: str = "strategy"
    synchronous: bool = False
    sparse: bool = False
    bits: int = 32
    buffer_size: int = 10
    #: devices whose memory budget cannot hold what this strategy trains sit out (a real fleet);
    #: False: every device trains, whatever its budget (an idealised bound)
    budget_held: bool = True
    #: nested subsets, one per budget tier (``FTTETiered``); None: one subset for every device
    tiers: Optional[List[Subset]] = None

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

    def params(self) -> Dict[str, object]:
        """The strategy's settings, JSON-able (part of the round driver's policy)."""
        return {"name": self.name, "buffer_size": self.buffer_size, "server_lr": self.server_lr, "bits": self.bits}

    # -- weighting: pure functions of the buffer -------------------------------------------------
    def weighting(self, updates: Sequence[Update], current_version: int, samples: Optional[Sequence[float]] = None,
                  clip: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, Dict[str, List[float]]]:
        """(w, factors): the merge weights (float64) and what they were built from, for the report.

        ``samples``: the sample counts to weigh by (the driver's capped counts; default each
        update's ``num_samples``). ``clip``: per-update norm clip factors in [0, 1] (default 1);
        the merge multiplies each update's step by its factor, and FTTE's variance factor is
        measured on the clipped deltas.
        """
        raise NotImplementedError

    def weights(self, updates: Sequence[Update], current_version: int, samples=None, clip=None) -> np.ndarray:
        return self.weighting(updates, current_version, samples, clip)[0]

    def step_scale(self, updates: Sequence[Update], current_version: int, samples=None, clip=None) -> float:
        """Multiplies the whole merge step (1: the weights alone set its size)."""
        return 1.0

    def budget_factors(self, updates: Sequence[Update], alphas: np.ndarray,
                       base_steps: Optional[Mapping[int, float]]) -> Tuple[np.ndarray, Dict[int, float]]:
        """(f, steps): per-update factors in [0, 1] on the merge coefficients ``alphas``, and the
        step each base version takes in this merge after them. No budget here: f = 1, and no
        step is recorded (the driver keeps no ledger for this strategy)."""
        return np.ones(len(updates)), {}

    def merge(self, model: Model, subset: Subset, updates: Sequence[Update], current_version: int,
              samples: Optional[Sequence[float]] = None, clip: Optional[Sequence[float]] = None,
              base_steps: Optional[Mapping[int, float]] = None) -> MergeReport:
        """model[subset] += server_lr * g * sum_k f_k * clip_k * w_k * delta_k, all or nothing.

        Each tensor is merged by the fused C++ kernel into a float32 scratch copy; only when every
        tensor's result is finite is anything written to the model. Otherwise ``MergeRefused``
        (naming the updates that alone overflow) and the model is untouched. ``updates`` must
        already have passed ``check_update`` (the driver does that on arrival). ``base_steps``:
        the step each base version's updates already took in earlier merges (the driver's
        ledger), for a strategy with a per-base step budget (FTTE); ``f_k`` is 1 without one.
        """
        updates = list(updates)
        n, c, w, factors = self._weigh(updates, current_version, samples, clip)
        alphas64 = self.server_lr * self.step_scale(updates, current_version, n, c) * w * c
        budget, steps = self.budget_factors(updates, alphas64, base_steps)
        if steps:
            alphas64 = alphas64 * budget
            factors = {**factors, "budget": budget.tolist()}
        if not _fits_float32(alphas64):
            raise MergeRefused(f"{self.name}: merge weights are not finite float32 numbers ({alphas64.tolist()})")
        alphas = alphas64.astype(np.float32)
        tensors = subset.tensors(model)
        merged = []
        for i, (key, layer, view, rows) in enumerate(tensors):
            # the write below goes through `view`; a reshape that had to copy would lose the merge
            assert np.may_share_memory(view, layer.weight if key.endswith(".weight") else layer.bias), key
            parts = [u.tensors[i] for u in updates]
            if any(p.key != key for p in parts):
                raise ValueError(f"{self.name}: update tensors are not in the subset's order at {key!r}")
            scratch = np.array(view[rows] if rows is not None else view, dtype=np.float32, order="C", copy=True)
            merge_parts(scratch, None, parts, alphas)
            if not np.all(np.isfinite(scratch)):
                raise MergeRefused(f"{self.name}: the merge makes {key!r} non-finite; the model is kept",
                                   _overflowing(view, rows, parts, alphas64, i))
            merged.append(scratch)
        report = self._write_and_report(tensors, merged, updates, current_version, n, c, w,
                                        alphas.astype(float).tolist(), factors)
        report.base_steps = steps
        return report

    def _weigh(self, updates, current_version, samples, clip):
        """(capped sample counts, clip factors, checked weights, factors) for a non-empty buffer."""
        if not updates:
            raise ValueError(f"{self.name}: nothing to merge")
        n = _sample_counts(updates, samples)
        c = _clip(updates, clip)
        w, factors = self.weighting(updates, current_version, n, c)
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (len(updates),) or not np.all(np.isfinite(w)):
            raise ValueError(f"{self.name}: weights must be {len(updates)} finite numbers, got {w}")
        return n, c, w, factors

    def _write_and_report(self, tensors, merged, updates, current_version, n, c, w, alphas, factors) -> MergeReport:
        """Write the merged (all finite) tensors into the model and describe the merge."""
        sq = 0.0
        for (key, layer, view, rows), new in zip(tensors, merged):
            diff = new.astype(np.float64) - (view[rows] if rows is not None else view)
            sq += float(np.einsum("ij,ij->", diff, diff))
            if rows is None:
                view[...] = new
            else:
                view[rows] = new
        losses = np.array([u.loss for u in updates], dtype=np.float64)
        return MergeReport(
            strategy=self.name, num_updates=len(updates), weights=w.tolist(), alphas=list(alphas),
            staleness=[int(current_version - u.base_version) for u in updates], num_samples=int(n.sum()),
            mean_loss=float((n * losses).sum() / n.sum()), update_norm=math.sqrt(sq),
            device_ids=[u.device_id for u in updates], task_ids=[u.task_id for u in updates],
            factors=factors, partial=len(updates) < self.buffer_size, clip=c.tolist())

    def describe(self) -> str:
        return f"{self.name}(K={self.buffer_size}, server_lr={self.server_lr})"

    def __repr__(self) -> str:
        return self.describe()


def merge_parts(target: np.ndarray, rows: Optional[np.ndarray], parts: Sequence[TensorDelta],
                alphas: np.ndarray) -> None:
    """target[rows] += sum_k alphas[k] * decoded parts[k], by the fused C++ kernels: one call per
    tensor unless the parts mix bit widths (rows None: every row of target)."""
    for bits in sorted({p.bits for p in parts}):
        idx = [k for k, p in enumerate(parts) if p.bits == bits]
        a = np.ascontiguousarray(alphas[idx], dtype=np.float32)
        if bits == 32:
            K.merge_float(target, rows, [parts[k].data for k in idx], a)
        else:
            fn = K.merge_int8 if bits == 8 else K.merge_int4
            fn(target, rows, [parts[k].data for k in idx], [parts[k].scales for k in idx], a)


def _sample_counts(updates: Sequence[Update], samples) -> np.ndarray:
    n = np.array([u.num_samples for u in updates] if samples is None else list(samples), dtype=np.float64)
    if n.shape != (len(updates),) or not np.all(np.isfinite(n)) or np.any(n <= 0):
        raise ValueError(f"sample counts must be {len(updates)} positive finite numbers, got {n.tolist()}")
    return n


def _clip(updates: Sequence[Update], clip) -> np.ndarray:
    if clip is None:
        return np.ones(len(updates))
    c = np.asarray(list(clip), dtype=np.float64)
    if c.shape != (len(updates),) or not np.all(np.isfinite(c)) or np.any(c < 0) or np.any(c > 1):
        raise ValueError(f"clip factors must be {len(updates)} numbers in [0, 1], got {c.tolist()}")
    return c


def _gram(updates: Sequence[Update], c: np.ndarray) -> np.ndarray:
    """G[k, l] = <c_k D_k, c_l D_l> over every tensor of the (decoded, clipped) deltas, in float64:
    one BLAS product per tensor, from which every distance and norm of the buffer follows
    (float32 squares overflow for a delta of ~1e19; float64 keeps the cancellation error at
    ~1e-16 of the energy)."""
    K_ = len(updates)
    G = np.zeros((K_, K_))
    for i in range(len(updates[0].tensors)):
        R, F = updates[0].tensors[i].shape
        D = np.empty((K_, R, F), np.float64)
        for k, u in enumerate(updates):
            decode_tensor64(u.tensors[i], out=D[k], factor=float(c[k]))
        D = D.reshape(K_, R * F)
        G += D @ D.T
    return G


def _overflowing(view, rows, parts, alphas64, i) -> List[int]:
    """The updates whose own step, alone on the current values, leaves float32's finite range."""
    base = np.asarray(view[rows] if rows is not None else view, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return [k for k, p in enumerate(parts) if not _fits_float32(base + alphas64[k] * decode_tensor64(p))]


def _staleness(updates: Sequence[Update], current_version: int) -> np.ndarray:
    tau = np.array([current_version - u.base_version for u in updates], dtype=np.float64)
    if np.any(tau < 0):
        raise ValueError("an update's base version is ahead of the current version")
    return tau


class FTTE(Strategy):
    """Sparse subset, int8 (or int4) deltas, buffer of K, weight = data x age x variance (our design).

    w_k ∝ n_k · (1 + τ_k)^(-a) · 1 / (1 + b·d_k), normalised to sum 1, where
    d_k = ||D_k - D̄||² / mean_j ||D_j - D̄||² and D̄ = Σ_j n_j D_j / Σ_j n_j (decoded deltas, in
    float64, each times its clip factor).
    The step is then scaled by the buffer's sample-weighted mean age factor
    g = Σ n_k (1 + τ_k)^(-a) / Σ n_k, so a buffer of stale updates moves the model less (with
    normalised weights alone, ten equally stale updates would still take a full step).

    Per-base step budget (``base_step_budget`` = B, default 1; None or 0: off): the merge
    coefficients of all updates computed from one base version, summed over every merge, never
    exceed B (in mean deltas: a buffer's coefficients sum to server_lr * g). A fleet's first
    wave (every device's first task at one version) would otherwise sum several mean deltas
    computed at one point and overshoot; an update whose base has spent its budget is scaled
    down (to 0 once it is spent). The driver keeps the ledger (``base_steps``).
    """

    sparse = True
    synchronous = False
    #: the default per-base step budget, in mean deltas (docs/aggregation.md, "Per-base step budget")
    BASE_STEP_BUDGET = 1.0

    def __init__(self, buffer_size: int = 10, server_lr: float = 1.0, age: bool = True, variance: bool = True,
                 age_exponent: float = 1.0, variance_strength: float = 1.0, bits: int = 8, name: str = "ftte",
                 base_step_budget: Optional[float] = BASE_STEP_BUDGET, lr_decay_merges: Optional[float] = None,
                 agreement_damping: float = 0.0):
        self.name = name
        super().__init__(buffer_size, server_lr)
        if bits not in (4, 8):
            raise ValueError(f"{name}: bits must be 8 or 4, got {bits}")
        for label, v in (("age_exponent", age_exponent), ("variance_strength", variance_strength),
                         ("base_step_budget", 0.0 if base_step_budget is None else base_step_budget),
                         ("lr_decay_merges", 0.0 if lr_decay_merges is None else lr_decay_merges),
                         ("agreement_damping", agreement_damping)):
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: {label} must be a finite number >= 0, got {v!r}")
        self.bits = int(bits)
        self.age, self.variance = bool(age), bool(variance)
        self.age_exponent, self.variance_strength = float(age_exponent), float(variance_strength)
        # None: off (0 means the same; None is what params() shows)
        self.base_step_budget = float(base_step_budget) if base_step_budget else None
        self.lr_decay_merges = float(lr_decay_merges) if lr_decay_merges else None
        self.agreement_damping = float(agreement_damping)

    # Relative spread below which the buffer's deltas count as identical (squared distances this
    # small relative to the deltas' energy are quantisation round-off, not disagreement).
    SPREAD_FLOOR = 1e-10

    def params(self) -> Dict[str, object]:
        return {**super().params(), "age": self.age, "variance": self.variance,
                "age_exponent": self.age_exponent, "variance_strength": self.variance_strength,
                "base_step_budget": self.base_step_budget, "lr_decay_merges": self.lr_decay_merges,
                "agreement_damping": self.agreement_damping}

    def lr_decay(self, current_version: int) -> float:
        """The server step's decay at this version: 1 / sqrt(1 + version / lr_decay_merges) (1 when
        off). Early merges take whole steps (the quick climb); later ones, whose stale updates
        otherwise keep the model swinging around its optimum, take ever smaller ones, as a
        decaying learning rate does in SGD."""
        if self.lr_decay_merges is None:
            return 1.0
        return 1.0 / math.sqrt(1.0 + max(int(current_version), 0) / self.lr_decay_merges)

    def budget_factors(self, updates, alphas, base_steps):
        """Scale the updates of each base version so that their merge coefficients, over this and
        every earlier merge (``base_steps[b]``), sum to at most ``base_step_budget``.

        Within a merge the updates of one base share what is left of its budget in proportion to
        their coefficients (their relative weights are kept); other bases are untouched, so a
        fresh update is never held back by a stale one. Off: factors 1, nothing recorded.
        """
        if self.base_step_budget is None:
            return np.ones(len(updates)), {}
        spent = base_steps or {}
        alphas = np.asarray(alphas, dtype=np.float64)
        bases = np.array([u.base_version for u in updates], dtype=np.int64)
        f = np.ones(len(updates))
        steps: Dict[int, float] = {}
        for b in sorted(set(bases.tolist())):
            mine = bases == b
            want = float(alphas[mine].sum())
            left = max(self.base_step_budget - float(spent.get(b, 0.0)), 0.0)
            if want > left:
                f[mine] = left / want  # want > left >= 0
            steps[b] = min(want, left)
        return f, steps

    def age_factors(self, updates: Sequence[Update], current_version: int) -> np.ndarray:
        tau = _staleness(updates, current_version)
        if not self.age:
            return np.ones_like(tau)
        return (1.0 + tau) ** (-self.age_exponent)

    def outlier_distances(self, updates: Sequence[Update], samples=None, clip=None) -> np.ndarray:
        """d_k: squared distance of each decoded delta from the sample-weighted mean, over the mean of those.

        Decoded and accumulated in float64, one tensor at a time: float32 squares overflow for a
        delta of ~1e19, which turned this factor off for exactly the updates it must catch.
        """
        K_ = len(updates)
        if K_ < 2:
            return np.zeros(K_)
        n = _sample_counts(updates, samples)
        p = n / n.sum()
        G = _gram(updates, _clip(updates, clip))
        energy = float(np.trace(G)) / K_
        Gp = G @ p
        dist = np.maximum(np.diag(G) - 2.0 * Gp + float(p @ Gp), 0.0)
        spread = float(dist.mean())
        if not math.isfinite(spread) or energy == 0.0 or spread <= self.SPREAD_FLOOR * energy:
            return np.zeros(K_)
        return dist / spread

    def agreement(self, updates: Sequence[Update], samples=None, clip=None) -> float:
        """rho in [0, 1]: the share of the (sample-weighted) mean delta's energy that the spread
        between the deltas does not explain. With p the weights, m = sum p_k D_k and
        S = sum p_k ||D_k - m||^2, the noise the mean keeps from the spread is ~S / (n_eff - 1)
        (n_eff = 1 / sum p_k^2), so rho = max(0, 1 - S / ((n_eff - 1) ||m||^2)): 0 when the deltas
        scatter as independent noise around a common zero, 1 when they are one shared step."""
        K_ = len(updates)
        if K_ < 2:
            return 0.0
        n = _sample_counts(updates, samples)
        p = n / n.sum()
        G = _gram(updates, _clip(updates, clip))
        Gp = G @ p
        mean_sq = float(p @ Gp)
        spread = float(p @ np.maximum(np.diag(G) - 2.0 * Gp + mean_sq, 0.0))
        n_eff = 1.0 / float(p @ p)
        if not (math.isfinite(mean_sq) and math.isfinite(spread)) or mean_sq <= 0.0 or n_eff <= 1.0:
            return 0.0
        return min(max(1.0 - spread / ((n_eff - 1.0) * mean_sq), 0.0), 1.0)

    def agreement_factor(self, updates: Sequence[Update], current_version: int, samples=None, clip=None) -> float:
        """sum n_k (1 + tau_k)^(-kappa rho) / sum n_k (1 when ``agreement_damping`` kappa is 0).

        Stale updates that agree re-apply a step the model has already taken in the merges since
        their base: their age weighs more the more they agree (rho, ``agreement``). Updates that
        mostly disagree (noise around a small shared step) keep the plain age factor."""
        if not self.agreement_damping:
            return 1.0
        n = _sample_counts(updates, samples)
        tau = _staleness(updates, current_version)
        rho = self.agreement(updates, n, clip)
        return float(np.dot(n, (1.0 + tau) ** (-self.agreement_damping * rho)) / n.sum())

    def variance_factors(self, updates: Sequence[Update], samples=None, clip=None) -> np.ndarray:
        if not self.variance:
            return np.ones(len(updates))
        return 1.0 / (1.0 + self.variance_strength * self.outlier_distances(updates, samples, clip))

    def step_scale(self, updates: Sequence[Update], current_version: int, samples=None, clip=None) -> float:
        data = _sample_counts(updates, samples)
        g = float(np.dot(data, self.age_factors(updates, current_version)) / data.sum())
        return g * self.lr_decay(current_version) * self.agreement_factor(updates, current_version, data, clip)

    def weighting(self, updates, current_version, samples=None, clip=None):
        data = _sample_counts(updates, samples)
        age = self.age_factors(updates, current_version)
        var = self.variance_factors(updates, data, clip)
        raw = data * age * var
        return raw / raw.sum(), {"data": data.tolist(), "age": age.tolist(), "variance": var.tolist()}

    def describe(self) -> str:
        return (f"{self.name}(K={self.buffer_size}, server_lr={self.server_lr}, bits={self.bits}, "
                f"age={'(1+tau)^-%g' % self.age_exponent if self.age else 'off'}, "
                f"variance={'b=%g' % self.variance_strength if self.variance else 'off'}, "
                f"base_budget={'%g' % self.base_step_budget if self.base_step_budget else 'off'}, "
                f"lr_decay={'%g merges' % self.lr_decay_merges if self.lr_decay_merges else 'off'}, "
                f"agreement_damping={'%g' % self.agreement_damping if self.agreement_damping else 'off'})")


class FTTETiered(FTTE):
    """FTTE with nested subsets, one per memory-budget tier (beyond the paper; our design).

    ``tiers[0]`` is the paper's w* (chosen under the smallest budget M_min); each later tier
    contains the one before it. A device trains the largest tier its budget holds (the round
    driver picks it from the budget the device declared). Weights are FTTE's,
    ``r_k = n_k * age_k * var_k`` (the variance factor measured on ``tiers[0]``, the part every
    update trained), but they are normalised per parameter, over the updates that trained it:

        model[p] += eta * g_p * sum_{k trains p} c_k r_k D_k[p] / sum_{k trains p} r_k
        g_p       = sum_{k trains p} n_k age_k / sum_{k trains p} n_k

    so a row only the big devices train moves by their consensus, not by a share diluted by
    updates that never touched it. Nested tiers make the groups of rows with one set of
    trainers few (at most one per tier and tensor): each is one fused merge-kernel call.
    """

    def __init__(self, buffer_size: int = 10, server_lr: float = 1.0, tiers: Optional[Sequence[Subset]] = None,
                 tier_bytes: Optional[Sequence[int]] = None, name: str = "ftte-tiered", **kw):
        # the per-base step budget is built for the one-subset merge only (its per-parameter
        # merge would need a budget per tier's rows); at the strategy's a = 1 the first wave moves
        # ~ln(P/K) mean deltas, and the simulator runs a = 0.5 with lr_decay_merges instead
        # (docs/aggregation.md); the agreement damping is likewise built for one subset's step
        for knob in ("base_step_budget", "agreement_damping"):
            if kw.get(knob):
                raise ValueError(f"{name}: {knob} is not built for the tiered merge; leave it out")
        kw["base_step_budget"] = None
        super().__init__(buffer_size, server_lr, name=name, **kw)
        self.tiers = None
        self.tier_bytes: List[int] = []
        self._fingerprints: Dict[str, int] = {}
        if tiers is not None:
            self.set_tiers(tiers, tier_bytes)

    def set_tiers(self, tiers: Sequence[Subset], tier_bytes: Optional[Sequence[int]] = None) -> None:
        """Nested subsets, smallest first, and each one's training memory (bytes, ascending)."""
        tiers = list(tiers)
        if not tiers:
            raise ValueError(f"{self.name}: give at least one tier")
        for small, big in zip(tiers, tiers[1:]):
            if not subset_contains(big, small):
                raise ValueError(f"{self.name}: tiers must be nested (each contains the one before it)")
        nbytes = [0] * len(tiers) if tier_bytes is None else [int(b) for b in tier_bytes]
        if len(nbytes) != len(tiers) or any(b > c for b, c in zip(nbytes, nbytes[1:])):
            raise ValueError(f"{self.name}: tier_bytes must give one ascending size per tier, got {nbytes}")
        self.tiers, self.tier_bytes = tiers, nbytes
        self._fingerprints = {t.fingerprint(): i for i, t in enumerate(tiers)}

    def training_subset(self, model: Model, hub_subset: Optional[Subset]) -> Subset:
        if not self.tiers:
            raise ValueError(f"{self.name}: no tiers set (make_strategy('ftte-tiered', tiers=..., tier_bytes=...))")
        return self.tiers[-1]

    def tier_for_budget(self, budget: Optional[float]) -> Optional[int]:
        """The largest tier whose training memory fits ``budget`` (None: unknown budget -> tier 0;
        a budget below tier 0: None, the device sits out)."""
        if budget is None:
            return 0
        fits = [i for i, b in enumerate(self.tier_bytes) if b <= budget]
        return fits[-1] if fits else None

    def tier_of(self, update: Update) -> int:
        tier = self._fingerprints.get(update.subset_fingerprint)
        if tier is None:
            raise ValueError(f"{self.name}: update is for subset {update.subset_fingerprint!r}, not one of the tiers")
        return tier

    def params(self) -> Dict[str, object]:
        return {**super().params(), "tiers": [t.fingerprint() for t in self.tiers or ()],
                "tier_bytes": list(self.tier_bytes)}

    def _common_part(self, updates: Sequence[Update]) -> List[Update]:
        """Each update restricted to tiers[0] (what every update trained), for the variance factor."""
        base = self.tiers[0]
        out = []
        for u in updates:
            own = self.tiers[self.tier_of(u)]
            by_key = {t.key: t for t in u.tensors}
            parts = []
            for key, rows in _tensor_rows(base):
                t = by_key[key]
                pos = None if rows is None else np.searchsorted(_tensor_row_map(own)[key], rows)
                parts.append(_slice_rows(t, pos))
            out.append(Update(u.base_version, base.fingerprint(), u.num_samples, u.loss, parts))
        return out

    def weighting(self, updates, current_version, samples=None, clip=None):
        data = _sample_counts(updates, samples)
        age = self.age_factors(updates, current_version)
        var = self.variance_factors(self._common_part(updates), data, clip)
        raw = data * age * var
        return raw / raw.sum(), {"data": data.tolist(), "age": age.tolist(), "variance": var.tolist(),
                                 "tier": [self.tier_of(u) for u in updates]}

    def merge(self, model: Model, subset: Subset, updates: Sequence[Update], current_version: int,
              samples: Optional[Sequence[float]] = None, clip: Optional[Sequence[float]] = None,
              base_steps: Optional[Mapping[int, float]] = None) -> MergeReport:
        """Per-parameter weighted merge over the updates that trained each row, all or nothing
        (no per-base step budget: ``base_steps`` is ignored)."""
        updates = list(updates)
        n, c, w, factors = self._weigh(updates, current_version, samples, clip)
        age = np.asarray(factors["age"], dtype=np.float64)
        tiers = [self.tier_of(u) for u in updates]
        row_maps = [_tensor_row_map(t) for t in self.tiers]
        tensors = subset.tensors(model)
        merged, used_alpha = [], np.zeros(len(updates))
        for key, layer, view, rows in tensors:
            target = np.array(view[rows] if rows is not None else view, dtype=np.float32, order="C", copy=True)
            union = rows  # the largest tier's rows of this tensor (None: a bias, one row)
            holders = [k for k in range(len(updates)) if key in row_maps[tiers[k]]]
            # rows grouped by the set of updates that trained them: with nested tiers, the lowest
            # tier that holds a row decides who trained it
            first_tier = np.full(target.shape[0], len(self.tiers), dtype=np.int64)
            for t in range(len(self.tiers) - 1, -1, -1):
                if key not in row_maps[t]:
                    continue
                own = row_maps[t][key]  # None for a bias (one row)
                pos = np.zeros(1, np.int64) if union is None else np.searchsorted(union, own)
                first_tier[pos] = t
            for t in sorted(set(first_tier.tolist())):
                region = np.flatnonzero(first_tier == t).astype(np.int32)
                who = [k for k in holders if tiers[k] >= t]
                if not who:
                    continue
                ww, nn = w[who], n[who]
                g = float(np.dot(nn, age[who]) / nn.sum()) if self.age else 1.0
                alphas64 = self.server_lr * g * self.lr_decay(current_version) * ww * c[who] / ww.sum()
                if not _fits_float32(alphas64):
                    raise MergeRefused(f"{self.name}: merge weights are not finite float32 numbers ({alphas64.tolist()})")
                used_alpha[who] = np.maximum(used_alpha[who], alphas64)
                region_rows = None if union is None else union[region]
                parts = []
                for k in who:
                    t_k = updates[k].tensors[[x.key for x in updates[k].tensors].index(key)]
                    pos = None if region_rows is None else np.searchsorted(row_maps[tiers[k]][key], region_rows)
                    parts.append(_slice_rows(t_k, pos))
                merge_parts(target, region, parts, alphas64.astype(np.float32))
            if not np.all(np.isfinite(target)):
                raise MergeRefused(f"{self.name}: the merge makes {key!r} non-finite; the model is kept")
            merged.append(target)
        return self._write_and_report(tensors, merged, updates, current_version, n, c, w, used_alpha.tolist(), factors)

    def describe(self) -> str:
        return super().describe()[:-1] + f", tiers={len(self.tiers or ())})"


def _tensor_rows(subset: Subset) -> List[Tuple[str, Optional[np.ndarray]]]:
    """(key, rows or None) per tensor, in the order ``Subset.tensors`` gives (model order)."""
    out = []
    for name, ls in subset.layers.items():
        if ls.rows.size:
            out.append((f"{name}.weight", ls.rows))
        if ls.bias:
            out.append((f"{name}.bias", None))
    return out


def _tensor_row_map(subset: Subset) -> Dict[str, Optional[np.ndarray]]:
    return dict(_tensor_rows(subset))


def _slice_rows(t: TensorDelta, pos: Optional[np.ndarray]) -> TensorDelta:
    """The rows ``pos`` (indices into t's own rows; None: all) of an encoded tensor, contiguous."""
    if pos is None:
        return t
    data = np.ascontiguousarray(t.data[pos])
    scales = None if t.scales is None else np.ascontiguousarray(t.scales[pos])
    return TensorDelta(t.key, t.bits, data, scales, (len(pos), t.shape[1]))


class FedBuff(Strategy):
    """Buffered async baseline: full model, float32 deltas, w_k = (1/sqrt(1+τ_k)) / K (not normalised).

    ``budget_held``: a device whose memory budget is below the full training step sits out
    (``fedbuff``, what a real fleet can run); False is the idealised unconstrained bound
    (``fedbuff-full``).
    """

    name = "fedbuff"
    sparse = False
    synchronous = False
    bits = 32

    def __init__(self, buffer_size: int = 10, server_lr: float = 1.0, budget_held: bool = True,
                 name: Optional[str] = None):
        self.name = name or ("fedbuff" if budget_held else "fedbuff-full")
        super().__init__(buffer_size, server_lr)
        self.budget_held = bool(budget_held)

    def weighting(self, updates, current_version, samples=None, clip=None):
        tau = _staleness(updates, current_version)
        return 1.0 / np.sqrt(1.0 + tau) / len(updates), {}


class FedAvg(Strategy):
    """Synchronous baseline: full model, float32 deltas, w_k = n_k / Σ n; waits for its cohort."""

    name = "fedavg"
    sparse = False
    synchronous = True
    bits = 32

    def __init__(self, cohort_size: int = 10, server_lr: float = 1.0, budget_held: bool = True,
                 name: Optional[str] = None):
        self.name = name or ("fedavg" if budget_held else "fedavg-full")
        super().__init__(cohort_size, server_lr)
        self.budget_held = bool(budget_held)

    @property
    def cohort_size(self) -> int:
        return self.buffer_size

    def weighting(self, updates, current_version, samples=None, clip=None):
        n = _sample_counts(updates, samples)
        return n / n.sum(), {}


STRATEGIES = ("ftte", "ftte-tiered", "ftte-noage", "ftte-novar", "fedbuff", "fedbuff-full", "fedavg", "fedavg-full")


def make_strategy(name: str, buffer_size: int = 10, **kw) -> Strategy:
    """Build a strategy by name: ftte | ftte-tiered | ftte-noage | ftte-novar | fedbuff | fedbuff-full |
    fedavg | fedavg-full. ``ftte-tiered`` takes ``tiers=[Subset, ...]`` (nested, smallest first)
    and ``tier_bytes`` (each tier's predicted training memory); without them it must get
    ``set_tiers`` before a driver uses it."""
    key = str(name).strip().lower()
    if key == "ftte":
        return FTTE(buffer_size, **kw)
    if key == "ftte-tiered":
        return FTTETiered(buffer_size, **kw)
    if key == "ftte-noage":
        return FTTE(buffer_size, age=False, name="ftte-noage", **kw)
    if key == "ftte-novar":
        return FTTE(buffer_size, variance=False, name="ftte-novar", **kw)
    if key in ("fedbuff", "fedbuff-full"):
        return FedBuff(buffer_size, budget_held=key == "fedbuff", **kw)
    if key in ("fedavg", "fedavg-full"):
        return FedAvg(buffer_size, budget_held=key == "fedavg", **kw)
    raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
