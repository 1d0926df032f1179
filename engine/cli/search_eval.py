"""``polyrec evaluate-search``: P@k, NDCG@k and MRR of search on a labelled query set."""
from __future__ import annotations

import json
from typing import Any, Sequence

import click

from polyrec.cli.main import CliState, echo_json
from polyrec.errors import ConfigError


def parse_options(values: Sequence[str]) -> dict[str, Any]:
    """``--set key=value`` -> Engine.search keywords; values are JSON when they parse
    (numbers, true/false), else strings; ``weights.dense=0.5`` sets one fusion weight."""
    out: dict[str, Any] = {}
    for raw in values:
        key, sep, value = raw.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ConfigError(f"--set takes KEY=VALUE, not '{raw}'")
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if key.startswith("weights."):
            out.setdefault("weights", {})[key.split(".", 1)[1]] = parsed
        else:
            out[key] = parsed
    return out


@click.command("evaluate-search")
@click.argument("queries", type=click.Path(dir_okay=False))
@click.option("-k", "--k", "k", default=10, show_default=True, type=int,
              help="Cut-off of P@k and NDCG@k (and of MRR).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Search option of the default run, e.g. --set semantic_threshold=0.6 "
                   "--set weights.dense=0.5; repeatable.")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Also run BM25-only and dense-only.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with each run's top ids).")
@click.pass_obj
def evaluate_search_command(state: CliState, queries: str, k: int, settings: tuple[str, ...],
                            baselines: bool, as_json: bool) -> None:
    """Score search on QUERIES (JSON Lines: {"query": ..., "relevant": {field: value}} or
    {"query": ..., "relevant_ids": [...]}): P@k, NDCG@k and MRR per query and overall,
    for the default search, BM25 only and dense only."""
    from polyrec.retrieve.search_eval import evaluate_search
    if not 1 <= k <= 1000:
        raise ConfigError(f"-k must be between 1 and 1000, not {k}")
    report = evaluate_search(state.engine(), queries, k=k, options=parse_options(settings),
                             baselines=baselines)
    if as_json:
        echo_json(report.as_dict())
        return
    runs = list(report.runs)
    width = max(12, min(40, max(len(r["query"]) for r in report.queries)))
    head = f"{'query':<{width}} {'rel':>4}"
    for metric in ("P", "NDCG", "MRR"):
        head += "  " + " ".join(f"{(metric + ':' + r)[:12]:>12}" for r in runs)
    click.echo(head)
    for row in report.queries:
        line = f"{row['query'][:width]:<{width}} {row['relevant']:>4}"
        for m in ("p", "ndcg", "mrr"):
            line += "  " + " ".join(f"{row['runs'][r][m]:>12.3f}" for r in runs)
        click.echo(line)
    click.echo("-" * len(head))
    line = f"{'mean (' + str(len(report.queries)) + ' queries)':<{width}} {'':>4}"
    for m in ("p", "ndcg", "mrr"):
        line += "  " + " ".join(f"{report.means[r][m]:>12.3f}" for r in runs)
    click.echo(line)


COMMANDS = [evaluate_search_command]
