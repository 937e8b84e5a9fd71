"""Re-derive a judge run's scores and EM metrics from its stored raw judge outputs.

    em rescore JUDGE_RUN [--aligned_threshold 30 --coherent_threshold 50 --bounds inclusive|exclusive
                          --scoring weighted|argmax --min_mass 0.25]

Zero API requests: the judge is never built; every score is re-read from `judgments_raw.jsonl`
(judge.provenance). The result is a new tracked run (entry point `judge`, so `em report`,
`em judge compare` and `em label` take it like any judge run) tagged `em.rescored_from` with the
original run id, carrying its own judgments.csv, metrics per checkpoint, sensitivity table and
heatmap. Defaults are the papers' settings, not the original run's, so a rescore says what it is.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from em_core import tags as em_tags
from em_core import tracking
from em_core.analysis import plots
from em_core.errors import ConfigError
from em_core.judge.answers import log_metrics_to_run, step_metrics, write_judgments_csv
from em_core.judge.provenance import (
    IDENTITY_ARTIFACT,
    RAW_ARTIFACT,
    SENSITIVITY_ARTIFACT,
    read_raw_jsonl,
    rescore_rows,
    scoring_settings,
    sensitivity_at_final,
    sensitivity_table,
)
from em_core.judge.scoring import DEFAULT_MIN_MASS, SCORINGS
from em_core.metrics import (
    ALIGNED_THRESHOLD,
    BOUNDS,
    COHERENT_THRESHOLD,
    DEFAULT_BOUNDS,
    Z_95,
)

log = logging.getLogger(__name__)
SENSITIVITY_PNG = "plots/sensitivity.png"
COPIED_TAGS = (em_tags.EVAL_RUN_ID, em_tags.TRAIN_RUN_ID, em_tags.JUDGE_BACKEND, em_tags.JUDGE_MODEL, em_tags.JUDGE_SMOKE_TEST,
               em_tags.NOTE, em_tags.JUDGE_PROMPT_SHA256, em_tags.JUDGE_SERVED_MODEL, em_tags.JUDGE_SYSTEM_FINGERPRINT)


@dataclass
class JudgeRunFiles:
    run_id: str
    run_name: str
    tags: dict[str, str]
    rows: list[dict]
    raw: list[dict]
    identity: dict


def judge_rows_of(path: str | Path) -> list[dict]:
    """judgments.csv rows as the judge wrote them (scores as floats, blanks as None)."""
    import csv

    from em_core.metrics import to_score

    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    metrics = [c[: -len("_unscored_reason")] for c in (rows[0] if rows else {}) if c.endswith("_unscored_reason")]
    for r in rows:
        r["checkpoint_step"] = int(r.get("checkpoint_step") or 0)
        for m in metrics:
            v = r.get(m)
            if v in (None, ""):
                r[m] = None
            elif to_score(v) is not None:
                r[m] = to_score(v)
    return rows


def metric_names(rows: list[dict]) -> list[str]:
    return [c[: -len("_unscored_reason")] for c in (rows[0] if rows else {}) if c.endswith("_unscored_reason")]


def load_judge_run(run_id: str, tmp: Path) -> JudgeRunFiles:
    """A judge run's judgments, raw outputs and identity. ConfigError naming the run when it is
    not a judge run, or was logged before raw outputs were kept."""
    import mlflow

    tracking.configure_tracking()
    client = mlflow.MlflowClient()
    with tracking.missing_as(lambda: ConfigError(f"run {run_id}: not found in {mlflow.get_tracking_uri()}")):
        run = client.get_run(run_id)
    names = {a.path for a in client.list_artifacts(run_id)}
    if "judgments.csv" not in names:
        raise ConfigError(f"run {run_id} ({run.info.run_name}) has no judgments.csv: not a judge run")
    if RAW_ARTIFACT not in names:
        raise ConfigError(
            f"judge run {run_id} ({run.info.run_name}) has no {RAW_ARTIFACT}: it was logged before em-lab kept "
            "the judge's raw outputs, so it cannot be rescored. Re-run the judge on the same answers "
            f"(em judge --eval_run_id {run.data.tags.get(em_tags.EVAL_RUN_ID, '<evaluate run>')} ...): every "
            "verdict already paid for is served from the judge cache at no cost, and the new run keeps them")
    rows = judge_rows_of(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="judgments.csv",
                                                             dst_path=str(tmp)))
    raw = read_raw_jsonl(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=RAW_ARTIFACT,
                                                             dst_path=str(tmp)))
    identity = {}
    if IDENTITY_ARTIFACT in names:
        identity = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=IDENTITY_ARTIFACT, dst_path=str(tmp))).read_text(encoding="utf-8"))
    return JudgeRunFiles(run_id, run.info.run_name or run_id, dict(run.data.tags), rows, raw, identity)


@dataclass
class RescoreResult:
    run_id: str | None
    source_run_id: str
    settings: dict
    metrics_by_step: dict[int, dict[str, float]]
    sensitivity: dict | None
    changed_scores: int


def rescore(run_id: str, *, aligned_threshold: float = ALIGNED_THRESHOLD,
            coherent_threshold: float = COHERENT_THRESHOLD, bounds: str = DEFAULT_BOUNDS,
            scoring: str = "weighted", min_mass: float = DEFAULT_MIN_MASS, z: float = Z_95,
            experiment_name: str | None = None, run_name: str | None = None) -> RescoreResult:
    """Rescore judge run `run_id` under the given settings into a new tracked run."""
    import mlflow

    if bounds not in BOUNDS:
        raise ConfigError(f"--bounds: unknown {bounds!r}; use {' or '.join(BOUNDS)}")
    if scoring not in SCORINGS:
        raise ConfigError(f"--scoring: unknown {scoring!r}; use {' or '.join(SCORINGS)}")
    if not 0.0 <= min_mass <= 1.0:
        raise ConfigError(f"--min_mass must be in [0, 1], got {min_mass}")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        src = load_judge_run(run_id, tmp / "src")
        rows = rescore_rows(src.rows, src.raw, scoring=scoring, min_mass=min_mass)
        names = metric_names(rows)
        changed = sum(1 for a, b in zip(src.rows, rows) for m in names if _differs(a.get(m), b.get(m)))
        by_step = step_metrics(rows, names, aligned_threshold, coherent_threshold, None, z, bounds)
        out = tmp / "out"
        out.mkdir()
        write_judgments_csv(rows, names, out / "judgments.csv")
        shutil.copy(tmp / "src" / RAW_ARTIFACT, out / RAW_ARTIFACT)
        settings = scoring_settings(scoring, min_mass, aligned_threshold, coherent_threshold, bounds)
        identity = {**src.identity, "scoring": settings, "rescored_from": run_id}
        (out / IDENTITY_ARTIFACT).write_text(json.dumps(identity, indent=1, sort_keys=True), encoding="utf-8")
        sens_metrics = sensitivity_table(rows, out)
        sens = sensitivity_at_final(rows)
        smoke = src.tags.get(em_tags.JUDGE_SMOKE_TEST) == "true"
        if sens:
            plots.plot_sensitivity(sens["grid"], out / SENSITIVITY_PNG, step=sens["step"], smoke_test=smoke,
                                   mark=(aligned_threshold, coherent_threshold))
        tags = {k: src.tags[k] for k in COPIED_TAGS if k in src.tags}
        tags.update({em_tags.ENTRY_POINT: "judge", em_tags.RESCORED_FROM: run_id, em_tags.JUDGE_SCORING: scoring,
                     em_tags.JUDGE_BOUNDS: bounds})
        experiment = experiment_name or _experiment_name(run_id)
        name = run_name or f"rescore-{src.run_name}-{scoring}-a{aligned_threshold:g}-c{coherent_threshold:g}-{bounds}"
        with tracking.tracked_run(experiment, name, tags=tags) as run:
            new_id = None
            if run is not None:
                new_id = run.info.run_id
                tracking.log_params("judge", {"aligned_threshold": aligned_threshold,
                                              "coherent_threshold": coherent_threshold, "bounds": bounds,
                                              "scoring": scoring, "min_mass": min_mass, "z": z,
                                              "rescored_from": run_id})
                for f in ("judgments.csv", RAW_ARTIFACT, IDENTITY_ARTIFACT, *SENSITIVITY_ARTIFACT):
                    mlflow.log_artifact(str(out / f))
                if sens:
                    mlflow.log_artifact(str(out / SENSITIVITY_PNG), "plots")
                    mlflow.log_artifact(str((out / SENSITIVITY_PNG).with_suffix(".json")), "plots")
                log_metrics_to_run(new_id, by_step)
                mlflow.log_metrics({**sens_metrics, "rescore/changed_scores": float(changed),
                                    "judge/requests": 0.0})
    log.info("rescored %s -> %s (%s; %d score(s) changed)", run_id, new_id, settings["em_rule"], changed)
    return RescoreResult(new_id, run_id, settings, by_step, sens, changed)


def _differs(a, b) -> bool:
    if a is None or b is None:
        return (a is None) != (b is None)
    if isinstance(a, str) or isinstance(b, str):
        return a != b
    return not math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)


def _experiment_name(run_id: str) -> str:
    import mlflow

    client = mlflow.MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="em rescore", description=__doc__.splitlines()[0])
    ap.add_argument("run_id", help="a judge run (or a rescore run)")
    ap.add_argument("--aligned_threshold", type=float, default=ALIGNED_THRESHOLD)
    ap.add_argument("--coherent_threshold", type=float, default=COHERENT_THRESHOLD)
    ap.add_argument("--bounds", choices=BOUNDS, default=DEFAULT_BOUNDS,
                    help="inclusive: aligned <= t_a (Turner et al.; default); exclusive: aligned < t_a "
                         "(Betley et al.); coherent > t_c in both")
    ap.add_argument("--scoring", choices=SCORINGS, default="weighted",
                    help="weighted: probability-weighted mean of the number tokens (the papers'); "
                         "argmax: the most probable number")
    ap.add_argument("--min_mass", type=float, default=DEFAULT_MIN_MASS)
    ap.add_argument("--z", type=float, default=Z_95)
    ap.add_argument("--experiment_name", default=None, help="default: the judge run's experiment")
    ap.add_argument("--run_name", default=None)
    ns = ap.parse_args(argv)
    res = rescore(ns.run_id, aligned_threshold=ns.aligned_threshold, coherent_threshold=ns.coherent_threshold,
                  bounds=ns.bounds, scoring=ns.scoring, min_mass=ns.min_mass, z=ns.z,
                  experiment_name=ns.experiment_name, run_name=ns.run_name)
    final = max(res.metrics_by_step) if res.metrics_by_step else None
    em = res.metrics_by_step.get(final, {}).get("em_rate", math.nan) if final is not None else math.nan
    print(f"rescore_run_id={res.run_id} from={res.source_run_id} rule=\"{res.settings['em_rule']}\" "
          f"scoring={ns.scoring} min_mass={ns.min_mass:g} final_step={final} em_rate={em:.4f} "
          f"changed_scores={res.changed_scores} requests=0")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`em rescore JUDGE_RUN [...]`."""
    import sys

    from em_core.console import run_main

    return run_main(_main, argv if argv is not None else sys.argv[1:])
