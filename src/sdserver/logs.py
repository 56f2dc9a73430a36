"""Logging: readable on a terminal; one line per record in a file or a pipe; or one JSON object a line.

`--log-format auto` (the default) uses rich on a terminal and plain single lines elsewhere (rich
would wrap a record over several lines at the terminal width). A record never spans lines in the
plain and JSON formats: newlines in a message or a traceback are escaped. Records that carry
`extra={"fields": {...}}` (the access log) have those fields merged into their JSON object.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

LEVELS = ("debug", "info", "warning", "error")
# Libraries whose info-level chatter is not the server's story (uvicorn's start/stop lines too: the
# server logs its own "listening", "ready" and "stopping" lines).
_NOISY = ("httpx", "urllib3", "filelock", "uvicorn.error", "huggingface_hub", "PIL")


def quiet_libraries() -> None:
    """Before torch, transformers or diffusers are imported: no import-time warnings (transformers
    complains that torchvision is absent, harmless) and no download/"Loading weights" bars."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class OneLineFormatter(logging.Formatter):
    """`2025-01-31T12:00:00 INFO sdserver: message`, with any newline escaped."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "\\r").replace("\n", "\\n")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the record's fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            + f".{int(record.msecs):03d}"
            + time.strftime("%z", time.localtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry["message"] = "request"
            entry.update({key: value for key, value in fields.items() if key not in entry})
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _rich_handler(stream: TextIO) -> logging.Handler:
    from rich.console import Console
    from rich.logging import RichHandler

    return RichHandler(console=Console(file=stream), show_path=False, log_time_format="[%X]")


def configure(level: str = "info", log_format: str = "auto", stream: TextIO | None = None) -> None:
    """Install the one handler of the root logger (again if called again)."""
    stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "rich" if stream.isatty() else "text"
    handler: logging.Handler
    if log_format == "rich":
        handler = _rich_handler(stream)
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter() if log_format == "json" else OneLineFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
