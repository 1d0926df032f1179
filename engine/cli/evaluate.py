"""``polyrec evaluate``: fit several rankers on one split and print one table of metrics."""
from __future__ import annotations

import click

from polyrec.cli.main import CliState, echo_json
from polyrec.errors import ConfigError
from polyrec.plots import check_plot_path, evaluation_chart, save_chart
from polyrec.rank.evaluation import DEFAULT_KS, SPLITS


def _parse_ks(raw: str) -> list[int]:
    try:
        ks = [int(k) for k in raw.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--k must be a comma list of integers, not '{raw}'") from None
    if not ks or min(ks) < 1:
        raise ConfigError(f"--k must list positive integers, not '{raw}'")
    return ks


@click.command("evaluate")
@click.option("--models", default="popular,itemknn,ease", show_default=True,
              help="Comma list of ranker names; LABEL=NAME evaluates a ranker under a label "
                   "(e.g. text=two_tower).")
@click.option("--split", "split", type=click.Choice(SPLITS), default="random", show_default=True,
              help="random: per-user 80/20; time: leave-last-out (or each user's latest "
                   "--test-share); cold: cold-start items.")
@click.option("--k", "ks", default=",".join(map(str, DEFAULT_KS)), show_default=True,
              help="Cut-offs K, comma separated.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the split.")
@click.option("--option", "-o", "options", multiple=True, metavar="LABEL.KEY=VALUE",
              help="A model option, converted to the type the ranker declares in its "
                   "defaults ([a,b] or a,b is a grid for a grid option; JSON when the ranker "
                   "declares none); repeatable.")
@click.option("--min-rating", default=4.0, show_default=True, type=float,
              help="Ratings at least this count as positives.")
@click.option("--test-share", default=None, type=float,
              help="random split: share of each user's positives held out (default 0.2); "
                   "time split: hold out each user's latest share by time instead of the "
                   "last one.")
@click.option("--min-positives", default=5, show_default=True, type=int,
              help="random/time split: users with fewer positives stay in training.")
@click.option("--item-share", default=0.2, show_default=True, type=float,
              help="cold split: share of items made cold.")
@click.option("--candidates", type=click.Choice(["cold", "all"]), default="cold", show_default=True,
              help="cold split: rank only the cold items, or the whole catalogue.")
@click.option("--plot", "plot", type=click.Path(dir_okay=False), default=None,
              metavar="FILE.png|FILE.svg|FILE.html",
              help="Also draw Recall@K and NDCG@K per model and coverage to FILE (HTML: a "
                   "self-contained page with the numbers); needs the plot extra.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def evaluate_command(state: CliState, models: str, split: str, ks: str, seed: int,
                     options: tuple[str, ...], min_rating: float, test_share: float | None,
                     min_positives: int, item_share: float, candidates: str,
                     plot: str | None, as_json: bool) -> None:
    """Fit rankers on a training split (tuning on validation carved from it) and report
    Recall, NDCG, HitRate, MRR and coverage with full ranking, training items masked."""
    if plot is not None:
        check_plot_path(plot)  # before the work, not after it
    split_options: dict[str, object] = {
        "random": {"test_share": 0.2 if test_share is None else test_share,
                   "min_positives": min_positives},
        "time": {"min_positives": min_positives,
                 **({} if test_share is None else {"test_share": test_share})},
        "cold": {"item_share": item_share, "candidates": candidates},
    }[split]
    report = state.engine().evaluate(models, split=split, ks=_parse_ks(ks), seed=seed,
                                     options=options, min_rating=min_rating,
                                     split_options=split_options)
    if plot is not None:
        save_chart(evaluation_chart(report.as_dict()), plot)
        click.echo(f"Plot written to {plot}", err=as_json)
    if as_json:
        echo_json(report.as_dict())
        return
    info = report.split
    click.echo(f"split={info['split']} seed={info['seed']} users={info['eval_users']} "
               f"train={info['train_interactions']} test={info['test_interactions']}"
               + (f" cold_items={info['cold_items']}" if "cold_items" in info else ""))
    click.echo(report.table())
    for row in report.rows:
        if row["info"].get("tuned_on"):
            chosen = row["info"].get("chosen") or row["info"].get("weights")
            click.echo(f"{row['model']}: tuned on {row['info']['tuned_on']} -> {chosen}")


COMMANDS = [evaluate_command]
