"""The contracts a plugin implements: Encoder, Fuser, Ranker, FeedbackLearner, Reader.

A component is a class with a unique ``name``. The core instantiates it with keyword
options (from the CLI or the Python API) and talks to it only through these methods.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

import torch
from torch import nn

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

    def __init__(self, **options: Any) -> None:
        self.options = options

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


class Ranker(ABC):
    """Scores items for a context (a user's history, a query vector, an item)."""

    name: ClassVar[str]
    #: True when the ranker can score items that had no interactions in training.
    handles_cold_items: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.options = options

    @abstractmethod
    def fit(self, data: Any) -> None:
        """Learn from a training dataset (see polyrec.training_data.TrainingData)."""

    @abstractmethod
    def score_users(self, user_index: torch.Tensor, data: Any) -> torch.Tensor:
        """Scores [len(user_index), n_items] for every catalogue item."""

    def state(self) -> dict[str, Any]:
        """Everything needed to restore the fitted ranker (stored as an artifact)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what ``state()`` returned."""


class FeedbackLearner(ABC):
    """Learns from events online so the next request already reflects them."""

    name: ClassVar[str]

    def __init__(self, **options: Any) -> None:
        self.options = options

    @abstractmethod
    def observe(self, events: Sequence[Any]) -> None:
        """Take a batch of stored events."""

    def user_state(self, user_id: int) -> torch.Tensor | None:
        """The learner's current vector for a user, if it keeps one."""
        return None

    def explore(self, candidates: list[int], scores: list[float]) -> list[int]:
        """Reorder candidates to spend some slots on exploration; identity by default."""
        return candidates


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
