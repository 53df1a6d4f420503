"""One task on a device: load the subset values it was given, train on local data, encode the delta.

The agent process and the simulator both call ``LocalWorker.run``, so a simulated device trains
exactly as a real one does; only where the time goes differs.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from .graph import Model
from .subset import Subset
from .trainer import MemoryRecord, Trainer, planned_steps
from .update import Update, encode_update


#: What a task may ask for. A hub is trusted with the key, not with unbounded numbers: every
#: setting from the wire is checked against these before anything is allocated or trained.
TASK_LIMITS = {
    "lr": (0.0, 100.0),              # (exclusive, inclusive)
    "momentum": (0.0, 1.0),          # [0, 1)
    "weight_decay": (0.0, 1.0),      # [0, 1]
    "local_epochs": (0.0, 1e6),      # (0, 1e6]
    "batch_size": (1, 1 << 16),      # [1, 65536]
    "max_steps": (1, 1 << 31),       # [1, 2^31] or null
}


class TaskError(ValueError):
    """A task that cannot be trained as asked, with a reason worded for a person (one line)."""


class TaskCancelled(Exception):
    """The task was cancelled between two training steps (the hub said STOP); no update exists."""


def _number(d, name: str) -> float:
    v = d[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {str(v)[:40]}")
    return float(v)


def _integer(d, name: str) -> int:
    v = d[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be a whole number, got {str(v)[:40]}")
    return v


@dataclass
class TaskConfig:
    """Hyper-parameters a hub sends with every task (bounds: ``TASK_LIMITS``)."""

    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    local_epochs: float = 1.0
    batch_size: int = 32
    max_steps: Optional[int] = None
    #: how the device holds weights that do not train: "float32", or "int8" (a scale per row;
    #: ``Trainer(frozen=...)``), the memory lever the hub's search may turn on
    frozen: str = "float32"
    #: samples per pass of a micro-batched step (``Trainer(micro_batch=...)``): the memory lever for
    #: activations the hub's search turns on after int8; 0 = the whole batch in one pass
    micro_batch: int = 0

    def as_dict(self) -> Dict[str, object]:
        d = dict(self.__dict__)
        # the defaults go unsaid: a task reads as it did before the setting existed
        if d["frozen"] == "float32":
            del d["frozen"]
        if d["micro_batch"] == 0:
            del d["micro_batch"]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "TaskConfig":
        """Checked settings; anything unknown, of the wrong type or out of range raises ValueError
        with a one-line reason naming the setting and its allowed range."""
        if not isinstance(d, dict):
            raise ValueError("task settings must be a JSON object")
        unknown = set(d) - set(cls().__dict__)
        if unknown:
            raise ValueError(f"unknown task settings {sorted(str(k)[:40] for k in unknown)[:8]}")
        cfg = cls()
        L = TASK_LIMITS
        if "lr" in d:
            cfg.lr = _number(d, "lr")
            if not L["lr"][0] < cfg.lr <= L["lr"][1]:
                raise ValueError(f"lr must be above 0 and at most {L['lr'][1]:g}, got {cfg.lr:g}")
        if "momentum" in d:
            cfg.momentum = _number(d, "momentum")
            if not 0.0 <= cfg.momentum < 1.0:
                raise ValueError(f"momentum must be at least 0 and below 1, got {cfg.momentum:g}")
        if "weight_decay" in d:
            cfg.weight_decay = _number(d, "weight_decay")
            if not 0.0 <= cfg.weight_decay <= L["weight_decay"][1]:
                raise ValueError(f"weight_decay must be between 0 and {L['weight_decay'][1]:g}, got {cfg.weight_decay:g}")
        if "local_epochs" in d:
            cfg.local_epochs = _number(d, "local_epochs")
            if not L["local_epochs"][0] < cfg.local_epochs <= L["local_epochs"][1]:
                raise ValueError(f"local_epochs must be above 0 and at most {L['local_epochs'][1]:g}, "
                                 f"got {cfg.local_epochs:g}")
        if "batch_size" in d:
            cfg.batch_size = _integer(d, "batch_size")
            lo, hi = L["batch_size"]
            if not lo <= cfg.batch_size <= hi:
                raise ValueError(f"batch_size must be between {lo} and {hi}, got {cfg.batch_size}")
        if "frozen" in d:
            if d["frozen"] not in ("float32", "int8"):
                raise ValueError(f"frozen must be \"float32\" or \"int8\", got {str(d['frozen'])[:40]!r}")
            cfg.frozen = d["frozen"]
        if "micro_batch" in d:
            cfg.micro_batch = _integer(d, "micro_batch")
            hi = L["batch_size"][1]
            if not 0 <= cfg.micro_batch <= hi:
                raise ValueError(f"micro_batch must be between 0 (one pass) and {hi}, got {cfg.micro_batch}")
        if d.get("max_steps") is not None:
            cfg.max_steps = _integer(d, "max_steps")
            lo, hi = L["max_steps"]
            if not lo <= cfg.max_steps <= hi:
                raise ValueError(f"max_steps must be between {lo} and {hi} (or null), got {cfg.max_steps}")
        return cfg


@dataclass
class StepLimits:
    """What the device allows one task (the agent's --max-task-steps / --max-task-seconds).

    A task asking for more steps than ``max_steps`` trains ``max_steps``; one still training after
    ``max_seconds`` stops after the step in progress. Either way the update of the steps done is
    delivered (``TaskResult.capped`` says which cap applied). ``cancel`` set: the task stops
    between two steps with ``TaskCancelled`` and delivers nothing.
    """

    max_steps: Optional[int] = None
    max_seconds: Optional[float] = None
    cancel: Optional[threading.Event] = None


@dataclass
class TaskResult:
    update: Update
    memory: MemoryRecord
    steps: int
    planned_steps: int = 0          # what the task asked for
    capped: str = ""                # "" (trained as asked), "steps" or "seconds": which StepLimits cap applied


class LocalWorker:
    """Holds one model (frozen part included) and trains the subset for successive tasks."""

    def __init__(self, model: Model, subset: Subset):
        subset.validate(model)
        self.model = model
        self.subset = subset
        self._trainer: Optional[Trainer] = None
        self._trainer_key = None

    def load_values(self, values: Dict[str, np.ndarray]) -> None:
        """Write the subset's values (as sent by the hub: key -> [R, F]) into the model."""
        # A layer mixed over other rows (an earlier task on this model trained another subset of it)
        # holds this subset's rows as float32 from now on: their values come from this task anyway,
        # and its other rows were frozen as int8 for that task or become so now.
        for layer in self.model.param_layers:
            ls = self.subset.get(layer.name)
            if (getattr(layer, "is_mixed", False) and ls is not None and ls.rows.size
                    and not np.array_equal(ls.rows, layer.trained_rows)):
                layer.mix_weight(ls.rows)
        # looked up each time: frozen="int8" turns a partly trained layer mixed, and its trained rows
        # then live in a compact array of their own (Subset.tensors gives it)
        tensors = self.subset.tensors(self.model)
        keys = {key for key, *_ in tensors}
        if set(values) != keys:
            raise TaskError(f"task values do not match the subset: missing {sorted(keys - set(values))}, "
                             f"unexpected {sorted(set(values) - keys)}")
        for key, _, view, rows in tensors:
            v = np.asarray(values[key])
            want = (view.shape[0] if rows is None else rows.size, view.shape[1])
            if v.shape != want:
                raise TaskError(f"task value {key!r} has shape {v.shape}, the subset needs {want}")
            if not np.all(np.isfinite(v)):
                raise TaskError(f"task value {key!r} holds NaN or Inf")
            if rows is None:
                view[...] = v
            else:
                view[rows] = v

    def run(self, values: Dict[str, np.ndarray], base_version: int, x: np.ndarray, y: np.ndarray,
            config: TaskConfig, bits: int = 8, seed: int = 0, device_id: str = "",
            limits: Optional[StepLimits] = None) -> TaskResult:
        limits = limits or StepLimits()
        if limits.cancel is not None and limits.cancel.is_set():
            raise TaskCancelled("cancelled before training started")
        self.load_values(values)
        key = (config.lr, config.momentum, config.weight_decay, config.frozen, config.micro_batch)
        if self._trainer is None or self._trainer_key != key or config.momentum:
            # momentum state must not leak from one task into the next; frozen="int8" converts the
            # model's frozen layers once (they stay int8 for later tasks: the hub never sends them)
            self._trainer = Trainer(self.model, self.subset, lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay, seed=seed, frozen=config.frozen,
                                    micro_batch=config.micro_batch)
            self._trainer_key = key
        else:
            self._trainer.rng = np.random.default_rng(seed)
        planned = planned_steps(int(x.shape[0]), config.local_epochs, config.batch_size, config.max_steps)
        steps = planned if limits.max_steps is None else min(planned, int(limits.max_steps))
        deadline = None if limits.max_seconds is None else time.monotonic() + float(limits.max_seconds)
        out_of_time = []

        def should_stop() -> bool:
            if limits.cancel is not None and limits.cancel.is_set():
                raise TaskCancelled("cancelled between two training steps")
            if deadline is not None and time.monotonic() >= deadline:
                out_of_time.append(True)
                return True
            return False

        stats = self._trainer.train(x, y, epochs=config.local_epochs, batch_size=config.batch_size,
                                    max_steps=steps, should_stop=should_stop)
        if not math.isfinite(stats.mean_loss):
            raise TaskError(f"training diverged: the loss became {stats.mean_loss} "
                            f"(a lower learning rate than {config.lr:g} may help)")
        try:
            update = encode_update(self.model, self.subset, values, base_version=base_version,
                                   num_samples=int(x.shape[0]), loss=stats.mean_loss, bits=bits,
                                   stochastic=True, seed=seed)
        except ValueError as e:
            if "NaN or Inf" in str(e):
                raise TaskError(f"training diverged: the trained values hold NaN or Inf "
                                f"(a lower learning rate than {config.lr:g} may help)") from None
            raise
        update.device_id = device_id
        memory = self._trainer.memory
        update.peak_memory_bytes = memory.total
        capped = "seconds" if out_of_time else ("steps" if stats.steps < planned else "")
        return TaskResult(update, memory, stats.steps, planned_steps=planned, capped=capped)
