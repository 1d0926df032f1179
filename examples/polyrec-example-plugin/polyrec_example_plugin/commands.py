"""``polyrec attr-stats ATTRIBUTE``: a summary of one numeric item attribute in the store."""
from __future__ import annotations

import json
from typing import Any, Sequence

import click

from polyrec import ItemView, NotFoundError

from polyrec_example_plugin.numeric import summarize, to_number


def attribute_stats(items: Sequence[ItemView], attribute: str) -> dict[str, Any]:
    """items, count (numeric values), missing, non_numeric, then min, max, mean, std."""
    numbers: list[float] = []
    missing = non_numeric = 0
    for item in items:
        value = (item.attributes or {}).get(attribute)
        if value is None or value == "":
            missing += 1
            continue
        number = to_number(value)
        if number is None:
            non_numeric += 1
        else:
            numbers.append(number)
    summary = summarize(numbers)
    return {"attribute": attribute, "items": len(items), "count": summary.pop("count"),
            "missing": missing, "non_numeric": non_numeric, **summary}


@click.command("attr-stats")
@click.argument("attribute")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def attr_stats_command(state: Any, attribute: str, as_json: bool) -> None:
    """Count, min, max, mean and std of a numeric item attribute (e.g. release_year)."""
    items = state.engine().items()
    stats = attribute_stats(items, attribute)
    if stats["count"] + stats["non_numeric"] == 0:
        known = sorted({k for it in items for k in (it.attributes or {})})
        raise NotFoundError(f"no item has the attribute '{attribute}' (attributes: "
                            f"{', '.join(known) or 'none'})")
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    click.echo(f"{attribute} over {stats['items']:,} items")
    for key in ("count", "missing", "non_numeric"):
        click.echo(f"  {key:<12} {stats[key]:>14,}")
    for key in ("min", "max", "mean", "std"):
        if key in stats:
            click.echo(f"  {key:<12} {stats[key]:>14.4f}")
