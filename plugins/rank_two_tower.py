"""The "two_tower" ranker: a fused content + ID item tower and a history user tower.

Item tower: a fuser (attention by default) over the item's modality vectors, plus an
item-ID embedding for items that had interactions when the model was fitted (an item
added to the catalogue after fitting gets the similarity-weighted mean of the ID
embeddings and biases of its nearest warm fitted items in content space,
TrainingData.catalogue_map; one with no content vectors at all gets the row's smallest
finite score); during
training the ID embedding is dropped for a share of items so the content path alone
must rank well (that is what scores cold items). User tower: the mean of the item-tower
vectors of the user's history, through a linear layer, plus an optional user-ID
embedding. While training, the target item is left out of its user's history.

Loss: sampled softmax (default) or BPR, over in-batch and/or uniformly drawn negatives.
Early stopping on validation data carved from the training data with the same protocol
(polyrec.rank.evaluation.validation_split); with ``refit`` the model is then trained again on
all the data for the best number of epochs.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from polyrec import (ConfigError, Fuser, ModelNotTrainedError, Ranker, RetrievalKeys,
                     TrainingData, hookimpl, progress_bar, resolve_device)

DEFAULTS: dict[str, Any] = {
    "dim": 64, "fuser": "attention", "heads": 4, "dropout": 0.1, "modalities": None,
    "use_item_id": True, "use_user_id": False, "id_dropout": 0.5, "loss": "softmax",
    "negatives": "random", "n_random": 2048, "logq": True, "temperature": 0.1, "epochs": 40,
    "batch_size": 1024, "lr": 3e-3, "weight_decay": 0.0, "patience": 4, "metric": "ndcg@20",
    "validation": True, "refit": True, "seed": 0, "device": "auto", "threads": 1,
    "sparse_ids": "auto", "history_sample": None, "progress": False,
}
LOSSES = ("softmax", "bpr")
#: a training step runs the item tower over only the items it needs (targets, negatives,
#: the batch users' history items) when they are fewer than 1 / this of the catalogue
STEP_ITEMS_FRACTION = 2
#: ``sparse_ids`` "auto": the ID tables get sparse gradients and a lazy optimizer (only the
#: rows a step touched are updated) from this many items on; below it a step touches most
#: rows anyway and the dense AdamW is used
SPARSE_ID_ROWS = 100_000
#: ``history_sample`` None (auto): from ``SPARSE_ID_ROWS`` items a training step reads at most
#: this many of each batch user's history items, drawn at random (below it, all of them)
HISTORY_SAMPLE = 256
#: An epoch of at least this many steps also shows its steps (a line every 10 s off a
#: terminal): at 10M interactions one epoch is about an hour.
STEP_PROGRESS_STEPS = 100
NEGATIVES = ("in_batch", "random", "both")


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    """Limit torch's CPU threads while the block runs (on CPU, when ``threads`` is set).

    The two-tower's tensors are small: on a busy or small machine one thread is several
    times faster than threads spinning against each other (benchmarks/train.py)."""
    if device.type != "cpu" or not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _modality_list(value: Any) -> list[str] | None:
    if value is None or value == "all":
        return None
    if isinstance(value, str):
        return [m.strip() for m in value.replace("+", ",").split(",") if m.strip()]
    return [str(m) for m in value]


class TwoTowerModel(nn.Module):
    """The two towers over dense fit-time indices; ``dims`` may be empty (ID only)."""

    def __init__(self, dims: dict[str, int], n_items: int, n_users: int, dim: int,
                 fuser: type[Fuser] | None, fuser_options: dict[str, Any],
                 use_item_id: bool, use_user_id: bool, initialise: bool = True,
                 sparse_ids: bool = False) -> None:
        """``initialise`` False leaves the ID tables uninitialised (weights to be loaded:
        at 1M items their random init alone took about a second). ``sparse_ids``: the ID
        tables' gradients are sparse (only the rows a step used), for a lazy optimizer."""
        super().__init__()

        def table(rows: int, width: int) -> nn.Embedding:
            return (nn.Embedding(rows, width, sparse=sparse_ids) if initialise
                    else nn.Embedding(rows, width, sparse=sparse_ids,
                                      _weight=torch.empty(rows, width)))

        self.modalities = list(dims)
        self.fuser = fuser(dims, dim, **fuser_options) if dims and fuser else None
        self.item_id = table(n_items, dim) if use_item_id else None
        self.user_id = table(n_users, dim) if use_user_id else None
        for emb in (self.item_id, self.user_id):
            if emb is not None and initialise:
                nn.init.normal_(emb.weight, std=0.05)
        self.user_proj = nn.Linear(dim, dim)
        # item bias (popularity): an ID part for warm items, a content part for all
        self.id_bias = table(n_items, 1) if use_item_id else None
        self.content_bias = nn.Linear(dim, 1) if self.fuser is not None else None
        if self.id_bias is not None and initialise:
            nn.init.zeros_(self.id_bias.weight)
        self.dim = dim

    def items(self, tokens: dict[str, torch.Tensor], present: torch.Tensor,
              id_index: torch.Tensor, id_keep: torch.Tensor,
              id_mix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(item vectors [n, D] unit length, attention weights [n, M], scorable [n],
        item bias [n]); score(u, i) = <user_u, item_i> / temperature + bias_i.

        ``id_index``: fit-time index of each item (any value where ``id_keep`` is False).
        ``id_mix`` (rows [m], fit-time neighbour indices [m, k], weights [m, k]): items
        the model never saw get the weighted mean of their neighbours' ID embeddings and
        ID biases (rows whose weights are all zero get nothing).
        """
        n = id_index.shape[0]
        vec = torch.zeros(n, self.dim, device=id_index.device)
        weights = torch.zeros(n, len(self.modalities), device=id_index.device)
        scorable = torch.zeros(n, dtype=torch.bool, device=id_index.device)
        bias = torch.zeros(n, device=id_index.device)
        if self.fuser is not None:
            vec, weights = self.fuser(tokens, present)
            scorable = present.any(dim=1)
            bias = self.content_bias(vec.float()).squeeze(-1) * scorable
        if self.item_id is not None:
            keep = id_keep[:, None].float()
            vec = vec + self.item_id(id_index.clamp(min=0)) * keep
            bias = bias + (self.id_bias(id_index.clamp(min=0)) * keep).squeeze(-1)
            scorable = scorable | id_keep
            if id_mix is not None and len(id_mix[0]):
                rows, nb, w = id_mix
                w = w.to(vec.device, torch.float32)
                vec = vec.index_add(0, rows, (self.item_id(nb) * w[..., None]).sum(1).to(vec.dtype))
                bias = bias.index_add(0, rows, (self.id_bias(nb).squeeze(-1) * w).sum(1).to(bias.dtype))
                mixed = torch.zeros_like(scorable)
                mixed[rows] = w.sum(1) > 0
                scorable = scorable | mixed
        return F.normalize(vec.float(), dim=-1), weights, scorable, bias.float()

    def users(self, history_mean: torch.Tensor, user_index: torch.Tensor,
              user_keep: torch.Tensor) -> torch.Tensor:
        """User vectors [b, D] (unit length) from the mean of their history's item vectors."""
        vec = self.user_proj(history_mean)
        if self.user_id is not None:
            vec = vec + self.user_id(user_index.clamp(min=0)) * user_keep[:, None].float()
        return F.normalize(vec.float(), dim=-1)


class _Step(nn.Module):
    """One training step's loss as the forward of a module that holds the model: the
    unit DistributedDataParallel wraps when the ranker trains data-parallel."""

    def __init__(self, model: TwoTowerModel, loss: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, *args: Any) -> torch.Tensor:
        return self.loss(*args)


class TwoTowerRanker(Ranker):
    """Trained two-tower recommender; scores cold items from their content vectors.

    Options (defaults in ``DEFAULTS``): dim, fuser ('attention' or 'mean', or a Fuser
    class), heads, dropout, modalities (subset of the data's feature keys, e.g.
    'text,kg'; empty list or 'none' for ID only), use_item_id, use_user_id, id_dropout,
    loss ('softmax' | 'bpr'), negatives ('in_batch' | 'random' | 'both'), n_random,
    logq (log-q correction of sampled softmax), temperature, epochs, batch_size, lr,
    weight_decay, patience, metric, validation, refit, seed, device, threads (torch CPU
    threads while fitting; 0 leaves torch's setting), sparse_ids ('auto', 'on', 'off':
    sparse ID-table gradients and a lazy Adam that updates only the rows a step used;
    auto from ``SPARSE_ID_ROWS`` items), history_sample (while training, at most this many
    of a batch user's history items, drawn at random each step, make its history mean: an
    unbiased estimate of the mean of all of them, at a bounded cost for heavy users; 0 for
    all; None (auto): ``HISTORY_SAMPLE`` from ``SPARSE_ID_ROWS`` items, else all; serving
    always reads the whole history), progress; ``fusers`` (a registry with
    ``get(name)``) resolves plugin fusers by name.
    """

    name = "two_tower"
    handles_cold_items = True
    data_parallel = True
    #: Every option with its default (the engine fills device, fusers and progress).
    defaults: ClassVar[dict[str, Any]] = DEFAULTS

    def __init__(self, **options: Any) -> None:
        fusers = options.pop("fusers", None)
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f"two_tower: unknown option(s) {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(sorted(DEFAULTS))})")
        super().__init__(**{**DEFAULTS, **options})
        o = self.options
        if o["loss"] not in LOSSES:
            raise ConfigError(f"two_tower: loss must be one of {LOSSES}, not '{o['loss']}'")
        if o["sparse_ids"] not in ("auto", "on", "off"):
            raise ConfigError(f"two_tower: sparse_ids must be auto, on or off, "
                              f"not '{o['sparse_ids']}'")
        sample = o["history_sample"]
        if not (sample is None or (isinstance(sample, int) and not isinstance(sample, bool)
                                   and sample >= 0)):
            raise ConfigError(f"two_tower: history_sample must be none (auto) or a whole "
                              f"number >= 0 (0: every history item), not {sample!r}")
        if o["negatives"] not in NEGATIVES:
            raise ConfigError(f"two_tower: negatives must be one of {NEGATIVES}, "
                              f"not '{o['negatives']}'")
        mods = o["modalities"]
        o["modalities"] = [] if mods in ("none", "", []) else _modality_list(mods)
        self._fusers = fusers
        self.device = resolve_device(o["device"])
        self.model: TwoTowerModel | None = None
        self.item_ids: list[int] = []
        self.user_ids: list[int] = []
        self.dims: dict[str, int] = {}
        self.warm = torch.zeros(0, dtype=torch.bool)
        self.info: dict[str, Any] = {}
        self._cache: dict[str, Any] = {}
        self._maps: dict[str, Any] = {}  # derived from the data served now (_per_data)
        self._indexes: dict[int, tuple[list[int], dict[int, int]]] = {}  # fitted id -> index
        self._warm_state: dict[str, Any] | None = None  # see warm_start
        self.info_warm: dict[str, Any] = {}
        self._parallel = (0, 1)  # (rank, world): see set_data_parallel

    def set_data_parallel(self, rank: int, world: int) -> None:
        """Train as worker ``rank`` of ``world`` (torch.distributed initialised): each step
        this worker takes its slice of the batch, DDP averages the gradients; the seed,
        the shuffling, the negatives and the validation decisions are the same in every
        worker, so every worker ends with the same model."""
        if not 0 <= rank < world:
            raise ConfigError(f"two_tower: data-parallel rank {rank} is not in 0..{world - 1}")
        self._parallel = (int(rank), int(world))

    # -- setup ---------------------------------------------------------------------------
    def _fuser_class(self) -> type[Fuser]:
        spec = self.options["fuser"]
        if isinstance(spec, type):
            return spec
        if self._fusers is not None:
            return self._fusers.get(spec)
        from polyrec.plugins.fuse_attention import FUSERS
        if spec not in FUSERS:
            raise ConfigError(f"two_tower: unknown fuser '{spec}' (known: {', '.join(FUSERS)})")
        return FUSERS[spec]

    def _choose_dims(self, data: TrainingData) -> dict[str, int]:
        wanted = self.options["modalities"]
        available = {m: int(v.shape[1]) for m, (v, p) in data.item_features.items() if bool(p.any())}
        if wanted is None:
            return available
        missing = [m for m in wanted if m not in available]
        if missing:
            raise ConfigError(f"two_tower: no item features for modality {', '.join(missing)} "
                              f"(available: {', '.join(available) or 'none'}; run `polyrec encode`)")
        return {m: available[m] for m in wanted}

    def warm_start(self, state: dict[str, Any]) -> bool:
        """Start the next ``fit`` from a stored state of this ranker (the live version,
        for a retrain): the fuser, the projections and the content bias are copied when
        their shapes match, and the ID embeddings and biases of items and users found in
        both by id. Items and users new since are initialised as usual. The ID biases of
        new items still start from their popularity."""
        self._warm_state = state
        return True

    def _apply_warm_start(self) -> None:
        state, model = self._warm_state, self.model
        if state is None or model is None:
            return
        if dict(state.get("dims") or {}) != self.dims:
            self.info_warm = {"used": False, "reason": "other modalities or widths"}
            return
        weights = _weights(state)
        mine = model.state_dict()
        by_id = {"item_id.weight": (_int_list(state["item_ids"]), self.item_ids),
                 "id_bias.weight": (_int_list(state["item_ids"]), self.item_ids),
                 "user_id.weight": (_int_list(state["user_ids"]), self.user_ids)}
        copied, mapped = 0, 0
        with torch.no_grad():
            for key, value in weights.items():
                if key not in mine:
                    continue
                if key in by_id:
                    old_ids, new_ids = by_id[key]
                    old = {i: n for n, i in enumerate(old_ids)}
                    pairs = [(n, old[i]) for n, i in enumerate(new_ids) if i in old]
                    if pairs and value.shape[1:] == mine[key].shape[1:]:
                        dst, src = (torch.tensor(x) for x in zip(*pairs))
                        mine[key][dst] = value[src].to(mine[key].dtype)
                        mapped += len(pairs)
                elif value.shape == mine[key].shape:
                    mine[key].copy_(value)
                    copied += 1
        model.load_state_dict(mine)
        self.info_warm = {"used": True, "tensors": copied, "id_rows": mapped}

    def _build(self, data: TrainingData) -> None:
        o = self.options
        self.dims = self._choose_dims(data)
        if not self.dims and not o["use_item_id"]:
            raise ConfigError("two_tower: no modalities and no item-ID embedding: nothing to learn")
        fuser_options = {"dropout": o["dropout"]}
        if o["fuser"] == "attention" or getattr(o["fuser"], "name", None) == "attention":
            fuser_options["heads"] = o["heads"]
        self.item_ids, self.user_ids = list(data.item_ids), list(data.user_ids)
        self.model = TwoTowerModel(self.dims, data.n_items, data.n_users, int(o["dim"]),
                                   self._fuser_class() if self.dims else None, fuser_options,
                                   bool(o["use_item_id"]), bool(o["use_user_id"]),
                                   sparse_ids=self._sparse_ids(data.n_items)).to(self.device)
        self._fuser_options = fuser_options
        self._apply_warm_start()

    def _sparse_ids(self, n_items: int) -> bool:
        """Sparse ID-table gradients? (the option; 'auto': a large catalogue, and not
        data-parallel on CUDA, whose NCCL all-reduce takes no sparse tensors)"""
        choice = self.options["sparse_ids"]
        sparse = n_items >= SPARSE_ID_ROWS if choice == "auto" else choice == "on"
        return sparse and not (self._parallel[1] > 1 and self.device.type == "cuda")

    def _history_cap(self, n_items: int) -> int:
        """How many history items of a user a training step reads at most (0: all)."""
        choice = self.options["history_sample"]
        if choice is None:
            return HISTORY_SAMPLE if n_items >= SPARSE_ID_ROWS else 0
        return int(choice)

    @staticmethod
    def _sample_history(rows: torch.Tensor, items: torch.Tensor, lengths: torch.Tensor,
                        cap: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """At most ``cap`` of each user's history entries, uniformly at random without
        replacement: ``rows`` (sorted, one run per user, ``lengths`` long) and ``items``
        of the kept entries, in row order."""
        noise = torch.rand(len(rows), generator=gen).to(rows.device)
        order = torch.argsort(rows.double() + noise.double())  # a random order per user
        starts = torch.cumsum(lengths, 0) - lengths
        position = torch.arange(len(rows), device=rows.device) - starts[rows[order]]
        kept = order[position < cap]
        kept = kept[torch.argsort(rows[kept], stable=True)]
        return rows[kept], items[kept]

    # -- data views ----------------------------------------------------------------------
    def _tokens(self, data: TrainingData, rows: torch.Tensor | None = None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each modality's item vectors and the present mask [n, M], over every item or
        only the dense indices ``rows``."""
        n = data.n_items if rows is None else len(rows)
        tokens, present = {}, []
        for m, d in self.dims.items():
            if m in data.item_features:
                vec, pres = data.item_features[m]
                if vec.shape[1] != d:
                    raise ConfigError(f"two_tower: modality '{m}' has width {vec.shape[1]}, "
                                      f"the model was trained on {d}; train again")
                if rows is not None:
                    vec, pres = vec[rows], pres[rows]
            else:
                vec, pres = torch.zeros(n, d), torch.zeros(n, dtype=torch.bool)
            tokens[m] = vec.to(self.device, torch.float32)
            present.append(pres.to(self.device))
        pres = torch.stack(present, 1) if present else torch.zeros(n, 0, dtype=torch.bool,
                                                                    device=self.device)
        return tokens, pres

    def _map(self, ids: list[int], fitted: list[int]) -> torch.Tensor:
        """Fit-time index of each id (-1: not fitted); the index of ``fitted`` is kept."""
        cached = self._indexes.get(id(fitted))
        if cached is None or cached[0] is not fitted:
            cached = (fitted, {v: k for k, v in enumerate(fitted)})
            self._indexes = {**{k: v for k, v in self._indexes.items() if v[0] is self.item_ids
                                or v[0] is self.user_ids}, id(fitted): cached}
        index = cached[1]
        return torch.tensor([index.get(i, -1) for i in ids], dtype=torch.long, device=self.device)

    def _pairs(self, data: TrainingData) -> tuple[torch.Tensor, torch.Tensor]:
        """Unique positive (user, item) pairs of ``data``, sorted by user (on the device)."""
        keep = data.weights > 0
        key = torch.unique(data.users[keep] * data.n_items + data.items[keep])
        return (key // data.n_items).to(self.device), (key % data.n_items).to(self.device)

    @staticmethod
    def _history(users: torch.Tensor, pair_i: torch.Tensor, indptr: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(row in ``users``, item) of every history entry of the given users."""
        starts, ends = indptr[users], indptr[users + 1]
        lengths = ends - starts
        rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), lengths)
        offsets = torch.arange(int(lengths.sum()), device=users.device) - \
            torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        return rows, pair_i[starts[rows] + offsets]

    @classmethod
    def _history_sums(cls, users: torch.Tensor, pair_u: torch.Tensor, pair_i: torch.Tensor,
                      indptr: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
        """Sum of the item vectors of each user's history, for the given users [b, D]."""
        rows, cols = cls._history(users, pair_i, indptr)
        out = torch.zeros(len(users), vecs.shape[1], device=vecs.device, dtype=vecs.dtype)
        return out.index_add(0, rows, vecs[cols])

    def _indptr(self, pair_u: torch.Tensor, n_users: int) -> torch.Tensor:
        counts = torch.bincount(pair_u, minlength=n_users)
        return torch.cat([torch.zeros(1, dtype=torch.long, device=self.device),
                          torch.cumsum(counts, 0)])

    def _data_key(self, data: TrainingData) -> tuple:
        return (id(data), data.n_items, data.n_users, len(data.users))

    def _per_data(self, data: TrainingData) -> dict[str, Any]:
        """What is derived from the data object served now (its catalogue map, its
        pairs); dropped when another data object comes."""
        key = self._data_key(data)
        if self._maps.get("key") != key:
            self._maps = {"key": key}
        return self._maps

    def _user_pairs(self, data: TrainingData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``data``'s unique positive (user, item) pairs sorted by user and the offsets of
        each user's run [n_users + 1] (on the device), kept per data object."""
        kept = self._per_data(data)
        if "pairs" not in kept:
            pair_u, pair_i = self._pairs(data)
            kept["pairs"] = (pair_u, pair_i, self._indptr(pair_u, data.n_users))
        return kept["pairs"]

    def _catalogue(self, data: TrainingData) -> Any:
        """``data``'s catalogue mapped onto the fitted one (TrainingData.catalogue_map),
        kept per data object."""
        kept = self._per_data(data)
        if "map" not in kept:
            kept["map"] = data.catalogue_map(self.item_ids, reference=self.warm)
        return kept["map"]

    def _item_side(self, data: TrainingData, rows: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """The item tower over ``data``'s items (or only the dense indices ``rows``):
        (vectors, attention weights, scorable, bias, catalogue map)."""
        if self.model is None:
            raise ModelNotTrainedError("two_tower is not fitted; call fit() or train first")
        self.model.eval()
        tokens, present = self._tokens(data, rows)
        ids = data.item_ids if rows is None else [data.item_ids[i] for i in rows.tolist()]
        id_index = self._map(ids, self.item_ids)
        id_keep = (id_index >= 0) & self.warm.to(self.device)[id_index.clamp(min=0)]
        # items the model never saw: an ID part from their content neighbours among the
        # ID-embedded (warm) fitted items, on top of their content tower
        cmap = self._catalogue(data)
        unseen, neighbours, weights = cmap.unseen, cmap.neighbours, cmap.weights
        if rows is not None and len(unseen):  # the unseen among the rows, renumbered
            pos = torch.searchsorted(rows, unseen)  # rows: ascending, unique
            mine = (pos < len(rows)) & (rows[pos.clamp(max=max(len(rows) - 1, 0))] == unseen)
            unseen, neighbours, weights = pos[mine], neighbours[mine], weights[mine]
        id_mix = None
        if len(unseen) and self.model.item_id is not None and neighbours.shape[1]:
            id_mix = (unseen.to(self.device), neighbours.to(self.device), weights.to(self.device))
        with torch.no_grad():
            vecs, att, scorable, bias = self.model.items(tokens, present, id_index, id_keep, id_mix)
        return vecs, att, scorable, bias, cmap

    def _prepared(self, data: TrainingData) -> dict[str, Any]:
        """Item vectors, attention weights and user history means for ``data`` (cached)."""
        key = self._data_key(data)
        if self._cache.get("key") == key:
            return self._cache
        vecs, weights, scorable, bias, cmap = self._item_side(data)
        with torch.no_grad():
            pair_u, pair_i, indptr = self._user_pairs(data)
            counts = (indptr[1:] - indptr[:-1])
            all_users = torch.arange(data.n_users, device=self.device)
            hist = self._history_sums(all_users, pair_u, pair_i, indptr, vecs) \
                / counts.clamp(min=1)[:, None]
        has_history = counts > 0
        unseen = torch.zeros(data.n_items, dtype=torch.bool)
        unseen[cmap.unseen] = True
        self._cache = {"key": key, "vectors": vecs, "weights": weights, "scorable": scorable,
                       "bias": bias, "cold_last": (unseen.to(self.device) & ~scorable),
                       "history": hist, "has_history": has_history.to(self.device),
                       "user_index": self._map(data.user_ids, self.user_ids)}
        return self._cache

    def _user_side(self, user_index: torch.Tensor, data: TrainingData
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(history means [b, D], fit-time user indices [b]) of these users. From the
        prepared catalogue when it is there; else the item tower runs over these users'
        history items only, so a server with a persisted item side (Ranker.retrieval_keys)
        answers its first request without the tower over the whole catalogue."""
        users = user_index.to(self.device)
        if self._cache.get("key") == self._data_key(data):
            prep = self._cache
            return prep["history"][users], prep["user_index"][users]
        all_u, all_i, indptr = self._user_pairs(data)
        bounds = indptr.cpu()  # [n_users + 1] offsets: small
        picks = torch.cat([torch.arange(int(bounds[u]), int(bounds[u + 1]))
                           for u in user_index.tolist()]) \
            if len(user_index) else torch.zeros(0, dtype=torch.long)
        picks = picks.to(all_u.device)
        pair_u, pair_i = all_u[picks].cpu(), all_i[picks].cpu()
        rows, item_pos = torch.unique(pair_i, return_inverse=True)
        vecs = self._item_side(data, rows)[0] if len(rows) else \
            torch.zeros(0, self.model.dim, device=self.device)
        slot = {int(u): k for k, u in enumerate(user_index.tolist())}
        user_pos = torch.tensor([slot[int(u)] for u in pair_u.tolist()], dtype=torch.long,
                                device=self.device)
        sums = torch.zeros(len(users), vecs.shape[1], device=self.device, dtype=vecs.dtype)
        sums = sums.index_add(0, user_pos, vecs[item_pos.to(self.device)])
        counts = torch.bincount(user_pos, minlength=len(users)).clamp(min=1)
        fit_users = self._map([data.user_ids[int(u)] for u in user_index.tolist()], self.user_ids)
        return sums / counts[:, None], fit_users

    # -- public scoring ------------------------------------------------------------------
    def score_users(self, user_index: torch.Tensor, data: TrainingData) -> torch.Tensor:
        prep = self._prepared(data)
        users = user_index.to(self.device)
        fit_users = prep["user_index"][users]
        with torch.no_grad():
            uvec = self.model.users(prep["history"][users], fit_users, fit_users >= 0)
            scores = uvec @ prep["vectors"].T / float(self.options["temperature"]) + prep["bias"]
        known = prep["has_history"][users]
        if self.model.user_id is not None:
            known = known | (fit_users >= 0)
        scores[~known] = 0.0  # nothing known of the user: no preference among items
        scores[:, ~prep["scorable"]] = -math.inf
        cold_last = prep["cold_last"]
        if bool(cold_last.any()):  # unseen items without content: defined, ranked last
            finite = torch.isfinite(scores)
            low = torch.where(finite, scores, torch.full_like(scores, math.inf)).min(1).values
            low = torch.where(torch.isfinite(low), low, torch.full_like(low, -math.inf))
            scores[:, cold_last] = low[:, None]
        return scores.float().cpu()

    def user_vectors(self, user_index: torch.Tensor, data: TrainingData) -> torch.Tensor:
        """User-tower vectors [b, D] over ``data``'s history (CPU)."""
        if self.model is None:
            raise ModelNotTrainedError("two_tower is not fitted; call fit() or train first")
        history, fit_users = self._user_side(user_index, data)
        with torch.no_grad():
            return self.model.users(history, fit_users, fit_users >= 0).cpu()

    def retrieval_keys(self, data: TrainingData) -> RetrievalKeys:
        """Scores are ``user @ item / temperature + bias``: keys [item / temperature, bias]
        against queries [user, 1]; valid = the items the model scores."""
        prep = self._prepared(data)
        keys = torch.cat([prep["vectors"] / float(self.options["temperature"]),
                          prep["bias"].reshape(-1, 1)], dim=1)
        return RetrievalKeys(keys=keys.float().cpu(), valid=prep["scorable"].cpu())

    def retrieval_queries(self, user_index: torch.Tensor, data: TrainingData) -> torch.Tensor:
        uvec = self.user_vectors(user_index, data)
        return torch.cat([uvec, torch.ones(len(uvec), 1)], dim=1).float()

    def item_vectors(self, data: TrainingData) -> torch.Tensor:
        """Item-tower vectors [n_items, D] (unit length, zero where unscorable; CPU)."""
        prep = self._prepared(data)
        return (prep["vectors"] * prep["scorable"][:, None]).cpu()

    def modality_weights(self, data: TrainingData) -> tuple[list[str], torch.Tensor] | None:
        """(modality names, fuser attention weights [n_items, M]) for explanations (CPU);
        None when the model uses no item content."""
        if not self.dims:
            return None
        prep = self._prepared(data)
        return list(self.dims), prep["weights"].cpu()

    # -- training ------------------------------------------------------------------------
    def fit(self, data: TrainingData) -> None:
        o = self.options
        if len(data.users) == 0:
            raise ConfigError("two_tower: no interactions to train on")
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), cpu_threads(self.device, o["threads"]):
            torch.manual_seed(int(o["seed"]))
            best_epochs, history = int(o["epochs"]), []
            if o["validation"]:
                from polyrec import validation_split
                val = validation_split(data, seed=int(o["seed"]) + 1)
                if val.n_test:
                    self._build(val.train)
                    best_epochs, history = self._train(val.train, val)
                    if not o["refit"]:
                        self._finish(val.train, best_epochs, history)
                        return
            self._fit_epochs(data, best_epochs, history)

    def refit(self, data: TrainingData) -> None:
        """Train afresh on ``data`` for the epoch count the last ``fit`` chose (no
        validation run); a plain ``fit`` when the ranker was never fitted."""
        if not self.info:
            self.fit(data)
            return
        o = self.options
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), cpu_threads(self.device, o["threads"]):
            self._fit_epochs(data, int(self.info["epochs"]), list(self.info.get("validation") or []))

    def _fit_epochs(self, data: TrainingData, epochs: int, history: list[float]) -> None:
        """A fresh model trained on all of ``data`` for ``epochs`` epochs."""
        torch.manual_seed(int(self.options["seed"]))
        self._build(data)
        self._train(data, None, epochs=epochs)
        self._finish(data, epochs, history)

    def _finish(self, data: TrainingData, epochs: int, history: list[float]) -> None:
        self.info = {"epochs": epochs, "device": str(self.device), "modalities": list(self.dims),
                     "warm_start": dict(self.info_warm) if self._warm_state is not None else None,
                     "validation": [round(h, 5) for h in history],
                     "throughput": self._throughput}
        self._cache, self._maps = {}, {}

    def _train(self, data: TrainingData, val: Any, epochs: int | None = None
               ) -> tuple[int, list[float]]:
        """Train ``self.model`` on ``data``; with ``val`` stop early on its metric and
        restore the best epoch. Returns (best epoch count, validation history)."""
        import time

        from polyrec import evaluate_ranker
        o = self.options
        model = self.model
        assert model is not None
        n_items = data.n_items
        self.warm = data.item_counts() > 0
        pair_u, pair_i = self._pairs(data)
        key = pair_u * n_items + pair_i  # sorted: the user's positives, for masking
        indptr = self._indptr(pair_u, data.n_users)
        counts = (indptr[1:] - indptr[:-1]).float()
        tokens, present = self._tokens(data)
        all_items = torch.arange(n_items, device=self.device)
        warm = self.warm.to(self.device)
        item_counts = torch.bincount(pair_i, minlength=n_items).float()
        self._item_share = (item_counts / item_counts.sum()).clamp(min=1e-12)
        if model.id_bias is not None:  # start from popularity: log(1 + positives)
            with torch.no_grad():  # (a warm start keeps the biases it brought)
                fresh = torch.ones(n_items, dtype=torch.bool, device=self.device)
                if self._warm_state is not None and self.info_warm.get("used"):
                    old = set(_int_list(self._warm_state["item_ids"]))
                    fresh = torch.tensor([i not in old for i in self.item_ids], device=self.device)
                model.id_bias.weight[fresh] = torch.log1p(item_counts)[fresh][:, None]
        opt = _Optimizer(model, lr=float(o["lr"]), weight_decay=float(o["weight_decay"]))
        epochs = int(epochs or o["epochs"])
        gen = torch.Generator(device="cpu").manual_seed(int(o["seed"]))
        best, best_epoch, best_state, patience, history = -math.inf, 0, None, 0, []
        bs, temp = int(o["batch_size"]), float(o["temperature"])
        cap = self._history_cap(n_items)
        # the history draws have a stream of their own (per worker), so the batches,
        # negatives and ID dropout stay those of the seed whatever is drawn
        hist_gen = torch.Generator(device="cpu").manual_seed(
            int(o["seed"]) * 1_000_003 + 7_919 * (self._parallel[0] + 1))
        seen, train_seconds = 0, 0.0
        bar = progress_bar(range(epochs), desc="two_tower epoch", unit="epochs",
                           enabled=bool(o["progress"]), interval=0)
        def batch_loss(u: torch.Tensor, i: torch.Tensor, keep_id: torch.Tensor,
                       cand: torch.Tensor) -> torch.Tensor:
            # each user's history once, however many of the batch's rows are theirs (a
            # heavy user can have thousands of positives and dozens of rows in a batch)
            batch_users, user_row = torch.unique(u, return_inverse=True)
            hist_row, hist_item = self._history(batch_users, pair_i, indptr)
            theirs = hist_item  # every item these users have (their targets included)
            lengths = indptr[batch_users + 1] - indptr[batch_users]
            sampled = cap > 0 and bool((lengths > cap).any())
            if sampled:  # heavy users: the mean of a random part of their history
                hist_row, hist_item = self._sample_history(hist_row, hist_item, lengths,
                                                           cap, hist_gen)
                kept_n = lengths.clamp(max=cap)
                # was this row's target drawn? then it is left out of that user's mean
                drawn = torch.sort(hist_row * n_items + hist_item).values
                target = user_row * n_items + i
                at = torch.searchsorted(drawn, target).clamp(max=len(drawn) - 1)
                in_draw = drawn[at] == target
            needed = torch.unique(torch.cat([hist_item, i, cand]))
            if len(needed) * STEP_ITEMS_FRACTION < n_items:  # the tower over these only
                vecs, _, _, bias = model.items({m: t[needed] for m, t in tokens.items()},
                                               present[needed], needed, keep_id[needed])
                hist_item, i_row, cand_row = (torch.searchsorted(needed, x)
                                              for x in (hist_item, i, cand))
            else:  # most of the catalogue is needed anyway: the tower over all of it
                vecs, _, _, bias = model.items(tokens, present, all_items, keep_id)
                i_row, cand_row = i, cand
            sums = torch.zeros(len(batch_users), vecs.shape[1], device=vecs.device,
                               dtype=vecs.dtype)
            sums = sums.index_add(0, hist_row, vecs[hist_item])
            if sampled:
                n_hist = (kept_n[user_row] - in_draw.long()).clamp(min=1)[:, None].float()
                hmean = (sums[user_row] - vecs[i_row] * in_draw[:, None]) / n_hist
            else:
                n_hist = (counts[u] - 1).clamp(min=1)[:, None]
                hmean = (sums[user_row] - vecs[i_row]) / n_hist  # the target left out
            uvec = model.users(hmean, u, torch.ones_like(u, dtype=torch.bool))
            return self._loss(uvec, (vecs[i_row], bias[i_row]), (vecs[cand_row], bias[cand_row]),
                              u, i, cand, key, n_items, temp, theirs)

        rank, world = self._parallel
        step: nn.Module = _Step(model, batch_loss)
        if world > 1:  # gradients averaged across the workers
            from torch.nn.parallel import DistributedDataParallel
            step = DistributedDataParallel(step)
        for epoch in bar:
            step.train()
            started = time.perf_counter()
            order = torch.randperm(len(pair_u), generator=gen).to(self.device)
            n_steps = -(-len(order) // bs)
            show_steps = bool(o["progress"]) and n_steps >= STEP_PROGRESS_STEPS
            steps = progress_bar(total=n_steps, desc=f"two_tower epoch {epoch + 1}/{epochs}",
                                 unit="steps", leave=False, enabled=show_steps)
            for start in range(0, len(order), bs):
                idx = order[start:start + bs]
                keep_id = warm & (torch.rand(n_items, generator=gen).to(self.device)
                                  >= float(o["id_dropout"]))
                mine = torch.tensor_split(idx, world)[rank] if world > 1 else idx
                rows = mine if len(mine) else idx[:1]
                cand = self._candidates(pair_i[rows], n_items, gen)
                loss = step(pair_u[rows], pair_i[rows], keep_id, cand)
                if not len(mine):  # a batch smaller than the workers: a zero gradient
                    loss = loss * 0.0
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += len(idx)
                if show_steps and (start // bs) % 20 == 0:  # .item() waits for the device
                    steps.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                steps.update(1)
            steps.close()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            train_seconds += time.perf_counter() - started  # steps only, not validation
            self._cache, self._maps = {}, {}
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if val is not None:
                score = evaluate_ranker(self, val, ks=(int(o["metric"].split("@")[1]),))[o["metric"]]
                history.append(score)
                bar.set_postfix({"loss": f"{loss.item():.4f}", f"validation {o['metric']}": f"{score:.4f}"})
                if score > best:
                    best, best_epoch, patience = score, epoch + 1, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    patience += 1
                    if patience >= int(o["patience"]):
                        break
        self._throughput = seen / max(train_seconds, 1e-9)
        if best_state is not None:
            model.load_state_dict(best_state)
            return best_epoch, history
        return epochs, history

    def _candidates(self, targets: torch.Tensor, n_items: int, gen: torch.Generator
                    ) -> torch.Tensor:
        """The step's negative candidates: its targets (in-batch) and/or ``n_random``
        items drawn uniformly."""
        o = self.options
        cands = []
        if o["negatives"] in ("in_batch", "both"):
            cands.append(targets)
        if o["negatives"] in ("random", "both"):
            n_random = int(o["n_random"])
            cands.append(torch.randint(0, n_items, (n_random,), generator=gen).to(self.device))
        return torch.cat(cands)

    def _loss(self, uvec: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor],
              negative: tuple[torch.Tensor, torch.Tensor], u: torch.Tensor, i: torch.Tensor,
              cand: torch.Tensor, key: torch.Tensor, n_items: int, temp: float,
              theirs: torch.Tensor | None = None) -> torch.Tensor:
        """Sampled softmax or BPR of the targets ``i`` (vectors, biases: ``target``) over
        the candidates ``cand`` (``negative``, from ``_candidates``); a candidate that is
        one of the user's positives is masked out (``theirs``: every item the users have,
        when known, narrows that lookup). With ``logq`` the softmax logits are
        corrected by the log of each candidate's expected number of draws (in-batch
        candidates are drawn by popularity, random ones uniformly)."""
        o = self.options
        log_q = []
        if o["negatives"] in ("in_batch", "both"):
            log_q.append(torch.log(self._item_share[i] * len(i)))
        if o["negatives"] in ("random", "both"):
            n_random = int(o["n_random"])
            log_q.append(torch.full((n_random,), math.log(n_random / n_items), device=self.device))
        (tvec, tbias), (cvec, cbias) = target, negative
        pos_logit = (uvec * tvec).sum(-1) / temp + tbias
        logits = uvec @ cvec.T / temp + cbias
        # mask every candidate that is a positive of the row's user (the target included)
        hit = self._is_positive(u, cand, key, n_items, theirs)
        if o["loss"] == "softmax" and o["logq"]:
            logits = logits - torch.cat(log_q)[None, :]
        logits = logits.masked_fill(hit, -math.inf)
        if o["loss"] == "softmax":
            full = torch.cat([pos_logit[:, None], logits], dim=1)
            return (torch.logsumexp(full, dim=1) - pos_logit).mean()
        valid = ~hit
        diff = F.logsigmoid(pos_logit[:, None] - logits.masked_fill(hit, 0.0)) * valid
        return -(diff.sum(1) / valid.sum(1).clamp(min=1)).mean()

    def _is_positive(self, u: torch.Tensor, cand: torch.Tensor, key: torch.Tensor,
                     n_items: int, theirs: torch.Tensor | None = None) -> torch.Tensor:
        """bool [b, c]: is cand[c] a positive of user u[b]? (dense lookup when it fits;
        else a sorted lookup of the candidates among ``theirs``, every item these users
        have, when given: at 1M items few random negatives are)"""
        dense = self._cache.get("positives")
        if dense is None and (int(u.max()) + 1) * n_items <= 50_000_000:
            n_users = int(key.max()) // n_items + 1
            dense = torch.zeros(n_users * n_items, dtype=torch.bool, device=self.device)
            dense[key] = True
            dense = dense.view(n_users, n_items)
            self._cache["positives"] = dense
        if dense is not None and int(u.max()) < dense.shape[0]:
            return dense[u][:, cand]
        if theirs is not None:  # a mark per catalogue item: cheaper than isin's sort
            marked = torch.zeros(n_items, dtype=torch.bool, device=cand.device)
            marked[theirs] = True
            cols = torch.nonzero(marked[cand]).flatten()
        else:
            cols = torch.arange(len(cand), device=cand.device)
        query = u[:, None] * n_items + cand[cols][None, :]
        found = torch.searchsorted(key, query).clamp(max=len(key) - 1)
        hit = torch.zeros(len(u), len(cand), dtype=torch.bool, device=cand.device)
        hit[:, cols] = key[found] == query
        return hit

    # -- artifacts -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        if self.model is None:
            raise ModelNotTrainedError("two_tower is not fitted; nothing to save")
        fuser = self.options["fuser"]
        opts = {k: v for k, v in self.options.items() if k != "fuser"}
        return {"options": {**opts, "fuser": getattr(fuser, "name", fuser)},
                # ids and the warm mask as tensors: a list of a million ints takes seconds
                # in torch's weights-only unpickler, a tensor milliseconds
                "dims": self.dims, "item_ids": torch.tensor(self.item_ids, dtype=torch.long),
                "user_ids": torch.tensor(self.user_ids, dtype=torch.long),
                "warm": self.warm.bool().cpu(), "fuser_options": self._fuser_options,
                # the weights as tensors, not nested bytes: a stored artifact mapped from
                # its file (polyrec.store.artifact_cache) then maps them too
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "info": self.info}

    def load_state(self, state: dict[str, Any]) -> None:
        o = self.options
        o.update({k: v for k, v in state["options"].items() if k not in ("device", "progress")})
        self.dims = dict(state["dims"])
        self.item_ids, self.user_ids = _int_list(state["item_ids"]), _int_list(state["user_ids"])
        self.warm = torch.as_tensor(state["warm"], dtype=torch.bool)  # a list in older states
        self._fuser_options = dict(state["fuser_options"])
        weights = _weights(state)
        model = TwoTowerModel(self.dims, len(self.item_ids), len(self.user_ids), int(o["dim"]),
                              self._fuser_class() if self.dims else None, self._fuser_options,
                              bool(o["use_item_id"]), bool(o["use_user_id"]), initialise=False)
        model.load_state_dict(weights, assign=True)  # the loaded (maybe mapped) tensors
        self.model = model.to(self.device)
        self.model.eval()
        self.info = dict(state.get("info") or {})
        self._cache, self._maps = {}, {}


class _Optimizer:
    """AdamW over the model's dense parameters and, when the ID tables have sparse
    gradients, torch's lazy SparseAdam over those (each step updates only the rows the
    step used, their moments too; decoupled weight decay is applied to those rows the way
    AdamW applies it). At 1M items a dense step rewrote every row of the tables and
    their moments."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float) -> None:
        sparse_tables = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]
        sparse_ids = {id(m.weight) for m in sparse_tables}
        self.sparse = [m.weight for m in sparse_tables]
        dense = [p for p in model.parameters() if id(p) not in sparse_ids]
        self.lr, self.weight_decay = lr, weight_decay
        self.optimizers: list[torch.optim.Optimizer] = []
        if dense:
            self.optimizers.append(torch.optim.AdamW(dense, lr=lr, weight_decay=weight_decay))
        if self.sparse:
            self.optimizers.append(torch.optim.SparseAdam(self.sparse, lr=lr))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        if self.weight_decay:
            with torch.no_grad():
                for weight in self.sparse:
                    if weight.grad is not None:
                        rows = weight.grad.coalesce().indices()[0]
                        weight[rows] *= 1.0 - self.lr * self.weight_decay
        for opt in self.optimizers:
            opt.step()


def _weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of a state (bytes in states saved before they were tensors)."""
    weights = state["model"]
    if isinstance(weights, (bytes, bytearray)):
        weights = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    return weights


def _int_list(value: Any) -> list[int]:
    """A stored id list as Python ints (a tensor now, a list in older states)."""
    return value.tolist() if isinstance(value, torch.Tensor) else [int(v) for v in value]


@hookimpl
def register_rankers(register: Callable[[type], None]) -> None:
    register(TwoTowerRanker)
