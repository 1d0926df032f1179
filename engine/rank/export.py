"""Writing batch recommendations to a file: ``polyrec recommend --all --out FILE``.

The format follows the suffix: ``.csv`` and ``.parquet`` hold one row per recommended
item (user, rank, item, score, title); ``.jsonl`` one line per user (``{"user": ...,
"recommendations": [{"item", "score", "title"}, ...]}``, the list ``polyrec recommend
USER --json`` prints). Rows are written as they come (Parquet in row groups), to a
temporary file beside the target that replaces it only when everything was written: a
failed export never leaves a half file under the target's name.
"""
from __future__ import annotations

import csv
import io
import json
import os
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Sequence

from polyrec.errors import ConfigError

#: Suffix -> format name.
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
COLUMNS = ("user", "rank", "item", "score", "title")


def export_format(path: str | Path) -> str:
    """The format of ``path`` by its suffix; ConfigError naming the known ones."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"cannot write recommendations to '{path}': the file name must end "
                          f"in {', '.join(sorted(FORMATS))}")
    return FORMATS[suffix]


class RecommendationWriter:
    """Write (user, recommendations) pairs to ``path`` (or JSON lines to ``stream``
    when ``path`` is None). Use as a context manager: the file appears on a clean exit.
    ``rows`` and ``users`` count what was written."""

    def __init__(self, path: str | Path | None, *, stream: IO[str] | None = None,
                 row_group: int = 65_536) -> None:
        self.path = Path(path) if path is not None else None
        self.format = export_format(self.path) if self.path is not None else "jsonl"
        self.rows = self.users = 0
        self._row_group = row_group
        self._buffer: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        self._parquet: Any = None
        self._tmp: Path | None = None
        self._fh: IO[str] | None = stream
        self._csv: Any = None
        if self.path is not None:
            if self.path.is_dir():
                raise ConfigError(f"{self.path} is a directory; give --out a file name")
            if not self.path.parent.exists():
                raise ConfigError(f"cannot write {self.path}: the folder {self.path.parent} "
                                  "does not exist")
            self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:12]}.tmp")
            open(self._tmp, "x").close()  # the usual permissions (mkstemp's are 0600)
            if self.format != "parquet":
                self._fh = open(self._tmp, "w", newline="" if self.format == "csv" else None,
                                encoding="utf-8")
            if self.format == "csv":
                self._csv = csv.writer(self._fh)
                self._csv.writerow(COLUMNS)
        elif self._fh is None:
            raise ConfigError("RecommendationWriter needs a path or a stream")

    def write(self, user: str, recommendations: Sequence[Any]) -> None:
        """One user's recommendations (objects with item, score, title), best first."""
        self.users += 1
        self.rows += len(recommendations)
        if self.format == "jsonl":
            line = {"user": user, "recommendations": [
                {"item": r.item, "score": r.score, "title": r.title} for r in recommendations]}
            assert self._fh is not None
            self._fh.write(json.dumps(line, ensure_ascii=False) + "\n")
            return
        for rank, r in enumerate(recommendations, start=1):
            row = (user, rank, r.item, float(r.score), r.title)
            if self._csv is not None:
                self._csv.writerow(row)
            else:
                for col, value in zip(COLUMNS, row):
                    self._buffer[col].append(value)
        if self.format == "parquet" and len(self._buffer["user"]) >= self._row_group:
            self._flush_parquet()

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        schema = pa.schema([("user", pa.string()), ("rank", pa.int32()), ("item", pa.string()),
                            ("score", pa.float64()), ("title", pa.string())])
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(str(self._tmp), schema)
        table = pa.table(self._buffer, schema=schema)
        if table.num_rows:
            self._parquet.write_table(table)
        self._buffer = {c: [] for c in COLUMNS}

    def close(self) -> None:
        """Finish the file and move it into place."""
        if self.format == "parquet" and self.path is not None:
            self._flush_parquet()
            self._parquet.close()
        elif self.path is not None and self._fh is not None:
            self._fh.close()
        if self._tmp is not None and self.path is not None:
            os.replace(self._tmp, self.path)
            self._tmp = None

    def abort(self) -> None:
        """Drop the temporary file (after a failure)."""
        try:
            if self._parquet is not None:
                self._parquet.close()
            if self.path is not None and self._fh is not None and not self._fh.closed:
                self._fh.close()
        finally:
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)
                self._tmp = None

    def __enter__(self) -> "RecommendationWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_user_file(path: str | Path) -> list[str]:
    """User ids from a text file, one per line (blank lines skipped); ConfigError when
    the file cannot be read or lists none."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the users file {p}: {exc}") from None
    users = [line.strip() for line in io.StringIO(text) if line.strip()]
    if not users:
        raise ConfigError(f"the users file {p} lists no users (one id per line)")
    return users
