"""``polyrec search``, ``polyrec similar`` and ``polyrec serve``."""
from __future__ import annotations

from typing import Any, Sequence

import click

from polyrec.cli.main import CliState, echo_json
from polyrec.errors import ConfigError

#: Attributes shown next to each result in the text output, when items have them.
SHOWN = ("product_type_name", "colour_group_name", "class", "release_year", "department_name")


def parse_filters(values: Sequence[str]) -> dict[str, Any] | None:
    """``field=value`` options -> {field: value}; a field given twice -> a list (OR)."""
    out: dict[str, Any] = {}
    for raw in values:
        key, sep, value = raw.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--filter must look like field=value, not '{raw}'")
        key, value = key.strip(), value.strip()
        if key in out:
            out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value]
        else:
            out[key] = value
    return out or None


def _describe(attributes: dict[str, Any]) -> str:
    parts = []
    for name in SHOWN:
        value = attributes.get(name)
        if value not in (None, "", []):
            parts.append(", ".join(map(str, value)) if isinstance(value, list) else str(value))
    return " | ".join(parts)


def _values(match: Any) -> str:
    """A match's value, and how many more values it names alike ("mens": every Men
    section, one of them shown): a word inside several value names is no one of them."""
    alike = [v for v, p in match.alternatives if p >= match.confidence - 1e-6]
    if match.source not in ("partial", "word-form") or not alike:
        return match.value
    more = f"{len(alike)}+" if len(alike) >= 5 else str(len(alike))
    return f"{match.value} and {more} more alike"


@click.command("search")
@click.argument("query")
@click.option("-k", "--k", "k", default=10, show_default=True, type=int, help="How many results.")
@click.option("--user", default=None, help="Personalise for this user (external id).")
@click.option("--filter", "filters", multiple=True, metavar="FIELD=VALUE",
              help="Only items whose attribute (or slot: colour, type, genre...) has this value; repeatable.")
@click.option("--understanding", type=click.Choice(["boost", "filter", "off"]), default="boost",
              show_default=True, help="How recognised colours, types, genres... shape the results.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def search_command(state: CliState, query: str, k: int, user: str | None,
                   filters: tuple[str, ...], understanding: str, as_json: bool) -> None:
    """Search the catalogue: dense + image + BM25 retrieval fused by RRF."""
    response = state.engine().search(query, k, user=user, filters=parse_filters(filters),
                                     understanding=understanding)
    if as_json:
        echo_json(response.as_dict())
        return
    understood = response.understood
    click.echo("understood: " + ("; ".join(f"{s}: {v if isinstance(v, str) else ', '.join(v)}"
                                             for s, v in understood.items()) or "-"))
    soft = [m for m in response.understanding.matches if m.source not in ("attribute", "graph")]
    if soft:  # matches by meaning: the span, the value, how it was read, how sure
        click.echo("matched: " + "; ".join(f"'{m.text}' -> {m.slot}: {_values(m)} ({m.source} "
                                           f"{m.confidence:.2f})" for m in soft))
    if response.understanding.synonyms:
        click.echo("synonyms: " + ", ".join(f"{a} -> {b}" for a, b in
                                            response.understanding.synonyms.items()))
    if response.understanding.corrected:
        click.echo("corrected: " + ", ".join(f"{a} -> {b}" for a, b in
                                             response.understanding.corrected.items()))
    intent = response.understanding.intent
    if intent:
        click.echo(f"intent: {intent['slot']}: {intent['value']} ({intent['confidence']:.2f})")
    click.echo(f"rankings: {', '.join(response.rankings) or '-'}"
               + (f"; personalised by {response.personalised}" if response.personalised else ""))
    for note in response.notes:
        click.echo(f"note: {note}")
    for n, hit in enumerate(response.results, start=1):
        extra = _describe(hit.attributes)
        click.echo(f"{n:>3}. {hit.item:<14} {hit.score:8.4f}  {hit.title or ''}"
                   + (f"  [{extra}]" if extra else ""))


@click.command("similar")
@click.argument("item")
@click.option("-k", "--k", "k", default=10, show_default=True, type=int, help="How many results.")
@click.option("--filter", "filters", multiple=True, metavar="FIELD=VALUE",
              help="Only items whose attribute (or slot) has this value; repeatable.")
@click.option("--basis", default="auto", show_default=True,
              help="auto (trained model, else encoders), model, encoders, a modality (text, "
                   "image, kg: its encoder in use) or an encoder name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def similar_command(state: CliState, item: str, k: int, filters: tuple[str, ...], basis: str,
                    as_json: bool) -> None:
    """Items most similar to ITEM (external id)."""
    response = state.engine().similar(item, k, filters=parse_filters(filters), basis=basis)
    if as_json:
        echo_json(response.as_dict())
        return
    click.echo(f"similar to {response.item} by {response.basis} ({', '.join(response.spaces)})")
    for note in response.notes:
        click.echo(f"note: {note}")
    for n, hit in enumerate(response.results, start=1):
        extra = _describe(hit.attributes)
        click.echo(f"{n:>3}. {hit.item:<14} {hit.score:8.4f}  {hit.title or ''}"
                   + (f"  [{extra}]" if extra else ""))


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Serving processes (uvicorn workers), each with its own Engine over --db "
                   "(PostgreSQL or a SQLite file); each sees other processes' writes and a "
                   "newly live model within seconds, without a restart (docs/storage.md).")
@click.option("--token", envvar="POLYREC_TOKEN", default=None,
              help="Bearer token required by write endpoints (env POLYREC_TOKEN).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--encode-on-arrival/--no-encode-on-arrival", default=True, show_default=True,
              help="Encode items written by PUT /items in the background.")
@click.option("--image-root", default=None, type=click.Path(file_okay=False, exists=True),
              help="Item images written by PUT /items must lie under this folder, and the "
                   "admin pages serve images only from under it (default: the folders "
                   "the store recorded at ingestion).")
@click.option("--torch-threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="Torch threads per serving process. Requests run on parallel threads, so "
                   "one each avoids oversubscribing the cores (several per request made a "
                   "1M-item recommend 5-10x slower on 2 busy cores; docs/serving.md).")
@click.option("--warm/--no-warm", default=True, show_default=True,
              help="Load the live model and the search models (query encoders, intent model, "
                   "vector spaces) in the background as each process starts, so the first "
                   "requests do not wait for them (a cold first search took ~7 s on "
                   "ml-100k); GET /health shows the warm-up's state.")
@click.pass_obj
def serve_command(state: CliState, host: str, port: int, workers: int, token: str | None,
                  log_level: str, encode_on_arrival: bool, image_root: str | None,
                  torch_threads: int, warm: bool) -> None:
    """Serve recommend, search, similar, feedback and upserts over HTTP (FastAPI + uvicorn),
    with the admin pages at / and the API docs at /docs and /redoc (all offline)."""
    try:
        from polyrec.serve.app import serve
    except ImportError as exc:  # pragma: no cover - the [serve] extra is missing
        raise ConfigError(f"serving needs fastapi and uvicorn: pip install 'polyrec[serve]' ({exc})")
    import os

    import torch
    torch.set_num_threads(torch_threads)
    os.environ["OMP_NUM_THREADS"] = str(torch_threads)  # worker processes start with it
    if workers > 1:  # the database is opened (checked, upgraded) once here, then by each worker
        from polyrec.serve.workers import serve_workers
        url = state.engine().url
        state.close()
        click.echo(f"polyrec serving {url} on http://{host}:{port} with {workers} worker "
                   f"processes (writes {'need a bearer token' if token else 'are open'})", err=True)
        serve_workers(url, host, port, workers=workers, device=state.device,
                      lock_timeout=state.lock_timeout, log_level=log_level, token=token,
                      encode_on_arrival=encode_on_arrival, image_root=image_root, warm=warm)
        return
    click.echo(f"polyrec serving {state.engine().url} on http://{host}:{port} "
               f"(admin pages: /; API docs: /docs, /redoc; writes "
               f"{'need a bearer token' if token else 'are open'})", err=True)
    serve(state.engine(), host, port, token=token, log_level=log_level,
          encode_on_arrival=encode_on_arrival, image_root=image_root, warm=warm)


COMMANDS = [search_command, similar_command, serve_command]
