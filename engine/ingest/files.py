"""Ingestion: read a file with a registered Reader, map its columns onto the store's
fields, validate every row, and write the good rows in ONE transaction.

Kinds: ``items``, ``users``, ``interactions``, ``kg`` (head/relation/tail triples) and
``links`` (item -> knowledge-graph entity). Re-ingesting a file is idempotent: items and
users are upserted by external id, triples are unique, and interactions carry a dedup
key (user, item, kind, timestamp, value and the occurrence number of identical rows in
the file, so genuine repeats are kept once each).

With ``on_error="fail"`` (the default) one bad row means nothing of the file is written;
with ``on_error="skip"`` the good rows are written and the bad ones reported.
"""
from __future__ import annotations

import csv
import math
import os
import string
import time
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from sqlalchemy import func, select

from polyrec.contracts import Reader, Row
from polyrec.progress import progress_bar
from polyrec.errors import ConfigError, NotFoundError, ValidationError
from polyrec.ingest import images, interactions
from polyrec.ingest.interactions import BadValue, is_blank, to_id, to_number, to_timestamp  # noqa: F401
from polyrec.store.ids import is_missing_id
from polyrec.knowledge_graph import store as kg_store
from polyrec.store import catalog
from polyrec.store import tombstones
from polyrec.store.models import Entity, ForgottenUser, Item, Triple, User

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine
    from polyrec.plugin_host import Registry

KINDS = ("items", "users", "interactions", "kg", "links")
ON_ERROR = ("fail", "skip")

#: kind -> field -> column names tried (case-insensitive), first match wins.
FIELD_CANDIDATES: dict[str, dict[str, tuple[str, ...]]] = {
    "items": {
        "external_id": ("item_id", "article_id", "movie_id", "product_id", "item", "id"),
        "title": ("title", "movie_title", "prod_name", "name", "product_name"),
        "text": ("text", "detail_desc", "description", "desc", "overview", "plot", "summary"),
        "image": ("image", "image_path", "image_url", "img", "picture"),
        #: optional lifecycle state (polyrec.store.lifecycle): false retires the item,
        #: true restores it, an empty cell (or no column) leaves its state as it is
        "active": ("active", "is_active"),
    },
    "users": {"external_id": ("user_id", "customer_id", "user", "id")},
    "interactions": {
        "user": ("user_id", "customer_id", "user"),
        "item": ("item_id", "article_id", "movie_id", "product_id", "item"),
        "value": ("rating", "value", "score"),
        "ts": ("timestamp", "ts", "t_dat", "time", "date", "datetime"),
        "kind": ("kind", "event", "event_type"),
    },
    "kg": {
        "head": ("head_id", "head", "subject", "h"),
        "relation": ("relation_id", "relation", "predicate", "r"),
        "tail": ("tail_id", "tail", "object", "t"),
    },
    "links": {
        "item": ("item_id", "article_id", "movie_id", "product_id", "item"),
        "entity": ("entity_id", "entity"),
    },
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "items": ("external_id",), "users": ("external_id",), "interactions": ("user", "item"),
    "kg": ("head", "relation", "tail"), "links": ("item", "entity"),
}
DEFAULT_BATCH = 5000
#: The longest text a cell may hold, in every format (a longer one is a bad row).
MAX_FIELD_CHARS = 1_000_000


@dataclass
class IngestReport:
    """What one ingestion did. ``written`` counts good rows sent to the store, ``new``
    how many rows the target table gained (0 when the file was ingested before)."""

    kind: str
    file: str
    format: str
    mapping: dict[str, str]
    rows: int = 0
    written: int = 0
    new: int = 0
    skipped: int = 0
    #: rows of forgotten users left out (engine/feedback/forget.py); restored instead
    #: with ``include_forgotten=True``. rows = written + skipped + forgotten.
    forgotten: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    links: "IngestReport | None" = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["links"] = self.links.as_dict() if self.links else None
        return out

    def summary(self) -> str:
        """One line for the CLI."""
        noun = {"kg": "triples", "links": "item links"}.get(self.kind, self.kind)
        line = (f"Ingested {self.written:,} {noun} from {Path(self.file).name} ({self.format}): "
                f"{self.new:,} new, {self.skipped:,} bad rows skipped, {self.seconds:.1f} s")
        if self.forgotten:
            line += (f"; {self.forgotten:,} rows of forgotten users left out "
                     "(--include-forgotten restores them)")
        if self.links is not None:
            line += f"; {self.links.summary()[0].lower()}{self.links.summary()[1:]}"
        return line


# -- readers and mappings ------------------------------------------------------------------
def pick_reader(readers: "Registry", path: Path, format: str | None = None) -> Reader:
    """The reader named ``format``, else the one claiming the file's suffix."""
    if format:
        return readers.get(format)()
    suffix = path.suffix.lower()
    for _, cls in readers.items():
        if suffix in cls.suffixes:
            return cls()
    known = ", ".join(f"{n} ({' '.join(c.suffixes)})" for n, c in readers.items())
    raise ConfigError(f"{path}: no reader for suffix '{suffix or '(none)'}'; "
                      f"choose one with --format ({known})")


def resolve_mapping(kind: str, columns: list[str], explicit: Mapping[str, str | None] | None,
                    *, file: str) -> dict[str, str]:
    """field -> column: explicit entries first, then auto-detected common names.

    An explicit ``None``/empty column switches a field off (no auto-detection)."""
    candidates = FIELD_CANDIDATES[kind]
    explicit = dict(explicit or {})
    by_lower = {c.lower(): c for c in columns}
    mapping: dict[str, str] = {}
    for fld, col in explicit.items():
        if fld not in candidates:
            raise ConfigError(f"unknown field '{fld}' for {kind} (fields: {', '.join(candidates)})")
        if not col:
            continue
        if col not in columns:
            raise ConfigError(f"{file}: no column '{col}' to map to '{fld}' "
                              f"(columns: {', '.join(columns)})")
        mapping[fld] = col
    used = set(mapping.values())
    for fld, names in candidates.items():
        if fld in explicit:
            continue
        for name in names:
            col = by_lower.get(name)
            if col is not None and col not in used:
                mapping[fld] = col
                used.add(col)
                break
    for fld in REQUIRED[kind]:
        if fld not in mapping:
            raise ValidationError(
                f"no column for {kind} field '{fld}' (looked for {', '.join(candidates[fld])}; "
                f"map one with --map {fld}=COLUMN)", file=file, field=fld)
    return mapping


# -- value conversion (shared with the one writer of interactions) -----------------------
_Bad = BadValue  # a value that cannot be converted; becomes a ValidationError for its row


def _missing(value: Any) -> bool:
    """An empty cell as readers give it: None, blank text, NaN (parquet/pandas), []."""
    return is_blank(value) or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, list) and not value)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def check_value(value: Any, error: Any) -> None:
    """The rules every cell of every reader obeys, whatever its field: text of at most
    MAX_FIELD_CHARS characters and no infinite number (anywhere in a nested value).
    ``error(message)`` builds the ValidationError to raise. NaN is a missing value in
    attributes and context (as pandas writes one) and refused in ``value``/``ts``."""
    if isinstance(value, str):
        if len(value) > MAX_FIELD_CHARS:
            raise error(f"a value of {len(value):,} characters, over the limit of "
                        f"{MAX_FIELD_CHARS:,}")
    elif isinstance(value, float):
        if math.isinf(value):
            raise error(f"not a finite number: {str(value)!r}")
    elif isinstance(value, dict):
        for key, inner in value.items():
            check_value(key, error)
            check_value(inner, error)
    elif isinstance(value, (list, tuple)):
        for inner in value:
            check_value(inner, error)


_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})


def to_active(value: Any) -> bool:
    """An ``active`` cell as a bool: true/false, yes/no, 1/0 (any case) or a boolean;
    anything else is a BadValue."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BadValue(f"active is true or false (yes/no, 1/0), not {str(value)[:40]!r}")


def to_text(value: Any) -> str | None:
    if _missing(value):
        return None
    if isinstance(value, list):  # RecBole token_seq
        return " ".join(str(v) for v in value)
    return str(value)


def jsonable(value: Any) -> Any:
    """A JSON-safe copy of an attribute value (dates as ISO strings, NaN dropped)."""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items() if not _missing(v)}
    return value


def _attributes(fields: Mapping[Any, Any], exclude: set[str]) -> dict[str, Any]:
    return {str(k): jsonable(v) for k, v in fields.items()
            if k is not None and k not in exclude and not _missing(v)}


# -- images --------------------------------------------------------------------------------
def resolve_image(ref: str, root: Path) -> str:
    """The image-root rule of engine/ingest/images.py: a URL unchanged, a local path made
    absolute under ``root``; one that escapes it (``../../etc/shadow``) is a BadValue."""
    try:
        return images.resolve_image(ref, root)
    except images.OutsideRoot as exc:
        raise _Bad(str(exc)) from None


class _ImageTemplate:
    """``str.format`` template over a row's raw fields, e.g. ``images/{article_id:010d}.jpg``."""

    def __init__(self, template: str, columns: list[str], file: str) -> None:
        self.template = template
        names = {f.split(".")[0].split("[")[0]
                 for _, f, _, _ in string.Formatter().parse(template) if f}
        missing = sorted(n for n in names if n not in columns)
        if missing:
            raise ConfigError(f"{file}: image template names column(s) {', '.join(missing)} "
                              f"that the file does not have (columns: {', '.join(columns)})")
        self.names = names

    def render(self, fields: Mapping[Any, Any]) -> str | None:
        values = {n: fields.get(n) for n in self.names}
        if any(_missing(v) for v in values.values()):
            return None
        try:
            return self.template.format_map(values)
        except (ValueError, TypeError):
            # '{id:010d}' over a string column: retry with integral strings as ints
            cast = {k: int(v) if isinstance(v, str) and v.strip().lstrip("-").isdigit() else v
                    for k, v in values.items()}
            try:
                return self.template.format_map(cast)
            except (ValueError, TypeError) as exc:
                raise _Bad(f"image template: {exc}") from None


# -- row parsing ---------------------------------------------------------------------------
@dataclass
class _Options:
    interaction_kind: str | None
    image_template: str | None
    image_root: Path
    kinds: Any = ()  # the known interaction kinds (interactions.known_kinds)


class _Parser:
    """Turns one Row into a record for the store, or raises ValidationError."""

    def __init__(self, kind: str, mapping: dict[str, str], columns: list[str], file: str,
                 opts: _Options) -> None:
        self.kind, self.mapping, self.file, self.opts = kind, mapping, file, opts
        self._parse_kind = getattr(self, f"_{kind}")
        self.ids: dict[str, str] = {}  # the user and item ids seen (interactions)
        self.mapped = set(mapping.values())
        #: the columns that become attributes: a file sets these and keeps the others
        self.attribute_columns = {str(c) for c in columns if c is not None} - self.mapped
        self.template = (_ImageTemplate(opts.image_template, columns, file)
                         if opts.image_template and kind == "items" else None)
        value_col = mapping.get("value", "")
        self.default_kind = (opts.interaction_kind or ("rating" if "rating" in value_col.lower()
                                                       else "click")).strip().lower()

    def error(self, row: Row, fld: str, message: str) -> ValidationError:
        return ValidationError(message, file=self.file, row=row.number, field=fld)

    def required_id(self, row: Row, fld: str) -> str:
        """The id in ``fld`` by the one id rule (engine/store/ids.py)."""
        col = self.mapping[fld]
        value = row.fields.get(col)
        if is_missing_id(value):
            what = {"items": "item id", "users": "user id"}.get(self.kind, fld) \
                if fld == "external_id" else fld
            raise self.error(row, col, f"missing {what}")
        try:
            return to_id(value)
        except _Bad as exc:
            raise self.error(row, col, str(exc)) from None

    def convert(self, row: Row, fld: str, fn: Any) -> Any:
        col = self.mapping.get(fld)
        if col is None:
            return None
        value = row.fields.get(col)
        if _missing(value):
            return None
        try:
            return fn(value)
        except _Bad as exc:
            raise self.error(row, col, str(exc)) from None

    def parse(self, row: Row) -> dict[str, Any]:
        if None in row.fields:  # the reader could not parse it: a str or ValidationError
            bad = row.fields[None]
            reason, fld = ((bad.reason, bad.field) if isinstance(bad, ValidationError)
                           else (str(bad), None))
            raise ValidationError(reason, file=self.file, row=row.number, field=fld)
        for col, value in row.fields.items():
            if value is None or type(value) is str and len(value) <= MAX_FIELD_CHARS:
                continue  # most cells: nothing more to look at
            check_value(value, lambda message: self.error(row, str(col), message))
        return self._parse_kind(row)

    def _items(self, row: Row) -> dict[str, Any]:
        rec: dict[str, Any] = {"external_id": self.required_id(row, "external_id"),
                               "attributes": _attributes(row.fields, self.mapped)}
        for fld in ("title", "text"):
            if fld in self.mapping:
                rec[fld] = to_text(row.fields.get(self.mapping[fld]))
        image = None
        if "image" in self.mapping:
            ref = to_text(row.fields.get(self.mapping["image"]))
            try:
                image = resolve_image(ref.strip(), self.opts.image_root) if ref else None
            except _Bad as exc:
                raise self.error(row, self.mapping["image"], str(exc)) from None
        if image is None and self.template is not None:
            try:
                ref = self.template.render(row.fields)
                resolved = resolve_image(ref, self.opts.image_root) if ref else None
            except _Bad as exc:
                raise self.error(row, "image", str(exc)) from None
            if resolved:
                # a template is a guess at a path: keep it only where the file exists
                image = resolved if images.is_url(resolved) or os.path.isfile(resolved) else None
        if "image" in self.mapping or self.template is not None:
            rec["image"] = image
        active = self.convert(row, "active", to_active)
        if active is not None:  # a blank cell: the state stays as it is
            rec["active"] = active
        return rec

    def _users(self, row: Row) -> dict[str, Any]:
        return {"external_id": self.required_id(row, "external_id"),
                "attributes": _attributes(row.fields, self.mapped)}

    def _interactions(self, row: Row) -> interactions.CheckedEvent:
        cells = row.fields
        raw = {}
        for fld, col in self.mapping.items():
            v = cells.get(col)
            if type(v) is str:  # most cells: missing when blank
                if fld in ("user", "item"):  # one string per id, not one per row
                    v = self.ids.setdefault(v, v)
                raw[fld] = v if v.strip() else None
            else:  # an empty cell is missing; a NaN is a number that is not finite (refused)
                raw[fld] = None if v is None or _missing(v) and not _is_nan(v) else v
        # the columns not mapped to a field are the event's context
        raw["context"] = (None if cells.keys() <= self.mapped
                          else _attributes(cells, self.mapped) or None)
        return interactions.check_event(raw, row=row.number, kinds=self.opts.kinds,
                                        source=self.file, fields=self.mapping,
                                        default_kind=self.default_kind)

    def _kg(self, row: Row) -> dict[str, Any]:
        return {"row": row.number, "triple": (self.required_id(row, "head"),
                                              self.required_id(row, "relation"),
                                              self.required_id(row, "tail"))}

    def _links(self, row: Row) -> dict[str, Any]:
        return {"row": row.number, "item": self.required_id(row, "item"),
                "entity": self.required_id(row, "entity")}


# -- writing -------------------------------------------------------------------------------
def _count(session: Any, model: Any, where: Any = None) -> int:
    q = select(func.count()).select_from(model)
    if where is not None:
        q = q.where(where)
    return session.execute(q).scalar_one()


def _get(record: Any, name: str) -> Any:
    """A field of a parsed record: a dict (links) or a CheckedEvent (interactions)."""
    return record[name] if isinstance(record, dict) else getattr(record, name)


def _batches(seq: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


class _Writer:
    """Writes validated records of one kind inside the caller's session."""

    def __init__(self, session: Any, parser: _Parser, batch_size: int, source: str,
                 tag: Any = None) -> None:
        self.s, self.parser, self.batch, self.source = session, parser, batch_size, source
        self.tag = tag  # experiments tag interactions (interactions.Tagger)
        self.stored: interactions.Stored | None = None
        self.ids = interactions.IdCache()  # the items looked up once for both steps
        self.progress: Callable[[int], None] = lambda n: None  # told the rows written

    def unknown_items(self, records: list[Any]) -> tuple[dict[str, int], list[ValidationError]]:
        """Internal ids of the referenced items and one error per record naming an unknown one."""
        ids = interactions.item_ids(self.s.connection(), {_get(r, "item") for r in records},
                                    self.ids)
        col = self.parser.mapping["item"]
        errors = [ValidationError(f"unknown item '{_get(r, 'item')}' (ingest the items first)",
                                  file=self.parser.file, row=_get(r, "row"), field=col)
                  for r in records if _get(r, "item") not in ids]
        return ids, errors

    def write(self, kind: str, records: list[dict[str, Any]], lookups: dict[str, int]) -> tuple[int, int]:
        """(written, new)"""
        return getattr(self, f"_{kind}")(records, lookups)

    def _merged(self, model: Any, chunk: list[dict[str, Any]], empty: bool) -> list[dict[str, Any]]:
        """``chunk`` with each stored record's attributes of columns the file does not
        have kept: a file of prices alone must not wipe the genres (a column the file
        has sets its attribute; a blank cell there removes it)."""
        if empty:  # nothing stored before this file
            return chunk
        ids = [r["external_id"] for r in chunk]
        stored = dict(self.s.execute(select(model.external_id, model.attributes)
                                     .where(model.external_id.in_(ids))).all())
        merged = []
        for rec in chunk:
            kept = {k: v for k, v in (stored.get(rec["external_id"]) or {}).items()
                    if k not in self.parser.attribute_columns}
            merged.append({**rec, "attributes": {**kept, **rec["attributes"]}} if kept else rec)
        return merged

    def _items(self, records: list[dict[str, Any]], _: Any) -> tuple[int, int]:
        before = _count(self.s, Item)
        for chunk in _batches(records, self.batch):
            catalog.upsert_items(self.s, self._merged(Item, chunk, before == 0))
            self.progress(len(chunk))
        return len(records), _count(self.s, Item) - before

    def _users(self, records: list[dict[str, Any]], _: Any) -> tuple[int, int]:
        before = _count(self.s, User)
        for chunk in _batches(records, self.batch):
            catalog.upsert_users(self.s, self._merged(User, chunk, before == 0))
            self.progress(len(chunk))
        return len(records), _count(self.s, User) - before

    def _interactions(self, records: list[Any], _: Any) -> tuple[int, int]:
        self.stored = interactions.store_events(self.s.connection(), records, now=time.time(),
                                                cache=self.ids, tag=self.tag, batch=self.batch,
                                                keep=False, progress=self.progress)
        return len(records), self.stored.new_count

    def _kg(self, records: list[dict[str, Any]], _: Any) -> tuple[int, int]:
        before = _count(self.s, Triple)
        for chunk in _batches([r["triple"] for r in records], self.batch):
            kg_store.add_triples(self.s, chunk, source=self.source)
        return len(records), _count(self.s, Triple) - before

    def _links(self, records: list[dict[str, Any]], _: Any) -> tuple[int, int]:
        linked = lambda: _count(self.s, Entity, Entity.item_id.is_not(None))  # noqa: E731
        before = linked()
        pairs = {r["item"]: r["entity"] for r in records}
        kg_store.link_items(self.s, pairs)
        return len(records), linked() - before


def _columns(reader: Reader, path: Path) -> tuple[list[str], Iterable[Row]]:
    """The file's columns and its rows (materialized when the format has no header)."""
    columns = reader.columns(path)
    if columns is not None:
        return list(columns), reader.read(path)
    rows = list(reader.read(path))
    seen: dict[str, None] = {}
    for row in rows:
        for key in row.fields:
            if key is not None:
                seen.setdefault(str(key), None)
    return list(seen), rows


def _unreadable(exc: Exception, file: str) -> ValidationError:
    """A file-level error for input the reader cannot decode (it stops reading there)."""
    reason = f"not UTF-8 text ({exc.reason})" if isinstance(exc, UnicodeDecodeError) else str(exc)
    return ValidationError(f"unreadable: {reason}", file=file)


def _error_dict(exc: ValidationError) -> dict[str, Any]:
    return {"file": exc.file, "row": exc.row, "field": exc.field, "message": exc.reason}


def _without_forgotten(session: Any, kind: str, records: list[Any], report: IngestReport,
                       restore: bool) -> list[Any]:
    """``records`` less those of forgotten users (counted in ``report.forgotten``); with
    ``restore`` they are all kept and their tombstones lifted."""
    if session.execute(select(ForgottenUser.id_hash).limit(1)).first() is None:
        return records  # nobody was ever forgotten here
    key = "user" if kind == "interactions" else "external_id"
    gone = tombstones.forgotten(session, {_get(r, key) for r in records})
    if not gone:
        return records
    if restore:
        tombstones.lift(session, gone)
        return records
    kept = [r for r in records if _get(r, key) not in gone]
    report.forgotten = len(records) - len(kept)
    return kept


#: Files of at least this many rows show their writing too (after reading and checking).
WRITE_PROGRESS_ROWS = 50_000
#: Text files up to this size have their lines counted for the progress total.
COUNT_LINES_BYTES = 1 << 30


def _row_estimate(path: Path, reader: str) -> int | None:
    """About how many rows the file holds, for the progress bar's total and ETA: the
    line count of a text file up to :data:`COUNT_LINES_BYTES` (less a header line for
    delimited formats), the row count a Parquet file records; None when unknown."""
    try:
        if reader == "parquet":
            import pyarrow.parquet as pq
            return int(pq.ParquetFile(path).metadata.num_rows)
        if path.stat().st_size > COUNT_LINES_BYTES or path.suffix.lower() in (".gz", ".bz2", ".xz", ".zip"):
            return None
        lines, last = 0, b"\n"
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        lines += last != b"\n"  # a last line without a newline
        return max(0, lines - (reader in ("csv", "tsv", "recbole")))
    except (OSError, ValueError, ImportError):
        return None


def ingest_file(engine: "Engine", path: str | Path, kind: str, *, format: str | None = None,
                mapping: Mapping[str, str | None] | None = None, on_error: str = "fail",
                interaction_kind: str | None = None, image_template: str | None = None,
                image_root: str | Path | None = None, batch_size: int = DEFAULT_BATCH,
                max_errors: int = 20, include_forgotten: bool = False) -> IngestReport:
    """Ingest one file of ``kind``; see the module docstring for the guarantees."""
    path = Path(path).expanduser()
    if kind == "kg" and path.suffix.lower() == ".link":
        kind = "links"
    if kind not in KINDS:
        raise ConfigError(f"unknown ingest kind '{kind}' (kinds: {', '.join(KINDS)})")
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {', '.join(ON_ERROR)}, not '{on_error}'")
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    file = str(path)
    reader = pick_reader(engine.registry("readers"), path, format)
    try:
        columns, rows = _columns(reader, path)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise _unreadable(exc, file) from exc
    fields = resolve_mapping(kind, columns, mapping, file=file)
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    kinds = interactions.known_kinds(engine) if kind == "interactions" else ()
    parser = _Parser(kind, fields, columns, file,
                     _Options(interaction_kind, image_template, root, kinds))
    report = IngestReport(kind=kind, file=file, format=reader.name, mapping=fields)
    started = time.perf_counter()

    records: list[dict[str, Any]] = []
    errors: list[ValidationError] = []
    bar = progress_bar(rows, total=_row_estimate(path, reader.name) if engine.progress else None,
                       desc=f"{kind} {path.name}", unit="rows", enabled=bool(engine.progress),
                       leave=False)
    try:
        for row in bar:
            report.rows += 1
            try:
                records.append(parser.parse(row))
            except ValidationError as exc:
                errors.append(exc)
    except (UnicodeDecodeError, csv.Error) as exc:  # the reader cannot go on
        raise _unreadable(exc, file) from exc  # decoding is buffered: no exact row

    tag = engine.services.feedback().tag_experiments if kind == "interactions" else None
    with engine.store.session() as session:  # one transaction: all or (with fail) nothing
        writer = _Writer(session, parser, batch_size, source=path.name, tag=tag)
        lookups: dict[str, int] = {}
        if kind in ("interactions", "users") and records:
            records = _without_forgotten(session, kind, records, report, include_forgotten)
        if kind in ("interactions", "links") and records:
            lookups, unknown = writer.unknown_items(records)
            if unknown:
                bad_rows = {e.row for e in unknown}
                records = [r for r in records if _get(r, "row") not in bad_rows]
                errors = sorted(errors + unknown, key=lambda e: e.row or 0)
        if errors and on_error == "fail":
            first = errors[0]
            more = f" ({len(errors):,} bad rows in all; nothing was written)" if len(errors) > 1 \
                else " (nothing was written)"
            raise ValidationError(first.reason + more, file=first.file, row=first.row,
                                  field=first.field)
        # the rows were read and checked; writing 10M of them takes minutes: show it
        with progress_bar(total=len(records), desc=f"{kind} {path.name}: writing", unit="rows",
                          enabled=bool(engine.progress) and len(records) >= WRITE_PROGRESS_ROWS,
                          leave=False) as written:
            writer.progress = written.update
            report.written, report.new = writer.write(kind, records, lookups) if records \
                else (0, 0)
        if kind == "items" and any(r.get("image") and not images.is_url(r["image"])
                                   for r in records):
            images.record_root(session, root)  # the admin serves images from under it
    first_new = writer.stored.first_new_id if writer.stored is not None else None
    if first_new is not None:  # committed: now the feedback learners see the new events
        engine.services.interactions_stored(first_new - 1, total=report.new)
    report.skipped = len(errors)
    report.errors = [_error_dict(e) for e in errors[:max_errors]]
    report.seconds = time.perf_counter() - started
    return report


def ingest(engine: "Engine", path: str | Path, kind: str, *, links: str | Path | None = None,
           **options: Any) -> IngestReport:
    """Ingest ``path``; for ``kind="kg"`` also a ``links`` file (item -> entity), in a
    second transaction after the triples. Options as for :func:`ingest_file`."""
    report = ingest_file(engine, path, kind, **options)
    if links is not None:
        link_opts = {k: v for k, v in options.items() if k in ("on_error", "batch_size",
                                                                 "max_errors")}
        report.links = ingest_file(engine, links, "links", **link_opts)
    return report
