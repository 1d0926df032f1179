"""The ``polyrec`` admin CLI: a click group, its shared options, and error handling.

Commands live in engine/cli/ (one module per area, each exposing ``COMMANDS``);
plugins add theirs through the ``register_commands`` hook.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from typing import Any, Callable

import click

from polyrec.cli.errors import check_database, fail
from polyrec.errors import PolyrecError
from polyrec.store import DEFAULT_LOCK_TIMEOUT, DEFAULT_URL, normalize_url

#: Modules under engine/cli (the package polyrec.cli) whose COMMANDS join the group, in help order.
COMMAND_MODULES: tuple[str, ...] = (
    "polyrec.cli.data",
    "polyrec.cli.items",
    "polyrec.cli.migrate",
    "polyrec.cli.plugins",
    "polyrec.cli.encode",
    "polyrec.cli.evaluate",
    "polyrec.cli.intent",
    "polyrec.cli.recommend",
    "polyrec.cli.models",
    "polyrec.cli.feedback",
    "polyrec.cli.serve",
    "polyrec.cli.search_eval",
    "polyrec.cli.synonyms",
    "polyrec.cli.kg",
)


class CliState:
    """What the group's options decided; commands open the Engine through it, lazily."""

    def __init__(self, db: str, device: str, debug: bool, quiet: bool,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.db, self.device, self.debug, self.quiet = db, device, debug, quiet
        self.lock_timeout = lock_timeout
        self._engine: Any = None

    @property
    def progress(self) -> bool:
        """Progress is shown unless --quiet: bars on a terminal, log lines elsewhere."""
        return not self.quiet

    def engine(self, create: bool = False) -> Any:
        """The Engine over --db. Only ``create=True`` (``polyrec init``) may make a new
        database; otherwise a --db that is not a polyrec database is a ConfigError."""
        if self._engine is None:
            from polyrec.engine import Engine
            if not create:
                check_database(normalize_url(self.db))
            self._engine = Engine(self.db, device=self.device, progress=self.progress,
                                  lock_timeout=self.lock_timeout)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


def ray_options(doing: str, workers: str) -> Callable[[Any], Any]:
    """``--ray [ADDRESS]`` and ``--ray-workers N`` for a command that can run on Ray:
    ``doing`` says what runs there, ``workers`` what each worker holds."""
    def decorate(command: Any) -> Any:
        command = click.option("--ray-workers", type=click.IntRange(min=1), default=None,
                               help=workers)(command)
        return click.option("--ray", "ray_address", is_flag=False, flag_value="local",
                            default=None, metavar="[ADDRESS]",
                            help=f"{doing} (extra polyrec[ray]): a local cluster, or the one "
                                 f"at ADDRESS (auto, ray://host:10001).")(command)
    return decorate


def echo_json(data: Any) -> None:
    """Print data as indented JSON (the ``--json`` output of every command)."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


class PolyrecGroup(click.Group):
    """Turns every failure into one line ``Error: ...`` (with a hint) on stderr and exit
    status 1; ``--debug`` shows the traceback instead (engine/cli/errors.py)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.UsageError as exc:
            # a bad option value or argument of a command: one line too, with where to look
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            click.echo(f"Error: {exc.format_message()} (see '{where} --help')", err=True)
            ctx.exit(1)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the CLI's one error boundary
            state = ctx.obj if isinstance(ctx.obj, CliState) else None
            if (state and state.debug) or "--debug" in sys.argv:
                raise
            fail(ctx, exc)

    # Plugin commands are added on first need, not at import (no side effects at import).
    _plugin_commands_added = False

    def _ensure_plugin_commands(self) -> None:
        if not self._plugin_commands_added:
            self._plugin_commands_added = True
            _add_plugin_commands(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._ensure_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            self._ensure_plugin_commands()
        return super().get_command(ctx, cmd_name)


@click.group(cls=PolyrecGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", envvar="POLYREC_DB", default=DEFAULT_URL, show_default=True,
              help="SQLAlchemy URL or SQLite file path of the store (env POLYREC_DB).")
@click.option("--device", default="auto", show_default=True,
              help="Where models run: auto (CUDA when present), cpu, cuda, cuda:N.")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress output (bars on a terminal, a line per epoch or per 10 s "
                   "in logs and pipes).")
@click.option("--lock-timeout", type=click.FloatRange(min=0), envvar="POLYREC_LOCK_TIMEOUT",
              default=DEFAULT_LOCK_TIMEOUT, show_default=True, metavar="SECONDS",
              help="How long to keep retrying a database locked by another process "
              "(env POLYREC_LOCK_TIMEOUT).")
@click.version_option(package_name="polyrec", prog_name="polyrec")
@click.pass_context
def cli(ctx: click.Context, db: str, device: str, debug: bool, quiet: bool,
        lock_timeout: float) -> None:
    """polyrec: a plugin-based multimodal recommendation engine."""
    state = CliState(db, device, debug, quiet, lock_timeout)
    ctx.obj = state
    ctx.call_on_close(state.close)
    if not quiet:  # progress lines (polyrec.progress) on stderr when it is not a terminal
        handler = _StderrLines()
        logger = logging.getLogger("polyrec.progress")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        ctx.call_on_close(lambda: logger.removeHandler(handler))


class _StderrLines(logging.Handler):
    """Writes each record's message as one line to the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(record.getMessage(), err=True)
        except Exception:  # noqa: BLE001 - progress output must never fail a command
            self.handleError(record)


def _add_builtin_commands(group: click.Group) -> None:
    for modname in COMMAND_MODULES:
        module = importlib.import_module(modname)
        for command in module.COMMANDS:
            group.add_command(command)


def _add_plugin_commands(group: click.Group) -> None:
    """Plugins' commands; a plugin host without engine (no database is opened)."""
    from polyrec.plugin_host import PluginHost
    try:
        host = PluginHost(entrypoints=os.environ.get("POLYREC_NO_ENTRYPOINTS") is None)
        for problem in host.add_commands(group):
            click.echo(f"Warning: {problem}", err=True)
    except PolyrecError as exc:  # a broken plugin set must not make the CLI unusable
        click.echo(f"Warning: plugin commands not loaded: {exc}", err=True)


_add_builtin_commands(cli)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="polyrec")
