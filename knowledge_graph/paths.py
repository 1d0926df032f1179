"""Neighbourhood and path queries on the knowledge graph (a MultiDiGraph from graph.py).

Walks ignore edge direction (an edge can be read either way) but report it: a step is
shown ``A -film.film.directed_by-> P`` or ``P <-film.film.directed_by- B``. Paths between
two items explain a recommendation ("shares director P with B"): the shortest ones are
found first, and among equally short ones the most specific win (intermediate nodes that
touch few others: a shared director says more than a shared language). Hub nodes (more
than ``hub_degree`` edges) are avoided when a path without them exists.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import networkx as nx

from polyrec.errors import NotFoundError

#: Nodes with more edges than this are hubs (genres, languages, countries in ml-100k).
HUB_DEGREE = 100
#: How many candidate paths are scored before the best are returned.
MAX_CANDIDATES = 2000


def label(graph: nx.MultiDiGraph, node: str) -> str:
    """A node's label when it has one, else its id."""
    return graph.nodes[node].get("label") or node


def item_entity(graph: nx.MultiDiGraph, item: str) -> str:
    """The entity linked to catalogue item ``item`` (external id)."""
    found = graph.graph.get("item_entities", {}).get(str(item))
    if found is not None:
        return found
    if str(item) in graph and graph.nodes[str(item)].get("item") is not None:
        return str(item)  # already an item's entity id
    raise NotFoundError(f"item '{item}' has no linked knowledge-graph entity "
                        "(unknown item, or no link: run `polyrec kg build` or ingest links)")


def resolve(graph: nx.MultiDiGraph, ref: str) -> str:
    """An item external id (preferred) or an entity id -> the entity id."""
    ref = str(ref)
    if ref in graph.graph.get("item_entities", {}):
        return graph.graph["item_entities"][ref]
    if ref in graph:
        return ref
    raise NotFoundError(f"'{ref}' is neither an item with a linked entity nor an entity of the graph")


@dataclass(frozen=True)
class Step:
    """One edge walked from ``source`` to ``target``; ``forward`` is False when the stored
    triple points the other way (target -relation-> source)."""

    source: str
    target: str
    relation: str
    forward: bool
    source_label: str
    target_label: str
    relations: tuple[str, ...] = ()  # every relation joining the pair in that direction

    def text(self, with_source: bool = True) -> str:
        rel = self.relation
        arrow = f" -{rel}-> " if self.forward else f" <-{rel}- "
        return (self.source_label if with_source else "") + arrow + self.target_label

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "source_label": self.source_label,
                "relation": self.relation, "relations": list(self.relations),
                "direction": "forward" if self.forward else "backward",
                "target": self.target, "target_label": self.target_label}


@dataclass
class Path:
    """A walk through the graph; ``cost`` is the sum of log(1 + distinct neighbours) of
    its inner nodes (lower = more specific)."""

    steps: list[Step]
    cost: float = 0.0

    @property
    def hops(self) -> int:
        return len(self.steps)

    @property
    def nodes(self) -> list[str]:
        return [self.steps[0].source] + [s.target for s in self.steps] if self.steps else []

    @property
    def via(self) -> list[str]:
        """The inner nodes (what the two ends share)."""
        return self.nodes[1:-1]

    def text(self) -> str:
        if not self.steps:
            return ""
        return self.steps[0].source_label + "".join(s.text(with_source=False) for s in self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {"hops": self.hops, "cost": round(self.cost, 4), "text": self.text(),
                "via": self.via, "steps": [s.as_dict() for s in self.steps]}


@dataclass
class Neighbour:
    """An entity within ``hops`` of the start, reached by ``path``."""

    entity: str
    label: str
    type: str | None
    item: str | None
    hops: int
    degree: int
    path: Path = field(repr=False, default_factory=lambda: Path([]))

    def as_dict(self) -> dict[str, Any]:
        return {"entity": self.entity, "label": self.label, "type": self.type, "item": self.item,
                "hops": self.hops, "degree": self.degree, "path": self.path.text(),
                "relation": self.path.steps[-1].relation if self.path.steps else None}


def _adjacent(graph: nx.MultiDiGraph, node: str) -> Iterator[str]:
    yield from graph.succ[node]
    for other in graph.pred[node]:
        if other not in graph.succ[node]:
            yield other


def _step(graph: nx.MultiDiGraph, u: str, v: str, prefer_forward: bool) -> Step:
    counts = graph.graph.get("relation_counts", {})
    rarest_first = lambda rel: (counts.get(rel, 0), rel)  # noqa: E731 - the specific relation leads
    forward = sorted(graph.succ[u].get(v, {}), key=rarest_first)
    backward = sorted(graph.succ[v].get(u, {}), key=rarest_first)
    use_forward = bool(forward) and (prefer_forward or not backward)
    rels = tuple(forward if use_forward else backward)
    return Step(source=u, target=v, relation=rels[0], forward=use_forward,
                source_label=label(graph, u), target_label=label(graph, v), relations=rels)


def spread(graph: nx.MultiDiGraph, node: str) -> int:
    """How many distinct nodes ``node`` touches (edge direction and inverse relations
    stored both ways do not count twice)."""
    return len(graph.succ[node].keys() | graph.pred[node].keys())


def make_path(graph: nx.MultiDiGraph, nodes: list[str]) -> Path:
    """The Path through ``nodes``: steps in the first half read away from the start,
    those in the second half towards the end (A -r-> X <-r- B)."""
    hops = len(nodes) - 1
    steps = [_step(graph, nodes[i], nodes[i + 1], prefer_forward=i < hops / 2) for i in range(hops)]
    cost = sum(math.log1p(spread(graph, n)) for n in nodes[1:-1])
    return Path(steps=steps, cost=cost)


def _rarity(graph: nx.MultiDiGraph, path: Path) -> int:
    counts = graph.graph.get("relation_counts", {})
    return sum(counts.get(s.relation, 0) for s in path.steps)


def neighbours(graph: nx.MultiDiGraph, ref: str, hops: int = 1, *, limit: int | None = 50,
               hub_degree: int | None = HUB_DEGREE) -> list[Neighbour]:
    """Entities within ``hops`` of an item's entity (or an entity), nearest first; hubs
    are listed but not walked through. Within a distance, those reached through rarer
    (more specific) relations come first: directed_by before actor before genre."""
    start = resolve(graph, ref)
    parent: dict[str, str | None] = {start: None}
    depth = {start: 0}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if depth[node] >= hops:
            continue
        if node != start and hub_degree is not None and graph.degree(node) > hub_degree:
            continue
        for other in _adjacent(graph, node):
            if other not in depth:
                depth[other], parent[other] = depth[node] + 1, node
                queue.append(other)
    out = []
    for node in depth:
        if node == start:
            continue
        chain = [node]
        while parent[chain[-1]] is not None:
            chain.append(parent[chain[-1]])  # type: ignore[arg-type]
        attrs = graph.nodes[node]
        path = Path(steps=[_step(graph, a, b, True) for a, b in zip(chain[::-1], chain[-2::-1])])
        out.append(Neighbour(entity=node, label=label(graph, node), type=attrs.get("type"),
                             item=attrs.get("item"), hops=depth[node],
                             degree=int(graph.degree(node)), path=path))
    counts = graph.graph.get("relation_counts", {})
    out.sort(key=lambda n: (n.hops, [(counts.get(s.relation, 0), s.relation) for s in n.path.steps],
                            n.label))
    return out[:limit] if limit is not None else out


class _Walker:
    """Memoised neighbour lists and degrees for one query (networkx views are slow to
    ask the same thing twice)."""

    def __init__(self, graph: nx.MultiDiGraph, hub_degree: int | None) -> None:
        self.graph, self.hub_degree = graph, hub_degree
        self._nbrs: dict[str, list[str]] = {}
        self._degree: dict[str, int] = {}

    def nbrs(self, node: str) -> list[str]:
        found = self._nbrs.get(node)
        if found is None:
            found = self._nbrs[node] = list(_adjacent(self.graph, node))
        return found

    def degree(self, node: str) -> int:
        found = self._degree.get(node)
        if found is None:
            found = self._degree[node] = int(self.graph.degree(node))
        return found

    def not_hub(self, node: str) -> bool:
        return self.hub_degree is None or self.degree(node) <= self.hub_degree


class _Rings:
    """Breadth-first distances from ``source``, grown one ring at a time on demand;
    only ``allowed`` nodes (and the source) are walked through."""

    def __init__(self, walker: _Walker, source: str, allowed: Callable[[str], bool]) -> None:
        self.walker, self.source, self.allowed = walker, source, allowed
        self.dist = {source: 0}
        self.frontier = [source]
        self.depth = 0

    def upto(self, depth: int) -> dict[str, int]:
        while self.depth < depth and self.frontier:
            ring = []
            for node in self.frontier:
                if node != self.source and not self.allowed(node):
                    continue
                for other in self.walker.nbrs(node):
                    if other not in self.dist:
                        self.dist[other] = self.depth + 1
                        ring.append(other)
            self.frontier, self.depth = ring, self.depth + 1
        return self.dist


def _simple_paths(walker: _Walker, a: str, b: str, length: int, dist_b: dict[str, int],
                  allowed: Callable[[str], bool], cap: int) -> list[list[str]]:
    """Simple paths of exactly ``length`` edges from a to b, inner nodes ``allowed``;
    ``dist_b`` (distances to b up to length - 1) prunes walks that cannot arrive."""
    out: list[list[str]] = []
    path = [a]
    on_path = {a}

    def walk(node: str) -> None:
        left = length - (len(path) - 1)
        for other in walker.nbrs(node):
            if len(out) >= cap:
                return
            if other == b:
                if left == 1:
                    out.append(path + [b])
                continue
            if other in on_path or left <= 1 or dist_b.get(other, left) > left - 1 or not allowed(other):
                continue
            path.append(other)
            on_path.add(other)
            walk(other)
            path.pop()
            on_path.discard(other)

    walk(a)
    return out


def explain(graph: nx.MultiDiGraph, ref_a: str, ref_b: str, *, max_hops: int = 4,
            limit: int = 3, hub_degree: int | None = HUB_DEGREE) -> list[Path]:
    """Up to ``limit`` short, specific paths between two items (or entities): the
    shortest length first, then the lowest cost; hub nodes only when nothing else links
    them; ties go to rarer relations (directed_by before actor). Empty when they are not
    connected within ``max_hops``."""
    a, b = resolve(graph, ref_a), resolve(graph, ref_b)
    if a == b:
        return []
    walker = _Walker(graph, hub_degree)
    passes: list[Callable[[str], bool]] = [walker.not_hub] if hub_degree is not None else []
    passes.append(lambda n: True)
    for allowed in passes:
        rings = _Rings(walker, b, allowed)
        candidates: list[Path] = []
        shortest: int | None = None
        for length in range(1, max_hops + 1):
            dist_b = rings.upto(length - 1)
            if shortest is None:
                if not any(o == b or (o in dist_b and allowed(o)) for o in walker.nbrs(a)):
                    continue
                shortest = length
            if length > shortest + 2 or len(candidates) >= limit:
                break
            candidates += [make_path(graph, nodes) for nodes in
                           _simple_paths(walker, a, b, length, dist_b, allowed, MAX_CANDIDATES)]
        if candidates:
            candidates.sort(key=lambda p: (p.hops, round(p.cost, 9), _rarity(graph, p), p.nodes))
            return candidates[:limit]
    return []
