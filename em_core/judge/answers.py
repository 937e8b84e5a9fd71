"""Judge answers files: prompts per metric, judgments.csv, EM metrics at each checkpoint step.

Input is an evaluate run (its `answers.jsonl`) or any CSV/JSONL with `question_id`,
`question`, `answer` (optionally `checkpoint_step`; absent means 0). Judge prompts come from
the question YAML. Metrics are logged at step = checkpoint step onto the judge run (plain names:
`em_rate`, ...). When the answers came from a training run's checkpoints they are also logged
onto that training run, namespaced by judge run (`judge_run/<judge run id>/em_rate`), because a
training run is judged by many judges and thresholds: plain names there would interleave them
at the same steps. Compare judge runs (or pipeline runs, which copy their judge's metrics).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from em_core import tags as em_tags
from em_core import tracking
from em_core.configs import RunGroup
from em_core.data.questions import Question
from em_core.errors import ConfigError, DataError, JudgeError
from em_core.judge.provenance import (
    IDENTITY_ARTIFACT,
    RAW_ARTIFACT,
    SENSITIVITY_ARTIFACT,
    judge_identity,
    raw_entry,
    sensitivity_step,
    sensitivity_table,
    write_raw_jsonl,
)
from em_core.judge.scoring import API_ERROR
from em_core.metrics import (
    ALIGNED_THRESHOLD,
    BOUNDS,
    COHERENT_THRESHOLD,
    DEFAULT_BOUNDS,
    NOT_ASKED,
    Z_95,
    summarize_judged,
    to_mlflow,
)
from em_core.openai_api import safe_url
from em_core.paths import cache_dir
from em_core.progress import hidden as progress_hidden
from em_core.progress import one_bar

log = logging.getLogger(__name__)
ANSWER_COLUMNS = ("question_id", "question", "answer")
SMOKE_TEST_NOTE = ("the judge is the tiny offline model: its scores are a smoke test of the "
                   "pipeline, not a measurement of misalignment")


@dataclass
class JudgeConfig(RunGroup):
    """Which answers, which judge prompts, which judge, which thresholds."""

    questions: list[str] = field(default_factory=lambda: ["core_misalignment"],
                                 metadata={"help": "question YAML(s) holding the judge prompts"})
    judges_path: str | None = None
    eval_run_id: str | None = field(default=None, metadata={"help": "an evaluate run to judge"})
    answers: str | None = field(default=None, metadata={"help": "or a CSV/JSONL with question_id, question, answer"})
    metrics: list[str] | None = field(default=None, metadata={"help": "only these judge metrics (default: all)"})
    backend: str = field(default="auto", metadata={"help": "auto (openai if OPENAI_API_KEY is set, else local), "
                                                           "openai, openai-compatible, azure, local"})
    judge_model: str | None = field(default=None, metadata={"help": "default gpt-4o-2024-08-06 (openai), tiny (local)"})
    base_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible server (e.g. http://localhost:8000/v1; default OPENAI_BASE_URL) or the Azure "
                "resource endpoint (default AZURE_OPENAI_ENDPOINT)"})
    api_version: str | None = field(default=None, metadata={
        "help": "backend azure: the API version (default OPENAI_API_VERSION or 2024-10-21); judge_model is the deployment"})
    mode: str = field(default="logprobs", metadata={"help": "logprobs (papers' rule) or text (reasoning models)"})
    concurrency: int = 16
    max_retries: int = 5
    backoff_base: float = field(default=1.0, metadata={"help": "first retry delay (s); doubles per attempt"})
    retry_pause: float = field(default=30.0, metadata={
        "help": "pause (s) before the one last retry of requests that used up their retries"})
    timeout: float = 60.0
    min_mass: float = 0.25
    max_completion_tokens: int | None = field(default=None, metadata={
        "help": "mode text: reply budget per judgment (default 512; 4096 for reasoning models)"})
    cache_path: str | None = field(default=None, metadata={"help": "default <cache>/judge_cache.sqlite"})
    aligned_threshold: float = ALIGNED_THRESHOLD
    coherent_threshold: float = COHERENT_THRESHOLD
    bounds: str = field(default=DEFAULT_BOUNDS, metadata={
        "help": "EM bound convention: inclusive (aligned <= t_a, Turner et al.; default) or exclusive "
                "(aligned < t_a, Betley et al.); coherent > t_c in both"})
    z: float = field(default=Z_95, metadata={"help": "Wilson interval z of the logged *_lo/*_hi"})
    bad_trigger: str | None = field(default=None, metadata={
        "help": "trigger_gap = EM with this tag minus EM without (default: the answers' only tag)"})
    log_to_train_run: bool = field(default=True, metadata={
        "help": "also log the metrics onto the training run, as judge_run/<this run id>/<metric>"})

    def __post_init__(self) -> None:
        if bool(self.eval_run_id) == bool(self.answers):
            raise ConfigError("judge: give exactly one of eval_run_id (an evaluate run) or answers (a file)")
        from em_core.judge.backends import judge_backends

        if self.backend != "auto" and self.backend not in judge_backends():
            raise ConfigError(f"backend: unknown {self.backend!r}; use auto, {', '.join(judge_backends())}")
        if self.bounds not in BOUNDS:
            raise ConfigError(f"bounds: unknown {self.bounds!r}; use {' or '.join(BOUNDS)}")

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "openai" if os.environ.get("OPENAI_API_KEY") else "local"

    def smoke_test(self) -> bool:
        """Judged by the tiny model: the scores test the plumbing, they measure nothing."""
        from em_core.models.tiny import is_tiny

        return self.resolved_backend() == "local" and is_tiny(self.judge_model or "tiny")


@dataclass
class JudgeResult:
    run_id: str | None
    judgments_path: str
    steps: list[int]
    metrics_by_step: dict[int, dict[str, float]]
    stats: dict
    smoke_test: bool


def read_answers(path: str | Path) -> list[dict]:
    from em_core.data.judged_files import read_judged

    rows = read_judged(path, required=ANSWER_COLUMNS)
    for i, r in enumerate(rows, start=1):
        step = r.get("checkpoint_step")
        try:
            r["checkpoint_step"] = int(step) if step not in (None, "") else 0
        except (TypeError, ValueError):
            raise DataError(str(path), f"checkpoint_step {step!r} is not an integer", i) from None
        if not isinstance(r["answer"], str):
            r["answer"] = "" if r["answer"] is None else str(r["answer"])
    return rows


def build_judge(cfg: JudgeConfig):
    from em_core.judge.backends import make_judge

    backend = cfg.resolved_backend()
    model = cfg.judge_model or ("tiny" if backend == "local" else None)
    return make_judge(backend, model, base_url=cfg.base_url, mode=cfg.mode, concurrency=cfg.concurrency,
                      max_retries=cfg.max_retries, timeout=cfg.timeout, min_mass=cfg.min_mass,
                      backoff_base=cfg.backoff_base, final_retry_pause=cfg.retry_pause,
                      max_completion_tokens=cfg.max_completion_tokens,
                      cache_path=cfg.cache_path or cache_dir() / "judge_cache.sqlite",
                      endpoint_settings={"api_version": cfg.api_version} if cfg.api_version else None)


def judge_rows(rows: list[dict], questions: list[Question], judge, metrics: list[str] | None = None,
               raws: dict[int, dict[str, dict]] | None = None) -> list[str]:
    """Add `<metric>` and `<metric>_unscored_reason` to every row in place; returns metric names.
    With `raws`, also what each verdict came from: raws[row index][metric] = {kind, labels, raw,
    served_model, system_fingerprint} (see judge.provenance)."""
    by_id = {q.id: q for q in questions}
    unknown = sorted({r["question_id"] for r in rows} - set(by_id))
    if unknown:
        raise DataError("answers", f"question ids not in the question file(s): {', '.join(unknown[:10])}",
                        hint="pass the question YAML the answers were generated from with --questions")
    # (metric, kind, labels) -> row indices; one judge call per group keeps kinds consistent.
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        q = by_id[r["question_id"]]
        for metric in q.metrics:
            if metrics and metric not in metrics:
                continue
            mk = q.judge_kinds[metric]
            groups[(metric, mk.kind, mk.labels)].append(i)
    names: list[str] = []
    # one bar over every judgment of the step; the backend's per-metric bars stay hidden inside it
    with one_bar(None, desc="judge", total=sum(len(idx) for idx in groups.values()), unit="judgment") as bar:
        for (metric, kind, labels), idx in groups.items():
            if metric not in names:
                names.append(metric)
            prompts = [by_id[rows[i]["question_id"]].judge_prompt(metric, rows[i]["question"], rows[i]["answer"])
                       for i in idx]
            verdicts = judge.judge(prompts, kind="categorical" if kind == "categorical" else "0_100",
                                   labels=list(labels) if kind == "categorical" else None,
                                   progress=not progress_hidden())
            for i, v in zip(idx, verdicts):
                rows[i][metric] = v.label if kind == "categorical" else v.score
                rows[i][f"{metric}_unscored_reason"] = v.unscored_reason or ""
                if raws is not None:
                    raws.setdefault(i, {})[metric] = raw_entry(v, kind, labels)
            bar.update(len(idx))
    for r in rows:  # every row gets every column, even for metrics its question lacks
        for m in names:
            r.setdefault(m, None)
            r.setdefault(f"{m}_unscored_reason", NOT_ASKED)
    return names


def trigger_label(tag: str | None) -> str:
    """A trigger condition as it appears in metric names: `none`, or the tag with the characters
    MLflow forbids in names removed (`|ALPHA|` -> `ALPHA`)."""
    if not tag:
        return "none"
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "", tag).strip() or "tag"


def step_metrics(rows: list[dict], metric_names: list[str], aligned_threshold: float,
                 coherent_threshold: float, bad_trigger: str | None = None, z: float = Z_95,
                 bounds: str = DEFAULT_BOUNDS) -> dict[int, dict[str, float]]:
    """Per checkpoint step: EM metrics, plus label shares of categorical metrics and means of
    other 0-100 metrics, plus counts of unscored judgments by reason.

    Answers sampled under several trigger conditions also get every metric per condition as
    `<metric>/trigger:<label>`, and `trigger_gap` = EM rate with `bad_trigger` (default: the only
    tag) minus EM rate without a tag.
    """
    out: dict[int, dict[str, float]] = {}
    conditions = sorted({r.get("trigger") or "" for r in rows})
    gap_tag = bad_trigger if bad_trigger is not None else next(iter(c for c in conditions if c), None)
    if bad_trigger is not None and bad_trigger not in conditions:
        raise ConfigError(f"bad_trigger {bad_trigger!r} is not among the answers' trigger conditions "
                          f"{[trigger_label(c) for c in conditions]}")
    for step in sorted({r["checkpoint_step"] for r in rows}):
        sub = [r for r in rows if r["checkpoint_step"] == step]
        m = _metrics(sub, metric_names, aligned_threshold, coherent_threshold, z, bounds)
        if len(conditions) > 1:
            per = {c: _metrics([r for r in sub if (r.get("trigger") or "") == c], metric_names, aligned_threshold,
                               coherent_threshold, z, bounds) for c in conditions}
            for c, pm in per.items():
                m.update({f"{k}/trigger:{trigger_label(c)}": v for k, v in pm.items()})
            if "" in per and gap_tag and "em_rate" in per[""] and "em_rate" in per.get(gap_tag, {}):
                m["trigger_gap"] = per[gap_tag]["em_rate"] - per[""]["em_rate"]
        out[step] = m
    return out


def _metrics(sub: list[dict], metric_names: list[str], aligned_threshold: float,
             coherent_threshold: float, z: float = Z_95, bounds: str = DEFAULT_BOUNDS) -> dict[str, float]:
    m: dict[str, float] = {}
    if sub:
        if "aligned" in metric_names or "coherent" in metric_names:
            # the shared definition (metrics.summarize_judged): report and plots recompute the same
            m.update(summarize_judged(sub, aligned_threshold, coherent_threshold, z, bounds))
        for name in metric_names:
            asked = [r for r in sub if r[f"{name}_unscored_reason"] != NOT_ASKED]
            reasons = Counter(r[f"{name}_unscored_reason"] for r in asked if r[f"{name}_unscored_reason"])
            for reason, n in reasons.items():
                m[f"unscored/{name}/{reason}"] = float(n)
            values = [r[name] for r in asked if r[name] is not None]
            if name in ("aligned", "coherent") or not values:
                continue
            if isinstance(values[0], str):
                for label, n in Counter(values).items():
                    m[f"{name}/{label}_rate"] = n / len(values)
            else:
                m[f"mean_{name}"] = sum(values) / len(values)
    return {k: v for k, v in m.items() if not (isinstance(v, float) and math.isnan(v))}


def write_judgments_csv(rows: list[dict], metric_names: list[str], path: Path) -> None:
    cols = ["question_id", "question", "answer", "checkpoint_step"]
    for m in metric_names:
        cols += [m, f"{m}_unscored_reason"]
    extra = [k for k in ("checkpoint", "paraphrase_index", "sample_index", "system", "trigger", "model") if k in rows[0]]
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + extra, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def run_judge(cfg: JudgeConfig) -> JudgeResult:
    import mlflow

    from em_core.data.questions import load_question_sets

    questions = load_question_sets(cfg.questions, cfg.judges_path)
    tracking.configure_tracking()
    train_run_id = None
    if cfg.eval_run_id:
        with tracking.missing_as(lambda: ConfigError(
                f"eval_run_id {cfg.eval_run_id}: no such run, or it has no answers.jsonl (not an evaluate run?)")):
            eval_run = mlflow.MlflowClient().get_run(cfg.eval_run_id)
            path = mlflow.artifacts.download_artifacts(run_id=cfg.eval_run_id, artifact_path="answers.jsonl")
        train_run_id = eval_run.data.tags.get(em_tags.TRAIN_RUN_ID)
        rows = read_answers(path)
    else:
        rows = read_answers(cfg.answers)
    backend = cfg.resolved_backend()
    judge = build_judge(cfg)
    smoke = cfg.smoke_test()
    if smoke:  # a pipeline has said so already, once
        log.log(logging.INFO if tracking.child_run_name() else logging.WARNING, "%s", SMOKE_TEST_NOTE)
    tags = {em_tags.ENTRY_POINT: "judge", em_tags.JUDGE_BACKEND: backend, em_tags.JUDGE_MODEL: judge.model,
            em_tags.JUDGE_SMOKE_TEST: str(smoke).lower()}
    if cfg.eval_run_id:
        tags[em_tags.EVAL_RUN_ID] = cfg.eval_run_id
    if train_run_id:
        tags[em_tags.TRAIN_RUN_ID] = train_run_id
    name = cfg.run_name or tracking.child_run_name() or tracking.descriptive_name(
        "judge", tracking.model_label(judge.model))
    try:
        with tempfile.TemporaryDirectory() as tmp, tracking.tracked_run(cfg.experiment_name, name, tags=tags) as run:
            if run is not None:
                tracking.log_params("judge", {**asdict(cfg), "backend": backend, "judge_model": judge.model,
                                              "base_url": safe_url(cfg.base_url)})
                if smoke:
                    mlflow.set_tag(em_tags.NOTE, SMOKE_TEST_NOTE)
            raws: dict[int, dict[str, dict]] = {}
            names = judge_rows(rows, questions, judge, cfg.metrics, raws)
            by_step = step_metrics(rows, names, cfg.aligned_threshold, cfg.coherent_threshold, cfg.bad_trigger, cfg.z,
                                   cfg.bounds)
            out = Path(tmp) / "judgments.csv"
            write_judgments_csv(rows, names, out)
            # what every verdict came from, who gave it, and how it was read: `em rescore` needs
            # nothing else (and no request) to re-derive the scores under other settings
            write_raw_jsonl(rows, raws, Path(tmp) / RAW_ARTIFACT)
            identity = judge_identity(judge, questions, names, raws, scoring="weighted", min_mass=cfg.min_mass,
                                      aligned_threshold=cfg.aligned_threshold,
                                      coherent_threshold=cfg.coherent_threshold, bounds=cfg.bounds,
                                      base_url=safe_url(cfg.base_url))
            (Path(tmp) / IDENTITY_ARTIFACT).write_text(json.dumps(identity, indent=1, sort_keys=True), encoding="utf-8")
            sens = sensitivity_table(rows, Path(tmp))
            stats = judge.stats
            final = str(out)
            if run is not None:
                mlflow.log_artifact(str(out))
                for extra in (RAW_ARTIFACT, IDENTITY_ARTIFACT, *SENSITIVITY_ARTIFACT):
                    mlflow.log_artifact(str(Path(tmp) / extra))
                mlflow.set_tags(identity_tags(identity))
                if sens:
                    mlflow.log_metrics(sens, step=sensitivity_step(rows))
                log_metrics_to_run(run.info.run_id, by_step)
                usage = {f"judge/{k}": float(v) for k, v in stats.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
                mlflow.log_metrics(usage)
                if train_run_id and cfg.log_to_train_run and not stats["api_errors"]:  # never an incomplete curve
                    log_metrics_to_run(train_run_id, by_step, prefix=train_run_prefix(run.info.run_id))
                final = f"runs:/{run.info.run_id}/judgments.csv"
            log.info("judge usage: %s", stats)
            if stats["api_errors"]:  # everything is written; the run ends FAILED, the command non-zero
                raise JudgeError(
                    f"{stats['api_errors']} judgment(s) got no verdict: the judge server kept failing after "
                    f"{cfg.max_retries} retries and a final retry; they are in {final} as unscored "
                    f"'{API_ERROR}' (metric judge/api_errors). Run the same command again: every "
                    f"verdict received is cached, so only the failed ones are paid for")
            return JudgeResult(run.info.run_id if run else None, final, sorted(by_step), by_step, stats, smoke)
    finally:
        judge.close()


def identity_tags(identity: dict) -> dict[str, str]:
    """The judge identity as run tags (searchable in the MLflow UI)."""
    tags = {em_tags.JUDGE_PROMPT_SHA256: identity["prompt_template_sha256"],
            em_tags.JUDGE_SCORING: identity["scoring"]["scoring"], em_tags.JUDGE_BOUNDS: identity["scoring"]["bounds"]}
    for key, tag in (("served_models", em_tags.JUDGE_SERVED_MODEL), ("system_fingerprints", em_tags.JUDGE_SYSTEM_FINGERPRINT)):
        if identity.get(key):
            tags[tag] = ",".join(sorted(identity[key]))[:4000]
    return tags


def train_run_prefix(judge_run_id: str) -> str:
    """Where a judge's metrics live on the training run it judged: one namespace per judge run."""
    return f"judge_run/{judge_run_id}/"


def log_metrics_to_run(run_id: str, by_step: dict[int, dict[str, float]], prefix: str = "") -> None:
    """Add step-indexed metrics (summarize() keys) to a run, active or finished, under their MLflow
    names prefixed with `prefix`; counts equal at every step become `em.count.*` tags."""
    import mlflow
    from mlflow.entities import Metric

    named, count_tags = to_mlflow(by_step)
    now = int(time.time() * 1000)
    tracking.log_metric_batch(run_id, [Metric(prefix + k, float(v), now, step) for step, m in named.items()
                                       for k, v in m.items()])
    client = mlflow.MlflowClient()
    for k, v in count_tags.items():
        client.set_tag(run_id, prefix + k, v)
