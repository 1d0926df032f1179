"""Knowledge-graph embeddings: TransE and RotatE trained with negative sampling in torch.

``train_embeddings(tables, config)`` learns one vector per entity and per relation from
the triples of a ``GraphTables``. Negatives corrupt the head or the tail of each true
triple (Bernoulli per relation, after Wang et al. 2014, or uniformly); the loss is the
margin ranking loss or RotatE's self-adversarial loss. Training is batched, seeded and
runs on any torch device.
"""
from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polyrec.errors import ConfigError
from polyrec.progress import LINE_INTERVAL, progress_bar
from polyrec.knowledge_graph.graph import GraphTables

METHODS = ("transe", "rotate")
LOSSES = ("margin", "adversarial")
SAMPLINGS = ("bern", "uniform")


@dataclass(frozen=True)
class KGEConfig:
    """Hyperparameters of KG embedding training.

    ``dim`` is the width of an entity vector (for RotatE, twice the number of complex
    components, so it must be even). ``loss`` defaults to "margin" for TransE and
    "adversarial" for RotatE; ``margin`` is the TransE margin (default 1) or gamma of the
    self-adversarial loss (default 6). Each true triple is set against ``negatives``
    corrupted ones (default 64 for TransE, 16 for RotatE); ``chunk`` consecutive triples
    share one draw of negative entities (chunk=1: every triple its own). ``norm`` is the TransE distance (1 or 2), ``reg`` an
    L2 penalty on the embeddings in each batch.
    """

    method: str = "transe"
    dim: int = 64
    epochs: int = 10
    lr: float = 0.03
    margin: float | None = None
    negatives: int | None = None
    chunk: int = 64
    batch_size: int = 4096
    loss: str | None = None
    adversarial_temperature: float = 1.0
    norm: int = 2
    reg: float = 0.0
    sampling: str = "bern"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss is None:
            object.__setattr__(self, "loss", "margin" if self.method == "transe" else "adversarial")
        if self.margin is None:
            object.__setattr__(self, "margin", 1.0 if self.loss == "margin" else 6.0)
        if self.negatives is None:  # RotatE's distance has no matmul form: fewer by default
            object.__setattr__(self, "negatives", 64 if self.method == "transe" else 16)
        if self.method not in METHODS:
            raise ConfigError(f"unknown KG embedding method '{self.method}' (use {' or '.join(METHODS)})")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown KG loss '{self.loss}' (use {' or '.join(LOSSES)})")
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"unknown negative sampling '{self.sampling}' (use {' or '.join(SAMPLINGS)})")
        if self.dim < 2 or (self.method == "rotate" and self.dim % 2):
            raise ConfigError(f"dim must be >= 2 (and even for RotatE), got {self.dim}")
        for name in ("epochs", "negatives", "chunk", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.margin <= 0:
            raise ConfigError("lr and margin must be positive")
        if self.norm not in (1, 2):
            raise ConfigError(f"norm must be 1 or 2, got {self.norm}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TransE(nn.Module):
    """h + r ≈ t; distance ||h + r - t||_p; entities kept on the unit sphere."""

    def __init__(self, n_entities: int, n_relations: int, dim: int, p: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.p = p
        self.entity = nn.Embedding(n_entities, dim)
        self.relation = nn.Embedding(n_relations, dim)
        bound = 6.0 / math.sqrt(dim)
        with torch.no_grad():
            self.entity.weight.uniform_(-bound, bound, generator=generator)
            self.relation.weight.uniform_(-bound, bound, generator=generator)
            self.relation.weight.div_(self.relation.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.constrain()

    def distance(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (h + r - t).norm(p=self.p, dim=-1)

    def targets(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                corrupt_head: torch.Tensor) -> torch.Tensor:
        """Where a corrupted entity should lie: t - r for a new head, h + r for a new tail."""
        return torch.where(corrupt_head.unsqueeze(1), t - r, h + r)

    def gap(self, entities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Distances [g, c, k] of targets [g, c, d] from candidate entities [g, k, d]."""
        return torch.cdist(targets, entities, p=self.p)

    def relation_vectors(self, rels: torch.Tensor) -> torch.Tensor:
        return self.relation(rels)

    @torch.no_grad()
    def constrain(self) -> None:
        w = self.entity.weight
        w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))


class RotatE(nn.Module):
    """t ≈ h ∘ r in the complex plane, r a unit-modulus rotation (Sun et al., 2019)."""

    def __init__(self, n_entities: int, n_relations: int, dim: int, gamma: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.k = dim // 2
        self.range = (gamma + 2.0) / self.k
        self.entity = nn.Embedding(n_entities, dim)
        self.relation = nn.Embedding(n_relations, self.k)  # phases, scaled by range / pi
        with torch.no_grad():
            self.entity.weight.uniform_(-self.range, self.range, generator=generator)
            self.relation.weight.uniform_(-self.range, self.range, generator=generator)

    def _rotate(self, x: torch.Tensor, r: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        re_x, im_x = x.chunk(2, dim=-1)
        phase = r / (self.range / math.pi)
        re_r, im_r = torch.cos(phase), torch.sin(phase)
        if inverse:
            im_r = -im_r
        return torch.cat([re_x * re_r - im_x * im_r, re_x * im_r + im_x * re_r], dim=-1)

    @staticmethod
    def _modulus_sum(diff: torch.Tensor) -> torch.Tensor:
        re, im = diff.chunk(2, dim=-1)
        return torch.sqrt(re * re + im * im + 1e-12).sum(dim=-1)

    def distance(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._modulus_sum(self._rotate(h, r) - t)

    def targets(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                corrupt_head: torch.Tensor) -> torch.Tensor:
        """A new head should lie at t rotated back by r (|r| = 1), a new tail at h ∘ r."""
        return torch.where(corrupt_head.unsqueeze(1), self._rotate(t, r, inverse=True),
                           self._rotate(h, r))

    def gap(self, entities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._modulus_sum(targets.unsqueeze(2) - entities.unsqueeze(1))

    def relation_vectors(self, rels: torch.Tensor) -> torch.Tensor:
        return self.relation(rels)

    def constrain(self) -> None:
        """RotatE needs no projection: relations are rotations by construction."""


@dataclass
class KGEmbeddings:
    """Trained tables: ``entity[i]`` is the vector of ``entities[i]``, ``relation[j]`` of
    ``relations[j]`` (float32, on the CPU)."""

    entities: list[str]
    relations: list[str]
    entity: torch.Tensor
    relation: torch.Tensor
    config: KGEConfig
    graph_fingerprint: str = ""
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @cached_property
    def index(self) -> dict[str, int]:
        """entity external id -> row of ``entity``."""
        return {e: i for i, e in enumerate(self.entities)}

    @cached_property
    def relation_index(self) -> dict[str, int]:
        return {r: i for i, r in enumerate(self.relations)}

    def vector(self, entity: str) -> torch.Tensor:
        """The embedding of one entity (KeyError when unknown)."""
        return self.entity[self.index[entity]]

    def vectors(self, entities: Sequence[str]) -> torch.Tensor:
        """Embeddings of several entities, stacked [n, dim]."""
        return self.entity[torch.tensor([self.index[e] for e in entities], dtype=torch.long)]

    def to_bytes(self) -> bytes:
        """Serialise (torch.save of plain tensors, lists and dicts)."""
        buf = io.BytesIO()
        torch.save({"entities": self.entities, "relations": self.relations,
                    "entity": self.entity.contiguous(), "relation": self.relation.contiguous(),
                    "config": self.config.as_dict(), "graph_fingerprint": self.graph_fingerprint,
                    "losses": self.losses, "seconds": self.seconds}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "KGEmbeddings":
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return cls(entities=list(raw["entities"]), relations=list(raw["relations"]),
                   entity=raw["entity"], relation=raw["relation"], config=KGEConfig(**raw["config"]),
                   graph_fingerprint=raw["graph_fingerprint"], losses=list(raw["losses"]),
                   seconds=float(raw["seconds"]))


def head_corruption_probability(tables: GraphTables) -> np.ndarray:
    """Per relation, the chance of corrupting the head: tph / (tph + hpt) (Bernoulli trick).

    A one-to-many relation (many tails per head) corrupts heads more often, which makes
    fewer false negatives than corrupting its tails."""
    n_rel = max(tables.n_relations, 1)
    triples = np.bincount(tables.rels, minlength=n_rel).astype(np.float64)
    span = np.int64(max(tables.n_entities, 1))
    heads = np.bincount(np.unique(tables.rels * span + tables.heads) // span, minlength=n_rel)
    tails = np.bincount(np.unique(tables.rels * span + tables.tails) // span, minlength=n_rel)
    probs = np.full(n_rel, 0.5)
    used = triples > 0
    tph, hpt = triples[used] / heads[used], triples[used] / tails[used]
    probs[used] = tph / (tph + hpt)
    return probs


def _build(config: KGEConfig, n_entities: int, n_relations: int,
           generator: torch.Generator) -> nn.Module:
    if config.method == "transe":
        return TransE(n_entities, n_relations, config.dim, config.norm, generator)
    return RotatE(n_entities, n_relations, config.dim, config.margin, generator)


def _loss(config: KGEConfig, d_pos: torch.Tensor, d_neg: torch.Tensor) -> torch.Tensor:
    if config.loss == "margin":
        return F.relu(config.margin + d_pos.unsqueeze(1) - d_neg).mean()
    gamma = config.margin
    weights = torch.softmax(config.adversarial_temperature * (gamma - d_neg), dim=1).detach()
    positive = -F.logsigmoid(gamma - d_pos)
    negative = -(weights * F.logsigmoid(d_neg - gamma)).sum(dim=1)
    return ((positive + negative) / 2).mean()


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (None: leave the setting alone).

    Small ops on a busy machine are faster on one thread than fighting for two."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_embeddings(tables: GraphTables, config: KGEConfig | None = None, *,
                     device: torch.device | str = "cpu", progress: bool = True,
                     threads: int | None = None) -> KGEmbeddings:
    """Train ``config.method`` embeddings of every entity and relation of ``tables``.

    ``threads`` limits torch's CPU threads while training (restored afterwards)."""
    config = config or KGEConfig()
    if tables.n_triples == 0:
        raise ConfigError("the knowledge graph has no triples to train embeddings on; "
                          "import triples or run `polyrec kg build` first")
    with cpu_threads(threads if torch.device(device).type == "cpu" else None):
        return _train(tables, config, torch.device(device), progress)


def _train(tables: GraphTables, config: KGEConfig, device: torch.device,
           progress: bool) -> KGEmbeddings:
    started = time.perf_counter()
    cpu_gen = torch.Generator().manual_seed(config.seed)
    dev_gen = torch.Generator(device=device).manual_seed(config.seed)
    model = _build(config, tables.n_entities, tables.n_relations, cpu_gen).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)

    triples = torch.from_numpy(np.stack([tables.heads, tables.rels, tables.tails], axis=1)).to(device)
    head_prob = torch.from_numpy(head_corruption_probability(tables)).float().to(device)
    if config.sampling == "uniform":
        head_prob.fill_(0.5)
    n, k, chunk = triples.shape[0], config.negatives, config.chunk
    losses: list[float] = []
    bar = progress_bar(range(config.epochs), desc=f"kg {config.method}", unit="epoch",
                       enabled=bool(progress), interval=0 if config.epochs <= 50 else LINE_INTERVAL)
    for _ in bar:
        order = torch.randperm(n, generator=cpu_gen).to(device)
        total = torch.zeros((), device=device)
        for start in range(0, n, config.batch_size):
            batch = triples[order[start:start + config.batch_size]]
            b = batch.shape[0]
            h_idx, r_idx, t_idx = batch[:, 0], batch[:, 1], batch[:, 2]
            groups = -(-b // chunk)
            negatives = torch.randint(tables.n_entities, (groups, k), device=device, generator=dev_gen)
            corrupt_head = (torch.rand(b, device=device, generator=dev_gen) < head_prob[r_idx])
            h, t = model.entity(h_idx), model.entity(t_idx)
            r = model.relation_vectors(r_idx)
            neg = model.entity(negatives)
            d_pos = model.distance(h, r, t)
            targets = F.pad(model.targets(h, r, t, corrupt_head), (0, 0, 0, groups * chunk - b))
            d_neg = model.gap(neg, targets.view(groups, chunk, -1)).reshape(groups * chunk, k)[:b]
            loss = _loss(config, d_pos, d_neg)
            if config.reg > 0:
                loss = loss + config.reg * (h.pow(2).mean() + t.pow(2).mean() + neg.pow(2).mean())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            model.constrain()
            total += loss.detach() * b
        losses.append(float(total) / n)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    return KGEmbeddings(entities=list(tables.entities), relations=list(tables.relations),
                        entity=model.entity.weight.detach().float().cpu().clone(),
                        relation=model.relation.weight.detach().float().cpu().clone(),
                        config=config, graph_fingerprint=tables.fingerprint, losses=losses,
                        seconds=time.perf_counter() - started)
