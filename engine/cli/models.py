"""``polyrec models``: the versions of the trained pipeline and which one is live
(list, show, activate, rollback, prune); see docs/models.md ("Model registry")."""
from __future__ import annotations

import datetime as dt
import json
from typing import Any

import click

from polyrec.cli.main import CliState, echo_json


class _Version(click.ParamType):
    """A model version as `models list` shows it ("v3") or as a number ("3")."""

    name = "VERSION"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        text = str(value).strip()
        digits = text[1:] if text[:1] in ("v", "V") else text
        if not digits.isdigit():
            self.fail(f"'{value}' is no version (a number such as 3, or v3 as "
                      "`polyrec models list` shows it)", param, ctx)
        return int(digits)


VERSION = _Version()


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "?"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def _metric(model: dict[str, Any], name: str = "recall@20") -> str:
    value = (model.get("metrics") or {}).get(name)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _line(model: dict[str, Any]) -> str:
    mark = "*" if model["live"] else " "
    verdict = model["verdict"] + (" (forced)" if model["forced"] else "")
    return (f"{mark} v{model['version']:<4} {str(model['ranker']):<12} "
            f"{_metric(model):>9} {verdict:<17} {_when(model['created_at'])}  "
            f"{_size(model['bytes'])}")


def _detail(model: dict[str, Any]) -> None:
    click.echo(f"version {model['version']}" + (" (live)" if model["live"] else ""))
    click.echo(f"  ranker:   {model['ranker']}")
    click.echo(f"  options:  {json.dumps(model['options'], default=str)}")
    data = model["data"]
    click.echo(f"  data:     {data.get('users')} users, {data.get('items')} items, "
               f"{data.get('interactions')} positives (rating >= {data.get('min_rating')}); "
               f"features: {', '.join(data.get('modalities') or []) or 'none'}")
    metrics = {k: v for k, v in (model["metrics"] or {}).items()}
    click.echo("  holdout:  " + (", ".join(f"{k}={v}" for k, v in metrics.items()) or "none "
                                 "(trained before the model registry)"))
    click.echo(f"  created:  {_when(model['created_at'])}, {_size(model['bytes'])}"
               + (f", fitted in {model['seconds']} s" if model.get("seconds") is not None else ""))
    gate = model.get("gate")
    if gate is None:
        click.echo("  gate:     unchecked (trained before the gate)")
    else:
        click.echo(f"  gate:     {model['verdict']}" + (" (made live with --force)" if model["forced"] else ""))
        for name, check in (gate.get("checks") or {}).items():
            state = {True: "ok", False: "FAILED", None: "skipped"}[check.get("passed")]
            why = check.get("error") or check.get("reason") or check.get("skipped") or ""
            why = why[:-len(": ok")] if why.endswith(": ok") else why
            click.echo(f"    {name:<8} {state}" + (f": {why}" if why else ""))
    if model.get("warm_start"):
        click.echo(f"  warm start: {json.dumps(model['warm_start'])}")


@click.group("models")
def models_group() -> None:
    """Versions of the trained pipeline: list, inspect, choose the live one, prune."""


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_command(state: CliState, as_json: bool) -> None:
    """Every stored version, oldest first; * marks the live one."""
    models = state.engine().models()
    if as_json:
        echo_json(models)
        return
    if not models:
        click.echo("No trained pipeline yet; run `polyrec train`.")
        return
    click.echo(f"  {'ver':<5} {'ranker':<12} {'recall@20':>9} {'gate':<17} "
               f"{'created':<19}  size")
    for model in models:
        click.echo(_line(model))


@models_group.command("show")
@click.argument("version", type=VERSION)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def show_command(state: CliState, version: int, as_json: bool) -> None:
    """Everything about VERSION: ranker, options, data, holdout metrics, gate checks."""
    model = state.engine().model(version)
    if as_json:
        echo_json(model)
        return
    _detail(model)


@models_group.command("activate")
@click.argument("version", type=VERSION)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def activate_command(state: CliState, version: int, as_json: bool) -> None:
    """Make VERSION live (even one that failed the gate: an operator's choice)."""
    model = state.engine().activate(version)
    if as_json:
        echo_json(model)
        return
    click.echo(f"Version {version} ({model['ranker']}) is live"
               + ("" if model["good"] else f"; note: its gate verdict is '{model['verdict']}'"))


@models_group.command("rollback")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def rollback_command(state: CliState, as_json: bool) -> None:
    """Make the newest good version older than the live one live."""
    result = state.engine().rollback()
    if as_json:
        echo_json(result)
        return
    click.echo(f"Rolled back from version {result['from']} to version {result['to']} "
               f"({result['model']['ranker']})")


@models_group.command("prune")
@click.option("--keep", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many of the newest versions to keep (the live one is always kept).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def prune_command(state: CliState, keep: int, as_json: bool) -> None:
    """Delete old versions: all but the KEEP newest, never the live one."""
    result = state.engine().prune_models(keep)
    if as_json:
        echo_json(result)
        return
    if not result["deleted"]:
        click.echo(f"Nothing to prune (kept {', '.join(f'v{v}' for v in result['kept'])})")
        return
    click.echo(f"Deleted {len(result['deleted'])} version(s) "
               f"({', '.join(f'v{v}' for v in result['deleted'])}), freed "
               f"{_size(result['bytes_freed'])}; kept {', '.join(f'v{v}' for v in result['kept'])}")


COMMANDS = [models_group]
