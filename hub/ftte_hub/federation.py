"""The global model of a multi-site federation: site deltas in, robust weighted merges, versions out.

The Flower ServerApp (flower_bridge.py) moves messages; this holds the state and imports nothing
of Flower. Each site answers a global version with an ``ftte_core.update`` Update (int8 deltas of
the rows its own subset search chose) and a sample count. A merge applies the hub's rules
(docs/aggregation.md) to sites as the hub applies them to devices:

- bounds (ftte_core.robust): non-finite or beyond ``max_abs_delta`` -> rejected; L2 norm clipped
  to ``clip_multiple`` x the running median of accepted site norms; sample counts capped at
  ``sample_multiple`` x the running median of accepted counts (and ``max_samples``);
- weights: the strategy's own (``ftte``: data x age x variance, with the age from the staleness
  ``version - base_version`` of a site that answered an older version; its step scale too);
- sites may train different rows (their budgets and validation data differ): each row moves by
  the weighted mean over the sites that trained it, ``sum_k w_k c_k d_k / sum_k w_k``; with one
  shared subset this is exactly the hub's merge.

After each merge: ``OUT/global.npz`` and ``OUT/federation.json`` (atomically; a restarted
ServerApp resumes from them), ``OUT/model.onnx`` and one line in ``OUT/metrics.jsonl``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

import ftte_core as ft
from ftte_core.atomic import atomic_write
from ftte_core.modelfile import model_from_bytes, model_to_bytes
from ftte_core.robust import MIN_HISTORY, RobustPolicy, RunningMedian, clip_factors
from ftte_core.strategies import make_strategy
from ftte_core.subset import Subset
from ftte_core.update import TensorDelta, Update, UpdateError, decode_tensor64

from .site import apply_step, downlink_arrays, quantise_step

STATE = "federation.json"
PARAMS = "global.npz"
INITIAL = "initial-model.ftmd"
MODEL_ONNX = "model.onnx"
METRICS = "metrics.jsonl"


class FederationError(Exception):
    """The federation cannot start or go on (one-line reason)."""


@dataclass
class SiteResult:
    site: str
    base_version: int
    samples: int
    update: Update
    subset: Subset
    header: Dict[str, Any] = field(default_factory=dict)
    wan_bytes: int = 0


class Federation:
    def __init__(self, out: str, model: ft.Model, strategy: str = "ftte", server_lr: float = 1.0,
                 robust: Optional[RobustPolicy] = None, max_staleness: Optional[int] = None):
        self.out = Path(out)
        self.model = model
        # sites are few: every merge takes what arrived; the buffer size only labels the report
        self.strategy = make_strategy(strategy, buffer_size=1, server_lr=server_lr)
        self.robust = robust or RobustPolicy()
        self.max_staleness = max_staleness
        self.version = 0
        # What sites hold of each version: version 0 exactly, then each version the one before plus
        # an int8 step toward the merged model (the step quantises the whole remaining gap, so the
        # rounding error never accumulates: error feedback). Sites train from these copies.
        self.history: Dict[int, Dict[str, np.ndarray]] = {0: self._params()}
        self.steps: Dict[int, Dict[str, tuple]] = {}
        self.norms = RunningMedian(self.robust.clip_window)
        self.sample_counts = RunningMedian(self.robust.clip_window)
        self.rejected: List[Dict[str, Any]] = []

    # -- setup and resume ------------------------------------------------------------------------
    @classmethod
    def open(cls, out: str, model_spec: str, input_shape, num_classes: int, seed: int = 0, **kw) -> "Federation":
        """Resume from OUT if it holds a federation, else start from the zoo model or ONNX file."""
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        if (path / STATE).exists():
            try:
                state = json.loads((path / STATE).read_text())
                model = model_from_bytes((path / INITIAL).read_bytes())
                with np.load(path / PARAMS, allow_pickle=False) as z:
                    model.load_state({k: z[k] for k in z.files})
            except (OSError, ValueError, KeyError) as e:
                raise FederationError(f"cannot resume the federation in {out}: {e}") from None
            fed = cls(out, model, **kw)
            fed.version = int(state["version"])
            fed.history = {fed.version: fed._params()}
            fed.norms = RunningMedian(fed.robust.clip_window, state.get("norms", []))
            fed.sample_counts = RunningMedian(fed.robust.clip_window, state.get("samples", []))
            return fed
        try:
            if str(model_spec).lower().endswith(".onnx"):
                model = model_from_bytes(model_to_bytes(ft.load_model(model_spec)))
            else:
                model = ft.zoo(model_spec, tuple(input_shape), int(num_classes), seed=seed)
        except (ValueError, OSError) as e:
            raise FederationError(f"model {model_spec}: {str(e).splitlines()[0]}") from None
        fed = cls(out, model, **kw)
        atomic_write(path / INITIAL, lambda f: f.write(model_to_bytes(model)))
        fed.save()
        return fed

    def _params(self) -> Dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.model.state().items()}

    # -- results ---------------------------------------------------------------------------------
    def check(self, site: str, base_version: int, samples: int, update_bytes: bytes, subset_dict,
              header=None, wan_bytes: int = 0) -> SiteResult:
        """A site's answer, checked against the global model (ValueError with a one-line reason)."""
        if not isinstance(base_version, int) or not 0 <= base_version <= self.version:
            raise ValueError(f"site {site}: base version {base_version!r} is not one this federation issued")
        if self.max_staleness is not None and self.version - base_version > self.max_staleness:
            raise ValueError(f"site {site}: version {base_version} is {self.version - base_version} versions old")
        try:
            update = Update.from_bytes(update_bytes)
            subset = Subset.from_dict(self.model, subset_dict)
        except (UpdateError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"site {site}: malformed update: {str(e).splitlines()[0]}") from None
        want = [(key, (rows.size if rows is not None else view.shape[0], view.shape[1]))
                for key, _l, view, rows in subset.tensors(self.model)]
        got = [(t.key, tuple(t.shape)) for t in update.tensors]
        if got != want:
            raise ValueError(f"site {site}: the update's tensors do not match its subset")
        peak = 0.0
        for t in update.tensors:
            d = decode_tensor64(t)
            if not np.all(np.isfinite(d)):
                raise ValueError(f"site {site}: the update holds NaN or Inf")
            peak = max(peak, float(np.max(np.abs(d))) if d.size else 0.0)
        if peak > self.robust.max_abs_delta:
            raise ValueError(f"site {site}: a delta value of {peak:g} exceeds max_abs_delta")
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"site {site}: sample count {samples!r} is not a positive integer")
        return SiteResult(site, base_version, samples, update, subset, dict(header or {}), wan_bytes)

    def _expanded(self, r: SiteResult):
        """The site's delta on the whole model (float32 [R, F] per parameter) and which rows it trained."""
        deltas, masks = {}, {}
        for key, layer, view, _rows in Subset.full(self.model).tensors(self.model):
            deltas[key] = np.zeros(view.shape, np.float32)
            masks[key] = np.zeros(view.shape[0], bool)
        for t, (key, _l, view, rows) in zip(r.update.tensors, r.subset.tensors(self.model)):
            d = decode_tensor64(t).astype(np.float32)
            idx = rows if rows is not None else slice(None)
            deltas[key][idx] = d
            masks[key][idx] = True
        return deltas, masks

    def merge(self, results: List[SiteResult]) -> Dict[str, Any]:
        """One merge of the sites' results -> a new version; returns the metrics line (without accuracy)."""
        if not results:
            raise ValueError("nothing to merge")
        expanded = [self._expanded(r) for r in results]
        keys = list(expanded[0][0])
        full = [Update(r.base_version, "", 1, 0.0, [TensorDelta(k, 32, e[0][k], None, e[0][k].shape) for k in keys])
                for r, e in zip(results, expanded)]
        norms = [math.sqrt(sum(float(np.sum(np.square(e[0][k], dtype=np.float64))) for k in keys)) for e in expanded]
        clip = clip_factors(norms, self.norms.reference() if len(self.norms) >= 1 else None, self.robust.clip_multiple)
        samples = [self._capped(r.samples) for r in results]
        w, factors = self.strategy.weighting(full, self.version, samples, clip)
        w = np.asarray(w, np.float64)
        g = self.strategy.server_lr * self.strategy.step_scale(full, self.version, samples, clip)
        new = {}
        for key, layer, view, _rows in Subset.full(self.model).tensors(self.model):
            num = np.zeros(view.shape, np.float64)
            den = np.zeros(view.shape[0], np.float64)
            for k, (deltas, masks) in enumerate(expanded):
                num += (w[k] * clip[k]) * deltas[key].astype(np.float64)
                den += w[k] * masks[key]
            step = np.divide(num, den[:, None], out=np.zeros_like(num), where=den[:, None] > 0)
            value = view.astype(np.float64) + g * step
            if not np.all(np.isfinite(value)) or float(np.max(np.abs(value), initial=0.0)) > np.finfo(np.float32).max:
                raise ValueError(f"the merge makes {key!r} non-finite; the version is kept")
            new[key] = value.astype(np.float32)
        change = 0.0
        for key, layer, view, _rows in Subset.full(self.model).tensors(self.model):
            change += float(np.sum(np.square(new[key].astype(np.float64) - view)))
            view[...] = new[key]
        for n, s in zip(norms, samples):
            self.norms.add(n)
            self.sample_counts.add(s)
        self.version += 1
        self._advance_canonical()
        for v in [v for v in self.history if v < self.version - 8]:
            del self.history[v]
            self.steps.pop(v, None)
        return {"version": self.version, "sites": [r.site for r in results], "samples": samples,
                "staleness": [self.version - 1 - r.base_version for r in results], "weights": w.tolist(),
                "clip": [float(c) for c in clip], "factors": factors, "step_scale": g,
                "update_norm": math.sqrt(change), "norms": norms}

    def _capped(self, n: int) -> int:
        cap = self.robust.max_samples
        ref = self.sample_counts.reference()
        if self.robust.sample_multiple and ref is not None and len(self.sample_counts) >= MIN_HISTORY:
            cap = min(cap, max(1, int(self.robust.sample_multiple * ref)))
        return min(int(n), cap)

    # -- outputs ---------------------------------------------------------------------------------
    def save(self, metrics: Optional[Dict[str, Any]] = None) -> None:
        """Checkpoint (params, then state), the ONNX model, and the metrics line, in that order."""
        params = {k: np.ascontiguousarray(v, "<f4") for k, v in self.model.state().items()}

        def write_params(f):
            np.savez(f, **params)

        atomic_write(self.out / PARAMS, write_params)
        state = {"version": self.version, "norms": self.norms.to_list(), "samples": self.sample_counts.to_list(),
                 "strategy": self.strategy.name, "server_lr": self.strategy.server_lr, "time": time.time()}
        atomic_write(self.out / STATE, lambda f: f.write(json.dumps(state).encode()))
        ft.save_onnx(self.model, str(self.out / MODEL_ONNX))
        if metrics is not None:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(metrics, separators=(",", ":")) + "\n")

    def params_of(self, version: Optional[int]) -> Optional[Dict[str, np.ndarray]]:
        """What a site holds of ``version`` (None when this process no longer knows it)."""
        return self.history.get(version) if isinstance(version, int) else None

    def _advance_canonical(self) -> None:
        """The sites' copy of the new version and the int8 step that makes it from the previous one."""
        prev = self.history.get(self.version - 1)
        if prev is None:   # cannot happen after a merge; a resumed process starts a fresh stream
            self.history[self.version] = self._params()
            return
        held, step = {}, {}
        for key, true in self.model.state().items():
            copy = prev[key].copy()
            view = copy.reshape(copy.shape[0], -1) if copy.ndim > 1 else copy.reshape(1, -1)
            target = true.reshape(view.shape)
            rows = np.flatnonzero(np.any(target != view, axis=1)).astype(np.int32)
            if rows.size:
                levels, scales = quantise_step(target[rows], view[rows])
                apply_step(view, rows, levels, scales)
                step[key] = (rows, levels, scales)
            held[key] = copy
        self.history[self.version] = held
        self.steps[self.version] = step

    def downlink(self, base: Optional[int]) -> Dict[str, np.ndarray]:
        """What a site holding ``base`` needs for the current version (site.apply_downlink undoes it)."""
        v = self.version
        if base == v:
            return {}
        if base == v - 1 and v in self.steps:
            out = {}
            for key, (rows, levels, scales) in self.steps[v].items():
                out[f"rows:{key}"], out[f"q:{key}"], out[f"s:{key}"] = rows, levels, scales
            return out
        held = self.model.copy()
        held.load_state(self.history[v])
        return downlink_arrays(held, self.params_of(base))
