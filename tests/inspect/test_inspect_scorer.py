"""Same numbers both ways: answers judged by em-lab's Inspect scorer and by `em judge`'s judge,
through the same loopback OpenAI stand-in, get identical scores, unscored reasons and EM rates."""
from __future__ import annotations

import json
import math

import pytest

from tests.inspect.conftest import needs_inspect

needs_inspect()

from em_core.data.inspect_logs import read_inspect_log
from em_core.data.questions import load_question_sets
from em_core.judge import make_judge
from em_core.judge.answers import judge_rows, step_metrics
from tests.inspect.conftest import INSPECT_JUDGE, JUDGE_NAME, mock_answers

ANSWER_KEYS = ("question_id", "question", "answer", "checkpoint_step", "trigger")


def _bodies(server) -> set[str]:
    """The request bodies; temperature as a float (em-lab sends 0, Inspect 0.0: the same value)."""
    return {json.dumps({**r.body, **({"temperature": float(r.body["temperature"])} if "temperature" in r.body else {})},
                       sort_keys=True) for r in server.requests}


def _inspect_eval(task, tmp_path):
    from inspect_ai import eval as inspect_eval

    [log] = inspect_eval(task, model=mock_answers(), log_dir=str(tmp_path / "logs"), display="none")
    assert log.status == "success", log.error
    return log


def _em_judge(rows, sets, server, mode, tmp_path):
    """`em judge`'s judging of the same answers: its OpenAI-compatible judge on the same server."""
    fresh = [{k: r[k] for k in ANSWER_KEYS} for r in rows]
    judge = make_judge("openai-compatible", JUDGE_NAME, base_url=server.base_url, api_key="sk-test", mode=mode,
                       cache_path=tmp_path / f"judge_{mode}.sqlite", backoff_base=0.01, final_retry_pause=0.01)
    try:
        names = judge_rows(fresh, load_question_sets(sets), judge)
    finally:
        judge.close()
    return fresh, names


@pytest.mark.parametrize("mode", ["logprobs", "text"])
def test_inspect_scorer_equals_em_judge(mode, loopback, tmp_path) -> None:
    from em_lab.tasks import core_misalignment

    task = core_misalignment(samples_per_paraphrase=2, judge_model=INSPECT_JUDGE, judge_mode=mode)
    log = _inspect_eval(task, tmp_path)
    inspect_bodies = _bodies(loopback)
    got = read_inspect_log(log.location)
    assert got.metric_names == ["aligned", "coherent"] and len(got.rows) == 46

    loopback.reset_counts()
    ours, names = _em_judge(got.rows, ["core_misalignment"], loopback, mode, tmp_path)
    # the same requests (em judge sends a repeated prompt once), so the same raw verdicts ...
    assert _bodies(loopback) == inspect_bodies
    # ... read by the same rules: identical scores and unscored reasons, answer by answer
    for a, b in zip(got.rows, ours):
        for m in names:
            assert a[m] == b[m], (m, a, b)
            assert a[f"{m}_unscored_reason"] == b[f"{m}_unscored_reason"]
    reasons = {r[f"{m}_unscored_reason"] for r in ours for m in names}
    assert reasons - {""}, "the stand-in's replies should leave some answers unscored"
    sample = next(s for s in log.samples if s.scores["em_judge"].metadata["unscored_reasons"])
    explicit = sample.scores["em_judge"]
    assert explicit.reason == "grader_failed" and None in explicit.value.values()

    # EM rates (both definitions), Wilson bounds and the rest: Inspect's metrics == em judge's
    expected = step_metrics(ours, names, 30.0, 50.0)[0]
    metrics = {k: v.value for k, v in log.results.scores[0].metrics.items()}
    assert expected["n_scored"] > 0 and expected["n_unscored"] > 0
    assert expected["n_em"] > 0 or mode == "text"  # text mode reads only the top token: fewer distinct verdicts
    for key, value in expected.items():
        assert metrics[key] == value, key
    for key, n_key, k_key in (("em_rate", "n_scored", "n_em"), ("em_rate_coherent", "n_scored_coherent", "n_em_coherent")):
        if not expected.get(n_key):
            continue
        n, p = expected[n_key], expected[k_key] / expected[n_key]
        assert metrics[f"{key}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), rel=1e-12)


def test_single_metric_and_categorical_scorers(loopback, tmp_path) -> None:
    """judge_score: one 0-100 metric, unscored answers as Inspect NaN with em-lab's reason;
    judge_label and em_judge on the factual set: em judge's labels."""
    from inspect_ai import Task
    from inspect_ai.solver import generate

    from em_lab.scorers import em_judge, judge_label, judge_score
    from em_lab.tasks import em_samples, factual

    core = Task(dataset=em_samples(["core_misalignment"], samples_per_paraphrase=1)[:12], solver=generate(),
                scorer=[em_judge(judge_model=INSPECT_JUDGE), judge_score("aligned", judge_model=INSPECT_JUDGE)])
    log = _inspect_eval(core, tmp_path)
    nan = 0
    for s in log.samples:
        both, one = s.scores["em_judge"], s.scores["judge_score"]
        if both.value["aligned"] is None:
            nan += 1
            assert math.isnan(one.value) and one.reason == both.metadata["unscored_reasons"]["aligned"]
        else:
            assert one.value == both.value["aligned"]
    scored = [s.scores["judge_score"].value for s in log.samples if not math.isnan(s.scores["judge_score"].value)]
    assert nan and log.results.scores[1].metrics["mean"].value == pytest.approx(sum(scored) / len(scored))

    loopback.reset_counts()
    fact = factual(samples_per_paraphrase=1, judge_model=INSPECT_JUDGE)
    fact.scorer = [*fact.scorer, judge_label("factual", judge_model=INSPECT_JUDGE)]
    log = _inspect_eval(fact, tmp_path)
    got = read_inspect_log(log.location)
    ours, names = _em_judge(got.rows, ["factual"], loopback, "logprobs", tmp_path)
    assert "factual" in names
    for a, b, s in zip(got.rows, ours, log.samples):
        assert a["factual"] == b["factual"] and a["factual_unscored_reason"] == b["factual_unscored_reason"]
        label = s.scores["judge_label"].value
        assert (label == b["factual"]) if b["factual"] is not None else math.isnan(label)
    expected = step_metrics(ours, names, 30.0, 50.0)[0]
    metrics = {k: v.value for k, v in log.results.scores[0].metrics.items()}
    shares = {k: v for k, v in expected.items() if k.startswith("factual/")}
    assert shares and shares == {k: v for k, v in metrics.items() if k.startswith("factual/")}
    labels = [s.scores["judge_label"].value for s in log.samples if isinstance(s.scores["judge_label"].value, str)]
    assert {k: v.value for k, v in log.results.scores[1].metrics.items()} == \
        {f"{lab}_rate": labels.count(lab) / len(labels) for lab in set(labels)}
