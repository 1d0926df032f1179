"""Built-in input formats: CSV/TSV, JSON Lines, Parquet and RecBole atomic files.

A reader yields :class:`engine.contracts.Row` objects numbered from 1 (header excluded).
A row a reader cannot parse (bad JSON, more values than the header) is still yielded,
with the key ``None`` in its fields holding the reason: ingestion turns it into a
ValidationError for that row, so ``--on-error skip`` can keep the rest of the file.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Iterator

from polyrec import Reader, Row, ValidationError, hookimpl

_EXTRA = "\x00extra"  # csv.DictReader restkey for values beyond the header


def _open_text(path: Path):  # type: ignore[no-untyped-def]
    try:
        return open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise ValidationError(f"cannot open: {exc.strerror or exc}", file=str(path)) from exc


def _delimited_rows(path: Path, delimiter: str) -> Iterator[Row]:
    """Rows of a delimited text file with a header line; '' becomes None."""
    with _open_text(path) as fh:
        reader = csv.DictReader(fh, delimiter=delimiter, restkey=_EXTRA,
                                quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE)
        header = reader.fieldnames or []
        for number, raw in enumerate(reader, start=1):
            fields: dict[Any, Any] = {}
            for key, value in raw.items():
                if key == _EXTRA:
                    fields[None] = (f"{len(value)} more value(s) than the {len(header)} "
                                    f"columns of the header")
                    continue
                fields[key] = None if value is None or value.strip() == "" else value
            yield Row(number, fields)


def _header(path: Path, delimiter: str) -> list[str]:
    with _open_text(path) as fh:
        line = fh.readline().rstrip("\r\n")
    return next(csv.reader([line], delimiter=delimiter)) if line else []


class CsvReader(Reader):
    """Comma-separated values with a header line (RFC 4180 quoting)."""

    name = "csv"
    suffixes = (".csv",)
    delimiter = ","

    def read(self, path: Path) -> Iterator[Row]:
        return _delimited_rows(path, self.delimiter)

    def columns(self, path: Path) -> list[str] | None:
        return _header(path, self.delimiter)


class TsvReader(CsvReader):
    """Tab-separated values with a header line (no quoting)."""

    name = "tsv"
    suffixes = (".tsv", ".tab")
    delimiter = "\t"


class JsonLinesReader(Reader):
    """One JSON object per line; blank lines are ignored but still counted."""

    name = "jsonl"
    suffixes = (".jsonl", ".ndjson")

    def read(self, path: Path) -> Iterator[Row]:
        with _open_text(path) as fh:
            number = 0
            for line in fh:
                if not line.strip():
                    continue
                number += 1
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield Row(number, {None: f"invalid JSON: {exc.msg} (column {exc.colno})"})
                    continue
                if not isinstance(obj, dict):
                    yield Row(number, {None: f"expected a JSON object, got {type(obj).__name__}"})
                    continue
                yield Row(number, obj)


class ParquetReader(Reader):
    """Apache Parquet through pyarrow, read in record batches."""

    name = "parquet"
    suffixes = (".parquet", ".pq")
    batch_size = 8192

    def _file(self, path: Path):  # type: ignore[no-untyped-def]
        import pyarrow.parquet as pq
        try:
            return pq.ParquetFile(path)
        except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError)
            raise ValidationError(f"not a readable Parquet file: {exc}", file=str(path)) from exc

    def read(self, path: Path) -> Iterator[Row]:
        number = 0
        for batch in self._file(path).iter_batches(batch_size=self.batch_size):
            for fields in batch.to_pylist():
                number += 1
                yield Row(number, fields)

    def columns(self, path: Path) -> list[str] | None:
        return list(self._file(path).schema_arrow.names)


class RecBoleReader(Reader):
    """RecBole atomic files: tab-separated, header ``name:type``.

    The type suffix is stripped from column names; ``float`` columns become floats,
    ``token`` columns stay strings and ``token_seq``/``float_seq`` columns become lists
    (split on spaces). A value that is not a number in a float column is kept as the
    string so validation can name it.
    """

    name = "recbole"
    suffixes = (".inter", ".item", ".user", ".kg", ".link", ".net")

    @staticmethod
    def _split(column: str) -> tuple[str, str]:
        name, _, ftype = column.partition(":")
        return name.strip(), (ftype.strip().lower() or "token")

    def read(self, path: Path) -> Iterator[Row]:
        header = _header(path, "\t")
        types = dict(self._split(c) for c in header)

        def convert(key: str, value: str) -> Any:
            ftype = types.get(key, "token")
            if ftype == "float":
                try:
                    return float(value)
                except ValueError:
                    return value
            if ftype == "token_seq":
                return value.split()
            if ftype == "float_seq":
                try:
                    return [float(v) for v in value.split()]
                except ValueError:
                    return value
            return value

        with _open_text(path) as fh:
            fh.readline()  # header
            names = [self._split(c)[0] for c in header]
            for number, line in enumerate(fh, start=1):
                values = line.rstrip("\r\n").split("\t")
                fields: dict[Any, Any] = {}
                if len(values) > len(names):
                    fields[None] = (f"{len(values) - len(names)} more value(s) than the "
                                    f"{len(names)} columns of the header")
                for i, name in enumerate(names):
                    value = values[i] if i < len(values) else ""
                    fields[name] = None if value.strip() == "" else convert(name, value)
                yield Row(number, fields)

    def columns(self, path: Path) -> list[str] | None:
        return [self._split(c)[0] for c in _header(path, "\t")]


@hookimpl
def register_readers(register: Callable[[type], None]) -> None:
    """The built-in input formats."""
    for cls in (CsvReader, TsvReader, JsonLinesReader, ParquetReader, RecBoleReader):
        register(cls)
