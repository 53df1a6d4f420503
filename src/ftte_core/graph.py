"""The model: a graph of layers (a DAG), each with its forward and backward on the C++ kernels.

Shapes are per sample (no batch dimension) unless a name says otherwise. Every array that
reaches a kernel is float32 and C-contiguous. Training-time buffers are not owned by layers:
the trainer hands each layer an ``Arena`` scope to take them from, so one step's memory can be
counted by category (see ``trainer.py``).
"""
from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _kernels as K

if TYPE_CHECKING:  # the trainer imports this module
    from .trainer import Scope

Shape = Tuple[int, ...]


def _pool_out(size: int, k: int, s: int, pad_begin: int, pad_end: int, ceil_mode: bool) -> int:
    span = size + pad_begin + pad_end - k
    if span < 0:
        raise ValueError(f"pooling window {k} is larger than the padded input {size + pad_begin + pad_end}")
    out = (-(-span // s) if ceil_mode else span // s) + 1
    # ONNX/PyTorch rule: with ceil_mode the last window must start inside the input or left pad.
    if ceil_mode and (out - 1) * s >= size + pad_begin:
        out -= 1
    return out


F32 = 4


class Layer:
    """One node of the graph. Subclasses set ``kind`` and implement the shape algebra and passes.

    A node takes ``arity`` graph tensors (0: any number, as Concat) and writes one. Single-input
    layers see ``forward(x, y, scope)`` / ``backward(x, y, dy, dx, scope)``; multi-input layers
    get lists in place of x and dx (``None`` entries where a value or gradient is not needed).
    """

    kind = "layer"
    has_params = False
    arity = 1
    #: backward needs this layer's output (activations compute their gradient from it)
    saves_output = False
    #: output has the input's shape, element i depends on input element i only, and the kernel
    #: accepts y = x and dx = dy: the step may run it in place when nobody else needs its input
    elementwise = False
    #: backward can work from the output instead of ``saved_buffers``: when another layer's
    #: backward keeps the output anyway, the step runs forward without a scope (nothing saved)
    #: and passes the output to backward
    output_replaces_saved = False
    #: the first input's gradient is the output's, unchanged (a + b, a - b): backward may hand
    #: the buffer over instead of copying it
    passes_first_gradient = False
    #: in a training step, backward updates this layer's trained parameters itself, tile by tile
    #: from a fused kernel (``scope.sgd``), with no gradient buffer; other parameter layers get
    #: their gradients in a short-lived buffer (``scope.grad_buffers``) and call
    #: ``scope.apply_grads`` after their kernels
    fuses_update = False

    def __init__(self, name: str):
        self.name = name

    # -- shape algebra -------------------------------------------------------------------------
    def out_shape(self, *in_shapes: Shape) -> Shape:
        return in_shapes[0]

    def flops(self, *in_shapes: Shape) -> int:
        """Forward multiply-adds x2 per sample (elementwise layers count one per element)."""
        return int(np.prod(self.out_shape(*in_shapes)))

    def params(self) -> Dict[str, np.ndarray]:
        """Trainable arrays: ``weight`` (rows = output units) and ``bias``."""
        return {}

    def constants(self) -> Dict[str, np.ndarray]:
        """Frozen arrays the layer carries besides its parameters (batch-norm statistics, a
        constant operand); saved with the model, never trained."""
        return {}

    def saves_input(self, trains: bool) -> bool:
        """Backward needs this layer's input (only layers whose weights train)."""
        return False

    def needs(self, trains: bool, dx_needed: Sequence[bool]) -> Tuple[Tuple[bool, ...], bool]:
        """(which inputs backward reads, whether it reads the output), given whether this
        layer's weight rows train and which input gradients are wanted."""
        return (self.saves_input(trains),) * len(dx_needed), self.saves_output

    def saved_buffers(self, n: int, in_shapes: Sequence[Shape], out_shape: Shape) -> Dict[str, tuple]:
        """Buffers forward fills for backward besides inputs and output: name -> (shape, dtype)."""
        return {}

    def forward_scratch(self, n: int, in_shapes: Sequence[Shape], threads: int) -> int:
        """Kernel scratch bytes of one forward call on n samples."""
        return 0

    def backward_scratch(self, n: int, in_shapes: Sequence[Shape], rows: Optional[np.ndarray], bias: bool,
                         dx_needed: Sequence[bool], threads: int, fused_update: bool = False) -> int:
        """Kernel scratch bytes of this layer's backward (``rows``: trained weight rows or None;
        ``fused_update``: the training step's fused backward-and-update call, see ``fuses_update``)."""
        return 0

    # -- passes --------------------------------------------------------------------------------
    def forward(self, x, y: np.ndarray, scope: "Optional[Scope]" = None) -> None:
        """Compute y from x (both batch-first). With a training scope, save what backward needs."""
        raise NotImplementedError

    def backward(self, x, y: Optional[np.ndarray], dy: np.ndarray, dx, scope: "Scope") -> None:
        """Given dL/dy, write dL/dx (where dx is given) and this layer's gradients (into scope)."""
        raise NotImplementedError

    @property
    def weight_shape(self) -> Shape:
        """The weight's shape (whatever its storage)."""
        return tuple(self.weight.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def quantize_rows(w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one float32 scale per output row (row = ``w[r]``, flattened):
    scale = max|row| / 127, q = round-to-nearest(row / scale) in [-127, 127]; an all-zero row
    gets scale 0. Done a block of rows at a time, so the float temporaries stay small."""
    w = np.asarray(w, dtype=np.float32)
    flat = w.reshape(w.shape[0], -1)
    q = np.empty(flat.shape, np.int8)
    scale = np.empty(flat.shape[0], np.float32)
    block = max(1, 65536 // max(1, flat.shape[1]))
    for a in range(0, flat.shape[0], block):
        rows = flat[a:a + block]
        s = (np.max(np.abs(rows), axis=1) / np.float32(127.0)).astype(np.float32)
        scale[a:a + block] = s
        inv = np.divide(np.float32(1.0), s, out=np.zeros_like(s), where=s > 0)
        q[a:a + block] = np.clip(np.rint(rows * inv[:, None]), -127, 127).astype(np.int8)
    return q.reshape(w.shape), scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32(q) * scale, row by row, in float32: the one operation that turns int8 levels into
    values wherever values must agree bit for bit (the hub's quantised start, the model file's
    int8-stored trained rows, ``exact_int8_rows``' check)."""
    w = np.asarray(q).astype(np.float32)
    w *= np.asarray(scale, dtype=np.float32).reshape((-1,) + (1,) * (w.ndim - 1))
    return w


def round_trip_rows(w: np.ndarray) -> np.ndarray:
    """``w``'s rows as the int8 quantiser keeps them (``quantize_rows`` then ``dequantize_rows``)."""
    return dequantize_rows(*quantize_rows(w))


#: float32 steps (ulps) either side of max|row| / 127 that ``exact_int8_rows`` tries as a scale
_SCALE_NEIGHBOURS = (0, -1, 1, -2, 2, -3, 3)


def exact_int8_rows(w: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scale, exact) with ``dequantize_rows(q[r], scale[r])`` equal bit for bit to row ``w[r]``
    wherever ``exact[r]``; other rows' q and scale are meaningless (store them as float32).

    A row that was ``round_trip_rows``' output is exact, but its scale is not always recovered by
    computing max|row| / 127 again (the product max|q| * s was rounded to float32, then divided
    and rounded again), so the float32 neighbours of that estimate are tried too. Levels come
    from round(row / s); every candidate is verified, never assumed."""
    w = np.asarray(w, dtype=np.float32)
    o = w.shape[0]
    flat = w.reshape(o, -1)
    want = flat.view(np.uint32)
    q = np.zeros(flat.shape, np.int8)
    scale = np.zeros(o, np.float32)
    exact = np.zeros(o, bool)
    if flat.shape[1] == 0 or o == 0:
        return q.reshape(w.shape), scale, np.ones(o, bool)
    finite = np.all(np.isfinite(flat), axis=1)
    base = (np.max(np.abs(np.where(finite[:, None], flat, 0)), axis=1) / np.float32(127.0)).astype(np.float32)
    for k in _SCALE_NEIGHBOURS:
        todo = np.flatnonzero(~exact & finite)
        if not todo.size:
            break
        s = base[todo]
        for _ in range(abs(k)):
            s = np.nextafter(s, np.float32(np.inf if k > 0 else -np.inf)).astype(np.float32)
        s = np.where(s < 0, np.float32(0), s).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            levels = np.where(s[:, None] > 0, np.rint(flat[todo] / s[:, None]), 0)
        ok = np.all(np.abs(levels) <= 127, axis=1)
        cand = np.clip(levels, -127, 127).astype(np.int8)
        ok &= np.all(dequantize_rows(cand, s).view(np.uint32) == want[todo], axis=1)
        hit = todo[ok]
        q[hit], scale[hit], exact[hit] = cand[ok], s[ok], True
    return q.reshape(w.shape), scale, exact


def _row_slots(o: int, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(row_slot, frozen row indices) of a mixed weight of ``o`` rows whose ``rows`` train (see
    ``_Int8Weight``: slot >= 0 a trained row's place, < 0 ``~`` a frozen row's place)."""
    slot = np.empty(o, np.int32)
    frozen = np.ones(o, bool)
    frozen[rows] = False
    slot[rows] = np.arange(rows.size, dtype=np.int32)
    frozen_idx = np.flatnonzero(frozen)
    slot[frozen_idx] = ~np.arange(frozen_idx.size, dtype=np.int32)
    return slot, frozen_idx


class StoredWeight:
    """A weight as ``_Int8Weight`` stores it, for building a layer without a float32 copy (a model
    file that carries int8 storage, ``modelfile``): ``q`` int8 and ``scale`` float32 [rows of q],
    plus, for the mixed form, ``trained_rows`` (int32, unique, sorted or not) and ``trained``
    (float32 [len(trained_rows), ...]). ``shape`` is the whole weight's. Checked on construction
    (one-line ValueError): shapes agree, scales finite and >= 0, rows unique and in range, values finite."""

    def __init__(self, shape: Sequence[int], q: np.ndarray, scale: np.ndarray,
                 trained_rows: Optional[np.ndarray] = None, trained: Optional[np.ndarray] = None):
        self.shape = tuple(int(d) for d in shape)
        o, rest = self.shape[0], self.shape[1:]
        rows = None if trained_rows is None else np.ascontiguousarray(trained_rows, dtype=np.int32).reshape(-1)
        r = 0 if rows is None else rows.size
        if (trained is None) != (rows is None):
            raise ValueError("a mixed weight needs both its trained rows and their values")
        if q.dtype != np.int8 or tuple(q.shape) != (o - r,) + rest:
            raise ValueError(f"int8 rows have shape {tuple(q.shape)} ({q.dtype}), expected {(o - r,) + rest} (int8)")
        if scale.dtype != np.float32 or tuple(scale.shape) != (o - r,):
            raise ValueError(f"row scales have shape {tuple(scale.shape)}, expected {(o - r,)}")
        if not np.all(np.isfinite(scale)) or np.any(scale < 0):
            raise ValueError("row scales must be finite and >= 0")
        if q.size and int(q.min()) == -128:  # (min, not q == -128: no temporary the size of q)
            raise ValueError("int8 rows hold -128, outside the quantiser's [-127, 127]")
        if rows is not None:
            if r and (rows.min() < 0 or rows.max() >= o or np.unique(rows).size != r):
                raise ValueError(f"trained rows must be unique and in [0, {o})")
            if trained.dtype != np.float32 or tuple(trained.shape) != (r,) + rest:
                raise ValueError(f"trained rows have shape {tuple(trained.shape)}, expected {(r,) + rest} (float32)")
            if not np.all(np.isfinite(trained)):
                raise ValueError("trained rows hold NaN or Inf")
        self.q, self.scale, self.trained_rows, self.trained = q, scale, rows, trained

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _Int8Weight:
    """Weight storage for Dense and Conv: float32 ``weight``; or -- once ``quantize_weight`` ran
    (``Trainer(..., frozen="int8")`` does it for layers whose weight rows do not train) --
    ``weight_q`` (int8, the weight's shape) and ``weight_scale`` (float32, one per output row),
    with the float array released; or *mixed* -- once ``mix_weight(rows)`` ran (``frozen="int8"``
    on a layer of which only some rows train) -- the frozen rows as int8 (``weight_q`` [O-R, ...],
    ``weight_scale`` [O-R], the same per-row quantisation) and the trained rows ``trained_rows``
    (int32 [R]) as float32 ``weight_trained`` [R, ...] in that order, ``row_slot`` (int32 [O])
    naming each row's place (>= 0: a ``weight_trained`` row, < 0: ``weight_q`` row ``~slot``),
    the float array again released. The kernels take the int8 and mixed forms directly
    (dequantised while packing GEMM panels), so forward, predict and the backward through the
    layer (dx) use them, and a mixed layer's fused SGD updates ``weight_trained`` in place.

    Reading ``weight`` of an int8 or mixed layer gives a dequantised, read-only float32 copy
    (export, ``Model.state``, saving): values are what the kernels compute with. Assigning
    ``weight`` stores float32 again (and drops the int8 / mixed form)."""

    int8_capable = True
    weight_q: Optional[np.ndarray] = None
    weight_scale: Optional[np.ndarray] = None
    weight_trained: Optional[np.ndarray] = None
    trained_rows: Optional[np.ndarray] = None
    row_slot: Optional[np.ndarray] = None

    @property
    def weight(self) -> np.ndarray:
        if self._weight is not None:
            return self._weight
        if self.is_mixed:
            w = np.empty(self.weight_shape, np.float32)
            frozen = self.row_slot < 0
            w[frozen] = self.weight_q
            w[frozen] *= self.weight_scale.reshape((-1,) + (1,) * (w.ndim - 1))
            w[self.trained_rows] = self.weight_trained
        else:
            w = self.weight_q.astype(np.float32)
            w *= self.weight_scale.reshape((-1,) + (1,) * (w.ndim - 1))
        w.flags.writeable = False
        return w

    @weight.setter
    def weight(self, value) -> None:
        if isinstance(value, StoredWeight):  # int8 or mixed storage as given, no float copy
            self._weight = None
            self.weight_q, self.weight_scale = value.q, value.scale
            self.weight_trained = self.trained_rows = self.row_slot = None
            if value.trained_rows is not None:
                slot, _ = _row_slots(value.shape[0], value.trained_rows)
                self.weight_trained, self.trained_rows, self.row_slot = value.trained, value.trained_rows, slot
            return
        self._weight = value
        self.weight_q = self.weight_scale = None
        self.weight_trained = self.trained_rows = self.row_slot = None

    @property
    def is_int8(self) -> bool:
        """The whole weight is int8 (no row of it can train)."""
        return self._weight is None and self.weight_trained is None

    @property
    def is_mixed(self) -> bool:
        """Frozen rows int8, the rows ``trained_rows`` float32 (see the class docstring)."""
        return self.weight_trained is not None

    @property
    def weight_shape(self) -> Shape:
        if self._weight is not None:
            return tuple(self._weight.shape)
        if self.is_mixed:
            return (self.row_slot.size,) + tuple(self.weight_q.shape[1:])
        return tuple(self.weight_q.shape)

    def weight_arrays(self) -> List[np.ndarray]:
        """The arrays the weight is stored in (whatever its form), e.g. to count their bytes."""
        if self._weight is not None:
            return [self._weight]
        if self.is_mixed:
            return [self.weight_q, self.weight_scale, self.weight_trained, self.row_slot]
        return [self.weight_q, self.weight_scale]

    def quantize_weight(self) -> None:
        """Hold the weight as int8 + per-row scales from now on (idempotent)."""
        if self.is_mixed:
            self._weight = np.array(self.weight)  # trained rows exact, then all of it quantised
        if not self.is_int8:
            self.weight_q, self.weight_scale = quantize_rows(self._weight)
            self._weight = None
            self.weight_trained = self.trained_rows = self.row_slot = None

    def mix_weight(self, rows: np.ndarray) -> None:
        """Hold rows ``rows`` (unique, in [0, O)) as float32 in that order, the others as int8 with
        per-row scales, the float array released. From an int8 or mixed weight the values are the
        dequantised ones (a mixed layer already holding exactly ``rows`` stays as it is)."""
        rows = np.ascontiguousarray(rows, dtype=np.int32).reshape(-1)
        o = self.weight_shape[0]
        if rows.size and (rows.min() < 0 or rows.max() >= o or np.unique(rows).size != rows.size):
            raise ValueError(f"{self.name}: mixed rows must be unique and in [0, {o})")
        if self.is_mixed and np.array_equal(rows, self.trained_rows):
            return
        full = self.weight  # float32: the array itself, or a dequantised copy
        slot, frozen_idx = _row_slots(o, rows)
        trained = np.ascontiguousarray(full[rows], dtype=np.float32)
        q = np.empty((frozen_idx.size,) + tuple(full.shape[1:]), np.int8)
        scale = np.empty(frozen_idx.size, np.float32)
        block = max(1, 65536 // max(1, int(np.prod(full.shape[1:]))))  # no whole float copy of the frozen rows
        for a in range(0, frozen_idx.size, block):
            q[a:a + block], scale[a:a + block] = quantize_rows(full[frozen_idx[a:a + block]])
        del full
        self._weight = None
        self.weight_q, self.weight_scale = q, scale
        self.weight_trained, self.trained_rows, self.row_slot = trained, rows, slot

    def _kernel_weight(self) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """(w, extra kernel kwargs): the float weight, the int8 one with its scales, or the mixed
        one (int8 frozen rows with their scales, the trained rows and the slot table)."""
        if self.is_mixed:
            return self.weight_q, {"w_scale": self.weight_scale, "w_trained": self.weight_trained,
                                   "row_slot": self.row_slot}
        if self.is_int8:
            return self.weight_q, {"w_scale": self.weight_scale}
        return self._weight, {}


def _trainable(a) -> np.ndarray:
    """``a`` as an array the kernels may update in place: float32, C-contiguous, aligned, writable
    and owning its memory. Anything else is copied: ONNX initializers and model files arrive as
    read-only views of the file's bytes, and training writes into the weights."""
    arr = np.asarray(a)
    f = arr.flags
    if arr.dtype == np.float32 and f.owndata and f.writeable and f.c_contiguous and f.aligned:
        return arr
    return np.array(arr, dtype=np.float32, order="C", copy=True)


def _weight_and_bias(name: str, weight, bias, ndim, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """Trainable float32 arrays (see ``_trainable``); a missing bias is zeros (every weight layer
    has one to train). A ``StoredWeight`` is kept as it is (the layer takes its storage)."""
    w = weight if isinstance(weight, StoredWeight) else _trainable(weight)
    if w.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name}: {what}, got shape {w.shape}")
    rows = w.shape[0]
    b = np.zeros(rows, np.float32) if bias is None else _trainable(np.asarray(bias).reshape(-1))
    if b.shape != (rows,):
        raise ValueError(f"{name}: bias has {b.size} entries, weight has {rows} output rows")
    return w, b


def _separate_bias(rows, db) -> bool:
    """Only some weight rows train but the bias trains whole: its gradient needs a call of its own."""
    return rows is not None and db is not None


class Dense(_Int8Weight, Layer):
    kind = "dense"
    has_params = True

    def __init__(self, name: str, weight: np.ndarray, bias: Optional[np.ndarray] = None):
        super().__init__(name)
        self.weight, self.bias = _weight_and_bias(name, weight, bias, 2, "dense weight must be 2-D [out, in]")

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    def out_shape(self, in_shape: Shape) -> Shape:
        if tuple(in_shape) != (self.in_features,):
            raise ValueError(f"{self.name}: expects input of {self.in_features} features, got shape {tuple(in_shape)}")
        return (self.out_features,)

    def flops(self, in_shape: Shape) -> int:
        return 2 * self.in_features * self.out_features

    def params(self) -> Dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    def saves_input(self, trains: bool) -> bool:
        return trains

    def forward_scratch(self, n, in_shapes, threads, int8=False):
        return K.sgemm_scratch_bytes(n, self.out_features, self.in_features, False, True, int8_b=int8)

    fuses_update = True  # when its weight is float32 or mixed (an int8 weight never trains; its bias may)

    def backward_scratch(self, n, in_shapes, rows, bias, dx_needed, threads, int8=False, fused_update=False):
        o, f = self.out_features, self.in_features
        r = int(rows.size)
        if fused_update:  # int8 here: the weight is mixed
            return K.dense_backward_sgd_scratch_bytes(n, f, o, r, 0 < r < o, bool(bias), bool(dx_needed[0]),
                                                      int8_weight=int8)
        peak = K.sgemm_scratch_bytes(r, f, n, True, False, r < o) if r else 0
        if bias:
            peak = max(peak, F32 * (r if 0 < r == o else o))
        if dx_needed[0]:
            peak = max(peak, K.sgemm_scratch_bytes(n, f, o, False, False, int8_b=int8))
        return peak

    def forward(self, x, y, scope=None):
        w = self._weight
        if w is not None:  # float32: the common case, without _kernel_weight's property lookups
            K.dense_forward(x, w, self.bias, y)
            return
        w, wkw = self._kernel_weight()
        K.dense_forward(x, w, self.bias, y, **wkw)

    def backward(self, x, y, dy, dx, scope):
        w = self._weight
        if w is not None:  # float32 (updated in place): the common case, kept short (it runs every step)
            sgd = scope.sgd(self)
            if sgd is not None:
                K.dense_backward_sgd(x, w, self.bias, dy, sgd.rows, dx, sgd.bias, sgd.vw, sgd.vb, sgd.lr,
                                     sgd.momentum, sgd.weight_decay)
                return
        elif not self.is_int8:  # mixed: its trained rows are updated in place
            sgd = scope.sgd(self)
            if sgd is not None:
                w, wkw = self._kernel_weight()
                K.dense_backward_sgd(x, w, self.bias, dy, sgd.rows, dx, sgd.bias, sgd.vw, sgd.vb, sgd.lr,
                                     sgd.momentum, sgd.weight_decay, **wkw)
                return
        rows, dw, db = scope.grad_buffers(self)
        w, wkw = self._kernel_weight()
        acc = scope.accumulate
        if _separate_bias(rows, db):
            K.dense_backward(None, w, dy, None, None, db, None, acc, **wkw)
            db = None
        K.dense_backward(x, w, dy, rows, dw, db, dx, acc, **wkw)
        scope.apply_grads(self)


def _conv_mode(group: int, in_channels: int, weight_shape: Shape) -> str:
    if group == 1:
        return "dense"
    if group == in_channels and weight_shape[1] == 1:
        return "depthwise"
    return "grouped"


class Conv2d(_Int8Weight, Layer):
    """ONNX Conv on [C, H, W]: ``group`` 1 (im2col + GEMM), C (depthwise, a direct kernel, with a
    channel multiplier OC/C) or anything dividing C and OC (grouped)."""

    kind = "conv2d"
    has_params = True
    dims = 2

    def __init__(self, name: str, weight: np.ndarray, bias: Optional[np.ndarray] = None,
                 stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0, 0, 0), group: int = 1):
        super().__init__(name)
        nd = self.dims + 2
        self.weight, self.bias = _weight_and_bias(
            name, weight, bias, nd, f"conv weight must be {nd}-D [out_ch, in_ch/group{', kh, kw' if self.dims == 2 else ', k'}]")
        self.stride = tuple(int(s) for s in stride)
        self.padding = tuple(int(p) for p in padding)  # ONNX order: begins then ends
        self.group = int(group)
        if (len(self.stride) != self.dims or len(self.padding) != 2 * self.dims or min(self.stride) < 1
                or min(self.padding) < 0):
            raise ValueError(f"{name}: bad stride {self.stride} or padding {self.padding}")
        if self.group < 1 or self.weight_shape[0] % self.group:
            raise ValueError(f"{name}: group {self.group} does not divide the {self.weight_shape[0]} output channels")
        if self.is_mixed and self.group != 1:
            raise ValueError(f"{name}: a grouped convolution cannot hold mixed int8/float32 rows")

    # 2-D views of the geometry (a 1-D conv is a 2-D one of height 1)
    def _w4(self, w: np.ndarray) -> np.ndarray:
        return w

    @property
    def stride2(self) -> Tuple[int, int]:
        return self.stride

    @property
    def padding2(self) -> Tuple[int, int, int, int]:
        return self.padding

    @property
    def weight_shape2(self) -> Shape:
        s = self.weight_shape
        return s if len(s) == 4 else (s[0], s[1], 1, s[-1])

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1] * self.group

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def mode(self) -> str:
        return _conv_mode(self.group, self.in_channels, self.weight_shape)

    def _in4(self, in_shape: Shape) -> Shape:
        return tuple(in_shape)

    def out_shape(self, in_shape: Shape) -> Shape:
        c = self.in_channels
        if len(in_shape) != self.dims + 1 or in_shape[0] != c:
            raise ValueError(f"{self.name}: expects input [{c}, {'H, W' if self.dims == 2 else 'L'}], "
                             f"got shape {tuple(in_shape)}")
        _, h, w = self._in4(in_shape)
        oc, _, kh, kw = self.weight_shape2
        pt, pl, pb, pr = self.padding2
        oh = _pool_out(h, kh, self.stride2[0], pt, pb, False)
        ow = _pool_out(w, kw, self.stride2[1], pl, pr, False)
        return (oc, oh, ow) if self.dims == 2 else (oc, ow)

    def flops(self, in_shape: Shape) -> int:
        return 2 * int(np.prod(self.out_shape(in_shape))) * int(np.prod(self.weight_shape[1:]))

    def params(self) -> Dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    def saves_input(self, trains: bool) -> bool:
        return trains

    def _scratch(self, n, in_shape, threads, backward=False, rows=None, dw=True, db=True, dx=True, int8=False) -> int:
        """Scratch of one kernel call; ``rows`` the selected rows (None: all)."""
        x_shape, w_shape = (n,) + self._in4(in_shape), self.weight_shape2
        mode = self.mode
        if mode == "depthwise":
            return K.depthwise_conv2d_scratch_bytes(x_shape, w_shape, self.stride2, self.padding2, backward,
                                                    dw, dx, threads)
        if mode == "dense":
            if not backward:
                return K.conv2d_scratch_bytes(x_shape, w_shape, self.stride2, self.padding2, threads=threads,
                                              int8_weight=int8)
            return K.conv2d_scratch_bytes(x_shape, w_shape, self.stride2, self.padding2, backward=True,
                                          n_rows=None if rows is None else int(rows.size), dw=dw, dx=dx,
                                          threads=threads, int8_weight=int8)
        return K.grouped_conv2d_scratch_bytes(x_shape, w_shape, self.group, self.stride2, self.padding2, backward,
                                              rows, dw, db, dx, threads, int8_weight=int8)

    def forward_scratch(self, n, in_shapes, threads, int8=False):
        return self._scratch(n, in_shapes[0], threads, int8=int8)

    @property
    def fuses_update(self) -> bool:
        return self.mode == "dense"  # when its weight is float32, as for Dense

    def backward_scratch(self, n, in_shapes, rows, bias, dx_needed, threads, int8=False, fused_update=False):
        r, oc = int(rows.size), self.out_channels
        if fused_update and self.fuses_update:  # int8 here: the weight is mixed
            return K.conv2d_backward_sgd_scratch_bytes((n,) + self._in4(in_shapes[0]), self.weight_shape2,
                                                       self.stride2, self.padding2, r, bool(bias),
                                                       bool(dx_needed[0]), threads, int8_weight=int8)
        full = r == oc
        peak = 0
        if r or dx_needed[0]:  # the call for the weight rows (and the bias when it goes along) and dx
            peak = self._scratch(n, in_shapes[0], threads, backward=True, rows=rows if 0 < r < oc else None,
                                 dw=r > 0, db=bias and (full or r == 0), dx=bool(dx_needed[0]), int8=int8)
        if bias and 0 < r < oc:  # the whole bias, in a call of its own
            peak = max(peak, self._scratch(n, in_shapes[0], threads, backward=True, rows=None, dw=False, db=True,
                                           dx=False, int8=int8))
        return peak

    def _x4(self, x):
        return x

    def _kernel_weight4(self):
        """``_kernel_weight`` with the weight arrays as the 2-D kernels take them (``_w4``)."""
        w, wkw = self._kernel_weight()
        if "w_trained" in wkw:
            wkw = dict(wkw, w_trained=self._w4(wkw["w_trained"]))
        return self._w4(w), wkw

    def forward(self, x, y, scope=None):
        w, wkw = self._kernel_weight4()
        x, y = self._x4(x), self._x4(y)
        mode = self.mode
        if mode == "dense":
            K.conv2d_forward(x, w, self.bias, y, self.stride2, self.padding2, **wkw)
        elif mode == "depthwise":
            K.depthwise_conv2d_forward(x, w, self.bias, y, self.stride2, self.padding2, **wkw)
        else:
            K.grouped_conv2d_forward(x, w, self.bias, y, self.group, self.stride2, self.padding2, **wkw)

    def _backward_call(self, x, dy, rows, dw, db, dx, acc=False):
        w, wkw = self._kernel_weight4()
        mode = self.mode
        if mode == "dense":
            K.conv2d_backward(x, w, dy, rows, dw, db, dx, self.stride2, self.padding2, acc, **wkw)
        elif mode == "depthwise":
            K.depthwise_conv2d_backward(x, w, dy, rows, dw, db, dx, self.stride2, self.padding2, acc, **wkw)
        else:
            K.grouped_conv2d_backward(x, w, dy, rows, dw, db, dx, self.group, self.stride2, self.padding2, acc,
                                      **wkw)

    def backward(self, x, y, dy, dx, scope):
        x = None if x is None else self._x4(x)
        dy = self._x4(dy)
        dx = None if dx is None else self._x4(dx)
        sgd = scope.sgd(self) if self.fuses_update and not self.is_int8 else None
        if sgd is not None:
            w, wkw = self._kernel_weight4()  # float32 (updated in place) or mixed (its trained rows are)
            K.conv2d_backward_sgd(x, w, self.bias, dy, sgd.rows, dx, sgd.bias,
                                  None if sgd.vw is None else self._w4(sgd.vw), sgd.vb, sgd.lr, sgd.momentum,
                                  sgd.weight_decay, self.stride2, self.padding2, **wkw)
            return
        rows, dw, db = scope.grad_buffers(self)
        dw = None if dw is None else self._w4(dw)
        acc = scope.accumulate
        if _separate_bias(rows, db):
            self._backward_call(None, dy, None, None, db, None, acc)
            db = None
        self._backward_call(x, dy, rows, dw, db, dx, acc)
        scope.apply_grads(self)


class Conv1d(Conv2d):
    """ONNX Conv on [C, L] (weight [OC, C/group, K]): run as a 2-D conv of height 1, by reshapes."""

    kind = "conv1d"
    dims = 1

    def __init__(self, name, weight, bias=None, stride=(1,), padding=(0, 0), group=1):
        super().__init__(name, weight, bias, stride, padding, group)

    def _w4(self, w):
        return w.reshape(w.shape[0], w.shape[1], 1, w.shape[-1])

    @property
    def stride2(self):
        return (1, self.stride[0])

    @property
    def padding2(self):
        return (0, self.padding[0], 0, self.padding[1])

    def _in4(self, in_shape):
        return (in_shape[0], 1, in_shape[1])

    def _x4(self, x):
        return x.reshape(x.shape[0], x.shape[1], 1, x.shape[2])


class _Pool(Layer):
    dims = 2

    def __init__(self, name: str, kernel: Sequence[int], stride: Optional[Sequence[int]] = None,
                 padding: Optional[Sequence[int]] = None, ceil_mode: bool = False):
        super().__init__(name)
        self.kernel = tuple(int(k) for k in kernel)
        self.dims = len(self.kernel)
        self.stride = tuple(int(s) for s in (stride if stride is not None else kernel))
        self.padding = tuple(int(p) for p in (padding if padding is not None else (0,) * (2 * self.dims)))
        self.ceil_mode = bool(ceil_mode)
        if self.dims not in (1, 2) or len(self.stride) != self.dims or len(self.padding) != 2 * self.dims:
            raise ValueError(f"{name}: pooling needs a 1-D or 2-D kernel, a stride per axis and 2 pads per axis")
        if min(self.kernel) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"{name}: bad pooling kernel {self.kernel}, stride {self.stride} or padding {self.padding}")

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.base_kind if self.dims == 2 else self.base_kind.replace("2d", "1d")

    @property
    def kernel2(self):
        return self.kernel if self.dims == 2 else (1,) + self.kernel

    @property
    def stride2(self):
        return self.stride if self.dims == 2 else (1,) + self.stride

    @property
    def padding2(self):
        return self.padding if self.dims == 2 else (0, self.padding[0], 0, self.padding[1])

    def _x4(self, x):
        return x if self.dims == 2 else x.reshape(x.shape[0], x.shape[1], 1, x.shape[2])

    def out_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != self.dims + 1:
            raise ValueError(f"{self.name}: expects input [C, {'H, W' if self.dims == 2 else 'L'}], "
                             f"got shape {tuple(in_shape)}")
        c, h, w = in_shape if self.dims == 2 else (in_shape[0], 1, in_shape[1])
        pt, pl, pb, pr = self.padding2
        oh = _pool_out(h, self.kernel2[0], self.stride2[0], pt, pb, self.ceil_mode)
        ow = _pool_out(w, self.kernel2[1], self.stride2[1], pl, pr, self.ceil_mode)
        return (c, oh, ow) if self.dims == 2 else (c, ow)

    def flops(self, in_shape: Shape) -> int:
        return int(np.prod(self.out_shape(in_shape))) * int(np.prod(self.kernel))


class MaxPool2d(_Pool):
    base_kind = "maxpool2d"

    @property
    def argmax_dtype(self):
        """What a training step keeps per output: the max's position inside its window as one byte
        when the window has at most 256 cells, else its int32 index in the input plane."""
        return np.uint8 if math.prod(self.kernel) <= 256 else np.int32  # math.prod: ~7 us less per call than np.prod

    def saved_buffers(self, n, in_shapes, out_shape):
        return {"argmax": ((n,) + tuple(out_shape), self.argmax_dtype)}

    def forward(self, x, y, scope=None):
        argmax = scope.saved("argmax", y.shape, self.argmax_dtype) if scope is not None else None
        K.maxpool2d_forward(self._x4(x), self._x4(y), None if argmax is None else self._x4(argmax),
                            self.kernel2, self.stride2, self.padding2, self.ceil_mode)

    def backward(self, x, y, dy, dx, scope):
        argmax = scope.saved("argmax", dy.shape, self.argmax_dtype)
        K.maxpool2d_backward(self._x4(dy), self._x4(argmax), self._x4(dx), self.kernel2, self.stride2, self.padding2,
                             self.ceil_mode)

    # -- a ReLU fused in (plan.build): x is the ReLU's input, dx its input's gradient ---------------
    @property
    def fuses_relu(self) -> bool:
        """Can a ReLU whose only reader is this pool run inside it (``forward_relu``)? With window
        positions of at most 255 cells: 255 marks a window with no positive cell."""
        return self.argmax_dtype is np.uint8 and math.prod(self.kernel) <= 255

    def forward_relu(self, x, y, scope=None):
        """forward over relu(x), relu applied as the cells load: the ReLU's own pass over the
        larger map, and its mask, are not needed."""
        argmax = scope.saved("argmax", y.shape, np.uint8) if scope is not None else None
        K.maxpool2d_forward(self._x4(x), self._x4(y), None if argmax is None else self._x4(argmax),
                            self.kernel2, self.stride2, self.padding2, self.ceil_mode, relu=True)

    def backward_relu(self, x, y, dy, dx, scope):
        """backward then the ReLU's backward, bit for bit, in one pass."""
        argmax = scope.saved("argmax", dy.shape, np.uint8)
        K.maxpool2d_backward(self._x4(dy), self._x4(argmax), self._x4(dx), self.kernel2, self.stride2, self.padding2,
                             self.ceil_mode, relu=True)


class AvgPool2d(_Pool):
    base_kind = "avgpool2d"

    def __init__(self, name, kernel, stride=None, padding=None, ceil_mode=False, count_include_pad=False):
        super().__init__(name, kernel, stride, padding, ceil_mode)
        self.count_include_pad = bool(count_include_pad)

    def forward(self, x, y, scope=None):
        K.avgpool2d_forward(self._x4(x), self._x4(y), self.kernel2, self.stride2, self.padding2, self.ceil_mode,
                            self.count_include_pad)

    def backward(self, x, y, dy, dx, scope):
        K.avgpool2d_backward(self._x4(dy), self._x4(dx), self.kernel2, self.stride2, self.padding2, self.ceil_mode,
                             self.count_include_pad)


class GlobalAvgPool(Layer):
    """Mean over every axis after the channels: [C, H, W] or [C, L] to [C, 1, 1] / [C, 1], or to
    [C] with ``keepdims=False`` (ReduceMean over the spatial axes, as exporters write it)."""

    kind = "global_avgpool"

    def __init__(self, name: str, keepdims: bool = True):
        super().__init__(name)
        self.keepdims = bool(keepdims)

    def out_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) not in (2, 3):
            raise ValueError(f"{self.name}: expects input [C, H, W] or [C, L], got shape {tuple(in_shape)}")
        return (in_shape[0],) + ((1,) * (len(in_shape) - 1) if self.keepdims else ())

    def flops(self, in_shape: Shape) -> int:
        return int(np.prod(in_shape))

    @staticmethod
    def _x4(x):
        return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1]) if x.ndim == 3 else x

    def forward(self, x, y, scope=None):
        K.global_avgpool_forward(self._x4(x), y.reshape(y.shape[0], y.shape[1]))

    def backward(self, x, y, dy, dx, scope):
        K.global_avgpool_backward(dy.reshape(dy.shape[0], dy.shape[1]), self._x4(dx))


class BatchNorm(Layer):
    """Batch normalization with frozen (inference) statistics over axis 0 of [C], [C, L] or
    [C, H, W]. Scale and shift train like a layer's weight and bias: ``weight`` is the scale
    (one row per channel, so a subset may pick channels), ``bias`` the shift."""

    kind = "batchnorm"
    has_params = True

    def __init__(self, name: str, scale, shift, mean, var, eps: float = 1e-5):
        super().__init__(name)
        self.weight, self.bias = _weight_and_bias(name, scale, shift, 1, "batch-norm scale must be 1-D [C]")
        c = self.weight.shape[0]
        self.mean = np.ascontiguousarray(np.asarray(mean, np.float32).reshape(-1))
        self.var = np.ascontiguousarray(np.asarray(var, np.float32).reshape(-1))
        self.eps = float(eps)
        if self.mean.shape != (c,) or self.var.shape != (c,):
            raise ValueError(f"{name}: mean and var must have {c} entries like the scale, got {self.mean.size} "
                             f"and {self.var.size}")
        if not (np.isfinite(self.eps) and self.eps >= 0) or np.any(self.var + self.eps <= 0):
            raise ValueError(f"{name}: var + epsilon must be positive")

    @property
    def channels(self) -> int:
        return self.weight.shape[0]

    def out_shape(self, in_shape: Shape) -> Shape:
        if not 1 <= len(in_shape) <= 3 or in_shape[0] != self.channels:
            raise ValueError(f"{self.name}: expects input [{self.channels}, ...], got shape {tuple(in_shape)}")
        return tuple(in_shape)

    def flops(self, in_shape: Shape) -> int:
        return 2 * int(np.prod(in_shape))

    def params(self) -> Dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    def constants(self) -> Dict[str, np.ndarray]:
        return {"mean": self.mean, "var": self.var}

    def saves_input(self, trains: bool) -> bool:
        return trains  # only the scale's gradient reads x

    elementwise = True  # in place only when x is not kept, i.e. the scale does not train

    def forward(self, x, y, scope=None):
        K.batchnorm_forward(x, self.weight, self.bias, self.mean, self.var, self.eps, y)

    def backward(self, x, y, dy, dx, scope):
        rows, dw, db = scope.grad_buffers(self)
        acc = scope.accumulate
        if _separate_bias(rows, db):
            K.batchnorm_backward(None, self.weight, self.mean, self.var, self.eps, dy, None, None, db, None, acc)
            db = None
        if dw is not None or db is not None or dx is not None:
            K.batchnorm_backward(x, self.weight, self.mean, self.var, self.eps, dy, rows, dw, db, dx, acc)
        scope.apply_grads(self)


def _per_sample_constant(name: str, c, what: str) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(c, dtype=np.float32))
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: {what} holds NaN or Inf")
    return arr


def _broadcasts_onto(b: Shape, a: Shape) -> bool:
    """numpy's rule, with b no larger than a: b right-aligned, each dim equal or 1."""
    if len(b) > len(a):
        return False
    return all(db in (1, da) for db, da in zip(b[::-1], a[::-1]))


class Binary(Layer):
    """y = a (op) b for Add, Sub, Mul; b broadcasts onto a (numpy rules, batch axes aligned).

    With ``const`` the layer has one graph input and b is that frozen array (per-sample shape,
    or with a leading batch axis of 1); ``const_first`` means y = const (op) x (it matters for Sub).
    """

    has_params = False
    OPS = ("add", "sub", "mul")

    def __init__(self, name: str, op: str, const=None, const_first: bool = False):
        super().__init__(name)
        if op not in self.OPS:
            raise ValueError(f"{name}: unknown elementwise op {op!r}")
        self.op = op
        self.kind = op
        self.const = None if const is None else _per_sample_constant(name, const, "constant operand")
        self.const_first = bool(const_first)
        self.arity = 2 if const is None else 1
        self.elementwise = const is not None  # x + c, x * c, x - c and c - x may run in place
        self.passes_first_gradient = const is None and op in ("add", "sub")

    def constants(self) -> Dict[str, np.ndarray]:
        return {} if self.const is None else {"const": self.const}

    def _const_full(self, ndim: int) -> np.ndarray:
        c = self.const
        if c.ndim == ndim + 1:  # written with the batch axis (of 1)
            c = c.reshape(c.shape[1:])
        return c.reshape((1,) + c.shape)

    def out_shape(self, *in_shapes: Shape) -> Shape:
        a = tuple(in_shapes[0])
        if self.const is not None:
            c = self.const.shape
            if len(c) == len(a) + 1:
                if c[0] != 1:
                    raise ValueError(f"{self.name}: constant of shape {c} has a batch axis of {c[0]}, not 1")
                c = c[1:]
            if not _broadcasts_onto(c, a):
                raise ValueError(f"{self.name}: constant of shape {self.const.shape} does not broadcast onto "
                                 f"the input {a} without growing it")
            return a
        b = tuple(in_shapes[1])
        if len(b) != len(a) or not _broadcasts_onto(b, a):
            raise ValueError(f"{self.name}: {self.op} of shapes {a} and {b}: the second must broadcast onto the "
                             f"first (same rank, each axis equal or 1)")
        return a

    def flops(self, *in_shapes):
        return int(np.prod(in_shapes[0]))

    def needs(self, trains, dx_needed):
        if self.op == "mul" and self.const is None:
            # da = dy * b, db = sum(dy * a); the kernel reads b's shape even for db alone, and b is
            # usually small (a gate) or kept anyway (SiLU's sigmoid output)
            return (dx_needed[1], True), False
        return (False,) * len(dx_needed), False

    def forward(self, x, y, scope=None):
        if self.const is not None:
            c = self._const_full(x.ndim - 1)
            if self.op == "add":
                K.add_forward(x, c, y)
            elif self.op == "mul":
                K.mul_forward(x, c, y)
            elif self.const_first:
                np.subtract(c, x, out=y)
            else:
                np.subtract(x, c, out=y)
            return
        a, b = x
        if self.op == "add":
            K.add_forward(a, b, y)
        elif self.op == "mul":
            K.mul_forward(a, b, y)
        else:
            np.subtract(a, b, out=y)

    def backward(self, x, y, dy, dx, scope):
        if self.const is not None:
            if self.op == "mul":
                # dx = dy * const: the forward product (mul_backward needs an operand a it would not read)
                K.mul_forward(dy, self._const_full(dy.ndim - 1), dx)
            elif self.op == "sub" and self.const_first:
                np.negative(dy, out=dx)
            elif dx is not dy:
                np.copyto(dx, dy)
            return
        (a, b), (da, db) = x, dx
        if self.op == "mul":
            K.mul_backward(dy if a is None else a, b, dy, da, db)  # a is read only for db
            return
        K.add_backward(dy, None, da, db)
        if self.op == "sub" and db is not None:
            np.negative(db, out=db)


class Concat(Layer):
    """Concatenation of the inputs along the channel axis (axis 0 per sample)."""

    kind = "concat"
    arity = 0

    def out_shape(self, *in_shapes: Shape) -> Shape:
        first = tuple(in_shapes[0])
        if not first:
            raise ValueError(f"{self.name}: cannot concatenate scalars")
        for s in in_shapes[1:]:
            if len(s) != len(first) or tuple(s[1:]) != first[1:]:
                raise ValueError(f"{self.name}: inputs {[tuple(s) for s in in_shapes]} differ outside the channel axis")
        return (sum(int(s[0]) for s in in_shapes),) + first[1:]

    def flops(self, *in_shapes):
        return 0

    @staticmethod
    def _3d(a):
        return a.reshape(a.shape[0], a.shape[1], -1)

    def forward(self, x, y, scope=None):
        K.concat_forward([self._3d(a) for a in x], self._3d(y))

    def backward(self, x, y, dy, dx, scope):
        K.concat_backward(self._3d(dy), self._channels, [None if d is None else self._3d(d) for d in dx])

    def bind_shapes(self, in_shapes) -> None:
        self._channels = [int(s[0]) for s in in_shapes]


class _Activation(Layer):
    saves_output = True
    elementwise = True
    _forward = _backward = None

    def forward(self, x, y, scope=None):
        type(self)._forward(x, y)

    def backward(self, x, y, dy, dx, scope):
        type(self)._backward(y, dy, dx)


class ReLU(_Activation):
    """max(x, 0). A training step keeps one bit per element (x > 0) for backward, not the float
    output: 1/32 of the bytes, and the output's buffer is free for reuse (or the layer runs in
    place). When another layer's backward reads the output anyway (a Dense whose weights train),
    backward reads it and no mask is kept at all."""

    kind = "relu"
    saves_output = False
    output_replaces_saved = True  # y > 0 is the mask: no mask when a trained Dense keeps y anyway

    def saved_buffers(self, n, in_shapes, out_shape):
        return {"mask": (((n * int(np.prod(out_shape)) + 7) // 8,), np.uint8)}

    def forward(self, x, y, scope=None):
        if scope is not None:
            K.relu_forward_mask(x, y, scope.saved("mask", ((x.size + 7) // 8,), np.uint8))
        else:
            K.relu_forward(x, y)

    def backward(self, x, y, dy, dx, scope):
        if y is not None:  # the output is kept for another layer: it says the same as the mask
            K.relu_backward(y, dy, dx)
        else:
            K.relu_backward_mask(scope.saved("mask", ((dy.size + 7) // 8,), np.uint8), dy, dx)


class Sigmoid(_Activation):
    kind = "sigmoid"
    _forward = staticmethod(K.sigmoid_forward)
    _backward = staticmethod(K.sigmoid_backward)


class Tanh(_Activation):
    kind = "tanh"
    _forward = staticmethod(K.tanh_forward)
    _backward = staticmethod(K.tanh_backward)


class LeakyReLU(_Activation):
    kind = "leaky_relu"

    def __init__(self, name: str, alpha: float = 0.01):
        super().__init__(name)
        self.alpha = float(alpha)
        if not (np.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"{name}: LeakyRelu alpha must be a positive number, got {alpha}")

    def forward(self, x, y, scope=None):
        K.leaky_relu_forward(x, y, self.alpha)

    def backward(self, x, y, dy, dx, scope):
        K.leaky_relu_backward(y, dy, dx, self.alpha)


class HardSigmoid(_Activation):
    kind = "hard_sigmoid"

    def __init__(self, name: str, alpha: float = 0.2, beta: float = 0.5):
        super().__init__(name)
        self.alpha, self.beta = float(alpha), float(beta)
        if not (np.isfinite(self.alpha) and np.isfinite(self.beta)):
            raise ValueError(f"{name}: HardSigmoid alpha and beta must be finite")

    def forward(self, x, y, scope=None):
        K.hardsigmoid_forward(x, y, self.alpha, self.beta)

    def backward(self, x, y, dy, dx, scope):
        K.hardsigmoid_backward(y, dy, dx, self.alpha)


class Clip(_Activation):
    """min(max(x, lo), hi); ReLU6 is Clip(0, 6)."""

    kind = "clip"

    def __init__(self, name: str, lo: float = -np.inf, hi: float = np.inf):
        super().__init__(name)
        self.lo, self.hi = float(lo), float(hi)
        if np.isnan(self.lo) or np.isnan(self.hi) or self.lo > self.hi:
            raise ValueError(f"{name}: Clip bounds [{lo}, {hi}] are not an interval")

    def forward(self, x, y, scope=None):
        K.clip_forward(x, y, self.lo, self.hi)

    def backward(self, x, y, dy, dx, scope):
        K.clip_backward(y, dy, dx, self.lo, self.hi)


class HardSwish(Layer):
    """x * hardsigmoid(x) with ONNX's alpha 1/6 and beta 1/2; its gradient reads the input."""

    kind = "hard_swish"
    elementwise = True

    def needs(self, trains, dx_needed):
        return (True,), False

    def forward(self, x, y, scope=None):
        K.hardswish_forward(x, y)

    def backward(self, x, y, dy, dx, scope):
        K.hardswish_backward(x, dy, dx)


class Flatten(Layer):
    """[C, H, W] -> [C*H*W]; a view, no copy."""

    kind = "flatten"

    def out_shape(self, in_shape: Shape) -> Shape:
        return (int(np.prod(in_shape)),)

    def flops(self, in_shape: Shape) -> int:
        return 0

    def forward(self, x, y, scope=None):
        raise AssertionError("Flatten is a view; the model never calls its forward")

    def backward(self, x, y, dy, dx, scope):
        raise AssertionError("Flatten is a view; the model never calls its backward")


class Reshape(Flatten):
    """Any per-sample reshape that keeps the element count (Reshape, Squeeze, Unsqueeze); a view."""

    kind = "reshape"

    def __init__(self, name: str, shape: Sequence[int]):
        super().__init__(name)
        self.shape = tuple(int(d) for d in shape)
        if any(d < 1 for d in self.shape):
            raise ValueError(f"{name}: reshape target {self.shape} must have positive dimensions")

    def out_shape(self, in_shape: Shape) -> Shape:
        if int(np.prod(in_shape)) != int(np.prod(self.shape)):
            raise ValueError(f"{self.name}: cannot reshape {tuple(in_shape)} into {self.shape}")
        return self.shape


class Pad(Layer):
    """Constant padding of the per-sample axes: ``pads`` = begins then ends (ONNX order, batch axis
    excluded)."""

    kind = "pad"

    def __init__(self, name: str, pads: Sequence[int], value: float = 0.0):
        super().__init__(name)
        self.pads = tuple(int(p) for p in pads)
        self.value = float(value)
        if len(self.pads) % 2 or min(self.pads, default=0) < 0:
            raise ValueError(f"{name}: pads {self.pads} must be non-negative begins then ends")
        if not np.isfinite(self.value):
            raise ValueError(f"{name}: pad value must be finite")

    def out_shape(self, in_shape: Shape) -> Shape:
        k = len(self.pads) // 2
        if k != len(in_shape):
            raise ValueError(f"{self.name}: {k} axes of pads for an input of shape {tuple(in_shape)}")
        return tuple(int(d) + self.pads[i] + self.pads[i + k] for i, d in enumerate(in_shape))

    def flops(self, in_shape):
        return 0

    def _inner(self, shape) -> tuple:
        k = len(self.pads) // 2
        return (slice(None),) + tuple(slice(self.pads[i], self.pads[i] + shape[i + 1]) for i in range(k))

    def forward(self, x, y, scope=None):
        y.fill(self.value)
        y[self._inner(x.shape)] = x

    def backward(self, x, y, dy, dx, scope):
        np.copyto(dx, dy[self._inner(dx.shape)])


class Transpose(Layer):
    """A permutation of the per-sample axes (Keras models exported by tf2onnx start with
    NHWC -> NCHW); ``perm`` excludes the batch axis."""

    kind = "transpose"

    def __init__(self, name: str, perm: Sequence[int]):
        super().__init__(name)
        self.perm = tuple(int(p) for p in perm)
        if sorted(self.perm) != list(range(len(self.perm))):
            raise ValueError(f"{name}: {self.perm} is not a permutation")

    def out_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != len(self.perm):
            raise ValueError(f"{self.name}: permutation {self.perm} of an input of shape {tuple(in_shape)}")
        return tuple(int(in_shape[p]) for p in self.perm)

    def flops(self, in_shape):
        return 0

    def forward(self, x, y, scope=None):
        np.copyto(y, x.transpose((0,) + tuple(p + 1 for p in self.perm)))

    def backward(self, x, y, dy, dx, scope):
        inverse = np.argsort(self.perm)
        np.copyto(dx, dy.transpose((0,) + tuple(int(p) + 1 for p in inverse)))


class Dropout(Layer):
    """Identity at inference; in training zeroes a fraction ``p`` and scales the rest by 1/(1-p)."""

    kind = "dropout"

    def __init__(self, name: str, p: float = 0.5):
        super().__init__(name)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name}: dropout ratio must be in [0, 1), got {p}")
        self.p = float(p)

    def saved_buffers(self, n, in_shapes, out_shape):
        return {"mask": ((n,) + tuple(in_shapes[0]), np.float32)} if self.p > 0 else {}

    def forward(self, x, y, scope=None):
        if scope is None or self.p == 0.0:
            np.copyto(y, x)
            return
        mask = scope.saved("mask", x.shape, np.float32)
        keep = scope.rng.random(x.shape, dtype=np.float32) >= self.p
        np.multiply(keep, np.float32(1.0 / (1.0 - self.p)), out=mask)
        np.multiply(x, mask, out=y)

    def backward(self, x, y, dy, dx, scope):
        if self.p == 0.0:
            np.copyto(dx, dy)
        else:
            np.multiply(dy, scope.saved("mask", dy.shape, np.float32), out=dx)


#: layers that only re-label memory (the model passes the array through reshaped)
VIEW_KINDS = ("flatten", "reshape")


class Model:
    """A directed acyclic graph of layers from one input of ``input_shape`` (per sample) to class
    logits, the last layer's output.

    ``inputs[i]`` lists the values layer i reads: value 0 is the model input, value j + 1 the
    output of layer j (layers come in a topological order, so every entry is <= i). Without
    ``inputs`` the layers form a chain. ``shapes[v]`` is the per-sample shape of value v (for a
    chain, ``shapes[i]`` is layer i's input and ``shapes[-1]`` the output).
    """

    def __init__(self, layers: List[Layer], input_shape: Sequence[int], name: str = "model",
                 inputs: Optional[Sequence[Sequence[int]]] = None):
        self.layers = list(layers)
        self.input_shape: Shape = tuple(int(d) for d in input_shape)
        self.name = name
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"layer names must be unique, got duplicates {dup[:5]}")
        if not self.layers:
            raise ValueError("the model has no layers")
        self.inputs: List[Tuple[int, ...]] = ([(i,) for i in range(len(self.layers))] if inputs is None
                                              else [tuple(int(v) for v in ins) for ins in inputs])
        self._check_edges()
        self.shapes = self._infer_shapes()
        if len(self.shapes[-1]) != 1:
            raise ValueError(f"the model must end in a vector of class scores, got output shape {self.shapes[-1]}")

    def _check_edges(self) -> None:
        if len(self.inputs) != len(self.layers):
            raise ValueError(f"inputs lists {len(self.inputs)} entries for {len(self.layers)} layers")
        used = [False] * (len(self.layers) + 1)
        for i, (layer, ins) in enumerate(zip(self.layers, self.inputs)):
            if not ins or (layer.arity and len(ins) != layer.arity):
                raise ValueError(f"layer {layer.name!r} ({layer.kind}) takes {layer.arity or 'one or more'} "
                                 f"inputs, got {len(ins)}")
            for v in ins:
                if not 0 <= v <= i:
                    raise ValueError(f"layer {layer.name!r} reads value {v}, which is not computed before it "
                                     f"(layers must come in topological order)")
                used[v] = True
        unused = [("the input" if v == 0 else repr(self.layers[v - 1].name)) for v in range(len(self.layers))
                  if not used[v]]
        if unused:
            raise ValueError(f"the output of {', '.join(unused[:5])} is never used (the graph has one output, "
                             f"the last layer's)")

    def _infer_shapes(self) -> List[Shape]:
        shapes = [self.input_shape]
        for layer, ins in zip(self.layers, self.inputs):
            in_shapes = [shapes[v] for v in ins]
            shapes.append(tuple(int(d) for d in layer.out_shape(*in_shapes)))
            if isinstance(layer, Concat):
                layer.bind_shapes(in_shapes)
        return shapes

    @property
    def is_chain(self) -> bool:
        return all(ins == (i,) for i, ins in enumerate(self.inputs))

    def in_shapes(self, i: int) -> List[Shape]:
        return [self.shapes[v] for v in self.inputs[i]]

    @property
    def num_classes(self) -> int:
        return self.shapes[-1][0]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers: {[l.name for l in self.layers]}")

    def index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise KeyError(f"no layer named {name!r}")

    @property
    def param_layers(self) -> List[Layer]:
        return [layer for layer in self.layers if layer.has_params]

    def num_params(self) -> int:
        return sum(int(np.prod(layer.weight_shape)) + layer.bias.size for layer in self.param_layers)

    def state(self) -> Dict[str, np.ndarray]:
        """All parameters as ``{"layer.weight": array, ...}`` (the arrays themselves, not copies)."""
        return {f"{layer.name}.{k}": v for layer in self.param_layers for k, v in layer.params().items()}

    def load_state(self, state: Dict[str, np.ndarray]) -> None:
        """Copy values in (shapes must match exactly; extra or missing keys are errors)."""
        own = self.state()
        missing, extra = own.keys() - state.keys(), state.keys() - own.keys()
        if missing or extra:
            raise ValueError(f"state does not match the model: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for key, dst in own.items():
            src = np.asarray(state[key])
            if src.shape != dst.shape:
                raise ValueError(f"state[{key!r}] has shape {src.shape}, the model needs {dst.shape}")
            if not np.all(np.isfinite(src)):
                raise ValueError(f"state[{key!r}] holds NaN or Inf")
        for key, dst in own.items():
            layer = self.layer(key.rsplit(".", 1)[0])
            if key.endswith(".weight") and getattr(layer, "is_int8", False):
                # the layer stays int8: the new values are quantised into it
                layer.weight = np.array(state[key], dtype=np.float32)
                layer.quantize_weight()
            elif key.endswith(".weight") and getattr(layer, "is_mixed", False):
                # the layer stays mixed over the same rows: frozen ones quantised, trained ones exact
                rows = layer.trained_rows
                layer.weight = np.array(state[key], dtype=np.float32)
                layer.mix_weight(rows)
            else:
                np.copyto(dst, np.asarray(state[key]), casting="same_kind")

    def copy(self) -> "Model":
        return copy.deepcopy(self)

    def flops(self) -> int:
        """Forward flops per sample."""
        return sum(layer.flops(*self.in_shapes(i)) for i, layer in enumerate(self.layers))

    def check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 1 + len(self.input_shape) and tuple(x.shape[1:]) == self.input_shape:
            pass
        elif x.ndim >= 2 and int(np.prod(x.shape[1:])) == int(np.prod(self.input_shape)):
            x = x.reshape((x.shape[0],) + self.input_shape)  # e.g. 8x8 images into a flat MLP
        else:
            raise ValueError(f"input has shape {x.shape}; the model expects [N, {', '.join(map(str, self.input_shape))}]")
        if x.dtype != np.float32:
            if not np.issubdtype(x.dtype, np.number):
                raise ValueError(f"input must be numeric, got dtype {x.dtype}")
            x = x.astype(np.float32)
        return np.ascontiguousarray(x)

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits for a batch of inputs (float32 [N, num_classes])."""
        x = self.check_input(x)
        n = x.shape[0]
        out = np.empty((n, self.num_classes), np.float32)
        for start in range(0, n, batch_size):
            out[start:start + batch_size] = self.forward(x[start:start + batch_size])
        return out

    def last_uses(self) -> List[int]:
        """last_uses[v]: the index of the last layer that reads value v (len(layers) for the output)."""
        last = [-1] * (len(self.layers) + 1)
        for i, ins in enumerate(self.inputs):
            for v in ins:
                last[v] = i
        last[-1] = len(self.layers)
        return last

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Inference on a checked batch; a value is dropped after the last layer that reads it."""
        values: Dict[int, np.ndarray] = {0: x}
        last = self.last_uses()
        for i, (layer, ins) in enumerate(zip(self.layers, self.inputs)):
            out_shape = (x.shape[0],) + self.shapes[i + 1]
            if layer.kind in VIEW_KINDS:
                y = values[ins[0]].reshape(out_shape)
            else:
                y = np.empty(out_shape, np.float32)
                args = [values[v] for v in ins]
                layer.forward(args[0] if layer.arity == 1 else args, y)
            values[i + 1] = y
            for v in set(ins):
                if last[v] == i:
                    del values[v]
        return values[len(self.layers)]

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> Tuple[float, float]:
        """(mean cross-entropy loss, accuracy) on labelled data."""
        logits = self.predict(x, batch_size)
        labels = np.ascontiguousarray(y, dtype=np.int32)
        probs = np.empty_like(logits)
        loss = K.softmax_xent_forward(logits, labels, probs)
        return float(loss), float(np.mean(np.argmax(logits, axis=1) == labels))

    def describe_inputs(self, i: int) -> str:
        return ", ".join("input" if v == 0 else self.layers[v - 1].name for v in self.inputs[i])

    def summary(self) -> str:
        lines = [f"{self.name}: input {self.input_shape}, {self.num_params():,} parameters, "
                 f"{self.flops():,} forward flops/sample"]
        chain = self.is_chain
        for i, layer in enumerate(self.layers):
            n = sum(a.size for a in layer.params().values())
            s_in = self.shapes[self.inputs[i][0]] if len(self.inputs[i]) == 1 else "+".join(
                str(s) for s in self.in_shapes(i))
            line = f"  {layer.name:<14} {layer.kind:<15} {str(s_in):>16} -> {str(self.shapes[i + 1]):<16} {n:>9,} params"
            if not chain:
                line += f"  <- {self.describe_inputs(i)}"
            lines.append(line)
        return "\n".join(lines)
