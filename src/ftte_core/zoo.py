"""The model zoo: small reference models for devices with a few MB to spare.

``zoo(name, input_shape, num_classes, seed=0, **options)`` builds a fresh ``Model``. Layer
names are stable ("conv1", "relu1", "pool1", ..., "fc1", "fc2") because subsets, checkpoints and
exported ONNX files refer to layers by name. Weights are He-uniform (suits ReLU chains), biases
zero, drawn in layer order from ``np.random.default_rng(seed)`` so a seed pins every weight.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from .graph import Conv2d, Dense, Flatten, Layer, MaxPool2d, Model, ReLU


def _he_uniform(rng: np.random.Generator, shape: Tuple[int, ...], fan_in: int) -> np.ndarray:
    limit = np.sqrt(6.0 / fan_in)
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def _dense(rng: np.random.Generator, name: str, n_in: int, n_out: int) -> Dense:
    return Dense(name, _he_uniform(rng, (n_out, n_in), n_in), np.zeros(n_out, np.float32))


def _sizes(name: str, value, what: str) -> Tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        value = (value,)
    try:
        sizes = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"zoo({name!r}): {what} must be a sequence of positive ints, got {value!r}") from None
    if any(s < 1 for s in sizes):
        raise ValueError(f"zoo({name!r}): {what} must be positive, got {sizes}")
    return sizes


def _mlp(input_shape: Tuple[int, ...], num_classes: int, rng: np.random.Generator,
         hidden: Sequence[int] = (256, 256)) -> List[Layer]:
    hidden = _sizes("mlp", hidden, "hidden")
    layers: List[Layer] = []
    if len(input_shape) > 1:
        layers.append(Flatten("flatten"))
    n_in = int(np.prod(input_shape))
    for i, h in enumerate(hidden, 1):
        layers += [_dense(rng, f"fc{i}", n_in, h), ReLU(f"relu{i}")]
        n_in = h
    layers.append(_dense(rng, f"fc{len(hidden) + 1}", n_in, num_classes))
    return layers


def _cnn(input_shape: Tuple[int, ...], num_classes: int, rng: np.random.Generator,
         channels: Sequence[int] = (8, 16), hidden: Sequence[int] = ()) -> List[Layer]:
    if len(input_shape) != 3:
        raise ValueError(f"zoo('cnn'): input_shape must be [C, H, W], got {input_shape}")
    channels = _sizes("cnn", channels, "channels")
    hidden = _sizes("cnn", hidden, "hidden")
    c, h, w = input_shape
    layers: List[Layer] = []
    for i, oc in enumerate(channels, 1):
        if h < 2 or w < 2:
            raise ValueError(f"zoo('cnn'): input {input_shape} is too small for {len(channels)} "
                             f"conv+pool blocks (block {i} would see {h}x{w})")
        weight = _he_uniform(rng, (oc, c, 3, 3), c * 9)
        layers += [Conv2d(f"conv{i}", weight, np.zeros(oc, np.float32), stride=(1, 1), padding=(1, 1, 1, 1)),
                   ReLU(f"relu{i}"),
                   MaxPool2d(f"pool{i}", kernel=(2, 2), stride=(2, 2))]
        c, h, w = oc, h // 2, w // 2
    layers.append(Flatten("flatten"))
    n_in = c * h * w
    for j, hsize in enumerate(hidden, 1):
        layers += [_dense(rng, f"fc{j}", n_in, hsize), ReLU(f"relu{len(channels) + j}")]
        n_in = hsize
    layers.append(_dense(rng, f"fc{len(hidden) + 1}", n_in, num_classes))
    return layers


_BUILDERS: Dict[str, Callable[..., List[Layer]]] = {"mlp": _mlp, "cnn": _cnn}
_OPTIONS: Dict[str, Tuple[str, ...]] = {"mlp": ("hidden",), "cnn": ("channels", "hidden")}


def zoo_names() -> List[str]:
    return sorted(_BUILDERS)


def zoo(name: str, input_shape: Sequence[int], num_classes: int, seed: int = 0, **options) -> Model:
    """A fresh zoo model. ``zoo("mlp", (64,), 10)``, ``zoo("cnn", (1, 28, 28), 10, channels=(8, 16))``."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(zoo_names())}")
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"zoo({name!r}): input_shape must be a sequence of ints, got {input_shape!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"zoo({name!r}): input_shape must be non-empty and positive, got {shape}")
    if int(num_classes) < 1:
        raise ValueError(f"zoo({name!r}): num_classes must be >= 1, got {num_classes}")
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        raise ValueError(f"zoo({name!r}): unknown option(s) {unknown}; it takes {list(_OPTIONS[name])}")
    rng = np.random.default_rng(seed)
    layers = builder(shape, int(num_classes), rng, **options)
    return Model(layers, shape, name=name)
