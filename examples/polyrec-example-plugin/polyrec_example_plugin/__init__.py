"""polyrec-example-plugin: a numeric-attribute encoder and the ``attr-stats`` command.

polyrec finds this module through the entry point in pyproject.toml (group "polyrec")
and calls the two hook implementations below.
"""
from __future__ import annotations

from typing import Any, Callable

from polyrec import hookimpl

from polyrec_example_plugin.commands import attr_stats_command
from polyrec_example_plugin.numeric import NumericEncoder

__version__ = "0.1.0"
__all__ = ["NumericEncoder", "attr_stats_command", "register_encoders", "register_commands"]


@hookimpl
def register_encoders(register: Callable[[type], None]) -> None:
    """Register the "numeric" encoder."""
    register(NumericEncoder)


@hookimpl
def register_commands(cli: Any) -> None:
    """Add ``polyrec attr-stats``."""
    cli.add_command(attr_stats_command)
