"""The encoding pipeline: catalogue items -> cached vectors, one encoder at a time.

For every encoder the pipeline computes each item's content (``Encoder.content``) and its
sha256; a stored vector whose encoder fingerprint and content hash both match is kept,
everything else with content is encoded in chunks and written through engine/store/vectors.py
(one transaction per chunk, so an interrupted run keeps its progress). Encoders are
loaded (``prepare``) only when something may need encoding, so an image encoder without
weights costs nothing on a catalogue without images.

The options each encoder was last run with are remembered in the store (meta table), so
``get_encoder`` rebuilds the same configured encoder later (for search queries), and a
run that names no options for an encoder reuses them.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from sqlalchemy import delete, func, select

from polyrec.store import vectors
from polyrec.contracts import EncodeResult, Encoder, EncoderContext, ItemView
from polyrec.errors import ConfigError, EncodingError, PolyrecError
from polyrec.progress import progress_bar
from polyrec.store.models import ItemVector, Meta
from polyrec.store.pgvector import build_tables

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine

#: Items handed to ``Encoder.encode`` at once (and written in one transaction).
CHUNK_ITEMS = 1024
_OPTIONS_KEY = "encoder_options:{}"


@dataclass
class EncoderReport:
    """What one encoder did in one run."""

    encoder: str
    modality: str
    items: int = 0  # catalogue size
    encoded: int = 0  # vectors written this run
    cached: int = 0  # unchanged items whose stored vector was kept
    no_content: int = 0  # items with nothing for this modality (no vector)
    removed: int = 0  # stale vectors deleted (the item lost its content, or now fails)
    failed: dict[str, str] = field(default_factory=dict)  # external id -> reason
    loaded: bool = False  # whether the model was prepared at all
    fingerprint: str | None = None
    seconds: float = 0.0  # wall time for this encoder, loading included
    encode_seconds: float = 0.0  # time spent in Encoder.encode
    options: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # the encoder could not be loaded or crashed

    @property
    def items_per_second(self) -> float:
        return self.encoded / self.encode_seconds if self.encode_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["items_per_second"] = round(self.items_per_second, 2)
        return out


@dataclass
class EncodeReport:
    """Per-encoder results of ``Engine.encode``."""

    encoders: list[EncoderReport] = field(default_factory=list)
    #: pgvector tables of the encoders run (PostgreSQL with pgvector only; see
    #: polyrec.store.pgvector.build_tables): encoder, dim, table, built, seconds
    pgvector: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, name: str) -> EncoderReport:
        for rep in self.encoders:
            if rep.encoder == name:
                return rep
        raise KeyError(name)

    @property
    def encoded(self) -> int:
        return sum(r.encoded for r in self.encoders)

    @property
    def errors(self) -> dict[str, str]:
        return {r.encoder: r.error for r in self.encoders if r.error}

    def as_dict(self) -> dict[str, Any]:
        return {"encoders": [r.as_dict() for r in self.encoders], "encoded": self.encoded,
                "errors": self.errors, "pgvector": self.pgvector}


def content_hash(content: str) -> str:
    """sha256 hex digest of an item's content string."""
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


# -- remembered options -------------------------------------------------------------------
def stored_options(engine: "Engine", name: str) -> dict[str, Any] | None:
    """The options ``name`` was last encoded with; None when it never ran here."""
    with engine.store.session() as s:
        raw = s.execute(select(Meta.value).where(Meta.key == _OPTIONS_KEY.format(name))).scalar()
    return json.loads(raw) if raw is not None else None


def _save_options(engine: "Engine", name: str, options: Mapping[str, Any]) -> None:
    key, value = _OPTIONS_KEY.format(name), json.dumps(dict(options), sort_keys=True)
    with engine.store.session() as s:
        s.execute(delete(Meta).where(Meta.key == key))
        s.add(Meta(key=key, value=value))


def _cache(engine: "Engine") -> dict[tuple[str, str, str], Encoder]:
    return engine._encoders


def encode_lock(engine: "Engine") -> threading.RLock:
    """The Engine's encoding lock: encoding runs (``encode``, ``encode_items``) hold it,
    so the prepared encoders they share are never used by two threads at once."""
    lock = engine.__dict__.get("_encode_lock")
    if lock is None:
        lock = engine.__dict__.setdefault("_encode_lock", threading.RLock())
    return lock


def _cache_key(engine: "Engine", name: str, options: Mapping[str, Any]) -> tuple[str, str, str]:
    return name, json.dumps(dict(options), sort_keys=True, default=str), str(engine.device)


def get_encoder(engine: "Engine", name: str) -> Encoder:
    """A prepared encoder configured with the options it was last encoded with (defaults
    when it never ran); kept on the engine so later calls reuse the loaded model."""
    options = stored_options(engine, name) or {}
    key = _cache_key(engine, name, options)
    cache = _cache(engine)
    if key not in cache:
        enc = engine.registry("encoders").get(name)(**options)
        enc.prepare(EncoderContext(engine=engine, device=engine.device, progress=engine.progress))
        cache[key] = enc
    return cache[key]


# -- encoding ----------------------------------------------------------------------------
def _names(engine: "Engine", encoders: str | Iterable[str] | None,
           options: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The encoders to run: the named ones, or by default every registered encoder but
    the one of a stand-in pair that is not in use (engine/encode/selection.py), unless
    options are given for it."""
    registry = engine.registry("encoders")
    if encoders is None:
        from polyrec.encode.selection import passed_over
        skip = passed_over(engine, options) - set(options)
        return [n for n in registry.names() if n not in skip]
    if isinstance(encoders, str):
        encoders = encoders.split(",")
    names = list(dict.fromkeys(n.strip() for n in encoders if n and n.strip()))
    for n in names:
        registry.get(n)  # NotFoundError naming the known encoders
    return names or _names(engine, None, options)


def encode(engine: "Engine", encoders: str | Iterable[str] | None = None, *, force: bool = False,
           batch_size: int | None = None, options: Mapping[str, Mapping[str, Any]] | None = None,
           dtype: str = "float16", runner: "Runner | None" = None) -> EncodeReport:
    """Encode the catalogue with the named encoders (by default all registered ones, of
    a stand-in pair such as clip / image_cnn only the one in use).

    ``options`` maps encoder name -> keyword options; an encoder given none reuses the
    options of its last run. Errors of one encoder (it cannot load its model) are recorded
    in its report and the others still run. ``runner`` encodes and stores the items that
    need it (default :func:`run_locally`; polyrec.cluster.encode hands them to Ray): the
    cache rules, which items are encoded, stay here."""
    if dtype not in vectors.DTYPES:
        raise ConfigError(f"vector dtype must be one of {sorted(vectors.DTYPES)}, not '{dtype}'")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size must be positive, not {batch_size}")
    options = dict(options or {})
    names = _names(engine, encoders, options)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ConfigError(f"options given for encoder(s) not being run: {', '.join(unknown)}")
    registry = engine.registry("encoders")
    with encode_lock(engine):  # one encoding run at a time (encode on arrival included)
        planned: list[tuple[str, Encoder, dict[str, Any], dict[str, Any] | None]] = []
        for name in names:  # bad options fail before any work
            previous = stored_options(engine, name)
            opts = dict(options[name]) if name in options else dict(previous or {})
            reuse = _cache(engine).get(_cache_key(engine, name, opts))  # already loaded here
            planned.append((name, reuse or registry.get(name)(**opts), opts, previous))
        items = engine.items()
        report = EncodeReport()
        for name, enc, opts, previous in planned:
            report.encoders.append(_encode_one(engine, name, enc, opts, previous, items,
                                               force=force, batch_size=batch_size, dtype=dtype,
                                               runner=runner or run_locally))
        # PostgreSQL with pgvector: the tables dense search reads, built now rather than
        # at the first search (kept in step by their trigger from then on)
        report.pgvector = build_tables(engine.store, names, progress=engine.progress)
    if report.encoded:  # this process's recommender and searcher read them at once
        engine.services.vectors_changed(report)
    return report


def _encode_one(engine: "Engine", name: str, enc: Encoder, opts: dict[str, Any],
                previous: dict[str, Any] | None, items: Sequence[ItemView], *, force: bool,
                batch_size: int | None, dtype: str, runner: "Runner") -> EncoderReport:
    start = time.perf_counter()
    rep = EncoderReport(encoder=name, modality=enc.modality, items=len(items), options=opts)
    ctx = EncoderContext(engine=engine, device=engine.device, batch_size=batch_size,
                         progress=engine.progress)
    hashes: dict[int, str] = {}
    salt = enc.content_salt(ctx)
    for item in items:
        content = enc.content(item)
        if content is None:
            rep.no_content += 1
        else:
            hashes[item.id] = content_hash(f"{salt}\x1e{content}" if salt else content)
    with engine.store.session() as s:
        cached = vectors.cached_keys(s, name)
        stale = [i for i in cached if i not in hashes]
        vectors.delete_vectors(s, name, stale)
    rep.removed = len(stale)
    changed = [i for i in hashes if force or i not in cached or cached[i][1] != hashes[i]]
    fingerprints = {cached[i][0] for i in hashes if i in cached}
    if hashes and (changed or opts != previous or len(fingerprints) > 1):
        try:
            enc.prepare(ctx)
            rep.fingerprint = enc.fingerprint()
        except PolyrecError as exc:
            rep.error, rep.seconds = str(exc), time.perf_counter() - start
            return rep
        except Exception as exc:  # noqa: BLE001 - a plugin's own failure, reported
            rep.error = f"encoder '{name}' failed to load: {type(exc).__name__}: {exc}"
            rep.seconds = time.perf_counter() - start
            return rep
        rep.loaded = True
        _save_options(engine, name, opts)
        _cache(engine)[_cache_key(engine, name, opts)] = enc
        todo = [it for it in items if it.id in hashes
                and (force or cached.get(it.id) != (rep.fingerprint, hashes[it.id]))]
    else:
        todo = []
    rep.cached = len(hashes) - len(todo)
    runner(engine, name, enc, ctx, todo, hashes, rep, cached, dtype)
    rep.seconds = time.perf_counter() - start
    return rep


#: Encodes ``todo`` and stores the vectors: (engine, encoder name, prepared encoder,
#: context, todo, content hashes by item id, report, cached keys, dtype) -> None.
Runner = Callable[["Engine", str, Encoder, EncoderContext, Sequence[ItemView], Mapping[int, str],
                   EncoderReport, Mapping[int, Any], str], None]


def run_locally(engine: "Engine", name: str, enc: Encoder, ctx: EncoderContext,
                todo: Sequence[ItemView], hashes: Mapping[int, str], rep: EncoderReport,
                cached: Mapping[int, Any], dtype: str) -> None:
    """Encode ``todo`` chunk by chunk in this process, writing each chunk's vectors in one
    transaction (:func:`store_chunk`)."""
    if not todo:
        return
    external = {it.id: it.external_id for it in todo}
    chunk = max(CHUNK_ITEMS, 8 * (ctx.batch_size or 0))
    bar = progress_bar(total=len(todo), desc=f"encode {name}", unit="item",
                       enabled=bool(ctx.progress))
    try:
        for lo in range(0, len(todo), chunk):
            part = todo[lo:lo + chunk]
            t0 = time.perf_counter()
            try:
                result = enc.encode(part, ctx)
            except PolyrecError as exc:
                rep.error = str(exc)
                return
            except Exception as exc:  # noqa: BLE001 - keep what was stored so far
                rep.error = f"encoder '{name}' failed while encoding: {type(exc).__name__}: {exc}"
                return
            rep.encode_seconds += time.perf_counter() - t0
            store_chunk(engine, name, [it.id for it in part], result, hashes, rep, cached,
                        dtype, external)
            bar.update(len(part))
    finally:
        bar.close()



def store_chunk(engine: "Engine", name: str, ids: Sequence[int], result: EncodeResult,
                hashes: Mapping[int, str], rep: EncoderReport, cached: Mapping[int, Any],
                dtype: str, external: Mapping[int, str]) -> None:
    """Write the vectors ``result`` holds for the items ``ids`` in one transaction; items
    it failed or left out lose any stored vector of this encoder (recorded in ``rep``)."""
    if result.vectors.shape[0] != len(result.item_ids):
        raise EncodingError(f"encoder '{name}' returned {result.vectors.shape[0]} "
                            f"vectors for {len(result.item_ids)} items")
    missing = set(ids) - set(result.item_ids) - set(result.failed)
    failed = dict(result.failed) | {i: "the encoder returned no vector" for i in missing}
    with engine.store.session() as s:
        rep.encoded += vectors.save_vectors(
            s, name, rep.fingerprint or "", [(i, hashes[i]) for i in result.item_ids],
            result.vectors, dtype=dtype)
        old = [i for i in failed if i in cached]
        vectors.delete_vectors(s, name, old)  # never keep a vector of other content
    rep.removed += len(old)
    rep.failed.update({external[i]: reason for i, reason in failed.items()})


# -- a few items at a time (encode on arrival) ----------------------------------------------
def stored_encoders(engine: "Engine") -> list[str]:
    """Registered encoders that have vectors in the store (the ones in use here)."""
    with engine.store.session() as s:
        stored = set(s.execute(select(ItemVector.encoder).distinct()).scalars())
    return [n for n in engine.registry("encoders").names() if n in stored]


def _stored_keys(session: Any, name: str, ids: Sequence[int]) -> dict[int, tuple[str, str]]:
    """item id -> (fingerprint, content hash) of ``name``'s stored vectors of ``ids``."""
    out: dict[int, tuple[str, str]] = {}
    for lo in range(0, len(ids), 900):
        rows = session.execute(select(ItemVector.item_id, ItemVector.fingerprint,
                                      ItemVector.content_hash)
                               .where(ItemVector.encoder == name)
                               .where(ItemVector.item_id.in_(list(ids[lo:lo + 900]))))
        out.update({item: (fp, ch) for item, fp, ch in rows})
    return out


def _newest_fingerprint(session: Any, name: str) -> str | None:
    newest = session.execute(select(func.max(ItemVector.id)).where(ItemVector.encoder == name)).scalar()
    if newest is None:
        return None
    return session.execute(select(ItemVector.fingerprint).where(ItemVector.id == newest)).scalar()


def encode_items(engine: "Engine", item_ids: Iterable[int],
                 encoders: Iterable[str] | None = None, *,
                 dtype: str = "float16") -> EncodeReport:
    """Encode just ``item_ids`` (internal ids of new or changed items) with the encoders
    that already have stored vectors (or ``encoders``), each configured with the options
    it was last run with. Only the given items are looked at: vectors of other items are
    never touched. An item whose stored vector matches its content is skipped; one that
    lost its content for an encoder loses that encoder's vector.

    The encoder's model is loaded only when something needs encoding, and kept with the
    ones ``encode`` loads; the run holds :func:`encode_lock`. An encoder whose model now
    gives another fingerprint than the stored vectors carry is not mixed in: its report
    names the error (run ``polyrec encode``)."""
    ids = sorted({int(i) for i in item_ids})
    names = stored_encoders(engine) if encoders is None else list(encoders)
    report = EncodeReport()
    if not ids or not names:
        return report
    with encode_lock(engine):
        _encode_items(engine, ids, names, report, dtype)
    return report


def _encode_items(engine: "Engine", ids: list[int], names: list[str], report: EncodeReport,
                  dtype: str) -> None:
    loaded = _cache(engine)
    items = engine.items(ids)
    registry = engine.registry("encoders")
    for name in names:
        start = time.perf_counter()
        opts = stored_options(engine, name) or {}
        key = _cache_key(engine, name, opts)
        rep = EncoderReport(encoder=name, modality="", items=len(items), options=opts)
        report.encoders.append(rep)
        try:
            enc = loaded.get(key) or registry.get(name)(**opts)
            rep.modality = str(enc.modality)
            ctx = EncoderContext(engine=engine, device=engine.device, progress=False)
            contents = {it.id: enc.content(it) for it in items}
            rep.no_content = sum(c is None for c in contents.values())
            salt = enc.content_salt(ctx) if rep.no_content < len(items) else ""
            hashes = {i: content_hash(f"{salt}\x1e{c}" if salt else c)
                      for i, c in contents.items() if c is not None}
            with engine.store.session() as s:
                cached = _stored_keys(s, name, ids)
                lost = [i for i in cached if i not in hashes]  # content removed
                vectors.delete_vectors(s, name, lost)
                stored_fp = _newest_fingerprint(s, name)
            rep.removed = len(lost)
            todo = [it for it in items if it.id in hashes
                    and (it.id not in cached or cached[it.id][1] != hashes[it.id])]
            rep.cached = len(hashes) - len(todo)
            if todo:
                if key not in loaded:
                    _prepare(enc, ctx)
                    loaded[key] = enc
                    rep.loaded = True
                rep.fingerprint = enc.fingerprint()
                if stored_fp is not None and rep.fingerprint != stored_fp:
                    rep.error = (f"encoder '{name}' now gives fingerprint {rep.fingerprint}, the "
                                 f"stored vectors carry {stored_fp}; run `polyrec encode`")
                else:
                    run_locally(engine, name, enc, ctx, todo, hashes, rep, cached, dtype)
        except PolyrecError as exc:
            rep.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a plugin's own failure, reported
            rep.error = f"encoder '{name}' failed: {type(exc).__name__}: {exc}"
        rep.seconds = time.perf_counter() - start


def _prepare(enc: Encoder, ctx: EncoderContext, attempts: int = 3) -> None:
    """``enc.prepare`` on a background thread, retried after an ImportError: importing
    a library (transformers) in two threads at once can fail in one of them."""
    for attempt in range(attempts):
        try:
            enc.prepare(ctx)
            return
        except ImportError:
            if attempt == attempts - 1:
                raise
            time.sleep(1.0 + attempt)
