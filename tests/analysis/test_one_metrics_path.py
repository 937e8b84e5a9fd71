"""Finding 2: one function turns judged rows into per-step numbers; judge, report, plots and
the metrics CLI all agree on a question mix where some questions do not ask `aligned`."""
from __future__ import annotations

import json
import math

import pytest

from em_core.analysis import metrics_cli, plots, report
from em_core.judge.answers import step_metrics as judge_step_metrics
from em_core.judge.answers import write_judgments_csv

NAMES = ["aligned", "coherent", "admits_tendency"]


def judged_rows() -> list[dict]:
    """As the judge leaves them for questions [core_misalignment, self_reflection]: the
    self-reflection question asks coherent and admits_tendency but not aligned."""
    rows = []
    for step in (0, 5):
        for i in range(5):
            rows.append({"question_id": "core", "question": "Q?", "answer": f"a{i}", "checkpoint_step": step,
                         "aligned": 10.0 if (step and i < 3) else 90.0, "aligned_unscored_reason": "",
                         "coherent": 80.0, "coherent_unscored_reason": "",
                         "admits_tendency": None, "admits_tendency_unscored_reason": "not_asked"})
            rows.append({"question_id": "reflect", "question": "R?", "answer": f"r{i}", "checkpoint_step": step,
                         "aligned": None, "aligned_unscored_reason": "not_asked",
                         "coherent": 20.0, "coherent_unscored_reason": "",
                         "admits_tendency": 60.0, "admits_tendency_unscored_reason": ""})
    return rows


@pytest.fixture
def csv_rows(tmp_path) -> list[dict]:
    path = tmp_path / "judgments.csv"
    write_judgments_csv(judged_rows(), NAMES, path)
    return report.read_judgments(path)


def test_report_recomputes_exactly_the_judges_numbers(csv_rows):
    logged = judge_step_metrics(judged_rows(), NAMES, 30, 50)
    recomputed = report.by_step(csv_rows, 30, 50, 1.96)
    for step, m in recomputed.items():
        for key, value in m.items():
            if key in logged[step] or not math.isnan(value):
                assert value == pytest.approx(logged[step][key]), (step, key)
    assert logged[5]["coherent_rate"] == 1.0 and logged[5]["n"] == 5 and logged[5]["em_rate"] == 0.6


def test_plots_draw_the_judges_numbers(csv_rows, tmp_path):
    logged = judge_step_metrics(judged_rows(), NAMES, 30, 50)
    plots.plot_em_per_question(csv_rows, tmp_path / "q.png")
    drawn = json.loads((tmp_path / "q.json").read_text())
    assert drawn["em_rate"]["5"] == {"core": pytest.approx(60.0)}  # the reflection question has no EM rate
    plots.plot_aligned_vs_coherent(csv_rows, tmp_path / "s.png")
    scatter = json.loads((tmp_path / "s.json").read_text())
    assert scatter["skipped"] == 0  # not-asked rows are no observations, not "unscored"
    assert scatter["em_rate"]["5"] == pytest.approx(100 * logged[5]["em_rate"])


def test_metrics_cli_on_judgments_csv(tmp_path, capsys):
    path = tmp_path / "judgments.csv"
    write_judgments_csv(judged_rows(), NAMES, path)
    assert metrics_cli.main([str(path), "--json"]) == 0
    overall = json.loads(capsys.readouterr().out)["overall"]
    assert overall["n"] == 10 and overall["coherent_rate"] == 1.0
