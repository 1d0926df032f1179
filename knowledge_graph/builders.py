"""Builders: turn item attributes into knowledge-graph triples.

Each ``AttributeRule`` maps one item attribute to a relation: item ``-has_colour->``
``colour:black``. Values become entities named ``<prefix>:<normalised value>`` (label =
the value as written, type = the prefix); list values (RecBole ``token_seq`` such as
ml-100k's genres) give one triple per element; a ``decade`` rule turns a year into
``decade:1990s``. Each item's head entity is its linked entity, or a new ``item:<id>``
entity linked to it. Building again replaces the triples an earlier build made for the
same relations, so the graph follows the attributes.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from polyrec.store.catalog import item_views
from polyrec.errors import ConfigError
from polyrec.store.models import Entity, Relation, Triple
from polyrec.knowledge_graph.store import add_triples, ensure_entities, link_items

#: The ``source`` of triples made from attributes.
SOURCE = "attributes"


@dataclass(frozen=True)
class AttributeRule:
    """attribute -> relation; ``prefix`` names (and types) the value entities; ``split``
    splits string values (e.g. " " or "|"); ``transform`` is None or "decade"."""

    attribute: str
    relation: str
    prefix: str
    split: str | None = None
    transform: str | None = None

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"unknown attribute transform '{self.transform}' "
                              f"(known: {', '.join(t for t in TRANSFORMS if t)})")
        for name in ("attribute", "relation", "prefix"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"an attribute rule needs a non-empty {name}")


def _decade(value: str) -> str | None:
    match = re.search(r"(1[0-9]|20)\d\d", value)
    return f"{match.group(0)[:3]}0s" if match else None


TRANSFORMS: dict[str | None, Callable[[str], str | None]] = {None: lambda v: v, "decade": _decade}

#: Rules applied by default, for whichever of these attributes an item has. The H&M
#: columns (``colour_group_name``, ...) and MovieLens' (``class``, ``release_year``) are
#: covered, as are plain names (colour, genre, brand, ...).
DEFAULT_RULES: tuple[AttributeRule, ...] = (
    AttributeRule("colour_group_name", "has_colour", "colour"),
    AttributeRule("colour", "has_colour", "colour"),
    AttributeRule("color", "has_colour", "colour"),
    AttributeRule("perceived_colour_master_name", "has_colour_family", "colour_family"),
    AttributeRule("department_name", "in_department", "department"),
    AttributeRule("department", "in_department", "department"),
    AttributeRule("product_type_name", "has_type", "type"),
    AttributeRule("product_type", "has_type", "type"),
    AttributeRule("product_group_name", "in_group", "group"),
    AttributeRule("graphical_appearance_name", "has_pattern", "pattern"),
    AttributeRule("garment_group_name", "in_garment_group", "garment_group"),
    AttributeRule("index_group_name", "in_index_group", "index_group"),
    AttributeRule("section_name", "in_section", "section"),
    AttributeRule("class", "has_genre", "genre", split=" "),
    AttributeRule("genre", "has_genre", "genre", split="|"),
    AttributeRule("genres", "has_genre", "genre", split="|"),
    AttributeRule("category", "in_category", "category"),
    AttributeRule("brand", "has_brand", "brand"),
    AttributeRule("release_year", "released_in", "decade", transform="decade"),
    AttributeRule("year", "released_in", "decade", transform="decade"),
)

_RELATION_VERBS = re.compile(r"^(has|in|is|of|by|with)_|_(in|of|by)$")


def parse_rule(spec: str) -> AttributeRule:
    """``ATTR=RELATION`` -> a rule. A known attribute keeps its default prefix, split and
    transform; otherwise the prefix is the relation without its verb (has_/in_/...)."""
    attr, sep, relation = spec.partition("=")
    attr, relation = attr.strip(), relation.strip()
    if not sep or not attr or not relation:
        raise ConfigError(f"attribute rule '{spec}' must look like ATTR=RELATION (e.g. colour=has_colour)")
    known = next((r for r in DEFAULT_RULES if r.attribute == attr), None)
    if known is not None:
        return AttributeRule(attr, relation, known.prefix, known.split, known.transform)
    prefix = _RELATION_VERBS.sub("", relation) or attr
    return AttributeRule(attr, relation, prefix)


def entity_id(prefix: str, value: str) -> str:
    """``colour:dark_blue`` for prefix colour and value 'Dark Blue'."""
    norm = re.sub(r"\s+", "_", value.strip().lower())
    return f"{prefix}:{norm}"


def _values(rule: AttributeRule, raw: Any) -> list[str]:
    if raw is None:
        return []
    parts: Iterable[Any]
    if isinstance(raw, (list, tuple, set)):
        parts = raw
    elif isinstance(raw, str) and rule.split is not None:
        parts = raw.split(rule.split) if rule.split.strip() else raw.split()
    else:
        parts = [raw]
    out = []
    for part in parts:
        if part is None or isinstance(part, (dict, list)):
            continue
        text = str(int(part)) if isinstance(part, float) and part.is_integer() else str(part).strip()
        if not text or text.lower() in ("nan", "none", "null", "unknown"):
            continue
        value = TRANSFORMS[rule.transform](text)
        if value:
            out.append(value)
    return list(dict.fromkeys(out))


@dataclass
class BuildReport:
    """What ``build_from_attributes`` did."""

    items: int = 0  # items that got at least one triple
    triples: int = 0  # triples now stored from attributes
    removed: int = 0  # triples of an earlier build that were replaced
    new_item_entities: int = 0  # items that got an ``item:<id>`` entity
    relations: dict[str, int] = field(default_factory=dict)  # relation -> triples
    rules: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_from_attributes(session: Session, rules: Sequence[AttributeRule] | None = None
                          ) -> BuildReport:
    """Make triples from every item's attributes with ``rules`` (DEFAULT_RULES when None)
    and store them, replacing those of earlier builds for the same relations."""
    rules = list(DEFAULT_RULES if rules is None else rules)
    if not rules:
        raise ConfigError("no attribute rules given")
    report = BuildReport(rules=[asdict(r) for r in rules])
    relations = sorted({r.relation for r in rules})
    report.removed = _remove_previous(session, relations)

    items = item_views(session)
    labels: dict[str, str] = {}
    types: dict[str, str] = {}
    triples: list[tuple[str, str, str]] = []
    new_links: dict[str, str] = {}
    for item in items:
        item_triples = []
        for rule in rules:
            for value in _values(rule, (item.attributes or {}).get(rule.attribute)):
                tail = entity_id(rule.prefix, value)
                labels.setdefault(tail, value)
                types.setdefault(tail, rule.prefix)
                item_triples.append((rule.relation, tail))
        if not item_triples:
            continue
        head = item.entity
        if head is None:
            head = f"item:{item.external_id}"
            new_links[item.external_id] = head
            labels[head] = item.title or item.external_id
            types[head] = "item"
        triples.extend((head, rel, tail) for rel, tail in dict.fromkeys(item_triples))
        report.items += 1
    ensure_entities(session, list(labels), labels=labels, types=types)
    _fill_missing_labels(session, labels, types)
    if new_links:
        link_items(session, new_links)
    report.new_item_entities = len(new_links)
    for start in range(0, len(triples), 5000):
        add_triples(session, triples[start:start + 5000], source=SOURCE)
    report.triples = len(set(triples))
    for _, rel, _ in set(triples):
        report.relations[rel] = report.relations.get(rel, 0) + 1
    _prune_orphans(session, {r.prefix for r in rules})
    return report


def _remove_previous(session: Session, relations: Sequence[str]) -> int:
    rel_ids = list(session.execute(select(Relation.id).where(Relation.name.in_(relations))).scalars())
    if not rel_ids:
        return 0
    result = session.execute(delete(Triple).where(Triple.source == SOURCE)
                             .where(Triple.relation_id.in_(rel_ids))
                             .execution_options(synchronize_session=False))
    return int(result.rowcount or 0)


def _fill_missing_labels(session: Session, labels: Mapping[str, str], types: Mapping[str, str]) -> None:
    """Entities that existed without a label or type (created by a bare import) get ours."""
    wanted = list(labels)
    for start in range(0, len(wanted), 900):
        chunk = wanted[start:start + 900]
        for ent in session.execute(select(Entity).where(Entity.external_id.in_(chunk))
                                   .where((Entity.label.is_(None)) | (Entity.type.is_(None)))).scalars():
            ent.label = ent.label if ent.label is not None else labels.get(ent.external_id)
            ent.type = ent.type if ent.type is not None else types.get(ent.external_id)
    session.flush()


def _prune_orphans(session: Session, prefixes: Iterable[str]) -> None:
    """Drop value entities of these types that no triple and no item uses any more."""
    used_as_head = exists().where(Triple.head_id == Entity.id)
    used_as_tail = exists().where(Triple.tail_id == Entity.id)
    session.execute(delete(Entity).where(Entity.type.in_(list(prefixes)))
                    .where(Entity.item_id.is_(None)).where(~used_as_head).where(~used_as_tail)
                    .execution_options(synchronize_session=False))
