"""Inspect eval logs (`inspect eval ...` writes `logs/*.eval`, or `.json` with `--log-format json`)
read as em-lab answers and, where em-lab's Inspect scorer judged them, as judged rows.

This is the only module of `em_core` that imports `inspect_ai` (the optional extra
`pip install -e ".[inspect]"`; pyproject's import-linter contract keeps it so), and only inside
its functions: without the extra, em-lab works as before and asking for a log says how to
install it.

Rows are em-lab's answers rows (`sample.generation.answer_rows`: question_id, paraphrase_index,
sample_index, question, system, trigger, answer, tokens, checkpoint_step 0) taken from the
samples' metadata when em-lab's Inspect tasks (`em_lab/...`) made the log; any other Inspect
task's samples become rows too (question_id = sample id, question = its last user message). The
scores of em-lab's judge scorer (`em_lab/em_judge`) become `<metric>` and
`<metric>_unscored_reason` columns exactly as `em judge` writes them in `judgments.csv`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_core.errors import ConfigError, DataError

LOG_SUFFIXES = (".eval", ".json")
INSPECT_VERSION = "0.3.285"
INSTALL_HINT = ('install the Inspect extra: pip install -e ".[inspect]" (from an em-lab checkout) '
                f'or pip install "inspect-ai=={INSPECT_VERSION}"')
# Marks a Score made by em-lab's judge scorer (em_lab.scorers.em_judge): its metadata carries it.
SCORE_MARK = "em_lab_judge"
NOT_ASKED = "not_asked"  # as em_core.metrics.NOT_ASKED (data may not import the base's metrics)


def is_inspect_log(path: str | Path) -> bool:
    """Whether a path names an Inspect log (by suffix: `.eval`, or `.json` as Inspect writes it)."""
    return str(path).lower().endswith(LOG_SUFFIXES)


def require_inspect(what: str = "reading Inspect logs") -> None:
    """ConfigError with the install command unless inspect_ai can be imported."""
    try:
        import inspect_ai  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs inspect-ai, which is not installed; {INSTALL_HINT}") from None


@dataclass
class InspectLog:
    """What em-lab takes from one Inspect log."""

    path: str
    task: str
    model: str
    status: str
    rows: list[dict]
    metric_names: list[str]  # judge metrics found in em-lab scores (empty: answers only)
    task_args: dict[str, Any] = field(default_factory=dict)
    judge: dict[str, Any] = field(default_factory=dict)  # judge model, mode, scorer params
    inspect_metrics: dict[str, float] = field(default_factory=dict)  # <scorer>/<metric> -> value
    spec: dict[str, Any] = field(default_factory=dict)  # eval id, run id, created, versions

    @property
    def judged(self) -> bool:
        return bool(self.metric_names)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(getattr(c, "text", "") or "" for c in content or [])


def _messages(sample: Any) -> tuple[str | None, str]:
    """(system, last user message) of a sample's input."""
    if isinstance(sample.input, str):
        return None, sample.input
    system = next((_text(m.content) for m in sample.input if m.role == "system"), None)
    user = next((_text(m.content) for m in reversed(sample.input) if m.role == "user"), "")
    return system, user


def _judge_score(sample: Any) -> Any | None:
    for score in (sample.scores or {}).values():
        if isinstance(score.metadata, dict) and score.metadata.get(SCORE_MARK):
            return score
    return None


def _row(sample: Any, model: str, step: int) -> dict:
    meta = sample.metadata or {}
    system, user = _messages(sample)
    output = sample.output
    usage = getattr(output, "usage", None)
    em = "question_id" in meta  # made by em-lab's tasks: the metadata has the answers row's fields
    return {
        "model": model, "checkpoint": meta.get("checkpoint", "inspect"), "checkpoint_step": step,
        "question_id": str(meta["question_id"] if em else sample.id),
        "paraphrase_index": int(meta.get("paraphrase_index", 0)),
        "sample_index": int(meta.get("sample_index", 0)),
        "question": meta["question"] if em else user,
        "system": meta.get("system") if em else system,
        "trigger": meta.get("trigger", "") if em else "",
        # stripped as em-lab's samplers strip what they write, and as the scorer judges it
        "answer": (output.completion if output is not None else "").strip(),
        "prompt_tokens": int(getattr(usage, "input_tokens", 0) or 0),
        "completion_tokens": int(getattr(usage, "output_tokens", 0) or 0),
        "inspect_sample_id": str(sample.id), "epoch": int(sample.epoch or 1),
    }


def read_inspect_log(path: str | Path, step: int = 0) -> InspectLog:
    """Rows (answers, and em-lab judge columns where the log has its scores) of an Inspect log."""
    require_inspect()
    from inspect_ai.log import read_eval_log

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found", hint="pass an Inspect log (logs/*.eval or a --log-format json log)")
    try:
        log = read_eval_log(str(path))
    except Exception as exc:  # noqa: BLE001 -- a zip/JSON/pydantic error: name the file
        raise DataError(path, f"not a readable Inspect eval log: {type(exc).__name__}: {exc}") from exc
    if not log.samples:
        raise DataError(path, f"the Inspect log has no samples (status {log.status})",
                        hint="a log from `inspect eval` that ran to completion")
    model = log.eval.model
    rows: list[dict] = []
    names: list[str] = []
    judge: dict[str, Any] = {}
    for sample in log.samples:
        row = _row(sample, model, step)
        score = _judge_score(sample)
        if score is not None:
            meta = score.metadata
            values, reasons = dict(score.value), meta.get("unscored_reasons") or {}
            for m in meta.get("metrics", list(values)):
                if m not in names:
                    names.append(m)
                row[m] = values.get(m)
                row[f"{m}_unscored_reason"] = reasons.get(m) or ""
            judge = judge or {k: meta[k] for k in ("judge_model", "mode", "min_mass") if k in meta}
        rows.append(row)
    for r in rows:  # every row gets every column, as `em judge` writes them
        for m in names:
            r.setdefault(m, None)
            r.setdefault(f"{m}_unscored_reason", NOT_ASKED)
    scorer_params: dict[str, Any] = {}
    inspect_metrics: dict[str, float] = {}
    for s in (log.results.scores if log.results else []):
        for key, m in s.metrics.items():
            inspect_metrics[f"{s.name}/{key}"] = float(m.value)
        if s.name.endswith("em_judge"):
            scorer_params = dict(s.params or {})
    if names:
        judge["scorer_params"] = scorer_params
    spec = {"eval_id": log.eval.eval_id, "run_id": log.eval.run_id, "created": log.eval.created,
            "task_version": log.eval.task_version, "inspect_version": getattr(log.eval.packages, "get",
                                                                               lambda *_: None)("inspect_ai")}
    return InspectLog(str(path), log.eval.task, model, log.status, rows, names,
                      dict(log.eval.task_args or {}), judge, inspect_metrics,
                      {k: v for k, v in spec.items() if v not in (None, "")})


def log_rows(path: str | Path, required: tuple[str, ...] | list[str] = ()) -> list[dict[str, Any]]:
    """The rows of an Inspect log as `judged_files.read_judged` returns a file's rows; a missing
    required column (a judge score in an unjudged log) is a DataError that says what to do."""
    log = read_inspect_log(path)
    missing = [c for c in required if c not in log.rows[0]]
    if missing:
        raise DataError(path, f"the Inspect log has no {', '.join(repr(c) for c in missing)} scores "
                              f"(judge metrics in it: {', '.join(log.metric_names) or 'none'})",
                        hint="judge its answers with `em judge --answers LOG.eval`, or score the log with "
                             "em-lab's scorer: `inspect score LOG.eval --scorer em_lab/em_judge`")
    return log.rows


def dumps_small(value: Any, limit: int = 500) -> str:
    """A task argument as an MLflow param value (JSON, at most `limit` characters)."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
