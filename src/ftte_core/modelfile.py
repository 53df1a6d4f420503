"""A model as bytes without ONNX: what the hub sends an agent once (the frozen part travels here).

The agent must stay small (the onnx package alone costs ~13 MB of memory), so the hub ships the
model in this plain format and keeps ONNX for the files users open. No pickle; little-endian:

    magic   4 bytes  b"FTMD"
    version u16      FORMAT_VERSION
    flags   u16      0 (non-zero is rejected)
    hlen    u32      length of the JSON header
    header  hlen     UTF-8 JSON {"name", "input_shape", "layers": [{"kind", "name", attrs...,
                     "params": [[param name, shape], ...]}]}
    arrays           float32 (<f4), C order, in header order

``model_from_bytes`` checks every length against the header before reading an array and rebuilds
the layers through their constructors, so their own shape checks apply. ``content_hash`` names a
model file by its bytes: the agent caches by it.

A model file comes from the network, and a few hundred bytes can describe a model that needs
gigabytes (a convolution padded by 700 turns an 8x8 input into 1408x1408 maps). So every number
that sizes something is bounded before anything is built (``LIMITS``: kernels, strides, pads;
no dimension may be empty), and the chain of layer output shapes is walked with exact integers so
that no sample's activations, and no parameter tensor, exceed their element limits. What a model
needs to *train* on a device is then the cost model's question (``cost.predict_memory``): the
agent asks it before it allocates anything.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from .binfmt import PREFIX, split_prefixed
from .graph import (AvgPool2d, Conv2d, Dense, Dropout, Flatten, GlobalAvgPool, Layer, MaxPool2d, Model, ReLU,
                    Sigmoid, Tanh)

MAGIC = b"FTMD"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_LAYERS = 1024
DEFAULT_MAX_BYTES = 1 << 30

#: Bounds on what a model file may describe (far above any model a Pi-class device trains).
LIMITS = {
    "input_ndim": 4,
    "kernel": 64,                   # pooling kernel / convolution kernel height and width
    "stride": 64,
    "padding": 64,
    "sample_elements": 1 << 24,     # elements of one sample's input or any layer's output (64 MiB float32)
    "param_elements": 1 << 28,      # elements of one parameter tensor (1 GiB float32)
}


class ModelFileError(ValueError):
    """Bytes that are not a well-formed model file (one-line reason)."""


class ModelTooLarge(ModelFileError):
    """A well-formed model whose weights alone exceed what the reader allows (``max_param_bytes``)."""

    def __init__(self, message: str, param_bytes: int):
        super().__init__(message)
        self.param_bytes = int(param_bytes)


def _attrs(layer: Layer) -> Dict[str, object]:
    if isinstance(layer, Conv2d):
        return {"stride": list(layer.stride), "padding": list(layer.padding)}
    if isinstance(layer, AvgPool2d):
        return {"kernel": list(layer.kernel), "stride": list(layer.stride), "padding": list(layer.padding),
                "ceil_mode": layer.ceil_mode, "count_include_pad": layer.count_include_pad}
    if isinstance(layer, MaxPool2d):
        return {"kernel": list(layer.kernel), "stride": list(layer.stride), "padding": list(layer.padding),
                "ceil_mode": layer.ceil_mode}
    if isinstance(layer, Dropout):
        return {"p": layer.p}
    return {}


def model_to_bytes(model: Model) -> bytes:
    layers, arrays = [], []
    for layer in model.layers:
        params = layer.params()
        layers.append({"kind": layer.kind, "name": layer.name, **_attrs(layer),
                       "params": [[k, list(v.shape)] for k, v in params.items()]})
        arrays.extend(np.ascontiguousarray(v, dtype="<f4").tobytes() for v in params.values())
    header = json.dumps({"name": model.name, "input_shape": list(model.input_shape), "layers": layers},
                        separators=(",", ":")).encode()
    return b"".join([PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header)), header] + arrays)


def content_hash(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _ints(name: str, what: str, values, count: int, lo: int, hi: int) -> List[int]:
    """``count`` integers in [lo, hi] from a header list, or ModelFileError naming the layer."""
    if (not isinstance(values, (list, tuple)) or len(values) != count
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)):
        raise ModelFileError(f"layer {name!r}: {what} must be a list of {count} integers")
    if not all(lo <= v <= hi for v in values):
        raise ModelFileError(f"layer {name!r}: {what} {list(values)[:count]} is outside the limit [{lo}, {hi}]")
    return list(values)


def _check_shape(where: str, shape: Sequence[int], limit: int, what: str) -> None:
    if any(d < 1 for d in shape):  # an empty dimension would let other sizes (a bias's rows) grow for free
        raise ModelFileError(f"{where}: {what} {list(shape)[:8]} has an empty dimension")
    n = math.prod(shape)
    if n > limit:
        raise ModelFileError(f"{where}: {what} {list(shape)} has {n:,} elements, over the limit of {limit:,}")


def check_model_size(model: Model) -> None:
    """The shape chain stays within ``LIMITS``: every layer's output per sample and every parameter."""
    for layer, out_shape in zip(model.layers, model.shapes[1:]):
        _check_shape(f"layer {layer.name!r}", out_shape, LIMITS["sample_elements"], "output shape")
        for pname, arr in layer.params().items():
            _check_shape(f"layer {layer.name!r}", arr.shape, LIMITS["param_elements"], f"{pname} shape")


def _build(kind: str, name: str, spec: dict, p: Dict[str, np.ndarray]) -> Layer:
    def pool_args():
        return dict(kernel=_ints(name, "kernel", spec["kernel"], 2, 1, LIMITS["kernel"]),
                    stride=_ints(name, "stride", spec["stride"], 2, 1, LIMITS["stride"]),
                    padding=_ints(name, "padding", spec["padding"], 4, 0, LIMITS["padding"]),
                    ceil_mode=bool(spec["ceil_mode"]))

    if kind == "dense":
        return Dense(name, p["weight"], p.get("bias"))
    if kind == "conv2d":
        w = p["weight"]
        if w.ndim == 4 and max(w.shape[2:]) > LIMITS["kernel"]:
            raise ModelFileError(f"layer {name!r}: kernel {list(w.shape[2:])} is over the limit of {LIMITS['kernel']}")
        return Conv2d(name, w, p.get("bias"), stride=_ints(name, "stride", spec["stride"], 2, 1, LIMITS["stride"]),
                      padding=_ints(name, "padding", spec["padding"], 4, 0, LIMITS["padding"]))
    if kind == "maxpool2d":
        return MaxPool2d(name, **pool_args())
    if kind == "avgpool2d":
        return AvgPool2d(name, **pool_args(), count_include_pad=bool(spec["count_include_pad"]))
    if kind == "dropout":
        return Dropout(name, float(spec["p"]))
    simple = {"global_avgpool": GlobalAvgPool, "relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh, "flatten": Flatten}
    if kind in simple:
        return simple[kind](name)
    raise ModelFileError(f"layer {name!r}: unknown kind {kind!r}")


def model_from_bytes(buf, max_bytes: int = DEFAULT_MAX_BYTES, max_param_bytes: Optional[int] = None) -> Model:
    """Parse and rebuild; any defect raises ModelFileError with a one-line reason.

    ``max_param_bytes``: weights larger than this raise ``ModelTooLarge`` before any array is
    copied (a device refuses a model whose weights alone exceed its memory budget).
    """
    mv, header, offset = split_prefixed(buf, "model file", MAGIC, FORMAT_VERSION, max_bytes, MAX_HEADER_BYTES,
                                        ModelFileError)
    n = mv.nbytes
    if max_param_bytes is not None and n - offset > max_param_bytes:  # the arrays fill the rest of the file
        raise ModelTooLarge(f"the model's weights are {n - offset:,} bytes, over the limit of {max_param_bytes:,}",
                            n - offset)
    try:
        head = json.loads(header.decode())
        name, input_shape, specs = str(head["name"]), [int(d) for d in head["input_shape"]], head["layers"]
        if not isinstance(specs, list) or len(specs) > MAX_LAYERS:
            raise ValueError("'layers' must be a list of at most 1024 entries")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError) as e:
        raise ModelFileError(f"bad model header: {str(e)[:200]}") from None
    except RecursionError:  # JSON nested deeper than the interpreter's stack
        raise ModelFileError("bad model header: JSON nested too deeply") from None
    if not 1 <= len(input_shape) <= LIMITS["input_ndim"]:
        raise ModelFileError(f"input shape {input_shape[:8]} must have 1 to {LIMITS['input_ndim']} dimensions")
    _check_shape("model", input_shape, LIMITS["sample_elements"], "input shape")
    layers: List[Layer] = []
    try:
        for spec in specs:
            params: Dict[str, np.ndarray] = {}
            for pname, shape in spec["params"]:
                shape = tuple(int(d) for d in shape)
                if not 1 <= len(shape) <= 4:
                    raise ModelFileError(f"layer {spec['name']!r}: bad shape {shape[:8]} for {pname!r}")
                _check_shape(f"layer {str(spec['name'])[:80]!r}", shape, LIMITS["param_elements"], f"{pname} shape")
                size = 4 * math.prod(shape)
                if offset + size > n:
                    raise ModelFileError(f"model file is truncated: {spec['name']}.{pname} needs {size} bytes "
                                         f"at offset {offset}, the file has {n}")
                # reshape the read-only view first, then copy once: the copy is owned and
                # writable, which the layers need (training updates weights in place)
                arr = np.frombuffer(mv[offset:offset + size], dtype="<f4").reshape(shape).astype(np.float32)
                if not np.all(np.isfinite(arr)):
                    raise ModelFileError(f"{spec['name']}.{pname} holds NaN or Inf")
                params[str(pname)] = arr
                offset += size
            layers.append(_build(str(spec["kind"]), str(spec["name"]), spec, params))
        if offset != n:
            raise ModelFileError(f"model file has {n - offset} trailing bytes after its arrays")
        model = Model(layers, input_shape, name=name)
        check_model_size(model)
        return model
    except ModelFileError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, OverflowError) as e:  # a huge or infinite size, too
        raise ModelFileError(f"bad model file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
