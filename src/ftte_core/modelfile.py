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
"""
from __future__ import annotations

import hashlib
import json
from typing import Dict, List

import numpy as np

from .binfmt import PREFIX, split_prefixed
from .graph import (AvgPool2d, Conv2d, Dense, Dropout, Flatten, GlobalAvgPool, Layer, MaxPool2d, Model, ReLU,
                    Sigmoid, Tanh)

MAGIC = b"FTMD"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_LAYERS = 1024
DEFAULT_MAX_BYTES = 1 << 30


class ModelFileError(ValueError):
    """Bytes that are not a well-formed model file (one-line reason)."""


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


def _build(kind: str, name: str, spec: dict, p: Dict[str, np.ndarray]) -> Layer:
    def pool_args():
        return dict(kernel=spec["kernel"], stride=spec["stride"], padding=spec["padding"],
                    ceil_mode=bool(spec["ceil_mode"]))

    if kind == "dense":
        return Dense(name, p["weight"], p.get("bias"))
    if kind == "conv2d":
        return Conv2d(name, p["weight"], p.get("bias"), stride=spec["stride"], padding=spec["padding"])
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


def model_from_bytes(buf, max_bytes: int = DEFAULT_MAX_BYTES) -> Model:
    """Parse and rebuild; any defect raises ModelFileError with a one-line reason."""
    mv, header, offset = split_prefixed(buf, "model file", MAGIC, FORMAT_VERSION, max_bytes, MAX_HEADER_BYTES,
                                        ModelFileError)
    n = mv.nbytes
    try:
        head = json.loads(header.decode())
        name, input_shape, specs = str(head["name"]), [int(d) for d in head["input_shape"]], head["layers"]
        if not isinstance(specs, list) or len(specs) > MAX_LAYERS:
            raise ValueError("'layers' must be a list of at most 1024 entries")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError) as e:
        raise ModelFileError(f"bad model header: {e}") from None
    except RecursionError:  # JSON nested deeper than the interpreter's stack
        raise ModelFileError("bad model header: JSON nested too deeply") from None
    layers: List[Layer] = []
    try:
        for spec in specs:
            params: Dict[str, np.ndarray] = {}
            for pname, shape in spec["params"]:
                shape = tuple(int(d) for d in shape)
                if any(d < 0 for d in shape) or len(shape) > 4:
                    raise ModelFileError(f"layer {spec['name']!r}: bad shape {shape} for {pname!r}")
                size = 4 * int(np.prod(shape, dtype=np.int64))
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
        return Model(layers, input_shape, name=name)
    except ModelFileError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, OverflowError) as e:  # a huge or infinite size, too
        raise ModelFileError(f"bad model file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
