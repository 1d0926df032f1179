"""Feedback commands: ``polyrec feedback`` (send, stream, config, state),
``polyrec retrain --if-stale`` and ``polyrec experiments`` (create, list, stop, assign,
report)."""
from __future__ import annotations

import io
import json
import os
import select
import sys
from typing import IO, Any, Iterator

import click

from polyrec.cli.main import CliState, echo_json
from polyrec.errors import ConfigError, PolyrecError, ValidationError


def _json_option(raw: str | None, what: str) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} is not valid JSON: {exc}") from None


# -- polyrec feedback ----------------------------------------------------------------------
@click.group("feedback")
def feedback_group() -> None:
    """Record events (clicks, purchases, ...) and inspect the online learners."""


@feedback_group.command("send")
@click.argument("user")
@click.argument("item")
@click.option("--kind", default="click", show_default=True,
              help="impression, view, click, cart, purchase, rating, skip (or a configured kind).")
@click.option("--value", type=float, help="The event's value (the rating for kind rating).")
@click.option("--ts", help="Event time: seconds since the epoch or an ISO 8601 time, e.g. "
              "2026-12-01T10:00:00+02:00 (default now).")
@click.option("--context", "context_json", help="Context as a JSON object.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored event as JSON.")
@click.pass_obj
def send_command(state: CliState, user: str, item: str, kind: str, value: float | None,
                 ts: str | None, context_json: str | None, as_json: bool) -> None:
    """Store one event of USER on ITEM, then update the learners."""
    event = state.engine().feedback(user, item, kind, value=value, ts=ts,
                                    context=_json_option(context_json, "--context"))
    if as_json:
        echo_json(event.as_dict())
    else:
        click.echo(f"stored event {event.id}: {event.user} {event.kind} {event.item}"
                   + ("" if event.new else " (already stored)"))


def _lines(stream: IO[bytes], wait_s: float) -> Iterator[list[bytes]]:
    """Yield batches of complete lines: whatever has arrived, without waiting longer than
    ``wait_s`` for more once a batch has started (so acknowledgements are never held back)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):  # an in-memory stream
        yield [line for line in stream.read().split(b"\n") if line.strip()]
        return
    buffer = b""
    while True:
        ready, _, _ = select.select([fd], [], [], None if not buffer else wait_s)
        chunk = os.read(fd, 1 << 16) if ready else b""
        if ready and not chunk:  # end of input
            if buffer.strip():
                yield [buffer]
            return
        buffer += chunk
        if b"\n" in buffer:
            *done, buffer = buffer.split(b"\n")
            yield [line for line in done if line.strip()]


@feedback_group.command("stream")
@click.option("--batch", "batch_size", type=int, default=1000, show_default=True,
              help="Most events stored per transaction.")
@click.option("--wait-ms", type=float, default=5.0, show_default=True,
              help="How long to wait for more input before committing a partial batch.")
@click.option("--quiet-acks", is_flag=True, help="Do not print an acknowledgement per event.")
@click.pass_obj
def stream_command(state: CliState, batch_size: int, wait_ms: float, quiet_acks: bool) -> None:
    """Read events as JSON lines on stdin ({"user", "item", "kind", "value", "ts",
    "context"}; put an "event_id" in the context to make retries idempotent), store them
    in batches, and print one acknowledgement line per event ({"id", "event_id", "new"})
    only after its batch is committed. A bad line (not JSON, unknown item, ...) stops the
    stream with an error naming its line; every line before it is stored and acknowledged."""
    eng = state.engine()
    total = 0
    out = sys.stdout

    def store(events: list[dict[str, Any]]) -> None:
        nonlocal total
        stored = eng.feedback_many(events)
        total += len(stored)
        if not quiet_acks:
            out.write("".join(json.dumps({"id": e.id, "event_id": (e.context or {}).get("event_id"),
                                          "new": e.new}) + "\n" for e in stored))
            out.flush()

    for lines in _lines(sys.stdin.buffer, wait_ms / 1000.0):
        for start in range(0, len(lines), max(1, batch_size)):
            events, problem = [], None
            for n, line in enumerate(lines[start:start + max(1, batch_size)], start=total + 1):
                try:
                    event = json.loads(line)
                except json.JSONDecodeError as exc:
                    problem = ValidationError(f"not JSON: {exc}", file="stdin", row=n)
                    break
                if not isinstance(event, dict):
                    problem = ValidationError("each line must be a JSON object", file="stdin", row=n)
                    break
                events.append(event)
            try:
                store(events)
            except PolyrecError:  # find the bad line: store and acknowledge the ones before it
                for event in events:
                    try:
                        store([event])
                    except ValidationError as exc:
                        raise ValidationError(exc.reason, file="stdin", row=total + 1,
                                              field=exc.field) from None
                    except PolyrecError as exc:
                        raise ValidationError(str(exc), file="stdin", row=total + 1) from None
            if problem is not None:
                raise problem
    click.echo(f"stored {total:,} events", err=True)


@feedback_group.command("config")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Change a setting, e.g. online.decay=0.8, kind_weights.click=1.5, "
                   "bandit.serving=true, retrain.min_new_events=500 (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def config_command(state: CliState, assignments: tuple[str, ...], as_json: bool) -> None:
    """Show (or change) the feedback settings stored in the database."""
    from polyrec.feedback import events
    eng = state.engine()
    if assignments:
        parsed = {}
        for a in assignments:
            if "=" not in a:
                raise ConfigError(f"--set takes KEY=VALUE, not '{a}'")
            key, value = a.split("=", 1)
            parsed[key.strip()] = value.strip()
        config = events.set_config(eng, parsed)
    else:
        config = events.load_config(eng)
    if as_json:
        echo_json(config)
        return
    for group, values in config.items():
        click.echo(f"{group}:")
        for key, value in values.items():
            click.echo(f"  {key:<22} {json.dumps(value)}")


@feedback_group.command("state")
@click.argument("user")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def state_command(state: CliState, user: str, as_json: bool) -> None:
    """What the online learner holds for USER, and the bandit's posterior."""
    from polyrec.feedback import events
    eng = state.engine()
    out = events.describe(eng, user)
    if as_json:
        echo_json(out)
        return
    for name, value in out.items():
        click.echo(f"{name}: {json.dumps(value, default=str)}")


# -- polyrec retrain -----------------------------------------------------------------------
@click.command("retrain")
@click.option("--if-stale", is_flag=True,
              help="Retrain only when enough new events or items arrived since the last model.")
@click.option("--min-new-events", type=int, help="Threshold (default: setting retrain.min_new_events).")
@click.option("--min-new-items", type=int, help="Threshold (default: setting retrain.min_new_items).")
@click.option("--force", is_flag=True, help="Make the new version live even if it fails the gate.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def retrain_command(state: CliState, if_stale: bool, min_new_events: int | None,
                    min_new_items: int | None, force: bool, as_json: bool) -> None:
    """Encode new items (cached vectors are reused) and refit the live model's ranker
    with its stored options (warm-started where the ranker supports it); the new version
    goes live only if it passes the gate (see `polyrec models`)."""
    from polyrec.feedback import retrain
    report = retrain.retrain(state.engine(), if_stale=if_stale, min_new_events=min_new_events,
                             min_new_items=min_new_items, force=force)
    if as_json:
        echo_json(report)
        return
    click.echo(report["summary"])


# -- polyrec experiments -------------------------------------------------------------------
@click.group("experiments")
def experiments_group() -> None:
    """A/B experiments: deterministic variants, recorded with every event, and a report."""


def _parse_variants(specs: tuple[str, ...], options: tuple[str, ...]) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    for spec in specs:
        name, _, weight = spec.partition("=")
        try:
            variants[name.strip()] = {"weight": float(weight) if weight else 1.0, "options": {}}
        except ValueError:
            raise ConfigError(f"--variant takes NAME or NAME=WEIGHT, not '{spec}'") from None
    for spec in options:
        name, sep, raw = spec.partition("=")
        if not sep or name.strip() not in variants:
            raise ConfigError(f"--options takes VARIANT=JSON for a declared variant, not '{spec}'")
        value = _json_option(raw, f"--options {name}")
        if not isinstance(value, dict):
            raise ConfigError(f"--options {name}: a JSON object is needed")
        variants[name.strip()]["options"] = value
    return variants


@experiments_group.command("create")
@click.argument("name")
@click.option("--variant", "variant_specs", multiple=True, required=True, metavar="NAME[=WEIGHT]",
              help="A variant and its share (repeat; at least two).")
@click.option("--options", "option_specs", multiple=True, metavar="VARIANT=JSON",
              help='Engine.recommend options of a variant, e.g. frozen=\'{"online": false}\'.')
@click.pass_obj
def experiments_create(state: CliState, name: str, variant_specs: tuple[str, ...],
                       option_specs: tuple[str, ...]) -> None:
    """Create (or redefine) experiment NAME; it tags events from now on."""
    from polyrec.feedback import experiments
    spec = experiments.create(state.engine(), name, _parse_variants(variant_specs, option_specs))
    shares = ", ".join(f"{v} {d['weight']:g}" for v, d in spec["variants"].items())
    click.echo(f"experiment '{name}' active: {shares}")


@experiments_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def experiments_list(state: CliState, as_json: bool) -> None:
    """Every experiment with its variants and number of assigned users."""
    from polyrec.feedback import experiments
    rows = experiments.list_experiments(state.engine())
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['name']:<24} {'active' if r['active'] else 'stopped':<8} "
                   f"{r['users']:>8,} users  variants: {', '.join(r['variants'])}")


@experiments_group.command("stop")
@click.argument("name")
@click.pass_obj
def experiments_stop(state: CliState, name: str) -> None:
    """Stop tagging events with experiment NAME (its data stays)."""
    from polyrec.feedback import experiments
    experiments.stop(state.engine(), name)
    click.echo(f"experiment '{name}' stopped")


@experiments_group.command("assign")
@click.argument("name")
@click.argument("user")
@click.pass_obj
def experiments_assign(state: CliState, name: str, user: str) -> None:
    """Print the variant of USER in experiment NAME."""
    from polyrec.feedback import experiments
    click.echo(experiments.assign(state.engine(), name, user))


@experiments_group.command("report")
@click.argument("name")
@click.option("--confidence", type=float, default=0.95, show_default=True)
@click.option("--plot", "plot", type=click.Path(dir_okay=False), default=None,
              metavar="FILE.png|FILE.svg|FILE.html",
              help="Also draw CTR and conversion per variant with their Wilson intervals "
                   "to FILE (HTML: a self-contained page with the numbers); needs the plot "
                   "extra.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def experiments_report(state: CliState, name: str, confidence: float, plot: str | None,
                       as_json: bool) -> None:
    """Click-through and conversion per variant, with Wilson confidence intervals."""
    from polyrec.feedback import experiments
    from polyrec.plots import check_plot_path, experiment_chart, save_chart
    if plot is not None:
        check_plot_path(plot)
    rep = experiments.report(state.engine(), name, confidence=confidence)
    if plot is not None:
        save_chart(experiment_chart(rep), plot)
        click.echo(f"Plot written to {plot}", err=as_json)
    if as_json:
        echo_json(rep)
        return
    pct = f"{confidence:.0%} CI"
    click.echo(f"experiment {name} ({'active' if rep['active'] else 'stopped'})")
    click.echo(f"{'variant':<16}{'users':>8}{'impr.':>9}{'clicks':>8}{'CTR':>8}  {pct:<18}"
               f"{'conv.':>7}  {pct:<18}{'p(CTR)':>8}")
    for r in rep["variants"]:
        p = r.get("ctr_p_value")
        ctr_ci = f"[{r['ctr_ci'][0]:.2%}, {r['ctr_ci'][1]:.2%}]"
        conv_ci = f"[{r['conversion_ci'][0]:.2%}, {r['conversion_ci'][1]:.2%}]"
        click.echo(f"{r['variant']:<16}{r['users']:>8,}{r['impressions']:>9,}{r['clicks']:>8,}"
                   f"{r['ctr']:>8.2%}  {ctr_ci:<18}{r['conversion']:>7.2%}  {conv_ci:<18}"
                   + (f"{p:>8.3f}" if p is not None else f"{'-':>8}"))


COMMANDS = [feedback_group, retrain_command, experiments_group]
