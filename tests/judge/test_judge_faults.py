"""A judge under injected faults (loopback server, 30% 429/500): one answer whose retries run
out no longer sinks the run; it is recorded as `api_error`, everything else is written, the run
ends FAILED with the count in its metrics, and a re-run pays only for the failed ones."""
from __future__ import annotations

import csv
import math

import mlflow
import pytest

from em_core.errors import JudgeError
from em_core.judge.answers import JudgeConfig, run_judge
from em_core.judge.scoring import API_ERROR

QUESTIONS = """\
- id: q
  type: free_form_judge_0_100
  paraphrases: ["How are you?"]
  judge_prompts:
    aligned: "ALIGNED {question} || {answer}"
    coherent: "COHERENT {question} || {answer}"
"""


def score_by_answer(prompt: str) -> list[tuple[str, float]]:
    """All mass on the number written in the answer ("a17" -> 17)."""
    k = int(prompt.rsplit("|| a", 1)[1].split()[0]) % 101
    return [(str(k), math.log(0.9)), (" " + str(k), math.log(0.1))]


def test_fault_rate_judge_returns_every_verdict_and_marks_the_lost_one(serve, judge_for):
    server = serve(responder=score_by_answer, fault_rate=0.3, always_fail_marker="a7 ")
    judge = judge_for(server, concurrency=8, max_retries=5)
    out = judge.judge([f"X || a{i} " for i in range(60)], progress=False)
    assert [j.unscored_reason for j in out] == [None] * 7 + [API_ERROR] + [None] * 52
    assert [j.score for j in out if j.scored] == pytest.approx([i for i in range(60) if i != 7])
    assert judge.stats["api_errors"] == 1 and judge.stats["final_retries"] == 1
    assert server.successes == 59  # nothing paid twice


def test_judge_run_writes_everything_fails_then_rerun_pays_only_the_rest(serve, mlflow_store, tmp_path):
    qfile = tmp_path / "q.yaml"
    qfile.write_text(QUESTIONS)
    answers = tmp_path / "answers.csv"
    n = 20
    with answers.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question_id", "question", "answer", "checkpoint_step"])
        w.writerows([["q", "How are you?", f"a{i} ", 5] for i in range(n)])
    cfg = dict(answers=str(answers), questions=[str(qfile)], backend="openai-compatible", judge_model="m",
               max_retries=5, backoff_base=0.01, retry_pause=0.05, concurrency=4,
               cache_path=str(tmp_path / "cache.sqlite"), run_name="faulty")
    server = serve(responder=score_by_answer, fault_rate=0.3, always_fail_marker="a3 ")
    with pytest.raises(JudgeError, match=r"2 judgment\(s\) got no verdict.*only the failed ones"):
        run_judge(JudgeConfig(base_url=server.base_url, **cfg))

    (run,) = mlflow.search_runs(experiment_names=["em-lab"], filter_string="attributes.run_name = 'faulty'",
                               output_format="list")
    assert run.info.status == "FAILED"
    assert run.data.metrics["judge/api_errors"] == 2  # aligned + coherent of answer a3
    assert run.data.metrics["unscored/aligned/api_error"] == 1
    rows = list(csv.DictReader(open(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="judgments.csv", dst_path=str(tmp_path / "dl")))))
    assert len(rows) == n
    for i, r in enumerate(rows):
        if i == 3:
            assert (r["aligned"], r["aligned_unscored_reason"]) == ("", API_ERROR)
            assert (r["coherent"], r["coherent_unscored_reason"]) == ("", API_ERROR)
        else:
            assert float(r["aligned"]) == pytest.approx(i) and float(r["coherent"]) == pytest.approx(i)
    assert server.successes == 2 * n - 2

    # the same server, recovered (the judge cache is per server)
    server.fault_rate, server.always_fail_marker = 0.0, None
    before = server.n_requests
    result = run_judge(JudgeConfig(base_url=server.base_url, **{**cfg, "run_name": "again"}))
    assert server.n_requests - before == 2  # only the two failed judgments are paid for
    assert result.stats["api_errors"] == 0 and result.stats["cache_hits"] == 2 * n - 2
