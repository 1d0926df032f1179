"""The one writer of interactions: every event is checked and stored here.

``Engine.add_interactions``, ``Engine.feedback`` / ``feedback_many`` (and so the HTTP
``/feedback`` routes, through :meth:`polyrec.feedback.events.FeedbackHub.record`) and
file ingestion (``polyrec ingest interactions``, engine/ingest/files.py) all use
:func:`check_event` and :func:`store_events`, so they accept and refuse the same events
with the same messages and store them under the same dedup rule.

The checks (:func:`check_event`): a user id and an item id (an external id, not blank);
a kind among the known ones (DEFAULT_KIND_WEIGHTS plus the kinds added in the feedback
setting ``kind_weights``; case and surrounding spaces are ignored); no field but
EVENT_FIELDS (a misspelt key is refused, as HTTP's schema refuses it); ``value`` and ``ts``
finite numbers (``ts`` may also be a datetime or an ISO 8601 string, and lies in
[MIN_TS, MAX_TS): 1970-01-01 to 2200-01-01 UTC); a ``rating`` has a
value; ``context`` a JSON-able mapping. Items must exist: an event naming an unknown
item is refused (:func:`unknown_items_error`); users are created on first sight.

The dedup rule (:func:`dedup_keys`): an event whose context carries an ``event_id`` is
that id (retries are idempotent); any other event is its content (user, item, kind, ts,
value) and its occurrence number among identical events of the same batch, so genuine
repeats within a batch are all kept and writing the same batch again adds nothing. The
live paths (add_interactions, feedback, HTTP) stamp an event that has no ``ts`` with the
time it arrives (so two clicks at different moments are two events); a file row without
a time keeps ``ts`` out of its key (re-ingesting the file is idempotent) and is stored
with the time of ingestion.

After the transaction commits, the feedback learners see the new events: the live paths
hand them over at once (``FeedbackHub.observe``), file ingestion through
``engine.services.interactions_stored(after_id)``. Inside the transaction the active
experiments tag each event's context with the user's variants (``tag``).
"""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

from sqlalchemy import Connection, bindparam, select

from polyrec.errors import NotFoundError, ValidationError
from polyrec.store import catalog
from polyrec.store.ids import BadId, check_id, is_missing_id, shown as shown_id
from polyrec.store.models import Interaction, Item, User

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine

log = logging.getLogger("polyrec.ingest")

#: The fields of an event (dict keys of the Python API, HTTP and file mappings).
EVENT_FIELDS = ("user", "item", "kind", "value", "ts", "context")
_EVENT_KEYS = frozenset(EVENT_FIELDS)
DEFAULT_KIND = "click"
_IN_CHUNK = 900  # stay under SQLite's bound-parameter limit

#: ``tag(conn, {user id: external id}) -> {user id: {experiment: variant}}``
Tagger = Callable[[Connection, Mapping[int, str]], Mapping[int, Mapping[str, str]]]


# -- value conversion ----------------------------------------------------------------------
class BadValue(Exception):
    """A value that cannot be converted; becomes a ValidationError naming its field."""


def is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def to_id(value: Any) -> str:
    """An external id by the one rule of engine/store/ids.py (integral floats lose their
    '.0'); BadValue saying why otherwise."""
    try:
        return check_id(value)
    except BadId as exc:
        raise BadValue(str(exc)) from None


def _shown(value: Any) -> str:
    """A value in an error message, alike whether it came as text (a file) or not."""
    return repr(value if isinstance(value, str) else str(value))


def to_number(value: Any) -> float:
    """A finite float from a number or numeric text (booleans are refused)."""
    if isinstance(value, bool):
        raise BadValue(f"not a number: {_shown(value)}")
    if isinstance(value, (int, float, Decimal)):
        out = float(value)
    else:
        try:
            out = float(str(value).strip())
        except ValueError:
            raise BadValue(f"not a number: {_shown(value)}") from None
    if not math.isfinite(out):
        raise BadValue(f"not a finite number: {_shown(value)}")
    return out


#: The event times accepted (epoch seconds): from 1970-01-01 (0) up to, not including,
#: 2200-01-01 UTC. A time outside (a year of 3 million, milliseconds taken for seconds)
#: is refused on every path; pages that show stored times never fail on one.
MIN_TS = 0.0
MAX_TS = 7_258_118_400.0
TS_RANGE = "1970-01-01 .. 2200-01-01 UTC"


def to_timestamp(value: Any) -> float:
    """Epoch seconds from a number, a datetime/date, or an ISO 8601 string (dates and
    naive times are taken as UTC), within [MIN_TS, MAX_TS)."""
    ts = _timestamp(value)
    if not MIN_TS <= ts < MAX_TS:
        hint = (" (epoch seconds are expected; this looks like milliseconds)"
                if MAX_TS * 1000 > ts >= 1e11 else "")
        raise BadValue(f"timestamp {_shown(value)} is outside {TS_RANGE}{hint}")
    return ts


def _timestamp(value: Any) -> float:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc).timestamp()
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return to_number(value)  # a non-finite number says so
    try:
        return to_number(value)
    except BadValue:
        pass
    text = str(value).strip()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise BadValue(f"not a timestamp (epoch seconds or ISO date): {_shown(value)}") from None
    return _timestamp(parsed)


# -- checking ------------------------------------------------------------------------------
class CheckedEvent(NamedTuple):
    """An event that passed :func:`check_event`. ``ts`` is None only for a file row
    without a time; ``row`` is the event's 1-based position in its batch or file.
    (A named tuple: one per row of a file of millions, made twice as fast as a frozen
    dataclass.)"""

    user: str
    item: str
    kind: str
    value: float | None
    ts: float | None
    context: dict[str, Any] | None
    row: int


def known_kinds(engine: "Engine") -> Mapping[str, float]:
    """The event kinds accepted by this engine's database, with their weights: the
    defaults (catalog.DEFAULT_KIND_WEIGHTS) plus those of the feedback setting
    ``kind_weights`` (``polyrec feedback config --set kind_weights.like=1``)."""
    return engine.services.feedback().config["kind_weights"]


def check_event(event: Mapping[str, Any], *, row: int, kinds: Iterable[str], source: str,
                fields: Mapping[str, str] | None = None, default_kind: str = DEFAULT_KIND,
                now: float | None = None) -> CheckedEvent:
    """Check one event (a mapping of EVENT_FIELDS) or raise a ValidationError naming
    ``source`` (the API, or the file), ``row`` and the field. ``fields`` renames fields
    in errors (a file's column names); ``now`` stamps an event without ``ts`` (the live
    paths), None leaves its ``ts`` None (a file row)."""
    if type(event) is not dict and not isinstance(event, Mapping):
        raise ValidationError(f"an event is a mapping of {', '.join(EVENT_FIELDS)}, not "
                              f"{type(event).__name__}", file=source, row=row)
    # one row of a file of millions comes through here: no closures, no copies per call
    if not event.keys() <= _EVENT_KEYS:
        key = next(k for k in event if k not in _EVENT_KEYS)
        raise ValidationError(f"unknown field {str(key)!r} of an event (known: "
                              f"{', '.join(EVENT_FIELDS)})", file=source, row=row,
                              field=(fields or {}).get(str(key), str(key)))
    get = event.get
    ids = []
    for name in ("user", "item"):
        raw = get(name)
        if is_missing_id(raw):
            raise _bad(source, row, fields, name, f"missing {name} id")
        try:
            ids.append(to_id(raw))
        except BadValue as exc:
            raise _bad(source, row, fields, name, str(exc)) from None
    raw_kind = get("kind")
    kind = default_kind if is_blank(raw_kind) else str(raw_kind).strip().lower()
    if type(kinds) not in (dict, list, tuple, set, frozenset):
        kinds = list(kinds)
    if kind not in kinds:
        raise _bad(source, row, fields, "kind",
                   f"unknown event kind {shown_id(kind)} (known: {', '.join(kinds)})")
    kind = sys.intern(kind)  # one string per kind, not one per event of a large file
    value = _convert(get("value"), to_number, source, row, fields, "value")
    ts = _convert(get("ts"), to_timestamp, source, row, fields, "ts")
    if ts is None:
        ts = now
    if kind == "rating" and value is None:
        raise _bad(source, row, fields, "value", "a rating needs a value")
    context = get("context")
    if context is not None:
        if not isinstance(context, Mapping):
            raise _bad(source, row, fields, "context", "context must be a mapping")
        context = dict(context)
        try:
            json.dumps(context, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise _bad(source, row, fields, "context", f"context is not JSON: {exc}") from None
    return CheckedEvent(user=ids[0], item=ids[1], kind=kind, value=value, ts=ts,
                        context=context, row=row)


def _bad(source: str, row: int, fields: Mapping[str, str] | None, name: str,
         message: str) -> ValidationError:
    """The error of one field of an event (``fields`` renames it: a file's column)."""
    return ValidationError(message, file=source, row=row, field=(fields or {}).get(name, name))


def _convert(raw: Any, fn: Callable[[Any], float], source: str, row: int,
             fields: Mapping[str, str] | None, name: str) -> float | None:
    """``fn(raw)``, None for a blank value, the field's error for a bad one."""
    if is_blank(raw):
        return None
    try:
        return fn(raw)
    except BadValue as exc:
        raise _bad(source, row, fields, name, str(exc)) from None


def dedup_keys(events: Sequence[CheckedEvent]) -> list[str]:
    """The dedup key of each event, by the rule in the module docstring."""
    return list(iter_dedup_keys(events))


def iter_dedup_keys(events: Iterable[CheckedEvent]) -> Iterator[str]:
    """:func:`dedup_keys` one at a time (a large file's keys need not all be held)."""
    seen: dict[tuple[Any, ...], int] = {}
    for e in events:
        ext = (e.context or {}).get("event_id")
        if ext is not None:
            yield catalog.interaction_key("event", str(ext), "", 0.0, None)
            continue
        ident = (e.user, e.item, e.kind, e.ts, e.value)
        seen[ident] = occurrence = seen.get(ident, -1) + 1
        yield catalog.interaction_key(*ident, occurrence=occurrence)


def unknown_items_error(unknown: Sequence[str]) -> NotFoundError:
    """The error of the live paths for events naming items that are not in the catalogue."""
    shown = ", ".join(shown_id(u) for u in list(unknown)[:5])
    return NotFoundError(f"unknown item {shown}: events must name items of the catalogue "
                         "(add them first with add_items or `polyrec ingest items`); "
                         "nothing was stored")


# -- storing -------------------------------------------------------------------------------
@dataclass
class IdCache:
    """external id -> internal id of users and items already seen (a FeedbackHub keeps
    one across calls; a stale entry shows up as an IntegrityError: clear and retry)."""

    users: dict[str, int] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)

    def clear(self) -> None:
        self.users.clear()
        self.items.clear()


@dataclass
class Stored:
    """What :func:`store_events` wrote: per event, its internal user and item ids, the
    stored row (context with experiment tags, ts) and its id; ``new`` says whether the
    row is new (else its dedup key was stored before: ``id`` is that row's, 0 when not
    looked up). Without ``keep`` (a file: millions of events) the per-event lists stay
    empty and only the counts are kept."""

    events: list[CheckedEvent]
    rows: list[dict[str, Any]]
    ids: list[int]
    new: list[bool]
    new_total: int = 0
    first_new: int | None = None

    @property
    def new_count(self) -> int:
        return self.new_total

    @property
    def first_new_id(self) -> int | None:
        return self.first_new


_STATEMENTS: dict[tuple[str, str], Any] = {}


def _statement(conn: Connection, name: str) -> Any:
    """Statements compiled once per dialect (expanding IN parameters)."""
    key = (conn.dialect.name, name)
    stmt = _STATEMENTS.get(key)
    if stmt is None:
        if name in ("items", "users"):
            model = Item if name == "items" else User
            stmt = select(model.external_id, model.id).where(
                model.external_id.in_(bindparam("ids", expanding=True)))
        elif name == "new_user":
            stmt = catalog.dialect_insert(conn, User.__table__).on_conflict_do_nothing(
                index_elements=["external_id"])
        elif name == "insert":
            stmt = (catalog.dialect_insert(conn, Interaction.__table__)
                    .on_conflict_do_nothing(index_elements=["dedup_key"])
                    .returning(Interaction.id, Interaction.dedup_key))
        elif name == "old":
            stmt = select(Interaction.dedup_key, Interaction.id).where(
                Interaction.dedup_key.in_(bindparam("keys", expanding=True)))
        _STATEMENTS[key] = stmt
    return stmt


def _chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), n):
        yield seq[start:start + n]


def item_ids(conn: Connection, externals: Iterable[str], cache: IdCache | None = None) -> dict[str, int]:
    """external id -> internal id of the catalogue items among ``externals``."""
    cache = cache if cache is not None else IdCache()
    wanted = sorted(set(externals))
    missing = [i for i in wanted if i not in cache.items]
    for chunk in _chunks(missing, _IN_CHUNK):
        cache.items.update(conn.execute(_statement(conn, "items"), {"ids": list(chunk)}).all())
    return {i: cache.items[i] for i in wanted if i in cache.items}


def _user_ids(conn: Connection, externals: Iterable[str], cache: IdCache, now: float) -> None:
    wanted = list(dict.fromkeys(externals))  # order of first appearance: reproducible ids
    new_users = [u for u in wanted if u not in cache.users]
    if not new_users:
        return
    conn.execute(_statement(conn, "new_user"), [
        {"external_id": u, "attributes": {}, "created_at": now, "updated_at": now}
        for u in new_users])
    for chunk in _chunks(new_users, _IN_CHUNK):
        cache.users.update(conn.execute(_statement(conn, "users"), {"ids": list(chunk)}).all())


# -- inserting rows ------------------------------------------------------------------------
#: the columns of an interaction row, in the order the bulk paths send them
_COLUMNS = ("user_id", "item_id", "kind", "value", "ts", "context", "dedup_key")
#: from this many rows PostgreSQL takes them through COPY (below: one INSERT per batch)
COPY_MIN_ROWS = 1000
_TEMP = "polyrec_new_interactions"
#: SQLite's page cache (KiB) while a large batch is inserted
SQLITE_CACHE_KIB = 256 * 1024


def _insert(conn: Connection, rows: Sequence[dict[str, Any]], batch: int) -> dict[str, int]:
    """Insert ``rows`` in the caller's transaction (a stored dedup key is left alone; ids
    assigned in row order); returns dedup key -> id of the rows that are new. SQLite:
    multi-row INSERTs with plain parameters; PostgreSQL through psycopg 3 with many
    rows: COPY into a temporary table, then one INSERT ... SELECT per batch; otherwise
    (psycopg2, SQLAlchemy's default driver when installed, has no ``cursor.copy``)
    SQLAlchemy's insert. The same rows and ids either way (tests/test_ingest_bulk.py
    compares them)."""
    if conn.dialect.name == "sqlite":
        return _insert_sqlite(conn, rows)
    if (conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg"
            and len(rows) >= COPY_MIN_ROWS):
        return _insert_copy(conn, rows, batch)
    new_ids: dict[str, int] = {}
    for chunk in _chunks(rows, batch):
        new_ids.update((k, i) for i, k in conn.execute(_statement(conn, "insert"), list(chunk)))
    return new_ids


def _json(value: Any) -> str:
    """A context as the JSON column stores it (SQLAlchemy's serializer: ``json.dumps``;
    None is the JSON ``null``, as the column's type writes it)."""
    return "null" if value is None else json.dumps(value)


def _sqlite_rows_per_statement(conn: Connection) -> int:
    """Rows per multi-row INSERT: SQLite's limit on bound parameters (32,766 by default
    since 3.32, 999 before) over the 7 columns, at most 4,000."""
    try:
        limit = conn.connection.driver_connection.getlimit(9)  # SQLITE_LIMIT_VARIABLE_NUMBER
    except Exception:  # noqa: BLE001 - no getlimit (Python < 3.11): assume the old limit
        limit = 999
    return max(1, min(4000, limit // len(_COLUMNS)))


def _insert_sqlite(conn: Connection, rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Multi-row ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` with the parameters
    flattened here (SQLAlchemy's per-row processing of the same statement cost more
    than SQLite's own work)."""
    n = _sqlite_rows_per_statement(conn)
    # a page cache for the random inserts into the dedup-key index (SQLite's default is
    # 2 MB), for this transaction only
    cache = conn.exec_driver_sql("PRAGMA cache_size").scalar()
    if len(rows) > n and cache is not None and -int(cache) < SQLITE_CACHE_KIB:
        conn.exec_driver_sql(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
    try:
        return _insert_sqlite_rows(conn, rows, n)
    finally:
        if cache is not None:
            try:
                conn.exec_driver_sql(f"PRAGMA cache_size = {int(cache)}")
            except Exception:  # noqa: BLE001 - never hide the insert's own error
                log.debug("SQLite page cache not restored", exc_info=True)


def _insert_sqlite_rows(conn: Connection, rows: Sequence[dict[str, Any]], n: int
                        ) -> dict[str, int]:
    head = f"INSERT INTO interactions ({', '.join(_COLUMNS)}) VALUES "
    tail = " ON CONFLICT (dedup_key) DO NOTHING RETURNING id, dedup_key"
    one = "(" + ", ".join("?" * len(_COLUMNS)) + ")"
    sql: dict[int, str] = {}
    new_ids: dict[str, int] = {}
    for chunk in _chunks(rows, n):
        params: list[Any] = []
        for r in chunk:
            params += (r["user_id"], r["item_id"], r["kind"], r["value"], r["ts"],
                       _json(r["context"]), r["dedup_key"])
        stmt = sql.get(len(chunk))
        if stmt is None:
            stmt = sql[len(chunk)] = head + ", ".join([one] * len(chunk)) + tail
        new_ids.update((k, i) for i, k in conn.exec_driver_sql(stmt, tuple(params)))
    return new_ids


def _insert_copy(conn: Connection, rows: Sequence[dict[str, Any]], batch: int) -> dict[str, int]:
    """PostgreSQL: each batch COPYed into a temporary table (gone at commit), then
    ``INSERT ... SELECT ... ORDER BY`` the row's position ``ON CONFLICT DO NOTHING
    RETURNING`` (ids in row order, as a multi-row INSERT assigns them)."""
    conn.exec_driver_sql(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {_TEMP} (seq integer, user_id integer, "
        "item_id integer, kind text, value double precision, ts double precision, "
        "context text, dedup_key text) ON COMMIT DROP")
    insert = (f"INSERT INTO interactions ({', '.join(_COLUMNS)}) "
              "SELECT user_id, item_id, kind, value, ts, CAST(context AS json), dedup_key "
              f"FROM {_TEMP} ORDER BY seq ON CONFLICT (dedup_key) DO NOTHING "
              "RETURNING id, dedup_key")
    raw = conn.connection.driver_connection
    new_ids: dict[str, int] = {}
    for chunk in _chunks(rows, max(batch, COPY_MIN_ROWS)):
        conn.exec_driver_sql(f"TRUNCATE {_TEMP}")
        with raw.cursor() as cur:
            with cur.copy(f"COPY {_TEMP} (seq, {', '.join(_COLUMNS)}) FROM STDIN") as copy:
                for seq, r in enumerate(chunk):
                    copy.write_row((seq, r["user_id"], r["item_id"], r["kind"], r["value"],
                                    r["ts"], _json(r["context"]), r["dedup_key"]))
        new_ids.update((k, i) for i, k in conn.exec_driver_sql(insert))
    return new_ids


#: events made into rows and inserted at a time: a file's rows are never all held at once
PART = 100_000


def store_events(conn: Connection, events: Sequence[CheckedEvent], *, now: float,
                 cache: IdCache | None = None, tag: Tagger | None = None,
                 old_ids: bool = False, batch: int = 5000, keep: bool = True,
                 progress: Callable[[int], None] | None = None) -> Stored:
    """Store checked events in the caller's transaction (``conn``): an event naming an
    unknown item raises :func:`unknown_items_error` (callers that report bad rows drop
    those first, see :func:`item_ids`), unknown users are created, ``tag`` adds the
    experiment variants to each context, and rows whose dedup key is already stored are
    left alone (``old_ids``: look up their ids). ``now``: the ts of events without one.
    The rows are made and inserted PART events at a time; ``keep=False`` (a file) keeps
    only the counts in the result, not a row per event; ``progress`` is told how many
    events each part stored."""
    cache = cache if cache is not None else IdCache()
    if not events:
        return Stored([], [], [], [])
    items = item_ids(conn, {e.item for e in events}, cache)
    unknown = sorted({e.item for e in events} - items.keys())
    if unknown:
        raise unknown_items_error(unknown)
    _user_ids(conn, (e.user for e in events), cache, now)
    variants = dict(tag(conn, {cache.users[u]: u for u in dict.fromkeys(e.user for e in events)})
                    if tag is not None else {})
    stored = Stored(list(events) if keep else [], [], [], [])
    keys = iter_dedup_keys(events)
    inserted: dict[str, int] = {}  # every new key's id (kept with ``keep`` only)
    for start in range(0, len(events), PART):
        rows = []
        for e in events[start:start + PART]:
            uid = cache.users[e.user]
            context = e.context
            if variants.get(uid):
                context = dict(context or {})
                context.setdefault("experiments", dict(variants[uid]))
            rows.append({"user_id": uid, "item_id": items[e.item], "kind": e.kind,
                         "value": e.value, "ts": e.ts if e.ts is not None else now,
                         "context": context, "dedup_key": next(keys)})
        new_ids = _insert(conn, rows, batch)  # the keys this part's rows added
        found: dict[str, int] = {}
        if old_ids:
            old = [r["dedup_key"] for r in rows if r["dedup_key"] not in new_ids]
            for chunk in _chunks(old, _IN_CHUNK):
                found.update(conn.execute(_statement(conn, "old"), {"keys": list(chunk)}).all())
        # a key repeated within the batch (the same event_id twice) is new once only:
        # in this part, the first of its rows; in a later part the insert added nothing
        first: dict[str, int] = {}
        for n, r in enumerate(rows):
            key = r["dedup_key"]
            is_new = key in new_ids and first.setdefault(key, n) == n
            if is_new:
                stored.new_total += 1
                if stored.first_new is None or new_ids[key] < stored.first_new:
                    stored.first_new = new_ids[key]
            if keep:
                stored.new.append(is_new)
        if progress is not None:
            progress(len(rows))
        if keep:
            inserted.update(new_ids)
            stored.rows += rows
            stored.ids += [inserted.get(r["dedup_key"], found.get(r["dedup_key"], 0))
                           for r in rows]
    return stored
