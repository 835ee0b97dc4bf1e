"""Routing a request target to an object: ``/<namespace>/<name>[/...]``. Plain Python.

The runtime keeps the table of objects; this module holds the rule that turns a path
into the (namespace, name) pair that addresses one of them.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import unquote

__all__ = ["MAX_NAME_CHARS", "parse_target"]

#: Characters of an object name (after percent-decoding). Longer: 400.
MAX_NAME_CHARS: Final = 256


def parse_target(path: str) -> tuple[str, str] | str:
    """``/<namespace>/<name>[/...]`` -> (namespace, name), or an error message.

    The name is percent-decoded; it must be printable and at most
    :data:`MAX_NAME_CHARS` characters long.
    """
    parts = path.split("/", 3)
    if len(parts) < 3 or parts[0] != "" or not parts[1] or not parts[2]:
        return "expected a path of the form /<namespace>/<object name>[/...]"
    name = unquote(parts[2])
    if len(name) > MAX_NAME_CHARS:
        return f"object names are at most {MAX_NAME_CHARS} characters (got {len(name)})"
    if not name.isprintable():
        return "object names cannot contain control characters"
    return parts[1], name
