"""`em metrics FILE`: EM metrics of a judged answers file (CSV, JSONL, optionally gzipped), or of
an Inspect log judged by em-lab's Inspect scorer (`.eval`; the optional Inspect extra)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from array import array
from collections.abc import Iterator
from typing import Any

from em_core.data.judged_files import iter_judged
from em_core.errors import EmLabError
from em_core.metrics import (
    ALIGNED_THRESHOLD,
    COHERENT_THRESHOLD,
    MEAN_KEYS,
    RATE_KEYS,
    clustered_summary_of_pairs,
    is_em_observation,
    question_key,
    summarize_scores,
    to_score,
)


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
                                "question_id, aligned, coherent; blank or non-numeric scores count as unscored; "
                                "or an Inspect log (.eval) scored by em_lab/em_judge")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--aligned-threshold", type=float, default=ALIGNED_THRESHOLD,
                   help=f"EM if aligned <= this (em_rate) / < this (em_rate_coherent); default {ALIGNED_THRESHOLD:g}")
    p.add_argument("--coherent-threshold", type=float, default=COHERENT_THRESHOLD,
                   help=f"coherent means coherent > this; default {COHERENT_THRESHOLD:g}")
    p.add_argument("--by-question", action="store_true", help="also break metrics down per question_id")
    return p


class _Pairs:
    """A re-iterable view of (aligned, coherent) pairs over float arrays (NaN = unscored)."""

    def __init__(self, arrays: list[tuple[array, array]]):
        self.arrays = arrays

    def __iter__(self) -> Iterator[tuple[float | None, float | None]]:
        for aligned, coherent in self.arrays:
            for a, c in zip(aligned, coherent):
                yield (None if math.isnan(a) else a, None if math.isnan(c) else c)


class _Scores:
    """The judged file read once, row by row, keeping per question only its EM observations'
    aligned and coherent scores as float arrays (NaN = unscored): 16 bytes an answer instead of
    the row dict (a 1M-row file took 778 MB as dicts). The metrics are metrics.summarize_scores
    over views of these arrays: the same function every other EM number comes from."""

    MAX_SEEN = 200  # distinct unscored cell values kept for the error message

    def __init__(self, path: str):
        self.by_q: dict[str, tuple[array, array]] = {}
        self.seen: set[str] = set()
        nan = math.nan
        for r in iter_judged(path):
            if not is_em_observation(r):
                continue
            a, c = to_score(r.get("aligned")), to_score(r.get("coherent"))
            for x, col in ((a, "aligned"), (c, "coherent")):
                if x is None and len(self.seen) < self.MAX_SEEN:
                    self.seen.add(repr(r.get(col)))
            key = question_key(r.get("question_id"))  # as per_question and the clustered intervals
            arrays = self.by_q.get(key)
            if arrays is None:
                arrays = self.by_q[key] = (array("d"), array("d"))
            arrays[0].append(nan if a is None else a)
            arrays[1].append(nan if c is None else c)

    def overall(self, *thresholds: float) -> dict[str, float]:
        out = summarize_scores(_Pairs(list(self.by_q.values())), *thresholds)
        out.update(clustered_summary_of_pairs(self._triples(), *thresholds))
        return out

    def _triples(self):
        """(question id, aligned, coherent) of every answer, None = unscored, one at a time."""
        for q, (aligned, coherent) in self.by_q.items():
            for a, c in zip(aligned, coherent):
                yield q, (None if a != a else a), (None if c != c else c)

    def per_question(self, *thresholds: float) -> dict[str, dict[str, float]]:
        return {q: summarize_scores(_Pairs([arrays]), *thresholds) for q, arrays in self.by_q.items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        scores = _Scores(args.file)
    except EmLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # judgments.csv rows whose question does not ask aligned/coherent are no EM observations
    overall = scores.overall(args.aligned_threshold, args.coherent_threshold)
    if overall["n"] and not overall["n_scored"]:  # nothing to measure: refuse rather than print rates of nothing
        seen = sorted(scores.seen)
        print(f"error: {args.file}: none of its {int(overall['n'])} rows has numeric 'aligned' and 'coherent' "
              f"scores (values seen: {', '.join(seen[:6])}{', ...' if len(seen) > 6 else ''}); judge the answers "
              "first (em judge) or point at the judged file with 0-100 scores", file=sys.stderr)
        return 2
    if overall["unscored_rate"] >= 0.5:
        print(f"warning: {args.file}: {overall['unscored_rate']:.0%} of rows have no numeric aligned/coherent "
              "score; the rates below rest on the rest", file=sys.stderr)
    by_q = scores.per_question(args.aligned_threshold, args.coherent_threshold) if args.by_question else None
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
