"""Pluggy markers and hook specifications of polyrec. Nothing else lives here."""
from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT_NAME = "polyrec"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_encoders(register: Callable[[type], None]) -> None:
    """Register Encoder subclasses: ``register(MyEncoder)``, once per class."""


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
    """Register Reader subclasses: input formats for ingestion."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add click commands to the ``polyrec`` group: ``cli.add_command(cmd)``."""
