"""Ingestion throughput on MovieLens-100k: each file into a fresh SQLite database, then
the interactions a second time (the idempotent re-ingestion path).

Prints a table and writes benchmarks/results/ingest.json. Usage:
    .venv/bin/python benchmarks/ingest.py [--data ../shared/datasets] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from polyrec import Engine

ROOT = Path(__file__).resolve().parents[1]
STEPS = [("items", "ml-100k.item", {}), ("users", "ml-100k.user", {}),
         ("interactions", "ml-100k.inter", {}),
         ("kg", "ml-100k.kg", {"links": "ml-100k.link"}),
         ("interactions (again)", "ml-100k.inter", {})]


def run_once(data: Path) -> dict[str, tuple[float, int]]:
    out: dict[str, tuple[float, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with Engine(Path(tmp) / "bench.db", device="cpu", entrypoints=False,
                    progress=False) as eng:
            for label, name, extra in STEPS:
                kind = label.split()[0]
                opts = {k: data / v for k, v in extra.items()}
                start = time.perf_counter()
                report = eng.ingest(data / name, kind, **opts)
                out[label] = (time.perf_counter() - start, report.rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    data = args.data / "ml-100k"
    runs = [run_once(data) for _ in range(args.repeat)]
    rows = []
    print(f"{'step':<22}{'rows':>9}{'median s':>10}{'rows/s':>10}")
    for label, _, _ in STEPS:
        secs = statistics.median(r[label][0] for r in runs)
        n = runs[0][label][1]
        rows.append({"step": label, "rows": n, "median_s": round(secs, 3),
                     "rows_per_s": round(n / secs), "all_s": [round(r[label][0], 3) for r in runs]})
        print(f"{label:<22}{n:>9,}{secs:>10.2f}{n / secs:>10,.0f}")
    result = {"benchmark": "ingest", "dataset": "ml-100k", "repeat": args.repeat,
              "machine": platform.platform(), "python": platform.python_version(),
              "results": rows}
    out = ROOT / "benchmarks" / "results" / "ingest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
