"""``polyrec recommend --all --ray --out FILE``: batch recommendations scored on Ray.

The users (checked on the driver, as locally) are cut into shards of ``shard`` users;
a pool of Ray actors, each with its own Engine over the same store and the live pipeline
loaded once, scores a shard with the local batch core (polyrec.rank.batch.recommend_block,
``batch_size`` users per block) and returns its recommendations; the driver yields them in
the users' order, so the output is the local path's. Every actor serves the version that
was live when the run started; a version activated meanwhile fails the run (one error)
rather than mixing two models in one export.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import torch

from polyrec.cluster import connected, workers
from polyrec.errors import ConfigError, ModelNotTrainedError
from polyrec.rank import registry
from polyrec.rank.batch import (BATCH_SIZE, MAX_BLOCK_CELLS, BatchOptions, keep_mask,
                                recommend_block, resolve_users)
from polyrec.rank.recommend import Recommendation, check_filters

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine

#: Users per shard (the unit of work one actor takes at a time).
SHARD_USERS = 2048


class ScoreActor:
    """A Ray actor holding an Engine and its live pipeline; scores shards of users."""

    def __init__(self, url: str, device: str, options: BatchOptions, batch_size: int) -> None:
        from polyrec.engine import Engine
        self.engine = Engine(url, device=device, progress=False, encode_on_arrival=False)
        self.rec = self.engine.services.recommender()
        self.rec.check_live()
        self.snap = self.rec.refresh()
        self.options = options
        data = self.snap.data
        self.item_index = data.item_index()
        self.keep = keep_mask(self.engine, self.snap, options.filters)
        self.batch_size = max(1, min(batch_size, MAX_BLOCK_CELLS // max(data.n_items, 1)))

    def version(self) -> int | None:
        return self.rec.version

    def score(self, pairs: Sequence[tuple[str, int]]) -> list[tuple[str, list[Recommendation]]]:
        out: list[tuple[str, list[Recommendation]]] = []
        for start in range(0, len(pairs), self.batch_size):
            block = list(pairs[start:start + self.batch_size])
            recs = recommend_block(self.rec, self.snap, block, self.options, keep=self.keep,
                                   item_index=self.item_index)
            out += [(user, r) for (user, _), r in zip(block, recs)]
        return out


def recommend_many(engine: "Engine", users: Iterable[str] | None = None, k: int = 10, *,
                   address: str | None = None, n_workers: int | None = None,
                   shard: int | None = None, filters: Mapping[str, Any] | None = None,
                   exclude_seen: bool = True, diversity: float = 0.0,
                   online: bool | None = None, explore: bool | None = None,
                   batch_size: int = BATCH_SIZE
                   ) -> Iterator[tuple[str, list[Recommendation]]]:
    """``Engine.recommend_many`` scored by ``n_workers`` Ray actors (default one per CPU
    of the cluster, at most one per shard of ``shard`` users, default SHARD_USERS):
    (user, recommendations) in the users' order.
    The cluster is joined (or started) when iteration begins and left at its end."""
    options = BatchOptions(k=int(k), filters=filters or None, exclude_seen=exclude_seen,
                           diversity=float(diversity), online=online, explore=explore)
    options.check()
    shard = SHARD_USERS if shard is None else shard
    if batch_size < 1 or shard < 1:
        raise ConfigError(f"batch_size and shard must be at least 1, not {batch_size}, {shard}")
    check_filters(engine, options.filters)
    live = registry.live_version(engine)
    if live is None:
        raise ModelNotTrainedError("no live model: run `polyrec train` first")
    pairs = resolve_users(engine, users)
    return _run(engine, pairs, options, live, address, n_workers, shard, batch_size)


def _run(engine: "Engine", pairs: list[tuple[str, int]], options: BatchOptions, live: int,
         address: str | None, n_workers: int | None, shard: int, batch_size: int
         ) -> Iterator[tuple[str, list[Recommendation]]]:
    if not pairs:
        return
    shards = [pairs[lo:lo + shard] for lo in range(0, len(pairs), shard)]
    with connected(address) as ray:
        from ray.util import ActorPool
        n = min(workers(ray, n_workers), len(shards))
        device = str(engine.device)
        actor = ray.remote(num_cpus=1, num_gpus=1 if device.startswith("cuda") else 0)(ScoreActor)
        actors = [actor.remote(engine.url, device, options, batch_size) for _ in range(n)]
        try:
            versions = set(ray.get([a.version.remote() for a in actors]))
            if versions != {live}:
                raise ConfigError(f"the live model changed while the Ray workers loaded it "
                                  f"(version {live} on the driver, {sorted(versions)} on the "
                                  "workers): run the batch again")
            for part in ActorPool(actors).map(lambda a, s: a.score.remote(s), shards):
                yield from part
        finally:
            for a in actors:
                ray.kill(a)
