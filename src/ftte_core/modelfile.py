"""A model as bytes without ONNX: what the hub sends an agent once (the frozen part travels here).

The agent must stay small (the onnx package alone costs ~13 MB of memory), so the hub ships the
model in this plain format and keeps ONNX for the files users open. No pickle; little-endian:

    magic   4 bytes  b"FTMD"
    version u16      FORMAT_VERSION (2; a reader of version 1 refuses it by this number)
    flags   u16      0 (non-zero is rejected)
    hlen    u32      length of the JSON header
    header  hlen     UTF-8 JSON {"name", "input_shape", "layers": [{"kind", "name", "inputs", attrs...,
                     "params": [[name, shape], ...], "constants": [[name, shape], ...]}]}
    arrays           float32 (<f4), C order: each layer's params then its constants, in header order

Version 3 adds int8 storage of a weight (what ``Layer.quantize_weight`` / ``mix_weight`` hold, the
form a device trains with under ``frozen="int8"``), so the hub can install a model on a device in
about a quarter of the bytes (``install_bytes``). A "params" entry may then be ``[name, shape,
"int8"]``: int8 levels (C order, the weight's shape) then one float32 scale per output row; or
``[name, shape, "mixed", R]``: the frozen rows' int8 levels ((O - R) rows) and their scales, then the
R trained rows' indices (int32) and their float32 values. Only a Dense's or a Conv's weight takes
these forms (a grouped Conv only "int8"). A file with no int8 storage is written as version 2.

Version 4 adds int8 storage of *trained* rows whose float32 values are exactly ``levels * scale``
(the hub quantises the start of a run's trained rows so that they are: ``quantize_trained_rows``):
``[name, shape, "int8-trained", R, F]``: the int8 levels of every row except F (C order, ascending
row index) and their float32 scales, then the R trained rows' indices (int32, the order the
device trains them in; 1 <= R <= O), then the F trained rows kept float32 (0 <= F < R: those whose
values no int8 row reproduces exactly): their indices (int32, ascending) and float32 values. A
trained row's value is ``float32(levels) * scale`` computed in float32 (``graph.dequantize_rows``),
bit for bit what the hub holds. The layer is then mixed over the R rows as with "mixed" (R < O), or
float32 (R = O). A file is version 4 only when some weight takes this form.

The model is a DAG (``graph.Model``): ``inputs`` lists the values a layer reads, 0 for the model
input and j + 1 for layer j's output, so every entry names an earlier layer. ``constants`` are
frozen arrays a layer carries besides its trainable parameters (batch-norm "mean" and "var", the
constant operand "const" of add/sub/mul). Attributes per kind: conv2d/conv1d stride, padding,
group; pools kernel, stride, padding, ceil_mode (+ count_include_pad), one entry per spatial axis
(1-D kinds "maxpool1d"/"avgpool1d"); global_avgpool keepdims; batchnorm eps; add/sub/mul
const_first; leaky_relu alpha; hard_sigmoid alpha, beta; clip lo, hi (null = no bound, as JSON
has no infinities); reshape shape; pad pads, value; transpose perm; dropout p. JSON NaN and
Infinity are refused. Version 1 (a chain of dense/conv2d/pool/activation layers, no "inputs"
and no "constants") is still read.

``model_from_bytes`` checks every length against the header before reading an array and rebuilds
the layers through their constructors, so their own shape checks apply. ``content_hash`` names a
model file by its bytes: the agent caches by it.

A model file comes from the network, and a few hundred bytes can describe a model that needs
gigabytes (a convolution padded by 700 turns an 8x8 input into 1408x1408 maps). So every number
that sizes something is bounded before anything is built (``LIMITS``: kernels, strides, pads,
reshape targets, a layer's inputs; no dimension may be empty), and the graph's values are walked
in order with exact integers so that no value of a sample, and no parameter or constant tensor,
exceeds its element limit. What a model
needs to *train* on a device is then the cost model's question (``cost.predict_memory``): the
agent asks it before it allocates anything.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .binfmt import PREFIX, split_prefixed
from .graph import (AvgPool2d, BatchNorm, Binary, Clip, Concat, Conv1d, Conv2d, Dense, Dropout, Flatten,
                    GlobalAvgPool, HardSigmoid, HardSwish, Layer, LeakyReLU, MaxPool2d, Model, Pad, ReLU, Reshape,
                    Sigmoid, StoredWeight, Tanh, Transpose, dequantize_rows, exact_int8_rows, round_trip_rows)

if TYPE_CHECKING:
    from .subset import Subset

MAGIC = b"FTMD"
#: 2: the model is a DAG (each layer lists the values it reads) and layers carry frozen constants
FORMAT_VERSION = 2
#: 3: version 2 plus int8 storage of Dense/Conv weights (written only when a weight has it)
INT8_FORMAT_VERSION = 3
#: 4: version 3 plus int8 storage of trained rows that are exactly int8 ("int8-trained")
TRAINED_INT8_FORMAT_VERSION = 4
#: versions this reader accepts: 1 is the chain format of earlier releases
READABLE_VERSIONS = (1, 2, 3, 4)
#: the kinds whose "weight" may be stored int8 (version 3)
INT8_KINDS = ("dense", "conv2d", "conv1d")
MAX_HEADER_BYTES = 1 << 20
MAX_LAYERS = 1024
MAX_NAME_CHARS = 1000
DEFAULT_MAX_BYTES = 1 << 30

#: Bounds on what a model file may describe (far above any model a Pi-class device trains).
LIMITS = {
    "input_ndim": 4,                # dimensions of one sample of the input or of any value (reshape targets too)
    "kernel": 64,                   # pooling kernel / convolution kernel height and width
    "stride": 64,
    "padding": 64,                  # convolution and pooling padding, and each entry of a Pad layer's pads
    "inputs": 64,                   # values one layer reads (a Concat's inputs)
    "sample_elements": 1 << 24,     # elements of one sample's input or any value (64 MiB float32)
    "param_elements": 1 << 28,      # elements of one parameter or constant tensor (1 GiB float32)
}

#: the kinds a version-1 file (a chain, no constants) may hold
V1_KINDS = ("dense", "conv2d", "maxpool2d", "avgpool2d", "global_avgpool", "relu", "sigmoid", "tanh", "flatten",
            "dropout")
#: every kind this reader builds
KINDS = V1_KINDS + ("conv1d", "maxpool1d", "avgpool1d", "batchnorm", "add", "sub", "mul", "concat", "leaky_relu",
                    "hard_sigmoid", "clip", "hard_swish", "reshape", "pad", "transpose")
#: frozen arrays each kind carries (name -> required); their bytes follow the layer's parameters
CONSTANTS = {"batchnorm": {"mean": True, "var": True}, "add": {"const": False}, "sub": {"const": False},
             "mul": {"const": False}}


class ModelFileError(ValueError):
    """Bytes that are not a well-formed model file (one-line reason)."""


class ModelTooLarge(ModelFileError):
    """A well-formed model whose weights alone exceed what the reader allows (``max_param_bytes``)."""

    def __init__(self, message: str, param_bytes: int):
        super().__init__(message)
        self.param_bytes = int(param_bytes)


def _bound(value: float) -> Optional[float]:
    """A Clip bound for JSON, which has no infinities: None stands for "no bound"."""
    return None if math.isinf(value) else value


def _attrs(layer: Layer) -> Dict[str, object]:
    if isinstance(layer, Conv2d):  # and Conv1d
        return {"stride": list(layer.stride), "padding": list(layer.padding), "group": layer.group}
    if isinstance(layer, AvgPool2d):
        return {"kernel": list(layer.kernel), "stride": list(layer.stride), "padding": list(layer.padding),
                "ceil_mode": layer.ceil_mode, "count_include_pad": layer.count_include_pad}
    if isinstance(layer, MaxPool2d):
        return {"kernel": list(layer.kernel), "stride": list(layer.stride), "padding": list(layer.padding),
                "ceil_mode": layer.ceil_mode}
    if isinstance(layer, GlobalAvgPool):
        return {"keepdims": layer.keepdims}
    if isinstance(layer, BatchNorm):
        return {"eps": layer.eps}
    if isinstance(layer, Binary):
        return {"const_first": layer.const_first}
    if isinstance(layer, LeakyReLU):
        return {"alpha": layer.alpha}
    if isinstance(layer, HardSigmoid):
        return {"alpha": layer.alpha, "beta": layer.beta}
    if isinstance(layer, Clip):
        if layer.lo == math.inf or layer.hi == -math.inf:
            raise ValueError(f"layer {layer.name!r}: Clip [{layer.lo}, {layer.hi}] has no finite output to save")
        return {"lo": _bound(layer.lo), "hi": _bound(layer.hi)}
    if isinstance(layer, Reshape):
        return {"shape": list(layer.shape)}
    if isinstance(layer, Pad):
        return {"pads": list(layer.pads), "value": layer.value}
    if isinstance(layer, Transpose):
        return {"perm": list(layer.perm)}
    if isinstance(layer, Dropout):
        return {"p": layer.p}
    if layer.kind in ("dense", "relu", "sigmoid", "tanh", "hard_swish", "flatten", "concat"):
        return {}
    raise ValueError(f"layer {layer.name!r}: kind {layer.kind!r} has no model file form")


def _stored_weight(layer: Layer) -> Optional[Tuple[list, List[bytes]]]:
    """(header entry, arrays) of a weight held int8 or mixed, else None (float32; so is a mixed
    weight whose rows all train; one with none trained is int8)."""
    if getattr(layer, "is_mixed", False) and 0 < layer.trained_rows.size < layer.weight_shape[0]:
        rows = layer.trained_rows
        return (["weight", list(layer.weight_shape), "mixed", int(rows.size)],
                [layer.weight_q.tobytes(), layer.weight_scale.astype("<f4").tobytes(), rows.astype("<i4").tobytes(),
                 np.ascontiguousarray(layer.weight_trained, dtype="<f4").tobytes()])
    if getattr(layer, "is_int8", False) or (getattr(layer, "is_mixed", False) and not layer.trained_rows.size):
        return (["weight", list(layer.weight_shape), "int8"],
                [layer.weight_q.tobytes(), layer.weight_scale.astype("<f4").tobytes()])
    return None


def _trained_int8_weight(layer: Layer, rows: np.ndarray) -> Optional[Tuple[list, List[bytes]]]:
    """(header entry, arrays) of ``layer``'s weight in the "int8-trained" form (version 4), its
    rows ``rows`` trained, or None when no trained row is exactly int8 (the version-3 forms say
    it as well). ``layer`` holds the weight mixed over ``rows`` or float32 (``rows`` all of them);
    the frozen rows keep the int8 levels the mixed weight holds. Each trained row is stored int8
    only if dequantising it gives its float32 bits back (``exact_int8_rows``), else float32."""
    shape = tuple(layer.weight_shape)
    o = shape[0]
    if layer.is_mixed:
        trained = layer.weight_trained
        levels = np.empty(shape, np.int8)
        scales = np.empty(o, np.float32)
        frozen = layer.row_slot < 0
        levels[frozen], scales[frozen] = layer.weight_q, layer.weight_scale
    else:
        trained = np.asarray(layer.weight)[rows]
        levels, scales = np.zeros(shape, np.int8), np.zeros(o, np.float32)
    q, scale, exact = exact_int8_rows(trained)
    if not exact.any():
        return None
    levels[rows[exact]], scales[rows[exact]] = q[exact], scale[exact]
    float_rows = np.sort(rows[~exact]).astype(np.int32)
    keep = np.ones(o, bool)
    keep[float_rows] = False
    by_row = np.empty((o,) + shape[1:], np.float32)
    by_row[rows] = trained
    return (["weight", list(shape), "int8-trained", int(rows.size), int(float_rows.size)],
            [levels[keep].tobytes(), scales[keep].astype("<f4").tobytes(), rows.astype("<i4").tobytes(),
             float_rows.astype("<i4").tobytes(), np.ascontiguousarray(by_row[float_rows], dtype="<f4").tobytes()])


def model_to_bytes(model: Model, int8_storage: bool = False,
                   trained_int8: Optional[Dict[str, Tuple[list, List[bytes]]]] = None) -> bytes:
    """The model as a file: header, then each layer's parameters and constants, float32 (version 2).

    ``int8_storage``: weights the model holds int8 or mixed are written as they are held (version
    3, when there is one), not as their dequantised float32 values. ``trained_int8``: layer name
    -> its weight in the "int8-trained" form (``_trained_int8_weight``; version 4)."""
    layers, arrays = [], []
    version = FORMAT_VERSION
    trained_int8 = trained_int8 or {}
    for layer, ins in zip(model.layers, model.inputs):
        stored = _stored_weight(layer) if int8_storage else None
        if layer.name in trained_int8:
            stored = trained_int8[layer.name]
            version = TRAINED_INT8_FORMAT_VERSION
        # (params() would dequantise a stored weight only for it to be skipped)
        params = {"weight": None, "bias": layer.bias} if stored is not None else layer.params()
        consts = layer.constants()
        entries = []
        for k, v in params.items():
            if k == "weight" and stored is not None:
                entries.append(stored[0])
                arrays.extend(stored[1])
                version = max(version, INT8_FORMAT_VERSION)
            else:
                entries.append([k, list(v.shape)])
                arrays.append(np.ascontiguousarray(v, dtype="<f4").tobytes())
        layers.append({"kind": layer.kind, "name": layer.name, "inputs": list(ins), **_attrs(layer),
                       "params": entries, "constants": [[k, list(v.shape)] for k, v in consts.items()]})
        for v in consts.values():
            arrays.append(np.ascontiguousarray(v, dtype="<f4").tobytes())
    header = json.dumps({"name": model.name, "input_shape": list(model.input_shape), "layers": layers},
                        separators=(",", ":"), allow_nan=False).encode()
    return b"".join([PREFIX.pack(MAGIC, version, 0, len(header)), header] + arrays)


def install_bytes(model: Model, subset: "Subset", frozen: str,
                  model_format: int = TRAINED_INT8_FORMAT_VERSION) -> bytes:
    """The model file the hub installs on a device that trains ``subset`` (its tier's, for
    ftte-tiered) with frozen weights ``frozen``: with "int8", every weight the subset trains no row
    of is stored as the device will hold it anyway (``Trainer(frozen="int8")``: int8 with a scale
    per row; partly trained: mixed, the subset's rows float32 and exact), about a quarter of the
    float32 bytes; with "float32", the float32 file. ``model_format`` is the newest model file
    version the device reads: from 4, trained rows whose values are exactly int8 (a quantised
    start, ``quantize_trained_rows``) are stored int8 too ("int8-trained"; exactness is verified
    row by row, the others stay float32); a model with no such row gives the version-3 install.
    Deterministic: a resumed run rebuilds the same bytes (agents find it cached by its hash).
    ``model`` is left as it was."""
    from .plan import check_frozen, int8_layers, mixed_layers

    if check_frozen(frozen) == "float32" or model_format < INT8_FORMAT_VERSION:
        return model_to_bytes(model)
    held = model.copy()
    for name in int8_layers(held, subset, frozen):
        held.layer(name).quantize_weight()
    mixed = mixed_layers(held, subset, frozen)
    for name in mixed:
        held.layer(name).mix_weight(subset.get(name).rows)
    trained_int8 = {}
    if model_format >= TRAINED_INT8_FORMAT_VERSION:
        for layer in held.param_layers:
            ls = subset.get(layer.name)
            if not getattr(layer, "int8_capable", False) or ls is None or not ls.rows.size:
                continue
            if layer.name in mixed or (layer._weight is not None and ls.rows.size == layer.weight_shape[0]):
                form = _trained_int8_weight(layer, ls.rows)
                if form is not None:
                    trained_int8[layer.name] = form
    return model_to_bytes(held, int8_storage=True, trained_int8=trained_int8)


def trained_int8_rows(model: Model, subsets: Sequence["Subset"]) -> Dict[str, np.ndarray]:
    """Layer name -> the weight rows ``quantize_trained_rows`` quantises: of every Dense and Conv,
    the rows any of ``subsets`` trains where an install can store them int8 ("int8-trained": a
    group-1 weight, or one that subset trains whole; a grouped convolution partly trained stays
    float32, so quantising its rows would cost accuracy for no byte)."""
    out: Dict[str, np.ndarray] = {}
    for layer in model.param_layers:
        if not getattr(layer, "int8_capable", False):
            continue
        o = layer.weight_shape[0]
        rows = [ls.rows for ls in (s.get(layer.name) for s in subsets) if ls is not None and ls.rows.size
                and (getattr(layer, "mode", "dense") == "dense" or ls.rows.size == o)]
        if rows:
            out[layer.name] = np.unique(np.concatenate(rows)).astype(np.int32)
    return out


def quantize_trained_rows(model: Model, subsets: Sequence["Subset"]) -> int:
    """Replace, in place, the values of every weight row some subset trains (``trained_int8_rows``)
    by its per-row int8 round trip (``graph.round_trip_rows``: the quantiser of frozen int8
    weights, then ``dequantize_rows``), so an install can carry those rows as int8 exactly
    (version 4). The hub does it once, when a run starts, before it writes the run's model file;
    every file and value of the run derives from the result. Biases stay as they are. Returns the
    number of values quantised. ``model``'s weights must be float32 (a hub's model)."""
    n = 0
    for name, rows in trained_int8_rows(model, subsets).items():
        layer = model.layer(name)
        if layer._weight is None:
            raise ValueError(f"layer {name!r} holds int8 weights: quantise the start of a float32 model")
        layer._weight[rows] = round_trip_rows(layer._weight[rows])
        n += int(layer._weight[rows].size)
    return n


def content_hash(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ints(name: str, what: str, values, count, lo: int, hi: int) -> List[int]:
    """Integers in [lo, hi] from a header list of ``count`` entries (an int, or a (min, max) range),
    or ModelFileError naming the layer."""
    lo_n, hi_n = (count, count) if isinstance(count, int) else count
    if (not isinstance(values, list) or not lo_n <= len(values) <= hi_n
            or not all(_is_int(v) for v in values)):
        n = f"{lo_n}" if lo_n == hi_n else f"{lo_n} to {hi_n}"
        raise ModelFileError(f"layer {name!r}: {what} must be a list of {n} integers")
    if not all(lo <= v <= hi for v in values):
        raise ModelFileError(f"layer {name!r}: {what} {values} is outside the limit [{lo}, {hi}]")
    return list(values)


def _float(name: str, what: str, value, lo: float = -math.inf) -> float:
    """A finite number >= lo from the header (JSON has no NaN or infinities; the parser refuses them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < lo:
        raise ModelFileError(f"layer {name!r}: {what} must be a finite number{f' >= {lo:g}' if lo > -math.inf else ''},"
                             f" got {str(value)[:40]}")
    return float(value)


def _bool(name: str, what: str, value) -> bool:
    if not isinstance(value, bool):
        raise ModelFileError(f"layer {name!r}: {what} must be true or false, got {str(value)[:40]}")
    return value


def _check_shape(where: str, shape: Sequence[int], limit: int, what: str) -> None:
    if any(d < 1 for d in shape):  # an empty dimension would let other sizes (a bias's rows) grow for free
        raise ModelFileError(f"{where}: {what} {list(shape)[:8]} has an empty dimension")
    n = math.prod(shape)
    if n > limit:
        raise ModelFileError(f"{where}: {what} {list(shape)} has {n:,} elements, over the limit of {limit:,}")


def check_model_size(model: Model) -> None:
    """Every value of the graph (the input and each layer's output, per sample) and every parameter
    and constant tensor stays within ``LIMITS``."""
    _check_shape("model", model.input_shape, LIMITS["sample_elements"], "input shape")
    for layer, out_shape in zip(model.layers, model.shapes[1:]):
        _check_shape(f"layer {layer.name!r}", out_shape, LIMITS["sample_elements"], "output shape")
        for pname, shape in _array_shapes(layer).items():
            _check_shape(f"layer {layer.name!r}", shape, LIMITS["param_elements"], f"{pname} shape")


def _array_shapes(layer: Layer) -> Dict[str, Tuple[int, ...]]:
    """Each parameter's and constant's shape, without materialising an int8 weight as float32
    (``params()`` would: a large frozen layer read from an install would then exist twice)."""
    if getattr(layer, "int8_capable", False):
        shapes = {"weight": tuple(layer.weight_shape), "bias": tuple(layer.bias.shape)}
    else:
        shapes = {k: tuple(v.shape) for k, v in layer.params().items()}
    return {**shapes, **{k: tuple(v.shape) for k, v in layer.constants().items()}}


def _build(kind: str, name: str, spec: dict, p: Dict[str, np.ndarray], c: Dict[str, np.ndarray],
           version: int) -> Layer:
    L = LIMITS

    def pool_args(dims: int):
        return dict(kernel=_ints(name, "kernel", spec["kernel"], dims, 1, L["kernel"]),
                    stride=_ints(name, "stride", spec["stride"], dims, 1, L["stride"]),
                    padding=_ints(name, "padding", spec["padding"], 2 * dims, 0, L["padding"]),
                    ceil_mode=_bool(name, "ceil_mode", spec["ceil_mode"]))

    if kind == "dense":
        return Dense(name, p["weight"], p.get("bias"))
    if kind in ("conv2d", "conv1d"):
        dims = 2 if kind == "conv2d" else 1
        w = p["weight"]
        if w.ndim != dims + 2:
            raise ModelFileError(f"layer {name!r}: a {kind} weight has {dims + 2} dimensions, got {w.ndim}")
        if max(w.shape[2:]) > L["kernel"]:
            raise ModelFileError(f"layer {name!r}: kernel {list(w.shape[2:])} is over the limit of {L['kernel']}")
        group = _ints(name, "group", [spec["group"]], 1, 1, w.shape[0])[0] if version >= 2 else 1
        cls = Conv2d if dims == 2 else Conv1d
        return cls(name, w, p.get("bias"), stride=_ints(name, "stride", spec["stride"], dims, 1, L["stride"]),
                   padding=_ints(name, "padding", spec["padding"], 2 * dims, 0, L["padding"]), group=group)
    if kind in ("maxpool2d", "maxpool1d"):
        return MaxPool2d(name, **pool_args(2 if kind.endswith("2d") else 1))
    if kind in ("avgpool2d", "avgpool1d"):
        return AvgPool2d(name, **pool_args(2 if kind.endswith("2d") else 1),
                         count_include_pad=_bool(name, "count_include_pad", spec["count_include_pad"]))
    if kind == "global_avgpool":
        return GlobalAvgPool(name, keepdims=_bool(name, "keepdims", spec["keepdims"]) if version >= 2 else True)
    if kind == "batchnorm":
        return BatchNorm(name, p["weight"], p["bias"], c["mean"], c["var"], eps=_float(name, "eps", spec["eps"], 0.0))
    if kind in Binary.OPS:
        return Binary(name, kind, const=c.get("const"), const_first=_bool(name, "const_first", spec["const_first"]))
    if kind == "leaky_relu":
        return LeakyReLU(name, _float(name, "alpha", spec["alpha"]))
    if kind == "hard_sigmoid":
        return HardSigmoid(name, _float(name, "alpha", spec["alpha"]), _float(name, "beta", spec["beta"]))
    if kind == "clip":
        lo, hi = spec["lo"], spec["hi"]
        return Clip(name, -math.inf if lo is None else _float(name, "lo", lo),
                    math.inf if hi is None else _float(name, "hi", hi))
    if kind == "reshape":
        shape = _ints(name, "shape", spec["shape"], (1, L["input_ndim"]), 1, L["sample_elements"])
        _check_shape(f"layer {name!r}", shape, L["sample_elements"], "reshape target")
        return Reshape(name, shape)
    if kind == "pad":
        pads = _ints(name, "pads", spec["pads"], (2, 2 * L["input_ndim"]), 0, L["padding"])
        if len(pads) % 2:
            raise ModelFileError(f"layer {name!r}: pads must be begins then ends (an even count), got {len(pads)}")
        return Pad(name, pads, _float(name, "value", spec["value"]))
    if kind == "transpose":
        perm = spec["perm"]
        n = len(perm) if isinstance(perm, list) else 0
        return Transpose(name, _ints(name, "perm", perm, (1, L["input_ndim"]), 0, max(n - 1, 0)))
    if kind == "dropout":
        return Dropout(name, _float(name, "p", spec["p"], 0.0))
    simple = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh, "flatten": Flatten, "hard_swish": HardSwish,
              "concat": Concat}
    if kind in simple:
        return simple[kind](name)
    raise ModelFileError(f"layer {name!r}: unknown kind {kind!r}")


def _expected_arrays(kind: str, field: str, got: Dict[str, np.ndarray], name: str) -> None:
    """The parameter or constant names a layer of this kind carries, no more, no fewer."""
    if field == "params":
        wanted = {"weight": True, "bias": True} if kind in ("dense", "conv2d", "conv1d", "batchnorm") else {}
    else:
        wanted = CONSTANTS.get(kind, {})
    extra = sorted(set(got) - set(wanted))
    missing = sorted(k for k, required in wanted.items() if required and k not in got)
    if extra or missing:
        raise ModelFileError(f"layer {name!r}: a {kind} layer's {field} are {sorted(wanted)}, got {sorted(got)}")


def _reject_constant(token: str):
    raise ValueError(f"{token} is not a JSON number")


def _walk_shapes(layers: List[Layer], inputs: List[List[int]], input_shape: Sequence[int]) -> None:
    """Each value's shape, layer by layer, checked against the limits before the next is computed
    (so no size grows beyond them, and a layer sees its real input shapes when it checks them)."""
    shapes = [tuple(input_shape)]
    for layer, ins in zip(layers, inputs):
        try:
            out = tuple(int(d) for d in layer.out_shape(*[shapes[v] for v in ins]))
        except ValueError as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            text = text[len(layer.name) + 2:] if text.startswith(f"{layer.name}: ") else text
            raise ModelFileError(f"layer {layer.name!r}: {text[:300]}") from None
        if not 1 <= len(out) <= LIMITS["input_ndim"]:
            raise ModelFileError(f"layer {layer.name!r}: output shape {list(out)[:8]} must have 1 to "
                                 f"{LIMITS['input_ndim']} dimensions")
        _check_shape(f"layer {layer.name!r}", out, LIMITS["sample_elements"], "output shape")
        shapes.append(out)


_NATIVE = {"i1": np.int8, "<i4": np.int32, "<f4": np.float32}


def _take(mv: memoryview, offset: int, count: int, dtype: str, shape: Tuple[int, ...], what: str
          ) -> Tuple[np.ndarray, int]:
    """An owned, writable copy of ``count`` items of ``dtype`` at ``offset`` (bounds checked)."""
    size = np.dtype(dtype).itemsize * count
    if offset + size > mv.nbytes:
        raise ModelFileError(f"model file is truncated: {what} needs {size} bytes at offset {offset}, "
                             f"the file has {mv.nbytes}")
    # reshape the read-only view first, then copy once: the copy is owned and writable, which
    # the layers need (training updates weights in place)
    # (to the builtin native dtype object: the kernels compare dtypes by identity)
    arr = np.frombuffer(mv[offset:offset + size], dtype=dtype).reshape(shape).astype(_NATIVE[dtype])
    return arr, offset + size


def _read_trained_int8(entry: list, shape: Tuple[int, ...], what: str, mv: memoryview, offset: int
                       ) -> Tuple[object, int]:
    """A version-4 weight [name, shape, "int8-trained", R, F] (see the module docstring): a
    StoredWeight mixed over its R trained rows, or (R = O) a float32 array."""
    o, rest = shape[0], shape[1:]
    per_row = math.prod(rest)
    r, f = entry[3], entry[4]
    if not (_is_int(r) and _is_int(f) and 1 <= r <= o and 0 <= f < r):
        raise ModelFileError(f"{what}: storage must be [name, shape, \"int8-trained\", trained rows in 1..{o}, "
                             f"float32 rows in 0..trained rows - 1]")
    n = o - f
    q, offset = _take(mv, offset, n * per_row, "i1", (n,) + rest, what)
    scale, offset = _take(mv, offset, n, "<f4", (n,), what)
    rows, offset = _take(mv, offset, r, "<i4", (r,), what)
    frows, offset = _take(mv, offset, f, "<i4", (f,), what)
    fvals, offset = _take(mv, offset, f * per_row, "<f4", (f,) + rest, what)
    if q.size and int(q.min()) == -128:  # (min, not q == -128: no temporary the size of q)
        raise ModelFileError(f"{what}: int8 rows hold -128, outside the quantiser's [-127, 127]")
    if not np.all(np.isfinite(scale)) or np.any(scale < 0):
        raise ModelFileError(f"{what}: row scales must be finite and >= 0")
    if rows.min() < 0 or rows.max() >= o or np.unique(rows).size != r:
        raise ModelFileError(f"{what}: trained rows must be unique and in [0, {o})")
    trains = np.zeros(o, bool)
    trains[rows] = True
    if f and (np.any(np.diff(frows) <= 0) or frows[0] < 0 or frows[-1] >= o or not trains[frows].all()):
        raise ModelFileError(f"{what}: float32 rows must be ascending and among the trained rows")
    if not np.all(np.isfinite(fvals)):
        raise ModelFileError(f"{what}: float32 rows hold NaN or Inf")
    slot = np.full(o, -1, np.int64)   # each row's place in q (int8) or, ~slot, in fvals (float32)
    is_float = np.zeros(o, bool)
    is_float[frows] = True
    slot[~is_float] = np.arange(n)
    slot[frows] = ~np.arange(f)
    trained = np.empty((r,) + rest, np.float32)
    at = slot[rows]
    int8_rows = at >= 0
    trained[int8_rows] = dequantize_rows(q[at[int8_rows]], scale[at[int8_rows]])
    trained[~int8_rows] = fvals[~at[~int8_rows]]
    if r == o:   # every row trains: a float32 weight
        w = np.empty(shape, np.float32)
        w[rows] = trained
        return w, offset
    frozen = slot[~trains]   # ascending rows, all int8 (float32 rows are trained rows)
    try:
        return StoredWeight(shape, q[frozen], scale[frozen], rows, trained), offset
    except ValueError as e:
        raise ModelFileError(f"{what}: {e}") from None


def _read_stored(entry: list, shape: Tuple[int, ...], what: str, mv: memoryview, offset: int,
                 version: int = INT8_FORMAT_VERSION) -> Tuple[object, int]:
    """A version-3 weight held int8 ([name, shape, "int8"]) or mixed ([name, shape, "mixed", R]),
    or a version-4 "int8-trained" one (``_read_trained_int8``)."""
    form = entry[2]
    o, per_row = shape[0], math.prod(shape[1:])
    if form == "int8-trained" and version >= TRAINED_INT8_FORMAT_VERSION and len(entry) == 5:
        return _read_trained_int8(entry, shape, what, mv, offset)
    if form == "int8" and len(entry) == 3:
        r = None
    elif form == "mixed" and len(entry) == 4 and _is_int(entry[3]) and 0 < entry[3] < o:
        r = entry[3]   # (0 or all rows float32 is not mixed: "int8" or a float32 weight says it)
    else:
        raise ModelFileError(f"{what}: storage must be [name, shape, \"int8\"] or [name, shape, \"mixed\", "
                             f"trained rows in 1..{o - 1}]"
                             + (" or [name, shape, \"int8-trained\", R, F]"
                                if version >= TRAINED_INT8_FORMAT_VERSION else ""))
    frozen = o - (r or 0)
    q, offset = _take(mv, offset, frozen * per_row, "i1", (frozen,) + shape[1:], what)
    scale, offset = _take(mv, offset, frozen, "<f4", (frozen,), what)
    rows = trained = None
    if r is not None:
        rows, offset = _take(mv, offset, r, "<i4", (r,), what)
        trained, offset = _take(mv, offset, r * per_row, "<f4", (r,) + shape[1:], what)
    try:
        return StoredWeight(shape, q, scale, rows, trained), offset
    except ValueError as e:
        raise ModelFileError(f"{what}: {e}") from None


def _read_arrays(spec: dict, field: str, name: str, mv: memoryview, offset: int, ndims: Tuple[int, int],
                 limit: int, version: int = FORMAT_VERSION) -> Tuple[Dict[str, object], int]:
    entries = spec[field]
    if not isinstance(entries, list) or len(entries) > 4:
        raise ModelFileError(f"layer {name!r}: {field} must be a list of at most 4 [name, shape] pairs")
    out: Dict[str, object] = {}
    stored_ok = version >= INT8_FORMAT_VERSION and field == "params" and spec.get("kind") in INT8_KINDS
    for entry in entries:
        longest = (5 if version >= TRAINED_INT8_FORMAT_VERSION else 4) if stored_ok else 2
        if not isinstance(entry, list) or not 2 <= len(entry) <= longest \
                or not isinstance(entry[0], str) or not isinstance(entry[1], list):
            raise ModelFileError(f"layer {name!r}: each of its {field} must be [name, shape]"
                                 + (" (or an int8 weight's [name, shape, form, ...])" if stored_ok else ""))
        aname, shape = entry[0], entry[1]
        if aname in out:
            raise ModelFileError(f"layer {name!r}: {aname!r} appears twice in its {field}")
        if not ndims[0] <= len(shape) <= ndims[1] or not all(_is_int(d) for d in shape):
            raise ModelFileError(f"layer {name!r}: bad shape {shape[:8]} for {aname[:40]!r}")
        shape = tuple(shape)
        _check_shape(f"layer {name!r}", shape, limit, f"{aname[:40]} shape")
        what = f"{name}.{aname[:40]}"
        if len(entry) > 2:
            if aname != "weight":
                raise ModelFileError(f"layer {name!r}: only its weight may be stored int8, not {aname[:40]!r}")
            out[aname], offset = _read_stored(entry, shape, what, mv, offset, version)
            continue
        arr, offset = _take(mv, offset, math.prod(shape), "<f4", shape, what)
        if not np.all(np.isfinite(arr)):
            raise ModelFileError(f"{what} holds NaN or Inf")
        out[aname] = arr
    return out, offset


def _declared_float32_bytes(specs: list) -> int:
    """4 bytes for every element the header declares in params and constants, whatever its
    storage. An entry that is not a [name, shape, ...] list of integers counts nothing here: the
    reader refuses it a moment later with its own message."""
    total = 0
    for spec in specs:
        for field in ("params", "constants"):
            entries = spec.get(field)
            for entry in entries if isinstance(entries, list) else ():
                if isinstance(entry, list) and len(entry) >= 2 and isinstance(entry[1], list) \
                        and len(entry[1]) <= 8 and all(_is_int(d) and d >= 0 for d in entry[1]):
                    total += 4 * math.prod(entry[1])
    return total


def model_from_bytes(buf, max_bytes: int = DEFAULT_MAX_BYTES, max_param_bytes: Optional[int] = None) -> Model:
    """Parse and rebuild (format versions 2 to 4, or a version-1 chain); any defect raises
    ModelFileError with a one-line reason.

    ``max_param_bytes``: weights and constants larger than this as float32 (int8-stored weights
    count 4 bytes an element, as the float32 file of the same model) raise ``ModelTooLarge``
    before any array is copied (a device refuses a model whose weights alone exceed its memory
    budget).
    """
    mv, header, offset = split_prefixed(buf, "model file", MAGIC, READABLE_VERSIONS, max_bytes, MAX_HEADER_BYTES,
                                        ModelFileError)
    version = PREFIX.unpack_from(mv, 0)[1]
    n = mv.nbytes
    if max_param_bytes is not None and n - offset > max_param_bytes:  # the arrays fill the rest of the file
        raise ModelTooLarge(f"the model's weights are {n - offset:,} bytes, over the limit of {max_param_bytes:,}",
                            n - offset)
    try:
        head = json.loads(header.decode(), parse_constant=_reject_constant)
        if not isinstance(head, dict):
            raise ValueError("the header must be a JSON object")
        name, input_shape, specs = head["name"], head["input_shape"], head["layers"]
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            raise ValueError(f"'name' must be a string of at most {MAX_NAME_CHARS} characters")
        if not isinstance(input_shape, list) or not all(_is_int(d) for d in input_shape):
            raise ValueError("'input_shape' must be a list of integers")
        if not isinstance(specs, list) or not 1 <= len(specs) <= MAX_LAYERS or \
                not all(isinstance(s, dict) for s in specs):
            raise ValueError(f"'layers' must be a list of 1 to {MAX_LAYERS} objects")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError) as e:
        raise ModelFileError(f"bad model header: {str(e)[:200]}") from None
    except RecursionError:  # JSON nested deeper than the interpreter's stack
        raise ModelFileError("bad model header: JSON nested too deeply") from None
    if max_param_bytes is not None and version >= INT8_FORMAT_VERSION:
        # int8 weights are a quarter of their float32 bytes: the limit is on what the weights are
        # as float32, as for a file without int8 storage, so it means the same for both forms
        as_float32 = _declared_float32_bytes(specs)
        if as_float32 > max_param_bytes:
            raise ModelTooLarge(f"the model's weights are {as_float32:,} bytes as float32, over the limit of "
                                f"{max_param_bytes:,}", as_float32)
    if not 1 <= len(input_shape) <= LIMITS["input_ndim"]:
        raise ModelFileError(f"input shape {input_shape[:8]} must have 1 to {LIMITS['input_ndim']} dimensions")
    _check_shape("model", input_shape, LIMITS["sample_elements"], "input shape")
    layers: List[Layer] = []
    inputs: List[List[int]] = []
    try:
        for i, spec in enumerate(specs):
            lname, kind = spec["name"], spec["kind"]
            if not isinstance(lname, str) or not 1 <= len(lname) <= MAX_NAME_CHARS:
                raise ModelFileError(f"layer {i}: its name must be a string of 1 to {MAX_NAME_CHARS} characters")
            if not isinstance(kind, str):
                raise ModelFileError(f"layer {lname!r}: its kind must be a string")
            if kind not in KINDS:
                raise ModelFileError(f"layer {lname!r}: unknown kind {kind[:40]!r}")
            if version == 1 and kind not in V1_KINDS:
                raise ModelFileError(f"layer {lname!r}: kind {kind[:40]!r} needs model file format version 2")
            params, offset = _read_arrays(spec, "params", lname, mv, offset, (1, 4), LIMITS["param_elements"],
                                          version)
            consts: Dict[str, np.ndarray] = {}
            if version >= 2:
                consts, offset = _read_arrays(spec, "constants", lname, mv, offset, (0, LIMITS["input_ndim"] + 1),
                                              LIMITS["param_elements"])
                _expected_arrays(kind, "params", params, lname)
                _expected_arrays(kind, "constants", consts, lname)
            layer = _build(kind, lname, spec, params, consts, version)
            # the values this layer reads: 0 = the model input, j + 1 = layer j's output, all before it
            ins = _ints(lname, "inputs", spec["inputs"], (1, LIMITS["inputs"]), 0, i) if version >= 2 else [i]
            if layer.arity and len(ins) != layer.arity:
                raise ModelFileError(f"layer {lname!r} ({layer.kind}) takes {layer.arity} input"
                                     f"{'s' if layer.arity > 1 else ''}, the file lists {len(ins)}")
            layers.append(layer)
            inputs.append(ins)
        if offset != n:
            raise ModelFileError(f"model file has {n - offset} trailing bytes after its arrays")
        _walk_shapes(layers, inputs, input_shape)
        model = Model(layers, input_shape, name=name, inputs=inputs)
        check_model_size(model)
        return model
    except ModelFileError:
        raise
    except KeyError as e:
        raise ModelFileError(f"bad model file: a layer lacks the field {str(e)[:60]}") from None
    except (ValueError, TypeError, IndexError, OverflowError) as e:  # a huge or infinite size, too
        raise ModelFileError(f"bad model file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
