"""Persistence of the knowledge graph in the polyrec store: entities, relations, triples,
and the links from catalogue items to entities. Callers own the transaction."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from polyrec.store.catalog import _insert, item_ids
from polyrec.store.models import Entity, Relation, Triple


def ensure_entities(session: Session, external_ids: Iterable[str],
                    labels: Mapping[str, str] | None = None,
                    types: Mapping[str, str] | None = None) -> dict[str, int]:
    """Internal ids of entities, creating unknown ones (label/type set on creation)."""
    wanted = list(dict.fromkeys(str(e) for e in external_ids))
    labels, types = labels or {}, types or {}
    if wanted:
        stmt = _insert(session, Entity.__table__).on_conflict_do_nothing(index_elements=["external_id"])
        session.execute(stmt, [{"external_id": e, "label": labels.get(e), "type": types.get(e)}
                               for e in wanted])
    found: dict[str, int] = {}
    for start in range(0, len(wanted), 900):
        chunk = wanted[start:start + 900]
        found.update(session.execute(select(Entity.external_id, Entity.id)
                                     .where(Entity.external_id.in_(chunk))).all())
    return found


def ensure_relations(session: Session, names: Iterable[str]) -> dict[str, int]:
    """Internal ids of relations, creating unknown ones."""
    wanted = list(dict.fromkeys(str(n) for n in names))
    if wanted:
        stmt = _insert(session, Relation.__table__).on_conflict_do_nothing(index_elements=["name"])
        session.execute(stmt, [{"name": n} for n in wanted])
    return dict(session.execute(select(Relation.name, Relation.id)
                                .where(Relation.name.in_(wanted))).all()) if wanted else {}


def add_triples(session: Session, triples: Sequence[tuple[str, str, str]],
                source: str | None = None) -> int:
    """Store (head, relation, tail) triples of external ids; duplicates are ignored.
    Returns how many triples were given (stored or already present)."""
    if not triples:
        return 0
    ents = ensure_entities(session, [t[0] for t in triples] + [t[2] for t in triples])
    rels = ensure_relations(session, [t[1] for t in triples])
    stmt = _insert(session, Triple.__table__).on_conflict_do_nothing(
        index_elements=["head_id", "relation_id", "tail_id"])
    session.execute(stmt, [{"head_id": ents[str(h)], "relation_id": rels[str(r)],
                            "tail_id": ents[str(t)], "source": source} for h, r, t in triples])
    return len(triples)


def link_items(session: Session, links: Mapping[str, str]) -> int:
    """Link catalogue items to entities: {item external id: entity external id}.

    Unknown items are skipped (returned count excludes them); entities are created."""
    items = item_ids(session, links)
    pairs = {str(item): str(ent) for item, ent in links.items() if str(item) in items}
    if not pairs:
        return 0
    ents = ensure_entities(session, pairs.values())
    linked = [items[item] for item in pairs]
    for start in range(0, len(linked), 900):  # an item links to one entity: clear old links
        session.execute(update(Entity).where(Entity.item_id.in_(linked[start:start + 900]))
                        .values(item_id=None))
    table = Entity.__table__
    session.execute(table.update().where(table.c.id == bindparam("eid"))
                    .values(item_id=bindparam("iid")),
                    [{"eid": ents[ent], "iid": items[item]} for item, ent in pairs.items()])
    return len(pairs)
