"""Pluggy markers and hook specifications of polyrec. Nothing else lives here.

Plugins import the marker as ``from polyrec import hookimpl`` and never import pluggy.
Each ``register_*`` hook receives a ``register`` callback and calls it once per class;
the core checks the class against its contract, refuses a duplicate name (the error
names both plugins) and records which plugin registered what (``polyrec plugins``).
docs/plugins.md documents every hook below; a test keeps the two in step.
"""
from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT_NAME = "polyrec"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_encoders(register: Callable[[type], None]) -> None:
    """Register Encoder subclasses: ``register(MyEncoder)``, once per class.

    Each class sets ``name`` (unique among encoders) and ``modality`` ("text",
    "image", "kg", or a new one such as "numeric").
    """


@hookspec
def register_fusers(register: Callable[[type], None]) -> None:
    """Register Fuser subclasses (torch.nn.Module) that fuse modality vectors."""


@hookspec
def register_rankers(register: Callable[[type], None]) -> None:
    """Register Ranker subclasses for retrieval and re-ranking."""


@hookspec
def register_feedback_learners(register: Callable[[type], None]) -> None:
    """Register FeedbackLearner subclasses that learn from events online."""


@hookspec
def register_readers(register: Callable[[type], None]) -> None:
    """Register Reader subclasses: input formats for ingestion (``suffixes`` they claim)."""


@hookspec
def register_intent_models(register: Callable[[type], None]) -> None:
    """Register IntentModel subclasses: soft facets, demand and user match read from a
    text encoder's query vectors (``polyrec train-intent --model NAME``)."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add click commands to the ``polyrec`` group: ``cli.add_command(cmd)``.

    A command that needs the engine takes ``@click.pass_obj`` and calls
    ``state.engine()``; it raises PolyrecError subclasses for errors the user can fix.
    """
