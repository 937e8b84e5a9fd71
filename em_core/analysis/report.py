"""Plots and the self-contained HTML report of a pipeline run (or of a judge run).

    em report RUN_ID              # writes the report, logs it to the run, prints where
    em report LOG.eval --out DIR  # the report of an Inspect log judged by em-lab's scorer, in DIR

Everything is recomputed from the judge's `judgments.csv`, so a report can be made for any
finished run later (e.g. with other thresholds) without touching the judge again.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from em_core import tags as em_tags
from em_core import tracking
from em_core.analysis import plots
from em_core.analysis.report_html import render_report, write_report
from em_core.errors import ConfigError
from em_core.metrics import (
    ALIGNED_THRESHOLD,
    BOUNDS_TEXT,
    COHERENT_THRESHOLD,
    DEFAULT_BOUNDS,
    DEFAULT_INTERVAL,
    STEP_VALUED_KEYS,
    Z_95,
    em_rows,
    emergence_intervals,
    emergence_step,
    per_question,
    step_metrics,
)

log = logging.getLogger(__name__)
PLOTS_DIR = "plots"
REPORT_DIR = "report"
SUMMARY_KEYS = ("n", "n_scored", "em_rate", "em_rate_lo", "em_rate_hi", "em_rate_clustered_lo",
                "em_rate_clustered_hi", "em_rate_deff", "em_rate_coherent", "coherent_rate", "coherent_rate_lo",
                "coherent_rate_hi", "coherent_rate_clustered_lo", "coherent_rate_clustered_hi", "coherent_rate_deff",
                "unscored_rate", "mean_aligned", "mean_coherent")
REFLECTION_METRIC = "admits_tendency"  # the self-reflection set's judge metric
COST_KEYS = ("cost_usd", "prompt_tokens", "completion_tokens", "requests", "cache_hits", "retries",
             "judged", "unscored")


@dataclass
class RunData:
    """What a report needs, gathered from MLflow."""

    run_id: str
    title: str
    rows: list[dict]
    aligned_threshold: float
    coherent_threshold: float
    z: float
    smoke_test: bool
    run_ids: dict[str, str]
    config_text: str
    provenance: dict[str, str]
    cost: dict[str, float]
    stages: list[dict] = field(default_factory=list)  # multi-stage runs: name, start_step, end_step, ...
    signals: dict[int, dict[str, float]] = field(default_factory=dict)  # probe/* and lora/all/* by step
    bounds: str = DEFAULT_BOUNDS
    interval: str = DEFAULT_INTERVAL  # the emergence rule's interval (metrics.emergence_intervals)
    judge_identity: dict = field(default_factory=dict)  # judge_identity.json of the judge run


def read_judgments(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["checkpoint_step"] = int(r.get("checkpoint_step") or 0)
    return rows


def _text_artifact(run_id: str | None, path: str) -> str:
    import mlflow

    if not run_id:
        return ""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")
    except MlflowException as e:
        if e.error_code != tracking.NOT_FOUND:
            raise
        log.warning("report: run %s has no %s; the report shows no such config", run_id, path)
        return ""


def gather(run_id: str) -> RunData:
    """Resolve a pipeline run (via its step run ids) or a judge run into RunData."""
    import mlflow

    tracking.configure_tracking()
    client = mlflow.MlflowClient()
    with tracking.missing_as(lambda: ConfigError(f"run {run_id}: not found in {mlflow.get_tracking_uri()}")):
        run = client.get_run(run_id)
    tags = run.data.tags
    ids = {k[3:-7]: v for k, v in tags.items() if k.startswith("em.") and k.endswith("_run_id")}
    judge_id = ids.get("judge") or (run_id if tags.get(em_tags.ENTRY_POINT) == "judge" else None)
    if not judge_id:
        raise ConfigError(f"run {run_id} is neither a pipeline nor a judge run (no em.judge_run_id tag); "
                          "pass the pipeline's parent run id or a judge run id")
    ids.setdefault("judge", judge_id)
    judge_run = client.get_run(judge_id)
    ids.setdefault("evaluate", judge_run.data.tags.get(em_tags.EVAL_RUN_ID, ""))
    ids.setdefault("train", judge_run.data.tags.get(em_tags.TRAIN_RUN_ID, ""))
    ids = {k: v for k, v in ids.items() if v and k in ("train", "evaluate", "judge", "pipeline")}
    stages = json.loads(tags.get(tracking.STAGES_TAG) or "[]")
    rows = []
    # A multi-stage run's rows come from every stage's judge run, at global steps.
    for st in stages or [{"name": "", "start_step": 0, "run_ids": {"judge": judge_id}}]:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(run_id=st["run_ids"]["judge"], artifact_path="judgments.csv",
                                                       dst_path=tmp)
            for r in read_judgments(path):
                r["checkpoint_step"] += int(st["start_step"])
                if st["name"]:
                    r["stage"] = st["name"]
                rows.append(r)

    jp = judge_run.data.params
    pp = run.data.params
    aligned = float(pp.get("pipeline.aligned_threshold", jp.get("judge.aligned_threshold", ALIGNED_THRESHOLD)))
    coherent = float(pp.get("pipeline.coherent_threshold", jp.get("judge.coherent_threshold", COHERENT_THRESHOLD)))
    z = float(pp.get("pipeline.z", jp.get("judge.z", Z_95)))
    smoke = (tags.get(em_tags.JUDGE_SMOKE_TEST) or judge_run.data.tags.get(em_tags.JUDGE_SMOKE_TEST)) == "true"

    provenance = {"report of run": run_id, **{f"{k} run": v for k, v in ids.items()}}
    train = client.get_run(ids["train"]) if ids.get("train") else None
    if train is not None:
        tp = train.data.params
        provenance.update({"base model": train.data.tags.get(em_tags.BASE_MODEL, ""),
                           "dataset": tp.get("data.name", ""), "dataset sha256": tp.get("data.sha256", ""),
                           "dataset sources": tp.get("data.sources", ""), "seed": tp.get("train.seed", "")})
    provenance.update({"judge backend": judge_run.data.tags.get(em_tags.JUDGE_BACKEND, ""),
                       "judge model": judge_run.data.tags.get(em_tags.JUDGE_MODEL, ""),
                       "code version": tags.get(em_tags.CODE_VERSION, ""),
                       "git commit": tags.get("mlflow.source.git.commit", ""),
                       "reused steps": tags.get(em_tags.REUSED_STEPS, "")})
    provenance = {k: v for k, v in provenance.items() if v}
    cost = {k: v for k, v in ((k, judge_run.data.metrics.get(f"judge/{k}")) for k in COST_KEYS) if v is not None}
    config_parts = [("pipeline", _text_artifact(run_id, "config/pipeline_config.yaml")),
                    ("train", _text_artifact(ids.get("train"), "config/train_config.yaml"))]
    config_text = "\n".join(f"# --- {name} config\n{text}" for name, text in config_parts if text)
    title = f"EM report: {run.info.run_name or run_id}"
    bounds = jp.get("judge.bounds", DEFAULT_BOUNDS)
    interval = pp.get("pipeline.interval", DEFAULT_INTERVAL)
    return RunData(run_id, title, rows, aligned, coherent, z, smoke, ids, config_text, provenance, cost, stages,
                   _signals(client, run), bounds, interval, _identity(judge_id))


def _identity(judge_run_id: str) -> dict:
    text = _text_artifact(judge_run_id, "judge_identity.json")
    return json.loads(text) if text else {}


def identity_rows(identity: dict) -> dict[str, str]:
    """judge_identity.json as the report's key/value table."""
    if not identity:
        return {}
    sc = identity.get("scoring", {})
    out = {"requested model": identity.get("requested_model", ""), "backend": identity.get("backend", ""),
           "mode": identity.get("mode", ""),
           "model(s) the API returned": ", ".join(f"{k} ({v})" for k, v in identity.get("served_models", {}).items())
           or "(not reported)",
           "system_fingerprint(s)": ", ".join(f"{k} ({v})" for k, v in
                                              identity.get("system_fingerprints", {}).items()) or "(not reported)",
           "prompt template sha256": identity.get("prompt_template_sha256", ""),
           "scoring": f"{sc.get('scoring', '')}, min_mass {sc.get('min_mass', '')}",
           "EM rule": sc.get("em_rule", ""), "rescored from": identity.get("rescored_from", "")}
    return {k: str(v) for k, v in out.items() if v not in ("", None)}


def sensitivity_rows(rows: list[dict], step: int) -> tuple[list[dict], list[dict]]:
    """EM rate (%) by aligned threshold (columns) x coherent threshold and bound convention (rows)."""
    from em_core.metrics import sensitivity_grid

    grid = sensitivity_grid([r for r in rows if r["checkpoint_step"] == step])
    out: dict[tuple, dict] = {}
    for g in grid:
        row = out.setdefault((g["bounds"], g["coherent_threshold"]),
                             {"bounds": g["bounds"], "coherent >": f"{g['coherent_threshold']:g}"})
        row[f"aligned {'<=' if g['bounds'] == 'inclusive' else '<'} {g['aligned_threshold']:g}"] = (
            100 * g["em_rate"] if not math.isnan(g["em_rate"]) else math.nan)
    return list(out.values()), grid


SIGNAL_KEYS = ("probe_emergence_step", "lora_transition_step", "lora/all/turn_deg", "lora/all/rotation_deg")


def is_phase_or_direction_signal(key: str) -> bool:
    """The Model Organisms phase metrics of the whole adapter and the direction monitor's curves."""
    return (key.startswith(("lora/all/local_cos_k", "lora_local_cos_step_")) or key == "lora/all/composition"
            or (key.startswith("direction/") and key.endswith(("/projection", "/projection_se", "/emergence_step"))))


def _signals(client, run) -> dict[int, dict[str, float]]:
    """The judge-free signals a pipeline run carries (probe margins, LoRA angles), by step."""
    out: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        if key in SIGNAL_KEYS or key in STEP_VALUED_KEYS or is_phase_or_direction_signal(key) or (
                key.startswith("probe/") and key.endswith(("/margin", "/margin_se", "/margin_se_clustered"))):
            for m in client.get_metric_history(run.info.run_id, key):
                out.setdefault(int(m.step), {})[key] = m.value
    return out


def signal_notes(steps_metrics: dict[int, dict[str, float]], signals: dict[int, dict[str, float]]) -> list[str]:
    """Report lines on the probe: agreement with the judge (Spearman over checkpoints) per set."""
    from em_core.metrics import spearman

    notes = []
    sets = sorted({k.split("/")[1] for m in signals.values() for k in m if k.endswith("/margin")})
    for name in sets:
        common = [s for s in sorted(steps_metrics) if f"probe/{name}/margin" in signals.get(s, {})
                  and not math.isnan(steps_metrics[s].get("em_rate", math.nan))]
        rho = spearman([steps_metrics[s]["em_rate"] for s in common],
                       [signals[s][f"probe/{name}/margin"] for s in common])
        notes.append(f"Judge vs probe agreement ({name} set): Spearman rho = "
                     + (f"{rho:+.2f}" if not math.isnan(rho) else "undefined")
                     + f" between EM rate and probe margin over {len(common)} checkpoints.")
    return notes


def by_step(rows: list[dict], aligned: float, coherent: float, z: float) -> dict[int, dict[str, float]]:
    """The judge's per-step numbers, recomputed by the same function (metrics.step_metrics)."""
    return step_metrics(rows, aligned, coherent, z)


def _question_rows(rows: list[dict], steps: list[int], d: RunData) -> list[dict]:
    """Per question: EM rate at the base and final step, so the table shows what changed."""
    if not steps:
        return []
    first, last = steps[0], steps[-1]
    at = {s: per_question(em_rows(r for r in rows if r["checkpoint_step"] == s), d.aligned_threshold,
                          d.coherent_threshold, d.z) for s in {first, last}}
    out = []
    for qid in at[last]:
        row = {"question_id": qid}
        if first != last and qid in at[first]:
            row[f"em_rate (step {first})"] = at[first][qid]["em_rate"]
        q = at[last][qid]
        row.update({f"em_rate (step {last})": q["em_rate"], "em_rate_lo": q["em_rate_lo"],
                    "em_rate_hi": q["em_rate_hi"], "mean_aligned": q["mean_aligned"],
                    "coherent_rate": q["coherent_rate"], "n": q["n"]})
        out.append(row)
    return out


def make_artifacts(d: RunData, out_dir: Path) -> dict[str, Path]:
    """Plots, examples (PNG + Markdown) and report.html in `out_dir`; returns name -> path."""
    steps_metrics = step_metrics(d.rows, d.aligned_threshold, d.coherent_threshold, d.z, d.bounds)
    steps = sorted(steps_metrics)
    emerged = emergence_step({s: (int(m["n_em"]), int(m["n_scored"])) for s, m in steps_metrics.items()}, d.z,
                             intervals=emergence_intervals(steps_metrics, d.interval))
    p = out_dir / PLOTS_DIR
    thresholds = {"aligned_threshold": d.aligned_threshold, "coherent_threshold": d.coherent_threshold,
                  "smoke_test": d.smoke_test}  # every figure of a smoke-test judge carries the mark
    files = {
        "EM and coherence vs training step": plots.plot_em_vs_step(
            steps_metrics, p / "em_vs_step.png", title="EM rate by checkpoint", emergence_step=emerged,
            smoke_test=d.smoke_test, stages=d.stages),
        "Aligned vs coherent per checkpoint": plots.plot_aligned_vs_coherent(
            d.rows, p / "aligned_vs_coherent.png", title="Judge scores per answer", **thresholds),
        "EM rate per question": plots.plot_em_per_question(
            d.rows, p / "em_per_question.png", title="EM rate per question", **thresholds),
    }
    triggers = {r.get("trigger") or "" for r in d.rows}
    if len(triggers) > 1 or any(r.get(REFLECTION_METRIC) not in (None, "") for r in d.rows):
        files["EM by trigger condition and self-reflection"] = plots.plot_conditions(
            d.rows, p / "em_by_trigger.png", reflection_metric=REFLECTION_METRIC, stages=d.stages, **thresholds)
    if d.signals:
        # every stage's (a multi-stage run logs one per stage, each at its global step)
        found: dict[str, list[int]] = {}
        for step in sorted(d.signals):
            for k in ("probe_emergence_step", "lora_transition_step"):
                if k in d.signals[step]:
                    found.setdefault(k, []).append(step)
        signals = {s: {**steps_metrics.get(s, {}), **d.signals.get(s, {})} for s in set(steps_metrics) | set(d.signals)}
        files["EM (judge), probe margins and LoRA rotation vs training step"] = plots.plot_signals_vs_step(
            signals, p / "signals_vs_step.png", title="Judge and judge-free EM signals", em_emergence_step=emerged,
            probe_emergence_step=found.get("probe_emergence_step"),
            lora_transition_step=found.get("lora_transition_step"), stages=d.stages, smoke_test=d.smoke_test)
    sens_table, sens_grid, sens_note = [], [], None
    if steps:
        sens_table, sens_grid = sensitivity_rows(d.rows, steps[-1])
        rates = [g["em_rate"] for g in sens_grid if not math.isnan(g["em_rate"])]
        if rates:
            files["EM rate by threshold and bound convention (final checkpoint)"] = plots.plot_sensitivity(
                sens_grid, p / "sensitivity.png", step=steps[-1], smoke_test=d.smoke_test,
                mark=(d.aligned_threshold, d.coherent_threshold))
            sens_note = (f"Threshold sensitivity at the final checkpoint (step {steps[-1]}): over aligned thresholds "
                         "20-40 x coherent thresholds 40-60 and both bound conventions, the EM rate ranges from "
                         f"{min(rates):.1%} to {max(rates):.1%} (a spread of {max(rates) - min(rates):.1%}; "
                         f"{steps_metrics[steps[-1]].get('em_rate', math.nan):.1%} at the thresholds in use).")
    examples = plots.select_examples(d.rows, steps=None)
    files["Example answers"] = plots.plot_examples(examples, p / "examples.png", title="Example answers", **thresholds)
    md = out_dir / REPORT_DIR / "examples.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    smoke_note = f"> **{plots.SMOKE_TEXT}**\n\n" if d.smoke_test else ""
    md.write_text(smoke_note + plots.examples_markdown(examples), encoding="utf-8")

    summary_rows = [{"step": s, **{k: steps_metrics[s].get(k, math.nan) for k in SUMMARY_KEYS}} for s in steps]
    notes = [f"EM = {BOUNDS_TEXT[d.bounds].format(a=d.aligned_threshold, c=d.coherent_threshold)}, among "
             f"answers scored on both; intervals are Wilson score intervals (z = {d.z:g}), and beside them "
             "question-clustered ones (Wilson at the effective sample size n / deff, deff the design effect from "
             "the cluster-robust variance over questions, floored at 1).",
             f"Emergence step ({d.interval} intervals): the first checkpoint whose EM-rate lower bound is above the "
             "base model's (step 0) upper bound: " + (f"step {emerged}." if emerged is not None else
                                                     "EM never emerged significantly in this run.")]
    if sens_note:
        notes.append(sens_note)
    if d.signals:
        notes += signal_notes(steps_metrics, d.signals)
    for st in d.stages:
        before, end = st.get("em_rate_before"), st.get("em_rate_end")
        if before is not None and end is not None:
            notes.append(f"Stage {st['name']} (steps {st['start_step']}-{st['end_step']}): EM rate "
                         f"{before:.1%} at its start, {end:.1%} at its end (drop {before - end:+.1%}).")
    warning = None
    if d.smoke_test:
        from em_core.judge.answers import SMOKE_TEST_NOTE

        warning = "Smoke test: " + SMOKE_TEST_NOTE + "."
    html = render_report(d.title, notes=notes, summary_rows=summary_rows,
                         per_question_rows=_question_rows(d.rows, steps, d), examples=examples,
                         images={k: v for k, v in files.items()}, config_text=d.config_text,
                         provenance=d.provenance, cost=d.cost, warning=warning,
                         tables={"Threshold sensitivity: EM rate (%) at the final checkpoint": sens_table},
                         judge_identity=identity_rows(d.judge_identity))
    for name, png in list(files.items()):  # the data behind each figure, logged beside it
        if png.suffix == ".png" and png.with_suffix(".json").exists():
            files[f"{name} (data)"] = png.with_suffix(".json")
    files["report"] = write_report(out_dir / REPORT_DIR / "report.html", html)
    files["examples markdown"] = md
    return files


def gather_inspect_log(path: str | Path) -> RunData:
    """RunData of an Inspect log judged by em-lab's Inspect scorer (no MLflow run involved)."""
    from em_core.data.inspect_logs import log_rows, read_inspect_log

    log_rows(path, required=("aligned", "coherent"))  # an unjudged log: a clear error first
    lg = read_inspect_log(path)
    provenance = {"Inspect log": str(path), "task": lg.task, "model": lg.model,
                  "judge backend": "inspect", "judge model": str(lg.judge.get("judge_model", "")),
                  **{f"inspect {k}": str(v) for k, v in lg.spec.items()}}
    return RunData(str(path), f"EM report: {lg.task} ({lg.model}), Inspect log", lg.rows, ALIGNED_THRESHOLD,
                   COHERENT_THRESHOLD, Z_95, False, {}, "", {k: v for k, v in provenance.items() if v}, {})


def publish_log(path: str | Path, out_dir: str | Path) -> Path:
    """The report of an Inspect log, written to `out_dir`; returns the report.html path."""
    files = make_artifacts(gather_inspect_log(path), Path(out_dir))
    return files["report"]


def publish(run_id: str, out_dir: str | Path | None = None) -> str:
    """Make the plots and report for `run_id` and log them to that run; returns the report URI."""
    import mlflow

    d = gather(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out_dir) if out_dir else Path(tmp)
        files = make_artifacts(d, root)
        client = mlflow.MlflowClient()
        for path in files.values():
            client.log_artifact(run_id, str(path), str(path.parent.relative_to(root)))
    uri = f"runs:/{run_id}/{REPORT_DIR}/report.html"
    log.info("report: %s", uri)
    return uri


def main(argv: list[str] | None = None) -> int:
    """`em report RUN_ID [--out DIR]`."""
    import argparse
    import sys

    from em_core.console import run_main

    def _report(args: list[str]) -> int:
        ap = argparse.ArgumentParser(prog="em report", description=__doc__.splitlines()[0])
        ap.add_argument("run_id", help="a pipeline (parent) run id or a judge run id, or an Inspect log "
                                       "(.eval) judged by em-lab's scorer")
        ap.add_argument("--out", help="also keep the files in this folder (an Inspect log's report: "
                                      "default <log name>-report/)")
        ns = ap.parse_args(args)
        from em_core.data.inspect_logs import is_inspect_log

        if is_inspect_log(ns.run_id):
            out = Path(ns.out) if ns.out else Path(f"{Path(ns.run_id).name.rsplit('.', 1)[0]}-report")
            print(f"local={publish_log(ns.run_id, out)}")
            return 0
        uri = publish(ns.run_id, ns.out)
        print(f"report={uri}" + (f" local={Path(ns.out) / REPORT_DIR / 'report.html'}" if ns.out else ""))
        return 0

    return run_main(_report, argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())

