"""Session intent per genre on MovieLens-100k: a brand-new user clicks 3 films of one
genre; how much of the next top 10 is of that genre?

For every genre with at least ``--min-films`` films, ``--trials`` new users each click 3
films drawn at random (seeded) from the genre, then ``Engine.recommend(user, k=10)`` (the
Python API, settings of the database plus ``--set``) is counted: the share of the 10 films
whose genres include it. Genres are split into a tuning half and a held-out half
(alternating in alphabetical order, :func:`split`); the table marks which is which and
reports both means separately. Runs on a copy of ``--db`` (a trained database).

    .venv/bin/python benchmarks/session_genres.py --db TRAINED.db [--set online.blend=6]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any


def genres_of(value: Any) -> list[str]:
    return list(value) if isinstance(value, (list, tuple)) else str(value or "").split()


def split(genres: list[str]) -> tuple[list[str], list[str]]:
    """(tuning, held out): alternating in alphabetical order."""
    ordered = sorted(genres)
    return ordered[0::2], ordered[1::2]


def measure(eng: Any, *, min_films: int = 10, trials: int = 3, clicks: int = 3, k: int = 10,
            seed: int = 0, kind: str = "click") -> dict[str, dict[str, Any]]:
    """{genre: {"films", "shares", "mean", "min"}} for every genre with >= min_films films."""
    films: dict[str, list[str]] = {}
    classes: dict[str, set[str]] = {}
    for v in eng.items():
        gs = genres_of(v.attributes.get("class"))
        classes[v.external_id] = set(gs)
        for g in gs:
            films.setdefault(g, []).append(v.external_id)
    out = {}
    for genre in sorted(g for g, f in films.items() if len(f) >= min_films):
        shares = []
        for t in range(trials):
            rng = random.Random(f"{seed}:{genre}:{t}")
            user = f"session-{seed}-{genre}-{t}"
            for item in rng.sample(sorted(films[genre]), clicks):
                eng.feedback(user, item, kind)
            recs = eng.recommend(user, k=k)
            shares.append(sum(genre in classes[r.item] for r in recs) / k)
        out[genre] = {"films": len(films[genre]), "shares": shares,
                      "mean": sum(shares) / len(shares), "min": min(shares)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-films", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="feedback setting for this run, e.g. online.blend=6")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch

    from polyrec import Engine
    from polyrec.feedback.events import set_config
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "genres.db"
        shutil.copyfile(args.db, db)
        with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
            if args.set:
                set_config(eng, dict(a.split("=", 1) for a in args.set))
            result = measure(eng, min_films=args.min_films, trials=args.trials, seed=args.seed)
    tune, held = split(list(result))
    print(f"{'genre':<13}{'films':>6}{'share of top 10 (mean)':>24}{'min':>6}  set")
    for genre, r in result.items():
        print(f"{genre:<13}{r['films']:>6}{r['mean']:>24.2f}{r['min']:>6.1f}  "
              f"{'tuning' if genre in tune else 'held out'}")
    for name, part in (("tuning", tune), ("held out", held)):
        means = [result[g]["mean"] for g in part]
        mins = [result[g]["min"] for g in part]
        print(f"{name}: mean {sum(means) / len(means):.3f}, worst genre mean {min(means):.2f}, "
              f"worst trial {min(mins):.1f}, genres with mean >= 0.5: "
              f"{sum(m >= 0.5 for m in means)}/{len(means)}")
    if args.json:
        args.json.write_text(json.dumps({"settings": args.set, "trials": args.trials,
                                         "seed": args.seed, "genres": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
