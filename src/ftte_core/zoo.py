"""The model zoo: small reference models for devices with a few MB to spare.

``zoo(name, input_shape, num_classes, seed=0, **options)`` builds a fresh ``Model``. Layer
names are stable because subsets, checkpoints and exported ONNX files refer to layers by name.
Weights are He-uniform (suits ReLU nets), biases zero, drawn in layer order from
``np.random.default_rng(seed)`` so a seed pins every weight. Batch norms start as the identity
(scale 1, shift 0, mean 0, variance 1, epsilon 1e-5); their statistics stay frozen in training
(scale and shift train), as the engine's ``BatchNorm`` does.

Two simple chains:

- ``mlp``: dense layers ("fc1", "relu1", ...), ``hidden=(256, 256)``;
- ``cnn``: conv 3x3 + ReLU + maxpool 2 blocks ("conv1", "relu1", "pool1", ...), then dense,
  ``channels=(8, 16)``, ``hidden=()``.

The MLPerf Tiny reference architectures (DAGs; ``input_shape`` and ``num_classes`` default to
the benchmark's):

- ``resnet8`` (image classification, CIFAR-10 3x32x32, 10 classes): "stem.conv/bn/relu", three
  residual blocks "block1".."block3" of 16, 32, 64 filters (stride 1, 2, 2), each
  "conv1, bn1, relu1, conv2, bn2", a "shortcut" 1x1 conv of stride 2 where the shape changes
  (identity otherwise), "add", "relu"; then "pool" (global average), "flatten", "classifier".
  Option ``filters=(16, 32, 64)``.
- ``dscnn`` (keyword spotting DS-CNN small, 1x49x10 MFCC, 12 classes): "stem.conv" 10x4 stride 2
  with TensorFlow "same" padding (49x10 -> 25x5), "stem.bn/relu"; four blocks "block1".."block4"
  of a depthwise 3x3 "dw, dw_bn, dw_relu" and a pointwise 1x1 "pw, pw_bn, pw_relu"; "pool",
  "flatten", "classifier". Options ``filters=64``, ``blocks=4``, ``dropout=0``: p > 0 adds
  "stem.dropout" (p) and "dropout" before the pool (2p, as MLPerf trains with 0.2 and 0.4).
- ``mobilenetv1`` (visual wake words, width ``alpha=0.25``, 3x96x96, 2 classes; 3x48x48 works
  too): "stem.conv" 3x3 stride 2 (8 channels), "stem.bn", "stem.relu6"; 13 depthwise-separable
  blocks "block1".."block13" ("dw, dw_bn, dw_relu6, pw, pw_bn, pw_relu6") with MobileNetV1's
  schedule (64, 128 s2, 128, 256 s2, 256, 512 s2, 512 x5, 1024 s2, 1024 channels times alpha);
  "pool", "flatten", "classifier". ReLU6 is ``Clip(0, 6)``.
- ``autoencoder`` (the anomaly-detection FC net as a classifier body, 640 features, 2 classes):
  "enc1".."enc4" (dense 128, batch norm, ReLU: ".fc", ".bn", ".relu"), "bottleneck" (dense 8),
  "dec1".."dec4" (dense 128), then "classifier" (``hidden=128``, ``bottleneck=8``, ``depth=4``).
  Inputs of more than one axis are flattened first.
- ``sensor1d`` (3-axis accelerometer windows, 3x128, 6 classes): "block1".."block3" of a 1-D
  conv ("conv", "bn", "relu"; kernels 5, 5, 3, 16, 32, 64 channels, "same" padding), a
  max pool of 2 ("pool") after blocks 1 and 2; then "pool" (global average), "flatten",
  "classifier" (``channels=(16, 32, 64)``, ``kernels=(5, 5, 3)``).

Padding: odd kernels pad k // 2 on each side (PyTorch's way; the output is ceil(size / stride)),
even kernels take TensorFlow's "same" split (the extra pixel at the end).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .graph import (BatchNorm, Binary, Clip, Conv1d, Conv2d, Dense, Dropout, Flatten, GlobalAvgPool, Layer,
                    MaxPool2d, Model, ReLU)

Shape = Tuple[int, ...]


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


def _size(name: str, value, what: str) -> int:
    """One positive int option."""
    sizes = _sizes(name, value, what)
    if len(sizes) != 1:
        raise ValueError(f"zoo({name!r}): {what} must be one positive int, got {value!r}")
    return sizes[0]


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


# ---------------------------------------------------------------------------------------------
# DAG models: a small builder that keeps value ids and shapes as layers are added.

def same_pads(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """(begin, end) padding of one axis so the output has ceil(size / stride) entries: k // 2 on
    both sides for odd kernels (PyTorch's convention, the same output size), TensorFlow's split
    (the odd pixel at the end) for even ones."""
    if kernel % 2:
        return kernel // 2, kernel // 2
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _Builder:
    """Appends layers in topological order; ``add`` returns the new value's id (0 = the input)."""

    def __init__(self, name: str, input_shape: Shape, rng: np.random.Generator):
        self.model_name = name
        self.rng = rng
        self.layers: List[Layer] = []
        self.inputs: List[Tuple[int, ...]] = []
        self.shapes: List[Shape] = [tuple(input_shape)]

    def add(self, layer: Layer, *srcs: int) -> int:
        try:
            shape = layer.out_shape(*[self.shapes[s] for s in srcs])
        except ValueError as e:
            raise ValueError(f"zoo({self.model_name!r}): input {self.shapes[0]} does not fit: {e}") from None
        self.layers.append(layer)
        self.inputs.append(tuple(srcs))
        self.shapes.append(tuple(int(d) for d in shape))
        return len(self.layers)

    def conv(self, name: str, src: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int] = None,
             group: int = 1) -> int:
        """A 2-D conv on [C, H, W] (or 1-D on [C, L] with one-entry kernel/stride), "same" padded."""
        shape = self.shapes[src]
        c, spatial = shape[0], shape[1:]
        kernel = tuple(kernel)
        stride = tuple(stride) if stride is not None else (1,) * len(kernel)
        if len(kernel) != len(spatial):
            raise ValueError(f"zoo({self.model_name!r}): layer {name} needs an input of {len(kernel)} spatial "
                             f"axes, got shape {shape}")
        pads = [same_pads(n, k, s) for n, k, s in zip(spatial, kernel, stride)]
        padding = tuple(p[0] for p in pads) + tuple(p[1] for p in pads)
        fan_in = (c // group) * int(np.prod(kernel))
        weight = _he_uniform(self.rng, (out_ch, c // group) + kernel, fan_in)
        cls = Conv2d if len(kernel) == 2 else Conv1d
        return self.add(cls(name, weight, np.zeros(out_ch, np.float32), stride=stride, padding=padding,
                            group=group), src)

    def bn(self, name: str, src: int) -> int:
        c = self.shapes[src][0]
        one, zero = np.ones(c, np.float32), np.zeros(c, np.float32)
        return self.add(BatchNorm(name, one, zero, zero.copy(), one.copy(), eps=1e-5), src)

    def dense(self, name: str, src: int, out: int) -> int:
        return self.add(_dense(self.rng, name, self.shapes[src][0], out), src)

    def head(self, src: int, num_classes: int) -> int:
        """Global average pool, flatten, dense classifier."""
        v = self.add(GlobalAvgPool("pool", keepdims=True), src)
        v = self.add(Flatten("flatten"), v)
        return self.dense("classifier", v, num_classes)

    def model(self) -> Model:
        return Model(self.layers, self.shapes[0], name=self.model_name, inputs=self.inputs)


def _need_rank(name: str, shape: Shape, rank: int, what: str) -> None:
    if len(shape) != rank:
        raise ValueError(f"zoo({name!r}): input_shape must be {what}, got {list(shape)}")


def _resnet8(input_shape: Shape, num_classes: int, rng: np.random.Generator,
             filters: Sequence[int] = (16, 32, 64)) -> Model:
    _need_rank("resnet8", input_shape, 3, "[C, H, W]")
    filters = _sizes("resnet8", filters, "filters")
    g = _Builder("resnet8", input_shape, rng)
    v = g.conv("stem.conv", 0, filters[0], (3, 3))
    v = g.add(ReLU("stem.relu"), g.bn("stem.bn", v))
    for i, f in enumerate(filters, 1):
        p = f"block{i}."
        stride = (1, 1) if i == 1 else (2, 2)
        x = v
        v = g.conv(p + "conv1", x, f, (3, 3), stride)
        v = g.add(ReLU(p + "relu1"), g.bn(p + "bn1", v))
        v = g.bn(p + "bn2", g.conv(p + "conv2", v, f, (3, 3)))
        shortcut = x
        if stride != (1, 1) or g.shapes[x][0] != f:
            shortcut = g.conv(p + "shortcut", x, f, (1, 1), stride)
        v = g.add(Binary(p + "add", "add"), v, shortcut)
        v = g.add(ReLU(p + "relu"), v)
    g.head(v, num_classes)
    return g.model()


def _dscnn(input_shape: Shape, num_classes: int, rng: np.random.Generator, filters: int = 64,
           blocks: int = 4, dropout: float = 0.0) -> Model:
    _need_rank("dscnn", input_shape, 3, "[C, H, W] (1 x frames x MFCC coefficients)")
    filters = _size("dscnn", filters, "filters")
    blocks = _size("dscnn", blocks, "blocks")
    if not 0.0 <= float(dropout) < 0.5:
        raise ValueError(f"zoo('dscnn'): dropout must be in [0, 0.5) (twice it applies before the pool), got {dropout}")
    g = _Builder("dscnn", input_shape, rng)
    v = g.conv("stem.conv", 0, filters, (10, 4), (2, 2))
    v = g.add(ReLU("stem.relu"), g.bn("stem.bn", v))
    if dropout:
        v = g.add(Dropout("stem.dropout", dropout), v)
    for i in range(1, blocks + 1):
        p = f"block{i}."
        v = g.conv(p + "dw", v, filters, (3, 3), group=filters)
        v = g.add(ReLU(p + "dw_relu"), g.bn(p + "dw_bn", v))
        v = g.conv(p + "pw", v, filters, (1, 1))
        v = g.add(ReLU(p + "pw_relu"), g.bn(p + "pw_bn", v))
    if dropout:
        v = g.add(Dropout("dropout", 2 * dropout), v)
    g.head(v, num_classes)
    return g.model()


#: MobileNetV1's depthwise-separable blocks: (pointwise output channels at width 1, stride)
MOBILENET_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
                       (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


def _mobilenetv1(input_shape: Shape, num_classes: int, rng: np.random.Generator, alpha: float = 0.25) -> Model:
    _need_rank("mobilenetv1", input_shape, 3, "[C, H, W]")
    alpha = float(alpha)
    if not 0.0 < alpha <= 4.0:
        raise ValueError(f"zoo('mobilenetv1'): alpha must be in (0, 4], got {alpha}")

    def width(ch: int) -> int:
        return max(1, int(ch * alpha))

    g = _Builder("mobilenetv1", input_shape, rng)
    v = g.conv("stem.conv", 0, width(32), (3, 3), (2, 2))
    v = g.add(Clip("stem.relu6", 0.0, 6.0), g.bn("stem.bn", v))
    for i, (ch, s) in enumerate(MOBILENET_V1_BLOCKS, 1):
        p = f"block{i}."
        c = g.shapes[v][0]
        v = g.conv(p + "dw", v, c, (3, 3), (s, s), group=c)
        v = g.add(Clip(p + "dw_relu6", 0.0, 6.0), g.bn(p + "dw_bn", v))
        v = g.conv(p + "pw", v, width(ch), (1, 1))
        v = g.add(Clip(p + "pw_relu6", 0.0, 6.0), g.bn(p + "pw_bn", v))
    g.head(v, num_classes)
    return g.model()


def _autoencoder(input_shape: Shape, num_classes: int, rng: np.random.Generator, hidden: int = 128,
                 bottleneck: int = 8, depth: int = 4) -> Model:
    hidden = _size("autoencoder", hidden, "hidden")
    bottleneck = _size("autoencoder", bottleneck, "bottleneck")
    depth = _size("autoencoder", depth, "depth")
    g = _Builder("autoencoder", input_shape, rng)
    v = 0
    if len(input_shape) > 1:
        v = g.add(Flatten("flatten"), v)
    stages = ([(f"enc{i}", hidden) for i in range(1, depth + 1)] + [("bottleneck", bottleneck)]
              + [(f"dec{i}", hidden) for i in range(1, depth + 1)])
    for name, units in stages:
        v = g.dense(name + ".fc", v, units)
        v = g.add(ReLU(name + ".relu"), g.bn(name + ".bn", v))
    g.dense("classifier", v, num_classes)
    return g.model()


def _sensor1d(input_shape: Shape, num_classes: int, rng: np.random.Generator,
              channels: Sequence[int] = (16, 32, 64), kernels: Sequence[int] = (5, 5, 3)) -> Model:
    _need_rank("sensor1d", input_shape, 2, "[C, L] (axes x samples)")
    channels = _sizes("sensor1d", channels, "channels")
    kernels = _sizes("sensor1d", kernels, "kernels")
    if len(kernels) != len(channels):
        raise ValueError(f"zoo('sensor1d'): {len(channels)} channels but {len(kernels)} kernels")
    g = _Builder("sensor1d", input_shape, rng)
    v = 0
    for i, (ch, k) in enumerate(zip(channels, kernels), 1):
        p = f"block{i}."
        v = g.conv(p + "conv", v, ch, (k,))
        v = g.add(ReLU(p + "relu"), g.bn(p + "bn", v))
        if i < len(channels):
            if g.shapes[v][1] < 2:
                raise ValueError(f"zoo('sensor1d'): input {list(input_shape)} is too short for "
                                 f"{len(channels)} blocks (block {i} sees length {g.shapes[v][1]})")
            v = g.add(MaxPool2d(p + "pool", kernel=(2,), stride=(2,)), v)
    g.head(v, num_classes)
    return g.model()


def _chain(builder: Callable[..., List[Layer]]) -> Callable[..., Model]:
    def build(input_shape, num_classes, rng, name, **options) -> Model:
        return Model(builder(input_shape, num_classes, rng, **options), input_shape, name=name)
    return build


# name -> (builder(input_shape, num_classes, rng, **options) -> Model, default input shape,
#          default class count, option names)
_ZOO: Dict[str, Tuple[Callable[..., Model], Optional[Shape], Optional[int], Tuple[str, ...]]] = {
    "mlp": (_chain(_mlp), None, None, ("hidden",)),
    "cnn": (_chain(_cnn), None, None, ("channels", "hidden")),
    "resnet8": (_resnet8, (3, 32, 32), 10, ("filters",)),
    "dscnn": (_dscnn, (1, 49, 10), 12, ("filters", "blocks", "dropout")),
    "mobilenetv1": (_mobilenetv1, (3, 96, 96), 2, ("alpha",)),
    "autoencoder": (_autoencoder, (640,), 2, ("hidden", "bottleneck", "depth")),
    "sensor1d": (_sensor1d, (3, 128), 6, ("channels", "kernels")),
}
_CHAINS = ("mlp", "cnn")


def zoo_names() -> List[str]:
    return sorted(_ZOO)


def default_shape(name: str) -> Tuple[Optional[Shape], Optional[int]]:
    """(input shape, class count) the model is built for by default (None: it has no default)."""
    if name not in _ZOO:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(zoo_names())}")
    return _ZOO[name][1], _ZOO[name][2]


def zoo(name: str, input_shape: Optional[Sequence[int]] = None, num_classes: Optional[int] = None, seed: int = 0,
        **options) -> Model:
    """A fresh zoo model. ``zoo("mlp", (64,), 10)``, ``zoo("cnn", (1, 28, 28), 10, channels=(8, 16))``,
    ``zoo("resnet8")`` (CIFAR-10 shape), ``zoo("mobilenetv1", (3, 48, 48), 2)``."""
    entry = _ZOO.get(name)
    if entry is None:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(zoo_names())}")
    builder, shape_default, classes_default, option_names = entry
    if input_shape is None:
        if shape_default is None:
            raise ValueError(f"zoo({name!r}): input_shape is required")
        input_shape = shape_default
    if num_classes is None:
        if classes_default is None:
            raise ValueError(f"zoo({name!r}): num_classes is required")
        num_classes = classes_default
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"zoo({name!r}): input_shape must be a sequence of ints, got {input_shape!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"zoo({name!r}): input_shape must be non-empty and positive, got {shape}")
    if int(num_classes) < 1:
        raise ValueError(f"zoo({name!r}): num_classes must be >= 1, got {num_classes}")
    unknown = sorted(set(options) - set(option_names))
    if unknown:
        raise ValueError(f"zoo({name!r}): unknown option(s) {unknown}; it takes {list(option_names)}")
    rng = np.random.default_rng(seed)
    if name in _CHAINS:
        return builder(shape, int(num_classes), rng, name, **options)
    return builder(shape, int(num_classes), rng, **options)
