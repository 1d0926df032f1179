"""``polyrec encode --ray``: the encoding pipeline with Ray Data actors doing the encoding.

The pipeline (polyrec.encode.pipeline) decides what needs encoding exactly as it does
locally (content hashes, encoder fingerprint, ``--force``, stale vectors removed); only
its runner changes. The items to encode go to Ray Data in shards of ``shard`` items;
``map_batches`` hands them to a pool of actors, each of which holds one prepared copy of
the encoder (built from the plugin registry with the same options, on its own Engine over
the same store URL, so an encoder that reads the store in ``prepare`` finds it); the
driver collects the vectors and writes them back in batches of ``CHUNK_ITEMS`` rows, one
transaction each. An actor whose encoder gives another fingerprint than the driver's
(another model on that machine) fails the run instead of mixing vectors.

On a cluster of several machines the store must be one every machine reaches
(PostgreSQL), and the plugins and model files must be installed on every machine.
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from polyrec.cluster import connected, workers
from polyrec.contracts import EncodeResult, Encoder, EncoderContext, ItemView
from polyrec.encode import pipeline
from polyrec.errors import EncodingError
from polyrec.progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine

#: Items per Ray Data block (the unit one actor encodes at a time).
SHARD_ITEMS = 512
_FIELDS = ("id", "external_id", "title", "text", "image", "entity")


def _rows(items: Sequence[ItemView]) -> list[dict[str, Any]]:
    """Rows for Ray Data: the id and the whole item as JSON text (one string column, so
    Arrow never infers a type for a column that is empty in a shard)."""
    return [{"id": it.id, "item": json.dumps({**{f: getattr(it, f) for f in _FIELDS},
                                              "attributes": it.attributes or {}},
                                             default=str)}
            for it in items]


def _views(batch: Mapping[str, Any]) -> list[ItemView]:
    return [ItemView(**json.loads(str(raw))) for raw in batch["item"]]


class EncodeActor:
    """A Ray Data actor holding one prepared encoder; ``__call__`` encodes a batch of rows
    into columns ``id``, ``ok`` (False: failed, see ``reason``), ``vector`` [n, dim]."""

    def __init__(self, url: str, name: str, options: dict[str, Any], device: str,
                 batch_size: int | None, fingerprint: str) -> None:
        from polyrec.engine import Engine
        self.engine = Engine(url, device=device, progress=False, encode_on_arrival=False)
        self.encoder: Encoder = self.engine.registry("encoders").get(name)(**options)
        self.ctx = EncoderContext(engine=self.engine, device=self.engine.device,
                                  batch_size=batch_size, progress=False)
        self.encoder.prepare(self.ctx)
        mine = self.encoder.fingerprint()
        if mine != fingerprint:
            raise EncodingError(f"encoder '{name}' gives fingerprint {mine} on this Ray worker, "
                                f"{fingerprint} on the driver: install the same model everywhere")

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        items = _views(batch)
        result = self.encoder.encode(items, self.ctx)
        vecs = result.vectors.detach().float().cpu().numpy()
        if vecs.shape[0] != len(result.item_ids):
            raise EncodingError(f"encoder returned {vecs.shape[0]} vectors for "
                                f"{len(result.item_ids)} items")
        row = {i: k for k, i in enumerate(result.item_ids)}
        dim = vecs.shape[1] if vecs.ndim == 2 else 0
        out = np.zeros((len(items), dim), dtype=np.float32)
        ok = np.zeros(len(items), dtype=bool)
        reason = []
        for k, it in enumerate(items):
            if it.id in row:
                out[k], ok[k] = vecs[row[it.id]], True
                reason.append("")
            else:
                reason.append(result.failed.get(it.id, "the encoder returned no vector"))
        return {"id": np.array([it.id for it in items], dtype=np.int64), "ok": ok,
                "reason": np.array(reason, dtype=object), "vector": out}


def ray_runner(stack: contextlib.ExitStack, address: str | None = None, *,
               n_workers: int | None = None, shard: int = SHARD_ITEMS) -> pipeline.Runner:
    """A pipeline runner that encodes on Ray (``address``: see polyrec.cluster.connected)
    with ``n_workers`` actors (default one per CPU of the cluster). The cluster is joined
    the first time something needs encoding, and left when ``stack`` closes."""
    joined: list[Any] = []

    def run(engine: "Engine", name: str, enc: Encoder, ctx: EncoderContext,
            todo: Sequence[ItemView], hashes: Mapping[int, str], rep: pipeline.EncoderReport,
            cached: Mapping[int, Any], dtype: str) -> None:
        if not todo:
            return
        if not joined:
            joined.append(stack.enter_context(connected(address)))
        ray = joined[0]
        _encode_on_ray(ray, engine, name, ctx, todo, hashes, rep, cached, dtype,
                       workers(ray, n_workers), shard)

    return run


def _encode_on_ray(ray: Any, engine: "Engine", name: str, ctx: EncoderContext,
                   todo: Sequence[ItemView], hashes: Mapping[int, str],
                   rep: pipeline.EncoderReport, cached: Mapping[int, Any], dtype: str,
                   n_workers: int, shard: int) -> None:
    import ray.data
    from ray.data import ActorPoolStrategy

    ray.data.DataContext.get_current().enable_progress_bars = False
    external = {it.id: it.external_id for it in todo}
    blocks = max(1, -(-len(todo) // shard))
    n_workers = min(n_workers, blocks)  # an actor loads the model: never one with nothing to do
    ds = ray.data.from_items(_rows(todo), override_num_blocks=blocks)
    device = str(engine.device)
    ds = ds.map_batches(
        EncodeActor, batch_size=shard, compute=ActorPoolStrategy(size=n_workers),
        num_cpus=1, num_gpus=1 if device.startswith("cuda") else 0,
        fn_constructor_kwargs={"url": engine.url, "name": name,
                               "options": dict(rep.options), "device": device,
                               "batch_size": ctx.batch_size, "fingerprint": rep.fingerprint})
    bar = progress_bar(total=len(todo), desc=f"encode {name} (ray x{n_workers})", unit="item",
                       enabled=bool(ctx.progress))
    start = time.perf_counter()
    try:
        for batch in ds.iter_batches(batch_size=pipeline.CHUNK_ITEMS, batch_format="numpy"):
            ids = [int(i) for i in batch["id"]]
            ok = batch["ok"].astype(bool)
            result = EncodeResult(
                vectors=torch.from_numpy(np.asarray(batch["vector"], dtype=np.float32)[ok]),
                item_ids=[i for i, good in zip(ids, ok) if good],
                failed={i: str(r) for i, good, r in zip(ids, ok, batch["reason"]) if not good})
            pipeline.store_chunk(engine, name, ids, result, hashes, rep, cached, dtype, external)
            bar.update(len(ids))
    except EncodingError:
        raise
    except Exception as exc:  # noqa: BLE001 - a worker's failure, as one error line
        rep.error = f"encoder '{name}' failed on Ray: {_root_cause(exc)}"
    finally:
        bar.close()
        rep.encode_seconds += time.perf_counter() - start


def _root_cause(exc: BaseException) -> str:
    """The innermost error of a Ray task failure, as one line."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    while cause is not None and (getattr(cause, "cause", None) or cause.__cause__) is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    err = cause or exc
    return f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"


def encode(engine: "Engine", encoders: str | Iterable[str] | None = None, *,
           address: str | None = None, n_workers: int | None = None,
           shard: int = SHARD_ITEMS, force: bool = False,
           batch_size: int | None = None, options: Mapping[str, Mapping[str, Any]] | None = None,
           dtype: str = "float16") -> pipeline.EncodeReport:
    """``Engine.encode`` with the encoding done by Ray Data actors (same arguments, same
    cache rules, same report); ``address``: the Ray cluster (default: the one this process
    is connected to, else a local one started for the run); ``n_workers`` actors (default
    one per CPU of the cluster, at most one per shard of ``shard`` items)."""
    with contextlib.ExitStack() as stack:  # one cluster for every encoder of the run
        return pipeline.encode(engine, encoders, force=force, batch_size=batch_size,
                               options=options, dtype=dtype,
                               runner=ray_runner(stack, address, n_workers=n_workers,
                                                                 shard=shard))
