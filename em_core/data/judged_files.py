"""Reading answers and judged-answers files (CSV or JSONL, optionally gzipped), ours and the
papers' published ones, with errors that name the file and line; Inspect eval logs (`.eval`,
`.json`) through `data.inspect_logs` (the optional Inspect extra)."""
from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from em_core.errors import DataError

REQUIRED_COLUMNS = ("question_id", "aligned", "coherent")
SUPPORTED_SUFFIXES = (".csv", ".csv.gz", ".jsonl", ".jsonl.gz")

# Answers can be long; the csv module's 128 KiB default field limit is too small for some.
csv.field_size_limit(2**31 - 1)


def _open_text(path: Path) -> TextIO:
    raw = path.open("rb")
    stream = gzip.open(raw) if path.name.endswith(".gz") else raw
    return io.TextIOWrapper(stream, encoding="utf-8", newline="")


def _iter_csv(path: Path, fh: TextIO, required: Sequence[str]) -> Iterator[dict[str, Any]]:
    reader = csv.DictReader(fh)
    try:
        header = reader.fieldnames
        if not header:
            raise DataError(path, "empty file: no CSV header", hint=f"expected columns {', '.join(required)}")
        for col in required:
            if col not in header:
                raise DataError(path, f"missing column '{col}'", line=1, hint=f"columns found: {', '.join(header)}")
        yield from reader
    except csv.Error as exc:
        raise DataError(path, f"malformed CSV: {exc}", line=reader.line_num) from exc


def _iter_jsonl(path: Path, fh: TextIO, required: Sequence[str]) -> Iterator[dict[str, Any]]:
    for lineno, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"invalid JSON: {exc.msg} at column {exc.colno}", line=lineno) from exc
        if not isinstance(row, dict):
            raise DataError(path, "each line must be a JSON object", line=lineno)
        for col in required:
            if col not in row:
                raise DataError(path, f"missing column '{col}'", line=lineno)
        yield row


def read_judged(path: str | Path, required: Sequence[str] = REQUIRED_COLUMNS) -> list[dict[str, Any]]:
    """Rows of a judged (or, with other `required` columns, an answers) file; score cells are
    returned raw (metrics treats junk as unscored)."""
    return list(iter_judged(path, required))


def iter_judged(path: str | Path, required: Sequence[str] = REQUIRED_COLUMNS) -> Iterator[dict[str, Any]]:
    """read_judged one row at a time (memory does not grow with the file); the same errors,
    raised while iterating (the file's type and existence before the first row)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found", hint="pass a judged answers file (.csv, .csv.gz, .jsonl, .jsonl.gz) "
                                                     "or an Inspect log (.eval)")
    from em_core.data.inspect_logs import is_inspect_log, log_rows

    if is_inspect_log(path):
        return log_rows(path, required)
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        parse = _iter_csv
    elif name.endswith((".jsonl", ".jsonl.gz")):
        parse = _iter_jsonl
    else:
        raise DataError(path, "unsupported file type",
                        hint=f"use one of {', '.join(SUPPORTED_SUFFIXES)}, or an Inspect log (.eval, .json)")
    return _rows(path, parse, required)


def _rows(path: Path, parse, required: Sequence[str]) -> Iterator[dict[str, Any]]:
    n = 0
    try:
        with _open_text(path) as fh:
            for row in parse(path, fh, required):
                n += 1
                yield row
    except (OSError, EOFError, UnicodeDecodeError) as exc:  # bad gzip, truncated file, wrong encoding
        raise DataError(path, f"cannot read file: {exc}") from exc
    if not n:
        raise DataError(path, "file has no answer rows")
