"""Forget a user (the right to erasure): ``Engine.forget_user``, ``polyrec forget-user``,
``DELETE /users/{user}``.

In ONE transaction: the user's interactions, online states (``user_states``),
experiment assignments and the user row are deleted, and a tombstone is recorded (the
SHA-256 of the external id, never the id: :class:`ForgottenUser`). After the commit, the
services of this Engine drop what they hold about the user at once: the feedback
learners are told (``FeedbackLearner.forget_user``) and rebuilt from the store, and the
live recommender reloads its data snapshot, so no recommendation is built from the
user's history any more (the user is unknown to it). The trained parameters still carry
what was learnt from the whole catalogue's history until the next ``polyrec retrain``.

File ingestion (engine/ingest/files.py) leaves out rows of tombstoned users unless told
to restore them (``include_forgotten=True``, ``--include-forgotten``), which removes
their tombstones. Live writes (``feedback``, ``add_interactions``, HTTP) are the user
acting again and are accepted.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete

from polyrec.store import catalog
from polyrec.store.models import (ExperimentAssignment, ForgottenUser, Interaction, User,
                                  UserState)
from polyrec.store.tombstones import id_hash

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine


def forget_user(engine: "Engine", user: str, *, tombstone: bool = True) -> dict[str, Any]:
    """Remove ``user`` everywhere (see the module docstring). NotFoundError for an
    unknown user. Returns what was removed: {user, interactions, user_states,
    experiment_assignments, tombstone}."""
    hub = engine.services.started("feedback")
    if hub is not None:
        hub.flush()  # every learner's pending state first: nothing is written back later
    with engine.store.session() as s:
        uid = catalog.get_user_id(s, str(user))
        counts = {
            "interactions": s.execute(delete(Interaction).where(
                Interaction.user_id == uid)).rowcount,
            "user_states": s.execute(delete(UserState).where(UserState.user_id == uid)).rowcount,
            "experiment_assignments": s.execute(delete(ExperimentAssignment).where(
                ExperimentAssignment.user_id == uid)).rowcount,
        }
        s.execute(delete(User).where(User.id == uid))
        if tombstone:
            s.execute(catalog.dialect_insert(s.connection(), ForgottenUser.__table__)
                      .on_conflict_do_nothing(index_elements=["id_hash"]),
                      [{"id_hash": id_hash(str(user)), "forgotten_at": time.time()}])
    _drop_from_services(engine, uid)
    return {"user": str(user), **counts, "tombstone": tombstone}


def _drop_from_services(engine: "Engine", user_id: int) -> None:
    """What this Engine's running services hold about the user, dropped now."""
    hub = engine.services.started("feedback")
    if hub is not None:
        for learner in list((hub._learners or {}).values()):
            forget = getattr(learner, "forget_user", None)
            if callable(forget):
                try:
                    forget(user_id)
                except Exception as exc:  # noqa: BLE001 - rebuilt from the store below
                    hub._failed(getattr(learner, "name", "?"), "forget a user in", exc)
        hub._learners = None  # rebuilt from the store at the next event or request
        hub.ids.clear()
        hub._popularity = None
        hub.experiment_cache = None
    srch = engine.services.started("searcher")
    if srch is not None:
        srch.invalidate()
    rec = engine.services.started("recommender")
    if rec is not None:
        rec.refresh(wait=True)  # the user's history leaves the served snapshot now
