"""``polyrec kg``: build the knowledge graph from item attributes, inspect it, explain links."""
from __future__ import annotations

import click

from polyrec.cli.main import CliState, echo_json


@click.group("kg")
def kg_group() -> None:
    """The knowledge graph: build, stats, neighbours, paths."""


@kg_group.command("build")
@click.option("--from-attributes", "rules", multiple=True, metavar="ATTR=RELATION",
              help="Make ATTR values entities linked by RELATION (repeatable), e.g. "
                   "--from-attributes colour_group_name=has_colour. Default: the built-in "
                   "rules (colour, department, type, genre, decade, ...).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_obj
def build_command(state: CliState, rules: tuple[str, ...], as_json: bool) -> None:
    """Turn item attributes into triples (item -has_colour-> colour:black, ...)."""
    from polyrec.knowledge_graph.builders import build_from_attributes, parse_rule
    parsed = [parse_rule(r) for r in rules] or None
    with state.engine().store.session() as s:
        report = build_from_attributes(s, parsed)
    if as_json:
        echo_json(report.as_dict())
        return
    click.echo(f"Built {report.triples:,} triples for {report.items:,} items "
               f"({len(report.relations)} relations, {report.new_item_entities:,} new item "
               f"entities, {report.removed:,} earlier triples replaced).")
    for rel, n in sorted(report.relations.items(), key=lambda kv: -kv[1]):
        click.echo(f"  {rel:<32} {n:>9,}")
    if report.triples or report.removed:
        click.echo("The graph changed: `polyrec encode` re-encodes the KG vectors.")


@kg_group.command("stats")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="How many relations to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def stats_command(state: CliState, top: int, as_json: bool) -> None:
    """Entities, relations, triples and the most frequent relations."""
    from polyrec.knowledge_graph.graph import describe
    with state.engine().store.session() as s:
        stats = describe(s, top=top)
    if as_json:
        echo_json(stats)
        return
    for key in ("entities", "relations", "triples", "linked_items", "isolated_entities", "max_degree"):
        click.echo(f"{key:<20} {stats[key]:>10,}")
    click.echo(f"{'mean_degree':<20} {stats['mean_degree']:>10}")
    click.echo(f"{'fingerprint':<20} {stats['fingerprint'][:16]}")
    click.echo("triples by source:")
    for src, n in stats["triples_by_source"].items():
        click.echo(f"  {src:<30} {n:>10,}")
    click.echo("top relations:")
    for rel, n in stats["top_relations"].items():
        click.echo(f"  {rel:<40} {n:>10,}")


@kg_group.command("neighbours")
@click.argument("item")
@click.option("--hops", type=click.IntRange(min=1, max=4), default=1, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--hub-degree", type=click.IntRange(min=1), default=None,
              help="Do not walk through nodes with more edges than this (default 100).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def neighbours_command(state: CliState, item: str, hops: int, limit: int,
                       hub_degree: int | None, as_json: bool) -> None:
    """Entities within --hops of ITEM's entity (ITEM: item id, or an entity id)."""
    from polyrec.knowledge_graph.paths import HUB_DEGREE, neighbours
    graph = state.engine().graph()
    found = neighbours(graph, item, hops=hops, limit=limit,
                       hub_degree=hub_degree if hub_degree is not None else HUB_DEGREE)
    if as_json:
        echo_json([n.as_dict() for n in found])
        return
    if not found:
        click.echo(f"{item} has no neighbours in the knowledge graph.")
    for n in found:
        who = f" (item {n.item})" if n.item else ""
        click.echo(f"{n.hops}  {n.path.text()}{who}")


@kg_group.command("path")
@click.argument("item_a")
@click.argument("item_b")
@click.option("--max-hops", type=click.IntRange(min=1, max=6), default=4, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--hub-degree", type=click.IntRange(min=1), default=None,
              help="Avoid nodes with more edges than this when possible (default 100).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def path_command(state: CliState, item_a: str, item_b: str, max_hops: int, limit: int,
                 hub_degree: int | None, as_json: bool) -> None:
    """Short, specific paths linking ITEM_A and ITEM_B (what they share)."""
    from polyrec.knowledge_graph.paths import HUB_DEGREE, explain
    graph = state.engine().graph()
    paths = explain(graph, item_a, item_b, max_hops=max_hops, limit=limit,
                    hub_degree=hub_degree if hub_degree is not None else HUB_DEGREE)
    if as_json:
        echo_json([p.as_dict() for p in paths])
        return
    if not paths:
        click.echo(f"No path of at most {max_hops} hops links {item_a} and {item_b}.")
    for p in paths:
        click.echo(f"{p.hops} hops: {p.text()}")


COMMANDS = [kg_group]
