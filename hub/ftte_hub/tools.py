"""Operator tools around a run: split data per device (`ftte-hub split`), use the trained model
(`ftte-hub predict`, `ftte-hub evaluate`).

Everything here raises :class:`ToolError` (one line) for bad input; the command line prints it.
Inference runs on our engine (``ftte_core``): no onnxruntime needed.
"""
from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ftte_core import data as ftdata
from ftte_core.atomic import atomic_write

#: per-class columns in a table up to this many classes; beyond, the most frequent few
MAX_CLASS_COLUMNS = 10
TOP_CLASSES = 3
MODEL_FILE = "model.onnx"  # what `ftte-hub train` writes into --out
SHARD_RE = re.compile(r"device-\d+\.npz\Z")
VAL_FILE = "val.npz"


class ToolError(Exception):
    """Bad input for an operator tool (one-line reason)."""


def load_data(spec: str) -> ftdata.Dataset:
    """An ``.npz`` file, or the name of a bundled dataset (``digits``) when no such file exists;
    the same rule as `ftte-hub resample` and `ftte-hub simulate --dataset`."""
    try:
        if not os.path.exists(spec) and spec in ftdata.bundled_names():
            return ftdata.load_bundled(spec)
        if not os.path.exists(spec):
            raise ToolError(f"data file {spec!r} does not exist (bundled data sets: "
                            f"{', '.join(ftdata.bundled_names()) or 'none'})")
        if os.path.isdir(spec):
            raise ToolError(f"data {spec!r} is a directory; give an .npz file with arrays x and y")
        return ftdata.load_npz(spec)
    except ftdata.DataError as e:
        raise ToolError(str(e)) from None


# ------------------------------------------------------------------------------------- split

@dataclass
class SplitResult:
    out: Path
    shards: List[Tuple[str, ftdata.Dataset]]   # (file name, data) per device, then val.npz if any
    num_classes: int
    indices: List[np.ndarray]                  # source sample indices per written file, same order


def _index_dataset(ds: ftdata.Dataset) -> ftdata.Dataset:
    """A stand-in for ``ds`` whose samples are their own indices, so the partition helpers of
    ftte_core.data (which return Datasets) tell us which source samples went where. Two float32
    columns of 24 bits each keep the index exact for any realistic sample count."""
    idx = np.arange(len(ds), dtype=np.int64)
    x = np.stack([idx >> 24, idx & 0xFFFFFF], axis=1).astype(np.float32)
    return ftdata.Dataset(x, ds.y, ds.num_classes, ds.name)


def _indices(part: ftdata.Dataset) -> np.ndarray:
    cols = part.x.astype(np.int64)
    return (cols[:, 0] << 24) | cols[:, 1]


def plan_split(ds: ftdata.Dataset, devices: int, alpha: Optional[float], val_fraction: float,
               seed: int) -> Tuple[List[np.ndarray], Optional[np.ndarray]]:
    """Source indices per device and for validation (None when ``val_fraction`` is 0).

    Validation is a stratified ``val_fraction`` of the samples (ftdata.train_val_split); the rest
    is dealt IID (``alpha`` None, sizes differ by at most one) or with Dirichlet(alpha) label skew,
    at least one sample per device. Every sample lands in exactly one list; the same seed gives
    the same split.
    """
    if devices < 1:
        raise ToolError(f"--devices must be at least 1, got {devices}")
    if alpha is not None and not (np.isfinite(alpha) and alpha > 0):
        raise ToolError(f"--alpha must be a positive number, got {alpha}")
    if not 0.0 <= val_fraction < 1.0:
        raise ToolError(f"--val must be in [0, 1), got {val_fraction}")
    n = len(ds)
    if devices > n:
        raise ToolError(f"{devices} devices but {ds.name!r} has only {n} samples")
    whole = _index_dataset(ds)
    val_idx = None
    train = whole
    if val_fraction > 0:
        if n < devices + 1:
            raise ToolError(f"{n} samples cannot give {devices} devices one each and keep some for validation "
                            f"(--val 0 keeps none)")
        train, val = ftdata.train_val_split(whole, val_fraction=val_fraction, seed=seed)
        if len(train) < devices:  # the split rounds val to at least one sample
            raise ToolError(f"--val {val_fraction:g} leaves {len(train)} training samples for {devices} devices; "
                            f"lower --val or --devices")
        val_idx = _indices(val)
    try:
        if alpha is None:
            parts = ftdata.partition_iid(train, devices, seed=seed)
        else:
            parts = ftdata.partition_dirichlet(train, devices, alpha=alpha, seed=seed, min_size=1)
    except ftdata.DataError as e:
        raise ToolError(str(e)) from None
    return [_indices(p) for p in parts], val_idx


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ToolError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ToolError(f"--out {str(out)!r} is not empty; choose another folder or add --force to replace "
                        f"its device-*.npz and val.npz")


def stored_x_dtype(path: str) -> Optional[np.dtype]:
    """The dtype ``x`` has in an .npz file, read from its .npy header alone (None if not a file or
    unreadable: the data was loaded and checked before, this only decides how shards are stored)."""
    if not os.path.isfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive, archive.open("x.npy") as f:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            return np.dtype(header(f)[2])
    except Exception:
        return None


def save_shard(path: Path, part: ftdata.Dataset, as_bytes: bool, compress: bool) -> None:
    """Like ftdata.save_npz; ``as_bytes``: x stored as uint8 again (the input held image bytes, which
    loading scaled to k/255: rint(x * 255) gives back exactly those bytes, at a quarter of the size)."""
    if not as_bytes:
        ftdata.save_npz(path, part, compress=compress)
        return
    x = np.rint(part.x * np.float32(255.0)).astype(np.uint8)

    def write(f):
        (np.savez_compressed if compress else np.savez)(
            f, x=x, y=part.y.astype(np.int32), num_classes=np.asarray(part.num_classes, dtype=np.int64))
    atomic_write(path, write)


def split(source: str, out: str, devices: int, alpha: Optional[float] = None, val_fraction: float = 0.2,
          seed: int = 0, force: bool = False, compress: bool = False) -> SplitResult:
    """Write OUT/device-0.npz .. device-{devices-1}.npz and OUT/val.npz (``val_fraction`` > 0).

    Each file is written atomically (a crash leaves no half file). With ``force``, earlier
    ``device-K.npz`` files beyond the new device count (and val.npz when none is written) are
    removed, so the folder describes exactly this split.
    """
    out_dir = Path(out)
    check_out_dir(out_dir, force)
    ds = load_data(source)
    device_idx, val_idx = plan_split(ds, devices, alpha, val_fraction, seed)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        files: List[Tuple[str, ftdata.Dataset]] = []
        indices: List[np.ndarray] = []
        for i, idx in enumerate(device_idx):
            files.append((f"device-{i}.npz", ds.subset(idx, f"device-{i}")))
            indices.append(idx)
        if val_idx is not None:
            files.append((VAL_FILE, ds.subset(val_idx, "val")))
            indices.append(val_idx)
        written = {name for name, _ in files}
        as_bytes = stored_x_dtype(source) == np.uint8
        for name, part in files:
            save_shard(out_dir / name, part, as_bytes, compress)
        for stale in out_dir.iterdir():  # only reached with --force or a folder we just made
            if (SHARD_RE.match(stale.name) or stale.name == VAL_FILE) and stale.name not in written:
                stale.unlink()
    except OSError as e:
        raise ToolError(f"cannot write into {out}: {e.strerror or e}") from None
    return SplitResult(out_dir, files, ds.num_classes, indices)


def _class_summary(counts: np.ndarray, k: int = TOP_CLASSES) -> str:
    order = np.argsort(-counts, kind="stable")[:k]
    return " ".join(f"{int(c)}:{int(counts[c])}" for c in order if counts[c] > 0)


def split_table(result: SplitResult) -> str:
    """What each file holds: samples, classes present, and per-class counts (the most frequent
    classes when there are more than MAX_CLASS_COLUMNS)."""
    nc = result.num_classes
    wide = nc <= MAX_CLASS_COLUMNS
    head = f"{'file':<16} {'samples':>8} {'classes':>8}"
    head += "".join(f" {c:>5}" for c in range(nc)) if wide else "  most frequent (class:samples)"
    lines = [head]
    total = np.zeros(nc, np.int64)
    for name, part in result.shards:
        counts = ftdata.label_histogram(part)
        total += counts
        row = f"{name:<16} {len(part):>8} {int((counts > 0).sum()):>8}"
        row += "".join(f" {int(v):>5}" for v in counts) if wide else f"  {_class_summary(counts)}"
        lines.append(row)
    row = f"{'total':<16} {int(total.sum()):>8} {int((total > 0).sum()):>8}"
    row += "".join(f" {int(v):>5}" for v in total) if wide else f"  {_class_summary(total)}"
    lines.append(row)
    return "\n".join(lines)


# ------------------------------------------------------------------------------ predict/evaluate

def resolve_model_path(spec: str) -> str:
    """An .onnx file, or a run folder of `ftte-hub train` / `ftte-hub demo` (its model.onnx)."""
    if os.path.isdir(spec):
        path = os.path.join(spec, MODEL_FILE)
        if not os.path.isfile(path):
            raise ToolError(f"{spec!r} is a folder without {MODEL_FILE} (a run writes it when it ends: after "
                            f"the target, --max-versions or a clean stop)")
        return path
    if not os.path.exists(spec):
        raise ToolError(f"model file {spec!r} does not exist")
    return spec


INSTALL_ONNX = "pip install 'ftte-fleet[hub]' (or pip install onnx); the agent-only install leaves it out"


def require_onnx(what: str) -> None:
    """ToolError (one line) when the onnx package is not installed; ``what`` says what needs it."""
    import importlib.util

    try:
        found = importlib.util.find_spec("onnx") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ToolError(f"{what} needs the onnx package: {INSTALL_ONNX}")


def load_model(spec: str):
    """A Model from an ONNX file or run folder; one-line ToolError for anything unusable."""
    path = resolve_model_path(spec)
    try:
        from ftte_core.onnx_io import load_model as load_onnx
    except ImportError:
        raise ToolError(f"reading ONNX models needs the onnx package: {INSTALL_ONNX}") from None
    try:
        return load_onnx(path)
    except (ValueError, OSError) as e:  # OnnxImportError is a ValueError
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ToolError(f"model {path}: {msg}") from None


def fit_input(model, x: np.ndarray, data_spec: str) -> np.ndarray:
    """``x`` in the model's input shape, or a ToolError that says how to resample the data."""
    try:
        return model.check_input(x)
    except ValueError:
        dims = tuple(model.input_shape)
        # an NHWC model (Keras through tf2onnx) has few channels last and many first
        nhwc = len(dims) == 3 and dims[-1] in (1, 3, 4) and dims[0] > 4
        shape = "x".join(str(d) for d in dims)
        raise ToolError(f"the model takes samples of shape {list(dims)}, but {data_spec} has "
                        f"{list(x.shape[1:])}: `ftte-hub resample {data_spec} --shape {shape}"
                        f"{' --channels-last' if nhwc else ''} --out resized.npz` resizes it") from None


def check_labels(model, y: np.ndarray, data_spec: str) -> None:
    if y.size and int(y.max()) >= model.num_classes:
        bad = int((y >= model.num_classes).sum())
        raise ToolError(f"{data_spec} has {bad} labels >= {model.num_classes} (largest {int(y.max())}), but the "
                        f"model has only {model.num_classes} classes (0..{model.num_classes - 1})")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Predictions:
    model_path: str
    input_shape: Tuple[int, ...]
    classes: np.ndarray        # int32 [N]
    logits: np.ndarray         # float32 [N, C]
    labels: Optional[np.ndarray]  # int32 [N] when the data has y
    note: Optional[str] = None    # why the file's labels were not used


def predict(model_spec: str, data_spec: str, batch_size: int = 256) -> Predictions:
    model = load_model(model_spec)
    try:
        if not os.path.exists(data_spec) and data_spec in ftdata.bundled_names():
            ds = ftdata.load_bundled(data_spec)
            x, y = ds.x, ds.y
        else:
            x, y = ftdata.load_features(data_spec)
    except ftdata.DataError as e:
        raise ToolError(str(e)) from None
    x = fit_input(model, x, data_spec)
    logits = model.predict(x, batch_size=batch_size)
    note = None
    if y is not None and y.size and int(y.max()) >= model.num_classes:
        note = (f"the file's labels go up to {int(y.max())}, but the model has {model.num_classes} classes: "
                f"labels ignored")
        y = None  # predict still classifies; evaluate refuses such labels
    return Predictions(resolve_model_path(model_spec), tuple(model.input_shape),
                       np.argmax(logits, axis=1).astype(np.int32), logits, y, note)


def save_predictions(path: str, p: Predictions) -> None:
    def write(f):
        np.savez(f, **{"class": p.classes, "logits": p.logits})
    try:
        atomic_write(path, write)
    except OSError as e:
        raise ToolError(f"cannot write {path}: {e.strerror or e}") from None


def prediction_lines(p: Predictions, show: int) -> List[str]:
    n, c = p.logits.shape
    counts = np.bincount(p.classes, minlength=c)
    lines = [f"{n} samples predicted by {p.model_path} (input {list(p.input_shape)}, {c} classes); predicted "
             f"classes (class:samples): {_class_summary(counts, k=min(c, MAX_CLASS_COLUMNS))}"]
    if p.labels is not None:
        lines.append(f"accuracy against the file's labels: {float(np.mean(p.classes == p.labels)):.4f}")
    if p.note:
        lines.append(p.note)
    if show > 0:
        prob = softmax(p.logits[:show])
        head = f"{'sample':>7} {'class':>6} {'prob':>6}" + (f" {'label':>6}" if p.labels is not None else "")
        head += "  logits"
        lines.append(head)
        for i in range(min(show, n)):
            row = f"{i:>7} {int(p.classes[i]):>6} {prob[i, p.classes[i]]:>6.3f}"
            if p.labels is not None:
                row += f" {int(p.labels[i]):>6}"
            shown = " ".join(f"{v:.3g}" for v in p.logits[i, :8])
            row += f"  {shown}{' ...' if c > 8 else ''}"
            lines.append(row)
        if n > show:
            lines.append(f"... {n - show} more (--out FILE saves them all)")
    return lines


def evaluate(model_spec: str, data_spec: str, batch_size: int = 256) -> Dict[str, object]:
    """Accuracy, loss, per-class recall/precision and the confusion matrix (rows: true class,
    columns: predicted) of a model on labelled data."""
    model = load_model(model_spec)
    ds = load_data(data_spec)
    x = fit_input(model, ds.x, data_spec)
    check_labels(model, ds.y, data_spec)
    logits = model.predict(x, batch_size=batch_size)
    c = model.num_classes
    pred = np.argmax(logits, axis=1)
    confusion = np.zeros((c, c), np.int64)
    np.add.at(confusion, (ds.y, pred), 1)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    diag = np.diag(confusion)
    recall = [float(diag[k] / support[k]) if support[k] else None for k in range(c)]
    precision = [float(diag[k] / predicted[k]) if predicted[k] else None for k in range(c)]
    probs = softmax(logits)
    loss = float(-np.mean(np.log(np.maximum(probs[np.arange(len(ds)), ds.y], 1e-30))))
    present = [r for r in recall if r is not None]
    return {"model": resolve_model_path(model_spec), "data": data_spec, "samples": int(len(ds)),
            "num_classes": int(c), "accuracy": float(diag.sum() / len(ds)), "loss": loss,
            "balanced_accuracy": float(np.mean(present)) if present else None,
            "recall": recall, "precision": precision, "support": [int(v) for v in support],
            "confusion": confusion.tolist()}


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def evaluation_lines(r: Dict[str, object], max_matrix: int = 20) -> List[str]:
    c = int(r["num_classes"])
    lines = [f"{r['samples']} samples of {r['data']} on {r['model']}: accuracy {r['accuracy']:.4f}, loss "
             f"{r['loss']:.4f}, balanced accuracy {_fmt(r['balanced_accuracy'])}",
             f"{'class':>6} {'samples':>8} {'recall':>7} {'precision':>9}"]
    for k in range(c):
        lines.append(f"{k:>6} {r['support'][k]:>8} {_fmt(r['recall'][k]):>7} {_fmt(r['precision'][k]):>9}")
    conf = np.asarray(r["confusion"])
    if c <= max_matrix:
        width = max(4, len(str(int(conf.max()))) + 1)
        lines.append("confusion (rows: true class, columns: predicted)")
        lines.append(f"{'':>6}" + "".join(f"{k:>{width}}" for k in range(c)))
        for k in range(c):
            lines.append(f"{k:>6}" + "".join(f"{int(v):>{width}}" for v in conf[k]))
    else:
        off = conf.copy()
        np.fill_diagonal(off, 0)
        flat = np.argsort(-off, axis=None, kind="stable")[:10]
        pairs = [f"{i}->{j}: {int(off[i, j])}" for i, j in zip(*np.unravel_index(flat, off.shape)) if off[i, j]]
        lines.append(f"most frequent confusions (true->predicted: samples; the whole matrix with --json): "
                     f"{', '.join(pairs) or 'none'}")
    return lines
