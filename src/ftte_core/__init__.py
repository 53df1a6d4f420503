"""FTTE core: the on-device training engine shared by the hub and the agents.

    import ftte_core as ft
    model = ft.load_model("model.onnx")                                     # ONNX in
    model = ft.zoo("cnn", input_shape=(1, 28, 28), num_classes=10, seed=0)  # or from the zoo
    logits = model.predict(x)                                               # float32 in, numpy out
    ft.save_onnx(model, "out.onnx")                                         # ONNX out

Training on a parameter subset:

    subset = ft.Subset.of(model, {"fc1": {"rows": "all", "bias": True}})
    trainer = ft.Trainer(model, subset, lr=0.05)
    trainer.train(x, y, epochs=1, batch_size=32)
    trainer.memory            # bytes the step really held, by category
    ft.predict_memory(model, subset, batch_size=32)   # the cost model's prediction
"""
import os as _os

from . import _kernels
from .cost import predict_memory, training_flops
from .data import Dataset, DataError, load_bundled, load_npz
from .graph import Model
from .subset import LayerSubset, Subset
from .trainer import MemoryRecord, Trainer
from .zoo import zoo

__version__ = "0.1.0"

# ONNX support loads the onnx package (about 13 MB of memory): only when asked for, so an agent
# that never touches ONNX files stays small.
_LAZY = {"load_model", "save_onnx", "to_onnx", "OnnxImportError"}


def __getattr__(name):
    if name in _LAZY:
        from . import onnx_io
        return getattr(onnx_io, name)
    raise AttributeError(f"module 'ftte_core' has no attribute {name!r}")


if _os.environ.get("FTTE_NUM_THREADS", "").strip():
    try:
        _kernels.set_num_threads(int(_os.environ["FTTE_NUM_THREADS"]))
    except ValueError:
        raise ValueError(f"FTTE_NUM_THREADS must be an integer, got {_os.environ['FTTE_NUM_THREADS']!r}") from None


def set_num_threads(n: int) -> None:
    """Threads the kernels use (n <= 0: all CPUs this process may use). Results do not depend on it."""
    _kernels.set_num_threads(int(n))


def get_num_threads() -> int:
    return _kernels.get_num_threads()


__all__ = [
    "Dataset", "DataError", "LayerSubset", "MemoryRecord", "Model", "OnnxImportError", "Subset", "Trainer",
    "get_num_threads", "load_bundled", "load_model", "load_npz", "predict_memory", "save_onnx",
    "set_num_threads", "training_flops", "zoo",
]
