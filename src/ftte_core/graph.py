"""The model: a chain of layers, each with its forward and backward on the C++ kernels.

Shapes are per sample (no batch dimension) unless a name says otherwise. Every array that
reaches a kernel is float32 and C-contiguous. Training-time buffers are not owned by layers:
the trainer hands each layer an ``Arena`` scope to take them from, so one step's memory can be
counted by category (see ``trainer.py``).
"""
from __future__ import annotations

import copy
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


class Layer:
    """One step of the chain. Subclasses set ``kind`` and implement the shape algebra and passes."""

    kind = "layer"
    has_params = False
    #: backward needs this layer's output (activations compute their gradient from it)
    saves_output = False

    def __init__(self, name: str):
        self.name = name

    # -- shape algebra -------------------------------------------------------------------------
    def out_shape(self, in_shape: Shape) -> Shape:
        return in_shape

    def flops(self, in_shape: Shape) -> int:
        """Forward multiply-adds x2 per sample (elementwise layers count one per element)."""
        return int(np.prod(self.out_shape(in_shape)))

    def params(self) -> Dict[str, np.ndarray]:
        return {}

    def saves_input(self, trains: bool) -> bool:
        """Backward needs this layer's input (only layers whose weights train)."""
        return False

    # -- passes --------------------------------------------------------------------------------
    def forward(self, x: np.ndarray, y: np.ndarray, scope: "Optional[Scope]" = None) -> None:
        """Compute y from x (both batch-first). With a training scope, save what backward needs."""
        raise NotImplementedError

    def backward(self, x: Optional[np.ndarray], y: Optional[np.ndarray], dy: np.ndarray,
                 dx: Optional[np.ndarray], scope: "Scope") -> None:
        """Given dL/dy, write dL/dx (when dx is given) and this layer's gradients (into scope)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _trainable(a) -> np.ndarray:
    """``a`` as an array the kernels may update in place: float32, C-contiguous, aligned, writable
    and owning its memory. Anything else is copied: ONNX initializers and model files arrive as
    read-only views of the file's bytes, and training writes into the weights."""
    arr = np.asarray(a)
    f = arr.flags
    if arr.dtype == np.float32 and f.owndata and f.writeable and f.c_contiguous and f.aligned:
        return arr
    return np.array(arr, dtype=np.float32, order="C", copy=True)


def _weight_and_bias(name: str, weight, bias, ndim: int, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """Trainable float32 arrays (see ``_trainable``); a missing bias is zeros (every weight layer
    has one to train)."""
    w = _trainable(weight)
    if w.ndim != ndim:
        raise ValueError(f"{name}: {what}, got shape {w.shape}")
    rows = w.shape[0]
    b = np.zeros(rows, np.float32) if bias is None else _trainable(np.asarray(bias).reshape(-1))
    if b.shape != (rows,):
        raise ValueError(f"{name}: bias has {b.size} entries, weight has {rows} output rows")
    return w, b


class Dense(Layer):
    kind = "dense"
    has_params = True

    def __init__(self, name: str, weight: np.ndarray, bias: Optional[np.ndarray] = None):
        super().__init__(name)
        self.weight, self.bias = _weight_and_bias(name, weight, bias, 2, "dense weight must be 2-D [out, in]")

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

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

    def forward(self, x, y, scope=None):
        K.dense_forward(x, self.weight, self.bias, y)

    def backward(self, x, y, dy, dx, scope):
        rows, dw, db = scope.grad_buffers(self)
        if rows is not None and db is not None:  # a whole bias with only some weight rows
            K.dense_backward(None, self.weight, dy, None, None, db, None)
            db = None
        K.dense_backward(x, self.weight, dy, rows, dw, db, dx)


class Conv2d(Layer):
    kind = "conv2d"
    has_params = True

    def __init__(self, name: str, weight: np.ndarray, bias: Optional[np.ndarray] = None,
                 stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0, 0, 0)):
        super().__init__(name)
        self.weight, self.bias = _weight_and_bias(name, weight, bias, 4,
                                                  "conv weight must be 4-D [out_ch, in_ch, kh, kw]")
        self.stride = tuple(int(s) for s in stride)
        self.padding = tuple(int(p) for p in padding)  # top, left, bottom, right (ONNX order)
        if len(self.stride) != 2 or len(self.padding) != 4 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"{name}: bad stride {self.stride} or padding {self.padding}")

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def out_shape(self, in_shape: Shape) -> Shape:
        oc, c, kh, kw = self.weight.shape
        if len(in_shape) != 3 or in_shape[0] != c:
            raise ValueError(f"{self.name}: expects input [{c}, H, W], got shape {tuple(in_shape)}")
        pt, pl, pb, pr = self.padding
        oh = _pool_out(in_shape[1], kh, self.stride[0], pt, pb, False)
        ow = _pool_out(in_shape[2], kw, self.stride[1], pl, pr, False)
        return (oc, oh, ow)

    def flops(self, in_shape: Shape) -> int:
        oc, c, kh, kw = self.weight.shape
        _, oh, ow = self.out_shape(in_shape)
        return 2 * oc * oh * ow * c * kh * kw

    def params(self) -> Dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    def saves_input(self, trains: bool) -> bool:
        return trains

    def forward(self, x, y, scope=None):
        K.conv2d_forward(x, self.weight, self.bias, y, self.stride, self.padding)

    def backward(self, x, y, dy, dx, scope):
        rows, dw, db = scope.grad_buffers(self)
        if rows is not None and db is not None:  # a whole bias with only some weight rows
            K.conv2d_backward(None, self.weight, dy, None, None, db, None, self.stride, self.padding)
            db = None
        K.conv2d_backward(x, self.weight, dy, rows, dw, db, dx, self.stride, self.padding)


class _Pool(Layer):
    def __init__(self, name: str, kernel: Sequence[int], stride: Optional[Sequence[int]] = None,
                 padding: Sequence[int] = (0, 0, 0, 0), ceil_mode: bool = False):
        super().__init__(name)
        self.kernel = tuple(int(k) for k in kernel)
        self.stride = tuple(int(s) for s in (stride if stride is not None else kernel))
        self.padding = tuple(int(p) for p in padding)
        self.ceil_mode = bool(ceil_mode)
        if len(self.kernel) != 2 or len(self.stride) != 2 or len(self.padding) != 4:
            raise ValueError(f"{name}: pooling needs 2-D kernel/stride and 4 pads")
        if min(self.kernel) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"{name}: bad pooling kernel {self.kernel}, stride {self.stride} or padding {self.padding}")

    def out_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 3:
            raise ValueError(f"{self.name}: expects input [C, H, W], got shape {tuple(in_shape)}")
        c, h, w = in_shape
        pt, pl, pb, pr = self.padding
        return (c, _pool_out(h, self.kernel[0], self.stride[0], pt, pb, self.ceil_mode),
                _pool_out(w, self.kernel[1], self.stride[1], pl, pr, self.ceil_mode))

    def flops(self, in_shape: Shape) -> int:
        return int(np.prod(self.out_shape(in_shape))) * self.kernel[0] * self.kernel[1]


class MaxPool2d(_Pool):
    kind = "maxpool2d"

    def forward(self, x, y, scope=None):
        argmax = scope.saved("argmax", y.shape, np.int32) if scope is not None and scope.keep else None
        K.maxpool2d_forward(x, y, argmax, self.kernel, self.stride, self.padding, self.ceil_mode)

    def backward(self, x, y, dy, dx, scope):
        K.maxpool2d_backward(dy, scope.saved("argmax", dy.shape, np.int32), dx)


class AvgPool2d(_Pool):
    kind = "avgpool2d"

    def __init__(self, name, kernel, stride=None, padding=(0, 0, 0, 0), ceil_mode=False,
                 count_include_pad=False):
        super().__init__(name, kernel, stride, padding, ceil_mode)
        self.count_include_pad = bool(count_include_pad)

    def forward(self, x, y, scope=None):
        K.avgpool2d_forward(x, y, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad)

    def backward(self, x, y, dy, dx, scope):
        K.avgpool2d_backward(dy, dx, self.kernel, self.stride, self.padding, self.ceil_mode,
                             self.count_include_pad)


class GlobalAvgPool(Layer):
    kind = "global_avgpool"

    def out_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 3:
            raise ValueError(f"{self.name}: expects input [C, H, W], got shape {tuple(in_shape)}")
        return (in_shape[0], 1, 1)

    def flops(self, in_shape: Shape) -> int:
        return int(np.prod(in_shape))

    def forward(self, x, y, scope=None):
        K.global_avgpool_forward(x, y.reshape(y.shape[0], y.shape[1]))

    def backward(self, x, y, dy, dx, scope):
        K.global_avgpool_backward(dy.reshape(dy.shape[0], dy.shape[1]), dx)


class _Activation(Layer):
    saves_output = True
    _forward = _backward = None

    def forward(self, x, y, scope=None):
        type(self)._forward(x, y)

    def backward(self, x, y, dy, dx, scope):
        type(self)._backward(y, dy, dx)


class ReLU(_Activation):
    kind = "relu"
    _forward = staticmethod(K.relu_forward)
    _backward = staticmethod(K.relu_backward)


class Sigmoid(_Activation):
    kind = "sigmoid"
    _forward = staticmethod(K.sigmoid_forward)
    _backward = staticmethod(K.sigmoid_backward)


class Tanh(_Activation):
    kind = "tanh"
    _forward = staticmethod(K.tanh_forward)
    _backward = staticmethod(K.tanh_backward)


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


class Dropout(Layer):
    """Identity at inference; in training zeroes a fraction ``p`` and scales the rest by 1/(1-p)."""

    kind = "dropout"

    def __init__(self, name: str, p: float = 0.5):
        super().__init__(name)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name}: dropout ratio must be in [0, 1), got {p}")
        self.p = float(p)

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
VIEW_KINDS = ("flatten",)


class Model:
    """A chain of layers from an input of ``input_shape`` (per sample) to class logits."""

    def __init__(self, layers: List[Layer], input_shape: Sequence[int], name: str = "model"):
        self.layers = list(layers)
        self.input_shape: Shape = tuple(int(d) for d in input_shape)
        self.name = name
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError(f"layer names must be unique, got {names}")
        self.shapes = self._infer_shapes()  # shapes[i] = input shape of layer i; shapes[-1] = output
        if len(self.shapes[-1]) != 1:
            raise ValueError(f"the model must end in a vector of class scores, got output shape {self.shapes[-1]}")

    def _infer_shapes(self) -> List[Shape]:
        shapes = [self.input_shape]
        for layer in self.layers:
            shapes.append(tuple(int(d) for d in layer.out_shape(shapes[-1])))
        return shapes

    @property
    def num_classes(self) -> int:
        return self.shapes[-1][0]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers: {[l.name for l in self.layers]}")

    @property
    def param_layers(self) -> List[Layer]:
        return [layer for layer in self.layers if layer.has_params]

    def num_params(self) -> int:
        return sum(a.size for layer in self.param_layers for a in layer.params().values())

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
            np.copyto(dst, src, casting="same_kind")

    def copy(self) -> "Model":
        return copy.deepcopy(self)

    def flops(self) -> int:
        """Forward flops per sample."""
        return sum(layer.flops(s) for layer, s in zip(self.layers, self.shapes))

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

    def forward(self, x: np.ndarray) -> np.ndarray:
        h = x
        for layer, in_shape, out_shape in zip(self.layers, self.shapes[:-1], self.shapes[1:]):
            if layer.kind in VIEW_KINDS:
                h = h.reshape((h.shape[0],) + out_shape)
                continue
            y = np.empty((h.shape[0],) + out_shape, np.float32)
            layer.forward(h, y)
            h = y
        return h

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> Tuple[float, float]:
        """(mean cross-entropy loss, accuracy) on labelled data."""
        logits = self.predict(x, batch_size)
        labels = np.ascontiguousarray(y, dtype=np.int32)
        probs = np.empty_like(logits)
        loss = K.softmax_xent_forward(logits, labels, probs)
        return float(loss), float(np.mean(np.argmax(logits, axis=1) == labels))

    def summary(self) -> str:
        lines = [f"{self.name}: input {self.input_shape}, {self.num_params():,} parameters, "
                 f"{self.flops():,} forward flops/sample"]
        for layer, s_in, s_out in zip(self.layers, self.shapes[:-1], self.shapes[1:]):
            n = sum(a.size for a in layer.params().values())
            lines.append(f"  {layer.name:<14} {layer.kind:<15} {str(s_in):>16} -> {str(s_out):<16} {n:>9,} params")
        return "\n".join(lines)
