"""The contracts a plugin implements: Encoder, Fuser, Ranker, FeedbackLearner, Reader,
IntentModel.

A component is a class with a unique ``name``. The core instantiates it with keyword
options (from the CLI or the Python API) and talks to it only through these methods.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping, Sequence

import torch
from torch import nn

from polyrec.errors import ConfigError
from polyrec.training_data import TrainingData

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine


@dataclass(frozen=True)
class ItemView:
    """A read-only view of one stored item, as encoders and rankers see it."""

    id: int  # internal id (primary key)
    external_id: str
    title: str | None = None
    text: str | None = None
    image: str | None = None  # path (relative to the image root) or URL-like reference
    attributes: dict[str, Any] = field(default_factory=dict)
    entity: str | None = None  # external id of the linked knowledge-graph entity


@dataclass
class EncodeResult:
    """What ``Encoder.encode`` returns: vectors for the items it could encode.

    ``vectors[i]`` belongs to ``item_ids[i]``; items listed in ``failed`` (id -> reason)
    get no vector, never a placeholder.
    """

    vectors: torch.Tensor
    item_ids: list[int]
    failed: dict[int, str] = field(default_factory=dict)


@dataclass
class EncoderContext:
    """What an encoder may use while it prepares: the engine and the device to run on."""

    engine: "Engine"
    device: torch.device
    batch_size: int | None = None
    progress: bool = True


class Encoder(ABC):
    """Turns items of one modality into vectors of width ``dim``."""

    name: ClassVar[str]
    modality: ClassVar[str]
    #: Name of another encoder of the same modality that this one stands in for where
    #: that one has no pretrained weights (image_cnn stands in for clip). The default
    #: encoder set, the fused item tower and similar items then use exactly one of the
    #: two: the other one when its :meth:`has_pretrained_weights` is True, else this one.
    stands_in_for: ClassVar[str | None] = None

    def __init__(self, **options: Any) -> None:
        self.options = options

    def has_pretrained_weights(self) -> bool | None:
        """Whether this encoder, as configured, encodes with pretrained weights that are
        available on this machine, told without loading the model (after ``prepare``:
        what it loaded). None when the question does not apply (nothing pretrained, such
        as embeddings trained in ``prepare``). Cheap; optional."""
        return None

    @property
    @abstractmethod
    def dim(self) -> int:
        """Width of the vectors this encoder returns."""

    def prepare(self, ctx: EncoderContext) -> None:
        """Load models or train embeddings before ``fingerprint``/``encode``. Optional."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A stable string naming model, weights and settings; a change invalidates the cache."""

    @abstractmethod
    def content(self, item: ItemView) -> str | None:
        """The input this encoder reads from ``item`` as a string (hashed for the cache).

        None means the item has nothing for this modality (no image, no linked entity):
        it is skipped and gets no vector.
        """

    def content_salt(self, ctx: EncoderContext) -> str:
        """Input shared by every item (e.g. the graph an entity is embedded in), mixed into
        each content hash so that a change of it re-encodes items. Cheap; optional."""
        return ""

    @abstractmethod
    def encode(self, items: Sequence[ItemView], ctx: EncoderContext) -> EncodeResult:
        """Encode ``items`` (all of which have content) on ``ctx.device``."""

    def encode_query(self, text: str, ctx: EncoderContext) -> torch.Tensor | None:
        """Embed a search query into this encoder's item space; None when unsupported."""
        return None


class Fuser(nn.Module):
    """Fuses per-modality item vectors into one vector per item.

    ``dims`` maps modality name -> input width, in a fixed order that also orders the
    columns of ``present`` and of the returned weights.
    """

    name: ClassVar[str]

    def __init__(self, dims: dict[str, int], out_dim: int, **options: Any) -> None:
        super().__init__()
        self.dims = dict(dims)
        self.modalities = list(dims)
        self.out_dim = out_dim

    def forward(self, tokens: dict[str, torch.Tensor],
                present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens[m]: [n, dims[m]] (zeros where absent); present: [n, M] bool.

        Returns (fused [n, out_dim], weights [n, M] summing to 1 over present modalities).
        """
        raise NotImplementedError


#: Options the core supplies itself to rankers that declare them (``device``, ``progress``,
#: ``fusers`` for a ranker declaring ``fuser``) or that are composite (``factory``); they
#: are never "unknown".
ENGINE_OPTIONS: tuple[str, ...] = ("device", "fusers", "progress", "factory")

_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}


@dataclass(frozen=True)
class Option:
    """One declared ranker option: its default, type, help and whether it takes a grid.

    Use it in ``Ranker.defaults`` where a plain default does not say enough::

        defaults = {"alpha": Option(0.5, help="smoothing"),              # float
                    "k": 20,                                             # int (plain default)
                    "l2": Option([10.0, 100.0], float, grid=True),       # a grid of floats
                    "mode": Option("fast", choices=("fast", "exact")),
                    "model": Option(None, str, help="a model id; None: built in")}

    ``type`` (default: the type of ``default``, or of its first element for a grid) is
    one of bool, int, float, str, list, dict, or None for "anything"; an int is accepted
    (and converted) where a float is declared; None (``none``/``null`` on the command
    line) is accepted when the default is None. ``grid=True``: the value may also be a
    list of values of ``type`` (the core converts each element); the ranker decides what
    a list means (usually: tune over it on validation data). ``choices``: the allowed
    values, checked after conversion.
    """

    default: Any = None
    type: type | None = None
    help: str = ""
    grid: bool = False
    choices: tuple[Any, ...] = ()
    #: True when inferred from a plain default (backward compatible, lenient about
    #: objects that only the Python API can pass, such as a Fuser class or a Ranker).
    inferred: bool = field(default=False, compare=False, repr=False)

    @property
    def type_name(self) -> str:
        """'float', 'a float or a list of floats', 'any value', ..."""
        base = _TYPE_NAMES.get(self.type, getattr(self.type, "__name__", "any value")) \
            if self.type is not None else "any value"
        return f"{base} or a list of {base}s (a grid)" if self.grid and self.type else base


def _option_from_default(value: Any) -> Option:
    """The Option a plain default stands for (see ``Ranker.defaults``)."""
    if isinstance(value, Option):
        if value.type is not None or value.default is None:
            return value
        sample = value.default[0] if value.grid and isinstance(value.default, (list, tuple)) \
            and value.default else value.default
        kind = type(sample) if type(sample) in _TYPE_NAMES else None
        return Option(value.default, kind, value.help, value.grid, value.choices)
    if value is None:
        return Option(None, None, inferred=True)
    if isinstance(value, (list, tuple)):
        if not value:  # an empty list says nothing about its elements
            return Option(list(value), None, inferred=True)
        kind = type(value[0])
        if kind in (bool, int, float, str):
            return Option(list(value), kind, grid=True, inferred=True)
        return Option(list(value), list, inferred=True)
    kind = type(value) if type(value) in _TYPE_NAMES else None
    return Option(value, kind, inferred=True)


def _from_text(text: str, kind: type | None) -> Any:
    """Parse command-line text as ``kind`` (ValueError when it is not one)."""
    if kind is None:  # undeclared type: JSON when it parses, else the text itself
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    if kind is str:
        return text
    if kind is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(text)
    if kind is int:
        return int(text.strip())
    if kind is float:
        return float(text.strip())
    value = json.loads(text)  # list, dict
    if not isinstance(value, kind):
        raise ValueError(text)
    return value


def _convert(value: Any, kind: type | None, text: bool, inferred: bool) -> Any:
    """One value converted to ``kind`` (ValueError when it cannot be)."""
    if kind is None:
        return _from_text(value, None) if text and isinstance(value, str) else value
    if isinstance(value, str) and (text or kind is not str):
        return _from_text(value, kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif kind is dict:
        if isinstance(value, Mapping):
            return dict(value)
    elif isinstance(value, kind):
        return value
    # a plain default's type is a guess: objects only Python code can pass (a Fuser
    # class, a Ranker instance) go through; plain data of the wrong type does not
    if inferred and not isinstance(value, (bool, int, float, str, list, tuple, dict)):
        return value
    raise ValueError(value)


@dataclass(frozen=True)
class RetrievalKeys:
    """The item side of a ranker whose scores are inner products (see
    :meth:`Ranker.retrieval_keys`): ``keys`` [n_items, D] (float32, CPU) and ``valid``
    (bool [n_items]): the items whose score is ``query @ keys[i]``. Other items are
    never retrieved this way (the ranker gives them ``-inf``, or a score it cannot
    express as a product, e.g. "after every scored item")."""

    keys: torch.Tensor
    valid: torch.Tensor


class Ranker(ABC):
    """Scores catalogue items for users; trained by ``polyrec train`` / ``Engine.train``,
    compared by ``polyrec evaluate``, served by ``polyrec recommend``.

    Required: ``name``, ``fit`` and ``score_users``. Everything else has a working default.

    **Options.** The core instantiates a ranker as ``cls(**options)``. Declare the options
    in ``defaults`` (name -> default value or :class:`Option`): the core then converts
    command-line text (``polyrec train --set alpha=0.5``, ``polyrec evaluate -o
    x.alpha=0.5``) and option grids (``-o x.alpha=[0.5,1]``) to the declared types before
    the ranker sees them, fills in the defaults of options not given (``self.options``
    holds them all after ``Ranker.__init__``), and refuses an unknown option or a value of
    the wrong type with one ``ConfigError`` naming ranker, option and expected type.
    Declaring ``epochs``, ``seed``, ``device`` or ``progress`` is also how a ranker asks
    for them: ``polyrec train --epochs/--seed`` and the engine's device and progress
    setting reach only the rankers (and pipeline members) that declare them. A ranker
    without ``defaults`` gets its options unchecked (command-line values parsed as JSON
    when they parse) and none of those settings.
    """

    name: ClassVar[str]
    #: True when the ranker can score items that had no interactions in training.
    handles_cold_items: ClassVar[bool] = False
    #: The declared options: name -> plain default (its type is the option's type; a
    #: non-empty list is a grid of its elements' type; None: any value) or an Option.
    #: Absent (None): the options are not checked.
    defaults: ClassVar[Mapping[str, Any] | None] = None
    #: True for rankers built from other rankers: they receive ``factory(name, options)
    #: -> Ranker`` among their options, which builds a member the way the core does.
    composite: ClassVar[bool] = False
    #: True when ``fit`` can run data-parallel over several worker processes
    #: (``polyrec train --ray``): see :meth:`set_data_parallel`.
    data_parallel: ClassVar[bool] = False
    #: What ``fit`` learned that is worth showing (chosen options, validation scores,
    #: epochs, modalities used): JSON-ready values. ``polyrec train`` prints and stores
    #: it with the model, ``polyrec evaluate`` reports it per model. Fill it in ``fit``
    #: (and restore it in ``load_state`` if you want it after loading).
    info: dict[str, Any]

    def __init__(self, **options: Any) -> None:
        self.options = {**self.default_options(), **self.check_options(options)}
        self.__dict__.setdefault("info", {})

    # -- options -------------------------------------------------------------------------
    @classmethod
    def option_schema(cls) -> dict[str, Option]:
        """The declared options as name -> Option (plain defaults turned into Options);
        empty when the ranker declares none."""
        defaults = getattr(cls, "defaults", None)
        if not isinstance(defaults, Mapping):
            return {}
        return {str(k): _option_from_default(v) for k, v in defaults.items()}

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        """name -> default of every declared option (lists copied)."""
        return {k: list(o.default) if isinstance(o.default, (list, tuple)) else o.default
                for k, o in cls.option_schema().items()}

    @classmethod
    def check_options(cls, options: Mapping[str, Any], *, text: bool = False) -> dict[str, Any]:
        """``options`` converted to their declared types (a new dict with the same keys).

        ``text=True``: every value is command-line text (an option of undeclared type is
        parsed as JSON when it parses). Strings given for a declared bool, int, float,
        list or dict option are parsed either way; a grid option's list has each element
        converted. Raises ConfigError for an unknown option (when the ranker declares
        ``defaults``) and for a value that is not of the declared type.
        """
        label = getattr(cls, "name", cls.__name__)
        if not isinstance(getattr(cls, "defaults", None), Mapping):
            return {k: _from_text(v, None) if text and isinstance(v, str) else v
                    for k, v in options.items()}
        schema = cls.option_schema()
        out: dict[str, Any] = {}
        for key, value in options.items():
            opt = schema.get(key)
            if opt is None:
                if key in ENGINE_OPTIONS:
                    out[key] = value
                    continue
                known = ", ".join(sorted(schema)) or "none"
                raise ConfigError(f"ranker '{label}' has no option '{key}' (options: {known})")
            if opt.default is None and (value is None or text and isinstance(value, str)
                                        and value.strip().lower() in ("none", "null")):
                out[key] = None  # an option whose default is None may be set back to None
                continue
            try:
                if opt.grid and isinstance(value, str) and (text or opt.type is not str):
                    raw = value.strip()
                    if raw.startswith("["):
                        value = json.loads(raw)
                    elif "," in raw:
                        value = [x.strip() for x in raw.split(",")]
                if opt.grid and isinstance(value, (list, tuple)):
                    # a plain list default may also stand for a list of specs: dict
                    # elements pass (e.g. {"name": ..., "options": ...} member specs)
                    converted: Any = [v if opt.inferred and isinstance(v, Mapping)
                                      else _convert(v, opt.type, text, opt.inferred)
                                      for v in value]
                    if opt.choices and any(v not in opt.choices for v in converted):
                        raise ValueError(value)
                else:
                    converted = _convert(value, opt.type, text, opt.inferred)
                    if opt.choices and converted not in opt.choices:
                        raise ValueError(value)
            except (ValueError, TypeError, json.JSONDecodeError):
                expected = opt.type_name + (f" (one of {', '.join(map(str, opt.choices))})"
                                            if opt.choices else "")
                raise ConfigError(f"ranker '{label}': option '{key}' expects {expected}, "
                                  f"not {value!r}") from None
            out[key] = converted
        return out

    # -- training and scoring ------------------------------------------------------------
    @abstractmethod
    def fit(self, data: TrainingData) -> None:
        """Learn from ``data`` (a :class:`~polyrec.TrainingData`: positive interactions over
        dense user and item indices, plus item feature vectors). Fill ``self.info``."""

    @abstractmethod
    def score_users(self, user_index: torch.Tensor, data: TrainingData) -> torch.Tensor:
        """Scores [len(user_index), data.n_items] of every catalogue item for a batch of
        dense user indices of ``data`` (higher is better; ``-inf`` for an item the ranker
        cannot score, which is then never recommended ahead of a scored one).

        **The catalogue grows.** At serving time ``data`` is the store as it is now, which
        may hold more items and users than the data ``fit`` saw (items and users added
        since training; indices of the old ones may move, ``data.item_ids`` /
        ``data.user_ids`` map them to the store's ids). The result must still have
        exactly ``data.n_items`` columns: score the new items (from their content in
        ``data.item_features``) or give them ``-inf``. A ranker that returns another shape
        is reported by name and the core serves the last model version that scores the
        current catalogue correctly.
        """

    def refit(self, data: TrainingData) -> None:
        """Fit again on ``data`` (usually more data than the last ``fit`` saw) with the
        hyper-parameters that fit chose (a tuned grid point, an early-stopped epoch
        count) instead of choosing them again. A composite ranker that tunes on a
        validation split calls it to train its parts on all the data afterwards. The
        default calls ``fit``; override it when ``fit`` tunes, so the work is not
        repeated."""
        self.fit(data)

    def state(self) -> dict[str, Any]:
        """Everything needed to restore the fitted ranker, stored with the model version:
        plain containers, numbers, strings and tensors only (loaded with torch's
        ``weights_only``)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what ``state()`` returned, on a ranker built with the same options."""

    # -- explanations (optional) ---------------------------------------------------------
    def explain(self, user: int, item: int, data: TrainingData) -> str | None:
        """Why ``item`` (a dense item index) suits ``user`` (a dense user index), in the
        ranker's own words, e.g. "3 of your 5 nearest neighbours watched it"; None (the
        default) when the ranker has nothing to add. Shown as the ``ranker`` part of
        ``polyrec recommend --explain``."""
        return None

    def components(self) -> list[tuple[str, "Ranker"]]:
        """The named sub-rankers whose scores this ranker combines (ensemble members, a
        re-ranker's retrieval ranker and scorers), as (label, ranker) pairs; [] (the
        default) for a single model. Explanations show each component's score, and look
        into components for item vectors and modality weights."""
        return []

    def modality_weights(self, data: TrainingData) -> tuple[list[str], torch.Tensor] | None:
        """How much each item modality counts for each item: (modality names, weights
        [data.n_items, M], rows summing to 1 over the modalities an item has), e.g. a
        fuser's attention; None (the default) when the ranker does not weigh modalities."""
        return None

    def item_vectors(self, data: TrainingData) -> torch.Tensor | None:
        """Learned item vectors [data.n_items, D] (similar items in explanations, MMR
        diversity and the online learners' item space use them); like
        :meth:`retrieval_keys` they must depend only on the fitted ranker and the items
        with their features (the core may save and reuse them per catalogue state). None
        (the default): the stored encoder vectors stand in."""
        return None

    # -- serving (optional) --------------------------------------------------------------
    def click_probability(self, user_index: torch.Tensor, items: torch.Tensor,
                          data: TrainingData) -> torch.Tensor | None:
        """For a ranker with a click model: the probability [b, c] that each user of
        ``user_index`` [b] clicks each of the items ``items`` [b, c] (dense item indices:
        the items recommended to that user, best first), reported as the score of the
        recommendations. ``Engine.recommend`` asks for one user, ``recommend_many`` for a
        block of users at once. An item's probability must not depend on which other
        items are asked with it (the k of the request): the one it was ranked with.
        None (the default): the ranker's scores are reported."""
        return None

    # -- retrieval in large catalogues (optional) ----------------------------------------
    def retrieval_keys(self, data: TrainingData) -> RetrievalKeys | None:
        """When every score this ranker gives is an inner product of a user vector and an
        item vector (a two-tower model, matrix factorisation): the item side, so the core
        can find a user's best items in a large catalogue with a vector index (HNSW)
        instead of scoring every item (see docs/serving.md, "Recommend at scale"). The
        contract: for the users the ranker knows (a history in ``data``) and every valid
        item ``i``, ``score_users(users, data)[:, i] == retrieval_queries(users, data) @
        keys[i]`` up to float rounding. The keys must depend only on the fitted ranker
        (its stored state) and the items of ``data`` with their features, never on the
        interactions: the core computes them once per catalogue state and, for a store
        with a file beside it, saves them there and reuses them in later processes for
        the same pipeline version and catalogue. None (the default): the core calls
        ``score_users`` for every item."""
        return None

    def retrieval_queries(self, user_index: torch.Tensor, data: TrainingData) -> torch.Tensor:
        """The user side [len(user_index), D] (float32, CPU) matching
        :meth:`retrieval_keys`. Required when ``retrieval_keys`` returns keys."""
        raise NotImplementedError(f"{type(self).__name__} returns retrieval_keys but does not "
                                  f"implement retrieval_queries")

    def warm_start(self, state: dict[str, Any]) -> bool:
        """Called before ``fit`` with what ``state()`` returned for the live version when
        the core retrains it (``polyrec retrain``, ``Engine.train(warm_start=VERSION)``):
        start from those weights instead of from scratch. The catalogue and the users may
        have grown since, so map anything indexed by item or user through the stored ids.
        Returns True when the state will be used; False (the default): fit from scratch."""
        return False

    def set_data_parallel(self, rank: int, world: int) -> None:
        """Called before ``fit`` in each of ``world`` worker processes of a data-parallel
        training run (``polyrec train --ray``: Ray Train, torch.distributed initialised),
        on rankers whose ``data_parallel`` is True. Each worker fits the same data: train
        on this worker's share of every batch with the gradients averaged across the
        workers (DistributedDataParallel) and take the same decisions everywhere (seed,
        shuffling, early stopping), so that every worker ends with the same ``state()``;
        the core keeps rank 0's."""
        raise NotImplementedError(f"{type(self).__name__} does not train data-parallel")


def _nothing(*_args: Any, **_kwargs: Any) -> Any:
    return None


@dataclass
class LearnerContext:
    """What a feedback learner may use, given to its constructor by the core.

    Every field is a plain attribute or a callable; a learner never needs the Engine or
    the core's private objects. Learners built outside an engine (e.g. to check
    settings) get a detached context (``LearnerContext(name)``): no events, no space,
    nothing stored.

    - ``name``: the learner's registered name; ``settings``: the whole feedback settings
      (``polyrec feedback config``), read-only; ``roles``: the roles this learner holds
      (``user_state``, ``explorer``, from the setting ``roles``).
    - ``events(after_id=0, *, user_ids=None, kinds=None, limit=None)``: stored events
      (``Event``: id, user_id, item_id, user, item, kind, value, ts, context, weight) with
      id > after_id, in id order.
    - ``item_space(refresh=False)``: the current item space (``ItemSpace``: name,
      item_ids, vectors, cutoff, ``vector(item_id)``); ``item_spaces()``: every space by
      name, ``"model"`` (the trained pipeline's item vectors) and each encoder's.
    - ``load_state(key="")`` -> ``(data: bytes, meta: dict) | None`` and
      ``save_state(data, meta, key="")``: the learner's own rows in ``learner_states``.
    - ``load_user_states(user_ids)`` -> ``{user_id: dict}`` and
      ``save_user_states(rows)``: its rows in ``user_states`` (dict keys: user_id, space,
      dim, vector (bytes), weight, n_events, last_ts, last_event_id).
    - ``item_counts()``: events per item id (impressions and skips excluded).
    - ``user_vector(user_id)``: the vector of the learner in the ``user_state`` role.
    - ``progress``: whether the host shows progress of long work (``Engine(progress=)``;
      the CLI without ``--quiet``): a learner reading many stored events at once shows it
      with ``polyrec.progress_bar(..., enabled=context.progress)``.
    """

    name: str
    settings: Any = field(default_factory=dict)
    roles: tuple[str, ...] = ()
    events: Any = field(default=lambda *a, **k: [])
    item_space: Any = field(default=_nothing)
    item_spaces: Any = field(default=lambda: {})
    load_state: Any = field(default=_nothing)
    save_state: Any = field(default=_nothing)
    load_user_states: Any = field(default=lambda user_ids: {})
    save_user_states: Any = field(default=_nothing)
    item_counts: Any = field(default=lambda: {})
    user_vector: Any = field(default=_nothing)
    attached: bool = False  # False: a detached context (no store behind it)
    progress: bool = False


class FeedbackLearner(ABC):
    """Learns from events online so the next request already reflects them.

    Built once per Engine as ``cls(context, **options)`` (options: the feedback settings
    stored under the learner's name). Only ``observe`` is required; the core calls the
    other methods on the learners that hold a role (setting ``roles``: ``user_state``
    blends ``scores``/``strength`` into recommendations, ``explorer`` reorders candidates
    with ``explore``) and the lifecycle methods on every learner.
    """

    name: ClassVar[str]
    #: Event kinds this learner adds, with their default weights (the feedback setting
    #: ``kind_weights``): once the plugin is loaded, every write path (files, the Python
    #: API, HTTP) accepts them; a stored ``kind_weights`` setting overrides the weight.
    kinds: ClassVar[Mapping[str, float]] = {}

    def __init__(self, context: LearnerContext | None = None, **options: Any) -> None:
        self.context = context if context is not None else LearnerContext(name=getattr(self, "name", ""))
        self.options = options

    @abstractmethod
    def observe(self, events: Sequence[Any]) -> None:
        """Take a batch of newly stored events (each event once, in id order)."""

    def wanted_kinds(self) -> set[str] | None:
        """Kinds to read back after a bulk ingestion; None for all, an empty set for none."""
        return None

    def forget_user(self, user_id: int) -> None:
        """Drop everything held in memory about a user who was just forgotten (their
        rows in ``user_states`` are already deleted; the learner is then rebuilt from
        the store). Default: nothing."""

    # -- role "user_state" ---------------------------------------------------------------
    def user_state(self, user_id: int) -> torch.Tensor | None:
        """The learner's current vector for a user (in ``context.item_space()``), if any."""
        return None

    def strength(self, user_id: int) -> float:
        """How much the user's online signal weighs (0: none); the core's share of it is
        ``strength / (strength + blend)``. Default: 1 when ``user_state`` has a vector."""
        return 1.0 if self.user_state(user_id) is not None else 0.0

    def prefetch(self, user_ids: Sequence[int]) -> None:
        """A batch of recommendations (``Engine.recommend_many``) is about to ask
        ``strength`` and ``scores`` for each of these users: load what they need at once
        (e.g. their stored states in one query) instead of user by user. Default:
        nothing."""

    def scores(self, user_id: int, item_ids: Sequence[int]) -> torch.Tensor | None:
        """Scores [len(item_ids)] of the user's online interest (NaN where unknown); None
        for no opinion. Default: ``user_state`` . the item space's vectors."""
        state = self.user_state(user_id)
        space = self.context.item_space()
        if state is None or space is None or state.shape[0] != space.dim:
            return None
        out = torch.full((len(item_ids),), float("nan"))
        for n, item in enumerate(item_ids):
            v = space.vector(int(item))
            if v is not None:
                out[n] = float(v.float() @ state.float())
        return out

    # -- role "explorer" -----------------------------------------------------------------
    def explore(self, candidates: list[int], scores: list[float], *, user_id: int | None = None,
                k: int | None = None) -> list[int]:
        """Reorder candidates (item ids, best first, with their model scores) to spend
        some of the ``k`` slots on exploration; identity by default."""
        return list(candidates)

    def popularity(self) -> dict[int, int]:
        """Events per item id, for the explorer's new-item candidates ({} = unknown)."""
        return {}

    # -- lifecycle -----------------------------------------------------------------------
    def warm_up(self) -> None:
        """Load state now rather than on the first event or request."""

    def flush(self) -> None:
        """Persist state (called on ``Engine.close`` and when settings change)."""

    def describe(self, user_id: int | None) -> dict[str, Any]:
        """What the learner holds for a user (``polyrec feedback state USER``)."""
        return {}


@dataclass
class Row:
    """One input record: its 1-based row number in the file and its fields."""

    number: int
    fields: dict[str, Any]


class Reader(ABC):
    """An input format. ``read`` yields rows as dicts of column -> value."""

    name: ClassVar[str]
    #: File suffixes this reader claims (".csv", ".inter", ...).
    suffixes: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def read(self, path: Path) -> Iterator[Row]:
        """Yield the rows of ``path``; raise ValidationError for unreadable input."""

    def columns(self, path: Path) -> list[str] | None:
        """Column names when the format has a header; None otherwise."""
        return None


@dataclass
class IntentData:
    """What an intent model is fitted on, built by the core from the store
    (``polyrec train-intent``). Rows of ``items``, ``vectors`` and ``demand`` are aligned.

    - ``items``: the catalogue items (attributes included; the model picks its targets).
    - ``vectors``: the text encoder's normalised item vectors [n, d] (the stored ones).
    - ``demand``: distinct users per item [n] (0 for items nobody interacted with).
    - ``histories``: per user, the rows of the items they interacted with, oldest first
      (users with at least one interaction on these items).
    - ``embed(texts) -> Tensor[len(texts), d]``: the same encoder on free text (queries),
      normalised, in the space of ``vectors``.
    - ``encoder`` / ``fingerprint``: which encoder made the space (stored with the model;
      a model is refused once the encoder's fingerprint changes).
    """

    items: list[ItemView]
    vectors: torch.Tensor
    demand: torch.Tensor
    histories: list[list[int]]
    embed: Any
    encoder: str
    fingerprint: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    seed: int = 0


@dataclass
class IntentPrediction:
    """What an intent model reads in one query (or item) vector.

    ``facets``: attribute field -> [(value, probability)] best first (the model's
    distribution over the field's values, its most likely values); ``demand``: the
    predicted demand (popularity) of what the text describes, on the scale of
    ``IntentModel.item_demand``.
    """

    facets: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    demand: float = 0.0

    def top(self, field_name: str) -> tuple[str, float] | None:
        """The most likely value of ``field_name`` and its probability (None: no such head)."""
        values = self.facets.get(field_name)
        return values[0] if values else None

    def as_dict(self) -> dict[str, Any]:
        return {"facets": {f: [{"value": v, "p": round(float(p), 4)} for v, p in vals]
                           for f, vals in self.facets.items()},
                "demand": round(float(self.demand), 4)}


class IntentModel(ABC):
    """Reads a shopper's intent in the vector space of one text encoder: a distribution
    over the values of the catalogue's categorical attributes (soft facets), a demand
    score, and a match to a user's history. Trained by ``polyrec train-intent`` from the
    catalogue itself, stored as an artifact with the encoder's fingerprint; search uses
    the loaded model on the query vector it already has.

    Required: ``name``, ``fit``, ``predict``, ``state`` and ``load_state``. Options come
    from ``polyrec train-intent --set KEY=VALUE`` as strings or from Python as values;
    the model converts and checks them (ConfigError for an unknown one).
    """

    name: ClassVar[str]
    #: What ``fit`` learned worth showing (fields, losses, epochs): JSON-ready values.
    info: dict[str, Any]

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.__dict__.setdefault("info", {})

    @abstractmethod
    def fit(self, data: IntentData) -> None:
        """Learn from ``data``; fill ``self.info``."""

    @abstractmethod
    def predict(self, vectors: torch.Tensor, top: int = 5) -> list[IntentPrediction]:
        """One prediction per row of ``vectors`` [b, d] (the encoder's normalised query
        or item vectors), each facet with its ``top`` most likely values."""

    def fields(self) -> list[str]:
        """The attribute fields the model predicts."""
        return []

    def item_demand(self, vectors: torch.Tensor) -> torch.Tensor | None:
        """Demand scores [n] of items from their vectors (higher: more wanted); None when
        the model has no demand head."""
        return None

    def user_match(self, vectors: torch.Tensor, history: torch.Tensor) -> torch.Tensor | None:
        """How well each row of ``vectors`` [b, d] matches a user whose history is the
        item vectors ``history`` [h, d]: scores [b] (higher: better); None when the model
        has no recommendation head."""
        return None

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Everything needed to restore the fitted model: plain containers, numbers,
        strings and tensors only (loaded with torch's ``weights_only``)."""

    @abstractmethod
    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what ``state()`` returned, on a model built with the same options."""
