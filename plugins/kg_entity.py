"""Knowledge-graph entity encoder ("kg", modality "kg").

``prepare`` reads the stored graph, then trains TransE or RotatE embeddings on it (see
knowledge_graph/embeddings.py) or reuses a trained table kept in the store as an
artifact (name ``kg_embeddings``) whose key matches: graph fingerprint +
hyperparameters + seed. An item's vector is its linked entity's embedding; an entity
with few triples (degree below ``sparse_degree``) is blended with the mean of its
neighbours' embeddings. Vectors are centred on the mean of the item entities (removing
the direction every film shares) and L2-normalised. Items without a linked entity have
no KG content and get no vector (a missing modality).

Options: method (transe|rotate), dim (64), epochs (10), lr (0.03), margin, negatives
(64), seed (0), and loss, batch_size, chunk, norm, reg, sampling (see KGEConfig);
sparse_degree (5), center (true), normalize (true); threads (torch CPU threads while
training on the CPU, default 1, 0 = torch's own setting; not part of the cache key: the
model's ops are small, and on the busy 2-core test machine one thread trained the default
configuration in 19 s where two took 128 s).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Sequence

import numpy as np
import torch
from sqlalchemy.orm import Session

from polyrec import (ConfigError, EncodeResult, Encoder, EncoderContext, EncodingError, ItemView,
                     hookimpl, list_artifacts, load_artifact, prune_artifacts, save_artifact)
from polyrec.knowledge_graph.embeddings import KGEConfig, KGEmbeddings, train_embeddings
from polyrec.knowledge_graph.graph import GraphTables, load_tables

ARTIFACT_NAME = "kg_embeddings"
ARTIFACT_KIND = "kg_embeddings"
#: Trained tables kept per database (older ones are deleted when a new one is stored).
KEEP_ARTIFACTS = 3

_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(KGEConfig)}
_ENCODER_OPTIONS = {"sparse_degree": int, "center": bool, "normalize": bool, "threads": int}


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """Options may arrive as strings from the CLI (--set kg.dim=32)."""
    if value is None or not isinstance(value, str):
        return value
    text = value.strip()
    kinds = str(kind)
    try:
        if kind is bool or kinds == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if "int" in kinds:
            return int(text)
        if "float" in kinds:
            return float(text)
    except ValueError:
        raise ConfigError(f"kg option {name}: cannot read {value!r} as {kinds}") from None
    return text


def find_artifact(session: Session, key: str) -> KGEmbeddings | None:
    """The newest stored embeddings trained under ``key``, if any."""
    for art in reversed(list_artifacts(session, ARTIFACT_NAME)):
        if art["meta"].get("key") == key:
            return KGEmbeddings.from_bytes(load_artifact(session, ARTIFACT_NAME, art["version"]).data)
    return None


def store_artifact(session: Session, key: str, emb: KGEmbeddings) -> int:
    """Store ``emb`` as the next version of ``kg_embeddings``; keep the newest few."""
    version = save_artifact(session, ARTIFACT_NAME, ARTIFACT_KIND, emb.to_bytes(),
                            {"key": key, "graph_fingerprint": emb.graph_fingerprint,
                             "config": emb.config.as_dict(), "entities": len(emb.entities),
                             "relations": len(emb.relations), "seconds": round(emb.seconds, 3),
                             "final_loss": emb.losses[-1] if emb.losses else None})
    prune_artifacts(session, ARTIFACT_NAME, keep=KEEP_ARTIFACTS)
    return version


class KGEntityEncoder(Encoder):
    """Item vector = trained embedding of the item's linked knowledge-graph entity."""

    name = "kg"
    modality = "kg"

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(_CONFIG_FIELDS) - set(_ENCODER_OPTIONS))
        if unknown:
            known = ", ".join(sorted(set(_CONFIG_FIELDS) | set(_ENCODER_OPTIONS)))
            raise ConfigError(f"unknown kg option(s): {', '.join(unknown)} (known: {known})")
        super().__init__(**options)
        config = {k: _coerce(k, v, _CONFIG_FIELDS[k].type) for k, v in options.items()
                  if k in _CONFIG_FIELDS}
        self.config = KGEConfig(**config)
        self.sparse_degree = int(_coerce("sparse_degree", options.get("sparse_degree", 5), int))
        self.center = bool(_coerce("center", options.get("center", True), bool))
        self.normalize = bool(_coerce("normalize", options.get("normalize", True), bool))
        threads = int(_coerce("threads", options.get("threads", 1), int) or 0)
        if threads < 0:
            raise ConfigError("kg threads must be >= 0 (0: torch's own setting)")
        self.threads = threads or None  # None: leave torch's setting alone
        if self.sparse_degree < 0:
            raise ConfigError("kg sparse_degree must be >= 0")
        self.embeddings: KGEmbeddings | None = None
        self.trained = False  # whether prepare() trained (False: reused a stored table)
        self._tables: GraphTables | None = None
        self._key = ""
        self._links = ""
        self._mean: torch.Tensor | None = None
        self._ptr = self._nbr = np.zeros(0, dtype=np.int64)

    # -- preparation ---------------------------------------------------------------------
    def key(self, graph_fingerprint: str) -> str:
        """What a stored table must have been trained under to be reused."""
        raw = json.dumps({"graph": graph_fingerprint, "config": self.config.as_dict()}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()

    def prepare(self, ctx: EncoderContext) -> None:
        with ctx.engine.store.session() as s:
            tables = load_tables(s)
        if tables.n_triples == 0:
            raise EncodingError("kg: the knowledge graph is empty; ingest triples "
                                "(polyrec ingest kg FILE --links LINKS) or run `polyrec kg build`")
        key = self.key(tables.fingerprint)
        if self.embeddings is None or self._key != key:
            with ctx.engine.store.session() as s:
                emb = find_artifact(s, key)
            self.trained = emb is None
            if emb is None:
                emb = train_embeddings(tables, self.config, device=ctx.device, progress=ctx.progress,
                                       threads=self.threads)
                with ctx.engine.store.session() as s:
                    store_artifact(s, key, emb)
            self.embeddings, self._key = emb, key
        self._tables = tables
        self._ptr, self._nbr = tables.neighbour_lists()
        linked = [i for i, item in enumerate(tables.items) if item is not None]
        self._links = hashlib.sha256("\x1e".join(sorted(f"{tables.items[i]}\x1f{tables.entities[i]}"
                                                        for i in linked)).encode()).hexdigest()
        self._mean = None
        trained_items = [i for i in linked if tables.degrees[i] > 0]
        if self.center and trained_items:
            self._mean = self._raw(trained_items).mean(dim=0)

    def _require(self) -> tuple[KGEmbeddings, GraphTables]:
        if self.embeddings is None or self._tables is None:
            raise EncodingError("kg: call prepare() before fingerprint() or encode()")
        return self.embeddings, self._tables

    # -- the contract --------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.config.dim

    def fingerprint(self) -> str:
        self._require()
        settings = json.dumps({"key": self._key, "links": self._links if self.center else "",
                               "sparse_degree": self.sparse_degree, "center": self.center,
                               "normalize": self.normalize}, sort_keys=True)
        return f"kg/{self.config.method}-{self.config.dim}/{hashlib.sha256(settings.encode()).hexdigest()[:24]}"

    def content(self, item: ItemView) -> str | None:
        return f"entity:{item.entity}" if item.entity else None

    def content_salt(self, ctx: EncoderContext) -> str:
        """The graph's fingerprint: new triples re-encode every linked item."""
        with ctx.engine.store.session() as s:
            return load_tables(s).fingerprint

    def encode(self, items: Sequence[ItemView], ctx: EncoderContext) -> EncodeResult:
        emb, tables = self._require()
        rows, ids, failed = [], [], {}
        for item in items:
            row = tables.entity_index.get(item.entity) if item.entity else None
            if row is None or item.entity not in emb.index:
                failed[item.id] = (f"entity '{item.entity}' is not in the trained graph"
                                   if item.entity else "no linked entity")
            elif tables.degrees[row] == 0:
                failed[item.id] = f"entity '{item.entity}' has no triples"
            else:
                rows.append(row)
                ids.append(item.id)
        vectors = self._raw(rows) if rows else torch.empty(0, self.dim)
        if self._mean is not None and rows:
            vectors = vectors - self._mean
        if self.normalize and rows:
            vectors = torch.nn.functional.normalize(vectors, dim=1)
        return EncodeResult(vectors=vectors, item_ids=ids, failed=failed)

    # -- vectors -------------------------------------------------------------------------
    def _raw(self, rows: Sequence[int]) -> torch.Tensor:
        """Embeddings of entity rows of the tables, sparse entities blended with their
        neighbours (before centring and normalisation)."""
        emb, tables = self._require()
        table = emb.entity
        order = torch.tensor([emb.index[tables.entities[r]] for r in rows], dtype=torch.long)
        out = table[order].clone()
        if self.sparse_degree <= 0:
            return out
        for k, r in enumerate(rows):
            degree = int(tables.degrees[r])
            if 0 < degree < self.sparse_degree:
                nbrs = self._nbr[self._ptr[r]:self._ptr[r + 1]]
                idx = torch.tensor([emb.index[tables.entities[n]] for n in np.unique(nbrs)],
                                   dtype=torch.long)
                weight = degree / self.sparse_degree
                out[k] = weight * out[k] + (1 - weight) * table[idx].mean(dim=0)
        return out


@hookimpl
def register_encoders(register):  # type: ignore[no-untyped-def]
    register(KGEntityEncoder)
