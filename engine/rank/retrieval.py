"""A user's best items in a large catalogue without scoring every item.

A ranker whose scores are inner products (``Ranker.retrieval_keys`` /
``retrieval_queries``, e.g. the two-tower model) gives the item side once per catalogue
state; the Recommender then asks a vector index (``polyrec.rank.vector_index``: exact,
or from ``IndexSettings.threshold`` items the FAISS index of ``IndexSettings.kind``, an
inverted file for the Recommender: maximum inner product) for the top candidates of one
user's query vector, and only those candidates get a score. Everything after that
(online blending, seen items, filters, diversity, exploration) runs as before over the
candidates, with the other items at ``-inf``.

Below the index threshold, without FAISS, or for a ranker without retrieval keys, the
Recommender scores every item with ``score_users`` as it always did.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyrec.store.vector_cache import load_arrays, save_arrays
from polyrec.rank.vector_index import (IndexSettings, IndexSlot, matrix_fingerprint,
                                       wants_approximate)

log = logging.getLogger("polyrec.models")


@dataclass
class Retrieval:
    """The item side of one ranker over one catalogue state, with its index. Row ``r``
    of the index is item ``items[r]`` (a dense item index of the data snapshot)."""

    ranker: Any
    items: torch.Tensor
    slot: IndexSlot

    @property
    def size(self) -> int:
        """How many items can be retrieved (the ranker's valid items)."""
        return len(self.items)

    def candidates(self, query: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(item indices [n'], their scores [n']) of the ``n`` best candidates for
        ``query`` [D] (inner products), best first; n' <= n."""
        values, rows = self.slot.current.search(query.float(), n)
        return self.items[rows], values.float()


def _overrides(ranker: Any, name: str) -> bool:
    from polyrec.contracts import Ranker
    method = getattr(type(ranker), name, None)
    return method is not None and method is not getattr(Ranker, name)


def open_retrieval(ranker: Any, data: Any, *, name: str, settings: IndexSettings,
                   directory: Path | None, state_key: str | None = None) -> Retrieval | None:
    """The ranker's retrieval over ``data``, or None when the Recommender should score
    every item: a small catalogue (below ``settings.threshold``, or FAISS missing, or
    ``backend="exact"``), or a ranker without retrieval keys. Raises ValueError when the
    ranker's keys break the contract (wrong shape or type). The index (``settings.kind``)
    is loaded from ``directory`` when a previous process saved one for the same vectors,
    else built on a background thread (exact top-k over the keys meanwhile).

    ``state_key`` names the ranker version and catalogue state the keys derive from
    (the contract: ``retrieval_keys`` depends on the fitted ranker and the items and
    their features only): with a ``directory`` the keys are saved there under it and a
    later process maps them instead of asking the ranker (for a two-tower model at 1M
    items, the item tower over the whole catalogue: seconds)."""
    if ranker is None or not _overrides(ranker, "retrieval_keys"):
        return None
    if not wants_approximate(data.n_items, settings):
        return None
    stem = f"keys-{name.split(':')[0]}"
    saved = (load_arrays(directory, stem, state_key, ("items", "matrix", "fingerprint"))
             if directory is not None and state_key else None)
    if saved is not None and saved["items"].ndim == 1 and saved["matrix"].ndim == 2 \
            and len(saved["items"]) == saved["matrix"].shape[0] \
            and (len(saved["items"]) == 0 or int(saved["items"].max()) < data.n_items):
        items = torch.from_numpy(np.asarray(saved["items"], dtype=np.int64))
        matrix = torch.from_numpy(saved["matrix"])
        fingerprint = bytes(saved["fingerprint"]).decode()  # hashing 1M keys again: ~0.5 s
        log.info("recommend retrieval for %s: keys of %s items read from %s", name,
                 len(items), directory)
    else:
        found = ranker.retrieval_keys(data)
        if found is None:
            return None
        items, matrix = _checked_keys(found, data.n_items)
        fingerprint = matrix_fingerprint(matrix)
        if directory is not None and state_key:
            save_arrays(directory, stem, state_key,
                        {"items": items.numpy(), "matrix": matrix.numpy(),
                         "fingerprint": np.frombuffer(fingerprint.encode(), dtype=np.uint8)})
    slot = IndexSlot(matrix, name=name, settings=settings, directory=directory,
                     fingerprint=fingerprint)
    log.info("recommend retrieval for %s: %s items, %s index", name, len(items), slot.kind)
    return Retrieval(ranker=ranker, items=items, slot=slot)


def _checked_keys(found: Any, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid item indices, their keys as a contiguous float32 matrix) of a ranker's
    RetrievalKeys; ValueError naming what breaks the contract."""
    keys, valid = found.keys, found.valid
    if not isinstance(keys, torch.Tensor) or keys.ndim != 2 or keys.shape[0] != n_items:
        raise ValueError(f"retrieval_keys gave keys of shape {tuple(getattr(keys, 'shape', ()))}"
                         f", not [{n_items}, D]")
    if not isinstance(valid, torch.Tensor) or valid.shape != (n_items,):
        raise ValueError(f"retrieval_keys gave a valid mask of shape "
                         f"{tuple(getattr(valid, 'shape', ()))}, not [{n_items}]")
    items = valid.bool().cpu().nonzero().flatten()
    matrix = keys.detach().float().cpu()[items].contiguous()
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("retrieval_keys gave non-finite keys for valid items")
    return items, matrix
