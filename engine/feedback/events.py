"""Events: store feedback durably, then hand it to the feedback learners.

``Engine.feedback`` (one event), ``Engine.feedback_many`` (a batch) and
``polyrec ingest interactions`` (through :func:`handoff`) all end here. The order is
fixed: the events are committed to the store first, and only then do the registered
:class:`~engine.contracts.FeedbackLearner` plugins observe them, so a crash can lose a
learner's in-memory update but never an acknowledged event (learners rebuild what they
lost from the stored log).

Settings live in the ``settings`` table under the key ``feedback`` (see
:data:`DEFAULT_CONFIG`; ``polyrec feedback config``) and are merged over the defaults.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import torch
from sqlalchemy import Connection, Text, cast, func, select, type_coerce
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from polyrec.progress import progress_bar
from polyrec.store import catalog
from polyrec.store.catalog import DEFAULT_KIND_WEIGHTS, dialect_insert  # noqa: F401 - re-exported
from polyrec.ingest import interactions
from polyrec.errors import ConfigError, ModelNotTrainedError
from polyrec.rank.train import PIPELINE_ARTIFACT
from polyrec.contracts import LearnerContext
from polyrec.store.models import (Interaction, Item, ItemVector, LearnerState, Setting, User,
                                  UserState)
from polyrec.store.settings import get_setting, put_setting
from polyrec.store.vectors import load_vectors

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.contracts import FeedbackLearner
    from polyrec.engine import Engine

log = logging.getLogger("polyrec.feedback")

SETTINGS_KEY = "feedback"

#: Every feedback setting with its default. ``polyrec feedback config --set a.b=VALUE``.
DEFAULT_CONFIG: dict[str, Any] = {
    # weight of each event kind for the online learner; a new key adds a kind
    "kind_weights": dict(DEFAULT_KIND_WEIGHTS),
    # a rating weighs kind_weights.rating * (value - center) / scale
    "rating": {"center": 0.0, "scale": 5.0},
    # which learner plays which part in serving (a registered learner name, or null)
    "roles": {"user_state": "online", "explorer": "bandit"},
    "online": {
        "enabled": True,
        "decay": 0.9,             # each later event of the user multiplies older ones by this
        "half_life_days": None,   # optional extra decay by event time
        "blend": 6.0,             # online share = w / (w + blend * (1 + h / history_scale))
        "history_scale": 100.0,   # h = the user's events the model trained on (0: off)
        "session_size": 10,       # recent items kept per user for item-to-item similarity
        "session_decay": 0.7,     # each later event multiplies an older session item by this
        "session_weight": 1.0,    # the session's part in the learner's scores (state: 1)
        "session_spaces": "all",  # "all" (model + every encoder) or comma-separated names
        "session_boost": 20.0,    # strength *= 1 + session_boost * coherence of the session
        "space": "auto",          # item vectors: auto (trained model, else encoder), model, or an encoder name
        "flush_every": 256,       # write dirty user states after this many updates
        "cache_size": 100000,     # user states kept in memory
    },
    "bandit": {
        "serving": False,         # explore in Engine.recommend (never in evaluation)
        "share": 0.2,             # share of the k slots spent on exploration
        "pool": 3,                # candidates considered = pool * k (plus new items)
        "new_items": 20,          # newest little-seen items added to the candidate pool
        "new_item_max_events": 5,  # an item with fewer events counts as new
        "prior": 1.0,             # ridge prior of the linear model
        "noise": 0.5,             # posterior scale of Thompson sampling
        "flush_every": 256,
    },
    "retrain": {"min_new_events": 1000, "min_new_items": 20},
}


# -- settings ------------------------------------------------------------------------------
def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _stored_overrides(session: Session) -> dict[str, Any]:
    return dict(get_setting(session, SETTINGS_KEY) or {})


def defaults(engine: "Engine") -> dict[str, Any]:
    """DEFAULT_CONFIG plus the event kinds the registered learners add
    (``FeedbackLearner.kinds``) under ``kind_weights``."""
    out = copy.deepcopy(DEFAULT_CONFIG)
    for _, cls in engine.registry("feedback_learners").items():
        for kind, weight in (getattr(cls, "kinds", None) or {}).items():
            out["kind_weights"].setdefault(str(kind).strip().lower(), float(weight))
    return out


def load_config(engine: "Engine") -> dict[str, Any]:
    """The feedback settings of this database: stored overrides merged over the defaults."""
    with engine.store.session() as s:
        return _merge(defaults(engine), _stored_overrides(s))


def _stored_settings(engine: "Engine") -> tuple[float | None, dict[str, Any]]:
    """(the stored row's ``updated_at``, None when there is none; the merged settings),
    read in one snapshot."""
    with engine.store.snapshot() as s:
        row = s.execute(select(Setting.updated_at, Setting.value)
                        .where(Setting.key == SETTINGS_KEY)).one_or_none()
    overrides = dict(row[1] or {}) if row is not None else {}
    return (None if row is None else row[0]), _merge(defaults(engine), overrides)


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def set_config(engine: "Engine", assignments: Mapping[str, Any]) -> dict[str, Any]:
    """Store settings given as dotted paths (``{"online.decay": 0.8}``); strings are read
    as JSON. Unknown paths are refused, except new event kinds under ``kind_weights``.
    Returns the merged settings."""
    base = defaults(engine)
    with engine.store.session() as s:
        overrides = _stored_overrides(s)
        for path, raw in assignments.items():
            value = _parse_value(raw) if isinstance(raw, str) else raw
            keys = path.split(".")
            default: Any = base
            for depth, key in enumerate(keys):
                if not isinstance(default, dict) or (key not in default and not (
                        depth == 1 and keys[0] == "kind_weights")):
                    raise ConfigError(f"unknown feedback setting '{path}'")
                default = default.get(key) if isinstance(default, dict) else None
            if isinstance(default, dict):
                raise ConfigError(f"'{path}' is a group of settings; set one of its keys")
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ConfigError(f"'{path}' must be true or false, not {raw!r}")
            if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"'{path}' must be a number, not {raw!r}")
            node = overrides
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = value
        merged = _merge(base, overrides)
        registered = engine.registry("feedback_learners")
        for role, name in merged["roles"].items():
            if name is not None and name not in registered.names():
                raise ConfigError(f"feedback role '{role}': no learner named '{name}' "
                                  f"(registered: {', '.join(registered.names())})")
        for name, cls in registered.items():  # their own checks, on a detached context
            if isinstance(merged.get(name), Mapping):
                try:
                    build_learner(cls, LearnerContext(name=name, settings=merged),
                                  merged[name], None)
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"feedback setting for '{name}': {exc}") from None
        put_setting(s, SETTINGS_KEY, overrides)
    running = engine.services.started("feedback")
    if running is not None:
        running.reconfigure(merged)
    return merged


def event_weight(kind: str, value: float | None, config: Mapping[str, Any]) -> float:
    """How much one event counts for the online learner (negative pushes away)."""
    base = float(config["kind_weights"].get(kind, 0.0))
    if kind == "rating":
        if value is None:
            return 0.0
        rating = config["rating"]
        return base * (float(value) - float(rating["center"])) / float(rating["scale"] or 1.0)
    return base


def build_learner(cls: type, context: LearnerContext, options: Mapping[str, Any],
                  engine: "Engine | None") -> "FeedbackLearner":
    """``cls(context, **options)``. A learner written for the old contract, whose
    ``__init__`` takes ``engine`` and no ``context``, is still built (as
    ``cls(engine=..., **options)``) with a DeprecationWarning."""
    import inspect
    import warnings
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - a C-level __init__
        params = {}
    if "engine" in params and "context" not in params:
        warnings.warn(f"feedback learner '{getattr(cls, 'name', cls.__name__)}' takes engine=: "
                      "the contract is __init__(self, context: LearnerContext, **options)",
                      DeprecationWarning, stacklevel=2)
        return cls(engine=engine, **options)
    return cls(context, **options)


# -- events --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    """One stored event as the learners see it (internal and external ids)."""

    id: int
    user_id: int
    item_id: int
    user: str
    item: str
    kind: str
    value: float | None
    ts: float
    context: dict[str, Any] | None
    weight: float
    new: bool = True  # False when an ``event_id`` in the context was already stored

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "user": self.user, "item": self.item, "kind": self.kind,
                "value": self.value, "ts": self.ts, "context": self.context,
                "weight": self.weight, "new": self.new}


@dataclass
class ItemSpace:
    """Item vectors the online learners work in: ``vectors[index[item_id]]``.

    ``name`` identifies the space (a trained model version or an encoder); states built
    in another space are rebuilt. ``cutoff`` is the last interaction id a trained model
    already learned from (0 for encoder spaces): online states start after it.
    """

    name: str
    item_ids: list[int]
    vectors: torch.Tensor
    cutoff: int = 0
    index: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.ndim == 2 and self.vectors.shape[0] != len(self.item_ids):
            raise ValueError(f"item space '{self.name}': {self.vectors.shape[0]} vectors for "
                             f"{len(self.item_ids)} item ids")
        if not self.index:
            self.index = {item: i for i, item in enumerate(self.item_ids)}

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0

    def vector(self, item_id: int) -> torch.Tensor | None:
        i = self.index.get(item_id)
        return None if i is None else self.vectors[i]


def _model_space(engine: "Engine") -> ItemSpace | None:
    """The trained pipeline's fused item vectors, when a pipeline is trained."""
    try:
        rec = engine.services.recommender()
    except ModelNotTrainedError:
        return None
    return model_space(engine, rec)


def model_space(engine: "Engine", rec: Any) -> ItemSpace | None:
    """The item space of a loaded Recommender: its item vectors (the two-tower item tower)
    over its item index, named by pipeline version; the cutoff is the last event the
    pipeline was trained on (polyrec.feedback.retrain.model_marker)."""
    from polyrec.feedback import retrain
    with rec.pinned() as snap:  # vectors and item ids from one data snapshot: a refresh
        vectors = rec.vectors()  # on another thread must not pair old vectors with new ids
        item_ids = list(snap.data.item_ids)
    if vectors is None:
        return None
    name = PIPELINE_ARTIFACT
    marker = retrain.model_marker(engine, {"name": name, "version": int(rec.version),
                                           "meta": dict(rec.meta or {}), "created_at": None})
    return ItemSpace(name=f"{name}:v{rec.version}", item_ids=item_ids,
                     vectors=vectors.detach().float().cpu(), cutoff=int(marker["max_event_id"]))


def _encoder_space(engine: "Engine", encoder: str | None) -> ItemSpace | None:
    """Stored vectors of one encoder (the one with most items when None), L2-normalized."""
    with engine.store.session() as s:
        if encoder is None:
            counts = s.execute(select(ItemVector.encoder, func.count())
                               .group_by(ItemVector.encoder)
                               .order_by(func.count().desc(), ItemVector.encoder)).first()
            if counts is None:
                return None
            encoder = counts[0]
        ids, vectors = load_vectors(s, encoder)
    if not ids:
        return None
    digest = hashlib.sha1(vectors.numpy().tobytes())
    digest.update(repr(ids).encode())
    vectors = torch.nn.functional.normalize(vectors, dim=1)
    return ItemSpace(name=f"encoder:{encoder}:{digest.hexdigest()[:16]}", item_ids=ids,
                     vectors=vectors, cutoff=0)


def attribute_space(engine: "Engine", max_tokens: int = 4096) -> ItemSpace | None:
    """Items as TF-IDF bags of their categorical attributes (L2-normalized): a token per
    ``key=value`` of a short string or list element, or per word of a short
    space-separated value (RecBole token sequences such as genres). Tokens held by one
    item or by more than half of the items are left out; at most ``max_tokens`` (the
    most frequent). None when no token is shared."""
    with engine.store.session() as s:
        rows = s.execute(select(Item.id, Item.attributes).order_by(Item.id)).all()
    docs: list[set[str]] = []
    for _, attrs in rows:
        tokens: set[str] = set()
        for key, value in (attrs or {}).items():
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if isinstance(v, bool) or not isinstance(v, str) or not v.strip() or len(v) > 64:
                    continue
                parts = v.split()
                if 1 < len(parts) <= 8:  # a token sequence: its words, not the combination
                    tokens.update(f"{key}:{part}" for part in parts)
                else:
                    tokens.add(f"{key}={v.strip()}")
        docs.append(tokens)
    n = len(docs)
    df: dict[str, int] = {}
    for tokens in docs:
        for t in tokens:
            df[t] = df.get(t, 0) + 1
    vocab = sorted((t for t, c in df.items() if 1 < c <= n / 2), key=lambda t: (-df[t], t))[:max_tokens]
    if not vocab:
        return None
    column = {t: j for j, t in enumerate(vocab)}
    matrix = torch.zeros(n, len(vocab))
    for i, tokens in enumerate(docs):
        for t in tokens:
            j = column.get(t)
            if j is not None:
                matrix[i, j] = math.log(n / df[t])
    keep = matrix.abs().sum(1) > 0
    ids = [rows[i][0] for i in torch.nonzero(keep).flatten().tolist()]
    vectors = torch.nn.functional.normalize(matrix[keep], dim=1)
    digest = hashlib.sha1(repr((ids, vocab)).encode()).hexdigest()[:16]
    return ItemSpace(name=f"attributes:{digest}", item_ids=ids, vectors=vectors, cutoff=0)


def resolve_space(engine: "Engine", spec: str = "auto") -> ItemSpace | None:
    """The item space named by ``spec``: 'auto' (trained model, else the encoder with
    most vectors), 'model', or an encoder name. None when nothing is there yet."""
    if spec in ("auto", "model"):
        space = _model_space(engine)
        if space is not None or spec == "model":
            return space
        return _encoder_space(engine, None)
    return _encoder_space(engine, spec)


def _chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), n):
        yield seq[start:start + n]


class FeedbackHub:
    """One per Engine: settings, id caches, the instantiated learners, the item space."""

    #: seconds between looks at the stored settings: another process may change them
    #: (``polyrec feedback config --set`` while a server runs, another serve worker)
    settings_interval = 1.0

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self._settings_stamp, self._config = _stored_settings(engine)
        self._settings_checked = time.monotonic()
        self._settings_lock = threading.Lock()
        self._stale_learners = False  # the settings changed: rebuild the learners
        self._learners: dict[str, "FeedbackLearner"] | None = None
        #: ids of users and items seen (engine/ingest/interactions.py keeps them fresh)
        self.ids = interactions.IdCache()
        self._users, self._items = self.ids.users, self.ids.items
        self._space: ItemSpace | None = None
        self._space_checked = 0.0
        self._spaces: dict[str, ItemSpace] | None = None  # encoder spaces (item_spaces)
        self._popularity: dict[int, int] | None = None
        self.experiment_cache: Any = None  # polyrec.feedback.experiments keeps its cache here
        self.errors: list[str] = []

    # -- settings ------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The feedback settings (stored overrides merged over the defaults). The stored
        row is looked at again at most every ``settings_interval`` seconds, so a change
        another process made reaches this one without a restart: new kinds are accepted,
        ``bandit.serving``, ``online.*`` and the roles apply, and the learners are built
        again with their new options (as :func:`set_config` does in its own process)."""
        if time.monotonic() - self._settings_checked >= self.settings_interval:
            self._follow_settings()
        return self._config

    def _follow_settings(self) -> None:
        """Read the stored settings' stamp; take them when another process changed them.
        Only reads (a snapshot): the learners are rebuilt at their next use."""
        if not self._settings_lock.acquire(blocking=False):
            return  # another thread is looking right now
        try:
            self._settings_checked = time.monotonic()
            stamp, merged = _stored_settings(self.engine)
            if stamp == self._settings_stamp:
                return
            self._settings_stamp = stamp
            if merged != self._config:
                self._config = merged
                self._stale_learners = True
        except Exception as exc:  # noqa: BLE001 - keep serving with the settings we have
            log.warning("could not read the feedback settings: %s", exc)
        finally:
            self._settings_lock.release()

    # -- learners ------------------------------------------------------------------------
    @property
    def learners(self) -> dict[str, "FeedbackLearner"]:
        """Every registered feedback learner, instantiated once as
        ``cls(context, **options)`` with its settings (again after the settings change)."""
        if self._stale_learners:
            self._stale_learners = False
            self._rebuild()
        if self._learners is None:
            self._learners = {}
            for name, cls in self.engine.registry("feedback_learners").items():
                options = self.config.get(name, {})
                options = dict(options) if isinstance(options, Mapping) else {}
                try:
                    self._learners[name] = build_learner(cls, self.context(name), options,
                                                         self.engine)
                except Exception as exc:  # noqa: BLE001 - e.g. a bad setting: left out, reported
                    self._failed(name, "start for", exc)
        return self._learners

    def role(self, role: str) -> "FeedbackLearner | None":
        """The learner configured for ``role`` (setting ``roles.<role>``), if any."""
        name = (self.config.get("roles") or {}).get(role)
        return None if name is None else self.learners.get(str(name))

    # -- what a learner may use (LearnerContext) -----------------------------------------
    def context(self, name: str) -> LearnerContext:
        """The LearnerContext given to learner ``name``."""
        roles = tuple(r for r, n in (self.config.get("roles") or {}).items() if n == name)

        def events(after_id: int = 0, *, user_ids: Sequence[int] | None = None,
                   kinds: Iterable[str] | None = None, limit: int | None = None) -> list[Event]:
            if user_ids is not None and len(user_ids) > 900:
                out: list[Event] = []
                for chunk in _chunks(list(user_ids), 900):
                    out += stored_events(self.engine, after_id=after_id, user_ids=list(chunk),
                                         kinds=kinds, limit=limit, config=self.config)
                return sorted(out, key=lambda e: e.id)[:limit]
            return stored_events(self.engine, after_id=after_id, user_ids=user_ids, kinds=kinds,
                                 limit=limit, config=self.config)

        def load_state(key: str = "") -> tuple[bytes, dict[str, Any]] | None:
            with self.engine.store.session() as s:
                row = s.get(LearnerState, f"{name}:{key}" if key else name)
                return None if row is None else (bytes(row.data), dict(row.meta or {}))

        def save_state(data: bytes, meta: Mapping[str, Any], key: str = "") -> None:
            with self.engine.store.session() as s:
                row = s.get(LearnerState, f"{name}:{key}" if key else name)
                if row is None:
                    s.add(LearnerState(name=f"{name}:{key}" if key else name, data=data,
                                       meta=dict(meta), updated_at=time.time()))
                else:
                    row.data, row.meta, row.updated_at = data, dict(meta), time.time()

        def load_user_states(user_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
            out: dict[int, dict[str, Any]] = {}
            with self.engine.store.session() as s:
                for chunk in _chunks(list(user_ids), 900):
                    for row in s.execute(select(UserState).where(UserState.user_id.in_(list(chunk)))
                                         .where(UserState.learner == name)).scalars():
                        out[row.user_id] = {c: getattr(row, c) for c in _USER_STATE_COLUMNS}
            return out

        def save_user_states(rows: Sequence[Mapping[str, Any]]) -> None:
            if not rows:
                return
            stamp = time.time()
            values = [{**{c: r.get(c) for c in _USER_STATE_COLUMNS}, "learner": name,
                       "updated_at": stamp} for r in rows]
            with self.engine.store.session() as s:
                stmt = dialect_insert(s.get_bind().dialect.name, UserState.__table__)
                stmt = stmt.on_conflict_do_update(
                    index_elements=["user_id", "learner"],
                    set_={c: stmt.excluded[c] for c in (*_USER_STATE_COLUMNS[1:], "updated_at")})
                s.execute(stmt, values)

        def user_vector(user_id: int) -> torch.Tensor | None:
            learner = self.role("user_state")
            return None if learner is None else learner.user_state(user_id)

        return LearnerContext(name=name, settings=self.config, roles=roles, events=events,
                              item_space=self.item_space, item_spaces=self.item_spaces,
                              load_state=load_state, save_state=save_state,
                              load_user_states=load_user_states,
                              save_user_states=save_user_states, item_counts=self.item_counts,
                              user_vector=user_vector, attached=True,
                              progress=bool(getattr(self.engine, "progress", False)))

    def item_spaces(self) -> dict[str, ItemSpace]:
        """Every item space: ``model`` (the trained pipeline's item vectors, when there
        is one) and each encoder's stored vectors (L2-normalized), by name. Encoder
        spaces are cached until :meth:`reset_space`."""
        if self._spaces is None:
            with self.engine.store.session() as s:
                names = [n for (n,) in s.execute(select(ItemVector.encoder).distinct()
                                                 .order_by(ItemVector.encoder))]
            spaces = {}
            for name in names:
                space = _encoder_space(self.engine, name)
                if space is not None:
                    spaces[name] = space
            attributes = attribute_space(self.engine)
            if attributes is not None:
                spaces["attributes"] = attributes
            self._spaces = spaces
        out = dict(self._spaces)
        space = self.item_space()
        if space is not None and not space.name.startswith("encoder:"):
            out["model"] = space
        return out

    def item_counts(self) -> dict[int, int]:
        """Events per item id (impressions and skips excluded), read once then kept up
        to date by :meth:`observe`."""
        if self._popularity is None:
            with self.engine.store.session() as s:
                self._popularity = dict(s.execute(
                    select(Interaction.item_id, func.count())
                    .where(Interaction.kind.notin_(["impression", "skip"]))
                    .group_by(Interaction.item_id)).all())
        return self._popularity

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Take new settings: learners are flushed and made again with their new options
        (they reload their state from the store and the log)."""
        self._config = config
        self._stale_learners = False
        self._rebuild()

    def _rebuild(self) -> None:
        """Flush the learners, then drop them and the item space: they are made again
        with the current settings at their next use."""
        self.flush()
        self._learners = None
        self.reset_space()

    def learner(self, name: str) -> "FeedbackLearner | None":
        return self.learners.get(name)

    def item_space(self, refresh: bool = False) -> ItemSpace | None:
        """The current item space (cached; re-resolved on ``refresh`` or when absent)."""
        spec = str(self.config["online"].get("space", "auto"))
        now = time.monotonic()
        if refresh or self._space is None and now - self._space_checked > 1.0:
            self._space_checked = now
            self._space = resolve_space(self.engine, spec)
        return self._space

    def warm_up(self) -> None:
        """Load what the first event or request would: the item space (the trained
        pipeline) and every learner's state (a learner's optional ``warm_up()``)."""
        self.item_space()
        for learner in self.learners.values():
            learner.warm_up()

    def reset_space(self) -> None:
        """Forget the cached item spaces (after training or encoding new items)."""
        self._space, self._space_checked = None, 0.0
        self._spaces = None

    # -- writing -------------------------------------------------------------------------
    def item_id(self, external: str) -> int:
        """Internal id of a catalogue item (cached); NotFoundError when unknown."""
        found = self._items.get(str(external))
        if found is None:
            with self.engine.store.session() as s:
                found = self._items[str(external)] = catalog.get_item_id(s, str(external))
        return found

    def record(self, events: Sequence[Mapping[str, Any]], *,
               source: str = "feedback") -> list[Event]:
        """Check and store ``events`` in one transaction through the one writer of
        interactions (engine/ingest/interactions.py: checks, dedup rule, experiment
        tags), then let the learners observe the new ones. Returns one Event per input,
        in order. ``source`` names the caller in errors ('feedback', 'add_interactions')."""
        if not events:
            return []
        kinds = self.config["kind_weights"]
        checked = [interactions.check_event(e, row=n, kinds=kinds, source=source, now=time.time())
                   for n, e in enumerate(events, start=1)]
        for attempt in (0, 1):
            try:
                # A Core connection, not an ORM session: the single-event path is latency-bound.
                with self.engine.store.engine.begin() as conn:
                    stored = interactions.store_events(conn, checked, now=time.time(),
                                                       cache=self.ids, tag=self.tag_experiments,
                                                       old_ids=True)
                self.engine.store.written()
                break
            except IntegrityError:
                if attempt:
                    raise
                self.ids.clear()  # a cached id was deleted meanwhile: look up again
        out = [Event(id=i, user_id=row["user_id"], item_id=row["item_id"], user=e.user,
                     item=e.item, kind=e.kind, value=e.value, ts=row["ts"],
                     context=row["context"], weight=event_weight(e.kind, e.value, self.config),
                     new=new)
               for e, row, i, new in zip(stored.events, stored.rows, stored.ids, stored.new)]
        self.observe([e for e in out if e.new])
        return self._as_stored(out)

    def _as_stored(self, events: list[Event]) -> list[Event]:
        """Duplicates (an ``event_id`` stored before) as the row that was stored, not as
        the retry sent them: a retry with a later ``ts`` or another value changed nothing."""
        old = {e.id for e in events if not e.new and e.id}
        if not old:
            return events
        with self.engine.store.session() as s:
            rows = {r.id: r for r in s.execute(
                select(Interaction.id, Interaction.user_id, Interaction.item_id,
                       User.external_id.label("user"), Item.external_id.label("item"),
                       Interaction.kind, Interaction.value, Interaction.ts, Interaction.context)
                .join(User, User.id == Interaction.user_id)
                .join(Item, Item.id == Interaction.item_id)
                .where(Interaction.id.in_(old)))}
        out = []
        for e in events:
            r = rows.get(e.id) if not e.new else None
            out.append(e if r is None else replace(
                e, user_id=r.user_id, item_id=r.item_id, user=r.user, item=r.item,
                kind=r.kind, value=r.value, ts=r.ts, context=r.context,
                weight=event_weight(r.kind, r.value, self.config)))
        return out

    def tag_experiments(self, conn: Connection, users: Mapping[int, str]) -> dict[int, dict[str, str]]:
        """{user id: {experiment: variant}} of the active experiments, recorded in the
        caller's transaction; the writer of interactions tags each event's context."""
        from polyrec.feedback import experiments
        return experiments.tag_users(self.engine, conn, users)

    # -- learners observe ----------------------------------------------------------------
    def observe(self, events: Sequence[Event]) -> None:
        """Hand stored events to every learner; a failing learner is logged, not fatal
        (the events are stored and the learner catches up from the log)."""
        if not events:
            return
        if self._popularity is not None:
            for e in events:
                if e.kind not in ("impression", "skip"):
                    self._popularity[e.item_id] = self._popularity.get(e.item_id, 0) + 1
        for name, learner in self.learners.items():
            try:
                learner.observe(events)
            except Exception as exc:  # noqa: BLE001 - the events are already durable
                self._failed(name, "observe", exc)

    def _failed(self, name: str, what: str, exc: Exception) -> None:
        message = f"feedback learner '{name}' failed to {what} events: {type(exc).__name__}: {exc}"
        log.warning(message, exc_info=exc)
        self.errors.append(message)
        del self.errors[:-100]  # keep the latest

    def handoff(self, after_id: int, batch: int = 5000, total: int | None = None) -> int:
        """Hand every stored event with id > ``after_id`` to the learners (used after
        bulk ingestion), reading only the kinds they want (a learner's optional
        ``wanted_kinds()``: None for all). Returns how many were handed over. ``total``:
        how many events were stored, for the progress display (10M events take minutes)."""
        wanted: set[str] | None = set()
        self._popularity = None  # re-read: the ingestion added events
        for name, learner in self.learners.items():
            try:
                kinds = learner.wanted_kinds()
            except Exception as exc:  # noqa: BLE001 - the events are stored; it catches up later
                self._failed(name, "prepare for", exc)
                continue
            if kinds is None:
                wanted = None
                break
            wanted |= set(kinds)
        if wanted is not None and not wanted:
            return 0
        # stored_events reads a kinds filter in windows of ids (not quadratic)
        handed, cursor = 0, int(after_id)
        with progress_bar(total=total, desc="feedback learners: catching up", unit="events",
                          enabled=bool(getattr(self.engine, "progress", False)) and
                          total is not None and total >= batch, leave=False) as bar:
            while True:
                events = stored_events(self.engine, after_id=cursor, limit=batch,
                                       config=self.config,
                                       kinds=None if wanted is None else sorted(wanted))
                if not events:
                    return handed
                self.observe(events)
                handed += len(events)
                cursor = events[-1].id
                bar.update(len(events))

    def flush(self) -> None:
        """Persist the learners' state (``flush`` of each learner)."""
        for name, learner in (self._learners or {}).items():
            try:
                learner.flush()
            except Exception as exc:  # noqa: BLE001 - the events are stored; it catches up
                self._failed(name, "flush", exc)

    def close(self) -> None:
        self.flush()


_USER_STATE_COLUMNS = ("user_id", "space", "dim", "vector", "weight", "n_events", "last_ts",
                       "last_event_id")


def hub(engine: "Engine") -> FeedbackHub:
    """The engine's FeedbackHub (one per Engine, kept in ``engine.services``)."""
    return engine.services.feedback()


# -- reading the log -----------------------------------------------------------------------
#: ids per query when some kinds of the whole log are read with a limit (stored_events)
WINDOW = 10_000


def last_event_id(engine: "Engine") -> int:
    """The highest stored interaction id (0 for an empty store)."""
    with engine.store.session() as s:
        return int(s.execute(select(func.max(Interaction.id))).scalar() or 0)


def stored_events(engine: "Engine", *, after_id: int = 0, before_id: int | None = None,
                  user_id: int | None = None,
                  kinds: Iterable[str] | None = None, limit: int | None = None,
                  config: Mapping[str, Any] | None = None,
                  user_ids: Sequence[int] | None = None) -> list[Event]:
    """Stored events with id > ``after_id`` (and <= ``before_id``) in id order
    (optionally of one user, of some users (``user_ids``, at most 900) or of some kinds).

    Some kinds of every user, at most ``limit`` of them, are read in windows of
    ``WINDOW`` ids: one query with the kinds filter and LIMIT made the database read and
    sort every later event of those kinds for each call (8 s a call at 1M stored events
    on SQLite; quadratic for a caller reading the log ``limit`` events at a time)."""
    if (kinds is not None and limit is not None and user_id is None and user_ids is None):
        out: list[Event] = []
        lo, top = int(after_id), last_event_id(engine)
        if before_id is not None:
            top = min(top, int(before_id))
        step = max(WINDOW, int(limit))
        while lo < top and len(out) < limit:
            out += stored_events(engine, after_id=lo, before_id=min(lo + step, top),
                                 kinds=kinds, config=config)
            lo += step
        return out[:limit]
    config = config or hub(engine).config
    # the context as text, parsed here only when set: on PostgreSQL a CAST, or the driver
    # decodes the JSON of every row (a 'null' for most) itself
    column = Interaction.__table__.c.context
    raw_context = (type_coerce(column, Text) if engine.store.is_sqlite
                   else type_coerce(cast(column, Text), Text))
    query = (select(Interaction.id, Interaction.user_id, Interaction.item_id, User.external_id,
                    Item.external_id, Interaction.kind, Interaction.value, Interaction.ts,
                    raw_context)
             .join(User, User.id == Interaction.user_id).join(Item, Item.id == Interaction.item_id)
             .where(Interaction.id > after_id).order_by(Interaction.id))
    if before_id is not None:
        query = query.where(Interaction.id <= before_id)
    if user_id is not None:
        query = query.where(Interaction.user_id == user_id)
    if user_ids is not None:
        query = query.where(Interaction.user_id.in_(list(user_ids)))
    if kinds is not None:
        query = query.where(Interaction.kind.in_(list(kinds)))
    if limit is not None:
        query = query.limit(limit)
    with engine.store.engine.connect() as conn:  # Core rows: this reads whole logs
        rows = conn.execute(query).all()
    weights: dict[tuple[str, float | None], float] = {}
    out = []
    for r in rows:
        key = (r[5], r[6])
        weight = weights.get(key)
        if weight is None:
            weight = weights[key] = event_weight(r[5], r[6], config)
        raw = r[8]  # JSON text (a driver that decodes it anyway gives the object)
        context = (json.loads(raw) if isinstance(raw, str) else raw) \
            if raw is not None and raw != "null" else None
        out.append(Event(id=r[0], user_id=r[1], item_id=r[2], user=r[3], item=r[4], kind=r[5],
                         value=r[6], ts=r[7], context=context, weight=weight))
    return out


# -- API used by Engine (thin delegations) -------------------------------------------------
def feedback(engine: "Engine", user: str, item: str, kind: str = "click",
             value: float | None = None, ts: float | None = None,
             context: Mapping[str, Any] | None = None) -> Event:
    """Store one event durably, then hand it to the feedback learners."""
    return hub(engine).record([{"user": user, "item": item, "kind": kind, "value": value,
                                "ts": ts, "context": context}])[0]


def feedback_many(engine: "Engine", events: Sequence[Mapping[str, Any]]) -> list[Event]:
    """Store a batch of events (dicts with user, item, kind, value, ts, context) in one
    transaction, then hand the new ones to the learners."""
    return hub(engine).record(events)


def handoff(engine: "Engine", after_id: int, total: int | None = None) -> int:
    """Hand events stored by bulk ingestion (ids > ``after_id``) to the learners."""
    return hub(engine).handoff(after_id, total=total)


def user_state(engine: "Engine", user: str) -> torch.Tensor | None:
    """The vector of the learner in the ``user_state`` role for the user with external id
    ``user`` (or None)."""
    learner = hub(engine).role("user_state")
    if learner is None:
        return None
    with engine.store.session() as s:
        uid = catalog.user_ids(s, [str(user)]).get(str(user))
    return None if uid is None else learner.user_state(uid)


def describe(engine: "Engine", user: str) -> dict[str, Any]:
    """What the feedback learners hold for ``user`` (online state, bandit posterior)."""
    with engine.store.session() as s:
        uid = catalog.get_user_id(s, str(user))
    h = hub(engine)
    out: dict[str, Any] = {"user": str(user)}
    for name, learner in h.learners.items():
        described = learner.describe(uid)
        if described:
            out[name] = described
    return out


def explore(engine: "Engine", user_id: int | None, candidates: list[int], scores: list[float],
            k: int, *, enabled: bool | None = None) -> list[int]:
    """Let the bandit spend some of the ``k`` slots on exploration (when enabled for
    serving, or ``enabled``); returns the candidates (internal item ids) reordered."""
    h = hub(engine)
    bandit = h.role("explorer")
    on = h.config["bandit"].get("serving", False) if enabled is None else enabled
    if bandit is None or not on:
        return candidates
    return bandit.explore(candidates, scores, user_id=user_id, k=k)


# -- request-time hooks the Engine wires into polyrec.rank.recommend.Recommender ------------
def _sync_space(h: FeedbackHub, rec: Any) -> ItemSpace | None:
    """Make the hub's item space the one of this loaded pipeline (a new version after
    training replaces the old space; states then restart after its cutoff)."""
    if str(h.config["online"].get("space", "auto")) not in ("auto", "model"):
        return h.item_space()
    name = f"{PIPELINE_ARTIFACT}:v{rec.version}"
    space = h.item_space()
    if space is None or space.name != name or len(space.item_ids) < len(rec.data.item_ids):
        h._space = model_space(h.engine, rec)  # a new pipeline, or new items since
        h._space_checked = time.monotonic()
        space = h._space
    return space


def _gauss_ranks(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Scores replaced by the normal quantiles of their ranks among the ``ok`` entries
    (the best gets the highest): comparable across rankers whatever their scale, and
    robust to offsets such as a re-ranker's candidates-above-the-rest (0 elsewhere).
    Tied scores share their average rank: the order of items in the index (the newest
    last) never ranks one of them above another."""
    out = torch.zeros_like(x, dtype=torch.float32)
    n = int(ok.sum())
    if n < 2:
        return out
    idx = torch.nonzero(ok).flatten()
    values, order = torch.sort(x[idx].float())  # ascending
    _, counts = torch.unique_consecutive(values, return_counts=True)
    ends = torch.cumsum(counts, 0).float()  # one past each tie group's last position
    average = torch.repeat_interleave(ends - (counts.float() + 1.0) / 2.0, counts)
    p = (average + 0.5) / n
    out[idx[order]] = math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)
    return out


def online_share(h: FeedbackHub, rec: Any, user_id: int, strength: float) -> float:
    """The online part of a user's blended scores: ``w / (w + blend * (1 + n / scale))``
    with ``w`` the learner's strength for the user and ``n`` the user's events the model
    trained on (``online.history_scale``): a returning user with a long history keeps most
    of the model's ranking, a new user's recent events count at once."""
    cfg = h.config["online"]
    blend = float(cfg.get("blend", 6.0))
    scale = cfg.get("history_scale")
    u = rec.user_index.get(user_id) if getattr(rec, "user_index", None) is not None else None
    if scale and u is not None:
        blend *= 1.0 + len(rec.history[u]) / float(scale)
    strength = max(0.0, float(strength))
    return strength / (strength + blend) if strength + blend > 0 else 0.0


def online_scores(engine: "Engine", rec: Any, user_id: int, scores: torch.Tensor, *,
                  online: bool | None = None) -> torch.Tensor:
    """Blend the learner in the ``user_state`` role into one user's scores [n_items] (over
    ``rec.data``'s item index): ``(1 - s) * g(model) + s * g(learner.scores)`` with ``s``
    from :func:`online_share` and g the normal quantile of an item's rank among the
    scorable items (so any ranker's scale blends). Unchanged when the learner is off or
    has nothing for the user; items the model cannot score stay unscorable."""
    h = hub(engine)
    enabled = h.config["online"].get("enabled", True) if online is None else online
    learner = h.role("user_state")
    if not enabled or learner is None:
        return scores
    _sync_space(h, rec)
    strength = float(learner.strength(user_id))
    if strength <= 0.0:
        return scores
    mine = learner.scores(user_id, rec.data.item_ids)
    if mine is None or mine.shape[0] != scores.shape[0]:
        return scores
    mine = mine.detach().float().cpu()
    has = torch.isfinite(mine)
    if not bool(has.any()):
        return scores
    share = online_share(h, rec, user_id, strength)
    ok = torch.isfinite(scores)
    out = (1.0 - share) * _gauss_ranks(scores, ok) + share * _gauss_ranks(mine, ok & has)
    out[~ok] = scores[~ok]
    return out


def prefetch_users(engine: "Engine", rec: Any, user_ids: Sequence[int], *,
                   online: bool | None = None) -> None:
    """Before a block of recommendations: let the learner in the ``user_state`` role load
    these users at once (``FeedbackLearner.prefetch``), when online blending is on."""
    h = hub(engine)
    enabled = h.config["online"].get("enabled", True) if online is None else online
    learner = h.role("user_state")
    if not enabled or learner is None:
        return
    _sync_space(h, rec)
    learner.prefetch(list(user_ids))


def serving_explores(engine: "Engine") -> bool:
    """Whether recommendations explore (``bandit.serving``) and an explorer is set."""
    h = hub(engine)
    return bool(h.config["bandit"].get("serving", False)) and h.role("explorer") is not None


def explore_indices(engine: "Engine", rec: Any, user_id: int | None, scores: torch.Tensor,
                    picked: list[int], k: int, *, explore: bool | None = None) -> list[int]:
    """Let the bandit reorder a user's top ``k`` (dense item indices of ``rec.data``) when
    exploration is on for serving (setting ``bandit.serving``, or ``explore=True``): the
    candidate pool is the ``bandit.pool * k`` best scorable items plus up to
    ``bandit.new_items`` little-seen ones (the best scored; for an anonymous visitor,
    ``user_id`` None, the most recently added)."""
    h = hub(engine)
    bandit = h.role("explorer")
    on = h.config["bandit"].get("serving", False) if explore is None else explore
    if bandit is None or not on or not picked:
        return picked
    cfg = h.config["bandit"]
    ok = torch.isfinite(scores)
    n_ok = int(ok.sum())
    best = torch.topk(scores, min(n_ok, max(k, int(cfg.get("pool", 3)) * k))).indices.tolist()
    pool = list(picked) + [i for i in best if i not in set(picked)]  # the model's order first
    in_pool = set(pool)
    popularity = bandit.popularity() or h.item_counts()
    limit = int(cfg.get("new_item_max_events", 5))
    fresh = [i for i in torch.nonzero(ok).flatten().tolist()
             if i not in in_pool and popularity.get(rec.data.item_ids[i], 0) < limit]
    if user_id is None:  # an anonymous visitor: popularity says nothing here, the newest first
        fresh.sort(key=lambda i: -rec.data.item_ids[i])
    else:
        fresh.sort(key=lambda i: -float(scores[i]))
    pool += fresh[:int(cfg.get("new_items", 20))]
    ids = [rec.data.item_ids[i] for i in pool]
    dense = dict(zip(ids, pool))
    order = bandit.explore(ids, [float(scores[i]) for i in pool], user_id=user_id, k=k)
    return [dense[i] for i in order[:len(picked)]]



