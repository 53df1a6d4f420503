"""The cost model: memory and compute of one training step, predicted from shapes alone.

``predict_memory(model, subset, batch_size)`` gives the bytes a device needs for one step of
``Trainer`` on that subset, by the same categories the trainer records, without running
anything. The subset search uses it to respect a device's budget; the tests hold it to within
10% of what the engine really allocates.

The rules (they follow from how ``Trainer.step`` works; see trainer.py):
- weights: every parameter is held once, float32; rows that train count as trainable, the rest
  as frozen;
- gradients: one float32 buffer per trained weight row and per trained bias; the same again as
  optimizer state when momentum is on;
- activations: kept from forward to backward, only from the earliest trainable layer up: an
  activation function's output (its gradient needs it), the input of a layer whose weight rows
  train (the weight gradient needs it), max-pool argmax indices (int32), dropout masks, and the
  softmax probabilities;
- workspace: two scratch buffers for the forward values nobody keeps and two for the backward
  gradients (each as large as the largest tensor it must hold), plus kernel scratch: a
  convolution's im2col columns of one image per thread, and GEMM packing panels.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from . import _kernels as K
from .graph import Model
from .subset import Subset

F32 = 4
_ACTIVATION_KINDS = ("relu", "sigmoid", "tanh")
_WEIGHT_KINDS = ("dense", "conv2d")

def _numel(shape) -> int:
    return int(np.prod(shape))


def _trained_rows(subset: Subset, name: str) -> int:
    ls = subset.get(name)
    return 0 if ls is None else int(ls.rows.size)


def predict_memory(model: Model, subset: Optional[Subset] = None, batch_size: int = 32, momentum: float = 0.0,
                   threads: Optional[int] = None, prefix_chunk: int = 8) -> Dict[str, int]:
    """Predicted bytes of one training step by category, plus "total"."""
    subset = subset if subset is not None else Subset.full(model)
    threads = threads or K.get_num_threads()
    n = batch_size
    layers, shapes = model.layers, model.shapes
    first = subset.earliest_layer_index(model)
    if first is None:
        raise ValueError("the subset trains nothing")

    frozen = trainable = grads = 0
    for layer in model.param_layers:
        rows = layer.weight.shape[0]
        row_bytes = F32 * layer.weight.size // rows
        r = _trained_rows(subset, layer.name)
        ls = subset.get(layer.name)
        bias_trains = ls is not None and ls.bias
        trainable += r * row_bytes + (F32 * layer.bias.size if bias_trains else 0)
        frozen += (rows - r) * row_bytes + (0 if bias_trains else F32 * layer.bias.size)
        grads += r * row_bytes + (F32 * layer.bias.size if bias_trains else 0)

    # Buffers: an activation right after a layer that does not keep its own output runs in place
    # in that layer's buffer; `owner[i]` is the layer whose buffer holds i's output.
    owner, inplace, prev = list(range(len(layers))), [False] * len(layers), None
    for i, layer in enumerate(layers):
        if layer.kind == "flatten":
            owner[i] = owner[prev] if prev is not None else i
            continue
        if layer.kind in _ACTIVATION_KINDS and prev is not None and layers[prev].kind not in _ACTIVATION_KINDS:
            inplace[i], owner[i] = True, owner[prev]
        prev = i
    kept = [False] * len(layers)  # by owner: must survive until backward
    for i in range(len(layers)):
        if i >= first and layers[i].kind in _ACTIVATION_KINDS:
            kept[owner[i]] = True
        nxt = i + 1
        if first <= nxt < len(layers) and layers[nxt].kind in _WEIGHT_KINDS and _trained_rows(subset, layers[nxt].name):
            kept[owner[i]] = True
    real = [i for i in range(len(layers)) if layers[i].kind != "flatten"]
    prefix = [i for i in real if i < first]

    # The frozen prefix runs `prefix_chunk` samples at a time; only its last output is whole-batch.
    activations = workspace = 0
    if prefix:
        last = prefix[-1]
        size = F32 * n * _numel(shapes[first])
        if kept[owner[last]]:
            activations += size
        else:
            workspace += size
        chunk = min(prefix_chunk, n)
        slot_max, slot = {}, None
        for j in prefix[:-1]:
            if not inplace[j]:
                slot = 1 if slot == 0 else 0
                slot_max[slot] = max(slot_max.get(slot, 0), chunk * _numel(shapes[j + 1]))
        workspace += F32 * sum(slot_max.values())
    activations += sum(F32 * n * _numel(shapes[i + 1]) for i in real
                       if i >= first and kept[i] and owner[i] == i)
    for i in range(first, len(layers)):
        if layers[i].kind == "maxpool2d":
            activations += 4 * n * _numel(shapes[i + 1])  # int32 argmax
        elif layers[i].kind == "dropout" and layers[i].p > 0:
            activations += F32 * n * _numel(shapes[i])
    activations += F32 * n * model.num_classes  # softmax probabilities

    # The rest of the forward values go round two scratch buffers: an output goes to the one its
    # input is not in. Backward gradients likewise, except that activations update in place.
    # Each buffer grows to the largest tensor it ever holds.
    slot_max, slot = {}, None
    for i in real:
        if i < first or inplace[i]:
            continue
        slot = None if kept[i] else (1 if slot == 0 else 0)
        if slot is not None:
            slot_max[slot] = max(slot_max.get(slot, 0), n * _numel(shapes[i + 1]))
    workspace += F32 * sum(slot_max.values())
    slot_max, slot = {0: n * model.num_classes}, 0  # the loss gradient starts in buffer 0
    for i in reversed(real):
        if i <= first or inplace[i]:
            continue
        slot ^= 1
        slot_max[slot] = max(slot_max.get(slot, 0), n * _numel(shapes[i]))
    workspace += F32 * sum(slot_max.values())
    workspace += _kernel_scratch(model, subset, first, n, threads, min(prefix_chunk, n))

    out = {"frozen_weights": frozen, "trainable_weights": trainable, "gradients": grads,
           "optimizer_state": grads if momentum else 0, "activations": activations, "workspace": workspace}
    out["total"] = sum(out.values())
    return out


def _kernel_scratch(model: Model, subset: Subset, first: int, n: int, threads: int, chunk: int) -> int:
    """Largest scratch any single kernel call of the step holds (calls do not overlap).

    The kernels say what they would take for a shape (GEMM packing panels, im2col columns,
    per-chunk weight-gradient partials) without running: ``sgemm_scratch_bytes`` and
    ``conv2d_scratch_bytes`` share their sizing code with the kernels themselves.
    """
    peak = 0
    batch = n
    for i, layer in enumerate(model.layers):
        s_in = model.shapes[i]
        n = chunk if i < first else batch  # the frozen prefix runs a chunk of samples at a time
        if layer.kind == "dense":
            o, f = layer.out_features, layer.in_features
            peak = max(peak, K.sgemm_scratch_bytes(n, o, f, False, True))
            if i >= first:
                r = _trained_rows(subset, layer.name)
                if r:
                    peak = max(peak, K.sgemm_scratch_bytes(r, f, n, True, False, r < o))
                if subset.get(layer.name) is not None and subset.get(layer.name).bias:
                    peak = max(peak, F32 * (r if 0 < r == o else o))
                if i > first:
                    peak = max(peak, K.sgemm_scratch_bytes(n, f, o, False, False))
        elif layer.kind == "conv2d":
            x_shape = (n,) + tuple(s_in)
            peak = max(peak, K.conv2d_scratch_bytes(x_shape, layer.weight.shape, layer.stride, layer.padding,
                                                    threads=threads))
            if i >= first:
                r = _trained_rows(subset, layer.name)
                ls = subset.get(layer.name)
                full = r == layer.weight.shape[0]
                need_dx = i > first
                if r or need_dx:
                    peak = max(peak, K.conv2d_scratch_bytes(x_shape, layer.weight.shape, layer.stride, layer.padding,
                                                            backward=True, n_rows=r if r else None, dw=r > 0,
                                                            dx=need_dx, threads=threads))
                if ls is not None and ls.bias and not full:  # the whole bias, in a call of its own
                    peak = max(peak, K.conv2d_scratch_bytes(x_shape, layer.weight.shape, layer.stride,
                                                            layer.padding, backward=True, n_rows=None, dw=False,
                                                            dx=False, threads=threads))
    return peak


def training_flops(model: Model, subset: Optional[Subset] = None, batch_size: int = 1) -> int:
    """Flops of one training step (forward, backward down to the earliest trainable layer, update)."""
    subset = subset if subset is not None else Subset.full(model)
    first = subset.earliest_layer_index(model)
    total = model.flops()
    if first is None:
        return total * batch_size
    for i in range(first, len(model.layers)):
        layer, s_in = model.layers[i], model.shapes[i]
        if layer.kind == "flatten":
            continue
        if i > first:  # input gradient
            total += layer.flops(s_in)
        if layer.kind in _WEIGHT_KINDS:
            r = _trained_rows(subset, layer.name)
            total += layer.flops(s_in) * r // layer.weight.shape[0]  # weight gradient of trained rows
    return total * batch_size + 3 * subset.num_trainable(model)
