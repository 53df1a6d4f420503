"""Local training on a parameter subset: SGD (optional momentum and weight decay).

The step's whole flow, in order (``plan.py`` decides it once per batch size, from shapes):
  forward   every layer runs; layers that neither train nor lead to a trained one (the frozen
            part) run first in inference mode, a few samples at a time, keeping nothing;
  loss      softmax cross-entropy on the logits;
  backward  from the loss through the layers that lead to trained parameters only; where
            paths join, gradients add up;
  update    SGD on the selected rows, in place in the model's arrays, inside backward: each layer
            first computes its input's gradient (from the weights forward used), then updates its
            trained bias and rows (dense and im2col convolutions tile by tile from the weight-
            gradient GEMM, so no whole weight gradient ever exists; the small others from one
            shared short-lived buffer). ``momentum=0`` keeps no optimizer state at all.
            ``gradients()`` (and a step on tied weights, see ``plan.fused_update``) instead keeps
            whole gradients (one row per selected row) and updates after backward.

Every buffer comes from an ``Arena`` that counts bytes by category, so ``Trainer.memory`` is
what this step really held (kernel scratch included, read from the C++ counter), to be compared
with ``cost.predict_memory``, which adds up the same plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import _kernels as K
from .graph import Layer, Model
from .plan import (CATEGORIES, Ref, StepPlan, build, check_frozen, check_micro_batch, fused_update, int8_layers,
                   mixed_layers, parameter_buffers, requires_grad, weight_bytes)
from .subset import Subset


@dataclass
class MemoryRecord:
    """Bytes one training step held, by category."""

    frozen_weights: int = 0
    trainable_weights: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0
    workspace: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, c) for c in CATEGORIES)

    def as_dict(self) -> Dict[str, int]:
        d = {c: getattr(self, c) for c in CATEGORIES}
        d["total"] = self.total
        return d


class Arena:
    """Training buffers, allocated on first use and reused by later steps of the same shape."""

    def __init__(self):
        self._buffers: Dict[tuple, np.ndarray] = {}
        self._category: Dict[tuple, str] = {}
        self._flat: Dict[tuple, np.ndarray] = {}

    def get(self, key: tuple, shape: tuple, dtype, category: str, zero: bool = False,
            within: bool = False) -> np.ndarray:
        """The buffer ``key`` of ``shape``; ``within``: a view of the first elements of a larger
        one already there (a micro-batched step's last, shorter pass uses the full passes' buffers)."""
        buf = self._buffers.get(key)
        numel = int(np.prod(shape))
        if within and buf is not None and buf.dtype == dtype and buf.size >= numel and not zero:
            return buf.reshape(-1)[:numel].reshape(shape)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
            buf = np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
            self._buffers[key] = buf
            self._category[key] = category
        return buf

    def scratch(self, key: tuple, shape: tuple) -> np.ndarray:
        """A float32 view of `shape` into a reusable flat buffer that grows to the largest use."""
        need = int(np.prod(shape))
        flat = self._flat.get(key)
        if flat is None or flat.size < need:
            flat = np.empty(need, np.float32)
            self._flat[key] = flat
        return flat[:need].reshape(shape)

    def bytes_by_category(self) -> Dict[str, int]:
        out = {c: 0 for c in CATEGORIES}
        for key, buf in self._buffers.items():
            out[self._category[key]] += buf.nbytes
        out["workspace"] += sum(f.nbytes for f in self._flat.values())
        return out


class Scope:
    """What one layer may take from the arena during a training step (layers that run without
    one, the frozen part, save nothing)."""

    def __init__(self, trainer: "Trainer", index: int, layer: Layer):
        self.trainer = trainer
        self.index = index
        self.layer = layer
        self._sgd: "Optional[SgdRows]" = None  # what sgd() last returned

    @property
    def rng(self) -> np.random.Generator:
        return self.trainer.rng

    def saved(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """A buffer kept from forward to backward (counted as activations)."""
        # within: a micro-batched step's last, shorter pass keeps them in the full passes' buffers
        return self.trainer.arena.get((self.index, name), shape, dtype, "activations",
                                      within=bool(self.trainer.micro_batch))

    def grad_buffers(self, layer: Layer) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
        """(rows, weight-gradient buffer [R, ...] or None, bias-gradient buffer [out] or None).

        rows None means every row. The bias trains as a whole whichever weight rows train, so
        its gradient always covers every output. In a fused step the buffers are views of the
        shared short-lived buffer, and the layer calls ``apply_grads`` once they are filled.
        """
        t = self.trainer
        g = t._grads.get(layer.name)
        if g is None:
            return None, None, None
        if t._buffered:
            return g.rows, g.dw, g.db
        shared = t.arena.get(("update", "grad"), *t._shared_grad, zero=False) if t._shared_grad else None
        dw = db = None
        used = 0
        if g.trains_rows:
            shape = g.vw_shape
            dw, used = shared[:int(np.prod(shape))].reshape(shape), int(np.prod(shape))
        if g.trains_bias:
            db = shared[used:used + layer.bias.size]
        return g.rows, dw, db

    def apply_grads(self, layer: Layer) -> None:
        """In a fused step, the SGD update from the buffers ``grad_buffers`` gave this layer
        (which its backward has just filled); otherwise nothing (the update comes after backward)."""
        t = self.trainer
        if t._buffered or layer.name not in t._grads:
            return
        rows, dw, db = self.grad_buffers(layer)
        g = t._grads[layer.name]
        if dw is not None:
            param, rows = _row_target(layer, rows)
            K.sgd_update_rows(param, rows, dw.reshape(dw.shape[0], -1),
                              None if g.vw is None else g.vw.reshape(g.vw.shape[0], -1), t.lr, t.momentum,
                              t.weight_decay)
        if db is not None:
            K.sgd_update_rows(layer.bias, None, db, g.vb, t.lr, t.momentum, t.weight_decay)

    @property
    def accumulate(self) -> bool:
        """Do the gradient buffers ``grad_buffers`` gives add this pass's gradient to what they hold
        (the passes after the first of a micro-batched step), rather than be overwritten?"""
        return self.trainer._pass > 0

    def sgd(self, layer: Layer) -> "Optional[SgdRows]":
        """In a fused step, what a layer that ``fuses_update`` updates in its backward call;
        None when it trains nothing or the step keeps whole gradients (then ``grad_buffers``)."""
        t = self.trainer
        if t._buffered:
            return None
        cached = self._sgd  # built once: this runs every step, for every trained layer
        if (cached is not None and cached.lr == t.lr and cached.momentum == t.momentum
                and cached.weight_decay == t.weight_decay and cached.grads is t._grads.get(layer.name)):
            return cached
        g = t._grads.get(layer.name)
        if g is None:
            return None
        rows = g.rows if g.trains_rows else np.zeros(0, np.int32)
        self._sgd = SgdRows(rows, g.trains_bias, g.vw, g.vb, t.lr, t.momentum, t.weight_decay, g)
        return self._sgd


def _row_target(layer: Layer, rows: Optional[np.ndarray]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(2-D array, rows) an update of the weight rows ``rows`` (None: all) writes into: the weight
    itself, or a mixed layer's compact trained rows (in the subset's row order: all of them)."""
    if getattr(layer, "is_mixed", False):
        return layer.weight_trained.reshape(layer.weight_trained.shape[0], -1), None
    return layer.weight.reshape(layer.weight_shape[0], -1), rows


@dataclass
class SgdRows:
    """A fused backward-and-update call's arguments: rows (None: all), whether the bias trains,
    velocity buffers (None without momentum) and the hyper-parameters."""

    rows: Optional[np.ndarray]
    bias: bool
    vw: Optional[np.ndarray]
    vb: Optional[np.ndarray]
    lr: float
    momentum: float
    weight_decay: float
    grads: "Optional[_LayerGrads]" = None  # whose buffers these are (tells a cached SgdRows is current)


def _run(entries, x: np.ndarray) -> None:
    """Run bound plan entries: (fn, args, [(position, input-batch Ref or list)]) filled per step."""
    for fn, args, dynamic in entries:
        if dynamic:
            args = list(args)
            for pos, ref in dynamic:
                args[pos] = ([_x_view(r, x) if isinstance(r, Ref) else r for r in ref] if isinstance(ref, list)
                             else _x_view(ref, x))
        fn(*args)


def _x_view(ref: Ref, x: np.ndarray) -> np.ndarray:
    if ref.kind != "x":
        raise AssertionError("only input-batch refs are resolved per step")
    if ref.a == 0 and ref.shape == x.shape:  # the whole batch as it is (no view to make)
        return x
    return x[ref.a:ref.b].reshape(ref.shape)


@dataclass
class _Bound:
    plan: StepPlan
    forward: list
    backward: list
    logits: np.ndarray
    probs: np.ndarray
    dlogits: np.ndarray


@dataclass
class _LayerGrads:
    rows: Optional[np.ndarray]  # None: every row
    trains_rows: bool
    trains_bias: bool
    vw_shape: tuple  # [trained rows, ...]
    dw: Optional[np.ndarray] = None  # whole gradients: only once gradients() (or a buffered step) ran
    db: Optional[np.ndarray] = None
    vw: Optional[np.ndarray] = None
    vb: Optional[np.ndarray] = None


@dataclass
class TrainStats:
    steps: int = 0
    samples: int = 0
    mean_loss: float = float("nan")
    losses: List[float] = field(default_factory=list)


def planned_steps(n: int, epochs: float, batch_size: int, max_steps: Optional[int] = None) -> int:
    """Steps ``Trainer.train`` takes for n samples: epochs x batches per epoch (at least 1), at most max_steps."""
    bs = max(1, min(int(batch_size), int(n)))
    steps = max(1, int(round(epochs * n / bs)))
    return steps if max_steps is None else max(1, min(steps, int(max_steps)))


class Trainer:
    """SGD on ``subset`` of ``model``'s parameters (updates the model's arrays in place).

    ``frozen="int8"``: every Dense/Conv whose weight rows do not train is converted, in the model
    itself, to int8 with a float32 scale per output row (``Layer.quantize_weight``; its float32
    array is released), and forward and backward run on the int8 weight. A Dense or group-1 Conv
    of which only some rows train becomes mixed (``Layer.mix_weight``): its frozen rows int8 the
    same way, its trained rows float32 in a compact array the update writes into. ``"float32"`` (the
    default) leaves the model as it is (layers already int8 stay so).

    ``micro_batch=m`` (> 0): a step on a batch of n > m samples runs forward and backward over
    passes of at most m samples, sums the passes' gradients in whole gradient buffers (the kernels
    add into them) and updates once, so it is the same step as in one pass (up to float rounding:
    the sums' order differs). Activations and workspace then scale with m instead of n; the
    gradients of the trained parameters are held whole, and the step is slower.
    0 (the default): one pass, the update inside backward."""

    def __init__(self, model: Model, subset: Optional[Subset] = None, lr: float = 0.05, momentum: float = 0.0,
                 weight_decay: float = 0.0, seed: int = 0, prefix_chunk: int = 8, frozen: str = "float32",
                 micro_batch: int = 0):
        if not lr > 0 or not np.isfinite(lr):
            raise ValueError(f"learning rate must be a positive number, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
        self.model = model
        self.subset = subset if subset is not None else Subset.full(model)
        self.subset.validate(model)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        if prefix_chunk < 1:
            raise ValueError(f"prefix_chunk must be >= 1, got {prefix_chunk}")
        # samples per pass through the frozen layers (one pass when chunks would save no buffer: plan.build)
        self.prefix_chunk = int(prefix_chunk)
        self.frozen = check_frozen(frozen)
        self.micro_batch = check_micro_batch(micro_batch)
        for layer in model.param_layers:
            ls = self.subset.get(layer.name)
            if getattr(layer, "is_int8", False) and ls is not None and ls.rows.size:
                raise ValueError(f"layer {layer.name!r} holds int8 weights, so its weight rows cannot train "
                                 f"(train them on a float32 copy of the model)")
            if (getattr(layer, "is_mixed", False) and ls is not None and ls.rows.size and self.frozen != "int8"
                    and not np.array_equal(ls.rows, layer.trained_rows)):
                raise ValueError(f"layer {layer.name!r} holds int8 weights except for other rows than the subset "
                                 f"trains (train with frozen='int8', or on a float32 copy of the model)")
        self.rng = np.random.default_rng(seed)
        self.arena = Arena()
        req = requires_grad(model, self.subset)
        if not req[-1]:
            raise ValueError("the subset trains nothing")
        for name in int8_layers(model, self.subset, self.frozen):  # settings checked: now change the model
            model.layer(name).quantize_weight()
        for name in mixed_layers(model, self.subset, self.frozen):  # partly trained: frozen rows int8
            model.layer(name).mix_weight(self.subset.get(name).rows)
        #: the first layer backward reaches (layers before it, and others off the trained paths, are frozen)
        self.first = next(i for i in range(len(model.layers)) if req[i + 1])
        self._grads: Dict[str, _LayerGrads] = {}
        #: updates happen inside backward with no gradient buffers (see plan.fused_update); never
        #: in micro-batches, whose passes sum into whole gradients
        self.fused = fused_update(model, self.subset) and not self.micro_batch
        self._buffered = not self.fused  # this pass fills whole gradient buffers
        self._pass = 0  # which pass of a micro-batched step runs (after the first: add into the gradients)
        self._shared_grad = None
        self._alloc_grads(buffered=not self.fused)
        self._scopes = [Scope(self, i, layer) for i, layer in enumerate(model.layers)]
        self._plans: Dict[int, _Bound] = {}
        self._workspace_peak = 0

    # -- planning ------------------------------------------------------------------------------
    def _alloc_grads(self, buffered: bool) -> None:
        """Velocity (with momentum) and, buffered, whole gradients; fused, the shared buffer's size."""
        buffers = parameter_buffers(self.model, self.subset, self.momentum, fused=not buffered, frozen=self.frozen)

        def take(name, what):
            spec = buffers.get((name, what))
            return None if spec is None else self.arena.get((name, what), *spec, zero=what.startswith("v"))

        for layer in self.model.param_layers:
            ls = self.subset.get(layer.name)
            if ls is None:
                continue
            g = self._grads.get(layer.name)
            if g is None:
                full = ls.rows.size == layer.weight_shape[0]
                rows = None if full else (ls.rows if ls.rows.size else None)
                g = self._grads[layer.name] = _LayerGrads(rows, bool(ls.rows.size), bool(ls.bias),
                                                          (ls.rows.size,) + layer.weight_shape[1:])
            g.dw, g.db = take(layer.name, "dw"), take(layer.name, "db")
            g.vw, g.vb = take(layer.name, "vw"), take(layer.name, "vb")
        shared = buffers.get(("update", "grad"))
        if shared is not None:
            self._shared_grad = shared
        for scope in getattr(self, "_scopes", ()):  # their cached SgdRows may name replaced buffers
            scope._sgd = None

    def _bind(self, plan: StepPlan, within: bool = False) -> _Bound:
        """Allocate the plan's buffers in the arena and put arrays in place of its refs (``within``:
        in the buffers of a larger plan already bound, see ``Arena.get``)."""
        arena = self.arena
        fixed = {key: arena.get(key, shape, dtype, category, within=within)
                 for key, (shape, dtype, category) in plan.fixed.items()}
        slots = [arena.scratch(("slot", k), (size,)) for k, size in enumerate(plan.slots)]

        def resolve(ref):
            if ref is None or not isinstance(ref, Ref):
                return ref
            if ref.kind == "fixed":
                buf = fixed[ref.key]
                if (ref.a, ref.b) != (0, buf.shape[0]):
                    buf = buf[ref.a:ref.b]
                return buf.reshape(ref.shape)
            if ref.kind == "slot":
                return slots[ref.key][:int(np.prod(ref.shape))].reshape(ref.shape)
            raise AssertionError(f"cannot bind a {ref.kind} ref statically")

        def is_x(a):
            return isinstance(a, Ref) and a.kind == "x"

        def bind(entries):
            out = []
            for fn, args in entries:
                static, dynamic = [], []
                for pos, a in enumerate(args):
                    if isinstance(a, tuple) and len(a) == 2 and a[0] == "scope":
                        static.append(self._scopes[a[1]])
                    elif isinstance(a, list) and any(is_x(r) for r in a):
                        static.append(None)
                        dynamic.append((pos, [r if is_x(r) else resolve(r) for r in a]))
                    elif isinstance(a, list):
                        static.append([resolve(r) for r in a])
                    elif is_x(a):
                        static.append(None)
                        dynamic.append((pos, a))
                    else:
                        static.append(resolve(a))
                out.append((fn, tuple(static), dynamic))
            return out

        return _Bound(plan, bind(plan.forward), bind(plan.backward), resolve(plan.logits), resolve(plan.probs),
                      resolve(plan.dlogits))

    # -- one step ------------------------------------------------------------------------------
    def step(self, x: np.ndarray, labels: np.ndarray) -> float:
        """One SGD step on a batch; returns the batch's mean loss before the update."""
        loss = self._forward_backward(x, labels)
        if self._buffered:
            self._apply_update()
        return loss

    def gradients(self, x: np.ndarray, labels: np.ndarray) -> Tuple[float, Dict[str, np.ndarray]]:
        """(mean loss, gradients of the subset's tensors) on a batch, without updating anything.

        Keys and shapes follow ``Subset.tensors``: "layer.weight" -> [rows, row_size] for the
        selected rows, "layer.bias" -> [1, out]. The arrays are copies.
        """
        if self.fused:  # whole gradients, allocated on first use (the step itself never needs them)
            if self._grads and all(g.dw is None and g.db is None for g in self._grads.values()):
                self._alloc_grads(buffered=True)
            self._buffered = True
            try:
                loss = self._forward_backward(x, labels)
            finally:
                self._buffered = False
        else:
            loss = self._forward_backward(x, labels)
        out = {}
        for layer in self.model.param_layers:
            g = self._grads.get(layer.name)
            if g is None:
                continue
            if g.dw is not None:
                out[f"{layer.name}.weight"] = g.dw.reshape(g.dw.shape[0], -1).copy()
            if g.db is not None:
                out[f"{layer.name}.bias"] = g.db.reshape(1, -1).copy()
        return loss, out

    def _plan(self, n: int) -> _Bound:
        """The bound plan of a pass of n samples. Micro-batched, a pass shorter than one already
        bound lives in that plan's buffers, and a longer one rebinds the shorter ones inside its
        own, so the arena holds (and records) one set of buffers, the longest pass's."""
        plan = self._plans.get(n)
        if plan is None:
            m = self.micro_batch
            within = bool(m) and any(k > n for k in self._plans)
            if m and not within:
                for k in [k for k in self._plans if k < n]:
                    del self._plans[k]
            plan = self._plans[n] = self._bind(build(self.model, self.subset, n, self.prefix_chunk,
                                                     fused=False if m else None), within=within)
        return plan

    def _forward_backward(self, x: np.ndarray, labels: np.ndarray) -> float:
        n = x.shape[0]
        x = self.model.check_input(x)
        labels = np.ascontiguousarray(labels, dtype=np.int32)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
        m = self.micro_batch or n
        K.reset_workspace_peak()
        base = K.workspace_current_bytes()
        total = 0.0
        try:
            for self._pass, a in enumerate(range(0, n, m)):
                b = min(n, a + m)
                plan = self._plan(b - a)
                xs = x if b - a == n else x[a:b]
                _run(plan.forward, xs)
                loss = K.softmax_xent_forward(plan.logits, labels[a:b], plan.probs)
                K.softmax_xent_backward(plan.probs, labels[a:b], plan.dlogits, 1.0 / n)  # the batch's mean
                _run(plan.backward, xs)
                total += float(loss) * (b - a)
        finally:
            self._pass = 0
        self._workspace_peak = max(self._workspace_peak, K.workspace_peak_bytes() - base)
        return float(loss) if m >= n else total / n

    def _apply_update(self) -> None:
        for layer in self.model.param_layers:
            g = self._grads.get(layer.name)
            if g is None:
                continue
            if g.dw is not None:
                param, rows = _row_target(layer, g.rows)
                K.sgd_update_rows(param, rows, g.dw.reshape(g.dw.shape[0], -1),
                                  None if g.vw is None else g.vw.reshape(g.vw.shape[0], -1),
                                  self.lr, self.momentum, self.weight_decay)
            if g.db is not None:
                K.sgd_update_rows(layer.bias, None, g.db, g.vb, self.lr, self.momentum, self.weight_decay)

    # -- loops ---------------------------------------------------------------------------------
    def train(self, x: np.ndarray, y: np.ndarray, epochs: float = 1.0, batch_size: int = 32,
              max_steps: Optional[int] = None, should_stop: Optional[Callable[[], bool]] = None) -> TrainStats:
        """Shuffled mini-batch SGD over (x, y) for `epochs` passes (fractions allowed).

        ``should_stop`` is asked between two steps (never before the first, so a stopped run still
        has a loss); True ends training there, and an exception it raises propagates.
        """
        x = self.model.check_input(x)
        y = np.ascontiguousarray(y, dtype=np.int32)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        if x.shape[0] == 0:
            raise ValueError("no training samples")
        n = x.shape[0]
        bs = min(batch_size, n)
        steps = planned_steps(n, epochs, batch_size, max_steps)
        stats = TrainStats()
        for xb, yb in self._batches(x, y, bs, steps):
            if stats.steps and should_stop is not None and should_stop():
                break
            stats.losses.append(self.step(xb, yb))
            stats.steps += 1
            stats.samples += xb.shape[0]
            del xb, yb  # else this batch stays alive while the next one is gathered
        stats.mean_loss = float(np.mean(stats.losses))
        return stats

    def _batches(self, x, y, bs, steps) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        n = x.shape[0]
        order = self.rng.permutation(n)
        pos = 0
        for _ in range(steps):
            if pos + bs > n:
                order, pos = self.rng.permutation(n), 0
            idx = order[pos:pos + bs]
            pos += bs
            yield x[idx], y[idx]

    # -- memory ---------------------------------------------------------------------------------
    @property
    def memory(self) -> MemoryRecord:
        """What the last steps held: weights by trainability, arena buffers, kernel scratch peak."""
        frozen, trainable = weight_bytes(self.model, self.subset)  # counts the model's int8 layers as int8
        by_cat = self.arena.bytes_by_category()
        return MemoryRecord(frozen_weights=frozen, trainable_weights=trainable, gradients=by_cat["gradients"],
                            optimizer_state=by_cat["optimizer_state"], activations=by_cat["activations"],
                            workspace=by_cat["workspace"] + self._workspace_peak)
