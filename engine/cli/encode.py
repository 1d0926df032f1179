"""``polyrec encode``: turn the stored catalogue into cached vectors, one encoder at a time."""
from __future__ import annotations

from typing import Any

import click

from polyrec.cli.main import CliState, echo_json, ray_options
from polyrec.errors import ConfigError, EncodingError

MAX_FAILED_SHOWN = 20


def parse_settings(settings: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``("bert.max_length=128", "clip.pretrained=none")`` -> {encoder: {option: value}}."""
    out: dict[str, dict[str, str]] = {}
    for raw in settings:
        key, sep, value = raw.partition("=")
        encoder, dot, option = key.strip().partition(".")
        if not sep or not dot or not encoder or not option:
            raise ConfigError(f"--set expects ENCODER.OPTION=VALUE, got '{raw}'")
        out.setdefault(encoder, {})[option.strip()] = value.strip()
    return out


def _line(rep: Any) -> str:
    text = (f"{rep.encoder:<9} {rep.modality:<6} encoded {rep.encoded:>7,}  "
            f"unchanged {rep.cached:>7,}  no content {rep.no_content:>7,}  "
            f"failed {len(rep.failed):>5,}  {rep.seconds:7.1f} s")
    if rep.encoded:
        text += f"  {rep.items_per_second:,.0f} items/s"
    return text


@click.command("encode")
@click.option("--encoder", "-e", "encoders", multiple=True,
              help="Encoder to run (repeatable; default: every registered encoder).")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (overrides the group's --device).")
@click.option("--force", is_flag=True, help="Re-encode every item, even unchanged ones.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Items per forward pass (default: each encoder's own).")
@click.option("--set", "settings", multiple=True, metavar="ENCODER.OPTION=VALUE",
              help="Encoder option, e.g. --set bert.max_length=128 --set clip.pretrained=none. "
                   "An encoder given no --set reuses the options of its last run.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Storage type of the vectors.")
@ray_options("Encode on Ray Data actors, with the same cache rules",
             "Ray actors, each holding a copy of the model (default: one per CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_obj
def encode_command(state: CliState, encoders: tuple[str, ...], device: str | None, force: bool,
                   batch_size: int | None, settings: tuple[str, ...], dtype: str,
                   ray_address: str | None, ray_workers: int | None, as_json: bool) -> None:
    """Encode items into vectors; unchanged items keep their cached vectors."""
    options = parse_settings(settings)
    if device:
        state.device = device
    if ray_address is not None:
        from polyrec.cluster import require_ray
        require_ray()  # before the database is opened
        from polyrec.cluster.encode import encode as ray_encode
        report = ray_encode(state.engine(), list(encoders) or None,
                            address=None if ray_address == "local" else ray_address,
                            n_workers=ray_workers, force=force, batch_size=batch_size,
                            options=options, dtype=dtype)
    else:
        report = state.engine().encode(list(encoders) or None, force=force,
                                       batch_size=batch_size, options=options, dtype=dtype)
    if as_json:
        echo_json(report.as_dict())
    else:
        for rep in report.encoders:
            click.echo(_line(rep))
            for ext, reason in list(rep.failed.items())[:MAX_FAILED_SHOWN]:
                click.echo(f"  failed item {ext}: {reason}")
            if len(rep.failed) > MAX_FAILED_SHOWN:
                click.echo(f"  ... and {len(rep.failed) - MAX_FAILED_SHOWN:,} more failed items")
            if rep.error:
                click.echo(f"  ERROR: {rep.error}")
        failing = sum(len(r.failed) for r in report.encoders)
        if report.encoded == 0 and not report.errors:
            click.echo("Nothing re-encoded: every stored vector is up to date"
                       + (f" ({failing:,} items still fail, listed above)." if failing else "."))
        else:
            click.echo(f"Encoded {report.encoded:,} item vectors.")
    if report.errors:
        raise EncodingError("; ".join(report.errors.values()))


COMMANDS = [encode_command]
