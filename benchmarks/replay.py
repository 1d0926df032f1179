"""Replay evaluation on MovieLens-100k: does learning from events between retrains help?

Protocol: all interactions sorted by timestamp; the model is trained on the first 80% of
time (``--train-share``); the remaining events are streamed in timestamp order through
``Engine.feedback``. Before each event the user's top-k is computed twice, with the online
learner (its state blended into the user vector) and without it (the frozen model), both
excluding items the user has already seen; a hit is the event's item in the top-k. The
bandit is off (evaluation). Also measured: events per second through ``Engine.feedback``
one at a time, and through ``Engine.feedback_many`` in batches, into a copy of the same
SQLite database with the learners on.

Prints a table and writes benchmarks/results/replay.json (replay-<options>.json when
``--train-option`` is given), with HitRate@k per window of ``--window`` events.
``--plot FILE`` (.png/.svg/.html) draws it (polyrec.plots.replay_chart); ``--from-json
PATH --plot FILE`` redraws a stored result without replaying.

``--ab-events N`` also runs the replay as an A/B experiment on a fresh copy of the
trained database: experiment ``replay-ab`` with variants ``online`` (the online learner
blended in) and ``frozen`` (``online: false``), users assigned by the experiment's hash;
for each of the first N events the user is served their variant's top k through
``polyrec.feedback.experiments.serve`` (impressions recorded), a click is recorded when
the event's item is in it, and a ``purchase`` (the report's conversion) when that item
was also rated 4 or more; then the rating itself. The report (CTR and conversion per
variant with Wilson intervals) goes into the JSON, and ``--plot-experiment FILE`` draws it
(polyrec.plots.experiment_chart, what ``polyrec experiments report --plot`` draws).

Usage:
    .venv/bin/python benchmarks/replay.py [--data ../shared/datasets] [--k 10]
        [--max-events N] [--workdir DIR (keeps the trained database between runs)]
        [--window 1000] [--plot FILE] [--ab-events N --plot-experiment FILE] [--out PATH]
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from polyrec.store.sqlite import checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"


@dataclass
class Event:
    user: str
    item: str
    value: float
    ts: float


@dataclass
class ReplayResult:
    """Hits per arm over the replayed events."""

    k: int
    events: int = 0
    hits: dict[str, int] = field(default_factory=dict)
    cold_events: int = 0  # events of users the model had not seen in training
    cold_hits: dict[str, int] = field(default_factory=dict)
    holdout_from: int = 0  # events before this index were used to choose settings
    holdout_hits: dict[str, int] = field(default_factory=dict)
    feedback_seconds: float = 0.0
    recommend_seconds: dict[str, float] = field(default_factory=dict)
    window: int = 1000  # hits per window of this many events, in stream order
    window_hits: dict[str, list[int]] = field(default_factory=dict)

    def count(self, arm: str, hit: bool, n: int) -> None:
        """Count event number ``n``'s hit (or miss) in its window."""
        hits = self.window_hits.setdefault(arm, [])
        while len(hits) <= n // self.window:
            hits.append(0)
        hits[n // self.window] += hit

    def curve(self) -> dict[str, Any]:
        """HitRate@k per window: the event count at each window's end and the rate."""
        n_windows = -(-self.events // self.window) if self.events else 0
        ends = [min((w + 1) * self.window, self.events) for w in range(n_windows)]
        sizes = [end - w * self.window for w, end in enumerate(ends)]
        return {"window": self.window, "ends": ends,
                "hit_rate": {arm: [round(h / n, 4) for h, n in zip(hits, sizes)]
                             for arm, hits in sorted(self.window_hits.items())}}

    def hit_rate(self, arm: str, cold: bool = False) -> float:
        n = self.cold_events if cold else self.events
        return (self.cold_hits if cold else self.hits).get(arm, 0) / n if n else 0.0

    def as_dict(self) -> dict[str, Any]:
        arms = sorted(self.hits)
        late = self.events - self.holdout_from
        return {"k": self.k, "events": self.events, "cold_user_events": self.cold_events,
                "hit_rate": {a: round(self.hit_rate(a), 4) for a in arms},
                "cold_user_hit_rate": {a: round(self.hit_rate(a, True), 4) for a in arms},
                "holdout_from": self.holdout_from,
                "holdout_hit_rate": {a: round(self.holdout_hits.get(a, 0) / late, 4) if late > 0
                                     else None for a in arms},
                "feedback_events_per_s": round(self.events / self.feedback_seconds, 1)
                if self.feedback_seconds else None,
                "recommend_ms": {a: round(1000 * s / max(self.events, 1), 2)
                                 for a, s in self.recommend_seconds.items()},
                "curve": self.curve()}


def read_interactions(path: Path) -> list[Event]:
    """ml-100k.inter (RecBole atomic file) as events sorted by (timestamp, file order)."""
    with path.open(newline="") as fh:
        rows = csv.reader(fh, delimiter="\t")
        header = [h.split(":")[0] for h in next(rows)]
        col = {h: i for i, h in enumerate(header)}
        events = [Event(r[col["user_id"]], r[col["item_id"]], float(r[col["rating"]]),
                        float(r[col["timestamp"]])) for r in rows if r]
    return sorted(events, key=lambda e: e.ts)  # stable: ties keep file order


def split_by_time(events: Sequence[Event], share: float) -> tuple[list[Event], list[Event]]:
    """(events before the ``share`` quantile of time, the rest), both in time order."""
    cut = events[min(len(events) - 1, int(len(events) * share))].ts
    return [e for e in events if e.ts < cut], [e for e in events if e.ts >= cut]


def replay(engine: Any, stream: Sequence[Event], *, k: int = 10,
           known_users: set[str] | None = None, progress: bool = True,
           holdout_from: int = 0, window: int = 1000) -> ReplayResult:
    """Stream ``stream`` through ``engine.feedback`` (kind 'rating'); before each event rank
    the catalogue for the event's user twice and count a hit when the event's item is in
    the top ``k``:

    - ``frozen``: the trained pipeline as loaded (``Recommender.scores``: histories and
      popularity as of training; users it never saw get popularity);
    - ``online``: the same scores through ``polyrec.feedback.events.online_scores``, the hook
      ``Engine.recommend`` uses to blend in the online learner's state.

    Items the user already interacted with (in training or earlier in the stream) are
    excluded in both. The pipeline's data snapshot is not refreshed during the replay, so
    the difference between the arms is the online learner alone."""
    import math

    import torch
    from tqdm.auto import tqdm

    from polyrec.feedback import events
    from polyrec.store.models import User
    rec = engine.services.recommender()
    hub = events.hub(engine)
    data = rec.data
    item_index = data.item_index()
    with engine.store.session() as s:
        internal = dict(s.execute(User.__table__.select().with_only_columns(User.external_id, User.id)).all())
    seen: dict[int, set[int]] = {}
    for u, items in enumerate(rec.history):
        seen[data.user_ids[u]] = set(items.tolist())
    popular = torch.log1p(rec.popularity.float())
    arms = ("frozen", "online")
    result = ReplayResult(k=k, hits={a: 0 for a in arms}, cold_hits={a: 0 for a in arms},
                          recommend_seconds={a: 0.0 for a in arms}, holdout_from=holdout_from,
                          holdout_hits={a: 0 for a in arms}, window=window)
    for n, event in enumerate(tqdm(stream, desc="replay", unit=" events", disable=not progress)):
        cold = known_users is not None and event.user not in known_users
        uid = internal.get(event.user)
        target = item_index[hub.item_id(event.item)]
        start = time.perf_counter()
        u = rec.user_index.get(uid) if uid is not None else None
        base = rec.scores(torch.tensor([u]))[0] if u is not None else popular.clone()
        mask = torch.tensor(sorted(seen.get(uid, ())), dtype=torch.long)
        frozen = base.clone()
        frozen[mask] = -math.inf
        result.recommend_seconds["frozen"] += time.perf_counter() - start
        start = time.perf_counter()
        online = events.online_scores(engine, rec, uid, base.clone(), online=True) \
            if uid is not None else base.clone()
        online[mask] = -math.inf
        result.recommend_seconds["online"] += time.perf_counter() - start
        for arm, scores in (("frozen", frozen), ("online", online)):
            hit = bool((torch.topk(scores, k).indices == target).any())
            result.hits[arm] += hit
            result.cold_hits[arm] += hit and cold
            result.holdout_hits[arm] += hit and n >= holdout_from
            result.count(arm, hit, n)
        start = time.perf_counter()
        stored = engine.feedback(event.user, event.item, "rating", value=event.value, ts=event.ts)
        result.feedback_seconds += time.perf_counter() - start
        internal[event.user] = stored.user_id
        seen.setdefault(stored.user_id, set()).add(target)
        result.events += 1
        result.cold_events += cold
    return result


AB_EXPERIMENT = "replay-ab"


def ab_replay(engine: Any, stream: Sequence[Event], *, k: int = 10,
              progress: bool = True) -> dict[str, Any]:
    """The replay as an A/B experiment (see the module docstring): each event's user is
    assigned a variant, served that arm's top ``k`` as ``replay`` ranks it (the data
    snapshot is not refreshed, so the arms differ by the online learner alone), and the
    shown items, a click on a hit, a purchase on a hit rated 4+, and the rating are
    stored (tagged with the variant by the interactions writer). Returns
    ``polyrec.feedback.experiments.report`` of experiment ``replay-ab``."""
    import math

    import torch
    from tqdm.auto import tqdm

    from polyrec.feedback import events, experiments
    from polyrec.store.models import User
    experiments.create(engine, AB_EXPERIMENT, {
        "online": {"weight": 1.0, "options": {"online": True}},
        "frozen": {"weight": 1.0, "options": {"online": False}}})
    rec = engine.services.recommender()
    hub = events.hub(engine)
    data = rec.data
    item_index = data.item_index()
    with engine.store.session() as s:
        internal = dict(s.execute(User.__table__.select().with_only_columns(User.external_id, User.id)).all())
    seen = {data.user_ids[u]: set(items.tolist()) for u, items in enumerate(rec.history)}
    popular = torch.log1p(rec.popularity.float())
    for n, event in enumerate(tqdm(stream, desc="A/B replay", unit=" events",
                                   disable=not progress)):
        tag = f"{AB_EXPERIMENT}:{n}"  # event ids: a repeated impression is not a duplicate
        variant = experiments.assign(engine, AB_EXPERIMENT, event.user)  # creates a new user
        uid = internal.get(event.user)
        u = rec.user_index.get(uid) if uid is not None else None
        scores = rec.scores(torch.tensor([u]))[0] if u is not None else popular.clone()
        if variant == "online" and uid is not None:
            scores = events.online_scores(engine, rec, uid, scores, online=True)
        scores[torch.tensor(sorted(seen.get(uid, ())), dtype=torch.long)] = -math.inf
        shown = [data.item_ids[i] for i in torch.topk(scores, k).indices.tolist()]
        external = [rec.external[i] for i in shown]
        batch = [{"user": event.user, "item": item, "kind": "impression", "ts": event.ts,
                  "context": {"rank": rank, "event_id": f"{tag}:shown:{rank}"}}
                 for rank, item in enumerate(external)]
        if event.item in external:
            batch.append({"user": event.user, "item": event.item, "kind": "click", "ts": event.ts,
                          "context": {"event_id": f"{tag}:click"}})
            if event.value >= 4:
                batch.append({"user": event.user, "item": event.item, "kind": "purchase",
                              "ts": event.ts, "context": {"event_id": f"{tag}:purchase"}})
        batch.append({"user": event.user, "item": event.item, "kind": "rating",
                      "value": event.value, "ts": event.ts})
        stored = engine.feedback_many(batch)
        internal[event.user] = stored[-1].user_id
        seen.setdefault(stored[-1].user_id, set()).add(item_index[hub.item_id(event.item)])
    return experiments.report(engine, AB_EXPERIMENT)


def ingest_throughput(db: Path, stream: Sequence[Event], *, batch: int = 500) -> dict[str, Any]:
    """Events per second into a copy of ``db``: one Engine.feedback per event, and
    Engine.feedback_many batches (learners on in both)."""
    from polyrec import Engine
    from polyrec.feedback.events import hub as feedback_hub
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("single", "batched"):
            copy = Path(tmp) / f"{mode}.db"
            shutil.copyfile(db, copy)
            with Engine(copy, device="cpu", entrypoints=False, progress=False) as eng:
                events = [{"user": e.user, "item": e.item, "kind": "rating", "value": e.value,
                           "ts": e.ts} for e in stream]
                warm = time.perf_counter()  # as a server: the pipeline and learners loaded
                feedback_hub(eng).warm_up()
                out.setdefault("warm_up_s", {})[mode] = round(time.perf_counter() - warm, 2)
                start = time.perf_counter()
                if mode == "single":
                    for e in events:
                        eng.feedback(**e)
                else:
                    for i in range(0, len(events), batch):
                        eng.feedback_many(events[i:i + batch])
                seconds = time.perf_counter() - start
                stored = eng.stats()["interactions"]
            out[mode] = {"events": len(events), "seconds": round(seconds, 3),
                         "events_per_s": round(len(events) / seconds, 1), "stored_total": stored}
    out["batch_size"] = batch
    return out


def prepare(db: Path, data: Path, train: Sequence[Event], train_options: dict[str, Any]) -> dict[str, Any]:
    """Catalogue + knowledge graph + the training events, encoded and trained."""
    from polyrec import Engine
    info: dict[str, Any] = {}
    with Engine(db, device="auto", entrypoints=False, progress=True) as eng:
        eng.ingest(data / "ml-100k.item", "items")
        eng.ingest(data / "ml-100k.user", "users")
        eng.ingest(data / "ml-100k.kg", "kg", links=data / "ml-100k.link")
        eng.add_interactions([{"user": e.user, "item": e.item, "kind": "rating", "value": e.value,
                               "ts": e.ts} for e in train])
        start = time.perf_counter()
        eng.encode()
        info["encode_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        eng.train(**train_options)
        info["train_s"] = round(time.perf_counter() - start, 1)
    checkpoint(db)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train-share", type=float, default=0.8)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-events", type=int, default=None,
                        help="Replay only the first N events after the cut (default: all).")
    parser.add_argument("--throughput-events", type=int, default=5000)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Keep the trained database here and reuse it on the next run.")
    parser.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE",
                        help="Passed to Engine.train (JSON values), e.g. ranker=ease.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads while replaying (one request at a time: 1 is "
                             "fastest on small machines; training uses the default).")
    parser.add_argument("--holdout-from", type=int, default=3000,
                        help="Also report the hit rate from this event on (the events before "
                             "it were used to choose the online.blend default).")
    parser.add_argument("--window", type=int, default=1000,
                        help="HitRate@k is also reported per window of this many events.")
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE",
                        help="Draw the per-window and overall hit rates (.png, .svg, .html).")
    parser.add_argument("--from-json", type=Path, default=None, metavar="PATH",
                        help="With --plot (and/or --plot-experiment): redraw a stored result "
                             "instead of replaying.")
    parser.add_argument("--ab-events", type=int, default=0, metavar="N",
                        help="Also replay the first N events as an A/B experiment "
                             "(online vs frozen), reported with Wilson intervals.")
    parser.add_argument("--plot-experiment", type=Path, default=None, metavar="FILE",
                        help="Draw the A/B experiment's report (.png, .svg, .html).")
    parser.add_argument("--out", type=Path, default=None, metavar="PATH",
                        help="Write the JSON here (default: benchmarks/results/replay.json, "
                             "replay-<options>.json with --train-option).")
    args = parser.parse_args()
    from polyrec.plots import check_plot_path, experiment_chart, replay_chart, save_chart
    for target in (args.plot, args.plot_experiment):
        if target is not None:
            check_plot_path(target)  # before the work
    if args.from_json is not None:
        stored = json.loads(args.from_json.read_text())
        if args.plot is not None:
            print(f"wrote {save_chart(replay_chart(stored['replay']), args.plot)}")
        if args.plot_experiment is not None:
            if "experiment" not in stored:
                parser.error(f"{args.from_json} has no A/B experiment (run with --ab-events)")
            print(f"wrote {save_chart(experiment_chart(stored['experiment']), args.plot_experiment)}")
        return
    if args.plot_experiment is not None and args.ab_events <= 0:
        parser.error("--plot-experiment needs --ab-events N")
    from polyrec import Engine
    data = args.data / "ml-100k"
    events = read_interactions(data / "ml-100k.inter")
    train, stream = split_by_time(events, args.train_share)
    if args.max_events:
        stream = stream[:args.max_events]
    train_options = {}
    for opt in args.train_option:
        key, _, raw = opt.partition("=")
        try:
            train_options[key] = json.loads(raw)
        except json.JSONDecodeError:
            train_options[key] = raw
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="replay-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tag = "-".join(f"{k}={v}" for k, v in sorted(train_options.items())) or "default"
    base = workdir / f"trained-{args.train_share:g}-{tag}.db"
    info: dict[str, Any] = {}
    if not base.exists():
        tmp = base.with_suffix(".tmp.db")
        info = prepare(tmp, data, train, train_options)
        tmp.rename(base)
    known = {e.user for e in train}
    print(f"train: {len(train):,} events ({len(known)} users) before "
          f"{time.strftime('%Y-%m-%d', time.gmtime(stream[0].ts))}; replay: {len(stream):,} events "
          f"({len({e.user for e in stream} - known)} users new)")

    import torch
    torch.set_num_threads(max(1, args.threads))
    throughput = ingest_throughput(base, stream[:args.throughput_events])
    run_db = workdir / "replay-run.db"
    for stale in (run_db, run_db.with_name(run_db.name + "-wal"), run_db.with_name(run_db.name + "-shm")):
        stale.unlink(missing_ok=True)  # an old WAL next to a fresh copy would corrupt it
    shutil.copyfile(base, run_db)
    with Engine(run_db, device="auto", entrypoints=False, progress=False) as eng:
        start = time.perf_counter()
        result = replay(eng, stream, k=args.k, known_users=known, holdout_from=args.holdout_from,
                        window=args.window)
        wall = time.perf_counter() - start
    res = result.as_dict()
    print(f"\nReplay of MovieLens-100k, last {1 - args.train_share:.0%} of time, HitRate@{args.k}")
    late = f"from #{args.holdout_from:,}"
    print(f"{'arm':<10}{'HitRate@' + str(args.k):>12}{'new users':>11}{late:>14}{'ms/recommend':>14}")
    for arm in ("frozen", "online"):
        held = res["holdout_hit_rate"][arm]
        print(f"{arm:<10}{res['hit_rate'][arm]:>12.4f}{res['cold_user_hit_rate'][arm]:>11.4f}"
              f"{held if held is not None else float('nan'):>14.4f}{res['recommend_ms'][arm]:>14.2f}")
    print(f"\nevents replayed: {result.events:,} ({result.cold_events:,} of users new since "
          f"training) in {wall:.0f} s; Engine.feedback with learner updates: "
          f"{res['feedback_events_per_s']:,.0f} events/s")
    print(f"ingestion into SQLite: {throughput['single']['events_per_s']:,.0f} events/s one by one, "
          f"{throughput['batched']['events_per_s']:,.0f} events/s in batches of "
          f"{throughput['batch_size']}")
    experiment = None
    if args.ab_events > 0:
        ab_db = workdir / "replay-ab.db"
        for stale in (ab_db, ab_db.with_name(ab_db.name + "-wal"), ab_db.with_name(ab_db.name + "-shm")):
            stale.unlink(missing_ok=True)
        shutil.copyfile(base, ab_db)
        with Engine(ab_db, device="auto", entrypoints=False, progress=False) as eng:
            experiment = ab_replay(eng, stream[:args.ab_events], k=args.k)
        print(f"\nA/B replay of the first {min(args.ab_events, len(stream)):,} events "
              f"(experiment {AB_EXPERIMENT}):")
        print(f"{'variant':<10}{'users':>7}{'impr.':>9}{'clicks':>8}{'CTR':>8}  {'95% CI':<18}"
              f"{'conv.':>7}  {'95% CI':<18}")
        for r in experiment["variants"]:
            print(f"{r['variant']:<10}{r['users']:>7,}{r['impressions']:>9,}{r['clicks']:>8,}"
                  f"{r['ctr']:>8.2%}  [{r['ctr_ci'][0]:.2%}, {r['ctr_ci'][1]:.2%}]"
                  f"{'':<2}{r['conversion']:>7.2%}  [{r['conversion_ci'][0]:.2%}, "
                  f"{r['conversion_ci'][1]:.2%}]")
    out = {"benchmark": "replay", "dataset": "ml-100k", "train_share": args.train_share,
           "train_events": len(train), "replay": res, "ingestion": throughput, "prepare": info,
           "train_options": train_options, "threads": args.threads, "machine": platform.platform(),
           "python": platform.python_version()}
    if experiment is not None:
        out["experiment"] = {**experiment, "events": min(args.ab_events, len(stream))}
    path = args.out or ROOT / "benchmarks" / "results" / ("replay.json" if tag == "default"
                                                          else f"replay-{tag}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    if args.plot is not None:
        print(f"wrote {save_chart(replay_chart(res), args.plot)}")
    if args.plot_experiment is not None and experiment is not None:
        print(f"wrote {save_chart(experiment_chart(experiment), args.plot_experiment)}")


if __name__ == "__main__":
    main()
