"""ONNX in and out: ``load_model`` turns an ONNX graph (a DAG: residual adds, branches that
concatenate) into a ``Model``; ``save_onnx`` / ``to_onnx`` write a ``Model`` back out with its
current weights.

Import accepts what the engine can train: one data input, one output, nodes in ONNX's
topological order, each reading graph tensors and constants (initializers or Constant nodes).
Tensors are tracked by name, so one may feed several nodes. Nodes whose outputs never reach the
graph output are dropped. Anything else is an ``OnnxImportError`` naming the op and node, never
a protobuf traceback, because the hub takes model files from users and must say what is wrong
with them. Layers are named after their nodes (sanitised, made unique): a subset names them.
The accepted ops are listed in docs/engine.md ("ONNX in and out").
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto

from .atomic import atomic_write
from .graph import (AvgPool2d, BatchNorm, Binary, Clip, Concat, Conv1d, Conv2d, Dense, Dropout, Flatten,
                    GlobalAvgPool, HardSigmoid, HardSwish, Layer, LeakyReLU, MaxPool2d, Model, Pad, ReLU,
                    Reshape, Sigmoid, Tanh, Transpose)

__all__ = ["OnnxImportError", "load_model", "save_onnx", "to_onnx"]

Shape = Tuple[int, ...]


class OnnxImportError(ValueError):
    """The ONNX model cannot be read or uses something the engine does not support."""


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------

def _read(source) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        try:
            return onnx.load_model_from_string(bytes(source))
        except Exception as e:  # protobuf DecodeError and friends
            raise OnnxImportError(f"not a valid ONNX model ({len(source)} bytes): {_short(e)}") from None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise OnnxImportError(f"cannot read ONNX file {path!r}: no such file")
        try:
            return onnx.load(path)
        except Exception as e:
            raise OnnxImportError(f"cannot read ONNX file {path!r}: {_short(e)}") from None
    raise OnnxImportError(f"load_model takes a path, bytes or onnx.ModelProto, got {type(source).__name__}")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _attrs(node: onnx.NodeProto) -> Dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name if node.name else f"#{index} (unnamed {node.op_type})"


def _live_nodes(nodes: Sequence[onnx.NodeProto], output: str) -> List[Tuple[int, onnx.NodeProto]]:
    """(index, node) of the nodes that the graph output depends on, in their order."""
    needed = {output}
    live = []
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        if any(t in needed for t in node.output if t):
            live.append((i, node))
            needed.update(t for t in node.input if t)
    return live[::-1]


class _Importer:
    """Walks the live nodes once. ``values`` maps a tensor name to a value id of the model (0 the
    input, j + 1 the output of layer j); aliases (Identity, a dropped final Softmax, a folded bias
    Add) map to the same id."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.opset = 1
        for op in model.opset_import:
            if op.domain in ("", "ai.onnx"):
                self.opset = op.version
        self.consts: Dict[str, np.ndarray] = {}
        for init in self.graph.initializer:
            self.consts[init.name] = self._tensor(init, f"initializer {init.name!r}")
        self.layers: List[Layer] = []
        self.inputs: List[Tuple[int, ...]] = []
        self.shapes: List[Shape] = []
        self.values: Dict[str, int] = {}
        self.out_tensor: Dict[int, str] = {}  # value id -> the tensor its layer wrote (not an alias)
        self.softmaxed: Dict[str, str] = {}  # tensor -> label of the Softmax that made it
        # int vectors computed from tensor shapes (torch's x.view(x.size(0), -1)); None = the batch
        # size, known only at run time. Fully known ones go to consts instead.
        self.shape_values: Dict[str, Tuple[List[Optional[int]], bool]] = {}  # name -> (entries, is scalar)
        self.used_names: set = set()
        self.op_counts: Dict[str, int] = {}

    @staticmethod
    def _tensor(t: onnx.TensorProto, what: str) -> np.ndarray:
        # onnx.load(path) has already pulled external data in (with its own path checks); one
        # still marked external came as bytes/proto, and reading it would open files relative to
        # the current directory on the say-so of the model: refuse.
        if t.data_location == TensorProto.EXTERNAL:
            raise OnnxImportError(f"cannot read {what}: it is stored as external data; "
                                  f"load the model from its file path instead of bytes")
        try:
            return numpy_helper.to_array(t)
        except Exception as e:  # external data missing, bad raw_data size, ...
            raise OnnxImportError(f"cannot read {what}: {_short(e)}") from None

    # -- helpers -----------------------------------------------------------------------------
    def _fail(self, msg: str) -> None:
        raise OnnxImportError(f"{msg} at node '{self.label}'")

    def _name(self, node: onnx.NodeProto) -> str:
        # dots stay: the zoo's names ("block1.conv1") survive an export and import
        base = re.sub(r"[^A-Za-z0-9_.\-]+", "_", node.name).strip("_.")
        if not base:
            op = node.op_type.lower()
            self.op_counts[op] = self.op_counts.get(op, 0) + 1
            base = f"{op}{self.op_counts[op]}"
        name, k = base, 2
        while name in self.used_names:
            name, k = f"{base}_{k}", k + 1
        self.used_names.add(name)
        return name

    def _const(self, name: str, what: str) -> np.ndarray:
        if name not in self.consts:
            self._fail(f"{what} '{name}' must be an initializer or Constant")
        return self.consts[name]

    def _opt_const(self, node: onnx.NodeProto, k: int, what: str) -> Optional[np.ndarray]:
        """Input k as a constant, None when absent (past the end or the empty name)."""
        if len(node.input) > k and node.input[k]:
            return self._const(node.input[k], what)
        return None

    def _float(self, arr: np.ndarray, what: str) -> np.ndarray:
        if not np.issubdtype(arr.dtype, np.floating):
            self._fail(f"{what} has dtype {arr.dtype}, expected float")
        out = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.all(np.isfinite(out)):
            self._fail(f"{what} holds NaN or Inf")
        return out

    def _scalar(self, arr: np.ndarray, what: str) -> float:
        arr = np.asarray(arr)
        if arr.size != 1:
            self._fail(f"{what} must be a scalar, got shape {arr.shape}")
        return float(arr.reshape(-1)[0])

    def _ints(self, arr: np.ndarray, what: str) -> List[int]:
        arr = np.asarray(arr)
        if not np.issubdtype(arr.dtype, np.integer):
            self._fail(f"{what} has dtype {arr.dtype}, expected int64")
        return [int(v) for v in arr.reshape(-1)]

    def _value(self, tensor: str) -> int:
        """The value id of a graph tensor read by the current node."""
        if tensor in self.softmaxed and self.node.op_type != "Identity":
            self._fail(f"Softmax at node '{self.softmaxed[tensor]}' must be the last node, "
                       f"but {self.node.op_type} follows it")
        if tensor not in self.values:
            self._fail(f"{self.node.op_type} reads tensor '{tensor}', which is neither the graph input, "
                       f"a constant nor the output of an earlier node")
        return self.values[tensor]

    def _data(self, node: onnx.NodeProto) -> List[str]:
        """The node's non-constant inputs, in order."""
        return [t for t in node.input if t and t not in self.consts]

    def _one_input(self, node: onnx.NodeProto) -> int:
        """The value id of the node's first input, which must be a graph tensor."""
        first = node.input[0] if node.input else ""
        if not first or first in self.consts:
            self._fail(f"{node.op_type}'s first input must be a graph tensor, not a constant")
        return self._value(first)

    def _shape(self, v: int) -> Shape:
        return self.shapes[v]

    def _emit(self, layer: Layer, ins: Sequence[int], node: Optional[onnx.NodeProto] = None) -> int:
        node = node or self.node
        try:
            shape = tuple(int(d) for d in layer.out_shape(*[self.shapes[v] for v in ins]))
        except ValueError as e:
            self._fail(f"{node.op_type}: {e}")
        self.layers.append(layer)
        self.inputs.append(tuple(ins))
        self.shapes.append(shape)
        v = len(self.layers)
        self.values[node.output[0]] = v
        self.out_tensor[v] = node.output[0]
        return v

    def _alias(self, node: onnx.NodeProto, v: int) -> None:
        self.values[node.output[0]] = v

    def _unary(self, node, layer: Layer) -> None:
        self._emit(layer, [self._one_input(node)])

    def _need_rank(self, v: int, ranks: Sequence[int], what: str) -> Shape:
        s = self.shapes[v]
        if len(s) not in ranks:
            full = " or ".join({1: "2-D [N, F]", 2: "3-D [N, C, L]", 3: "4-D [N, C, H, W]"}[r] for r in ranks)
            self._fail(f"{what} needs a {full} input, got per-sample shape {s}")
        return s

    def _pads(self, a: Dict[str, object], in_sizes: Sequence[int], kernel: Sequence[int],
              strides: Sequence[int]) -> Tuple[int, ...]:
        d = len(in_sizes)
        auto_pad = _text(a.get("auto_pad", b"NOTSET"))
        if auto_pad == "NOTSET":
            pads = tuple(int(p) for p in a.get("pads", (0,) * (2 * d)))
            if len(pads) != 2 * d or min(pads) < 0:
                self._fail(f"pads must be {2 * d} non-negative ints, got {list(pads)}")
            return pads
        if auto_pad == "VALID":
            return (0,) * (2 * d)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for size, k, s in zip(in_sizes, kernel, strides):
                total = max(0, (-(-size // s) - 1) * s + k - size)
                small, big = total // 2, total - total // 2
                begin.append(small if auto_pad == "SAME_UPPER" else big)
                end.append(big if auto_pad == "SAME_UPPER" else small)
            return tuple(begin + end)
        self._fail(f"unknown auto_pad {auto_pad!r}")
        raise AssertionError

    def _ints_n(self, a: Dict[str, object], key: str, default: Sequence[int], d: int) -> Tuple[int, ...]:
        v = tuple(int(x) for x in a.get(key, default))
        if len(v) != d:
            self._fail(f"{key} must have {d} entries for a {d}-D input, got {list(v)}")
        return v

    def _flag(self, node, key: str, default: int) -> bool:
        value = _attrs(node).get(key, default)
        if not isinstance(value, int) or value not in (0, 1):
            self._fail(f"{node.op_type} attribute {key}={value!r} must be 0 or 1")
        return bool(value)

    def _no_dilation(self, a: Dict[str, object]) -> None:
        d = [int(x) for x in a.get("dilations", ())]
        if any(x != 1 for x in d):
            self._fail(f"{self.node.op_type} with dilations {d} is not supported (must be 1)")

    def _axes(self, node, attr_key: str = "axes", input_index: int = 1) -> Optional[List[int]]:
        """Axes from the attribute (older opsets) or the input (newer ones); None when absent."""
        a = _attrs(node)
        if attr_key in a:
            return [int(v) for v in a[attr_key]]
        arr = self._opt_const(node, input_index, f"{node.op_type} axes")
        return None if arr is None else self._ints(arr, f"{node.op_type} axes")

    def _norm_axis(self, axis: int, rank: int) -> int:
        if not -rank <= axis < rank:
            self._fail(f"axis {axis} is out of range for a {rank}-D tensor")
        return axis + rank if axis < 0 else axis

    # -- the walk ----------------------------------------------------------------------------
    def run(self) -> Model:
        g = self.graph
        inputs = [i for i in g.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise OnnxImportError(f"the graph must have exactly one data input, found "
                                  f"{[i.name for i in inputs]}")
        if len(g.output) != 1:
            raise OnnxImportError(f"the graph must have exactly one output, found {[o.name for o in g.output]}")
        inp = inputs[0]
        input_shape = self._input_shape(inp)
        self.input_batch = self._input_batch(inp)
        self.values[inp.name] = 0
        self.shapes.append(input_shape)
        out_name = g.output[0].name
        nodes = list(g.node)
        live = _live_nodes(nodes, out_name)
        self.users: Dict[str, int] = {}
        for _, n in live:
            for t in n.input:
                self.users[t] = self.users.get(t, 0) + 1

        for i, node in live:
            self.node = node
            self.label = _node_label(node, i)
            op = node.op_type
            if node.domain not in ("", "ai.onnx"):
                self._fail(f"unsupported ONNX op '{node.domain}.{op}'")
            if op == "Constant":
                self._constant(node)
                continue
            if self._is_shape_arithmetic(node):
                self._shape_arithmetic(node)
                continue
            handler = getattr(self, f"_op_{op}", None)
            if handler is None:
                self._fail(f"unsupported ONNX op '{op}'")
            if not node.output or not node.output[0]:
                self._fail(f"{op} has no (first) output")
            for extra in node.output[1:]:
                if extra and op == "MaxPool":
                    self._fail("MaxPool's second output (indices) is not supported")
                if extra and (self.users.get(extra) or extra == out_name):
                    self._fail(f"{op}'s extra output '{extra}' is used; only the first output is supported")
            if len(node.input) < self._MIN_INPUTS.get(op, 1):
                self._fail(f"{op} needs at least {self._MIN_INPUTS.get(op, 1)} inputs, got {len(node.input)}")
            handler(node)

        if out_name in self.consts:
            raise OnnxImportError(f"the graph output '{out_name}' is a constant")
        if out_name not in self.values:
            raise OnnxImportError(f"no node computes the graph output '{out_name}'")
        v = self.values[out_name]
        if v == 0 or v != len(self.layers):
            raise OnnxImportError(f"the graph output '{out_name}' is not the result of the last layer "
                                  f"(the graph must end in one tensor of class scores)")
        try:
            return Model(self.layers, input_shape, name=g.name or "onnx_model", inputs=self.inputs)
        except ValueError as e:
            raise OnnxImportError(f"imported graph is not a classifier: {e}") from None

    def _input_shape(self, inp: onnx.ValueInfoProto) -> Shape:
        if not inp.type.HasField("tensor_type"):
            raise OnnxImportError(f"graph input '{inp.name}' is not a tensor")
        tt = inp.type.tensor_type
        if tt.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            raise OnnxImportError(f"graph input '{inp.name}' has element type "
                                  f"{TensorProto.DataType.Name(tt.elem_type)}; expected float")
        if not tt.HasField("shape"):
            raise OnnxImportError(f"graph input '{inp.name}' has no shape")
        dims = list(tt.shape.dim)
        if len(dims) < 2:
            raise OnnxImportError(f"graph input '{inp.name}' must be [batch, ...] with at least 2 dims, got {len(dims)}")
        shape = []
        for d in dims[1:]:
            if not d.HasField("dim_value") or d.dim_value < 1:
                raise OnnxImportError(f"graph input '{inp.name}' must have fixed sizes after the batch dim, "
                                      f"got {[d.dim_param or d.dim_value for d in dims]}")
            shape.append(int(d.dim_value))
        return tuple(shape)

    @staticmethod
    def _input_batch(inp: onnx.ValueInfoProto) -> Optional[int]:
        d = inp.type.tensor_type.shape.dim[0]
        return int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None

    def _constant(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        if "value" in a:
            value = self._tensor(a["value"], f"Constant at node '{self.label}'")
        elif "value_float" in a:
            value = np.array(a["value_float"], np.float32)
        elif "value_floats" in a:
            value = np.array(a["value_floats"], np.float32)
        elif "value_int" in a:
            value = np.array(a["value_int"], np.int64)
        elif "value_ints" in a:
            value = np.array(a["value_ints"], np.int64)
        else:
            self._fail(f"Constant with attributes {sorted(a)} is not supported")
        self.consts[node.output[0]] = value

    # -- shape arithmetic (no layers) --------------------------------------------------------------
    _SHAPE_OPS = ("Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Identity")

    def _is_shape_arithmetic(self, node) -> bool:
        if node.op_type == "Shape":
            return True
        if node.op_type not in self._SHAPE_OPS:
            return False
        ins = [t for t in node.input if t]
        return bool(ins) and (any(t in self.shape_values for t in ins) or all(t in self.consts for t in ins))

    def _shape_operand(self, t: str) -> Tuple[List[Optional[int]], bool]:
        if t in self.shape_values:
            return self.shape_values[t]
        arr = np.asarray(self._const(t, f"{self.node.op_type} input"))
        if not np.issubdtype(arr.dtype, np.integer) or arr.ndim > 1:
            self._fail(f"{self.node.op_type} of constants only is supported on int vectors (shape arithmetic), "
                       f"got {arr.dtype} of shape {arr.shape}")
        return [int(v) for v in arr.reshape(-1)], arr.ndim == 0

    def _shape_arithmetic(self, node) -> None:
        """Shape and the int-vector ops exporters build Reshape targets with, evaluated here."""
        op, a = node.op_type, _attrs(node)
        ins = list(node.input)
        need = {"Gather": 2, "Slice": 1 if "starts" in a else 3}.get(op, 1)
        if len(ins) < need or not all(ins[:need]):
            self._fail(f"{op} needs {need} inputs, got {ins}")
        if op == "Identity" and ins[0] in self.consts:
            # torch (training=PRESERVE) stores equal initializers once and aliases them through
            # Identity nodes: batch-norm scales of ones, zero means, ...
            self.consts[node.output[0]] = self.consts[ins[0]]
            return
        if op == "Shape":
            v = self._value(ins[0])
            full = [self.input_batch] + list(self._shape(v))
            end = a.get("end")
            vals, scalar = full[int(a.get("start", 0)):None if end is None else int(end)], False
        elif op in ("Cast", "Identity"):
            vals, scalar = self._shape_operand(ins[0])
        elif op == "Gather":
            data, _ = self._shape_operand(ins[0])
            idx, scalar = self._shape_operand(ins[1])
            if int(a.get("axis", 0)) != 0 or None in idx or any(not -len(data) <= i < len(data) for i in idx):
                self._fail(f"Gather of indices {idx} from a shape of {len(data)} entries is not supported")
            vals = [data[i] for i in idx]
        elif op in ("Unsqueeze", "Squeeze"):
            vals, scalar = self._shape_operand(ins[0])
            axes = self._axes(node)
            if op == "Unsqueeze" and scalar and axes in ([0], [-1]):
                scalar = False
            elif op == "Squeeze" and not scalar and len(vals) == 1 and axes in (None, [0], [-1]):
                scalar = True
            else:
                self._fail(f"{op} with axes {axes} of a shape vector is not supported")
        elif op == "Concat":
            if self._norm_axis(int(a.get("axis", 0)), 1) != 0:
                self._fail("Concat of shape vectors must be on axis 0")
            vals, scalar = [], False
            for t in ins:
                if t:
                    vals += self._shape_operand(t)[0]
        elif op == "Slice":
            data, _ = self._shape_operand(ins[0])
            parts = [self._shape_operand(ins[k])[0] if len(ins) > k and ins[k] else None for k in range(1, 5)]
            starts, ends, axes, steps = parts if "starts" not in a else (
                list(a["starts"]), list(a["ends"]), a.get("axes"), None)
            if len(starts) != 1 or len(ends) != 1 or (axes and list(axes) not in ([0], [-1])) \
                    or (steps and len(steps) != 1) or None in starts + ends:
                self._fail("Slice of a shape vector must take one range of axis 0")
            vals, scalar = data[slice(starts[0], ends[0], steps[0] if steps else 1)], False
        else:
            raise AssertionError(op)
        if None in vals:
            self.shape_values[node.output[0]] = (vals, scalar)
        else:
            self.consts[node.output[0]] = np.array(vals[0] if scalar else vals, np.int64)

    # -- one method per op -------------------------------------------------------------------
    _MIN_INPUTS = {"Gemm": 2, "MatMul": 2, "Conv": 2, "Reshape": 2, "Add": 2, "Sub": 2, "Mul": 2,
                   "BatchNormalization": 5}

    def _op_Identity(self, node):
        self._alias(node, self._one_input(node))
        if node.input[0] in self.softmaxed:
            self.softmaxed[node.output[0]] = self.softmaxed[node.input[0]]

    def _op_Relu(self, node):
        self._unary(node, ReLU(self._name(node)))

    def _op_Sigmoid(self, node):
        self._unary(node, Sigmoid(self._name(node)))

    def _op_Tanh(self, node):
        self._unary(node, Tanh(self._name(node)))

    def _op_LeakyRelu(self, node):
        self._unary(node, self._make(LeakyReLU, self._name(node), float(_attrs(node).get("alpha", 0.01))))

    def _op_HardSigmoid(self, node):
        a = _attrs(node)
        self._unary(node, self._make(HardSigmoid, self._name(node), float(a.get("alpha", 0.2)),
                                     float(a.get("beta", 0.5))))

    def _op_HardSwish(self, node):
        self._unary(node, HardSwish(self._name(node)))

    def _make(self, cls, *args, **kw) -> Layer:
        try:
            return cls(*args, **kw)
        except ValueError as e:
            self._fail(f"{self.node.op_type}: {e}")
        raise AssertionError

    def _op_Clip(self, node):
        a = _attrs(node)
        lo, hi = float(a.get("min", -np.inf)), float(a.get("max", np.inf))
        for k, what in ((1, "min"), (2, "max")):
            if len(node.input) > k and node.input[k]:
                if node.input[k] not in self.consts:
                    self._fail(f"Clip {what} '{node.input[k]}' must be an initializer or Constant "
                               f"(bounds computed at run time are not supported)")
                arr = np.asarray(self.consts[node.input[k]])
                if not np.issubdtype(arr.dtype, np.floating):
                    self._fail(f"Clip {what} has dtype {arr.dtype}, expected float")
                bound = self._scalar(arr, f"Clip {what}")  # +-inf is fine (unbounded); NaN the layer refuses
                lo, hi = (bound, hi) if what == "min" else (lo, bound)
        # opset < 11 wrote "unbounded" as the float limits
        big = float(np.finfo(np.float32).max)
        lo = -np.inf if lo <= -big else lo
        hi = np.inf if hi >= big else hi
        self._unary(node, self._make(Clip, self._name(node), lo, hi))

    def _op_GlobalAveragePool(self, node):
        v = self._one_input(node)
        self._need_rank(v, (2, 3), "GlobalAveragePool")
        self._emit(GlobalAvgPool(self._name(node)), [v])

    def _op_ReduceMean(self, node):
        v = self._one_input(node)
        s = self._shape(v)
        rank = 1 + len(s)
        axes = self._axes(node)
        if not axes:
            self._fail("ReduceMean without axes reduces the batch axis too; only the spatial axes are supported")
        axes = sorted(self._norm_axis(x, rank) for x in axes)
        if len(s) not in (2, 3) or axes != list(range(2, rank)):
            self._fail(f"ReduceMean over axes {axes} of a {rank}-D tensor is not supported "
                       f"(only over all spatial axes, {list(range(2, max(rank, 3)))}: global average pooling)")
        keepdims = self._flag(node, "keepdims", 1)
        self._emit(GlobalAvgPool(self._name(node), keepdims=keepdims), [v])

    def _op_Softmax(self, node):
        # Dropped: the engine trains on logits with its own softmax cross-entropy, and softmax
        # is monotone so predictions are unchanged.
        v = self._one_input(node)
        s = self._shape(v)
        if len(s) != 1:
            self._fail(f"{node.op_type} over a per-sample shape {s} is not supported (needs [N, classes])")
        axis = int(_attrs(node).get("axis", -1 if self.opset >= 13 else 1))
        if axis not in (1, -1):
            self._fail(f"{node.op_type} over axis {axis} is not supported (must be the class axis)")
        self._alias(node, v)
        self.softmaxed[node.output[0]] = self.label

    _op_LogSoftmax = _op_Softmax

    def _op_Dropout(self, node):
        a = _attrs(node)
        ratio = float(a.get("ratio", 0.5))
        r = self._opt_const(node, 1, "Dropout ratio")
        if r is not None:
            ratio = self._scalar(r, "Dropout ratio")
        t = self._opt_const(node, 2, "Dropout training_mode")
        if t is not None and bool(self._scalar(t, "Dropout training_mode")):
            self._fail("Dropout with training_mode=true is not an inference graph; export in eval mode")
        if not 0.0 <= ratio < 1.0:
            self._fail(f"Dropout ratio {ratio} is outside [0, 1)")
        self._unary(node, Dropout(self._name(node), ratio))

    # -- views --------------------------------------------------------------------------------
    def _view(self, node, v: int, target: Sequence[int]) -> None:
        """A per-sample reshape of value v (a view): Flatten when the target is 1-D, Reshape otherwise.
        Kept even when it changes nothing, so every node the user sees has its layer."""
        target = tuple(int(d) for d in target)
        s = self._shape(v)
        if int(np.prod(target)) != int(np.prod(s)):
            self._fail(f"{node.op_type} of per-sample shape {s} into {target} changes the element count")
        if len(target) == 1:
            self._emit(Flatten(self._name(node)), [v])
        else:
            self._emit(self._make(Reshape, self._name(node), target), [v])

    def _op_Flatten(self, node):
        v = self._one_input(node)
        axis = int(_attrs(node).get("axis", 1))
        rank = 1 + len(self._shape(v))
        if axis < 0:
            axis += rank
        if axis != 1:
            self._fail(f"Flatten with axis {axis} is not supported (only axis 1: keep the batch dim)")
        self._emit(Flatten(self._name(node)), [v])

    def _op_Reshape(self, node):
        v = self._one_input(node)
        if len(node.input) < 2 or not node.input[1]:
            self._fail("Reshape needs a shape input")
        if node.input[1] in self.shape_values:  # built from a run-time shape: the batch size may be first
            vals, _ = self.shape_values[node.input[1]]
            if None in vals[1:]:
                self._fail(f"Reshape to a shape with the batch size at position {vals.index(None, 1)} "
                           f"is not supported (the batch axis must stay first)")
            target = [0 if d is None else d for d in vals]
        else:
            target = self._ints(self._const(node.input[1], "Reshape shape"), "Reshape shape")
        allowzero = self._flag(node, "allowzero", 0)
        s = self._shape(v)
        full = [self.input_batch or -1] + list(s)  # -1: the batch size is only known at run time
        features = int(np.prod(s))
        fixed = "" if self.input_batch is None else f", [{self.input_batch}, {features}]"
        bad = (f"Reshape to {target} is not supported from per-sample shape {s}: the batch axis must stay "
               f"first (e.g. [0, -1], [-1, {features}]{fixed})")
        if not target or (allowzero and 0 in target):
            self._fail(bad)
        first, rest = target[0], target[1:]
        if not (first == 0 or first == -1 or (self.input_batch is not None and first == self.input_batch)):
            self._fail(bad)
        per = []
        for k, d in enumerate(rest, start=1):
            if d == 0:
                if k >= len(full):
                    self._fail(bad)
                per.append(full[k])
            elif d == -1 or d >= 1:
                per.append(d)
            else:
                self._fail(bad)
        if first == -1 and -1 in per:
            self._fail(bad)
        if per.count(-1) > 1:
            self._fail(bad)
        if -1 in per:
            known = int(np.prod([d for d in per if d != -1]))
            if known == 0 or features % known:
                self._fail(bad)
            per[per.index(-1)] = features // known
        if int(np.prod(per)) != features:
            self._fail(bad)
        self._view(node, v, per)

    def _op_Squeeze(self, node):
        v = self._one_input(node)
        s = list(self._shape(v))
        rank = 1 + len(s)
        axes = self._axes(node)
        if axes is None:
            target = [d for d in s if d != 1]  # every per-sample axis of size 1 (never the batch)
        else:
            axes = {self._norm_axis(a, rank) for a in axes}
            if 0 in axes:
                self._fail("Squeeze of the batch axis is not supported")
            if any(s[a - 1] != 1 for a in axes):
                self._fail(f"Squeeze axes {sorted(axes)} of per-sample shape {tuple(s)}: not all have size 1")
            target = [d for k, d in enumerate(s, start=1) if k not in axes]
        if not target:
            self._fail(f"Squeeze of per-sample shape {tuple(s)} leaves a scalar per sample")
        self._view(node, v, target)

    def _op_Unsqueeze(self, node):
        v = self._one_input(node)
        s = list(self._shape(v))
        axes = self._axes(node)
        if not axes:
            self._fail("Unsqueeze needs axes")
        rank = 1 + len(s) + len(axes)
        axes = sorted(self._norm_axis(a, rank) for a in axes)
        if len(set(axes)) != len(axes):
            self._fail(f"Unsqueeze axes {axes} repeat an axis")
        if 0 in axes:
            self._fail("Unsqueeze before the batch axis is not supported")
        out, it = [], iter(s)
        for k in range(1, rank):
            out.append(1 if k in axes else next(it))
        self._view(node, v, out)

    def _op_Transpose(self, node):
        v = self._one_input(node)
        s = self._shape(v)
        rank = 1 + len(s)
        perm = [int(p) for p in _attrs(node).get("perm", range(rank - 1, -1, -1))]
        if sorted(perm) != list(range(rank)) or perm[0] != 0:
            self._fail(f"Transpose with perm {perm} is not supported (the batch axis must stay first: perm[0] = 0)")
        moved = [p for p in perm[1:] if s[p - 1] != 1]
        if moved == sorted(moved):
            # only axes of size 1 move (tf2onnx's NCHW -> NHWC before a Keras Flatten of a 1x1 map):
            # the memory order is unchanged, so it is a reshape
            self._view(node, v, [s[p - 1] for p in perm[1:]])
            return
        if v != 0:
            self._fail("Transpose is only supported on the graph input itself (NHWC -> NCHW, as tf2onnx writes "
                       "it); it must read the graph input directly")
        self._emit(Transpose(self._name(node), [p - 1 for p in perm[1:]]), [v])

    # -- dense --------------------------------------------------------------------------------
    def _dense_input(self, v: int, op: str) -> int:
        s = self._shape(v)
        if len(s) != 1:
            self._fail(f"{op} needs a 2-D [N, features] input, got per-sample shape {s}; add a Flatten first")
        return s[0]

    def _op_Gemm(self, node):
        a = _attrs(node)
        if self._flag(node, "transA", 0):
            self._fail("Gemm with transA=1 is not supported")
        if node.input[0] in self.consts:
            self._fail("Gemm's first input (A) must be a graph tensor, not a constant")
        v = self._value(node.input[0])
        n_in = self._dense_input(v, "Gemm")
        w = self._float(self._const(node.input[1], "Gemm weight B"), "Gemm weight B")
        if w.ndim != 2:
            self._fail(f"Gemm weight must be 2-D, got shape {w.shape}")
        if not self._flag(node, "transB", 0):
            w = w.T
        w = np.ascontiguousarray(w * np.float32(a.get("alpha", 1.0)), np.float32)
        if w.shape[1] != n_in:
            self._fail(f"Gemm weight {w.shape} [out, in] does not take {n_in} input features")
        bias = None
        c = self._opt_const(node, 2, "Gemm bias C")
        if c is not None:
            bias = self._bias(self._float(c, "Gemm bias C"), w.shape[0], "Gemm bias C")
            if bias is None:
                self._fail(f"Gemm bias C of shape {c.shape} does not broadcast to one bias per output ({w.shape[0]})")
            bias = bias * np.float32(a.get("beta", 1.0))
        self._emit(Dense(self._name(node), w, bias), [v])

    def _bias(self, c: np.ndarray, n: int, what: str) -> Optional[np.ndarray]:
        """A per-output bias from anything that broadcasts over [N, n] the same for every row;
        None if ``c`` is not such a thing."""
        if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or c.size not in (1, n):
            return None
        return np.ascontiguousarray(np.broadcast_to(c.reshape(-1), (n,)), np.float32)

    def _op_MatMul(self, node):
        if node.input[0] in self.consts:
            self._fail("MatMul's first input must be a graph tensor (x @ W), not a constant")
        v = self._value(node.input[0])
        n_in = self._dense_input(v, "MatMul")
        w = self._float(self._const(node.input[1], "MatMul weight"), "MatMul weight")
        if w.ndim != 2 or w.shape[0] != n_in:
            self._fail(f"MatMul weight of shape {w.shape} does not take {n_in} input features (needs [in, out])")
        self._emit(Dense(self._name(node), np.ascontiguousarray(w.T), None), [v])

    # -- elementwise ---------------------------------------------------------------------------
    def _op_Add(self, node):
        self._binary(node, "add")

    def _op_Sub(self, node):
        self._binary(node, "sub")

    def _op_Mul(self, node):
        self._binary(node, "mul")

    def _op_Div(self, node):
        # x / c is x * (1/c) (torch writes hardswish before opset 14 and input scaling this way)
        if len(node.input) != 2 or node.input[0] in self.consts or node.input[1] not in self.consts:
            self._fail("Div is only supported as a graph tensor divided by a constant")
        c = self._float(self.consts[node.input[1]], f"Div constant '{node.input[1]}'")
        if np.any(c == 0):
            self._fail(f"Div constant '{node.input[1]}' holds zeros")
        v = self._value(node.input[0])
        s = self._shape(v)
        inv = np.ascontiguousarray(np.float32(1.0) / c)
        if inv.ndim <= len(s):
            inv = inv.reshape((1,) * (len(s) - inv.ndim) + inv.shape)
        self._emit(self._make(Binary, self._name(node), "mul", const=inv), [v])

    def _binary(self, node, op: str) -> None:
        if len(node.input) != 2 or not all(node.input):
            self._fail(f"{node.op_type} needs exactly 2 inputs")
        a_name, b_name = node.input
        a_const, b_const = a_name in self.consts, b_name in self.consts
        if a_const and b_const:
            self._fail(f"{node.op_type} of two constants is not supported (fold it in the exporter)")
        if a_const or b_const:
            t_name, c_name = (b_name, a_name) if a_const else (a_name, b_name)
            v = self._value(t_name)
            c = self._float(self.consts[c_name], f"{node.op_type} constant '{c_name}'")
            if op == "add" and self._fold_bias(node, t_name, v, c):
                return
            s = self._shape(v)
            if c.ndim <= len(s):  # right-aligned broadcasting: give it the per-sample rank
                c = c.reshape((1,) * (len(s) - c.ndim) + c.shape)
            self._emit(self._make(Binary, self._name(node), op, const=c, const_first=a_const), [v])
            return
        va, vb = self._value(a_name), self._value(b_name)
        sa, sb = self._shape(va), self._shape(vb)
        if len(sa) != len(sb):
            self._fail(f"{node.op_type} of per-sample shapes {sa} and {sb}: the ranks must be equal")

        def onto(small, big):
            return all(x in (1, y) for x, y in zip(small, big))

        if onto(sb, sa):
            ins = [va, vb]
        elif onto(sa, sb) and op in ("add", "mul"):
            ins = [vb, va]  # commutative: the larger first
        elif onto(sa, sb):
            self._fail(f"Sub of per-sample shapes {sa} - {sb}: the second operand is larger than the first; "
                       f"only the second may broadcast")
        else:
            self._fail(f"{node.op_type} of per-sample shapes {sa} and {sb}: neither broadcasts onto the other")
        self._emit(self._make(Binary, self._name(node), op), ins)

    def _fold_bias(self, node, t_name: str, v: int, c: np.ndarray) -> bool:
        """A constant added right after a Gemm/MatMul that nothing else reads is that layer's bias
        (the MatMul + Add spelling of a dense layer, or a Gemm without C followed by Add)."""
        if v == 0:
            return False
        layer = self.layers[v - 1]
        # the Add must read the dense layer's own tensor (not an alias another node may also read)
        if not isinstance(layer, Dense) or self.out_tensor[v] != t_name or self.users.get(t_name, 0) != 1:
            return False
        b = self._bias(c, layer.out_features, "Add bias")
        if b is None:
            return False
        layer.bias = np.ascontiguousarray(layer.bias + b, np.float32)
        self._alias(node, v)
        return True

    def _op_Concat(self, node):
        if any(t in self.consts for t in node.input if t):
            self._fail("Concat of a constant tensor is not supported (only graph tensors)")
        vs = [self._value(t) for t in node.input if t]
        if not vs:
            self._fail("Concat has no inputs")
        rank = 1 + len(self._shape(vs[0]))
        if "axis" not in _attrs(node):
            self._fail("Concat needs an axis")
        axis = int(_attrs(node)["axis"])
        if self._norm_axis(axis, rank) != 1:
            self._fail(f"Concat on axis {axis} of a {rank}-D tensor is not supported (only the channel axis: 1)")
        self._emit(Concat(self._name(node)), vs)

    def _op_Pad(self, node):
        v = self._one_input(node)
        s = self._shape(v)
        rank = 1 + len(s)
        a = _attrs(node)
        mode = _text(a.get("mode", b"constant"))
        if mode != "constant":
            self._fail(f"Pad mode '{mode}' is not supported (only constant)")
        if "pads" in a:  # opset < 11
            pads = [int(p) for p in a["pads"]]
            value = float(a.get("value", 0.0))
        else:
            p = self._opt_const(node, 1, "Pad pads")
            if p is None:
                self._fail("Pad needs pads")
            pads = self._ints(p, "Pad pads")
            cv = self._opt_const(node, 2, "Pad constant_value")
            value = 0.0 if cv is None else self._scalar(self._float(cv, "Pad constant_value"), "Pad constant_value")
            axes_arr = self._opt_const(node, 3, "Pad axes")
            if axes_arr is not None:  # opset 18: pads for these axes only
                axes = [self._norm_axis(x, rank) for x in self._ints(axes_arr, "Pad axes")]
                if len(pads) != 2 * len(axes):
                    self._fail(f"Pad pads {pads} do not match axes {axes}")
                full = [0] * (2 * rank)
                for k, ax in enumerate(axes):
                    full[ax], full[rank + ax] = pads[k], pads[len(axes) + k]
                pads = full
        if len(pads) != 2 * rank:
            self._fail(f"Pad pads {pads} need {2 * rank} entries for a {rank}-D input")
        if min(pads) < 0:
            self._fail(f"Pad with negative pads {pads} (cropping) is not supported")
        if pads[0] or pads[rank]:
            self._fail(f"Pad of the batch axis is not supported (pads {pads})")
        self._emit(self._make(Pad, self._name(node), pads[1:rank] + pads[rank + 1:], value), [v])

    # -- convolution, pooling, batch norm --------------------------------------------------------
    def _op_Conv(self, node):
        a = _attrs(node)
        v = self._one_input(node)
        s = self._need_rank(v, (2, 3), "Conv")
        d = len(s) - 1
        self._no_dilation(a)
        w = self._float(self._const(node.input[1], "Conv weight"), "Conv weight")
        if w.ndim != d + 2:
            self._fail(f"Conv weight of shape {w.shape} does not fit a {d}-D convolution of per-sample shape {s}")
        group = int(a.get("group", 1))
        if group < 1 or s[0] % group or w.shape[0] % group or w.shape[1] * group != s[0]:
            self._fail(f"Conv with group={group} and weight {w.shape} does not fit {s[0]} input channels")
        kernel = self._ints_n(a, "kernel_shape", w.shape[2:], d)
        if tuple(kernel) != tuple(w.shape[2:]):
            self._fail(f"Conv kernel_shape {list(kernel)} does not match weight {w.shape}")
        strides = self._ints_n(a, "strides", (1,) * d, d)
        if min(strides) < 1:
            self._fail(f"Conv strides {list(strides)} must be positive")
        pads = self._pads(a, s[1:], kernel, strides)
        bias = self._opt_const(node, 2, "Conv bias")
        if bias is not None:
            bias = self._float(bias, "Conv bias")
        cls = Conv2d if d == 2 else Conv1d
        self._emit(self._make(cls, self._name(node), w, bias, stride=strides, padding=pads, group=group), [v])

    def _pool(self, node, cls, **extra):
        a = _attrs(node)
        v = self._one_input(node)
        s = self._need_rank(v, (2, 3), node.op_type)
        d = len(s) - 1
        self._no_dilation(a)
        if "kernel_shape" not in a:
            self._fail(f"{node.op_type} needs kernel_shape")
        kernel = self._ints_n(a, "kernel_shape", (), d)
        strides = self._ints_n(a, "strides", (1,) * d, d)  # ONNX default is 1, not the kernel size
        if min(kernel) < 1 or min(strides) < 1:
            self._fail(f"{node.op_type} kernel_shape {list(kernel)} and strides {list(strides)} must be positive")
        pads = self._pads(a, s[1:], kernel, strides)
        if any(p >= k for p, k in zip(pads, kernel + kernel)):
            self._fail(f"{node.op_type} pads {list(pads)} must be smaller than the kernel {list(kernel)}")
        layer = self._make(cls, self._name(node), kernel, strides, pads, self._flag(node, "ceil_mode", 0), **extra)
        self._emit(layer, [v])

    def _op_MaxPool(self, node):
        if self._flag(node, "storage_order", 0):
            self._fail("MaxPool with storage_order=1 is not supported")
        self._pool(node, MaxPool2d)

    def _op_AveragePool(self, node):
        self._pool(node, AvgPool2d, count_include_pad=self._flag(node, "count_include_pad", 0))

    def _op_BatchNormalization(self, node):
        a = _attrs(node)
        if self._flag(node, "training_mode", 0):
            self._fail("BatchNormalization with training_mode=1 is not an inference graph; export in eval mode")
        v = self._one_input(node)
        s = self._need_rank(v, (1, 2, 3), "BatchNormalization")
        scale, shift, mean, var = (self._float(self._const(node.input[k], f"BatchNormalization {what}"),
                                               f"BatchNormalization {what}")
                                   for k, what in ((1, "scale"), (2, "B"), (3, "mean"), (4, "var")))
        for arr, what in ((scale, "scale"), (shift, "B"), (mean, "mean"), (var, "var")):
            if arr.shape != (s[0],):
                self._fail(f"BatchNormalization {what} of shape {arr.shape} does not match {s[0]} channels")
        eps = float(a.get("epsilon", 1e-5))
        self._emit(self._make(BatchNorm, self._name(node), scale, shift, mean, var, eps), [v])


def load_model(source: Union[str, os.PathLike, bytes, onnx.ModelProto]) -> Model:
    """A ``Model`` from an ONNX file path, its bytes, or an ``onnx.ModelProto``."""
    proto = _read(source)
    if not proto.HasField("graph"):
        raise OnnxImportError("the ONNX model has no graph")
    return _Importer(proto).run()


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------

MIN_OPSET = 10  # ceil_mode on MaxPool/AveragePool arrived in opset 10
DEFAULT_OPSET = 13
#: the lowest opset that has each layer kind's op (others: MIN_OPSET)
KIND_OPSET = {"hard_swish": 14}


def needed_opset(model: Model) -> int:
    """The lowest opset ``to_onnx`` can write ``model`` in."""
    return max([MIN_OPSET] + [KIND_OPSET.get(layer.kind, MIN_OPSET) for layer in model.layers])


def to_onnx(model: Model, opset: Optional[int] = None) -> onnx.ModelProto:
    """An ONNX model with the model's current weights; batch dim symbolic ("N"). Without
    ``opset``: 13, or the lowest higher one that has every op the model uses (HardSwish: 14)."""
    need = needed_opset(model)
    opset = max(DEFAULT_OPSET, need) if opset is None else int(opset)
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset must be in [{MIN_OPSET}, {onnx.defs.onnx_opset_version()}], got {opset}")
    if opset < need:
        kinds = sorted({l.kind for l in model.layers if KIND_OPSET.get(l.kind, MIN_OPSET) > opset})
        raise ValueError(f"opset {opset} cannot hold layers of kind {kinds}; use opset >= {need}")
    nodes: List[onnx.NodeProto] = []
    inits: List[onnx.TensorProto] = []

    def init(arr, name: str, dtype=np.float32) -> str:
        inits.append(numpy_helper.from_array(np.array(arr, dtype), name))
        return name

    # an ONNX tensor name per value; Dropout (the identity at inference) hands on its input's
    root = list(range(len(model.layers) + 1))
    for i, layer in enumerate(model.layers):
        if layer.kind == "dropout":
            root[i + 1] = root[model.inputs[i][0]]
    last = len(model.layers)
    names = {0: "input"}
    for v in range(1, last + 1):
        if root[v] == v:
            names[v] = "logits" if v == root[last] else f"{model.layers[v - 1].name}_out"
    for i, layer in enumerate(model.layers):
        if layer.kind == "dropout":
            continue
        ins = [names[root[v]] for v in model.inputs[i]]
        out = names[i + 1]
        x = ins[0]
        kind, n = layer.kind, layer.name

        def node(op, inputs, **attrs):
            nodes.append(helper.make_node(op, inputs, [out], name=n, **attrs))

        if kind == "dense":
            node("Gemm", [x, init(layer.weight, f"{n}.weight"), init(layer.bias, f"{n}.bias")],
                 alpha=1.0, beta=1.0, transA=0, transB=1)
        elif kind in ("conv2d", "conv1d"):
            d = layer.weight.ndim - 2
            node("Conv", [x, init(layer.weight, f"{n}.weight"), init(layer.bias, f"{n}.bias")],
                 kernel_shape=list(layer.weight.shape[2:]), strides=list(layer.stride), pads=list(layer.padding),
                 dilations=[1] * d, group=int(layer.group))
        elif kind in ("maxpool2d", "avgpool2d", "maxpool1d", "avgpool1d"):
            attrs = dict(kernel_shape=list(layer.kernel), strides=list(layer.stride),
                         pads=list(layer.padding), ceil_mode=int(layer.ceil_mode))
            if kind.startswith("avg"):
                attrs["count_include_pad"] = int(layer.count_include_pad)
            node("MaxPool" if kind.startswith("max") else "AveragePool", [x], **attrs)
        elif kind == "global_avgpool":
            if layer.keepdims:
                node("GlobalAveragePool", [x])
            else:
                axes = list(range(2, 1 + len(model.shapes[model.inputs[i][0]])))
                if opset >= 18:
                    node("ReduceMean", [x, init(axes, f"{n}.axes", np.int64)], keepdims=0)
                else:
                    node("ReduceMean", [x], axes=axes, keepdims=0)
        elif kind == "batchnorm":
            node("BatchNormalization", [x, init(layer.weight, f"{n}.weight"), init(layer.bias, f"{n}.bias"),
                                        init(layer.mean, f"{n}.mean"), init(layer.var, f"{n}.var")],
                 epsilon=float(layer.eps))
        elif kind in ("add", "sub", "mul"):
            op = {"add": "Add", "sub": "Sub", "mul": "Mul"}[kind]
            if layer.const is None:
                node(op, ins)
            else:
                c = init(layer.const, f"{n}.const")
                node(op, [c, x] if layer.const_first else [x, c])
        elif kind == "concat":
            node("Concat", ins, axis=1)
        elif kind in ("relu", "sigmoid", "tanh", "hard_swish"):
            node({"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "hard_swish": "HardSwish"}[kind], [x])
        elif kind == "leaky_relu":
            node("LeakyRelu", [x], alpha=float(layer.alpha))
        elif kind == "hard_sigmoid":
            node("HardSigmoid", [x], alpha=float(layer.alpha), beta=float(layer.beta))
        elif kind == "clip":
            lo, hi = layer.lo, layer.hi
            if opset >= 11:
                node("Clip", [x, init(lo, f"{n}.min") if np.isfinite(lo) else "",
                              init(hi, f"{n}.max") if np.isfinite(hi) else ""])
            else:
                big = float(np.finfo(np.float32).max)
                node("Clip", [x], min=max(lo, -big), max=min(hi, big))
        elif kind == "flatten":
            node("Flatten", [x], axis=1)
        elif kind == "reshape":
            node("Reshape", [x, init([0, *layer.shape], f"{n}.shape", np.int64)])
        elif kind == "pad":
            k = len(layer.pads) // 2
            pads = [0, *layer.pads[:k], 0, *layer.pads[k:]]
            if opset >= 11:
                node("Pad", [x, init(pads, f"{n}.pads", np.int64), init(layer.value, f"{n}.value")], mode="constant")
            else:
                node("Pad", [x], mode="constant", pads=pads, value=float(layer.value))
        elif kind == "transpose":
            node("Transpose", [x], perm=[0] + [p + 1 for p in layer.perm])
        else:
            raise ValueError(f"cannot export layer {n!r} of kind {kind!r} to ONNX")
    if root[last] == 0:  # a model of nothing but identities
        nodes.append(helper.make_node("Identity", ["input"], ["logits"], name="identity"))
    graph = helper.make_graph(
        nodes, model.name or "ftte_model",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *model.input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", model.num_classes])],
        initializer=inits)
    opsets = [helper.make_opsetid("", opset)]
    # the lowest IR version that carries this opset, so older runtimes can still load the file
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="ftte",
                              ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(proto)
    return proto


def save_onnx(model: Model, path: Union[str, os.PathLike], opset: Optional[int] = None) -> None:
    """Write ``model`` to ``path`` as ONNX, atomically (a reader never sees a half-written file)."""
    data = to_onnx(model, opset).SerializeToString()
    atomic_write(path, lambda f: f.write(data))
