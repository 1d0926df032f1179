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

#: The csv module's own limit on one field, raised from its default (131,072): longer
#: cells are read and then refused by ingestion with their row and column; only a cell
#: over this is refused by the reader (with its row).
CSV_FIELD_LIMIT = 64 << 20


def _open_text(path: Path):  # type: ignore[no-untyped-def]
    """UTF-8 text; a byte-order mark at the start is not part of the first column."""
    try:
        return open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ValidationError(f"cannot open: {exc.strerror or exc}", file=str(path)) from exc


class _Lines:
    """The physical lines of a file for csv.reader, keeping those of the record being
    parsed so that a record the parser gives up on can be re-read from its second line
    (an unterminated quote would otherwise swallow every row after it)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.pending, self.current = fh, [], []  # type: ignore[var-annotated]

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        line = self.pending.pop() if self.pending else next(self.fh)
        self.current.append(line)
        return line

    def start_record(self) -> None:
        self.current = []

    def replay_after_first(self) -> str:
        """Give back all but the first line of the failed record; return the first."""
        first, rest = self.current[0], self.current[1:]
        self.pending.extend(reversed(rest))
        self.current = []
        return first


def _csv_options(delimiter: str) -> dict[str, Any]:
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    return {"delimiter": delimiter, "quoting": quoting, "strict": delimiter == ","}


def _open_field(line: str, delimiter: str, header: list[str]) -> str | None:
    """The column whose quoted value starts on ``line`` and is never closed."""
    values = next(csv.reader([line], delimiter=delimiter), [])
    return header[len(values) - 1] if 0 < len(values) <= len(header) else None


def _delimited_rows(path: Path, delimiter: str) -> Iterator[Row]:
    """Rows of a delimited text file with a header line; '' becomes None. A record the
    csv parser refuses (an unterminated or stray quote, a cell over CSV_FIELD_LIMIT) is
    one bad row, and parsing resumes at the line after the one it started on."""
    options = _csv_options(delimiter)
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    with _open_text(path) as fh:
        lines = _Lines(fh)
        reader = csv.reader(lines, **options)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ValidationError(f"unreadable header: {exc}", file=str(path), row=None) from None
        number = 0
        while True:
            lines.start_record()
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                number += 1
                first = lines.replay_after_first()
                reason = str(exc)
                column = None
                if "unexpected end of data" in reason or "expected after" in reason:
                    column = _open_field(first, delimiter, header)
                    reason = ("unterminated quoted value" if "end of data" in reason
                              else f"malformed quoting ({reason})")
                elif "field limit" in reason:
                    reason = f"a value over {CSV_FIELD_LIMIT:,} characters"
                yield Row(number, {None: ValidationError(reason, field=column)})
                reader = csv.reader(lines, **options)
                continue
            if not values:
                continue  # a blank line
            number += 1
            fields: dict[Any, Any] = {}
            for key, value in zip(header, values):
                fields[key] = None if value.strip() == "" else value
            for key in header[len(values):]:
                fields[key] = None
            if len(values) > len(header):
                fields[None] = (f"{len(values) - len(header)} more value(s) than the "
                                f"{len(header)} columns of the header")
            yield Row(number, fields)


def _header(path: Path, delimiter: str) -> list[str]:
    with _open_text(path) as fh:
        try:
            return next(csv.reader(fh, **_csv_options(delimiter)), [])
        except csv.Error as exc:
            raise ValidationError(f"unreadable header: {exc}", file=str(path)) from None


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
