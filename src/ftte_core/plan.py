"""One training step as a plan: where every value and gradient lives, and which kernel calls run.

Built from shapes alone. ``Trainer`` materialises it (allocates the buffers, runs the calls) and
``cost.predict_memory`` only adds up its buffers, so the memory the search predicts and the memory
the trainer allocates come from the same decisions and cannot drift apart.

The rules, for a subset of parameters on a DAG of layers:
- a value *requires grad* when a layer that trains, or a value that requires grad, is upstream of
  it; layers whose output does not are *frozen*: they run first, in inference mode,
  ``prefix_chunk`` samples at a time (the whole batch at once when every value they compute is
  held for the whole batch anyway: chunks would save nothing), and keep nothing;
- backward visits the layers that are not frozen, last to first; it computes an input's gradient
  only where that input requires grad, and where several paths meet (a residual join) later
  contributions are computed aside and added;
- a value is *kept* (an ``activations`` buffer for the whole batch) when some backward call
  reads it: the input of a layer whose weight rows train, an activation's output, a Mul's other
  operand; a frozen layer's output read by a layer that is not frozen also lives for the whole
  batch (``workspace`` unless kept). Layers also keep their ``saved_buffers`` (ReLU's bit mask,
  max-pool's argmax), except that a layer with ``output_replaces_saved`` whose output is kept
  anyway runs forward without a scope and gets that output in backward instead;
- everything else lives in reused scratch *slots* (``workspace``): a value takes a free slot when
  it is computed and frees it after its last reader; a gradient likewise, until its producer's
  backward has run. Each slot grows to the largest thing it ever holds;
- an elementwise layer (activation, batch norm, x+c) runs in place over its input when nobody
  else reads that input and backward does not need it; in backward it writes its input's
  gradient over its own. An Add or Sub of two tensors hands its output's gradient to its first
  input as is (it is the same numbers);
- a ReLU whose only reader is a max-pool (``MaxPool2d.fuses_relu``) runs inside that pool
  (``forward_relu``/``backward_relu``: the max over relu(x), ReLU's gate in the pool's backward):
  the plan treats it as a view (no calls, no mask, its output is its input's buffer and its
  gradient its input's) and gives the pool the ReLU's input. ``FUSE_RELU_POOL`` turns it off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _kernels as K
from .graph import VIEW_KINDS, MaxPool2d, Model, ReLU
from .subset import Subset

F32 = 4
CATEGORIES = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "activations", "workspace")


class Ref:
    """A placeholder for an array inside a plan.

    kind "x": rows a:b of the step's input batch; "fixed": a whole-batch buffer ``key`` (rows a:b
    when a chunk of the frozen prefix writes into it); "slot": the first elements of scratch slot
    ``key``. Always viewed as ``shape``. (A plain class: the search builds thousands of plans.)
    """

    __slots__ = ("kind", "key", "shape", "a", "b")

    def __init__(self, kind: str, key, shape: tuple, a: int = 0, b: int = -1):
        self.kind, self.key, self.shape, self.a, self.b = kind, key, shape, a, b

    def view(self, shape) -> "Ref":
        return Ref(self.kind, self.key, tuple(shape), self.a, self.b)

    def __repr__(self) -> str:
        return f"Ref({self.kind}, {self.key!r}, {self.shape}, {self.a}:{self.b})"


@dataclass
class StepPlan:
    batch: int
    fixed: Dict[object, Tuple[tuple, object, str]]  # key -> (shape, dtype, category)
    slots: List[int]                                 # float32 elements per scratch slot
    forward: list                                    # (fn, args); args may hold Refs or lists of Refs
    backward: list
    logits: Ref
    probs: Ref
    dlogits: Ref
    scratch: List[Callable[[int], int]] = field(default_factory=list)  # threads -> bytes, per kernel call

    def buffer_bytes(self) -> Dict[str, int]:
        """Bytes of the plan's own buffers by category (slots count as workspace)."""
        out = {"activations": 0, "workspace": 0}
        for shape, dtype, category in self.fixed.values():
            out[category] = out.get(category, 0) + int(np.prod(shape)) * np.dtype(dtype).itemsize
        out["workspace"] += F32 * sum(self.slots)
        return out

    def kernel_scratch(self, threads: int) -> int:
        """Most scratch any one kernel call holds (calls never overlap)."""
        return max((q(threads) for q in self.scratch), default=0)


class _Slots:
    """Scratch slots with first-fit reuse: the smallest free slot that is large enough, else the
    largest free one (it grows), else a new one."""

    def __init__(self):
        self.size: List[int] = []
        self.free: List[bool] = []

    def take(self, numel: int) -> int:
        free = [k for k, f in enumerate(self.free) if f]
        fits = [k for k in free if self.size[k] >= numel]
        if fits:
            k = min(fits, key=lambda j: (self.size[j], j))
        elif free:
            k = max(free, key=lambda j: (self.size[j], -j))
            self.size[k] = numel
        else:
            self.size.append(numel)
            self.free.append(True)
            k = len(self.size) - 1
        self.free[k] = False
        return k

    def give(self, k: int) -> None:
        assert not self.free[k], "slot released twice"
        self.free[k] = True


def _numel(shape) -> int:
    return math.prod(shape)


def requires_grad(model: Model, subset: Subset) -> List[bool]:
    """Per value (0 = input, i + 1 = layer i's output): does the loss's gradient reach a trained
    parameter through it?"""
    req = [False] * (len(model.layers) + 1)
    for i, (layer, ins) in enumerate(zip(model.layers, model.inputs)):
        req[i + 1] = subset.get(layer.name) is not None or any(req[v] for v in ins)
    return req


FROZEN_MODES = ("float32", "int8")

#: fuse a ReLU into the max-pool that is its only reader (``build(fuse_relu_pool=None)`` reads it;
#: the results are bit-identical either way, tests compare the two)
FUSE_RELU_POOL = True


def check_frozen(frozen) -> str:
    if frozen not in FROZEN_MODES:
        raise ValueError(f"frozen must be 'float32' or 'int8', got {frozen!r}")
    return frozen


def check_micro_batch(micro_batch) -> int:
    """Samples per pass of a micro-batched step (``Trainer(micro_batch=...)``); 0 = one pass."""
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, (int, np.integer)) or micro_batch < 0:
        raise ValueError(f"micro_batch must be an integer >= 0 (0: the whole batch in one pass), got {micro_batch!r}")
    return int(micro_batch)


def int8_layers(model: Model, subset: Subset, frozen: str = "float32") -> set:
    """Names of the layers whose weight is int8 during a step: those already held as int8, and
    with ``frozen="int8"`` every Dense/Conv whose weight rows do not train (its bias may)."""
    check_frozen(frozen)
    return {layer.name for layer, _ls, r in _int8_capable(model, subset) if layer.is_int8 or (frozen == "int8" and r == 0)}


def _int8_capable(model: Model, subset: Subset):
    """(layer, its subset entry or None, trained row count) of every layer that can hold int8 weights."""
    for layer in model.param_layers:
        if getattr(layer, "int8_capable", False):
            ls = subset.get(layer.name)
            yield layer, ls, 0 if ls is None else ls.rows.size


def mixed_layers(model: Model, subset: Subset, frozen: str = "float32") -> set:
    """Names of the layers whose weight is mixed during a step (frozen rows int8, trained rows
    float32: ``Layer.mix_weight``): those already held mixed over exactly the subset's rows (or,
    with ``frozen="float32"``, training no rows at all), and with ``frozen="int8"`` every Dense
    and group-1 Conv of which some but not all rows train (depthwise and grouped convolutions
    stay float32 when partly trained)."""
    check_frozen(frozen)
    out = set()
    for layer, ls, r in _int8_capable(model, subset):
        if layer.is_mixed and (np.array_equal(ls.rows, layer.trained_rows) if r else frozen == "float32"):
            out.add(layer.name)
        elif (frozen == "int8" and 0 < r < layer.weight_shape[0] and not layer.is_int8
              and getattr(layer, "mode", "dense") == "dense"):
            out.add(layer.name)
    return out


def relu_pool_pairs(model: Model) -> Dict[int, int]:
    """ReLU layer index -> the max-pool that is its output's only reader and can do its work
    (``MaxPool2d.fuses_relu``). A ReLU subclass may do other things: only ReLU itself."""
    readers: Dict[int, List[int]] = {}
    for i, ins in enumerate(model.inputs):
        for v in ins:
            readers.setdefault(v, []).append(i)
    out = {}
    for i, layer in enumerate(model.layers):
        r = readers.get(i + 1, [])
        if (type(layer) is ReLU and i + 1 != len(model.layers) and len(r) == 1
                and isinstance(model.layers[r[0]], MaxPool2d) and model.layers[r[0]].fuses_relu):
            out[i] = r[0]
    return out


def build(model: Model, subset: Subset, n: int, prefix_chunk: int = 8, every_chunk: bool = True,
          frozen: str = "float32", fused: Optional[bool] = None,
          fuse_relu_pool: Optional[bool] = None) -> StepPlan:
    """The plan of one step of batch size n (see the module docstring for the rules).

    ``every_chunk=False`` plans the frozen part for its first chunk only: the buffers are the
    same (later chunks reuse them), the calls are not all there; the cost model needs no more.
    ``frozen="int8"``: kernel scratch as with int8 weights in the layers ``int8_layers`` names.
    ``fused=False``: backward fills gradient buffers instead of updating (a micro-batched step,
    ``Trainer(micro_batch=...)``); None: ``fused_update`` decides. ``fuse_relu_pool``: run a ReLU
    inside the max-pool reading it (``relu_pool_pairs``); None: ``FUSE_RELU_POOL`` decides."""
    layers, inputs, shapes = model.layers, model.inputs, model.shapes
    in_shapes = [[shapes[v] for v in ins] for ins in inputs]
    L = len(layers)
    out = L  # the output value
    req = requires_grad(model, subset)
    if not req[out]:
        raise ValueError("the subset trains nothing")
    fused = fused_update(model, subset) if fused is None else bool(fused)
    active = [req[i + 1] for i in range(L)]  # layers that run backward
    dx_needed = [tuple(req[v] for v in inputs[i]) for i in range(L)]
    subs = [subset.get(layer.name) for layer in layers]
    trains_rows = [s is not None and s.rows.size > 0 for s in subs]
    int8 = int8_layers(model, subset, frozen)
    mixed = mixed_layers(model, subset, frozen)
    q8 = [layer.name in int8 for layer in layers]  # whole-int8 weight (never updated)
    packed = [layer.name in int8 or layer.name in mixed for layer in layers]  # the kernels pack it as int8
    pairs = relu_pool_pairs(model) if (FUSE_RELU_POOL if fuse_relu_pool is None else fuse_relu_pool) else {}
    relu_pooled = set(pairs.values())  # pools that do their input ReLU's work
    # a fused ReLU is planned as a view of its input: the pool reads that input and applies it
    view = [layer.kind in VIEW_KINDS or i in pairs for i, layer in enumerate(layers)]

    def forward_fn(i: int):
        return layers[i].forward_relu if i in relu_pooled else layers[i].forward

    needs_in: List[Tuple[bool, ...]] = [()] * L
    needs_out = [False] * L
    kept_value = [False] * (L + 1)
    for i in range(L):
        if active[i] and not view[i]:
            needs_in[i], needs_out[i] = layers[i].needs(trains_rows[i], dx_needed[i])
            for v, f in zip(inputs[i], needs_in[i]):
                kept_value[v] |= f
            kept_value[i + 1] |= needs_out[i]

    readers: List[set] = [set() for _ in range(L + 1)]
    for i, ins in enumerate(inputs):
        for v in ins:
            readers[v].add(i)

    # -- storage: views and in-place layers share their input's buffer -----------------------------
    storage = list(range(L + 1))
    content = list(range(L + 1))  # views share their input's content; an in-place write makes new content
    members: Dict[int, List[int]] = {v: [v] for v in range(L + 1)}
    for i, layer in enumerate(layers):
        v = i + 1
        if view[i]:
            s = storage[inputs[i][0]]
            content[v] = content[inputs[i][0]]
        else:
            s = v
            if layer.elementwise and len(inputs[i]) == 1:
                u = inputs[i][0]
                aliases = [m for m in members[storage[u]] if content[m] == content[u]]
                others = set().union(*(readers[m] for m in aliases)) - {i}
                if storage[u] != 0 and not others and not any(kept_value[m] for m in aliases):
                    s = storage[u]
        if s != v:
            storage[v] = s
            members[s].append(v)
            del members[v]
    kept = {s: any(kept_value[m] for m in ms) for s, ms in members.items()}
    # a layer whose backward can read its output instead of its saved buffers (ReLU: y > 0 is its
    # bit mask) does so when another layer's backward keeps that output anyway
    output_instead = [False] * L
    for i in range(L):
        v = i + 1
        if active[i] and not view[i] and layers[i].output_replaces_saved and not needs_out[i]:
            same = [m for m in members[storage[v]] if content[m] == content[v]]
            if any(kept_value[m] for m in same):
                output_instead[i] = needs_out[i] = True
    # a storage lives for the whole batch when a frozen layer fills it and a trained one touches it
    whole = {}
    for s, ms in members.items():
        base_frozen = s != 0 and not active[s - 1]
        touched = any(active[r] for m in ms for r in readers[m]) or any(m > 0 and active[m - 1] for m in ms)
        whole[s] = s != 0 and (kept[s] or (base_frozen and (touched or s == storage[out])))
    last_read = {s: max((r for m in ms for r in readers[m]), default=-1) for s, ms in members.items()}
    last_read[storage[out]] = L

    fixed: Dict[object, Tuple[tuple, object, str]] = {}
    slots = _Slots()
    scratch: List[Callable[[int], int]] = []

    def whole_ref(s: int) -> Ref:
        key = ("value", s)
        if key not in fixed:
            fixed[key] = ((n,) + shapes[s], np.float32, "activations" if kept[s] else "workspace")
        return Ref("fixed", key, (n,) + shapes[s], 0, n)

    def arg(refs: Sequence[Ref], i: int):
        return refs[0] if layers[i].arity == 1 else list(refs)

    # -- forward: the frozen layers, chunk by chunk ---------------------------------------------
    forward: list = []
    frozen = [i for i in range(L) if not active[i]]
    chunk = max(1, min(int(prefix_chunk), n))
    if all(whole[storage[i + 1]] or storage[i + 1] == 0 for i in frozen):
        # every value the frozen part computes is held for the whole batch anyway (an MLP's
        # frozen first layers, whose output a trained layer reads): chunks would save no buffer,
        # only cost a pass per chunk (and an int8 weight dequantised per chunk), so one pass
        chunk = n
    where: Dict[int, Ref] = {}  # storage -> its buffer in the current pass
    val: Dict[int, Ref] = {}
    chunk_slot: Dict[int, int] = {}  # frozen storage -> the slot the first chunk gave it; later chunks reuse it

    def place(v: int, a: int, b: int) -> Ref:
        """Where value v lives for samples a:b (its storage's buffer, viewed at v's shape)."""
        s = storage[v]
        if s == 0:
            return Ref("x", None, (b - a,) + shapes[v], a, b)
        if s not in where:
            if whole[s]:
                where[s] = whole_ref(s)
            elif s in chunk_slot:  # the same layers in the same order: chunk 0's slots, never larger
                k = chunk_slot[s]
                assert slots.free[k] and slots.size[k] >= (b - a) * _numel(shapes[s])
                slots.free[k] = False
                where[s] = Ref("slot", k, ((b - a),) + shapes[s])
            else:
                where[s] = Ref("slot", slots.take((b - a) * _numel(shapes[s])), ((b - a),) + shapes[s])
                if a == 0 and b < n:
                    chunk_slot[s] = where[s].key
        r = where[s]
        if r.kind == "fixed" and (a, b) != (0, n):
            return Ref("fixed", r.key, (b - a,) + shapes[v], a, b)
        return r.view((b - a,) + shapes[v])

    def release_after(i: int) -> None:
        for v in set(inputs[i]):
            s = storage[v]
            if s in where and not whole[s] and last_read[s] == i and where[s].kind == "slot":
                slots.give(where.pop(s).key)

    if frozen:
        for a in range(0, n if every_chunk else 1, chunk):
            b = min(n, a + chunk)
            for i in frozen:
                v = i + 1
                ins = [place(u, a, b) for u in inputs[i]]
                y = place(v, a, b)
                if not view[i]:
                    forward.append((forward_fn(i), (arg(ins, i), y, None)))
                    if a == 0:
                        scratch.append(_fwd_scratch(layers[i], b - a, in_shapes[i], packed[i]))
                release_after(i)
            for s in [s for s, r in where.items() if r.kind == "slot"]:  # a chunk's scratch ends with it
                slots.give(where.pop(s).key)

    # -- forward: the layers that train or lead to training ----------------------------------------
    for i in range(L):
        if not active[i]:
            continue
        v = i + 1
        ins = [place(u, 0, n) for u in inputs[i]]
        y = place(v, 0, n)
        val[v] = y
        for u, r in zip(inputs[i], ins):
            val[u] = r
        if view[i]:
            release_after(i)
            continue
        if output_instead[i]:  # no scope: the layer saves nothing, backward gets its output
            forward.append((forward_fn(i), (arg(ins, i), y, None)))
        else:
            for name, (shape, dtype) in layers[i].saved_buffers(n, in_shapes[i], shapes[v]).items():
                fixed[(i, name)] = (tuple(shape), dtype, "activations")
            forward.append((forward_fn(i), (arg(ins, i), y, ("scope", i))))
        scratch.append(_fwd_scratch(layers[i], n, in_shapes[i], packed[i]))
        release_after(i)
    logits = place(out, 0, n)
    fixed[("loss", "probs")] = ((n,) + shapes[out], np.float32, "activations")
    probs = Ref("fixed", ("loss", "probs"), (n,) + shapes[out], 0, n)
    for s in [s for s, r in where.items() if r.kind == "slot"]:  # backward never reads them
        slots.give(where.pop(s).key)

    # -- backward -------------------------------------------------------------------------------
    grad_base = list(range(L + 1))
    for i in range(L):
        if view[i]:
            grad_base[i + 1] = grad_base[inputs[i][0]]
    grads: Dict[int, Ref] = {}
    dlogits = Ref("slot", slots.take(n * _numel(shapes[out])), (n,) + shapes[out])
    grads[grad_base[out]] = dlogits
    backward: list = []
    for i in range(L - 1, -1, -1):
        layer = layers[i]
        if not active[i] or view[i]:
            continue
        v = i + 1
        dy_ref = grads.get(v)
        if dy_ref is None:
            raise AssertionError(f"no gradient reaches {layer.name!r}")
        dy = dy_ref.view((n,) + shapes[v])
        dxs: List[Optional[Ref]] = []
        adds = []
        handed_over = False
        for j, u in enumerate(inputs[i]):
            if not dx_needed[i][j]:
                dxs.append(None)
                continue
            gu = grad_base[u]
            if gu not in grads:
                passes = (layer.elementwise and len(inputs[i]) == 1) or (j == 0 and layer.passes_first_gradient)
                if passes and not handed_over and _numel(shapes[u]) == _numel(shapes[v]):
                    grads[gu] = dy_ref.view((n,) + shapes[gu])  # dx over dy
                    handed_over = True
                else:
                    grads[gu] = Ref("slot", slots.take(n * _numel(shapes[gu])), (n,) + shapes[gu])
                dxs.append(grads[gu].view((n,) + shapes[u]))
            else:  # another path got here first: compute aside, then add
                tmp = Ref("slot", slots.take(n * _numel(shapes[u])), (n,) + shapes[u])
                dxs.append(tmp)
                adds.append((grads[gu].view((n,) + shapes[u]), tmp))
        x_args = [val[u] if f else None for u, f in zip(inputs[i], needs_in[i])]
        y_arg = val[v] if needs_out[i] else None
        backward_fn = layer.backward_relu if i in relu_pooled else layer.backward
        backward.append((backward_fn, (arg(x_args, i), y_arg, dy, arg(dxs, i), ("scope", i))))
        ls = subs[i]
        rows = ls.rows if ls is not None else np.zeros(0, np.int32)
        scratch.append(_bwd_scratch(layer, n, in_shapes[i], rows, ls is not None and ls.bias, dx_needed[i],
                                    packed[i], fused and ls is not None and not q8[i]))
        for total, tmp in adds:
            backward.append((K.add_forward, (total, tmp, total)))
            slots.give(tmp.key)
        if not handed_over:
            slots.give(dy_ref.key)
        del grads[v]
    return StepPlan(n, fixed, list(slots.size), forward, backward, logits, probs, dlogits, scratch)


def _memo(layer, key, compute) -> int:
    """Kernel scratch sizes, remembered per layer (the search asks the same ones many times)."""
    memo = layer.__dict__.setdefault("_scratch_memo", {})
    got = memo.get(key)
    if got is None:
        got = memo[key] = int(compute())
    return got


def _fwd_scratch(layer, n, in_shapes, int8=False):
    key = ("f", n, tuple(map(tuple, in_shapes)), int8)
    kw = {"int8": True} if int8 else {}  # only Dense and Conv take it
    return lambda threads: _memo(layer, key + (threads,), lambda: layer.forward_scratch(n, in_shapes, threads, **kw))


def _bwd_scratch(layer, n, in_shapes, rows, bias, dx_needed, int8=False, fused=False):
    key = ("b", n, tuple(map(tuple, in_shapes)), rows.tobytes(), bool(bias), tuple(dx_needed), int8, bool(fused))
    kw = {"int8": True} if int8 else {}  # only Dense and Conv take them
    if fused:
        kw["fused_update"] = True
    return lambda threads: _memo(layer, key + (threads,),
                                 lambda: layer.backward_scratch(n, in_shapes, rows, bias, dx_needed, threads, **kw))


# -- parameters: what both the trainer and the cost model hold besides the step's buffers ----------

def fused_update(model: Model, subset: Subset) -> bool:
    """Does the training step update parameters inside backward, with no gradient buffers?

    Yes unless a trained parameter array is also another layer's (tied weights, e.g. one ONNX
    initializer read by two nodes): that layer's backward would then compute its input gradient
    from weights a later layer already moved, so the step keeps whole gradients and updates after
    backward, as ``Trainer.gradients`` does."""
    spans = []  # (start, end, layer index, trained): one sort finds every overlap
    for i, layer in enumerate(model.param_layers):
        trained = subset.get(layer.name) is not None
        arrays = layer.weight_arrays() if hasattr(layer, "weight_arrays") else [layer.weight]
        for a in arrays + [layer.bias]:
            if a.nbytes:
                start = a.__array_interface__["data"][0]
                spans.append((start, start + a.nbytes, i, trained))
    spans.sort()
    reach = None  # the span reaching furthest so far
    for span in spans:
        if reach is not None and span[0] < reach[1] and span[2] != reach[2] and (span[3] or reach[3]):
            return False
        if reach is None or span[1] > reach[1]:
            reach = span
    return True


def parameter_buffers(model: Model, subset: Subset, momentum: float, fused: Optional[bool] = None,
                      frozen: str = "float32") -> Dict[tuple, Tuple[tuple, object, str]]:
    """What the trainer holds for the trained parameters besides the weights: key -> (shape,
    dtype, category).

    Buffered (``fused=False``: ``Trainer.gradients``, and steps on tied weights): one gradient
    row per trained weight row and the whole bias, per layer. Fused (a training step, the default
    where ``fused_update`` allows it): no gradient buffers for layers whose backward updates them
    itself (``Layer.fuses_update``: dense and im2col convolutions, whose tiles are kernel scratch);
    the others (batch norm, depthwise and grouped convolutions: small) share one buffer
    ("update", "grad") of the largest of their gradients (rows, then bias), used by one layer at a
    time; so does a layer with int8 weights (``int8_layers``: only its bias may train). With momentum, both add velocity buffers of the trained rows and biases (optimizer state).
    A micro-batched step (``Trainer(micro_batch=...)``) is buffered: its passes add into the whole
    gradients."""
    if fused is None:
        fused = fused_update(model, subset)
    int8 = int8_layers(model, subset, frozen)
    out = {}
    shared = 0
    for layer in model.param_layers:
        ls = subset.get(layer.name)
        if ls is None:
            continue
        w = ((ls.rows.size,) + layer.weight_shape[1:], np.float32, "gradients") if ls.rows.size else None
        b = (layer.bias.shape, np.float32, "gradients") if ls.bias else None
        if not fused:
            if w:
                out[(layer.name, "dw")] = w
            if b:
                out[(layer.name, "db")] = b
        elif not layer.fuses_update or layer.name in int8:
            shared = max(shared, (_numel(w[0]) if w else 0) + (_numel(b[0]) if b else 0))
        if momentum:
            if w:
                out[(layer.name, "vw")] = (w[0], w[1], "optimizer_state")
            if b:
                out[(layer.name, "vb")] = (b[0], b[1], "optimizer_state")
    if shared:
        out[("update", "grad")] = ((shared,), np.float32, "gradients")
    return out


def weight_bytes(model: Model, subset: Subset, frozen_mode: str = "float32") -> Tuple[int, int]:
    """(frozen, trainable) bytes of the parameters; constants (batch-norm statistics) are frozen.
    An int8 weight (see ``int8_layers``) counts one byte per value plus a float32 scale per row;
    a mixed one (``mixed_layers``) its frozen rows so, its trained rows as float32 (trainable),
    plus its slot table (int32 per row, frozen)."""
    int8 = int8_layers(model, subset, frozen_mode)
    mixed = mixed_layers(model, subset, frozen_mode)
    frozen = trainable = 0
    for layer in model.layers:
        if not layer.has_params:
            frozen += sum(a.nbytes for a in layer.constants().values())
            continue
        frozen += sum(a.nbytes for a in layer.constants().values())
        ls = subset.get(layer.name)
        shape = layer.weight_shape
        if layer.name in int8:  # no row trains: the whole weight is frozen
            frozen += math.prod(shape) + F32 * shape[0] + layer.bias.nbytes * (ls is None or not ls.bias)
            trainable += layer.bias.nbytes if ls is not None and ls.bias else 0
            continue
        row_len = math.prod(shape[1:])
        r = 0 if ls is None else ls.rows.size
        trainable += r * row_len * F32
        if layer.name in mixed:  # int8 frozen rows + their scales, and the row -> slot table
            held = layer.trained_rows.size if layer.is_mixed else r  # float rows (more than r if none train)
            frozen += (shape[0] - held) * (row_len + F32) + (held - r) * row_len * F32 + shape[0] * 4
        else:
            frozen += (shape[0] - r) * row_len * F32
        if ls is not None and ls.bias:
            trainable += layer.bias.nbytes
        else:
            frozen += layer.bias.nbytes
    return frozen, trainable
