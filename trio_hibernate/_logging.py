"""Log output for operators: plain text, or one JSON object per line.

``trio-hibernate serve --log-format json`` and :func:`configure_logging` use it. Log
records of the library carry what they are about as extra fields (``object``,
``namespace``, ``object_id``, ``peer``, ``close_code``, ``closed_by``...), which the
JSON format writes as keys of their own; docs/operations.md lists them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Final, Literal, TextIO

__all__ = ["JsonLogFormatter", "configure_logging"]

#: The text format's line (the CLI's since its first version).
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has: anything else was passed as ``extra``.
_RECORD_ATTRIBUTES: Final = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", (), None))
) | {"message", "asctime"}


class JsonLogFormatter(logging.Formatter):
    """Formats a log record as one JSON object on one line.

    Keys: ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``, ``message``;
    then each extra field of the record under its own name (``object``: the object as
    ``namespace:name``, ``peer``: the client's address, ...); ``exception``: the
    traceback, when the record has one. Values JSON cannot hold are written with
    ``str()``.

    Use it with any handler: ``handler.setFormatter(trio_hibernate.JsonLogFormatter())``.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as a line of JSON (no newline: the handler adds it)."""
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def configure_logging(
    level: int | str = logging.INFO,
    *,
    log_format: Literal["text", "json"] = "text",
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send log records of ``level`` and above to ``stream``, as the CLI does.

    Replaces the handlers of the root logger with one handler writing to ``stream``
    (default: ``sys.stderr``), in the ``text`` format (``time LEVEL logger: message``)
    or as one JSON object per line (:class:`JsonLogFormatter`). Connection open and
    close lines are logged at ``DEBUG`` (``trio_hibernate.connection``).

    Args:
        level: a ``logging`` level, or its name (``"debug"``, ``"INFO"``...).
        log_format: ``"text"`` or ``"json"``.
        stream: where the lines go (``sys.stderr``).

    Returns:
        The handler installed.

    Raises:
        ValueError: an unknown ``log_format`` or level name.
    """
    if log_format == "json":
        formatter: logging.Formatter = JsonLogFormatter()
    elif log_format == "text":
        formatter = logging.Formatter(TEXT_FORMAT)
    else:
        raise ValueError(f"log_format is 'text' or 'json', got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    return handler
