"""Which parameters train: per layer, which output rows of the weight and whether the bias.

A weight's "rows" are its output units: a Dense layer's output features, a convolution's
output channels, a batch norm's channels (its scale is the "weight", its shift the "bias"). Everything not named here is frozen. The fleet trains one ``Subset`` chosen by
the hub; only those values and their deltas cross the network.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Union

import numpy as np

from .graph import Layer, Model

RowsSpec = Union[str, float, int, Iterable[int], None]


@dataclass(frozen=True)
class LayerSubset:
    rows: np.ndarray  # int32, sorted, unique; may be empty
    bias: bool

    @property
    def trains(self) -> bool:
        return self.rows.size > 0 or self.bias


class Subset:
    """A mapping layer name -> LayerSubset for the layers that train anything."""

    def __init__(self, layers: Dict[str, LayerSubset]):
        self.layers = {name: ls for name, ls in layers.items() if ls.trains}

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def full(cls, model: Model) -> "Subset":
        return cls({l.name: LayerSubset(np.arange(_rows(l), dtype=np.int32), True) for l in model.param_layers})

    @classmethod
    def of(cls, model: Model, spec: Dict[str, Dict[str, object]]) -> "Subset":
        """Build from ``{"fc2": {"rows": "all" | ratio | [indices] | None, "bias": bool}, ...}``.

        A ratio in (0, 1] takes the first ceil(ratio * rows) rows; the subset search chooses
        rows by importance instead and passes explicit indices.
        """
        layers = {}
        for name, entry in spec.items():
            layer = model.layer(name)
            if not layer.has_params:
                raise ValueError(f"layer {name!r} ({layer.kind}) has no parameters to train")
            unknown = set(entry) - {"rows", "bias"}
            if unknown:
                raise ValueError(f"subset entry for {name!r} has unknown keys {sorted(unknown)}")
            layers[name] = LayerSubset(_parse_rows(entry.get("rows"), _rows(layer), name), bool(entry.get("bias", False)))
        return cls(layers)

    # -- queries -------------------------------------------------------------------------------
    def get(self, name: str) -> Optional[LayerSubset]:
        return self.layers.get(name)

    def earliest_layer_index(self, model: Model) -> Optional[int]:
        """Index in model.layers of the first layer that trains; backward stops there."""
        for i, layer in enumerate(model.layers):
            if layer.name in self.layers:
                return i
        return None

    def validate(self, model: Model) -> None:
        for name, ls in self.layers.items():
            layer = model.layer(name)
            if not layer.has_params:
                raise ValueError(f"subset names layer {name!r} ({layer.kind}), which has no parameters")
            n = _rows(layer)
            if ls.rows.size and (ls.rows[0] < 0 or ls.rows[-1] >= n):
                raise ValueError(f"subset rows for {name!r} must lie in [0, {n}), got {ls.rows[0]}..{ls.rows[-1]}")

    def num_trainable(self, model: Model) -> int:
        total = 0
        for name, ls in self.layers.items():
            layer = model.layer(name)
            total += ls.rows.size * (int(np.prod(layer.weight_shape)) // _rows(layer))
            total += layer.bias.size if ls.bias else 0
        return total

    def tensors(self, model: Model) -> List[tuple]:
        """The trainable pieces in a fixed order: (key, layer, 2-D param view, rows or None).

        A weight is viewed as [rows, row_size]; a bias as one row [1, out] (rows None). This
        order and these views are what the update codec encodes and the merge decodes. A mixed
        layer (``Layer.mix_weight``) over exactly the subset's rows gives its compact trained rows
        [R, row_size] with rows None (they are the selected rows already); over other rows, a
        read-only dequantised copy (reading works, writing raises).
        """
        out = []
        for layer in model.param_layers:
            ls = self.layers.get(layer.name)
            if ls is None:
                continue
            if ls.rows.size and getattr(layer, "is_mixed", False) and np.array_equal(ls.rows, layer.trained_rows):
                # a mixed layer holds exactly these rows, in this order, as float32: the view is them
                out.append((f"{layer.name}.weight", layer, layer.weight_trained.reshape(ls.rows.size, -1), None))
            elif ls.rows.size:
                out.append((f"{layer.name}.weight", layer, layer.weight.reshape(_rows(layer), -1), ls.rows))
            if ls.bias:
                out.append((f"{layer.name}.bias", layer, layer.bias.reshape(1, -1), None))
        return out

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Dict[str, object]]:
        return {name: {"rows": ls.rows.tolist(), "bias": ls.bias} for name, ls in sorted(self.layers.items())}

    @classmethod
    def from_dict(cls, model: Model, data: Dict[str, Dict[str, object]]) -> "Subset":
        if not isinstance(data, dict):
            raise ValueError("subset must be a mapping of layer name to {rows, bias}")
        subset = cls.of(model, data)
        subset.validate(model)
        return subset

    def fingerprint(self) -> str:
        """Short stable hash: a hub and an agent agree on the subset iff fingerprints match."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self, model: Model) -> str:
        parts = []
        for layer in model.param_layers:
            ls = self.layers.get(layer.name)
            if ls is None:
                continue
            n = _rows(layer)
            if ls.rows.size == 0:  # the bias alone (a batch norm's shift, say), as SearchResult.describe words it
                parts.append(f"{layer.name}: {'bias' if ls.bias else 'nothing'}")
                continue
            rows = "all rows" if ls.rows.size == n else f"{ls.rows.size}/{n} rows"
            parts.append(f"{layer.name}: {rows}{' + bias' if ls.bias else ''}")
        return "; ".join(parts) if parts else "(nothing trains)"

    def __eq__(self, other) -> bool:
        return isinstance(other, Subset) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Subset({self.to_dict()})"


def subset_contains(big: Subset, small: Subset) -> bool:
    """Whether every row and bias ``small`` trains, ``big`` trains too."""
    for name, ls in small.layers.items():
        other = big.layers.get(name)
        if other is None or (ls.bias and not other.bias):
            return False
        if ls.rows.size and not np.all(np.isin(ls.rows, other.rows)):
            return False
    return True


def subset_union(a: Subset, b: Subset) -> Subset:
    layers = {}
    for name in set(a.layers) | set(b.layers):
        la, lb = a.layers.get(name), b.layers.get(name)
        rows = [x.rows for x in (la, lb) if x is not None]
        layers[name] = LayerSubset(np.union1d(*rows).astype(np.int32) if len(rows) == 2 else rows[0],
                                   any(x.bias for x in (la, lb) if x is not None))
    order = [name for name in a.layers] + [n for n in b.layers if n not in a.layers]
    return Subset({name: layers[name] for name in order})


def _rows(layer: Layer) -> int:
    return layer.weight_shape[0]


def _parse_rows(spec: RowsSpec, n: int, name: str) -> np.ndarray:
    if spec is None:
        return np.zeros(0, np.int32)
    if isinstance(spec, str):
        if spec != "all":
            raise ValueError(f"rows for {name!r}: expected 'all', a ratio, or a list of indices, got {spec!r}")
        return np.arange(n, dtype=np.int32)
    if isinstance(spec, float):
        if not 0.0 < spec <= 1.0:
            raise ValueError(f"rows ratio for {name!r} must be in (0, 1], got {spec}")
        return np.arange(int(np.ceil(spec * n)), dtype=np.int32)
    rows = np.asarray(list(spec) if not isinstance(spec, np.ndarray) else spec)
    if rows.size and not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows for {name!r} must be integers, got dtype {rows.dtype}")
    rows = rows.astype(np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"rows for {name!r} must lie in [0, {n}), got {rows.min()}..{rows.max()}")
    # sorted, then checked for repeats (not np.unique: numpy 2 imports numpy.ma for it, 1.4 MB
    # of a device's memory for one call)
    uniq = np.sort(rows)
    if uniq.size > 1 and not np.all(uniq[1:] != uniq[:-1]):
        raise ValueError(f"rows for {name!r} repeat an index")
    return uniq.astype(np.int32)
