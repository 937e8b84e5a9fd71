"""What a judge run's verdicts came from, and re-deriving them without asking the judge again.

Every judge run logs, beside `judgments.csv`:

* `judgments_raw.jsonl`: one line per row of judgments.csv (`row` = its 0-based index), with the
  judge's raw output per metric: the top-k token -> probability dict (logprob mode) or the reply
  text (text mode), the kind (0_100 or categorical) and labels it was read as, and the `model` and
  `system_fingerprint` the API said answered.
* `judge_identity.json`: requested model, backend, mode, request settings, the models and
  fingerprints the API returned (with counts), the sha256 of the judge prompt templates, and the
  scoring settings (weighted|argmax, min_mass, thresholds, bound convention).
* `sensitivity.csv`/`.json`: the EM rate at the final checkpoint over aligned 20-40 x coherent
  40-60 under both bound conventions (metrics.sensitivity_grid).

`rescore_rows` re-reads the raw outputs under other scoring settings: zero requests. Pure
functions and file I/O only; MLflow is the caller's business.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from em_core.errors import DataError
from em_core.judge.scoring import API_ERROR, SCORINGS, Judgment, interpret
from em_core.metrics import (BOUNDS_TEXT, em_rows, sensitivity_grid, sensitivity_range)

RAW_ARTIFACT = "judgments_raw.jsonl"
IDENTITY_ARTIFACT = "judge_identity.json"
SENSITIVITY_ARTIFACT = ("sensitivity.csv", "sensitivity.json")
RAW_FORMAT = 1


def answer_sha(answer: Any) -> str:
    return hashlib.sha256(str(answer or "").encode("utf-8")).hexdigest()[:16]


def raw_entry(v: Judgment, kind: str, labels: Sequence[str] | None) -> dict[str, Any]:
    """One verdict's raw record (kind as the judge reads it: 0_100 or categorical)."""
    return {"kind": "categorical" if kind == "categorical" else "0_100",
            "labels": list(labels) if kind == "categorical" and labels else None,
            "raw": v.raw, "unscored_reason": v.unscored_reason or "",
            "served_model": v.served_model, "system_fingerprint": v.system_fingerprint}


def write_raw_jsonl(rows: Sequence[Mapping[str, Any]], raws: Mapping[int, Mapping[str, Any]], path: Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"format": RAW_FORMAT, "row": i, "question_id": r.get("question_id"),
                                "checkpoint_step": r.get("checkpoint_step"), "answer_sha256": answer_sha(r.get("answer")),
                                "judgments": raws.get(i, {})}, ensure_ascii=False) + "\n")


def read_raw_jsonl(path: str | Path) -> list[dict[str, Any]]:
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(str(path), f"not JSON: {e}", n) from None
    return out


def prompt_template_sha256(questions: Iterable[Any], metrics: Sequence[str]) -> str:
    """sha256 over every (question id, metric, judge prompt template) used: a changed prompt is a
    changed judge."""
    items = sorted((q.id, m, q.judge_prompts[m]) for q in questions for m in q.judge_prompts if m in metrics)
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def judge_identity(judge: Any, questions: Iterable[Any], metrics: Sequence[str],
                   raws: Mapping[int, Mapping[str, Mapping[str, Any]]], *, scoring: str, min_mass: float,
                   aligned_threshold: float, coherent_threshold: float, bounds: str,
                   base_url: str | None = None) -> dict[str, Any]:
    served: Counter = Counter()
    fingerprints: Counter = Counter()
    for per_row in raws.values():
        for entry in per_row.values():
            if entry.get("served_model"):
                served[entry["served_model"]] += 1
            if entry.get("system_fingerprint"):
                fingerprints[entry["system_fingerprint"]] += 1
    try:
        settings = judge.identity()
    except Exception:  # noqa: BLE001 -- identity is informative here, never worth failing a run
        settings = {}
    return {
        "requested_model": judge.model, "backend": judge.backend, "mode": judge.mode, "base_url": base_url,
        "settings": settings,
        "served_models": dict(served), "system_fingerprints": dict(fingerprints),
        "prompt_template_sha256": prompt_template_sha256(questions, metrics),
        "scoring": scoring_settings(scoring, min_mass, aligned_threshold, coherent_threshold, bounds),
    }


def scoring_settings(scoring: str, min_mass: float, aligned_threshold: float, coherent_threshold: float,
                     bounds: str) -> dict[str, Any]:
    return {"scoring": scoring, "min_mass": min_mass, "aligned_threshold": aligned_threshold,
            "coherent_threshold": coherent_threshold, "bounds": bounds,
            "em_rule": BOUNDS_TEXT[bounds].format(a=aligned_threshold, c=coherent_threshold)}


def rescore_rows(rows: Sequence[Mapping[str, Any]], raw_lines: Sequence[Mapping[str, Any]], *,
                 scoring: str = "weighted", min_mass: float = 0.25, source: str = RAW_ARTIFACT) -> list[dict]:
    """judgments.csv rows with every judged metric re-derived from its raw output under `scoring`
    and `min_mass` (no request: `interpret` on the stored output). Rows whose request failed
    (api_error: no output) stay unscored. DataError when the raw file does not belong to the rows."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if len(raw_lines) != len(rows):
        raise DataError(source, f"{len(raw_lines)} raw records for {len(rows)} judged rows: not this run's")
    out = []
    for i, (row, line) in enumerate(zip(rows, raw_lines)):
        if line.get("row") != i or line.get("answer_sha256") != answer_sha(row.get("answer")):
            raise DataError(source, f"raw record {i} does not match row {i} of judgments.csv", i + 1)
        new = dict(row)
        for metric, entry in (line.get("judgments") or {}).items():
            if entry.get("raw") is None:
                new[metric], new[f"{metric}_unscored_reason"] = None, entry.get("unscored_reason") or API_ERROR
                continue
            j = interpret(entry["raw"], entry["kind"], entry.get("labels"), min_mass, scoring)
            new[metric] = j.label if entry["kind"] == "categorical" else j.score
            new[f"{metric}_unscored_reason"] = j.unscored_reason or ""
        out.append(new)
    return out


def _step(r: Mapping[str, Any]) -> int:
    try:
        return int(r.get("checkpoint_step") or 0)
    except (TypeError, ValueError):
        return 0


def sensitivity_at_final(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The sensitivity grid at the final checkpoint (None without EM observations)."""
    obs = em_rows(rows)
    if not obs:
        return None
    final = max(_step(r) for r in obs)
    grid = sensitivity_grid([r for r in obs if _step(r) == final])
    lo, hi = sensitivity_range(grid)
    return {"step": final, "grid": grid, "em_rate_min": lo, "em_rate_max": hi}


def sensitivity_table(rows: Sequence[Mapping[str, Any]], folder: Path) -> dict[str, float]:
    """Write sensitivity.csv/.json into `folder` (always, empty when there is nothing to tabulate);
    return the metrics to log (`sensitivity/em_rate_min|max|spread`)."""
    s = sensitivity_at_final(rows)
    folder = Path(folder)
    (folder / SENSITIVITY_ARTIFACT[1]).write_text(json.dumps(s, indent=1, allow_nan=True), encoding="utf-8")
    with (folder / SENSITIVITY_ARTIFACT[0]).open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "bounds", "aligned_threshold", "coherent_threshold", "em_rate",
                                          "n_em", "n_scored"])
        w.writeheader()
        for g in (s or {}).get("grid", []):
            w.writerow({"step": s["step"], **g})
    if s is None or math.isnan(s["em_rate_min"]):
        return {}
    return {"sensitivity/em_rate_min": s["em_rate_min"], "sensitivity/em_rate_max": s["em_rate_max"],
            "sensitivity/em_rate_spread": s["em_rate_max"] - s["em_rate_min"]}


def sensitivity_step(rows: Sequence[Mapping[str, Any]]) -> int:
    """The step the sensitivity metrics belong to (and are logged at): the final checkpoint's.
    Logged at step 0 they would sit on the base model's step, and a multi-stage pipeline would
    copy them onto the previous stage's end."""
    s = sensitivity_at_final(rows)
    return int(s["step"]) if s and s.get("step") is not None else 0
