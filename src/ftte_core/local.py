"""One task on a device: load the subset values it was given, train on local data, encode the delta.

The agent process and the simulator both call ``LocalWorker.run``, so a simulated device trains
exactly as a real one does; only where the time goes differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from .graph import Model
from .subset import Subset
from .trainer import MemoryRecord, Trainer
from .update import Update, encode_update


@dataclass
class TaskConfig:
    """Hyper-parameters a hub sends with every task."""

    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    local_epochs: float = 1.0
    batch_size: int = 32
    max_steps: Optional[int] = None

    def as_dict(self) -> Dict[str, object]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "TaskConfig":
        unknown = set(d) - set(cls().__dict__)
        if unknown:
            raise ValueError(f"unknown task settings {sorted(unknown)}")
        cfg = cls(**d)
        if not (cfg.lr > 0 and np.isfinite(cfg.lr)) or cfg.batch_size < 1 or not cfg.local_epochs > 0:
            raise ValueError(f"bad task settings {cfg.as_dict()}")
        return cfg


@dataclass
class TaskResult:
    update: Update
    memory: MemoryRecord
    steps: int


class LocalWorker:
    """Holds one model (frozen part included) and trains the subset for successive tasks."""

    def __init__(self, model: Model, subset: Subset):
        subset.validate(model)
        self.model = model
        self.subset = subset
        self._tensors = subset.tensors(model)
        self._trainer: Optional[Trainer] = None
        self._trainer_key = None

    def load_values(self, values: Dict[str, np.ndarray]) -> None:
        """Write the subset's values (as sent by the hub: key -> [R, F]) into the model."""
        keys = {key for key, *_ in self._tensors}
        if set(values) != keys:
            raise ValueError(f"task values do not match the subset: missing {sorted(keys - set(values))}, "
                             f"unexpected {sorted(set(values) - keys)}")
        for key, _, view, rows in self._tensors:
            v = np.asarray(values[key])
            want = (view.shape[0] if rows is None else rows.size, view.shape[1])
            if v.shape != want:
                raise ValueError(f"task value {key!r} has shape {v.shape}, expected {want}")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"task value {key!r} holds NaN or Inf")
            if rows is None:
                view[...] = v
            else:
                view[rows] = v

    def run(self, values: Dict[str, np.ndarray], base_version: int, x: np.ndarray, y: np.ndarray,
            config: TaskConfig, bits: int = 8, seed: int = 0, device_id: str = "") -> TaskResult:
        self.load_values(values)
        key = (config.lr, config.momentum, config.weight_decay)
        if self._trainer is None or self._trainer_key != key or config.momentum:
            # momentum state must not leak from one task into the next
            self._trainer = Trainer(self.model, self.subset, lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay, seed=seed)
            self._trainer_key = key
        else:
            self._trainer.rng = np.random.default_rng(seed)
        stats = self._trainer.train(x, y, epochs=config.local_epochs, batch_size=config.batch_size,
                                    max_steps=config.max_steps)
        update = encode_update(self.model, self.subset, values, base_version=base_version,
                               num_samples=int(x.shape[0]), loss=stats.mean_loss, bits=bits,
                               stochastic=True, seed=seed)
        update.device_id = device_id
        memory = self._trainer.memory
        update.peak_memory_bytes = memory.total
        return TaskResult(update, memory, stats.steps)
