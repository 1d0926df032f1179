"""Wall time of `polyrec train` (the default pipeline) against `polyrec train --ranker
ease` in the same run: whole CLI processes, as a user runs them, alternated so both see
the same machine load.

Each run trains on a fresh copy of ``--db`` (a database with MovieLens-100k ingested and
encoded with bert and kg, e.g. the demo's before its `train`: `make demo` leaves one with
a trained version; the copy's model versions do not matter, every run stores a new one).
``--extra NAME=ARGS`` adds more configurations (e.g. the two-tower scorer back in the
hybrid: ``--extra 'hybrid+two_tower=--set scorers=two_tower'``). Prints a table (median,
min, max seconds and the ratio of medians to ease) and writes
benchmarks/results/train_ratio.json. Usage:
    .venv/bin/python benchmarks/train_ratio.py --db demo.db [--repeat 3] [--extra ...]
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLYREC = [str(Path(sys.executable).with_name("polyrec"))]  # the console script of this venv


def _copy(src: Path, dst: Path) -> Path:
    """A complete copy of a SQLite database (its WAL checkpointed into the copy)."""
    with sqlite3.connect(src) as con, sqlite3.connect(dst) as out:
        con.backup(out)
    return dst


def _train(db: Path, args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([*POLYREC, "--db", str(db), "--quiet", "train", *args],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 3):  # 3: stored but not live (the gate), still trained
        raise SystemExit(f"train {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_ratio.json"))
    opts = parser.parse_args()
    configs = {"default (hybrid)": [], "ease": ["--ranker", "ease"]}
    for spec in opts.extra:
        name, _, args = spec.partition("=")
        configs[name] = shlex.split(args)
    times: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(opts.repeat):
            for name, args in configs.items():  # alternated: each round sees the same load
                db = _copy(opts.db, Path(tmp) / f"run{r}.db")
                times[name].append(_train(db, args))
                print(f"round {r + 1}/{opts.repeat}  {name:<24} {times[name][-1]:7.1f} s", flush=True)
                for p in Path(tmp).glob(f"run{r}.db*"):
                    p.unlink()
    ease = statistics.median(times["ease"])
    rows = [{"config": name, "args": configs[name], "seconds": t,
             "median": statistics.median(t), "min": min(t), "max": max(t),
             "ratio_to_ease": statistics.median(t) / ease} for name, t in times.items()]
    print(f"\n{'config':<24} {'median s':>9} {'min':>7} {'max':>7} {'x ease':>7}")
    for row in rows:
        print(f"{row['config']:<24} {row['median']:9.1f} {row['min']:7.1f} {row['max']:7.1f} "
              f"{row['ratio_to_ease']:7.2f}")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps({"machine": platform.platform(), "python": sys.version.split()[0],
                                    "db": str(opts.db), "repeat": opts.repeat, "rows": rows},
                                   indent=2))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
