"""ONNX in and out: ``load_model`` turns a chain-shaped ONNX graph into a ``Model``;
``save_onnx`` / ``to_onnx`` write a ``Model`` back out with its current weights.

Import accepts only what the engine can train: a single chain from one input to one output,
each node consuming the previous node's output plus constants (initializers or Constant
nodes). Anything else is an ``OnnxImportError`` naming the op and node, never a protobuf
traceback, because the hub takes model files from users and must say what is wrong with them.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto

from .atomic import atomic_write
from .graph import (AvgPool2d, Conv2d, Dense, Dropout, Flatten, GlobalAvgPool, Layer, MaxPool2d,
                    Model, ReLU, Sigmoid, Tanh)

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


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name if node.name else f"#{index} (unnamed {node.op_type})"


class _Importer:
    """Walks the node list once, keeping the name of the chain's current tensor and its shape."""

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
        base = re.sub(r"[^A-Za-z0-9_\-]+", "_", node.name).strip("_")
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

    def _float(self, arr: np.ndarray, what: str) -> np.ndarray:
        if not np.issubdtype(arr.dtype, np.floating):
            self._fail(f"{what} has dtype {arr.dtype}, expected float")
        out = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.all(np.isfinite(out)):
            self._fail(f"{what} holds NaN or Inf")
        return out

    def _add(self, layer: Layer) -> None:
        try:
            self.shape = tuple(int(d) for d in layer.out_shape(self.shape))
        except ValueError as e:
            self._fail(f"{self.node.op_type}: {e}")
        self.layers.append(layer)

    def _spatial(self, op: str) -> Tuple[int, int, int]:
        if len(self.shape) != 3:
            self._fail(f"{op} needs a 4-D [N, C, H, W] input, got per-sample shape {self.shape}")
        return self.shape  # type: ignore[return-value]

    def _pads(self, a: Dict[str, object], kernel: Sequence[int], strides: Sequence[int]) -> Tuple[int, ...]:
        auto_pad = a.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if auto_pad == "NOTSET":
            pads = tuple(int(p) for p in a.get("pads", (0, 0, 0, 0)))
            if len(pads) != 4 or min(pads) < 0:
                self._fail(f"pads must be 4 non-negative ints, got {list(pads)}")
            return pads
        if auto_pad == "VALID":
            return (0, 0, 0, 0)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            _, h, w = self.shape
            begin, end = [], []
            for size, k, s in ((h, kernel[0], strides[0]), (w, kernel[1], strides[1])):
                total = max(0, (-(-size // s) - 1) * s + k - size)
                small, big = total // 2, total - total // 2
                begin.append(small if auto_pad == "SAME_UPPER" else big)
                end.append(big if auto_pad == "SAME_UPPER" else small)
            return (begin[0], begin[1], end[0], end[1])
        self._fail(f"unknown auto_pad {auto_pad!r}")
        raise AssertionError

    def _ints2(self, a: Dict[str, object], key: str, default: Sequence[int]) -> Tuple[int, int]:
        v = tuple(int(x) for x in a.get(key, default))
        if len(v) != 2:
            self._fail(f"{key} must have 2 entries (2-D only), got {list(v)}")
        return v  # type: ignore[return-value]

    def _no_dilation(self, a: Dict[str, object]) -> None:
        d = [int(x) for x in a.get("dilations", (1, 1))]
        if any(x != 1 for x in d):
            self._fail(f"{self.node.op_type} with dilations {d} is not supported (must be 1)")

    # -- the walk ----------------------------------------------------------------------------
    def run(self) -> Model:
        g = self.graph
        inputs = [i for i in g.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise OnnxImportError(f"the graph must have exactly one data input, found "
                                  f"{[i.name for i in inputs]} (graph is not a chain)")
        if len(g.output) != 1:
            raise OnnxImportError(f"the graph must have exactly one output, found {[o.name for o in g.output]}")
        inp = inputs[0]
        self.shape = self._input_shape(inp)
        input_shape = self.shape
        current = inp.name
        nodes = list(g.node)
        # users of each tensor, to reject branches and hidden side outputs
        users: Dict[str, int] = {}
        for n in nodes:
            for t in n.input:
                users[t] = users.get(t, 0) + 1
        graph_outputs = {o.name for o in g.output}
        finished_by: Optional[str] = None  # the Softmax that ended the chain

        i = 0
        while i < len(nodes):
            node = self.node = nodes[i]
            self.label = _node_label(node, i)
            op = node.op_type
            if node.domain not in ("", "ai.onnx"):
                self._fail(f"unsupported ONNX op '{node.domain}.{op}'")
            if op == "Constant":
                self._constant(node)
                i += 1
                continue
            data = [t for t in node.input if t and t not in self.consts]
            if not data:
                self._fail(f"{op} has no data input (only constants); this is not a chain")
            if len(data) > 1 or data[0] != current:
                bad = [t for t in data if t != current]
                raise OnnxImportError(
                    f"graph is not a chain: node '{self.label}' ({op}) reads {bad or data} besides/instead of "
                    f"the previous node's output '{current}'")
            if users.get(current, 0) > 1 or current in graph_outputs:
                raise OnnxImportError(
                    f"graph is not a chain: tensor '{current}' feeding node '{self.label}' ({op}) "
                    f"is used {users.get(current, 0)} times" + (" and is a graph output" if current in graph_outputs else ""))
            if finished_by is not None and op != "Identity":
                self._fail(f"Softmax at node '{finished_by}' must be the last node, but {op} follows it")
            if not node.output or not node.output[0]:
                self._fail(f"{op} has no (first) output")
            for extra in node.output[1:]:
                if extra and op == "MaxPool":
                    self._fail("MaxPool's second output (indices) is not supported")
                if extra and (users.get(extra) or extra in graph_outputs):
                    self._fail(f"{op}'s extra output '{extra}' is used; only the first output is supported")
            handler = getattr(self, f"_op_{op}", None)
            if handler is None:
                self._fail(f"unsupported ONNX op '{op}'")
            if len(node.input) < self._MIN_INPUTS.get(op, 1):
                self._fail(f"{op} needs at least {self._MIN_INPUTS.get(op, 1)} inputs, got {len(node.input)}")
            step = handler(node, nodes, i)  # may swallow following nodes (MatMul+Add)
            if op in ("Softmax", "LogSoftmax"):
                finished_by = self.label
            current = self._last_out
            i += step

        if current not in graph_outputs:
            raise OnnxImportError(f"the chain ends in tensor '{current}', but the graph output is "
                                  f"'{g.output[0].name}' (graph is not a chain)")
        try:
            return Model(self.layers, input_shape, name=g.name or "onnx_model")
        except ValueError as e:
            raise OnnxImportError(f"imported graph is not a classifier chain: {e}") from None

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

    def _out(self, node: onnx.NodeProto) -> int:
        self._last_out = node.output[0]
        return 1

    # -- one method per op: build the layer, advance the chain -------------------------------
    _MIN_INPUTS = {"Gemm": 2, "MatMul": 2, "Conv": 2, "Reshape": 2, "Add": 2}

    def _op_Identity(self, node, nodes, i):
        return self._out(node)

    def _simple(self, node, cls):
        self._add(cls(self._name(node)))
        return self._out(node)

    def _op_Relu(self, node, nodes, i):
        return self._simple(node, ReLU)

    def _op_Sigmoid(self, node, nodes, i):
        return self._simple(node, Sigmoid)

    def _op_Tanh(self, node, nodes, i):
        return self._simple(node, Tanh)

    def _op_GlobalAveragePool(self, node, nodes, i):
        self._spatial("GlobalAveragePool")
        return self._simple(node, GlobalAvgPool)

    def _op_Softmax(self, node, nodes, i):
        # Dropped: the engine trains on logits with its own softmax cross-entropy, and softmax
        # is monotone so predictions are unchanged.
        if len(self.shape) != 1:
            self._fail(f"{node.op_type} over a per-sample shape {self.shape} is not supported (needs [N, classes])")
        axis = int(_attrs(node).get("axis", -1 if self.opset >= 13 else 1))
        if axis not in (1, -1):
            self._fail(f"{node.op_type} over axis {axis} is not supported (must be the class axis)")
        return self._out(node)

    _op_LogSoftmax = _op_Softmax

    def _op_Dropout(self, node, nodes, i):
        a = _attrs(node)
        ratio = float(a.get("ratio", 0.5))
        if len(node.input) > 1 and node.input[1]:
            ratio = float(np.asarray(self._const(node.input[1], "Dropout ratio")).reshape(-1)[0])
        if not 0.0 <= ratio < 1.0:
            self._fail(f"Dropout ratio {ratio} is outside [0, 1)")
        self._add(Dropout(self._name(node), ratio))
        return self._out(node)

    def _op_Flatten(self, node, nodes, i):
        axis = int(_attrs(node).get("axis", 1))
        rank = 1 + len(self.shape)
        if axis < 0:
            axis += rank
        if axis != 1:
            self._fail(f"Flatten with axis {axis} is not supported (only axis 1: keep the batch dim)")
        return self._simple(node, Flatten)

    def _op_Reshape(self, node, nodes, i):
        if len(node.input) < 2 or not node.input[1]:
            self._fail("Reshape needs a shape input")
        target = [int(v) for v in np.asarray(self._const(node.input[1], "Reshape shape")).reshape(-1)]
        allowzero = int(_attrs(node).get("allowzero", 0))
        features = int(np.prod(self.shape))
        ok = len(target) == 2 and (
            (target[0] == 0 and not allowzero and target[1] in (-1, features))  # [0, -1]: keep N
            or (target[0] == -1 and target[1] == features)                       # [-1, F]
            or (target[0] >= 1 and target[1] in (-1, features)))                 # [N, F]: a fixed N
        if not ok:
            self._fail(f"Reshape to {target} is not supported from per-sample shape {self.shape}: only "
                       f"flattening to [N, {features}] (e.g. [0, -1], [-1, {features}], [N, {features}])")
        return self._simple(node, Flatten)

    def _dense_input(self, op: str) -> int:
        if len(self.shape) != 1:
            self._fail(f"{op} needs a 2-D [N, features] input, got per-sample shape {self.shape}; "
                       f"add a Flatten first")
        return self.shape[0]

    def _op_Gemm(self, node, nodes, i):
        a = _attrs(node)
        if int(a.get("transA", 0)) != 0:
            self._fail("Gemm with transA=1 is not supported")
        n_in = self._dense_input("Gemm")
        if len(node.input) < 2 or node.input[0] != self._current_name(node):
            self._fail("Gemm's first input (A) must be the previous node's output")
        w = self._float(self._const(node.input[1], "Gemm weight B"), "Gemm weight B")
        if w.ndim != 2:
            self._fail(f"Gemm weight must be 2-D, got shape {w.shape}")
        if not int(a.get("transB", 0)):
            w = w.T
        w = np.ascontiguousarray(w * np.float32(a.get("alpha", 1.0)), np.float32)
        if w.shape[1] != n_in:
            self._fail(f"Gemm weight {w.shape} [out, in] does not take {n_in} input features")
        bias = None
        if len(node.input) > 2 and node.input[2]:
            c = self._float(self._const(node.input[2], "Gemm bias C"), "Gemm bias C")
            bias = self._bias(c, w.shape[0], "Gemm bias C") * np.float32(a.get("beta", 1.0))
        self._add(Dense(self._name(node), w, bias))
        return self._out(node)

    def _current_name(self, node) -> str:
        return next(t for t in node.input if t and t not in self.consts)

    def _bias(self, c: np.ndarray, n: int, what: str) -> np.ndarray:
        """A per-output bias from anything that broadcasts over [N, n] the same for every row."""
        if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or c.size not in (1, n):
            self._fail(f"{what} of shape {c.shape} does not broadcast to one bias per output ({n})")
        return np.ascontiguousarray(np.broadcast_to(c.reshape(-1), (n,)), np.float32)

    def _op_MatMul(self, node, nodes, i):
        n_in = self._dense_input("MatMul")
        if node.input[0] != self._current_name(node):
            self._fail("MatMul's first input must be the previous node's output (x @ W)")
        w = self._float(self._const(node.input[1], "MatMul weight"), "MatMul weight")
        if w.ndim != 2 or w.shape[0] != n_in:
            self._fail(f"MatMul weight of shape {w.shape} does not take {n_in} input features (needs [in, out])")
        name = self._name(node)
        bias = None
        step = 1
        self._last_out = node.output[0]
        # fuse a directly following bias Add (the usual MatMul+Add spelling of a dense layer)
        if i + 1 < len(nodes):
            nxt = nodes[i + 1]
            if nxt.op_type == "Add" and nxt.domain in ("", "ai.onnx") and len(nxt.input) == 2 \
                    and node.output[0] in nxt.input:
                other = nxt.input[1] if nxt.input[0] == node.output[0] else nxt.input[0]
                if other in self.consts and sum(1 for n in nodes for t in n.input if t == node.output[0]) == 1:
                    bias = self._bias(self._float(self.consts[other], "Add bias"), w.shape[1], "Add bias")
                    self._last_out = nxt.output[0]
                    step = 2
        self._add(Dense(name, np.ascontiguousarray(w.T), bias))
        return step

    def _op_Add(self, node, nodes, i):
        # A bias added after a Dense that had none (e.g. Gemm without C): fold it in.
        prev = self.layers[-1] if self.layers else None
        other = [t for t in node.input if t != self._current_name(node)]
        if isinstance(prev, Dense) and len(other) == 1 and other[0] in self.consts:
            b = self._bias(self._float(self.consts[other[0]], "Add bias"), prev.out_features, "Add bias")
            prev.bias = np.ascontiguousarray(prev.bias + b, np.float32)
            return self._out(node)
        self._fail("unsupported ONNX op 'Add' (only as a constant bias right after Gemm/MatMul)")

    def _op_Conv(self, node, nodes, i):
        a = _attrs(node)
        c, h, w_ = self._spatial("Conv")
        if node.input[0] != self._current_name(node):
            self._fail("Conv's first input must be the previous node's output")
        group = int(a.get("group", 1))
        if group != 1:
            self._fail(f"Conv with group={group} is not supported (only group=1)")
        self._no_dilation(a)
        w = self._float(self._const(node.input[1], "Conv weight"), "Conv weight")
        if w.ndim != 4:
            self._fail(f"only 2-D Conv is supported, weight has shape {w.shape}")
        kernel = self._ints2(a, "kernel_shape", w.shape[2:])
        if tuple(kernel) != tuple(w.shape[2:]):
            self._fail(f"Conv kernel_shape {list(kernel)} does not match weight {w.shape}")
        strides = self._ints2(a, "strides", (1, 1))
        if min(strides) < 1:
            self._fail(f"Conv strides {list(strides)} must be positive")
        pads = self._pads(a, kernel, strides)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = self._float(self._const(node.input[2], "Conv bias"), "Conv bias")
        try:
            layer = Conv2d(self._name(node), w, bias, stride=strides, padding=pads)
        except ValueError as e:
            self._fail(str(e))
        self._add(layer)
        return self._out(node)

    def _pool(self, node, cls, **extra):
        a = _attrs(node)
        self._spatial(node.op_type)
        self._no_dilation(a)
        if "kernel_shape" not in a:
            self._fail(f"{node.op_type} needs kernel_shape")
        kernel = self._ints2(a, "kernel_shape", ())
        strides = self._ints2(a, "strides", (1, 1))  # ONNX default is 1, not the kernel size
        if min(kernel) < 1 or min(strides) < 1:
            self._fail(f"{node.op_type} kernel_shape {list(kernel)} and strides {list(strides)} must be positive")
        pads = self._pads(a, kernel, strides)
        try:
            layer = cls(self._name(node), kernel, strides, pads, bool(int(a.get("ceil_mode", 0))), **extra)
        except ValueError as e:
            self._fail(str(e))
        self._add(layer)
        return self._out(node)

    def _op_MaxPool(self, node, nodes, i):
        return self._pool(node, MaxPool2d)

    def _op_AveragePool(self, node, nodes, i):
        return self._pool(node, AvgPool2d, count_include_pad=bool(int(_attrs(node).get("count_include_pad", 0))))


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


def to_onnx(model: Model, opset: int = 13) -> onnx.ModelProto:
    """An ONNX model with the model's current weights; batch dim symbolic ("N")."""
    opset = int(opset)
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset must be in [{MIN_OPSET}, {onnx.defs.onnx_opset_version()}], got {opset}")
    nodes: List[onnx.NodeProto] = []
    inits: List[onnx.TensorProto] = []
    current = "input"
    # layers that emit nothing (Dropout is the identity at inference) still need a name to hand on
    emitting = [layer for layer in model.layers if layer.kind != "dropout"]
    for k, layer in enumerate(emitting):
        out = "logits" if k == len(emitting) - 1 else f"{layer.name}_out"
        kind = layer.kind
        if kind in ("dense", "conv2d"):
            w_name, b_name = f"{layer.name}.weight", f"{layer.name}.bias"
            inits += [numpy_helper.from_array(np.array(layer.weight, np.float32), w_name),
                      numpy_helper.from_array(np.array(layer.bias, np.float32), b_name)]
            if kind == "dense":
                nodes.append(helper.make_node("Gemm", [current, w_name, b_name], [out], name=layer.name,
                                              alpha=1.0, beta=1.0, transA=0, transB=1))
            else:
                nodes.append(helper.make_node("Conv", [current, w_name, b_name], [out], name=layer.name,
                                              kernel_shape=list(layer.weight.shape[2:]),
                                              strides=list(layer.stride), pads=list(layer.padding),
                                              dilations=[1, 1], group=1))
        elif kind in ("maxpool2d", "avgpool2d"):
            attrs = dict(kernel_shape=list(layer.kernel), strides=list(layer.stride),
                         pads=list(layer.padding), ceil_mode=int(layer.ceil_mode))
            if kind == "avgpool2d":
                attrs["count_include_pad"] = int(layer.count_include_pad)
            nodes.append(helper.make_node("MaxPool" if kind == "maxpool2d" else "AveragePool",
                                          [current], [out], name=layer.name, **attrs))
        elif kind == "global_avgpool":
            nodes.append(helper.make_node("GlobalAveragePool", [current], [out], name=layer.name))
        elif kind in ("relu", "sigmoid", "tanh"):
            op = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}[kind]
            nodes.append(helper.make_node(op, [current], [out], name=layer.name))
        elif kind == "flatten":
            nodes.append(helper.make_node("Flatten", [current], [out], name=layer.name, axis=1))
        else:
            raise ValueError(f"cannot export layer {layer.name!r} of kind {kind!r} to ONNX")
        current = out
    if not emitting:  # a model of nothing but identities
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


def save_onnx(model: Model, path: Union[str, os.PathLike], opset: int = 13) -> None:
    """Write ``model`` to ``path`` as ONNX, atomically (a reader never sees a half-written file)."""
    data = to_onnx(model, opset).SerializeToString()
    atomic_write(path, lambda f: f.write(data))
