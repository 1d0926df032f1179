"""SQLAlchemy 2.0 table models of the polyrec store."""
from __future__ import annotations

import time
from typing import Any

from sqlalchemy import (JSON, Boolean, Float, ForeignKey, Index, Integer, LargeBinary, String, Text,
                        UniqueConstraint)
from sqlalchemy import text as sql_text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def now() -> float:
    """Timestamps are seconds since the epoch (float), in every table."""
    return time.time()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class Meta(Base):
    """Key/value facts about the database itself (schema version)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(255), unique=True, index=True)
    title: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str | None] = mapped_column(Text)
    image: Mapped[str | None] = mapped_column(Text)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    updated_at: Mapped[float] = mapped_column(Float, default=now, onupdate=now)
    #: schema version 4: when the item was retired (sold out, discontinued): never served
    #: again (recommend, search, similar items) until restored; its row, vectors and
    #: interactions stay. None: live (polyrec.store.lifecycle)
    retired_at: Mapped[float | None] = mapped_column(Float, nullable=True, default=None)
    #: schema version 3: the items table's signature (count, newest updated_at) and the
    #: lexical index's incremental sync read updated_at through this index; version 4:
    #: the retired items, through a partial index holding only them
    __table_args__ = (Index("ix_items_updated_at", "updated_at"),
                      Index("ix_items_retired", "retired_at",
                            sqlite_where=sql_text("retired_at IS NOT NULL"),
                            postgresql_where=sql_text("retired_at IS NOT NULL")))


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(255), unique=True, index=True)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    updated_at: Mapped[float] = mapped_column(Float, default=now, onupdate=now)


class Interaction(Base):
    """One event: a user did ``kind`` (view, click, cart, purchase, rating, ...) to an item.

    ``dedup_key`` makes ingestion idempotent: the same row ingested twice is stored once.
    """

    __tablename__ = "interactions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    value: Mapped[float | None] = mapped_column(Float)
    ts: Mapped[float] = mapped_column(Float)
    context: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    dedup_key: Mapped[str] = mapped_column(String(64), unique=True)
    __table_args__ = (Index("ix_interactions_user_ts", "user_id", "ts"),
                      Index("ix_interactions_item", "item_id"),
                      Index("ix_interactions_kind", "kind"))


class ItemVector(Base):
    """A cached encoder output for one item, keyed by encoder; stale when fingerprint or
    content hash differ from the current ones."""

    __tablename__ = "item_vectors"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    encoder: Mapped[str] = mapped_column(String(128))
    fingerprint: Mapped[str] = mapped_column(String(128))
    content_hash: Mapped[str] = mapped_column(String(64))
    dtype: Mapped[str] = mapped_column(String(16))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    __table_args__ = (UniqueConstraint("item_id", "encoder", name="uq_item_vectors_item_encoder"),
                      Index("ix_item_vectors_encoder", "encoder"))


class Artifact(Base):
    """A trained model or index, versioned by name."""

    __tablename__ = "artifacts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    __table_args__ = (UniqueConstraint("name", "version", name="uq_artifacts_name_version"),)


class Entity(Base):
    """A knowledge-graph node; ``item_id`` links it to a catalogue item (at most one)."""

    __tablename__ = "entities"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(255), unique=True, index=True)
    label: Mapped[str | None] = mapped_column(Text)
    type: Mapped[str | None] = mapped_column(String(64))
    item_id: Mapped[int | None] = mapped_column(ForeignKey("items.id", ondelete="SET NULL"),
                                                unique=True)


class Relation(Base):
    __tablename__ = "relations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)


class Triple(Base):
    __tablename__ = "triples"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    head_id: Mapped[int] = mapped_column(ForeignKey("entities.id", ondelete="CASCADE"))
    relation_id: Mapped[int] = mapped_column(ForeignKey("relations.id", ondelete="CASCADE"))
    tail_id: Mapped[int] = mapped_column(ForeignKey("entities.id", ondelete="CASCADE"))
    source: Mapped[str | None] = mapped_column(String(64))
    __table_args__ = (UniqueConstraint("head_id", "relation_id", "tail_id", name="uq_triples_hrt"),
                      Index("ix_triples_tail", "tail_id"))


# -- schema version 2: feedback learners, experiments, settings ---------------------------
class Setting(Base):
    """A named JSON setting of this database (e.g. ``feedback``: kind weights, thresholds)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[float] = mapped_column(Float, default=now, onupdate=now)


class UserState(Base):
    """A feedback learner's online state of one user: a decayed, weighted sum of item
    vectors (``vector``, float32) and its total weight, built in the item space
    ``space``; ``last_event_id`` is the last interaction folded in."""

    __tablename__ = "user_states"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    learner: Mapped[str] = mapped_column(String(64))
    space: Mapped[str] = mapped_column(String(255))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    weight: Mapped[float] = mapped_column(Float, default=0.0)
    n_events: Mapped[int] = mapped_column(Integer, default=0)
    last_ts: Mapped[float | None] = mapped_column(Float)
    last_event_id: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(Float, default=now, onupdate=now)
    __table_args__ = (UniqueConstraint("user_id", "learner", name="uq_user_states_user_learner"),)


class LearnerState(Base):
    """A feedback learner's global state (e.g. the bandit's posterior), as a blob."""

    __tablename__ = "learner_states"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[float] = mapped_column(Float, default=now, onupdate=now)


class Experiment(Base):
    """An A/B experiment: variants (name -> {"weight": share, "options": {...}})."""

    __tablename__ = "experiments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    variants: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class ExperimentAssignment(Base):
    """The variant a user was (deterministically) assigned to, recorded at first sight."""

    __tablename__ = "experiment_assignments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    variant: Mapped[str] = mapped_column(String(64))
    assigned_at: Mapped[float] = mapped_column(Float, default=now)
    __table_args__ = (UniqueConstraint("experiment_id", "user_id", name="uq_assignments_exp_user"),)


#: Tables introduced by schema version 2 (created for older databases by its migration).
V2_TABLES = (Setting, UserState, LearnerState, Experiment, ExperimentAssignment)


# -- added without a data step (created by the migrations' final create_all) ---------------
class ForgottenUser(Base):
    """A tombstone of a user removed by ``forget_user``: the SHA-256 of the external id
    (never the id itself), so that re-ingesting an old file does not bring them back."""

    __tablename__ = "forgotten_users"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    forgotten_at: Mapped[float] = mapped_column(Float, default=now)
