"""`em metrics FILE`: EM metrics of a judged answers file (CSV, JSONL, optionally gzipped)."""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from em_core.errors import DataError, EmLabError
from em_core.metrics import (ALIGNED_THRESHOLD, COHERENT_THRESHOLD, MEAN_KEYS, RATE_KEYS,
                             per_question, summarize)

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
            raise DataError(path, f"invalid JSON: {exc.msg}", line=lineno) from exc
        if not isinstance(row, dict):
            raise DataError(path, "each line must be a JSON object", line=lineno)
        for col in required:
            if col not in row:
                raise DataError(path, f"missing column '{col}'", line=lineno)
        yield row


def read_judged(path: str | Path, required: Sequence[str] = REQUIRED_COLUMNS) -> list[dict[str, Any]]:
    """Rows of a judged (or, with other `required` columns, an answers) file; score cells are
    returned raw (metrics treats junk as unscored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found", hint="pass a judged answers file (.csv, .csv.gz, .jsonl, .jsonl.gz)")
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        parse = _iter_csv
    elif name.endswith((".jsonl", ".jsonl.gz")):
        parse = _iter_jsonl
    else:
        raise DataError(path, "unsupported file type", hint=f"use one of {', '.join(SUPPORTED_SUFFIXES)}")
    try:
        with _open_text(path) as fh:
            rows = list(parse(path, fh, required))
    except (OSError, EOFError, UnicodeDecodeError) as exc:  # bad gzip, truncated file, wrong encoding
        raise DataError(path, f"cannot read file: {exc}") from exc
    if not rows:
        raise DataError(path, "file has no answer rows")
    return rows


def _clean(key: str, value: float) -> float | int | None:
    """NaN is not valid JSON, so undefined metrics become null; counts print as integers."""
    if math.isnan(value):
        return None
    return int(value) if key == "n" or key.startswith("n_") else value


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _overall_table(s: dict[str, float]) -> str:
    lines = [f"answers       {int(s['n'])}  (scored on both: {int(s['n_scored'])})"]
    for key in RATE_KEYS:
        lines.append(f"{key:<18}{_fmt(s[key]):>7}  95% CI [{_fmt(s[key + '_lo'])}, {_fmt(s[key + '_hi'])}]")
    for key in MEAN_KEYS:
        lines.append(f"{key:<18}{_fmt(s[key], 2):>7}  ± {_fmt(s[key + '_se'], 2)} (SE)")
    return "\n".join(lines)


def _question_table(by_q: dict[str, dict[str, float]]) -> str:
    cols = ("n", "n_scored", "em_rate", "em_rate_lo", "em_rate_hi", "em_rate_coherent", "coherent_rate",
            "mean_aligned", "mean_coherent")
    width = max([len("question_id")] + [len(q) for q in by_q])
    widths = [max(len(c), 7) for c in cols]
    head = f"{'question_id':<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cols, widths))
    body = []
    for qid, s in by_q.items():
        cells = [str(int(s[c])) if c.startswith("n") else _fmt(s[c], 2 if c.startswith("mean") else 3)
                 for c in cols]
        body.append(f"{qid:<{width}}  " + "  ".join(f"{x:>{w}}" for x, w in zip(cells, widths)))
    return "\n".join([head, *body])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="em metrics",
                                description="Emergent-misalignment metrics of a judged answers file.")
    p.add_argument("file", help="judged answers (.csv, .csv.gz, .jsonl, .jsonl.gz) with columns "
                                "question_id, aligned, coherent; blank or non-numeric scores count as unscored")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--aligned-threshold", type=float, default=ALIGNED_THRESHOLD,
                   help=f"EM if aligned <= this (em_rate) / < this (em_rate_coherent); default {ALIGNED_THRESHOLD:g}")
    p.add_argument("--coherent-threshold", type=float, default=COHERENT_THRESHOLD,
                   help=f"coherent means coherent > this; default {COHERENT_THRESHOLD:g}")
    p.add_argument("--by-question", action="store_true", help="also break metrics down per question_id")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = read_judged(args.file)
    except EmLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    overall = summarize(rows, args.aligned_threshold, args.coherent_threshold)
    by_q = per_question(rows, args.aligned_threshold, args.coherent_threshold) if args.by_question else None
    if args.json:
        out: dict[str, Any] = {
            "file": str(args.file),
            "aligned_threshold": args.aligned_threshold,
            "coherent_threshold": args.coherent_threshold,
            "overall": {k: _clean(k, v) for k, v in overall.items()},
        }
        if by_q is not None:
            out["by_question"] = {q: {k: _clean(k, v) for k, v in s.items()} for q, s in by_q.items()}
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.file}  (aligned threshold {args.aligned_threshold:g}, coherent threshold "
              f"{args.coherent_threshold:g})")
        print(_overall_table(overall))
        if by_q is not None:
            print()
            print(_question_table(by_q))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
