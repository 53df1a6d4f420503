"""Subset search: which parameters the fleet trains, under the memory budget of its smallest device.

Two steps, both on the hub, no I/O:

1. ``importance_scores`` estimates, from data the hub holds (its validation set), how much each
   candidate unit would lower the loss if it trained: per weight row and per bias, the mean over
   mini-batches of the squared norm of its gradient. That is the first-order loss decrease of one
   SGD step of size lr on that unit alone (dL ~= -lr * ||g||^2), so scores of different units and
   layers are on one scale and add up. Cost: one forward+backward of the full model per batch.

2. ``search_subset`` picks, per layer, none / the bias / the top-scoring 1/8, 1/4, 1/2 or all rows
   (with or without the bias), maximising the total score subject to
   ``predict_memory(model, subset)["total"] <= budget``.

Memory is not additive over layers: backward keeps activations from the earliest trainable layer
up, so the cost of training anything in a layer depends on which layer trains first. The search
therefore enumerates that earliest layer ``e`` and, for each, solves the per-layer choice as a
grouped knapsack over the layers from ``e`` up. Per-option costs come from the cost model itself:
``predict_memory`` of the option applied to a probe base, minus that of the base, at two bases
("only the bias of e" and "the fewest rows + bias of every layer from e up"). Given ``e`` the
gradients, optimizer state and kept activations are exactly additive this way; the workspace
(a max over kernels' scratch, and how many reused scratch buffers the forward needs) is not,
and the two bases see it from both sides. The knapsack is solved exactly as a Pareto frontier
(bytes up, score up) over all option combinations, pruned to the budget. Every pick is verified
with ``predict_memory`` (best score first; a pick over budget is never returned, the next is
tried); then, until the score stops rising, the knapsack is solved again with costs measured
as changes of the current pick, and single option changes are tried, each verified.
See docs/search.md.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .cost import predict_memory
from .plan import check_micro_batch
from .sizes import format_size, parse_size  # noqa: F401 (part of this module's interface)
from .graph import Model
from .subset import LayerSubset, Subset, subset_contains, subset_union

DEFAULT_RATIOS = (1 / 8, 1 / 4, 1 / 2, 1.0)

#: Above this many Pareto points per step the frontier is coarsened (costs rounded UP to a grid).
MAX_FRONTIER = 200_000
#: Grid cells over the budget used when coarsening.
COARSE_CELLS = 20_000
#: The second linearisation point (see search_subset) is probed only up to this many
#: parameter layers: probes grow with the square of the layer count.
RICH_BASE_MAX_LAYERS = 12
#: At most this many earliest trainable layers are tried, evenly spaced (the first and the last
#: always): each costs (layers above it) x (options) probes, which grows with the square of the
#: layer count (a MobileNetV1 has 55 parameter layers with its batch norms).
MAX_EARLIEST = 10
#: micro-batched steps (``Trainer(micro_batch=...)``), for devices no one-pass step fits: the
#: smallest pass "auto" tries (below it the fixed cost of each pass grows faster than the
#: activations shrink), and how much more score a smaller pass's pick must reach to be taken over
#: a larger one's (CNN-28's sparse step: 1.15x the one-pass time at 8 samples, 1.4x at 4, 1.9x at 2)
MIN_MICRO_BATCH = 2
MICRO_BATCH_GAIN = 1.25

SCORE_METHOD = "mean over mini-batches of the squared gradient norm per weight row / per bias (full-model gradients)"


# ---------------------------------------------------------------------------------------------
# sizes


class BudgetTooSmall(ValueError):
    """Even the cheapest useful subset does not fit the memory budget."""

    def __init__(self, message: str, minimum_bytes: int, budget_bytes: int):
        super().__init__(message)
        self.minimum_bytes = int(minimum_bytes)
        self.budget_bytes = int(budget_bytes)


# ---------------------------------------------------------------------------------------------
# importance scores


@dataclass
class Scores:
    """Importance per candidate unit: ``rows[layer]`` per weight row, ``bias[layer]`` per bias."""

    rows: Dict[str, np.ndarray]
    bias: Dict[str, float]
    method: str = "given"
    batches: int = 0
    samples: int = 0
    mean_loss: float = float("nan")
    seconds: float = 0.0

    @classmethod
    def from_mapping(cls, model: Model, scores: Mapping[str, object], method: str = "given") -> "Scores":
        """From ``{"fc1.weight": per-row scores, "fc1.bias": score, ...}`` (every parameter layer)."""
        if isinstance(scores, Scores):
            return scores
        if not isinstance(scores, Mapping):
            raise ValueError(f"scores must be a Scores or a mapping like {{'fc1.weight': [...], 'fc1.bias': 0.1}}, "
                             f"got {type(scores).__name__}")
        expected = {f"{l.name}.{k}" for l in model.param_layers for k in ("weight", "bias")}
        missing, extra = expected - set(scores), set(scores) - expected
        if missing or extra:
            raise ValueError(f"scores do not match the model: missing {sorted(missing)}, unexpected {sorted(extra)}")
        rows = {l.name: np.asarray(scores[f"{l.name}.weight"], dtype=np.float64) for l in model.param_layers}
        bias = {}
        for l in model.param_layers:
            b = np.asarray(scores[f"{l.name}.bias"], dtype=np.float64)
            if b.size != 1:
                raise ValueError(f"scores[{l.name + '.bias'!r}] must be one number (the bias trains as a whole), "
                                 f"got shape {b.shape}")
            bias[l.name] = float(b.reshape(()))
        out = cls(rows, bias, method=method)
        out.validate(model)
        return out

    def validate(self, model: Model) -> None:
        for l in model.param_layers:
            if l.name not in self.rows or l.name not in self.bias:
                raise ValueError(f"scores have no entry for layer {l.name!r}")
            r = np.asarray(self.rows[l.name])
            n = l.weight_shape[0]
            if r.shape != (n,):
                raise ValueError(f"scores[{l.name + '.weight'!r}] must have one score per row, shape ({n},), "
                                 f"got {r.shape}")
            if not np.all(np.isfinite(r)) or not math.isfinite(self.bias[l.name]):
                raise ValueError(f"scores for layer {l.name!r} hold NaN or Inf")
            if np.any(r < 0) or self.bias[l.name] < 0:
                raise ValueError(f"scores for layer {l.name!r} must be >= 0 (an estimated loss decrease)")
        extra = set(self.rows) - {l.name for l in model.param_layers}
        if extra:
            raise ValueError(f"scores name layers the model does not have: {sorted(extra)}")

    def total(self) -> float:
        return float(sum(r.sum() for r in self.rows.values()) + sum(self.bias.values()))

    def to_dict(self) -> Dict[str, object]:
        """JSON-friendly ``{"fc1.weight": [...], "fc1.bias": x}`` (the form ``from_mapping`` reads)."""
        out: Dict[str, object] = {}
        for name in self.rows:
            out[f"{name}.weight"] = [float(v) for v in self.rows[name]]
            out[f"{name}.bias"] = float(self.bias[name])
        return out


def importance_scores(model: Model, x: np.ndarray, y: np.ndarray, batch_size: int = 64, max_samples: int = 512,
                      seed: int = 0) -> Scores:
    """Per-unit importance from labelled data the hub holds (see module docstring).

    Takes up to ``max_samples`` samples (a seeded random choice), in equal batches of
    ``batch_size`` (a remainder that would make a smaller, noisier batch is dropped), and runs one
    full-model forward+backward per batch. The model is not changed.
    """
    from .trainer import Trainer  # the trainer pulls in every kernel; only scoring needs it

    t0 = time.perf_counter()
    if int(batch_size) < 1 or int(max_samples) < 1:
        raise ValueError(f"batch_size and max_samples must be >= 1, got {batch_size} and {max_samples}")
    x = model.check_input(x)
    y = np.ascontiguousarray(y, dtype=np.int32).reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("importance_scores needs at least one labelled sample")
    if y.min() < 0 or y.max() >= model.num_classes:
        raise ValueError(f"labels must lie in [0, {model.num_classes}), got {y.min()}..{y.max()}")
    rng = np.random.default_rng(seed)
    m = min(int(max_samples), x.shape[0])
    idx = rng.permutation(x.shape[0])[:m]
    bs = min(int(batch_size), m)
    n_batches = m // bs

    trainer = Trainer(model, Subset.full(model))
    rows = {l.name: np.zeros(l.weight_shape[0], np.float64) for l in model.param_layers}
    bias = {l.name: 0.0 for l in model.param_layers}
    losses = []
    for b in range(n_batches):
        sel = idx[b * bs:(b + 1) * bs]
        loss, grads = trainer.gradients(x[sel], y[sel])
        losses.append(loss)
        for l in model.param_layers:
            gw = grads[f"{l.name}.weight"].astype(np.float64)
            rows[l.name] += np.einsum("ij,ij->i", gw, gw)
            gb = grads[f"{l.name}.bias"].astype(np.float64)
            bias[l.name] += float(np.dot(gb.ravel(), gb.ravel()))
    for name in rows:
        rows[name] /= n_batches
        bias[name] /= n_batches
    return Scores(rows, bias, method=SCORE_METHOD, batches=n_batches, samples=n_batches * bs,
                  mean_loss=float(np.mean(losses)), seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# the search


@dataclass
class SearchResult:
    subset: Subset
    score: float                # total importance of what trains
    predicted_bytes: int        # predict_memory(...)["total"] of ``subset``
    budget: int
    memory: Dict[str, int]      # predict_memory by category
    choices: Dict[str, Dict[str, object]]  # layer -> {"rows": k, "of": n, "bias": bool}
    table: List[Dict[str, object]]  # per earliest trainable layer: what the knapsack found
    max_score: float            # score if everything trained
    options: int                # candidate options considered (over all layers)
    probes: int                 # predict_memory calls
    seconds: float
    frozen: str = "float32"     # how devices hold frozen weights for this pick (TaskConfig.frozen)
    micro_batch: int = 0        # samples per pass of the devices' steps, 0 = one pass (TaskConfig.micro_batch)

    def describe(self) -> str:
        parts = []
        for name, c in self.choices.items():
            rows = "all rows" if c["rows"] == c["of"] else f"{c['rows']}/{c['of']} rows"
            parts.append(f"{name}: bias" if c["rows"] == 0 else f"{name}: {rows}{' + bias' if c['bias'] else ''}")
        return "; ".join(parts) or "(nothing trains)"

    def to_dict(self) -> Dict[str, object]:
        """JSON-friendly summary (what a hub logs or checkpoints next to the subset)."""
        return {"subset": self.subset.to_dict(), "fingerprint": self.subset.fingerprint(), "score": self.score,
                "max_score": self.max_score, "predicted_bytes": self.predicted_bytes, "budget": self.budget,
                "memory": dict(self.memory), "choices": self.choices, "table": self.table, "options": self.options,
                "probes": self.probes, "seconds": self.seconds, "frozen": self.frozen, "micro_batch": self.micro_batch}

    def levers(self) -> str:
        """The memory levers of this pick, as a clause for a log line ('' when none)."""
        return (("; frozen weights int8" if self.frozen == "int8" else "")
                + (f"; micro-batches of {self.micro_batch}" if self.micro_batch else ""))

    def format_table(self) -> str:
        lines = [f"{'earliest':<12} {'frontier':>8} {'best score':>12} {'bytes (est)':>14} {'cheapest':>12}"]
        for row in self.table:
            best = "-" if row["best_score"] is None else f"{row['best_score']:.4g}"
            est = "-" if row["est_bytes"] is None else f"{row['est_bytes']:,}"
            lines.append(f"{row['earliest']:<12} {row['frontier']:>8} {best:>12} {est:>14} {row['min_bytes']:>12,}")
        lines.append(f"chosen: {self.describe()}; score {self.score:.4g} of {self.max_score:.4g}; "
                     f"predicted {format_size(self.predicted_bytes)} <= budget {format_size(self.budget)}"
                     + self.levers())
        return "\n".join(lines)


@dataclass
class _Layer:
    name: str
    rows: int
    order: np.ndarray        # rows best-first
    prefix: np.ndarray       # prefix[k] = score of the top k rows
    bias_score: float
    options: List[Tuple[int, bool]] = field(default_factory=list)  # (rows k, bias)

    def score(self, opt: Tuple[int, bool]) -> float:
        k, b = opt
        return float(self.prefix[k]) + (self.bias_score if b else 0.0)


def _row_counts(n: int, ratios: Sequence[float]) -> List[int]:
    return sorted({max(1, int(math.ceil(r * n - 1e-9))) for r in ratios})


def _check_ratios(ratios) -> Tuple[float, ...]:
    try:
        out = tuple(float(r) for r in ratios)
    except TypeError:
        raise ValueError(f"ratios must be a sequence of numbers in (0, 1], got {ratios!r}") from None
    if not out or any(not (0.0 < r <= 1.0) for r in out):
        raise ValueError(f"ratios must be a non-empty sequence of numbers in (0, 1], got {ratios!r}")
    return out


class _Costs:
    """predict_memory on (layer index -> (k, bias)) choices, memoised."""

    def __init__(self, model: Model, layers: List[_Layer], batch_size: int, momentum: float, threads: Optional[int],
                 frozen: str = "float32", micro_batch: int = 0):
        self.model, self.layers = model, layers
        self.batch_size, self.momentum, self.threads, self.frozen = batch_size, momentum, threads, frozen
        self.micro_batch = micro_batch
        self.cache: Dict[tuple, Dict[str, int]] = {}
        self.calls = 0

    def subset(self, choice: Mapping[int, Tuple[int, bool]], top_rows: bool = False) -> Subset:
        parts = {}
        for j, (k, b) in choice.items():
            lay = self.layers[j]
            rows = np.sort(lay.order[:k]).astype(np.int32) if top_rows else np.arange(k, dtype=np.int32)
            parts[lay.name] = LayerSubset(rows, bool(b))
        return Subset(parts)

    def memory(self, choice: Mapping[int, Tuple[int, bool]]) -> Dict[str, int]:
        key = tuple(sorted((j, k, b) for j, (k, b) in choice.items() if k or b))
        got = self.cache.get(key)
        if got is None:
            self.calls += 1
            got = predict_memory(self.model, self.subset(dict((j, (k, b)) for j, k, b in key)),
                                 batch_size=self.batch_size, momentum=self.momentum, threads=self.threads,
                                 frozen=self.frozen, micro_batch=self.micro_batch)
            self.cache[key] = got
        return got

    def total(self, choice: Mapping[int, Tuple[int, bool]]) -> int:
        return int(self.memory(choice)["total"])


def _pareto_merge(cost: np.ndarray, score: np.ndarray, pick: np.ndarray, d_cost: np.ndarray, d_score: np.ndarray,
                  cap: int, budget: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add one group (choose exactly one of its options) to a frontier; keep the Pareto points <= cap."""
    c = (cost[:, None] + d_cost[None, :]).ravel()
    s = (score[:, None] + d_score[None, :]).ravel()
    p = np.concatenate([np.repeat(pick, d_cost.size, axis=0),
                        np.tile(np.arange(d_cost.size, dtype=np.int16), cost.size)[:, None]], axis=1)
    keep = c <= cap
    c, s, p = c[keep], s[keep], p[keep]
    if c.size > MAX_FRONTIER:
        # Coarsen: round every cost UP to a grid so the estimate stays conservative.
        step = max(1, -(-max(budget, 1) // COARSE_CELLS))
        c = -(-c // step) * step
    order = np.lexsort((-s, c))  # bytes up, and within equal bytes the best score first
    c, s, p = c[order], s[order], p[order]
    if c.size:
        best_before = np.maximum.accumulate(s)
        keep = np.empty(c.size, bool)
        keep[0] = True
        keep[1:] = s[1:] > best_before[:-1]  # strictly better than everything no more expensive
        c, s, p = c[keep], s[keep], p[keep]
    return c, s, p


def search_subset(model: Model, scores: Union[Scores, Mapping[str, object]], budget_bytes: Union[int, str],
                  batch_size: int = 32, momentum: float = 0.0, ratios: Sequence[float] = DEFAULT_RATIOS,
                  threads: Optional[int] = None, frozen: str = "float32", micro_batch: int = 0) -> SearchResult:
    """The subset with the highest total score whose predicted training memory fits the budget.

    ``threads``: the kernel thread count of the devices (kernel scratch grows with it); default
    this process's. Raises ``BudgetTooSmall`` when not even the cheapest single unit fits.
    ``frozen``: how devices hold the weights that do not train, "float32" or "int8" (as
    ``Trainer(frozen=...)``), or "auto": the memory lever first, the subset second -- float32
    when its pick already trains everything; else int8 frozen weights when they let a better
    subset fit (or any at all), and only then a smaller subset. ``SearchResult.frozen`` says
    which; it travels to the devices in ``TaskConfig.frozen``. When no subset fits in one pass even
    so, "auto" turns to the activations' lever, micro-batched steps (``micro_batch_options``: half
    the batch, a quarter, ... down to ``MIN_MICRO_BATCH`` samples per pass; ``TaskConfig.micro_batch``):
    the largest pass that fits, and a smaller one only when its pick scores ``MICRO_BATCH_GAIN``
    times as much (each halving makes the step slower).
    ``micro_batch`` (not with "auto"): price the devices' steps so (``Trainer(micro_batch=...)``).
    """
    if frozen == "auto":
        t0 = time.perf_counter()

        refusals: List[BudgetTooSmall] = []

        def attempt(mode: str, micro: int = 0) -> Optional[SearchResult]:
            try:
                return search_subset(model, scores, budget_bytes, batch_size, momentum, ratios, threads, mode, micro)
            except BudgetTooSmall as e:
                refusals.append(e)
                return None

        best = attempt("float32")
        if best is not None and best.score >= best.max_score:
            return best
        lever = attempt("int8")
        if lever is not None and (best is None or lever.score > best.score):
            best = lever
        if best is None:  # a device too small for any one-pass step
            for micro in micro_batch_options(batch_size):
                found = attempt("int8", micro)
                if found is not None and (best is None or found.score > best.score * MICRO_BATCH_GAIN):
                    best = found
        if best is None:  # nothing fits by any lever: the refusal naming the cheapest subset of all
            raise min(refusals, key=lambda e: e.minimum_bytes)
        best.seconds = time.perf_counter() - t0
        return best
    if frozen not in ("float32", "int8"):
        raise ValueError(f"frozen must be 'float32', 'int8' or 'auto', got {frozen!r}")
    micro_batch = check_micro_batch(micro_batch)
    t0 = time.perf_counter()
    budget = parse_size(budget_bytes)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ratios = _check_ratios(ratios)
    sc = Scores.from_mapping(model, scores)
    sc.validate(model)

    layers: List[_Layer] = []
    for l in model.param_layers:
        r = np.asarray(sc.rows[l.name], dtype=np.float64)
        order = np.argsort(-r, kind="stable")  # best first; ties by row index
        lay = _Layer(l.name, l.weight_shape[0], order, np.concatenate([[0.0], np.cumsum(r[order])]),
                     float(sc.bias[l.name]))
        lay.options = [(0, True)] + [(k, b) for k in _row_counts(lay.rows, ratios) for b in (False, True)]
        layers.append(lay)
    P = len(layers)
    if P == 0:
        raise ValueError("the model has no parameters to train")
    costs = _Costs(model, layers, int(batch_size), float(momentum), threads, frozen, micro_batch)
    max_score = sum(lay.score((lay.rows, True)) for lay in layers)

    # -- per earliest trainable layer e: a grouped knapsack over layers e..P-1 ----------------
    candidates = []  # (score, est_bytes, choice dict)
    table = []
    minimum = None
    earliest = range(P) if P <= MAX_EARLIEST else sorted({int(round(t)) for t in np.linspace(0, P - 1, MAX_EARLIEST)})
    for e in earliest:
        # Two linearisation points: only the bias of e (options measured alone, exact for
        # every single unit), and the fewest rows + bias everywhere from e up (every input kept:
        # measures options where the others already keep their activations).
        groups, c_base = _groups_around(layers, costs, {e: (0, True)}, e)
        i_min = int(np.argmin(groups[0][2]))
        e_min = c_base + int(groups[0][2][i_min])
        if minimum is None or e_min < minimum[0]:
            k, b = groups[0][1][i_min]
            minimum = (e_min, f"{layers[e].name} " + ("bias" if k == 0 else f"{k}/{layers[e].rows} rows"
                                                       + (" + bias" if b else "")))
        found = _knapsack(groups, c_base, budget)
        found_rich = []
        if P <= RICH_BASE_MAX_LAYERS:
            rich = {j: (layers[j].options[1][0], True) for j in range(e, P)}
            found_rich = _knapsack(*_groups_around(layers, costs, rich, e), budget)
        # single units are measured exactly: with them in, something verifies whenever the
        # cheapest unit fits, whatever the estimates of combinations did
        singles = [(float(sc_), c_base + int(d), {e: o}) for o, d, sc_ in zip(*groups[0][1:]) if c_base + d <= budget]
        candidates += found + found_rich + singles
        row = {"earliest": layers[e].name, "frontier": len(found), "best_score": None, "est_bytes": None,
               "min_bytes": int(e_min)}
        if found:
            best = max(found, key=lambda t: (t[0], -t[1]))
            row["best_score"], row["est_bytes"] = best[0], best[1]
        table.append(row)

    too_small = BudgetTooSmall(f"memory budget {format_size(budget)} is too small: the cheapest trainable subset "
                               f"({minimum[1]}, batch size {batch_size}"
                               + (f" in micro-batches of {micro_batch}" if micro_batch else "")
                               + f") needs {format_size(minimum[0])}",
                               minimum[0], budget)
    if not candidates:
        raise too_small

    # -- verify: best score first, fewer bytes on ties; never return anything over budget -----
    chosen = _first_verified(candidates, costs, budget)
    if chosen is None:  # single units are exact candidates, so this means nothing fits
        raise too_small

    # -- local refinement, every step verified: re-solve the knapsack with option costs measured
    # around the current pick (captures interactions the probe base could not see), then single
    # option changes; repeat while the score rises.
    while True:
        better = _improve(layers, costs, _relinearise(layers, costs, chosen, budget), budget)
        if better[0] <= chosen[0]:
            break
        chosen = better

    s, real, choice = chosen
    subset = costs.subset(choice, top_rows=True)
    memory = predict_memory(model, subset, batch_size=int(batch_size), momentum=float(momentum), threads=threads,
                            frozen=frozen, micro_batch=micro_batch)
    if memory["total"] != real or real > budget:  # never hand out a pick over budget, even with -O
        raise RuntimeError(f"subset search: verified {real} bytes but predict_memory now says {memory['total']} "
                           f"(budget {budget})")
    choices = {layers[j].name: {"rows": k, "of": layers[j].rows, "bias": b} for j, (k, b) in sorted(choice.items())}
    return SearchResult(subset=subset, score=float(s), predicted_bytes=int(memory["total"]), budget=budget,
                        memory=memory, choices=choices, table=table, max_score=float(max_score),
                        options=sum(len(lay.options) for lay in layers), probes=costs.calls,
                        seconds=time.perf_counter() - t0, frozen=frozen, micro_batch=micro_batch)


def micro_batch_options(batch_size: int) -> List[int]:
    """The passes "auto" tries, largest (fastest) first: half the batch, a quarter, ... down to
    ``MIN_MICRO_BATCH`` samples."""
    out, m = [], int(batch_size) // 2
    while m >= MIN_MICRO_BATCH:
        out.append(m)
        m //= 2
    return out


def _knapsack(groups, c_base: int, budget: int) -> List[Tuple[float, int, Dict[int, Tuple[int, bool]]]]:
    """Pareto-optimal (score, estimated bytes, choice) combinations, one option per group, under budget.

    groups: (layer index, options, cost differences from the base, option scores).
    """
    # lowest possible cost still to come after each group, so pruning never drops a point that
    # negative later differences could bring back under the budget
    rest = np.zeros(len(groups) + 1, np.int64)
    for g in range(len(groups) - 1, -1, -1):
        rest[g] = rest[g + 1] + min(0, int(groups[g][2].min()))
    cost = np.zeros(1, np.int64)
    score = np.zeros(1, np.float64)
    pick = np.zeros((1, 0), np.int16)
    for g, (_, _, d_cost, d_score) in enumerate(groups):
        cost, score, pick = _pareto_merge(cost, score, pick, d_cost, d_score, budget - c_base - int(rest[g + 1]),
                                          budget)
    total = cost + c_base
    out = []
    for i in np.nonzero(total <= budget)[0]:
        choice = {groups[g][0]: groups[g][1][pick[i, g]] for g in range(len(groups))}
        out.append((float(score[i]), int(total[i]), choice))
    return out


def _first_verified(candidates, costs: "_Costs", budget: int):
    """Best score first (fewer estimated bytes on ties): the first whose real prediction fits."""
    for s, _, choice in sorted(candidates, key=lambda t: (-t[0], t[1])):
        real = costs.total(choice)
        if real <= budget:
            return s, real, _clean(choice)
    return None


def _groups_around(layers: List[_Layer], costs: "_Costs", base: Mapping[int, Tuple[int, bool]], e: int):
    """Knapsack groups for layers e.. with option costs measured as single changes of ``base``.

    Layer e must train something (no "none" option); later layers may train nothing.
    Returns (groups, predict_memory of base).
    """
    c_base = costs.total(base)
    groups = []
    for j in range(e, len(layers)):
        opts = list(layers[j].options) if j == e else [(0, False)] + list(layers[j].options)
        d = [costs.total(_clean({**base, j: o})) - c_base for o in opts]
        groups.append((j, opts, np.array(d, np.int64), np.array([layers[j].score(o) for o in opts])))
    return groups, c_base


def _relinearise(layers: List[_Layer], costs: "_Costs", chosen, budget: int):
    """The knapsack again, with each option's cost measured as a change of the current pick.

    Keeps the current earliest layer (it must still train something); only a verified better
    pick replaces the current one.
    """
    score, real, choice = chosen
    groups, _ = _groups_around(layers, costs, choice, min(choice))
    found = [c for c in _knapsack(groups, real, budget) if c[0] > score]
    better = _first_verified(found, costs, budget)
    return better if better is not None and better[0] > score else chosen


def _clean(choice: Mapping[int, Tuple[int, bool]]) -> Dict[int, Tuple[int, bool]]:
    return {j: (k, b) for j, (k, b) in choice.items() if k or b}


def _improve(layers: List[_Layer], costs: _Costs, chosen, budget: int):
    """Single-layer option changes that raise the score and still verify under budget, best first."""
    score, real, choice = chosen
    while True:
        best = None
        for j, lay in enumerate(layers):
            current = choice.get(j, (0, False))
            for opt in [(0, False)] + lay.options:
                if opt == current:
                    continue
                trial = dict(choice)
                trial[j] = opt
                trial = _clean(trial)
                if not trial:
                    continue
                s = sum(layers[i].score(o) for i, o in trial.items())
                if s <= score or (best is not None and s < best[0]):
                    continue
                c = costs.total(trial)
                if c <= budget and (best is None or s > best[0] or (s == best[0] and c < best[1])):
                    best = (s, c, trial)
        if best is None:
            return score, real, choice
        score, real, choice = best


MAX_TIERS = 4   # nested tiers at most (each is one more subset to ship, merge and clip against)


def tier_budgets(budgets: Sequence[int], max_tiers: Optional[int] = MAX_TIERS) -> List[int]:
    """The distinct budgets tiers are searched under, ascending, at most ``max_tiers`` of them:
    the smallest (the paper's M_min) and the largest are always kept, the rest evenly spaced
    (None: every distinct budget)."""
    distinct = sorted({int(b) for b in budgets})
    if max_tiers is None or len(distinct) <= max_tiers:
        return distinct
    if max_tiers < 2:
        return distinct[:1]
    picks = {round(i * (len(distinct) - 1) / (max_tiers - 1)) for i in range(max_tiers)}
    return [distinct[i] for i in sorted(picks)]


def nested_tiers(model: Model, scores, smallest: Subset, budgets: Sequence[int], batch_size: int,
                 full_step_bytes: int, frozen: str = "float32",
                 max_tiers: Optional[int] = MAX_TIERS, micro_batch: int = 0) -> List[Tuple[Subset, int]]:
    """Nested subsets, one per distinct budget at or above the smallest tier's memory:
    ``[(subset, predicted bytes), ...]``, smallest first (``smallest``: the paper's w*), at most
    ``max_tiers`` of them (``tier_budgets`` picks which budgets get one).

    ``frozen``: how devices hold the frozen weights ("float32" or "int8": what the search for w*
    chose with ``frozen="auto"``; every tier of a run trains with that one setting), used both to
    search each tier and to price it; so is ``micro_batch`` (w*'s, ``TaskConfig.micro_batch``). A budget that holds the full step trains the full model.
    Otherwise the search runs under that budget with the previous tier's units scored far above
    any other, so it keeps them and adds the best units that still fit; a result that is not a
    superset (the cost model is not additive, so a rare search may trade a kept unit away) is
    replaced by the union when that fits, and dropped otherwise (those devices train the
    previous tier).
    """
    if frozen not in ("float32", "int8"):
        raise ValueError(f"nested_tiers: frozen must be 'float32' or 'int8' (the setting w* was chosen with), "
                         f"got {frozen!r}")
    full = Subset.full(model)

    def price(sub: Subset) -> int:
        return int(predict_memory(model, sub, batch_size, frozen=frozen, micro_batch=micro_batch)["total"])

    tiers = [(smallest, price(smallest))]
    for budget in tier_budgets(budgets, max_tiers):
        if max_tiers is not None and len(tiers) >= max_tiers:
            break
        prev, prev_bytes = tiers[-1]
        if budget <= prev_bytes or prev == full:
            continue
        if budget >= full_step_bytes:
            tiers.append((full, int(full_step_bytes)))
            continue
        boost = 1.0 + 10.0 * scores.total()
        rows = {name: np.array(r, dtype=np.float64) for name, r in scores.rows.items()}
        bias = dict(scores.bias)
        for name, ls in prev.layers.items():
            rows[name][ls.rows] += boost
            if ls.bias:
                bias[name] += boost
        try:
            found = search_subset(model, Scores(rows, bias), budget, batch_size=batch_size, frozen=frozen,
                                  micro_batch=micro_batch).subset
        except BudgetTooSmall:
            continue
        if not subset_contains(found, prev):
            found = subset_union(found, prev)
        nbytes = price(found)
        if nbytes > budget or found == prev:
            continue
        tiers.append((found, nbytes))
    return tiers
