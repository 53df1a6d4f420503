"""The hub's log lines: one line per event, as text for people or JSON for machines.

Events go through the ``ftte_hub`` logger. A progress line is a log record carrying a dict in
``extra={"progress": {...}}``: the text formatter prints its message, the JSON formatter prints
the dict's fields (plus time, level and event name), so both formats say the same thing.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Dict, Optional

LOGGER_NAME = "ftte_hub"
log = logging.getLogger(LOGGER_NAME)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{stamp} {level}{record.getMessage()}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: Dict[str, Any] = {"time": round(record.created, 3), "level": record.levelname.lower(),
                               "event": getattr(record, "event", "log")}
        fields = getattr(record, "progress", None)
        if isinstance(fields, dict):
            obj.update(fields)
        else:
            obj["message"] = record.getMessage()
        return json.dumps(obj, separators=(",", ":"), default=str)


def setup_logging(fmt: str = "text", level: int = logging.INFO, stream=None) -> logging.Handler:
    """Send the hub's log lines to ``stream`` (stderr) as ``fmt`` ("text" | "json"); returns the handler."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.set_name("ftte-hub")
    for old in [h for h in log.handlers if h.get_name() == "ftte-hub"]:
        log.removeHandler(old)
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    return handler


def event(name: str, message: str, level: int = logging.INFO, fields: Optional[Dict[str, Any]] = None) -> None:
    """One log line for one event; ``fields`` become the JSON line's fields."""
    extra: Dict[str, Any] = {"event": name}
    if fields is not None:
        extra["progress"] = dict(fields, message=message)
    log.log(level, "%s", message, extra=extra)
