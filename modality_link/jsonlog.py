"""JSON-lines logging for a hospital's log collector (``logging.format = "json"``,
docs/design.md "Unattended operation").

Each record becomes one JSON object on one line: ``time`` (UTC, ISO 8601 with milliseconds),
``level``, ``logger``, ``message`` and, where the code that logs knows them, ``peer``
(address:port), ``calling_ae``, ``called_ae``, ``status`` (a DIMSE status, PS3.7 Annex C, as
``"0xA700"``), ``job_id`` and ``node``; a traceback goes into ``exception``.

The fields come from two places: ``extra={"status": ...}`` on one log call, and the log
context of the thread, which the places that know a peer or a job set once for everything
logged under them: the acceptor per association thread (:func:`bind`), the job queue around
each attempt (:func:`log_context`), the send job per association. The text format ignores
them: its lines stay as they were.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

#: The optional fields, in the order they are written.
FIELDS = ("peer", "calling_ae", "called_ae", "status", "job_id", "node")

_context: ContextVar[dict[str, Any]] = ContextVar("modality_link_log_context", default={})


def bind(**fields: Any) -> None:
    """Add `fields` to the log context of this thread (a thread that serves one association
    from start to end), or of the innermost :func:`log_context`, which undoes it."""
    _context.set(_context.get() | {k: v for k, v in fields.items() if v is not None})


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """`fields` in the log context for the block; whatever :func:`bind` adds inside the block
    is undone with it (a job worker's next job starts clean)."""
    token = _context.set(_context.get() | {k: v for k, v in fields.items() if v is not None})
    try:
        yield
    finally:
        _context.reset(token)


def current() -> dict[str, Any]:
    """The log context of this thread."""
    return dict(_context.get())


def _status_text(value: Any) -> Any:
    return f"0x{value:04X}" if isinstance(value, int) and not isinstance(value, bool) else value


class JsonFormatter(logging.Formatter):
    """One JSON object per record, one line each (the fields are in the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = _context.get()
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is None:
                value = context.get(key)
            if value is not None:
                out[key] = _status_text(value) if key == "status" else value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)
