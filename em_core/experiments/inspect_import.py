"""`em import-inspect LOG.eval`: an Inspect evaluation recorded as em-lab's MLflow runs.

An evaluate run with what `em evaluate` logs (`answers.jsonl`, `answers/step_<step>.jsonl`, the
answers table, `eval/answers` and `eval/mean_completion_tokens` at the step, the `eval.*` params
and `em.base_model`/`em.steps` tags) plus the log itself under `inspect/`; and, when em-lab's
Inspect scorer judged the log (`em_lab/em_judge`), a judge run with what `em judge` logs
(`judgments.csv`, the EM metrics at the step by the same function, `judge.*` params, tags
`em.eval_run_id`, `em.judge_backend` = inspect, `em.judge_model`). Inspect's own metric values
are logged beside them as `inspect/<scorer>/<metric>` (they equal em-lab's by construction).
The imported runs compare with `em evaluate`/`em judge` runs in the MLflow UI, `em report
<judge run>` makes their report, and an unjudged log's evaluate run is judged with
`em judge --eval_run_id <id>`.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from em_core import tags as em_tags
from em_core import tracking
from em_core.console import run_main
from em_core.data.inspect_logs import InspectLog, dumps_small, read_inspect_log
from em_core.judge.answers import log_metrics_to_run, step_metrics, write_judgments_csv
from em_core.judge.provenance import SENSITIVITY_ARTIFACT, sensitivity_step, sensitivity_table
from em_core.metrics import ALIGNED_THRESHOLD, COHERENT_THRESHOLD, Z_95
from em_core.sample.evaluation import ANSWERS_DIR, _table, _write_jsonl

log = logging.getLogger(__name__)
INSPECT_DIR = "inspect"
ANSWER_KEYS = ("model", "checkpoint", "checkpoint_step", "question_id", "paraphrase_index", "sample_index",
               "question", "system", "trigger", "answer", "prompt_tokens", "completion_tokens",
               "inspect_sample_id", "epoch")


def _answers(rows: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in ANSWER_KEYS} for r in rows]


def _eval_params(lg: InspectLog) -> dict:
    args = lg.task_args
    triggers = args.get("triggers", "none")
    return {"model": lg.model, "questions": args.get("file") or lg.task.split("/")[-1],
            "judges_path": args.get("judges_path"), "samples_per_paraphrase": args.get("samples_per_paraphrase"),
            "system": args.get("system"), "triggers": triggers, "backend": "inspect",
            "n_prompts": len(lg.rows), **{f"inspect_{k}": v for k, v in lg.spec.items()},
            "inspect_task": lg.task, "inspect_task_args": dumps_small(args)}


def import_log(path: str | Path, *, experiment_name: str = "em-lab", run_name: str | None = None, step: int = 0,
               aligned_threshold: float = ALIGNED_THRESHOLD, coherent_threshold: float = COHERENT_THRESHOLD,
               z: float = Z_95) -> dict[str, object]:
    """Log one Inspect log as an evaluate run (and a judge run when it carries em-lab's scores);
    returns the run ids and the per-step metrics logged."""
    import mlflow

    lg = read_inspect_log(path, step=step)
    if lg.status != "success":
        log.warning("import-inspect: %s has status %s; importing its %d samples", path, lg.status, len(lg.rows))
    tracking.configure_tracking()
    label = tracking.model_label(lg.model)
    out: dict[str, object] = {"eval_run_id": None, "judge_run_id": None, "metrics_by_step": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        answers = _answers(lg.rows)
        tags = {em_tags.ENTRY_POINT: "evaluate", em_tags.SOURCE: "inspect", em_tags.INSPECT_LOG: str(path),
                em_tags.BASE_MODEL: lg.model, em_tags.STEPS: str(step)}
        with tracking.tracked_run(experiment_name, run_name or tracking.descriptive_name("evaluate", label, "inspect"),
                                  tags=tags) as run:
            tracking.log_params("eval", _eval_params(lg))
            step_file = tmpd / ANSWERS_DIR / f"step_{step:07d}.jsonl"
            step_file.parent.mkdir()
            _write_jsonl(step_file, answers)
            mlflow.log_artifact(str(step_file), ANSWERS_DIR)
            mlflow.log_table(_table(answers), artifact_file=f"tables/answers_step_{step:07d}.json")
            tokens = sum(r["completion_tokens"] for r in answers) / max(len(answers), 1)
            mlflow.log_metrics({"eval/answers": len(answers), "eval/mean_completion_tokens": tokens}, step=step)
            combined = tmpd / "answers.jsonl"
            _write_jsonl(combined, answers)
            mlflow.log_artifact(str(combined))
            mlflow.log_artifact(str(path), INSPECT_DIR)
            out["eval_run_id"] = run.info.run_id
        if not lg.judged:
            log.info("import-inspect: %s has no em-lab judge scores; judge it with `em judge --eval_run_id %s`",
                     path, out["eval_run_id"])
            return out
        judge_model = str(lg.judge.get("judge_model", ""))
        params = lg.judge.get("scorer_params", {})
        jtags = {em_tags.ENTRY_POINT: "judge", em_tags.SOURCE: "inspect", em_tags.EVAL_RUN_ID: str(out["eval_run_id"]),
                 em_tags.JUDGE_BACKEND: "inspect", em_tags.JUDGE_MODEL: judge_model, em_tags.JUDGE_SMOKE_TEST: "false",
                 em_tags.INSPECT_LOG: str(path)}
        name = tracking.descriptive_name("judge", tracking.model_label(judge_model) or "inspect", "inspect")
        with tracking.tracked_run(experiment_name, name, tags=jtags) as run:
            tracking.log_params("judge", {
                "questions": params.get("questions"), "judges_path": params.get("judges_path"),
                "metrics": params.get("metrics"), "backend": "inspect", "judge_model": judge_model,
                "mode": lg.judge.get("mode"), "min_mass": lg.judge.get("min_mass"),
                "aligned_threshold": aligned_threshold, "coherent_threshold": coherent_threshold, "z": z,
                "eval_run_id": out["eval_run_id"]})
            by_step = step_metrics(lg.rows, lg.metric_names, aligned_threshold, coherent_threshold, None, z)
            judged = tmpd / "judgments.csv"
            write_judgments_csv(lg.rows, lg.metric_names, judged)
            mlflow.log_artifact(str(judged))
            # the threshold-sensitivity table and its spread, as `em judge` logs them
            sens = sensitivity_table(lg.rows, tmpd)
            for extra in SENSITIVITY_ARTIFACT:
                mlflow.log_artifact(str(tmpd / extra))
            if sens:
                mlflow.log_metrics(sens, step=sensitivity_step(lg.rows))
            log_metrics_to_run(run.info.run_id, by_step)
            inspect_metrics = {f"inspect/{k}": v for k, v in lg.inspect_metrics.items()
                               if v == v}  # NaN left out, as em-lab's own metrics
            if inspect_metrics:
                mlflow.log_metrics(tracking_safe(inspect_metrics), step=step)
            out["judge_run_id"] = run.info.run_id
            out["metrics_by_step"] = by_step
    return out


def tracking_safe(metrics: dict[str, float]) -> dict[str, float]:
    """Metric names with the characters MLflow refuses replaced."""
    import re

    return {re.sub(r"[^A-Za-z0-9_\-. /]", "_", k): float(v) for k, v in metrics.items()}


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="em import-inspect", description=__doc__.splitlines()[0])
    p.add_argument("log", help="an Inspect eval log (logs/*.eval, or a --log-format json .json log)")
    p.add_argument("--experiment_name", default="em-lab")
    p.add_argument("--run_name", default=None, help="name of the evaluate run (default: evaluate-<model>-inspect-<id>)")
    p.add_argument("--step", type=int, default=0, help="checkpoint step the answers stand for (default 0)")
    p.add_argument("--aligned_threshold", type=float, default=ALIGNED_THRESHOLD)
    p.add_argument("--coherent_threshold", type=float, default=COHERENT_THRESHOLD)
    args = p.parse_args(argv)
    res = import_log(args.log, experiment_name=args.experiment_name, run_name=args.run_name, step=args.step,
                     aligned_threshold=args.aligned_threshold, coherent_threshold=args.coherent_threshold)
    for s, m in res["metrics_by_step"].items():  # type: ignore[union-attr]
        print(f"step {s:>6}: em_rate={m.get('em_rate', float('nan')):.3f} "
              f"em_rate_coherent={m.get('em_rate_coherent', float('nan')):.3f} "
              f"coherent_rate={m.get('coherent_rate', float('nan')):.3f} "
              f"unscored_rate={m.get('unscored_rate', float('nan')):.3f}")
    print(f"eval_run_id={res['eval_run_id']} judge_run_id={res['judge_run_id']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)
