"""``polyrec train-intent`` (train and store an intent model) and ``polyrec intent QUERY``
(what the stored model reads in a query: soft facets and demand)."""
from __future__ import annotations

from typing import Any

import click

from polyrec.cli.main import CliState, echo_json
from polyrec.errors import ConfigError


def parse_options(settings: tuple[str, ...]) -> dict[str, str]:
    """``("alpha=1", "epochs=3")`` -> {"alpha": "1", "epochs": "3"} (the model converts)."""
    out: dict[str, str] = {}
    for raw in settings:
        key, sep, value = raw.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got '{raw}'")
        out[key.strip()] = value.strip()
    return out


@click.command("train-intent")
@click.option("--model", "-m", default="multitask", show_default=True,
              help="Intent model to train (a registered intent model).")
@click.option("--encoder", "-e", default="bert", show_default=True,
              help="Text encoder whose vectors the model reads (encoded first if needed).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Model option, e.g. --set alpha=1 --set beta=0.2 --set gamma=0.2 "
                   "--set epochs=6 (multitask: loss weights, epochs, queries_per_item, ...).")
@click.option("--name", default="intent", show_default=True,
              help="Artifact name the model is stored under (search uses 'intent').")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_obj
def train_intent_command(state: CliState, model: str, encoder: str, settings: tuple[str, ...],
                         name: str, seed: int, as_json: bool) -> None:
    """Train an intent model (soft facets, demand, user match) from the catalogue and
    store it with the encoder's fingerprint."""
    from polyrec.retrieve.intent_model import train_intent
    options = parse_options(settings)
    report = train_intent(state.engine(), model, encoder=encoder, options=options, name=name,
                          seed=seed)
    if as_json:
        echo_json(report.as_dict())
        return
    info = report.info
    click.echo(f"Stored intent model '{report.name}' v{report.version} ({report.model} on "
               f"{report.encoder} {report.fingerprint}) in {report.seconds:.1f} s")
    fields = info.get("fields") or {}
    if fields:
        click.echo("fields: " + ", ".join(f"{f} ({n})" for f, n in fields.items()))
    for key in ("items", "synthetic_queries", "rec_pairs", "embed_seconds", "train_seconds"):
        if key in info:
            click.echo(f"{key}: {info[key]}")
    if info.get("loss"):
        click.echo("final loss: " + ", ".join(f"{k} {v}" for k, v in info["loss"].items()))
    for key in ("validation_item_text", "validation_queries"):
        val = info.get(key)
        if val:
            accs = ", ".join(f"{f} {v:.2f}" for f, v in val.items()
                             if f not in ("items", "queries") and v is not None)
            click.echo(f"{key} (top-1, {val.get('items')} held-out items): {accs}")


@click.command("intent")
@click.argument("query")
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True,
              help="Values shown per attribute.")
@click.option("--name", default="intent", show_default=True, help="Artifact name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def intent_command(state: CliState, query: str, top: int, name: str, as_json: bool) -> None:
    """What the stored intent model reads in QUERY: a distribution over each attribute's
    values (soft facets) and a demand score."""
    import torch

    from polyrec.contracts import EncoderContext
    from polyrec.retrieve.intent_model import load_intent
    if not query.strip():
        raise ConfigError("the query is empty")
    engine = state.engine()
    loaded = load_intent(engine, name)
    enc = engine.encoder(loaded.encoder)
    vec = enc.encode_query(query, EncoderContext(engine=engine, device=engine.device,
                                                 progress=False))
    pred = loaded.predict(torch.as_tensor(vec), top)
    if as_json:
        echo_json({"query": query, "model": f"{name} v{loaded.version}", **pred.as_dict()})
        return
    click.echo(f"intent model '{name}' v{loaded.version}; demand {pred.demand:+.2f}")
    for f, vals in pred.facets.items():
        click.echo(f"  {f}: " + ", ".join(f"{v} ({p:.2f})" for v, p in vals))


COMMANDS: list[Any] = [train_intent_command, intent_command]
