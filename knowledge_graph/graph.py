"""The knowledge graph read from the store: compact triple tables and a networkx view.

``load_tables`` reads entities, relations and triples in three queries into integer
arrays (what embedding training needs); ``to_networkx`` turns them into a
``networkx.MultiDiGraph`` whose nodes are entity external ids (attributes ``label``,
``type``, ``item``) and whose edges are keyed by relation name. ``fingerprint`` names
the graph's content, so trained embeddings and cached vectors can tell when it changed.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import networkx as nx
import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from polyrec.store.models import Entity, Item, Relation, Triple


@dataclass
class GraphTables:
    """The graph as arrays: triple k is (entities[heads[k]], relations[rels[k]], entities[tails[k]]).

    ``labels``, ``types`` and ``items`` are aligned with ``entities``; ``items[i]`` is the
    external id of the catalogue item linked to entity i (None when unlinked). An entity
    without a label of its own that is linked to an item takes the item's title.
    """

    entities: list[str]
    relations: list[str]
    heads: np.ndarray
    rels: np.ndarray
    tails: np.ndarray
    labels: list[str | None] = field(default_factory=list)
    types: list[str | None] = field(default_factory=list)
    items: list[str | None] = field(default_factory=list)

    @property
    def n_entities(self) -> int:
        return len(self.entities)

    @property
    def n_relations(self) -> int:
        return len(self.relations)

    @property
    def n_triples(self) -> int:
        return int(self.heads.shape[0])

    @cached_property
    def entity_index(self) -> dict[str, int]:
        """entity external id -> row in ``entities``."""
        return {e: i for i, e in enumerate(self.entities)}

    @cached_property
    def item_entities(self) -> dict[str, str]:
        """item external id -> external id of its linked entity."""
        return {item: self.entities[i] for i, item in enumerate(self.items) if item is not None}

    @cached_property
    def degrees(self) -> np.ndarray:
        """Number of triples touching each entity (in + out)."""
        n = self.n_entities
        return (np.bincount(self.heads, minlength=n) + np.bincount(self.tails, minlength=n)).astype(np.int64)

    def relation_counts(self) -> dict[str, int]:
        """relation name -> number of triples, most frequent first (ties by name)."""
        counts = np.bincount(self.rels, minlength=self.n_relations)
        order = sorted(range(self.n_relations), key=lambda r: (-counts[r], self.relations[r]))
        return {self.relations[r]: int(counts[r]) for r in order if counts[r] > 0}

    def neighbour_lists(self) -> tuple[np.ndarray, np.ndarray]:
        """Undirected adjacency in CSR form: neighbours of i are ``idx[ptr[i]:ptr[i+1]]``."""
        src = np.concatenate([self.heads, self.tails])
        dst = np.concatenate([self.tails, self.heads])
        order = np.argsort(src, kind="stable")
        ptr = np.zeros(self.n_entities + 1, dtype=np.int64)
        np.cumsum(np.bincount(src, minlength=self.n_entities), out=ptr[1:])
        return ptr, dst[order]

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the sorted entity ids and the sorted (head, relation, tail) triples.

        Independent of database ids and insertion order; item links and labels are not
        part of it (they do not change what embeddings learn)."""
        return graph_fingerprint(self)


def load_tables(session: Session) -> GraphTables:
    """Read the whole stored graph into a GraphTables (three queries, no ORM objects)."""
    rows = session.execute(select(Entity.id, Entity.external_id, Entity.label, Entity.type,
                                  Item.external_id, Item.title)
                           .outerjoin(Item, Entity.item_id == Item.id)
                           .order_by(Entity.id)).all()
    position = {row[0]: k for k, row in enumerate(rows)}
    entities = [r[1] for r in rows]
    labels = [r[2] if r[2] is not None else r[5] for r in rows]
    types = [r[3] for r in rows]
    items = [r[4] for r in rows]
    rel_rows = session.execute(select(Relation.id, Relation.name).order_by(Relation.id)).all()
    rel_position = {rid: k for k, (rid, _) in enumerate(rel_rows)}
    relations = [name for _, name in rel_rows]
    triples = session.execute(select(Triple.head_id, Triple.relation_id, Triple.tail_id)
                              .order_by(Triple.id)).all()
    if triples:
        raw = np.fromiter(itertools.chain.from_iterable(triples), dtype=np.int64,
                          count=3 * len(triples)).reshape(-1, 3)
        ent_map = np.full(max(position) + 1, -1, dtype=np.int64)
        ent_map[list(position)] = list(position.values())
        rel_map = np.full(max(rel_position) + 1, -1, dtype=np.int64)
        rel_map[list(rel_position)] = list(rel_position.values())
        heads, rels, tails = ent_map[raw[:, 0]], rel_map[raw[:, 1]], ent_map[raw[:, 2]]
    else:
        heads = rels = tails = np.zeros(0, dtype=np.int64)
    return GraphTables(entities=entities, relations=relations, heads=heads, rels=rels,
                       tails=tails, labels=labels, types=types, items=items)


def graph_fingerprint(tables: GraphTables) -> str:
    """Content hash of a graph (see ``GraphTables.fingerprint``)."""
    digest = hashlib.sha256()
    ents = np.asarray(tables.entities, dtype=object)
    digest.update("\x1e".join(sorted(tables.entities)).encode())
    digest.update(b"\x1d")
    if tables.n_triples:
        rels = np.asarray(tables.relations, dtype=object)
        lines = sorted(map("\x1f".join, zip(ents[tables.heads], rels[tables.rels], ents[tables.tails])))
        digest.update("\x1e".join(lines).encode())
    return digest.hexdigest()


def to_networkx(tables: GraphTables) -> nx.MultiDiGraph:
    """A MultiDiGraph: nodes are entity external ids (attrs label, type, item), edges go
    head -> tail keyed by relation name (attr ``relation``). ``graph.graph`` holds
    ``fingerprint``, ``item_entities`` (item external id -> entity id) and
    ``relation_counts`` (relation -> triples)."""
    graph = nx.MultiDiGraph(fingerprint=tables.fingerprint, item_entities=dict(tables.item_entities),
                            relation_counts=tables.relation_counts())
    graph.add_nodes_from((e, {"label": lab, "type": typ, "item": item}) for e, lab, typ, item
                         in zip(tables.entities, tables.labels, tables.types, tables.items))
    ents, rels = tables.entities, tables.relations
    graph.add_edges_from((ents[h], ents[t], rels[r], {"relation": rels[r]}) for h, r, t
                         in zip(tables.heads.tolist(), tables.rels.tolist(), tables.tails.tolist()))
    return graph


def load_graph(session: Session) -> nx.MultiDiGraph:
    """The stored knowledge graph as a networkx MultiDiGraph (see ``to_networkx``)."""
    return to_networkx(load_tables(session))


def describe(session: Session, top: int = 10) -> dict[str, Any]:
    """Counts of the stored graph: entities, relations, triples (by source), linked items,
    degree figures, the ``top`` relations by triples, and the fingerprint."""
    tables = load_tables(session)
    by_source = {src or "unknown": n for src, n in session.execute(
        select(Triple.source, func.count()).group_by(Triple.source)).all()}
    degrees = tables.degrees
    relations = tables.relation_counts()
    return {"entities": tables.n_entities, "relations": len(relations), "triples": tables.n_triples,
            "linked_items": len(tables.item_entities),
            "isolated_entities": int((degrees == 0).sum()) if tables.n_entities else 0,
            "mean_degree": round(float(degrees.mean()), 3) if tables.n_entities else 0.0,
            "max_degree": int(degrees.max()) if tables.n_entities else 0,
            "triples_by_source": by_source,
            "top_relations": dict(list(relations.items())[:top]),
            "fingerprint": tables.fingerprint}


def item_pairs_sharing(graph: nx.MultiDiGraph, relation: str,
                       min_shared: int = 1) -> list[tuple[str, str]]:
    """Pairs of item ids (sorted within a pair) whose entities point by ``relation`` to at
    least ``min_shared`` common nodes (films with the same director, or two actors in
    common): the ground truth of "related items" for KG embedding checks."""
    from collections import defaultdict
    item_of = {ent: item for item, ent in graph.graph["item_entities"].items()}
    by_tail: dict[str, list[str]] = defaultdict(list)
    for head, tail, key in graph.edges(keys=True):
        if key == relation and head in item_of:
            by_tail[tail].append(item_of[head])
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for items in by_tail.values():
        for pair in itertools.combinations(sorted(set(items)), 2):
            counts[pair] += 1
    return [p for p, n in counts.items() if n >= min_shared]
