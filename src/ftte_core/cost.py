"""The cost model: memory and compute of one training step, predicted from shapes alone.

``predict_memory(model, subset, batch_size)`` gives the bytes a device needs for one step of
``Trainer`` on that subset, by the same categories the trainer records, without running
anything: it builds the trainer's own step plan (``plan.build``) and adds up its buffers, so
what it predicts is what the trainer allocates. Only kernel scratch is an estimate: each kernel
says what it would take for a shape (GEMM packing panels, im2col columns, per-chunk partial
sums; ``*_scratch_bytes`` share their sizing code with the kernels), and calls never overlap,
so the step holds the largest of them. The subset search uses it to respect a device's budget;
the tests hold it to within 10% of what the engine really allocates.

The categories: weights held once, float32 (or, for a Dense/Conv weight with no trained row
under ``frozen="int8"``, one byte per value plus a float32 scale per row), trained rows as
trainable, the rest (and constants such as batch-norm statistics) as frozen; gradients: none for
float32 dense and im2col convolutions (their backward applies SGD tile by tile; the tiles are
kernel scratch), one shared buffer of the largest other trained layer's gradient (batch norm,
depthwise/grouped convolutions, the bias of an int8 layer), or, for tied weights, whole
per-layer gradients (``plan.parameter_buffers``); optimizer state: with momentum, one velocity
row per trained weight row and a whole bias; activations kept from forward to backward (see
plan.py for which); workspace: reused scratch slots, whole-batch outputs of the frozen part, and
the kernels' scratch.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from . import _kernels as K
from .graph import VIEW_KINDS, Model
from .plan import build, check_micro_batch, parameter_buffers, requires_grad, weight_bytes
from .subset import Subset

F32 = 4


def predict_memory(model: Model, subset: Optional[Subset] = None, batch_size: int = 32, momentum: float = 0.0,
                   threads: Optional[int] = None, prefix_chunk: int = 8, frozen: str = "float32",
                   micro_batch: int = 0) -> Dict[str, int]:
    """Predicted bytes of one training step by category, plus "total". ``frozen="int8"``: as
    ``Trainer(..., frozen="int8")`` holds it (int8 weights and their scales, their kernels' scratch).
    ``micro_batch``: as ``Trainer(..., micro_batch=...)`` (passes of at most that many samples)."""
    subset = subset if subset is not None else Subset.full(model)
    threads = threads or K.get_num_threads()
    n, m = int(batch_size), check_micro_batch(micro_batch)
    step = build(model, subset, min(n, m) if m else n, prefix_chunk, every_chunk=False, frozen=frozen,
                 fused=False if m else None)
    frozen_bytes, trainable = weight_bytes(model, subset, frozen)
    params = {"gradients": 0, "optimizer_state": 0}
    for shape, dtype, category in parameter_buffers(model, subset, momentum, fused=False if m else None,
                                                    frozen=frozen).values():
        params[category] += int(np.prod(shape)) * np.dtype(dtype).itemsize
    buffers = step.buffer_bytes()
    out = {"frozen_weights": frozen_bytes, "trainable_weights": trainable, "gradients": params["gradients"],
           "optimizer_state": params["optimizer_state"], "activations": buffers["activations"],
           "workspace": buffers["workspace"] + step.kernel_scratch(threads)}
    out["total"] = sum(out.values())
    return out


def training_flops(model: Model, subset: Optional[Subset] = None, batch_size: int = 1) -> int:
    """Flops of one training step (forward, backward through the layers leading to trained
    parameters, update)."""
    subset = subset if subset is not None else Subset.full(model)
    req = requires_grad(model, subset)
    total = model.flops()
    if not req[-1]:
        return total * batch_size
    for i, layer in enumerate(model.layers):
        if not req[i + 1] or layer.kind in VIEW_KINDS:
            continue
        in_shapes = model.in_shapes(i)
        f = layer.flops(*in_shapes)
        if any(req[v] for v in model.inputs[i]):  # input gradients
            total += f
        ls = subset.get(layer.name)
        if layer.has_params and ls is not None and ls.rows.size:
            total += f * ls.rows.size // layer.weight_shape[0]  # weight gradient of trained rows
    return total * batch_size + 3 * subset.num_trainable(model)
