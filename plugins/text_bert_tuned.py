"""The bert encoder fine-tuned on the catalogue (``polyrec tune-encoder``).

Contrastive training of the text model (all-MiniLM-L6-v2 by default) with in-batch
negatives (MultipleNegativesRanking loss: cross-entropy over the scaled cosine
similarities of each anchor with every positive of the batch) on two kinds of pairs:

- (synthetic shopper query, item text): queries made from the item's categorical
  attributes and title (plugins/intent_multitask.py: templates, synonyms, dropped words);
- (item text, item text) of items the same user interacted with (co-interactions),
  when the store has any (``co_share`` of the batches' pairs).

Only the top ``train_layers`` transformer layers are trained (the embeddings and the
lower layers stay frozen, so a CPU run stays cheap); the trained parameters are stored
as the artifact ``encoder_tuned`` (kind ``text_weights``). The bert encoder uses them
with the option ``weights``: ``polyrec encode -e bert --set bert.weights=encoder_tuned``.
The weights' digest is part of the encoder's fingerprint, so the cached vectors are
re-encoded and models trained on the old vectors (intent models) are refused until
trained again.
"""
from __future__ import annotations

import hashlib
import random
import time
from typing import Any

import click
import torch

from polyrec import (ConfigError, EncoderContext, Engine, NotFoundError, hookimpl, load_artifact,
                     progress_bar, save_artifact, stage)
from polyrec.plugins.intent_multitask import (categorical_fields, synthetic_queries,
                                              thesaurus_synonyms)

KIND = "text_weights"
ARTIFACT = "encoder_tuned"


def _payload(state: dict[str, torch.Tensor]) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_tuned_state(engine: Any, name: str) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """(parameters, digest of the payload, meta) of the stored tuned weights ``name``."""
    import io
    if engine is None:
        raise ConfigError(f"bert weights={name}: tuned weights are read from a polyrec "
                          "store, and this encoder has no engine")
    try:
        with engine.store.session() as s:
            art = load_artifact(s, name)
    except NotFoundError:
        raise ConfigError(f"bert weights={name}: no tuned weights named '{name}' in the "
                          "store (run polyrec tune-encoder)") from None
    if art.kind != KIND:
        raise ConfigError(f"bert weights={name}: artifact '{name}' is a {art.kind}, not "
                          "tuned text weights")
    state = torch.load(io.BytesIO(art.data), map_location="cpu", weights_only=True)
    return state, hashlib.sha256(art.data).hexdigest()[:16], dict(art.meta)


def apply_tuned_weights(model: torch.nn.Module, engine: Any, name: str,
                        base_revision: str) -> str:
    """Load the tuned parameters ``name`` into ``model`` (a transformers model of the
    base the weights were tuned from); returns their digest. ConfigError when the base
    differs or a parameter does not fit."""
    state, digest, meta = load_tuned_state(engine, name)
    if meta.get("base_revision") not in (None, base_revision):
        raise ConfigError(f"bert weights={name} were tuned from weights "
                          f"{meta.get('base_revision')}, not the loaded {base_revision}")
    own = model.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ConfigError(f"bert weights={name} do not fit the model ({len(bad)} parameters, "
                          f"e.g. {bad[0]})")
    model.load_state_dict(state, strict=False)
    return digest


def _pairs(items: list[Any], texts: dict[int, str], histories: list[list[int]],
           queries_per_item: int, rng: random.Random) -> tuple[list[tuple[str, str, int]],
                                                                list[tuple[str, str, int]]]:
    """(query, item text, item id) pairs and (item text, item text, item id) co-pairs."""
    fields = categorical_fields(items)
    synonyms = thesaurus_synonyms(fields)
    qpairs = [(q, texts[it.id], it.id) for it in items
              for q in synthetic_queries(it, fields, queries_per_item, rng, synonyms)]
    cpairs = []
    for h in histories:
        for a, b in zip(h, h[1:]):
            if a != b and a in texts and b in texts:
                cpairs.append((texts[a], texts[b], b))
    return qpairs, cpairs


def tune_encoder(engine: Engine, *, steps: int = 300, batch_size: int = 32, lr: float = 5e-5,
                 max_length: int = 48, queries_per_item: int = 8, co_share: float = 0.25,
                 train_layers: int = 2, scale: float = 20.0, name: str = ARTIFACT,
                 seed: int = 0) -> dict[str, Any]:
    """Fine-tune the default bert model on the catalogue and store the trained parameters
    as the next version of artifact ``name``; returns a report (pairs, losses, seconds)."""
    if steps < 1 or batch_size < 2 or train_layers < 1 or not 0 <= co_share <= 1:
        raise ConfigError("tune-encoder: steps >= 1, batch size >= 2, train layers >= 1 and "
                          "co-share in [0, 1]")
    from polyrec.plugins.text_bert import DEFAULT_MODEL, BertEncoder, mean_pool
    started = time.perf_counter()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    base = BertEncoder(model=DEFAULT_MODEL, max_length=max_length)
    ctx = EncoderContext(engine=engine, device=engine.device, progress=engine.progress)
    base.prepare(ctx)
    model, tok = base._model, base._tokenizer  # noqa: SLF001 - the same plugin family
    revision = base._revision  # noqa: SLF001
    items = engine.items()
    if not items:
        raise ConfigError("tune-encoder: the catalogue is empty")
    texts = {it.id: base.content(it) or (it.title or it.external_id) for it in items}
    histories = _histories(engine)
    qpairs, cpairs = _pairs(items, texts, histories, queries_per_item, rng)
    if not qpairs:
        raise ConfigError("tune-encoder: no synthetic queries (no categorical attributes "
                          "and no titles)")
    layers = model.encoder.layer
    n_train = min(train_layers, len(layers))
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [f"encoder.layer.{k}." for k in range(len(layers) - n_train, len(layers))]
    params = {n: p for n, p in model.named_parameters() if any(n.startswith(t) for t in trained)}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params.values(), lr=lr)
    device = ctx.device
    model.to(device).train()

    def embed(batch: list[str]) -> torch.Tensor:
        enc = tok(batch, truncation=True, max_length=max_length, padding=True,
                  return_tensors="pt").to(device)
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return mean_pool(out.last_hidden_state, enc["attention_mask"])

    n_co = int(round(batch_size * co_share)) if cpairs else 0
    losses: list[float] = []
    bar = progress_bar(range(steps), desc="tune-encoder step", unit="steps",
                       enabled=engine.progress)
    for _ in bar:
        batch = rng.sample(qpairs, min(batch_size - n_co, len(qpairs)))
        if n_co:
            batch += rng.sample(cpairs, min(n_co, len(cpairs)))
        anchors, positives, owners = zip(*batch)
        a, p = embed(list(anchors)), embed(list(positives))
        scores = a @ p.T * scale
        own = torch.tensor(owners, device=device)
        dup = (own.unsqueeze(0) == own.unsqueeze(1)) & ~torch.eye(len(batch), dtype=torch.bool,
                                                                 device=device)
        scores = scores.masked_fill(dup, -1e4)  # the same item twice is no negative
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(batch), device=device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    model.eval()
    state = {n: p.detach().cpu().clone() for n, p in params.items()}
    tail = losses[-20:]
    meta = {"base_model": DEFAULT_MODEL, "base_revision": revision, "steps": steps,
            "batch_size": batch_size, "lr": lr, "max_length": max_length,
            "queries_per_item": queries_per_item, "co_share": co_share,
            "train_layers": n_train, "scale": scale, "seed": seed,
            "query_pairs": len(qpairs), "co_pairs": len(cpairs),
            "loss_first": round(sum(losses[:20]) / len(losses[:20]), 4),
            "loss_last": round(sum(tail) / len(tail), 4)}
    with engine.store.session() as s:
        version = save_artifact(s, name, KIND, _payload(state), meta)
    stage(f"tune-encoder: stored '{name}' v{version}", engine.progress)
    return {"artifact": name, "version": version, **meta,
            "seconds": round(time.perf_counter() - started, 1)}


def _histories(engine: Any) -> list[list[int]]:
    """Per user, the ids of the items they interacted with, oldest first (users with
    two or more)."""
    from sqlalchemy import text
    out: dict[int, list[int]] = {}
    with engine.store.session() as s:
        for user, item in s.execute(text("SELECT user_id, item_id FROM interactions "
                                         "ORDER BY ts, id")):
            out.setdefault(int(user), []).append(int(item))
    return [h for h in out.values() if len(h) > 1]


@click.command("tune-encoder")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="Training steps (batches).")
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True,
              help="Pairs per batch (the other pairs of a batch are the negatives).")
@click.option("--lr", type=float, default=5e-5, show_default=True, help="Learning rate.")
@click.option("--max-length", type=click.IntRange(min=8), default=48, show_default=True,
              help="Tokens per text while training.")
@click.option("--queries-per-item", type=click.IntRange(min=1), default=8, show_default=True,
              help="Synthetic queries generated per item.")
@click.option("--co-share", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="Share of each batch from co-interacted item pairs (when there are any).")
@click.option("--train-layers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Top transformer layers trained (the rest stay frozen).")
@click.option("--name", default=ARTIFACT, show_default=True, help="Artifact name.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_obj
def tune_encoder_command(state: Any, steps: int, batch_size: int, lr: float, max_length: int,
                         queries_per_item: int, co_share: float, train_layers: int, name: str,
                         seed: int, as_json: bool) -> None:
    """Fine-tune the bert text model on the catalogue (synthetic queries and
    co-interactions, in-batch negatives) and store the weights; use them with
    polyrec encode -e bert --set bert.weights=NAME."""
    import json
    report = tune_encoder(state.engine(), steps=steps, batch_size=batch_size, lr=lr,
                          max_length=max_length, queries_per_item=queries_per_item,
                          co_share=co_share, train_layers=train_layers, name=name, seed=seed)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"Stored tuned text weights '{name}' v{report['version']} in "
               f"{report['seconds']:.1f} s: {report['query_pairs']:,} query pairs, "
               f"{report['co_pairs']:,} co-interaction pairs, loss {report['loss_first']} -> "
               f"{report['loss_last']}")
    click.echo(f"Use them: polyrec encode -e bert --set bert.weights={name} (then train-intent "
               "again if you use an intent model)")


@hookimpl
def register_commands(cli):  # type: ignore[no-untyped-def]
    cli.add_command(tune_encoder_command)
