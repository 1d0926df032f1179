"""Intent model "multitask": soft facets, demand and user match on a text encoder's vectors.

A small network on top of the (frozen) sentence vectors of a text encoder (the default
``bert``, all-MiniLM-L6-v2), trained self-supervised from the catalogue, no hand labels:

- **intent**: one softmax head per categorical attribute of the catalogue (discovered:
  string or list-of-string fields with few distinct values shared by many items, e.g.
  H&M ``product_type_name``, ``colour_group_name``, ``index_group_name``; MovieLens
  ``class`` genres). Inputs are the item's own vector and synthetic shopper queries made
  from its attributes (templates, WordNet synonyms, dropped words, filler words) and its title;
  the target is the item's value (a uniform distribution over a list-valued field's
  values). A query that does not name a field learns that field's spread, so the soft
  facets stay uncertain where the query says nothing.
- **demand**: a regression head on the item vector predicting the item's z-scored
  log(1 + distinct users) from the interactions.
- **recommendation**: a user tower (mean of the trunk outputs of the user's other items)
  and an item tower, scored by dot product, trained with an in-batch softmax on
  (history, held-out item) pairs.

``L = alpha * L_intent + beta * L_demand + gamma * L_rec`` (options ``alpha``, ``beta``,
``gamma``). Items of a ``validation`` share are held out of training; the accuracy of
each head on their synthetic queries is reported in ``info``.
"""
from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from typing import Any, Sequence

import torch
from torch import nn

from polyrec import (ConfigError, IntentData, IntentModel, IntentPrediction, ItemView,
                     hookimpl, progress_bar)
from polyrec.plugins.rank_two_tower import cpu_threads

#: option -> (default, type)
OPTIONS: dict[str, tuple[Any, type]] = {
    "alpha": (1.0, float), "beta": (0.2, float), "gamma": (0.2, float),
    "epochs": (6, int), "queries_per_item": (8, int), "hidden": (256, int),
    "rec_dim": (128, int), "lr": (3e-3, float), "batch_size": (256, int),
    "dropout": (0.1, float), "weight_decay": (1e-4, float), "temperature": (0.1, float),
    "max_values": (300, int), "max_items": (0, int), "validation": (0.1, float),
    "seed": (0, int), "threads": (1, int),
}

#: Values that name nothing (never a target).
STOP_VALUES = frozenset({"unknown", "undefined", "other", "others", "none", "n/a", "na",
                         "nan", "null", "misc", "-", "various", ""})

#: WordNet senses whose words may stand for a catalogue value in synthetic queries:
#: garments and other made things, colours and other attributes, people (audiences),
#: genres of writing and film.
THESAURUS_LEXNAMES = frozenset({"noun.artifact", "noun.attribute", "noun.person",
                                "noun.communication", "adj.all"})


def thesaurus_synonyms(fields: dict[str, tuple[list[str], bool]], wordnet: Any = None,
                       max_senses: int = 2, max_words: int = 6) -> dict[str, tuple[str, ...]]:
    """Other ways to say each catalogue value, from a general English thesaurus (WordNet,
    polyrec.retrieve.thesaurus; {} when none is installed), never from a hand-written
    list: the synonyms of the value (or, for one of its words, of that word) in its first
    ``max_senses`` senses of the kinds in THESAURUS_LEXNAMES, and, for made things, the
    kinds of it (hyponyms: "pullover" for sweater), at most ``max_words`` each; words that are
    themselves catalogue values or words of values are left out ("cardigan" is a kind
    of sweater, and a value of its own). Keys are lower-case values and value words."""
    if wordnet is None:
        from polyrec import WordNet
        wordnet = WordNet.find()
    if wordnet is None:
        return {}
    values = {v.lower() for vals, _ in fields.values() for v in vals}
    taken = values | {w for v in values for w in re.split(r"[\s/&,]+", v) if w}
    keys = set(values) | {w for v in values for w in v.split() if w.isalpha() and len(w) > 2}
    out: dict[str, tuple[str, ...]] = {}
    for key in sorted(keys):
        senses = [s for s in wordnet.senses(key, max_senses=8)
                  if s.lexname in THESAURUS_LEXNAMES][:max_senses]
        words: list[str] = []
        for sense in senses:
            kinds = sense.narrower if sense.lexname == "noun.artifact" else ()
            for w in sense.synonyms + kinds:
                if (w not in taken and w not in words and w != key
                        and re.fullmatch(r"[a-z][a-z' -]*", w)):
                    words.append(w)
        if words:
            out[key] = tuple(words[:max_words])
    return out


PREFIXES = ("", "", "", "a", "looking for", "i want", "i need", "cheap", "nice", "new",
            "best", "something", "show me")
#: Field-name words of audience-like fields, rendered "for <value>" now and then.
AUDIENCE_WORDS = ("index", "section", "gender", "audience", "group")
#: Field-name words of noun-like fields (the head noun of a query: "black DRESS").
NOUN_WORDS = ("type", "genre", "class", "category", "kind")


def _options(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"intent model 'multitask' has no option {', '.join(map(repr, unknown))} "
                          f"(options: {', '.join(sorted(OPTIONS))})")
    for key, (default, kind) in OPTIONS.items():
        value = options.get(key, default)
        try:
            value = kind(float(value)) if kind is int and isinstance(value, str) else kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"intent model 'multitask': option '{key}' expects {kind.__name__}, "
                              f"not {value!r}") from None
        if kind in (int, float) and value < 0:
            raise ConfigError(f"intent model 'multitask': option '{key}' must be >= 0, not {value}")
        out[key] = value
    if out["epochs"] < 1 or out["batch_size"] < 2 or out["hidden"] < 1 or out["rec_dim"] < 1:
        raise ConfigError("intent model 'multitask': epochs >= 1, batch_size >= 2, hidden and "
                          "rec_dim >= 1")
    if not 0 <= out["validation"] < 1:
        raise ConfigError("intent model 'multitask': validation is a share in [0, 1)")
    return out


def _values(raw: Any) -> list[str] | None:
    """The string values of one attribute (None: not a categorical kind of value)."""
    if isinstance(raw, str):
        vals = [raw]
    elif isinstance(raw, (list, tuple)) and raw and all(isinstance(v, str) for v in raw):
        vals = list(raw)
    else:
        return None
    return [v.strip() for v in vals if v.strip().lower() not in STOP_VALUES]


def categorical_fields(items: Sequence[ItemView], max_values: int = 300,
                       max_ratio: float = 0.5) -> dict[str, tuple[list[str], bool]]:
    """field -> (its values, most frequent first; list-valued?) for the attributes that
    are categorical: string (or list of strings) values on at least half of the items, at
    least 2 and at most ``max_values`` distinct usable values, no more distinct values than
    ``max_ratio`` of the items carrying the field, and not numbers or one-letter codes."""
    counts: dict[str, Counter] = {}
    carried: Counter = Counter()
    multi: set[str] = set()
    for item in items:
        for name, raw in (item.attributes or {}).items():
            vals = _values(raw)
            if vals is None:
                continue
            carried[name] += 1
            if not isinstance(raw, str):
                multi.add(name)
            counts.setdefault(name, Counter()).update(vals)
    out: dict[str, tuple[list[str], bool]] = {}
    for name, counter in counts.items():
        usable = [v for v, _ in counter.most_common()
                  if len(v) >= 2 and not re.fullmatch(r"[\d.,\-/ ]+", v)]
        if (carried[name] < 0.5 * len(items) or not 2 <= len(usable) <= max_values
                or len(counter) > max_ratio * carried[name]):
            continue
        if sum(counter[v] for v in usable) < 0.5 * sum(counter.values()):
            continue  # mostly codes or numbers
        out[name] = (usable, name in multi)
    return out


def _say(value: str, rng: random.Random, synonyms: dict[str, tuple[str, ...]],
         drop: float = 0.15) -> str:
    """A shopper's way of saying a catalogue value: lower case, now and then a synonym
    (``synonyms``: thesaurus_synonyms), a word dropped, a slash alternative picked."""
    low = value.lower()
    syn = synonyms.get(low)
    if syn and rng.random() < 0.5:
        return rng.choice(syn)
    if "/" in low and rng.random() < 0.6:
        low = rng.choice([p for p in low.split("/") if p.strip()] or [low])
    words = low.split()
    words = [rng.choice(synonyms[w]) if w in synonyms and rng.random() < 0.3 else w for w in words]
    if len(words) > 1 and rng.random() < drop:
        words.pop(rng.randrange(len(words)))
    return " ".join(words)


def synthetic_queries(item: ItemView, fields: dict[str, tuple[list[str], bool]], n: int,
                      rng: random.Random,
                      synonyms: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """``n`` shopper-style queries for ``item`` from its categorical attributes (1-3 of
    them, noun-like fields last, audiences now and then as "for ..."), with synonyms
    (``synonyms``: thesaurus_synonyms(fields), computed once by the caller; none when
    None), dropped words and filler words; one in four from its title with a word
    dropped."""
    synonyms = synonyms or {}
    attrs = item.attributes or {}
    have = [(f, v) for f in fields for v in (_values(attrs.get(f)) or [])
            if v in set(fields[f][0])]
    out: list[str] = []
    title = (item.title or "").strip()
    for _ in range(n):
        if title and (not have or rng.random() < 0.25):
            words = title.lower().split()
            if len(words) > 2 and rng.random() < 0.5:
                words.pop(rng.randrange(len(words)))
            out.append(" ".join(words))
            continue
        if not have:
            break
        k = min(len(have), rng.choices((1, 2, 3), weights=(3, 4, 3))[0])
        picked = rng.sample(have, k)
        nouns = [p for p in picked if any(w in p[0].lower() for w in NOUN_WORDS)]
        rest = [p for p in picked if p not in nouns]
        rng.shuffle(rest)
        said, seen = [], set()
        audience = []
        for f, v in rest + nouns:
            phrase = _say(v, rng, synonyms)
            if phrase in seen:
                continue
            seen.add(phrase)
            if any(w in f.lower() for w in AUDIENCE_WORDS) and rng.random() < 0.4:
                audience.append(f"for {phrase}")
            else:
                said.append(phrase)
        query = " ".join([rng.choice(PREFIXES), *said, *audience]).strip()
        out.append(re.sub(r"\s+", " ", query))
    return out


class _Net(nn.Module):
    """Shared trunk, one linear head per field, a demand head and the two rec towers."""

    def __init__(self, dim: int, hidden: int, sizes: list[int], rec_dim: int,
                 dropout: float) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                   nn.LayerNorm(hidden))
        self.heads = nn.ModuleList(nn.Linear(hidden, s) for s in sizes)
        self.demand = nn.Linear(hidden, 1)
        self.item_tower = nn.Linear(hidden, rec_dim)
        self.user_tower = nn.Linear(hidden, rec_dim)

    def logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


class MultiTaskIntent(IntentModel):
    """Soft facets (one head per categorical attribute), demand and user match on the
    sentence vectors of a text encoder; see the module docstring for the options."""

    name = "multitask"

    def __init__(self, **options: Any) -> None:
        super().__init__(**_options(options))
        self.field_values: dict[str, list[str]] = {}
        self.multi: list[str] = []
        self.net: _Net | None = None
        self.demand_mean = 0.0
        self.demand_std = 1.0

    # -- training ------------------------------------------------------------------------
    def fit(self, data: IntentData) -> None:
        o = self.options
        started = time.perf_counter()
        seed = o["seed"] or data.seed  # 0: the command's --seed
        rng = random.Random(seed)
        torch.manual_seed(seed)
        n_all = len(data.items)
        rows = list(range(n_all))
        if o["max_items"] and n_all > o["max_items"]:
            rows = sorted(rng.sample(rows, o["max_items"]))
        items = [data.items[r] for r in rows]
        fields = categorical_fields(items, o["max_values"])
        if not fields:
            raise ConfigError("intent model 'multitask': the catalogue has no categorical "
                              "attribute to learn (string fields with few shared values)")
        self.field_values = {f: vals for f, (vals, _) in fields.items()}
        self.multi = [f for f, (_, m) in fields.items() if m]
        names = list(self.field_values)
        index = {f: {v: k for k, v in enumerate(vals)} for f, vals in self.field_values.items()}
        # soft targets per item and field: one-hot, or uniform over a list's values
        targets = [torch.zeros(len(items), len(self.field_values[f])) for f in names]
        for r, item in enumerate(items):
            for t, f in zip(targets, names):
                vals = [index[f][v] for v in (_values((item.attributes or {}).get(f)) or [])
                        if v in index[f]]
                if vals:
                    t[r, vals] = 1.0 / len(vals)
        present = [t.sum(1) > 0 for t in targets]
        n_val = int(len(items) * o["validation"])
        perm = list(range(len(items)))
        rng.shuffle(perm)
        val_rows, train_rows = sorted(perm[:n_val]), sorted(perm[n_val:])
        # texts: synthetic queries per item (embedded once), plus the item vectors
        texts, owner = [], []
        synonyms = thesaurus_synonyms(fields)
        for r, item in enumerate(items):
            for q in synthetic_queries(item, fields, o["queries_per_item"], rng, synonyms):
                texts.append(q)
                owner.append(r)
        t0 = time.perf_counter()
        unique = list(dict.fromkeys(texts))  # the same query from many items: embed once
        where_text = {t: k for k, t in enumerate(unique)}
        qvec = (data.embed(unique)[[where_text[t] for t in texts]] if texts
                else torch.empty(0, data.vectors.shape[1]))
        embed_s = time.perf_counter() - t0
        ivec = data.vectors[rows].float()
        owner_t = torch.tensor(owner, dtype=torch.long)
        is_val = torch.zeros(len(items), dtype=torch.bool)
        is_val[val_rows] = True
        q_train = ~is_val[owner_t] if len(owner) else torch.zeros(0, dtype=torch.bool)
        x_train = torch.cat([ivec[train_rows], qvec[q_train]])
        y_train = torch.cat([torch.tensor(train_rows, dtype=torch.long), owner_t[q_train]])
        # demand: z-scored log(1 + users)
        demand = torch.log1p(data.demand[rows].float())
        self.demand_mean = float(demand.mean()) if len(demand) else 0.0
        self.demand_std = float(demand.std()) if len(demand) > 1 and float(demand.std()) > 0 else 1.0
        dz = (demand - self.demand_mean) / self.demand_std
        has_demand = bool(data.demand[rows].sum() > 0) and o["beta"] > 0
        # rec: (history sum, count, target) over users with two or more items
        where = {row: k for k, row in enumerate(rows)}
        hist = [[where[r] for r in h if r in where] for h in data.histories]
        hist = [h for h in hist if len(set(h)) >= 2]
        in_train = set(train_rows)
        pairs = [(u, t) for u, h in enumerate(hist) for t in h if t in in_train]
        has_rec = bool(pairs) and o["gamma"] > 0
        sums = torch.stack([ivec[h].sum(0) for h in hist]) if hist else torch.empty(0)
        counts = torch.tensor([len(h) for h in hist], dtype=torch.float32) if hist else torch.empty(0)

        device = data.device
        net = _Net(ivec.shape[1], o["hidden"], [len(self.field_values[f]) for f in names],
                   o["rec_dim"], o["dropout"]).to(device)
        self.net = net
        opt = torch.optim.AdamW(net.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])
        targets_d = [t.to(device) for t in targets]
        present_d = [p.to(device) for p in present]
        ivec_d, dz_d = ivec.to(device), dz.to(device)
        train_t = torch.tensor(train_rows, dtype=torch.long)
        bs = o["batch_size"]
        steps = max(1, math.ceil(len(x_train) / bs))
        history: list[dict[str, float]] = []
        bar = progress_bar(range(o["epochs"]), desc="intent epoch", unit="epochs",
                           enabled=data.progress, interval=0)
        with cpu_threads(device, o["threads"]):  # small ops: one thread beats spinning ones
            self._train(bar, net, opt, o, x_train, y_train, names, targets_d, present_d,
                        has_demand, has_rec, train_t, ivec, ivec_d, dz_d, pairs, sums, counts,
                        steps, history)
        net.eval()
        self._finish(o, items, texts, unique, pairs, has_demand, has_rec, history, embed_s,
                     started, val_rows, qvec, q_train, owner_t, ivec, names)

    def _train(self, bar: Any, net: "_Net", opt: Any, o: dict[str, Any], x_train: torch.Tensor,
               y_train: torch.Tensor, names: list[str], targets_d: list[torch.Tensor],
               present_d: list[torch.Tensor], has_demand: bool, has_rec: bool,
               train_t: torch.Tensor, ivec: torch.Tensor, ivec_d: torch.Tensor,
               dz_d: torch.Tensor, pairs: list[tuple[int, int]], sums: torch.Tensor,
               counts: torch.Tensor, steps: int, history: list[dict[str, float]]) -> None:
        """The epochs of ``fit``: L = alpha * intent + beta * demand + gamma * rec."""
        device, bs = ivec_d.device, o["batch_size"]
        for epoch in bar:
            net.train()
            order = torch.randperm(len(x_train))
            sums_l = {"loss": 0.0, "intent": 0.0, "demand": 0.0, "rec": 0.0}
            for s in range(steps):
                idx = order[s * bs:(s + 1) * bs]
                x, owners = x_train[idx].to(device), y_train[idx].to(device)
                logits = net.logits(x)
                l_intent = torch.zeros((), device=device)
                for lg, t, p in zip(logits, targets_d, present_d):
                    m = p[owners]
                    if m.any():
                        l_intent = l_intent + -(t[owners][m] * torch.log_softmax(lg[m], 1)).sum(1).mean()
                l_intent = l_intent / len(names)
                loss = o["alpha"] * l_intent
                l_dem = torch.zeros((), device=device)
                if has_demand:
                    pick = train_t[torch.randint(len(train_t), (bs,))].to(device)
                    pred = net.demand(net.trunk(ivec_d[pick])).squeeze(1)
                    l_dem = nn.functional.mse_loss(pred, dz_d[pick])
                    loss = loss + o["beta"] * l_dem
                l_rec = torch.zeros((), device=device)
                if has_rec:
                    sel = [pairs[k] for k in torch.randint(len(pairs), (min(bs, len(pairs)),)).tolist()]
                    users = torch.tensor([u for u, _ in sel])
                    tgt = torch.tensor([t for _, t in sel])
                    hvec = (sums[users] - ivec[tgt]) / (counts[users] - 1).clamp(min=1).unsqueeze(1)
                    u = nn.functional.normalize(net.user_tower(net.trunk(hvec.to(device))), dim=1)
                    v = nn.functional.normalize(net.item_tower(net.trunk(ivec_d[tgt.to(device)])), dim=1)
                    scores = u @ v.T / o["temperature"]
                    same = tgt.unsqueeze(0).to(device) == tgt.unsqueeze(1).to(device)
                    scores = scores.masked_fill(same & ~torch.eye(len(sel), dtype=torch.bool,
                                                                  device=device), -1e9)
                    l_rec = nn.functional.cross_entropy(scores, torch.arange(len(sel), device=device))
                    loss = loss + o["gamma"] * l_rec
                opt.zero_grad()
                loss.backward()
                opt.step()
                for k, v_ in (("loss", loss), ("intent", l_intent), ("demand", l_dem), ("rec", l_rec)):
                    sums_l[k] += float(v_.detach()) / steps
            history.append({k: round(v, 4) for k, v in sums_l.items()})
            bar.set_postfix({k: f"{v:.4f}" for k, v in sums_l.items()})

    def _finish(self, o: dict[str, Any], items: Sequence[ItemView], texts: list[str],
                unique: list[str], pairs: list[tuple[int, int]], has_demand: bool,
                has_rec: bool, history: list[dict[str, float]], embed_s: float,
                started: float, val_rows: list[int], qvec: torch.Tensor,
                q_train: torch.Tensor, owner_t: torch.Tensor, ivec: torch.Tensor,
                names: list[str]) -> None:
        """``info`` after ``fit``: sizes, losses, timings, held-out accuracy."""
        self.info = {"fields": {f: len(v) for f, v in self.field_values.items()},
                     "items": len(items), "synthetic_queries": len(texts),
                     "distinct_queries": len(unique), "rec_pairs": len(pairs),
                     "demand": has_demand, "rec": has_rec,
                     "epochs": o["epochs"], "loss": history[-1] if history else {},
                     "embed_seconds": round(embed_s, 2),
                     "train_seconds": round(time.perf_counter() - started - embed_s, 2)}
        if val_rows and len(owner_t):  # top-1 accuracy on items never trained on
            self.info["validation_queries"] = self._accuracy(qvec[~q_train], owner_t[~q_train],
                                                             items, names)
            held = torch.tensor(val_rows, dtype=torch.long)
            self.info["validation_item_text"] = self._accuracy(ivec[held], held, items, names)

    def _accuracy(self, x: torch.Tensor, owners: torch.Tensor, items: Sequence[ItemView],
                  names: list[str]) -> dict[str, Any]:
        """Top-1 accuracy per field on the held-out items' synthetic queries."""
        with torch.inference_mode():
            logits = self.net.logits(x.to(next(self.net.parameters()).device))  # type: ignore[union-attr]
        out: dict[str, Any] = {"items": len(set(owners.tolist())), "queries": len(owners)}
        for f, lg in zip(names, logits):
            pred = lg.argmax(1).cpu().tolist()
            hits = total = 0
            for p, r in zip(pred, owners.tolist()):
                vals = _values((items[r].attributes or {}).get(f)) or []
                if vals:
                    total += 1
                    hits += self.field_values[f][p] in vals
            out[f] = round(hits / total, 4) if total else None
        return out

    # -- use -----------------------------------------------------------------------------
    def _require(self) -> _Net:
        if self.net is None:
            raise ConfigError("intent model 'multitask' is not trained (fit or load_state first)")
        return self.net

    def fields(self) -> list[str]:
        """The attribute fields the model predicts."""
        return list(self.field_values)

    def predict(self, vectors: torch.Tensor, top: int = 5) -> list[IntentPrediction]:
        """Soft facets (top values per field) and predicted demand per row of ``vectors``."""
        net = self._require()
        dev = next(net.parameters()).device
        x = vectors.float().reshape(-1, vectors.shape[-1]).to(dev)
        with torch.inference_mode():
            h = net.trunk(x)
            probs = [torch.softmax(head(h), 1).cpu() for head in net.heads]
            demand = net.demand(h).squeeze(1).cpu()
        out = []
        for r in range(x.shape[0]):
            facets = {}
            for f, p in zip(self.field_values, probs):
                conf, idx = p[r].topk(min(top, p.shape[1]))
                facets[f] = [(self.field_values[f][int(i)], float(c)) for c, i in zip(conf, idx)]
            out.append(IntentPrediction(facets, float(demand[r])))
        return out

    def item_demand(self, vectors: torch.Tensor) -> torch.Tensor:
        """Predicted z-scored log popularity [n] of items from their vectors."""
        net = self._require()
        dev = next(net.parameters()).device
        with torch.inference_mode():
            return net.demand(net.trunk(vectors.float().to(dev))).squeeze(1).cpu()

    def user_match(self, vectors: torch.Tensor, history: torch.Tensor) -> torch.Tensor | None:
        """Cosine of the item tower of ``vectors`` [b, d] with the user tower of the mean
        of ``history`` [h, d]; None for an empty history."""
        net = self._require()
        if history.shape[0] == 0:
            return None
        dev = next(net.parameters()).device
        with torch.inference_mode():
            u = nn.functional.normalize(net.user_tower(net.trunk(history.float().to(dev).mean(0, keepdim=True))), dim=1)
            v = nn.functional.normalize(net.item_tower(net.trunk(vectors.float().to(dev))), dim=1)
            return (v @ u.T).squeeze(1).cpu()

    # -- persistence ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        net = self._require()
        return {"fields": {f: list(v) for f, v in self.field_values.items()},
                "multi": list(self.multi), "dim": int(net.trunk[0].in_features),
                "weights": {k: v.cpu() for k, v in net.state_dict().items()},
                "demand_mean": self.demand_mean, "demand_std": self.demand_std,
                "info": self.info}

    def load_state(self, state: dict[str, Any]) -> None:
        self.field_values = {str(f): [str(v) for v in vals] for f, vals in state["fields"].items()}
        self.multi = list(state.get("multi", []))
        o = self.options
        net = _Net(int(state["dim"]), o["hidden"], [len(v) for v in self.field_values.values()],
                   o["rec_dim"], o["dropout"])
        net.load_state_dict(state["weights"])
        self.net = net.eval()
        self.demand_mean = float(state.get("demand_mean", 0.0))
        self.demand_std = float(state.get("demand_std", 1.0))
        self.info = dict(state.get("info", {}))


@hookimpl
def register_intent_models(register):  # type: ignore[no-untyped-def]
    register(MultiTaskIntent)
