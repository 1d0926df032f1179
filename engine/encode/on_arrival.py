"""Encode on arrival: items written through ``Engine.add_items`` (and ``PUT /items``) are
encoded in the background, so a new product is searchable and recommendable within
seconds instead of at the next ``polyrec encode``.

One :class:`ArrivalEncoder` per Engine (``engine.services.arrivals()``): a daemon thread
started on the first submission, fed by a set of pending item ids. Bursts coalesce: the
thread waits ``coalesce`` seconds after waking, then encodes everything pending (up to
``max_batch`` items) in one :func:`polyrec.encode.pipeline.encode_items` call, with the
encoders that already have stored vectors, configured as they were last run. Errors are
recorded (``status()``) and logged, never raised into the host: an encoder that fails as
a whole, and items an encoder could not encode (an image that cannot be read or
decoded), named with their reasons; ``close()`` stops and joins the
thread (``Engine.close`` calls it). ``wait(timeout)`` blocks until nothing is pending,
for tests and scripts.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.encode.pipeline import EncodeReport
    from polyrec.engine import Engine

#: errors kept for ``status()``
MAX_ERRORS = 50
#: failed items named in one error (the rest are counted)
NAMED_FAILURES = 5

log = logging.getLogger("polyrec.encode")


class ArrivalEncoder:
    """A background worker encoding newly stored items of one Engine."""

    def __init__(self, engine: "Engine", *, on_encoded: Callable[["EncodeReport"], Any] | None = None,
                 coalesce: float = 0.05, max_batch: int = 4096) -> None:
        self._engine = engine
        self._on_encoded = on_encoded
        self.coalesce = float(coalesce)
        self.max_batch = int(max_batch)
        self._cond = threading.Condition()
        self._pending: dict[int, None] = {}  # an ordered set of internal item ids
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.submitted = 0
        self.encoded = 0
        self.batches = 0
        self.failed = 0  # items an encoder could not encode (each encoder counts)
        self.last_seconds = 0.0
        self.errors: deque[dict[str, Any]] = deque(maxlen=MAX_ERRORS)

    # -- the host's side -----------------------------------------------------------------
    def submit(self, item_ids: Iterable[int]) -> None:
        """Queue items (internal ids) for encoding; starts the thread when needed."""
        ids = [int(i) for i in item_ids]
        if not ids:
            return
        with self._cond:
            if self._closed:
                return
            self._pending.update(dict.fromkeys(ids))
            self.submitted += len(ids)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="polyrec-encode-on-arrival")
                self._thread.start()
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted item was handled (encoded, skipped or failed);
        False when ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                if self._closed and (self._thread is None or not self._thread.is_alive()):
                    return not self._pending
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is None else min(left, 1.0))
        return True

    def close(self, timeout: float = 60.0) -> bool:
        """Stop taking work, let the batch in progress finish (up to ``timeout``), join.
        Items still pending are dropped (the next ``polyrec encode`` picks them up).
        True when the thread ended."""
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {"running": self._thread is not None and self._thread.is_alive(),
                    "pending": len(self._pending), "busy": self._busy,
                    "submitted": self.submitted, "encoded": self.encoded,
                    "failed": self.failed, "batches": self.batches, "last_seconds": round(self.last_seconds, 3),
                    "errors": list(self.errors)}

    # -- the worker ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._busy = True
            try:
                if self.coalesce > 0:
                    time.sleep(self.coalesce)  # let a burst of writes gather into one batch
                with self._cond:
                    if self._closed:
                        return
                    batch = list(self._pending)[:self.max_batch]
                    for i in batch:
                        del self._pending[i]
                self._encode(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _encode(self, batch: list[int]) -> None:
        from polyrec.encode.pipeline import encode_items
        start = time.perf_counter()
        try:
            report = encode_items(self._engine, batch)
        except BaseException as exc:  # noqa: BLE001 - recorded, never raised into the host
            self._error(None, f"{type(exc).__name__}: {exc}", batch,
                        traceback.format_exc(limit=5))
            return
        finally:
            self.last_seconds = time.perf_counter() - start
        self.batches += 1
        self.encoded += report.encoded
        for rep in report.encoders:
            if rep.error:
                self._error(rep.encoder, rep.error, batch)
            if rep.failed:
                self.failed += len(rep.failed)
                self._error(rep.encoder, _failures(rep.failed), batch)
        if report.encoded and self._on_encoded is not None:
            try:
                self._on_encoded(report)
            except BaseException as exc:  # noqa: BLE001
                self._error(None, f"after encoding: {type(exc).__name__}: {exc}", batch)

    def _error(self, encoder: str | None, message: str, batch: list[int],
               trace: str | None = None) -> None:
        entry = {"time": time.time(), "encoder": encoder, "message": message, "items": len(batch)}
        if trace:
            entry["traceback"] = trace
        self.errors.append(entry)
        log.warning("encode on arrival%s: %s", f" ({encoder})" if encoder else "", message)


def _failures(failed: dict[str, str]) -> str:
    """One line naming the first items an encoder could not encode, with their reasons."""
    named = "; ".join(f"{item!r}: {why}" for item, why in list(failed.items())[:NAMED_FAILURES])
    more = len(failed) - NAMED_FAILURES
    return (f"{len(failed)} item(s) not encoded: {named}"
            + (f"; and {more:,} more" if more > 0 else ""))
