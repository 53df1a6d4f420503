"""Data loading, splitting and partitioning for FTTE (pure NumPy, no pickle).

A data file is an ``.npz`` archive holding ``x`` (numeric, [N, ...features]) and ``y``
(integer class labels, [N]). Files are loaded with ``allow_pickle=False`` because agents read
data that may come from anywhere; anything we cannot use becomes a :class:`DataError` with a
one-line reason, never a raw traceback.

An optional scalar ``num_classes`` key is written by :func:`save_npz` and honoured by
:func:`load_npz`: a device's partition may lack the highest classes, and the model's output
width must not depend on which labels happened to land on that device.

Everything random takes a ``seed`` and uses its own ``np.random.default_rng(seed)``, so the
same seed gives the same split/partition/augmentation on every machine and run.
"""
from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np

from .atomic import atomic_write

__all__ = [
    "DataError", "Dataset", "load_npz", "load_features", "load_bundled", "save_npz", "train_val_split",
    "partition_iid", "partition_dirichlet", "augment", "batches", "label_histogram", "resample_to_shape",
]

# Far beyond anything a Pi-sized classifier has; it stops a stray huge label (e.g. 10**9)
# from turning into a multi-GB histogram or output layer.
MAX_CLASSES = 1 << 16

PathLike = Union[str, "os.PathLike[str]"]


class DataError(ValueError):
    """Unusable data (bad file, bad arrays, bad labels). The message is one line."""


@dataclass(eq=False, repr=False)
class Dataset:
    """Samples ``x`` (float32 [N, ...]) with labels ``y`` (int32 [N]) in 0..num_classes-1.

    Arrays are made C-contiguous because the C++ kernels refuse anything else.
    """
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str = "data"

    def __post_init__(self) -> None:
        x, y = self.x, self.y
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise DataError(f"Dataset {self.name!r}: x must be a float32 ndarray, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim < 2:
            raise DataError(f"Dataset {self.name!r}: x must have ndim >= 2 ([N, ...features]), "
                            f"got shape {x.shape}")
        if not isinstance(y, np.ndarray) or not (np.issubdtype(y.dtype, np.integer)):
            raise DataError(f"Dataset {self.name!r}: y must be an integer ndarray, got "
                            f"{getattr(y, 'dtype', type(y).__name__)}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"Dataset {self.name!r}: y must have shape ({x.shape[0]},), "
                            f"got {y.shape}")
        nc = int(self.num_classes)
        if nc < 2 or nc > MAX_CLASSES:
            raise DataError(f"Dataset {self.name!r}: num_classes must be in 2..{MAX_CLASSES}, "
                            f"got {nc}")
        if y.size and (int(y.min()) < 0 or int(y.max()) >= nc):
            raise DataError(f"Dataset {self.name!r}: labels must be in 0..{nc - 1}, got range "
                            f"{int(y.min())}..{int(y.max())}")
        self.x = np.ascontiguousarray(x)
        self.y = np.ascontiguousarray(y, dtype=np.int32)
        self.num_classes = nc

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:  # the default would print every sample
        return (f"Dataset(name={self.name!r}, n={len(self)}, feature_shape={self.feature_shape}, "
                f"num_classes={self.num_classes})")

    @property
    def feature_shape(self) -> Tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    def subset(self, idx, name: Optional[str] = None) -> "Dataset":
        """A copy holding the samples ``idx`` (int indices or a boolean mask of length N).

        num_classes is kept, so every part of a dataset agrees on the model's output width.
        """
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise DataError(f"subset: boolean mask must have shape ({len(self)},), "
                                f"got {idx.shape}")
        elif idx.size == 0:
            idx = idx.astype(np.intp)
        elif not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
            raise DataError(f"subset: idx must be a 1-D integer array or boolean mask, got "
                            f"dtype {idx.dtype} shape {idx.shape}")
        elif int(idx.min()) < -len(self) or int(idx.max()) >= len(self):
            raise DataError(f"subset: indices out of range for {len(self)} samples "
                            f"(got {int(idx.min())}..{int(idx.max())})")
        return Dataset(self.x[idx], self.y[idx], self.num_classes,
                       self.name if name is None else name)


# ----------------------------------------------------------------------------- loading

def _one_line(e: BaseException) -> str:
    """Library messages can span lines (NumPy header errors do); reports must not."""
    msg = " ".join(str(e).split())
    return msg if len(msg) <= 200 else msg[:197] + "..."


def _read_npz(path, need=("x", "y")) -> dict:
    """Read x, y (and num_classes) of an .npz without pickle; any failure becomes a one-line DataError.

    The arrays in ``need`` must be present; the others are read when they are."""
    where = f"data file {str(path)!r}"
    try:
        if isinstance(path, (str, os.PathLike)) and os.path.getsize(path) == 0:
            raise DataError(f"{where} is empty (0 bytes)")
        obj = np.load(path, allow_pickle=False)
    except DataError:
        raise
    except ValueError as e:
        # np.load treats anything that is neither zip nor .npy as a pickle and refuses it.
        if "pickle" in str(e):
            raise DataError(f"{where} is not an .npz archive (looks like pickled or unknown "
                            f"data; pickles are never loaded)") from None
        raise DataError(f"{where} cannot be read: {_one_line(e)}") from None
    except EOFError:
        raise DataError(f"{where} is empty or truncated") from None
    except zipfile.BadZipFile as e:
        raise DataError(f"{where} is not a valid .npz (corrupt zip: {_one_line(e)})") from None
    except OSError as e:
        raise DataError(f"cannot read {where}: {e.strerror or _one_line(e)}") from None
    except Exception as e:  # zip parsing can fail in more ways than zipfile documents
        raise DataError(f"{where} cannot be read ({type(e).__name__}: {_one_line(e)})") from None
    if isinstance(obj, np.ndarray):
        raise DataError(f"{where} holds a single .npy array; expected an .npz archive with "
                        f"arrays 'x' and 'y'")
    out = {}
    with obj:
        keys = list(obj.files)
        if not keys:
            raise DataError(f"{where} is empty (no arrays); expected arrays {' and '.join(map(repr, need))}")
        for k in need:
            if k not in keys:
                shown = ", ".join(repr(q[:40]) for q in keys[:20])
                more = f" and {len(keys) - 20} more" if len(keys) > 20 else ""
                raise DataError(f"{where} has no array {k!r}; arrays present: {shown}{more}")
        for k in ("x", "y", "num_classes"):
            if k not in keys:
                continue
            try:
                out[k] = obj[k]
            except ValueError as e:
                if "allow_pickle" in str(e) or "pickle" in str(e):
                    raise DataError(f"{where}: array {k!r} is an object array, which needs "
                                    f"pickle to load; save plain numeric arrays instead") from None
                raise DataError(f"{where}: array {k!r} cannot be read: {_one_line(e)}") from None
            except MemoryError:
                raise DataError(f"{where}: array {k!r} is too large for memory") from None
            except Exception as e:
                # A damaged member can surface from zipfile, zlib, bz2, lzma or NumPy's header
                # parser (BadZipFile, zlib.error, EOFError, NotImplementedError for a garbled
                # compression id, ...); the list is open-ended, the answer is the same.
                raise DataError(f"{where}: array {k!r} is corrupt "
                                f"({type(e).__name__}: {_one_line(e)})") from None
    return out


def _as_features(x: np.ndarray, where: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype == object:
        raise DataError(f"{where}: x must be a numeric array")
    if x.ndim < 2:
        raise DataError(f"{where}: x must have ndim >= 2 ([N, ...features]), got shape {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{where}: x has no samples (shape {x.shape})")
    if x.size == 0:
        raise DataError(f"{where}: x has empty features (shape {x.shape})")
    if x.dtype == np.uint8:
        # Images stored as bytes: map 0..255 to 0..1 so all bundled/user data share one scale.
        out = x.astype(np.float32)
        out /= np.float32(255.0)
        return out
    if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
        return np.ascontiguousarray(x, dtype=np.float32)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: x must be integer or floating point, got dtype {x.dtype}")
    bad = ~np.isfinite(x)
    if bad.any():
        n_nan = int(np.isnan(x).sum())
        raise DataError(f"{where}: x has {int(bad.sum())} non-finite values "
                        f"({n_nan} NaN, {int(bad.sum()) - n_nan} Inf) out of {x.size}")
    with np.errstate(over="ignore"):  # overflow is reported just below, in words
        out = np.ascontiguousarray(x, dtype=np.float32)
    if x.dtype.itemsize > 4:
        over = int((~np.isfinite(out)).sum())
        if over:
            raise DataError(f"{where}: x has {over} values outside the float32 range")
    return out


def _as_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if not isinstance(y, np.ndarray) or y.dtype == object:
        raise DataError(f"{where}: y must be a numeric array")
    if y.ndim != 1:
        raise DataError(f"{where}: y must be 1-D (one label per sample), got shape {y.shape}")
    if y.shape[0] != n:
        raise DataError(f"{where}: x has {n} samples but y has {y.shape[0]} labels")
    if y.dtype == bool:
        y = y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)):
            raise DataError(f"{where}: y has {int((~np.isfinite(y)).sum())} NaN/Inf labels")
        frac = y != np.round(y)
        if frac.any():
            i = int(np.argmax(frac))
            raise DataError(f"{where}: y has {int(frac.sum())} non-integer labels "
                            f"(e.g. y[{i}] = {y[i]!r})")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: y must hold integer class labels, got dtype {y.dtype}")
    lo, hi = y.min(), y.max()
    if lo < 0:
        raise DataError(f"{where}: y has {int((y < 0).sum())} negative labels (min {lo}); "
                        f"labels must be 0..C-1")
    if hi >= MAX_CLASSES:
        raise DataError(f"{where}: label {hi} is too large (at most {MAX_CLASSES - 1}); "
                        f"labels must be 0..C-1")
    return y.astype(np.int32)


def load_npz(path: PathLike, name: Optional[str] = None) -> Dataset:
    """Load an ``.npz`` with ``x`` [N, ...] and ``y`` [N] into a float32/int32 Dataset.

    uint8 ``x`` is scaled by 1/255; other numeric ``x`` is cast to float32 unchanged.
    ``y`` may be any integer dtype, or float holding whole numbers. num_classes is
    ``max(y) + 1`` (at least 2) unless the file has a ``num_classes`` scalar, which wins if it
    is large enough. Every problem raises :class:`DataError` with a one-line reason.
    """
    where = f"data file {str(path)!r}"
    arrays = _read_npz(path)
    x = _as_features(arrays["x"], where)
    y = _as_labels(arrays["y"], x.shape[0], where)
    num_classes = max(2, int(y.max()) + 1)
    if "num_classes" in arrays:
        nc = arrays["num_classes"]
        if nc.size != 1 or not np.issubdtype(nc.dtype, np.integer):
            raise DataError(f"{where}: num_classes must be one integer, got dtype {nc.dtype} "
                            f"shape {nc.shape}")
        nc = int(nc.reshape(()))
        if nc < num_classes or nc > MAX_CLASSES:
            raise DataError(f"{where}: num_classes={nc} but labels need at least "
                            f"{num_classes} (max {MAX_CLASSES})")
        num_classes = nc
    if name is None:
        name = Path(path).stem if isinstance(path, (str, os.PathLike)) else "data"
    return Dataset(x, y, num_classes, name)


def load_features(path: PathLike) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``(x, y)`` of an ``.npz`` whose labels are optional (data to predict on): ``x`` float32 with
    the checks and scaling of :func:`load_npz`, ``y`` int32 or None when the file has no ``y``."""
    where = f"data file {str(path)!r}"
    arrays = _read_npz(path, need=("x",))
    x = _as_features(arrays["x"], where)
    y = _as_labels(arrays["y"], x.shape[0], where) if "y" in arrays else None
    return x, y


def bundled_names() -> List[str]:
    """Names accepted by :func:`load_bundled`."""
    root = resources.files("ftte_core") / "datasets"
    return sorted(p.name[:-4] for p in root.iterdir() if p.name.endswith(".npz"))


def load_bundled(name: str = "digits") -> Dataset:
    """Load a dataset shipped inside the package (``ftte_core/datasets/<name>.npz``).

    ``digits``: 1797 8x8 greyscale digits, x float32 [1797, 1, 8, 8] in [0, 1], 10 classes
    (UCI optical digits via scikit-learn).
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise DataError(f"load_bundled: bad dataset name {name!r}")
    res = resources.files("ftte_core") / "datasets" / f"{name}.npz"
    if not res.is_file():
        raise DataError(f"load_bundled: no bundled dataset {name!r}; available: "
                        f"{', '.join(bundled_names()) or '(none)'}")
    with resources.as_file(res) as p:
        return load_npz(p, name=name)


def save_npz(path: PathLike, dataset: Dataset, compress: bool = False) -> None:
    """Write ``x`` (float32), ``y`` (int32) and ``num_classes`` to ``path`` atomically.

    The archive goes to a temporary file in the same directory, is fsynced, then renamed over
    ``path`` with os.replace, so a crash leaves either the old file or the new one, never half.
    The exact ``path`` is used (NumPy would otherwise append ``.npz``).
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"save_npz: expected a Dataset, got {type(dataset).__name__}")

    def write(f):
        (np.savez_compressed if compress else np.savez)(
            f, x=np.ascontiguousarray(dataset.x, dtype=np.float32),
            y=np.ascontiguousarray(dataset.y, dtype=np.int32),
            num_classes=np.asarray(dataset.num_classes, dtype=np.int64))

    atomic_write(path, write)


# ----------------------------------------------------------------------------- splitting

def _check_int(fn: str, arg: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < lo:
        raise ValueError(f"{fn}: {arg} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``weights`` (largest remainder).

    Ties are broken by position, so the result is deterministic.
    """
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def train_val_split(ds: Dataset, val_fraction: float = 0.2, seed=0,
                    stratify: bool = True) -> Tuple[Dataset, Dataset]:
    """Split into (train, val), both non-empty; val gets round(val_fraction * N) samples.

    With ``stratify`` the val count is shared among classes by largest remainder of
    ``val_fraction * class_count``, so class shares match the whole set as closely as integers
    allow. Samples keep their original order inside each half.
    """
    vf = float(val_fraction)
    if not (0.0 < vf < 1.0):
        raise ValueError(f"train_val_split: val_fraction must be in (0, 1), got {val_fraction!r}")
    n = len(ds)
    if n < 2:
        raise DataError(f"train_val_split: need at least 2 samples, {ds.name!r} has {n}")
    n_val = min(max(int(round(vf * n)), 1), n - 1)
    rng = np.random.default_rng(seed)
    if stratify:
        counts = np.bincount(ds.y, minlength=ds.num_classes)
        per_class = _apportion(n_val, counts.astype(np.float64))
        val_idx = []
        for c in np.flatnonzero(counts):
            members = np.flatnonzero(ds.y == c)
            val_idx.append(rng.permutation(members)[:per_class[c]])
        val_idx = np.concatenate(val_idx)
    else:
        val_idx = rng.permutation(n)[:n_val]
    mask = np.zeros(n, dtype=bool)
    mask[val_idx] = True
    return (ds.subset(np.flatnonzero(~mask), f"{ds.name}/train"),
            ds.subset(np.flatnonzero(mask), f"{ds.name}/val"))


def partition_iid(ds: Dataset, n_parts: int, seed) -> List[Dataset]:
    """Shuffle and deal into ``n_parts`` parts whose sizes differ by at most one."""
    n_parts = _check_int("partition_iid", "n_parts", n_parts, 1)
    if n_parts > len(ds):
        raise DataError(f"partition_iid: {n_parts} parts but only {len(ds)} samples")
    perm = np.random.default_rng(seed).permutation(len(ds))
    return [ds.subset(np.sort(p), f"{ds.name}/part{i}")
            for i, p in enumerate(np.array_split(perm, n_parts))]


def partition_dirichlet(ds: Dataset, n_parts: int, alpha: float, seed,
                        min_size: int = 1, max_tries: int = 100) -> List[Dataset]:
    """Label-skewed (non-IID) partition: per class, part shares ~ Dirichlet(alpha).

    The usual federated benchmark scheme (Hsu et al. 2019): small alpha (0.1) gives parts
    dominated by a few classes, large alpha (100) approaches IID. Each class's shuffled samples
    are cut at the cumulative proportions. If some part ends below ``min_size`` the draw is
    repeated up to ``max_tries`` times; if that still fails (e.g. tiny alpha with more parts
    than classes), samples are moved one at a time from the currently largest part to the
    smallest short one, which keeps the skew elsewhere intact. Every sample is used exactly
    once, and the same seed gives the same partition.
    """
    n_parts = _check_int("partition_dirichlet", "n_parts", n_parts, 1)
    min_size = _check_int("partition_dirichlet", "min_size", min_size, 0)
    max_tries = _check_int("partition_dirichlet", "max_tries", max_tries, 1)
    a = float(alpha)
    if not (np.isfinite(a) and a > 0):
        raise ValueError(f"partition_dirichlet: alpha must be a positive finite number, "
                         f"got {alpha!r}")
    if n_parts * min_size > len(ds):
        raise DataError(f"partition_dirichlet: {n_parts} parts x min_size {min_size} needs "
                        f"{n_parts * min_size} samples, {ds.name!r} has {len(ds)}")
    rng = np.random.default_rng(seed)
    classes = [rng.permutation(np.flatnonzero(ds.y == c)) for c in range(ds.num_classes)]
    classes = [m for m in classes if m.size]

    def draw() -> np.ndarray:  # counts[class, part]
        counts = np.zeros((len(classes), n_parts), dtype=np.int64)
        for ci, members in enumerate(classes):
            p = rng.dirichlet(np.full(n_parts, a))
            if not (np.all(np.isfinite(p)) and p.sum() > 0):
                # Tiny alpha can underflow every gamma draw; the limit is "one part takes all".
                p = np.zeros(n_parts)
                p[rng.integers(n_parts)] = 1.0
            cuts = np.floor(np.cumsum(p) / p.sum() * members.size).astype(np.int64)
            cuts[-1] = members.size
            counts[ci] = np.diff(np.concatenate(([0], cuts)))
        return counts

    for _ in range(max_tries):
        counts = draw()
        if counts.sum(axis=0).min() >= min_size:
            break
    parts: List[List[np.ndarray]] = [[] for _ in range(n_parts)]
    for ci, members in enumerate(classes):
        for j, chunk in enumerate(np.split(members, np.cumsum(counts[ci])[:-1])):
            if chunk.size:
                parts[j].append(chunk)
    idx = [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in parts]
    sizes = np.array([i.size for i in idx])
    if sizes.min() < min_size:
        # Deterministic fix-up: ask the largest part for its last sample (order inside a part
        # is already random), give it to the smallest part, until everyone has min_size.
        lists = [list(i) for i in idx]
        while sizes.min() < min_size:
            dst = int(np.argmin(sizes))
            src = int(np.argmax(sizes))
            lists[dst].append(lists[src].pop())
            sizes[src] -= 1
            sizes[dst] += 1
        idx = [np.asarray(l, dtype=np.int64) for l in lists]
    return [ds.subset(np.sort(i), f"{ds.name}/part{j}") for j, i in enumerate(idx)]


# ----------------------------------------------------------------------------- augmentation

def augment(ds: Dataset, n: int, seed, max_shift: int = 1,
            noise_std: float = 0.03) -> Dataset:
    """Make ``n`` new labelled samples by jittering randomly chosen originals.

    Method, per new sample: pick an original uniformly at random (with replacement); shift it
    by an independent random integer offset in [-max_shift, max_shift] along each of the last
    two feature axes (rows and columns), filling the uncovered border with zeros (the
    background of the bundled digits); add Gaussian noise with standard deviation
    ``noise_std`` times the dataset's value range (max(x) - min(x)); clip to that range so
    e.g. [0, 1] pixels stay in [0, 1]. The label is the original's. Features with a single
    axis (x of shape [N, D]) get noise only. Used to give each of many simulated devices its
    own distinct samples; the same seed gives the same output.
    """
    n = _check_int("augment", "n", n, 0)
    max_shift = _check_int("augment", "max_shift", max_shift, 0)
    if not (np.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"augment: noise_std must be finite and >= 0, got {noise_std!r}")
    if len(ds) == 0:
        raise DataError(f"augment: dataset {ds.name!r} is empty")
    rng = np.random.default_rng(seed)
    src = rng.integers(0, len(ds), size=n)
    base = ds.x[src]
    out = base
    if ds.x.ndim >= 3 and max_shift > 0:
        H, W = ds.x.shape[-2:]
        shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
        out = np.zeros_like(base)
        # One slice copy per distinct (dy, dx) instead of a Python loop over samples.
        for dy in range(-max_shift, max_shift + 1):
            for dx in range(-max_shift, max_shift + 1):
                sel = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
                if sel.size == 0 or abs(dy) >= H or abs(dx) >= W:
                    continue
                ys, yd = (slice(0, H - dy), slice(dy, H)) if dy >= 0 else \
                    (slice(-dy, H), slice(0, H + dy))
                xs, xd = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else \
                    (slice(-dx, W), slice(0, W + dx))
                out[sel, ..., yd, xd] = base[sel, ..., ys, xs]
    lo, hi = (float(ds.x.min()), float(ds.x.max())) if ds.x.size else (0.0, 0.0)
    if noise_std > 0 and hi > lo:
        noise = rng.standard_normal(size=out.shape, dtype=np.float32)  # float32: half the memory
        noise *= np.float32(noise_std * (hi - lo))
        out += noise
        np.clip(out, lo, hi, out=out)
    return Dataset(np.ascontiguousarray(out, dtype=np.float32), ds.y[src].copy(),
                   ds.num_classes, f"{ds.name}/aug")


# ----------------------------------------------------------------------------- resampling

def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] linear interpolation with half-pixel centres (as PyTorch's ``interpolate``
    with ``align_corners=False`` and OpenCV's ``resize``): output i samples the input at
    (i + 0.5) * n_in / n_out - 0.5, clamped to the ends. Rows sum to 1, so values stay in range.
    Shrinking samples without anti-aliasing."""
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    w = np.zeros((n_out, n_in), np.float64)
    np.add.at(w, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(w, (np.arange(n_out), hi), frac)
    return w


def resample_to_shape(ds: Dataset, shape, label: Optional[str] = None,
                      channels_last: bool = False) -> Tuple[Dataset, Optional[str]]:
    """``ds`` with samples of ``shape`` (per sample), and a sentence saying what was done (None when
    the samples already have that shape; it names the data ``label``, default ``ds.name``).
    ``channels_last``: ``shape`` is [H, W, C] or [L, C] (a Keras model through tf2onnx, whose first
    node transposes to channels first): the samples are made [C, H, W] / [C, L] by the rules
    below, then their channel axis is moved last. Deterministic, per sample, no randomness:

    * same number of elements: a reshape, nothing resampled;
    * image target [C, H, W] (source [C0, H0, W0] or [H0, W0]): bilinear resize of each channel to
      H x W (half-pixel centres, ``_linear_weights``); then C0 == C keeps the channels, C0 == 1 is
      repeated over the C channels, C == 1 takes the mean of the C0 channels;
    * signal target [C, L]: each sample flattened to a signal (row-major; a channel-first source with
      C0 == C keeps one signal per channel), linearly resampled to L, a single signal repeated over C;
    * flat target [F]: each sample flattened and linearly resampled to F.

    An 8x8 digit becomes a 3x32x32 image, a 3x128 "accelerometer window" of its 64 pixels, or 640
    features. Anything else (a 1-D source into an image whose size is not a square) is a DataError.
    """
    try:
        target = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise DataError(f"resample_to_shape: shape must be a sequence of ints, got {shape!r}") from None
    if not target or min(target) < 1 or len(target) > 3:
        raise DataError(f"resample_to_shape: shape must have 1 to 3 positive dimensions, got {list(target)}")
    src = tuple(ds.feature_shape)
    if channels_last:
        if len(target) < 2:
            raise DataError(f"resample_to_shape: channels last needs [H, W, C] or [L, C], got {list(target)}")
        first, how = resample_to_shape(ds, (target[-1],) + target[:-1], label)
        moved = np.ascontiguousarray(np.moveaxis(first.x, 1, -1))
        what = how or f"{label or ds.name}: samples {list(src)}"
        return (Dataset(moved, first.y.copy(), first.num_classes, first.name),
                f"{what}, then channels moved last for the model's input {list(target)}")
    if src == target:
        return ds, None
    n = len(ds)
    what = f"{label or ds.name}: samples {list(src)} "
    if int(np.prod(src)) == int(np.prod(target)):
        return (Dataset(ds.x.reshape((n,) + target).copy(), ds.y.copy(), ds.num_classes, ds.name),
                what + f"reshaped to the model's input {list(target)} (same size)")
    if len(target) == 3:
        c, h, w = target
        if len(src) in (2, 3):
            as_image = (1,) + src if len(src) == 2 else src
        else:
            side = int(round(np.sqrt(src[0])))
            if len(src) != 1 or side * side != src[0]:
                raise DataError(f"{what}cannot become images {list(target)}: they are neither images nor "
                                f"flattened square images")
            as_image = (1, side, side)
        c0, h0, w0 = as_image
        if c0 not in (1, c) and c != 1:
            raise DataError(f"{what}have {c0} channels; the model takes {c} (only 1 -> C, C -> C and C -> 1 work)")
        wh, ww = _linear_weights(h0, h).astype(np.float32), _linear_weights(w0, w).astype(np.float32)

        def convert(xs):
            img = np.einsum("hi,ncij,wj->nchw", wh, xs.reshape((len(xs),) + as_image), ww, optimize=True)
            if c0 == c:
                return img
            return np.repeat(img, c, axis=1) if c0 == 1 else img.mean(axis=1, keepdims=True)

        parts = [f"bilinear {h0}x{w0} -> {h}x{w} (half-pixel centres)"]
        if c0 != c:
            parts.append(f"the channel repeated over {c}" if c0 == 1 else f"the mean of the {c0} channels")
        how = f"resized to the model's input {list(target)}: " + ", ".join(parts)
    elif len(target) == 2:
        c, length = target
        kept = len(src) >= 2 and src[0] == c and c > 1  # one signal per channel
        m = int(np.prod(src[1:])) if kept else int(np.prod(src))
        wl = _linear_weights(m, length).astype(np.float32)

        def convert(xs):
            sig = np.einsum("li,nci->ncl", wl, xs.reshape(len(xs), c if kept else 1, m), optimize=True)
            return sig if kept or c == 1 else np.repeat(sig, c, axis=1)

        how = (f"resampled to the model's input {list(target)}: "
               + (f"each channel's {m} values" if kept else f"the {m} values flattened into one signal")
               + f", linear {m} -> {length}" + ("" if kept or c == 1 else f", repeated over {c} channels"))
    else:
        f0 = int(np.prod(src))
        wf = _linear_weights(f0, target[0]).astype(np.float32).T

        def convert(xs):
            return xs.reshape(len(xs), f0) @ wf

        how = f"resampled to the model's input {list(target)}: flattened, linear {f0} -> {target[0]} values"
    out = np.empty((n,) + target, np.float32)
    for start in range(0, n, 256):  # in chunks: the einsum's temporaries stay small
        out[start:start + 256] = convert(ds.x[start:start + 256])
    return Dataset(out, ds.y.copy(), ds.num_classes, ds.name), what + how


# ----------------------------------------------------------------------------- iteration

def batches(ds: Dataset, batch_size: int, seed,
            drop_last: bool = False) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """One epoch of (x, y) mini-batches over a seeded permutation (pass seed + epoch).

    Batches are contiguous copies (float32, int32), ready for the kernels. The last, smaller
    batch is dropped if ``drop_last``. Arguments are checked here, not at the first next().
    """
    batch_size = _check_int("batches", "batch_size", batch_size, 1)
    perm = np.random.default_rng(seed).permutation(len(ds))
    stop = len(ds) - len(ds) % batch_size if drop_last else len(ds)

    def gen():
        for s in range(0, stop, batch_size):
            i = perm[s:s + batch_size]
            yield ds.x[i], ds.y[i]
    return gen()


def label_histogram(ds: Dataset) -> np.ndarray:
    """Samples per class, int64 [num_classes]."""
    return np.bincount(ds.y, minlength=ds.num_classes).astype(np.int64)
