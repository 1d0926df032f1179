"""Warm-up of a serving process: what the first requests would load lazily, loaded at start.

A fresh process loads the live model and its data snapshot at its first recommendation,
and the query encoders (MiniLM, CLIP), the intent model and the vector spaces at its
first search: about 7 s for the first ``/search`` on ml-100k on a loaded 2-core machine
(the next ones 30 ms). ``polyrec serve`` (``--warm``, the default) runs :func:`warm_up`
on a background thread of each worker as it starts: requests are accepted at once, and
one that arrives while a model is still loading waits for that load (the same locks) rather
than loading it a second time. ``GET /health`` says where the warm-up is (``warm``).

The search part runs one real query (:data:`WARM_QUERY`) through ``Engine.search``: the
path the first request takes, so nothing it loads is missed. It writes nothing.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine

log = logging.getLogger("polyrec.serve")

#: The query the warm-up searches for (any text loads the same models).
WARM_QUERY = "warm up"


class WarmUp:
    """The state of one process's warm-up: ``as_dict()`` is what ``/health`` shows."""

    def __init__(self) -> None:
        self.state = "off"  # off | running | done
        self.seconds: dict[str, float] = {}
        self.skipped: dict[str, str] = {}
        self._thread: threading.Thread | None = None

    def start(self, engine: "Engine") -> "WarmUp":
        """Run :func:`warm_up` on a daemon thread (the process can exit while it runs)."""
        self.state = "running"
        self._thread = threading.Thread(target=self._run, args=(engine,), daemon=True,
                                        name="polyrec-warm-up")
        self._thread.start()
        return self

    def _run(self, engine: "Engine") -> None:
        try:
            warm_up(engine, self)
        finally:
            self.state = "done"

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "seconds": dict(self.seconds), "skipped": dict(self.skipped)}


def warm_up(engine: "Engine", into: WarmUp | None = None) -> WarmUp:
    """Load the live model with its data snapshot, then everything a search loads. A part
    that cannot load (no trained model, an empty catalogue, a closed engine) is skipped
    with its reason: the requests that need it will say why themselves."""
    into = into or WarmUp()
    for part, run in (("recommender", lambda: engine.services.recommender()),
                      ("search", lambda: engine.search(WARM_QUERY, 1))):
        start = time.perf_counter()
        try:
            run()
            into.seconds[part] = round(time.perf_counter() - start, 3)
        except Exception as exc:  # noqa: BLE001 - a warm-up never stops the server
            into.skipped[part] = f"{type(exc).__name__}: {exc}"[:300]
            log.debug("warm-up of %s skipped", part, exc_info=True)
    log.info("warm-up done: %s%s", into.seconds, f"; skipped {into.skipped}" if into.skipped else "")
    return into
