"""Local training on a parameter subset: SGD (optional momentum and weight decay).

The step's whole flow, in order:
  forward   every layer runs; layers below the earliest trainable one run in inference mode and
            write into two reused scratch buffers (nothing of theirs is kept);
  loss      softmax cross-entropy on the logits;
  backward  from the loss down to the earliest trainable layer only; weight gradients exist only
            for the selected rows (buffers of that many rows), bias gradients only where a bias
            trains; input gradients are not computed below the earliest trainable layer;
  update    SGD on the selected rows, in place in the model's arrays.

Every buffer comes from an ``Arena`` that counts bytes by category, so ``Trainer.memory`` is
what this step really held (kernel scratch included, read from the C++ counter), to be compared
with the prediction of ``cost.predict_memory``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import _kernels as K
from .graph import VIEW_KINDS, Layer, Model
from .subset import Subset

CATEGORIES = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "activations", "workspace")


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

    def get(self, key: tuple, shape: tuple, dtype, category: str, zero: bool = False) -> np.ndarray:
        buf = self._buffers.get(key)
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
    """What one layer may take from the arena during a training step."""

    def __init__(self, trainer: "Trainer", index: int, layer: Layer):
        self.trainer = trainer
        self.index = index
        self.layer = layer
        self.keep = True
        self.in_shape = trainer.model.shapes[index]

    @property
    def rng(self) -> np.random.Generator:
        return self.trainer.rng

    def saved(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """A buffer kept from forward to backward (counted as activations)."""
        return self.trainer.arena.get((self.index, name), shape, dtype, "activations")

    def grad_buffers(self, layer: Layer) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
        """(rows, weight-gradient buffer [R, ...] or None, bias-gradient buffer [out] or None).

        rows None means every row. The bias trains as a whole whichever weight rows train, so
        its gradient always covers every output.
        """
        g = self.trainer._grads.get(layer.name)
        if g is None:
            return None, None, None
        return g.rows, g.dw, g.db


class _XRef:
    """Rows a:b of the step's input batch, viewed as `shape`: a placeholder inside a plan."""

    __slots__ = ("a", "b", "shape")

    def __init__(self, a: int, b: int, shape: tuple):
        self.a, self.b, self.shape = a, b, tuple(shape)

    def reshape(self, shape) -> "_XRef":
        return _XRef(self.a, self.b, shape)


def _call(fn, *args) -> tuple:
    """A plan entry: (fn, args, positions of input-batch placeholders in args)."""
    return fn, args, tuple(i for i, a in enumerate(args) if isinstance(a, _XRef))


def _run(entries, x: np.ndarray) -> None:
    for fn, args, xpos in entries:
        if xpos:
            args = list(args)
            for i in xpos:
                r = args[i]
                args[i] = x[r.a:r.b].reshape(r.shape)
        fn(*args)


@dataclass
class _Plan:
    forward: list
    logits: np.ndarray
    probs: np.ndarray
    dlogits: np.ndarray
    backward: list


@dataclass
class _LayerGrads:
    rows: Optional[np.ndarray]
    dw: Optional[np.ndarray]
    db: Optional[np.ndarray]
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
    """SGD on ``subset`` of ``model``'s parameters (updates the model's arrays in place)."""

    def __init__(self, model: Model, subset: Optional[Subset] = None, lr: float = 0.05, momentum: float = 0.0,
                 weight_decay: float = 0.0, seed: int = 0, prefix_chunk: int = 8):
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
        self.prefix_chunk = int(prefix_chunk)  # samples per pass through the frozen layers
        self.rng = np.random.default_rng(seed)
        self.arena = Arena()
        self.first = self.subset.earliest_layer_index(model)
        if self.first is None:
            raise ValueError("the subset trains nothing")
        self._grads: Dict[str, _LayerGrads] = {}
        self._alloc_grads()
        self._plan_buffers()
        self._scopes = [Scope(self, i, layer) for i, layer in enumerate(model.layers)]
        self._plans: Dict[int, _Plan] = {}
        self._workspace_peak = 0

    # -- planning ------------------------------------------------------------------------------
    def _alloc_grads(self) -> None:
        for layer in self.model.param_layers:
            ls = self.subset.get(layer.name)
            if ls is None:
                continue
            full = ls.rows.size == layer.weight.shape[0]
            rows = None if full else (ls.rows if ls.rows.size else None)
            dw = (self.arena.get((layer.name, "dw"), (ls.rows.size,) + layer.weight.shape[1:], np.float32, "gradients")
                  if ls.rows.size else None)
            db = self.arena.get((layer.name, "db"), layer.bias.shape, np.float32, "gradients") if ls.bias else None
            g = _LayerGrads(rows, dw, db)
            if self.momentum:
                g.vw = self.arena.get((layer.name, "vw"), dw.shape, np.float32, "optimizer_state", zero=True) \
                    if dw is not None else None
                g.vb = self.arena.get((layer.name, "vb"), db.shape, np.float32, "optimizer_state", zero=True) \
                    if db is not None else None
            self._grads[layer.name] = g

    def _trains_weight(self, layer: Layer) -> bool:
        ls = self.subset.get(layer.name)
        return ls is not None and ls.rows.size > 0

    def _plan_buffers(self) -> None:
        """Decide, once, where every layer's output lives during a step.

        - An activation right after a layer that does not need its own output runs in place
          (its input is nobody else's business), so the pair costs one buffer.
        - keep[i]: the buffer holding layer i's output must survive until backward: an
          activation's output, or the input of a layer whose weight rows train.
        - Everything else goes to two reused scratch buffers.
        """
        layers = self.model.layers
        n_layers = len(layers)
        self._inplace = [False] * n_layers
        owner = list(range(n_layers))  # the layer whose buffer holds layer i's output
        prev = None
        for i, layer in enumerate(layers):
            if layer.kind in VIEW_KINDS:
                if prev is not None:
                    owner[i] = owner[prev]
                continue
            if layer.saves_output and prev is not None and not layers[prev].saves_output:
                self._inplace[i] = True
                owner[i] = owner[prev]
            prev = i
        keep = [False] * n_layers
        for i, layer in enumerate(layers):
            if i >= self.first and layer.saves_output:
                keep[owner[i]] = True
            if self.first <= i + 1 < n_layers and layers[i + 1].saves_input(self._trains_weight(layers[i + 1])):
                keep[owner[i]] = True
        self._keep_out = keep
        self._owner = owner

    # -- one step ------------------------------------------------------------------------------
    def step(self, x: np.ndarray, labels: np.ndarray) -> float:
        """One SGD step on a batch; returns the batch's mean loss before the update."""
        loss = self._forward_backward(x, labels)
        self._apply_update()
        return loss

    def gradients(self, x: np.ndarray, labels: np.ndarray) -> Tuple[float, Dict[str, np.ndarray]]:
        """(mean loss, gradients of the subset's tensors) on a batch, without updating anything.

        Keys and shapes follow ``Subset.tensors``: "layer.weight" -> [rows, row_size] for the
        selected rows, "layer.bias" -> [1, out]. The arrays are copies.
        """
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

    def _forward_backward(self, x: np.ndarray, labels: np.ndarray) -> float:
        n = x.shape[0]
        x = self.model.check_input(x)
        labels = np.ascontiguousarray(labels, dtype=np.int32)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
        plan = self._plans.get(n)
        if plan is None:
            self._build_plan(n)  # a first pass grows every scratch buffer to its final size,
            plan = self._plans[n] = self._build_plan(n)  # so the plan's views all see final memory
        K.reset_workspace_peak()
        base = K.workspace_current_bytes()
        _run(plan.forward, x)
        loss = K.softmax_xent_forward(plan.logits, labels, plan.probs)
        K.softmax_xent_backward(plan.probs, labels, plan.dlogits, 1.0 / n)
        _run(plan.backward, x)
        self._workspace_peak = max(self._workspace_peak, K.workspace_peak_bytes() - base)
        return float(loss)

    def _build_plan(self, n: int) -> "_Plan":
        """The step for batch size n as a list of kernel calls over fixed buffers.

        Decided once per batch size, so a step is a tight loop of calls: which buffer every
        layer reads and writes, what is kept, where gradients go. The input batch appears as
        ``_XRef`` placeholders, filled in when the plan runs.
        """
        arena, shapes, layers = self.arena, self.model.shapes, self.model.layers
        forward: list = []
        x = _XRef(0, n, (n,) + shapes[0])
        inputs: List[object] = [None] * len(layers)
        outputs: List[object] = [None] * len(layers)
        h = self._plan_prefix(x, n, forward) if self.first > 0 else x
        h_slot = None  # which scratch buffer holds h (None: a kept buffer, the prefix output or x)
        for i in range(self.first, len(layers)):
            layer = layers[i]
            out_shape = (n,) + shapes[i + 1]
            inputs[i] = h
            if layer.kind in VIEW_KINDS:
                h = h.reshape(out_shape)
            else:
                slot = h_slot
                if self._inplace[i]:
                    y = h
                elif self._keep_out[i]:
                    y, slot = arena.get((i, "out"), out_shape, np.float32, "activations"), None
                else:
                    slot = 1 if h_slot == 0 else 0
                    y = arena.scratch(("fwd", slot), out_shape)
                forward.append(_call(layer.forward, h, y, self._scopes[i]))
                h, h_slot = y, slot
            outputs[i] = h

        probs = arena.get(("loss", "probs"), h.shape, np.float32, "activations")
        backward: list = []
        dy_slot = 0
        dlogits = dy = arena.scratch(("bwd", dy_slot), h.shape)
        for i in range(len(layers) - 1, self.first - 1, -1):
            layer = layers[i]
            in_shape = (n,) + shapes[i]
            if layer.kind in VIEW_KINDS:
                dy = dy.reshape(in_shape)
                continue
            dx = None
            if i > self.first:
                if self._inplace[i]:  # elementwise: the gradient can overwrite itself
                    dx = dy.reshape(in_shape)
                else:
                    dy_slot ^= 1
                    dx = arena.scratch(("bwd", dy_slot), in_shape)
            backward.append(_call(layer.backward,
                                  inputs[i] if layer.saves_input(self._trains_weight(layer)) else None,
                                  outputs[i] if layer.saves_output else None, dy, dx, self._scopes[i]))
            dy = dx
        return _Plan(forward, h, probs, dlogits, backward)

    def _plan_prefix(self, x: "_XRef", n: int, forward: list) -> object:
        """Layers below the earliest trainable one, in inference mode, a few samples at a time.

        Nothing of theirs is needed by backward, so only their final output is held for the
        whole batch; their intermediate values need scratch for ``prefix_chunk`` samples only.
        """
        layers, shapes = self.model.layers, self.model.shapes
        out_shape = (n,) + shapes[self.first]
        real = [j for j in range(self.first) if layers[j].kind not in VIEW_KINDS]
        if not real:
            return x.reshape(out_shape)
        last = real[-1]
        category = "activations" if self._keep_out[self._owner[last]] else "workspace"
        out = self.arena.get(("prefix", "out"), out_shape, np.float32, category)
        chunk = self.prefix_chunk
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            h, h_slot = _XRef(a, b, (b - a,) + shapes[0]), None
            for j in range(self.first):
                layer, shape = layers[j], (b - a,) + shapes[j + 1]
                if layer.kind in VIEW_KINDS:
                    h = h.reshape(shape)
                    continue
                slot = h_slot
                if j == last:
                    y = out[a:b].reshape(shape)
                elif self._inplace[j]:
                    y = h
                else:
                    slot = 1 if h_slot == 0 else 0
                    y = self.arena.scratch(("prefix", slot), shape)
                forward.append(_call(layer.forward, h, y, None))
                h, h_slot = y, slot
        return out

    def _apply_update(self) -> None:
        for layer in self.model.param_layers:
            g = self._grads.get(layer.name)
            if g is None:
                continue
            if g.dw is not None:
                rows_n = layer.weight.shape[0]
                K.sgd_update_rows(layer.weight.reshape(rows_n, -1), g.rows, g.dw.reshape(g.dw.shape[0], -1),
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
        frozen = trainable = 0
        for layer in self.model.param_layers:
            ls = self.subset.get(layer.name)
            row_bytes = layer.weight.nbytes // layer.weight.shape[0]
            trained_rows = 0 if ls is None else ls.rows.size
            trainable += trained_rows * row_bytes
            frozen += (layer.weight.shape[0] - trained_rows) * row_bytes
            if ls is not None and ls.bias:
                trainable += layer.bias.nbytes
            else:
                frozen += layer.bias.nbytes
        by_cat = self.arena.bytes_by_category()
        return MemoryRecord(frozen_weights=frozen, trainable_weights=trainable, gradients=by_cat["gradients"],
                            optimizer_state=by_cat["optimizer_state"], activations=by_cat["activations"],
                            workspace=by_cat["workspace"] + self._workspace_peak)
