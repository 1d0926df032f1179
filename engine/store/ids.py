"""The one rule for external ids (items, users, knowledge-graph entities and relations),
the same for files, the Python API and HTTP.

An id is a string or an integer. Surrounding white space is removed; what remains has
1 to :data:`ID_CHARS` characters and no control characters (C0, DEL, C1). An integer
(or an integral float, as Parquet and RecBole float columns give) is stored as its
decimal text: ``7`` and ``7.0`` are the id ``"7"``. Anything else (a JSON object or
list, a boolean, a fractional number) is refused. HTTP declares the same rule in its
schema (:data:`ID_PATTERN`, ``maxLength`` :data:`ID_CHARS`).
"""
from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

#: The most characters an id may have (after surrounding white space is removed).
ID_CHARS = 255
#: Control characters, never allowed in an id.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: The JSON-schema pattern of an id over HTTP: no control characters, not only spaces.
ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x1f\x7f-\x9f\s][^\x00-\x1f\x7f-\x9f]*$"
#: How much of an id error messages show.
SHOWN_CHARS = 64


class BadId(ValueError):
    """A value that is not an id; the message says why (callers add file, row, field)."""


def is_missing_id(value: Any) -> bool:
    """None, blank text, NaN or the text 'nan' (how pandas writes a missing id)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan")


def check_id(value: Any) -> str:
    """``value`` as an id, or :class:`BadId`. Callers test :func:`is_missing_id` first
    (a missing id has its own message); here a missing one is a BadId too."""
    if isinstance(value, bool):
        raise BadId(f"an id is a string or an integer, not {value!r}")
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, (float, Decimal)):
        if not (math.isfinite(value) and value == int(value)):
            raise BadId(f"an id is a string or an integer, not the number {value}")
        text = str(int(value))
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise BadId(f"an id is a string or an integer, not a {_kind(value)}")
    if not text or text.lower() == "nan":
        raise BadId("missing id")
    if len(text) > ID_CHARS:
        raise BadId(f"an id has at most {ID_CHARS} characters, not {len(text):,}")
    if _CONTROL.search(text):
        raise BadId(f"an id has no control characters: {shown(text)}")
    return text


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "JSON object"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def shown(ident: Any, limit: int = SHOWN_CHARS) -> str:
    """An id as error messages show it: quoted, at most ``limit`` characters (then how
    many more there were), so a huge id is never echoed back whole."""
    text = str(ident)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text):,} characters)"
