"""What the agent agrees to train, and how it words a task it cannot.

A hub holds the fleet key, but the agent still does not trust it with unbounded numbers: a few
hundred bytes of model file, or one TASK field, must not make the device run out of memory or
train for ever. The model file's own sizes are bounded when it is parsed
(``modelfile.LIMITS``), the TASK's settings when it is decoded (``local.TASK_LIMITS``); here:

- memory: a task is refused when the cost model predicts that training it needs more than the
  budget plus ``MEMORY_MARGIN``, before anything of the training is allocated;
- steps and seconds: ``StepLimits`` for ``LocalWorker.run`` from the agent's
  ``--max-task-steps`` and ``--max-task-seconds``;
- every TASK_FAILED reason is a sentence for a person: ``failure_reason`` maps the failures
  the agent knows, and anything else becomes a plain "internal error" line (the agent's own log
  keeps the exception's type and text).
"""
from __future__ import annotations

from typing import Optional

from ftte_core.cost import predict_memory
from ftte_core.graph import Model
from ftte_core.local import TaskConfig, TaskError
from ftte_core.subset import Subset

#: Slack on the budget: the hub picks a subset with its own cost-model numbers (computed with its
#: own thread count, while convolution scratch is per thread), and the cost model is held to 10%
#: of what the engine allocates. A task predicted above budget x (1 + MEMORY_MARGIN) is refused.
MEMORY_MARGIN = 0.125
#: float32 weight bytes per byte of their int8 form (``frozen="int8"``): the most a model's weights
#: can shrink on a device, so the bound of what a MODEL frame may hold.
INT8_SHRINK = 4


def size_text(n: float) -> str:
    """'83.2 MiB', '64 MiB', '512 KiB', '900 bytes': short, for sentences."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{int(n)} bytes"


def training_memory(model: Model, subset: Subset, config: TaskConfig, num_samples: int) -> int:
    """Bytes one training step of this task needs on this device (the cost model, no allocation)."""
    batch = max(1, min(int(config.batch_size), int(num_samples)))
    frozen = getattr(config, "frozen", "float32")
    return int(predict_memory(model, subset, batch_size=batch, momentum=config.momentum, frozen=frozen,
                              micro_batch=getattr(config, "micro_batch", 0))["total"])


def check_memory(model: Model, subset: Subset, config: TaskConfig, num_samples: int, budget: int) -> int:
    """The predicted bytes, or TaskError when they exceed the budget (with its margin)."""
    try:
        needed = training_memory(model, subset, config, num_samples)
    except (ValueError, OverflowError) as e:
        raise TaskError(f"the task's memory cannot be predicted ({_one_line(e)})") from None
    if needed > budget * (1 + MEMORY_MARGIN):
        raise TaskError(f"this task needs {size_text(needed)} to train; the budget is {size_text(budget)} "
                        f"(--memory-budget)")
    return needed


def weights_over_budget(param_bytes: int, budget: int) -> str:
    return (f"the model's weights alone are {size_text(param_bytes)} ({size_text(param_bytes // INT8_SHRINK)} "
            f"even as int8); the budget is {size_text(budget)} (--memory-budget)")


def failure_reason(e: BaseException, memory_budget: Optional[int] = None) -> str:
    """A one-line TASK_FAILED reason for an exception raised while preparing or training a task."""
    if isinstance(e, TaskError):
        return _one_line(e)
    if isinstance(e, MemoryError):
        where = f" (budget {size_text(memory_budget)})" if memory_budget else ""
        return f"the device ran out of memory while training{where}; a smaller subset or batch size would fit"
    if isinstance(e, OSError):
        what = e.strerror or "an I/O error"
        return f"the agent could not read or write a file while training: {what}"
    if isinstance(e, FloatingPointError) or (isinstance(e, ArithmeticError) and not isinstance(e, ZeroDivisionError)):
        return "training diverged: a value overflowed (a lower learning rate may help)"
    return "training stopped on an internal error in the agent; the agent's log has the details"


def _one_line(e: BaseException) -> str:
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
