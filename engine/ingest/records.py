"""Checks of the item and user records written through the Python API and HTTP
(``Engine.add_items``, ``Engine.add_users``, ``PUT /items``, ``PUT /users``): the same
id rule as files (engine/store/ids.py), attributes that are JSON with finite numbers,
and no field but the known ones (a misspelt key is an error, as HTTP refuses it).
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from polyrec.errors import ValidationError
from polyrec.store.catalog import ITEM_FIELDS
from polyrec.store.ids import BadId, check_id, is_missing_id

#: the fields a record may have, by ``what``
FIELDS = {"item": ("external_id", *ITEM_FIELDS, "active"), "user": ("external_id", "attributes")}


def check_records(records: Sequence[Mapping[str, Any]], source: str,
                  what: str) -> list[dict[str, Any]]:
    """Copies of ``records`` with their ``external_id`` normalised by the id rule, or a
    ValidationError naming ``source`` (e.g. ``add_items``), the 1-based row and the field.
    ``what``: ``item`` or ``user`` (for messages)."""
    out = []
    for n, rec in enumerate(records, start=1):
        if not isinstance(rec, Mapping):
            raise ValidationError(f"a {what} is a mapping, not {type(rec).__name__}",
                                  file=source, row=n)
        extra = [str(k) for k in rec if k not in FIELDS[what]]
        if extra:
            raise ValidationError(f"unknown field {extra[0]!r} of {'an' if what == 'item' else 'a'} "
                                  f"{what} (known: {', '.join(FIELDS[what])})",
                                  file=source, row=n, field=extra[0])
        raw = rec.get("external_id")
        if is_missing_id(raw):
            raise ValidationError(f"missing {what} id", file=source, row=n, field="external_id")
        try:
            ident = check_id(raw)
        except BadId as exc:
            raise ValidationError(str(exc), file=source, row=n, field="external_id") from None
        attributes = rec.get("attributes")
        if attributes is not None:
            if not isinstance(attributes, Mapping):
                raise ValidationError("attributes must be a mapping", file=source, row=n,
                                      field="attributes")
            try:
                json.dumps(attributes, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValidationError(f"attributes are not JSON: {exc}", file=source, row=n,
                                      field="attributes") from None
        active = rec.get("active")
        if active is not None and not isinstance(active, bool):
            raise ValidationError(f"active is true or false (false: retired, never served; "
                                  f"true: live), not {active!r}"[:200], file=source, row=n,
                                  field="active")
        out.append({**rec, "external_id": ident})
    return out
