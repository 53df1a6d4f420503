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

# GEMM packing panel bounds (elements); see csrc/gemm.cpp.
GEMM_KC = 256
GEMM_MC = 96
GEMM_NC = 2048


def _numel(shape) -> int:
    return int(np.prod(shape))


def _trained_rows(subset: Subset, name: str) -> int:
    ls = subset.get(name)
    return 0 if ls is None else int(ls.rows.size)


def predict_memory(model: Model, subset: Optional[Subset] = None, batch_size: int = 32, momentum: float = 0.0,
                   threads: Optional[int] = None) -> Dict[str, int]:
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

    # Which layer outputs survive until backward.
    kept = [False] * len(layers)
    for i in range(max(first - 1, 0), len(layers)):
        if i >= first and layers[i].kind in _ACTIVATION_KINDS:
            kept[i] = True
        nxt = i + 1
        if nxt < len(layers) and layers[nxt].kind in _WEIGHT_KINDS and _trained_rows(subset, layers[nxt].name):
            kept[i] = True
    for i in range(len(layers) - 1, 0, -1):
        if kept[i] and layers[i].kind == "flatten":
            kept[i - 1], kept[i] = True, False
    activations = sum(F32 * n * _numel(shapes[i + 1]) for i in range(len(layers)) if kept[i])
    for i in range(first, len(layers)):
        if layers[i].kind == "maxpool2d":
            activations += 4 * n * _numel(shapes[i + 1])  # int32 argmax
        elif layers[i].kind == "dropout" and layers[i].p > 0:
            activations += F32 * n * _numel(shapes[i])
    activations += F32 * n * model.num_classes  # softmax probabilities

    # Scratch: forward values nobody keeps go round two buffers; so do backward gradients.
    # A transient output goes to the scratch buffer its input is not in: two transient outputs
    # in a row need both buffers, a transient output after a kept one only the first.
    slots_used, slot = set(), None
    for i, layer in enumerate(layers):
        if layer.kind == "flatten":
            continue
        slot = None if kept[i] else (1 if slot == 0 else 0)
        if slot is not None:
            slots_used.add(slot)
    fwd_slots = len(slots_used)
    workspace = fwd_slots * F32 * n * max(_numel(s) for s in shapes[1:])
    has_dx = any(layers[i].kind != "flatten" for i in range(first + 1, len(layers)))
    workspace += (2 if has_dx else 1) * F32 * n * max(_numel(s) for s in shapes[first + 1:])
    workspace += _kernel_scratch(model, subset, first, n, threads)

    out = {"frozen_weights": frozen, "trainable_weights": trainable, "gradients": grads,
           "optimizer_state": grads if momentum else 0, "activations": activations, "workspace": workspace}
    out["total"] = sum(out.values())
    return out


def _gemm_pack_bytes(m: int, n: int, k: int, threads: int) -> int:
    """Upper bound of one GEMM's packing panels (A panel per thread, one shared B panel)."""
    kc = min(k, GEMM_KC)
    return F32 * kc * (min(n, GEMM_NC) + threads * min(m, GEMM_MC))


def _kernel_scratch(model: Model, subset: Subset, first: int, n: int, threads: int) -> int:
    """Largest scratch any single kernel call of the step holds (calls do not overlap)."""
    peak = 0
    for i, layer in enumerate(model.layers):
        s_in, s_out = model.shapes[i], model.shapes[i + 1]
        if layer.kind == "dense":
            peak = max(peak, _gemm_pack_bytes(n, layer.out_features, layer.in_features, threads))
        elif layer.kind == "conv2d":
            oc, c, kh, kw = layer.weight.shape
            pixels = s_out[1] * s_out[2]
            cols = F32 * c * kh * kw * pixels * min(threads, n)
            peak = max(peak, cols + _gemm_pack_bytes(oc, pixels, c * kh * kw, threads))
            if i >= first:
                r = _trained_rows(subset, layer.name)
                # weight gradient: per-chunk partial sums of dW plus the dcol buffer for dx
                peak = max(peak, 2 * cols + F32 * max(r, 1) * c * kh * kw * min(threads, n))
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
