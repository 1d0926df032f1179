"""``polyrec train`` and ``polyrec recommend``: fit the pipeline, then ask it for items."""
from __future__ import annotations

import time
from typing import Any

import click

from polyrec.cli.main import CliState, echo_json, ray_options
from polyrec.errors import ConfigError
from polyrec.rank.export import RecommendationWriter, export_format, read_user_file


def _ranker_options(engine: Any, ranker: str | None, pairs: tuple[str, ...]) -> dict[str, Any]:
    """--set OPTION=VALUE pairs converted to the types ranker ``ranker`` declares
    (Ranker.check_options with text=True: an unknown option or a bad value is one
    ConfigError naming ranker, option and expected type)."""
    from polyrec.rank.train import DEFAULT_RANKER
    raw: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set '{pair}' must look like KEY=VALUE")
        raw[key.strip()] = value
    if not raw:
        return {}
    cls = engine.registry("rankers").get(ranker or DEFAULT_RANKER)
    return cls.check_options(raw, text=True)


def _parse_filters(pairs: tuple[str, ...]) -> dict[str, Any]:
    """attr=value filters; the same attribute twice means either value."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"filter '{pair}' must look like ATTRIBUTE=VALUE")
        out.setdefault(key.strip(), []).append(value.strip())
    return {k: v[0] if len(v) == 1 else v for k, v in out.items()}


@click.command("train")
@click.option("--ranker", default=None,
              help="Ranker to fit (default: hybrid, EASE re-ranked by a click model over "
                   "content similarity, popularity and recency features; --set "
                   "scorers=two_tower adds the two-tower score).")
@click.option("--epochs", type=int, default=None, help="Maximum epochs of neural rankers.")
@click.option("--seed", type=int, default=None, help="Seed of neural rankers and validation.")
@click.option("--set", "settings", multiple=True, metavar="OPTION=VALUE",
              help="A ranker option, converted to the type the ranker declares (JSON when "
                   "it declares none; [a,b] is a grid); repeatable.")
@click.option("--min-rating", default=4.0, show_default=True, type=float,
              help="Ratings at least this count as positives.")
@click.option("--force", is_flag=True,
              help="Make the new version live even when it fails the gate.")
@ray_options("Fit on Ray Train workers with DDP (rankers that train data-parallel: "
             "two_tower)", "Ray Train workers (default: one per CPU of the cluster).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def train_command(ctx: click.Context, ranker: str | None, epochs: int | None, seed: int | None,
                  settings: tuple[str, ...], min_rating: float, force: bool,
                  ray_address: str | None, ray_workers: int | None, as_json: bool) -> None:
    """Fit the recommendation pipeline on the stored positives, save it as the next
    version of the artifact 'pipeline' and make it live if it passes the gate (scores of
    the right shape, a smoke recommendation, a holdout metric not worse than the live
    model's). A version that fails is kept but not made live: exit status 3."""
    state: CliState = ctx.obj
    extra: dict[str, Any] = {}
    if ray_address is not None:
        from polyrec.cluster import require_ray
        require_ray()
        from polyrec.cluster.train import ray_fitter
        device = "cuda" if state.engine().device.type == "cuda" else "cpu"
        extra["fit"] = ray_fitter(None if ray_address == "local" else ray_address,
                                  n_workers=ray_workers, device=device)
    report = state.engine().train(ranker, options=_ranker_options(state.engine(), ranker,
                                                                  settings), epochs=epochs,
                                  seed=seed, min_rating=min_rating, force=force, **extra)
    if as_json:
        echo_json(report.as_dict())
        if not report.activated:
            ctx.exit(3)
        return
    used = report.info.get("modalities")
    click.echo(f"Trained {report.ranker} on {report.interactions:,} positives of "
               f"{report.users:,} users over {report.items:,} items "
               f"(item features: {', '.join(report.modalities) or 'none'}"
               + (f"; the model uses: {', '.join(used) or 'IDs only'}" if used is not None else "")
               + f") in {report.seconds:.1f}s")
    theta = report.info.get("theta")
    if theta:
        click.echo("click model learned on validation: "
                   + ", ".join(f"{k}={v:+.3f}" for k, v in theta.items()))
    weights = report.info.get("weights")
    if weights:
        click.echo("weights chosen on validation: "
                   + ", ".join(f"{k}={v:g}" for k, v in weights.items()))
    metrics = {k: v for k, v in report.metrics.items() if k in ("recall@20", "ndcg@20")}
    if metrics:
        sampled = report.metrics.get("held_out_users")
        click.echo("holdout: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                   + (f" on {report.metrics.get('users', 0):,} of the {sampled:,} held-out "
                      f"users (a fixed sample: gate setting holdout_users)" if sampled else ""))
    click.echo(f"Saved as artifact 'pipeline' version {report.version}")
    if report.forced:
        click.echo(f"Version {report.version} is live (--force) although it failed the gate: "
                   + "; ".join(report.gate.get("reasons", [])))
    elif report.activated:
        click.echo(f"Version {report.version} passed the gate and is live")
    else:
        click.echo(f"Version {report.version} is NOT live: it failed the gate: "
                   + "; ".join(report.gate.get("reasons", [])), err=True)
        live = f"version {report.live_version}" if report.live_version is not None else "nothing"
        click.echo(f"{live} still serves; `polyrec models activate {report.version}` or "
                   f"`polyrec train --force` make it live anyway", err=True)
        ctx.exit(3)


@click.command("recommend")
@click.argument("user", required=False)
@click.option("--all", "all_users", is_flag=True,
              help="Recommend to every stored user (a batch; see --out).")
@click.option("--users", "users_file", type=click.Path(dir_okay=False), default=None,
              metavar="FILE", help="Recommend to the users listed in FILE, one id per line "
                                   "(a batch; see --out).")
@click.option("-k", "k", default=10, show_default=True, type=int, help="How many items.")
@click.option("--explain", is_flag=True, help="Say why each item is recommended (one USER).")
@click.option("--filter", "filters", multiple=True, metavar="ATTRIBUTE=VALUE",
              help="Only items whose attribute (or search slot, e.g. genre) matches; "
                   "repeatable. An unknown field is an error.")
@click.option("--diversity", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="MMR trade-off: 0 = pure relevance, 1 = pure novelty.")
@click.option("--include-seen", is_flag=True, help="Allow items the user already interacted with.")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              metavar="FILE.parquet|FILE.csv|FILE.jsonl",
              help="Write the batch to FILE (format by suffix: .csv/.parquet one row per "
                   "item: user, rank, item, score, title; .jsonl one line per user). "
                   "Default for a batch: JSON lines on stdout.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Users scored together in a batch.")
@ray_options("Score the batch on Ray actors (with --all or --users)",
             "Ray actors, each with the live model (default: one per CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one USER).")
@click.pass_obj
def recommend_command(state: CliState, user: str | None, all_users: bool,
                      users_file: str | None, k: int, explain: bool, filters: tuple[str, ...],
                      diversity: float, include_seen: bool, out: str | None, batch_size: int,
                      ray_address: str | None, ray_workers: int | None, as_json: bool) -> None:
    """Top-k items for USER (external id) from the trained pipeline; or, with --all or
    --users FILE, for many users at once, scored in batches (with a progress bar) and
    written to --out."""
    given = [name for name, on in (("USER", user is not None), ("--all", all_users),
                                   ("--users", users_file is not None)) if on]
    if len(given) != 1:
        raise ConfigError("give one of USER, --all or --users FILE"
                          + (f", not {' and '.join(given)}" if given else ""))
    parsed = _parse_filters(filters) or None
    if ray_address is not None:
        if user is not None:
            raise ConfigError("--ray scores a batch: give --all or --users FILE, not USER")
        from polyrec.cluster import require_ray
        require_ray()
    if user is None or out is not None:
        if explain:
            raise ConfigError("--explain is for one USER without --out; a batch export "
                              "has no explanations")
        _recommend_batch(state, [user] if user is not None else None if all_users
                         else read_user_file(users_file or ""), k, parsed, not include_seen,
                         diversity, out, batch_size, ray_address, ray_workers)
        return
    recs = state.engine().recommend(user, k, filters=parsed, exclude_seen=not include_seen,
                                    diversity=diversity, explain=explain)
    if as_json:
        echo_json([r.as_dict() for r in recs])
        return
    if not recs:
        click.echo(f"No items to recommend to {user} (filters too narrow?)")
        return
    for rank, rec in enumerate(recs, start=1):
        title = f"  {rec.title}" if rec.title else ""
        click.echo(f"{rank:>3}. {rec.item:<12}{title}  ({rec.score:.3f})")
        if explain and rec.explanation:
            click.echo(f"     why: {rec.explanation.get('text', '')}")


class _Stdout:
    """JSON lines of a batch without --out go to stdout through click.echo."""

    def write(self, text: str) -> None:
        click.echo(text, nl=False)


def _rate(count: int, seconds: float) -> str:
    rate = count / max(seconds, 1e-9)
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"


def _recommend_batch(state: CliState, users: list[str] | None, k: int,
                     filters: dict[str, Any] | None, exclude_seen: bool, diversity: float,
                     out: str | None, batch_size: int, ray_address: str | None = None,
                     ray_workers: int | None = None) -> None:
    """Engine.recommend_many (or, with --ray, polyrec.cluster.batch.recommend_many) into a
    RecommendationWriter (--out, else JSON lines on stdout); a summary line at the end
    (on stderr when the data goes to stdout)."""
    if out is not None:
        export_format(out)  # a bad suffix fails before any scoring
    start = time.perf_counter()
    if ray_address is not None:
        from polyrec.cluster.batch import recommend_many as ray_recommend_many
        results = ray_recommend_many(state.engine(), users, k,
                                     address=None if ray_address == "local" else ray_address,
                                     n_workers=ray_workers, filters=filters,
                                     exclude_seen=exclude_seen, diversity=diversity,
                                     batch_size=batch_size)
    else:
        results = state.engine().recommend_many(users, k, filters=filters,
                                                exclude_seen=exclude_seen,
                                                diversity=diversity, batch_size=batch_size)
    stream = None if out is not None else _Stdout()
    with RecommendationWriter(out, stream=stream) as writer:
        for user, recs in results:
            writer.write(user, recs)
    seconds = time.perf_counter() - start
    where = f" to {out}" if out is not None else ""
    click.echo(f"Wrote {writer.rows:,} recommendations for {writer.users:,} users{where} in "
               f"{seconds:.1f}s ({_rate(writer.users, seconds)} users/s)",
               err=out is None)


COMMANDS = [train_command, recommend_command]
