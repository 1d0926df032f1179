"""Several serving processes over one store: ``polyrec serve --workers N``.

uvicorn starts N worker processes; each builds its own app with :func:`app_factory`,
which opens its own Engine from the store URL passed in the environment
(``POLYREC_SERVE_CONFIG``, JSON). The processes share nothing but the database
(PostgreSQL, or a SQLite file in WAL mode), so what one worker or another process writes
reaches the others through the store, within bounded delays:

- a newly live model version (``polyrec models activate``/``rollback``, a training that
  went live): each worker's recommender reads the live pointer at most once per
  ``Recommender.check_interval`` (1 s) and loads the new version;
- new items and events: the recommender's data snapshot and the search snapshot compare
  the store's signatures at most once per ``check_interval`` (1 s) and refresh.

Every response carries the header ``X-Polyrec-Worker`` (the worker's pid), and
``GET /health`` says which pid answered and which model version it serves.
"""
from __future__ import annotations

import atexit
import json
import os
from typing import TYPE_CHECKING, Any

from polyrec.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

#: The environment variable carrying the workers' configuration (JSON) to each process.
CONFIG_ENV = "POLYREC_SERVE_CONFIG"
WORKER_HEADER = "X-Polyrec-Worker"
#: Seconds uvicorn's supervisor waits for a worker to answer its health check before it
#: kills and replaces it (uvicorn's default, 5 s, is shorter than a worker's start on a busy
#: machine: each imports torch and opens its Engine, and would be replaced over and over).
HEALTHCHECK_TIMEOUT = 60


def app_factory() -> "WorkerHeader":
    """The app of one worker process: an Engine of its own over the configured store."""
    from polyrec.engine import Engine
    from polyrec.serve.app import create_app
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise ConfigError(f"{CONFIG_ENV} is not set: start workers with polyrec serve --workers N")
    config = json.loads(raw)
    engine = Engine(config["db"], device=config.get("device", "auto"), progress=False,
                    lock_timeout=config.get("lock_timeout"))
    app = create_app(engine, **config.get("app", {}))
    atexit.register(engine.close)  # when the worker process ends
    return WorkerHeader(app)


class WorkerHeader:
    """ASGI wrapper adding ``X-Polyrec-Worker: <pid>`` to every HTTP response of ``app``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.header = (WORKER_HEADER.lower().encode(), str(os.getpid()).encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: dict) -> None:
            if message.get("type") == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)
        await self.app(scope, receive, tagged)


def check_shared_store(url: str) -> None:
    """ConfigError unless worker processes can share the store at ``url``: an in-memory
    SQLite database exists once per process."""
    from sqlalchemy.engine import make_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError("--workers needs a store the processes can share: a SQLite file or "
                          "a PostgreSQL URL, not an in-memory database")


def serve_workers(db: str, host: str = "127.0.0.1", port: int = 8000, *, workers: int = 2,
                  device: str = "auto", lock_timeout: float | None = None,
                  log_level: str = "info", **app_options: Any) -> None:
    """Serve the store at ``db`` with ``workers`` uvicorn worker processes until
    interrupted. ``app_options`` go to :func:`polyrec.serve.app.create_app` in each."""
    import uvicorn
    check_shared_store(db)
    os.environ[CONFIG_ENV] = json.dumps({"db": db, "device": device, "lock_timeout": lock_timeout,
                                         "app": app_options})
    uvicorn.run("polyrec.serve.workers:app_factory", factory=True, host=host, port=port,
                workers=int(workers), log_level=log_level,
                timeout_worker_healthcheck=HEALTHCHECK_TIMEOUT)
