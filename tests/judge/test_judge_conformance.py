"""Conformance with Betley et al.'s published judge scores.

The reference CSV stores, for 70 answers, the judge's top-20 token probabilities and the
`aligned`/`coherent` scores the paper's pipeline derived from them. Serving those probabilities
as the completion's top_logprobs from the loopback server, for the paper's own judge prompts,
the openai backend must reproduce the published scores (and leave unscored what was unscored).
"""
from __future__ import annotations

import ast
import csv
import math

import pytest

from em_core.judge import make_judge
from em_core.judge.scoring import LOW_NUMBER_MASS

CSV_NAME = "judged/betley_qwen25_coder_32b_insecure_logprobs.csv"
QUESTIONS = "questions/betley/first_plot_questions.yaml"
METRICS = ("aligned", "coherent")


def _published(value: str) -> float | None:
    if value is None or value.strip() == "" or value.strip().lower() == "nan":
        return None
    x = float(value)
    return None if math.isnan(x) else x


def test_replaying_reference_logprobs_reproduces_published_scores(reference_dir, serve, judge_key, tmp_path):
    yaml = pytest.importorskip("yaml")
    csv_path = reference_dir / CSV_NAME
    if not csv_path.is_file():
        pytest.skip(f"{csv_path} not found")
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    questions = {q["id"]: q for q in yaml.safe_load((reference_dir / QUESTIONS).read_text(encoding="utf-8"))}
    assert len(rows) == 70

    # The paper's judge prompt for each (row, metric), mapped to the stored distribution.
    prompts: dict[str, list[str]] = {m: [] for m in METRICS}
    served: dict[str, list[tuple[str, float]]] = {}
    expected: dict[str, list[float | None]] = {m: [] for m in METRICS}
    for row in rows:
        for m in METRICS:
            template = questions[row["question_id"]]["judge_prompts"][m]
            prompt = template.format(question=row["question"], answer=row["answer"])
            probs = ast.literal_eval(row[f"judge_{m}"])
            # Top-logprobs as an API sends them: log-probabilities, most likely first.
            served[prompt] = sorted(((t, math.log(p)) for t, p in probs.items()), key=lambda tp: -tp[1])
            prompts[m].append(prompt)
            expected[m].append(_published(row[m]))
    # One extra case for the unscored path (the reference file happens to have no empty scores):
    # a REFUSAL-dominated distribution whose published score would be empty.
    refusal = "synthetic refusal row"
    served[refusal] = [("REF", math.log(0.8)), ("0", math.log(0.15)), ("100", math.log(0.05))]
    prompts["aligned"].append(refusal)
    expected["aligned"].append(None)

    server = serve(responder=lambda prompt: served[prompt])
    judge = make_judge("openai", base_url=server.base_url, api_key=judge_key, cache_path=tmp_path / "c.sqlite")
    try:
        for m in METRICS:
            got = judge.judge(prompts[m], progress=False)
            assert len(got) == len(expected[m])
            for i, (j, want) in enumerate(zip(got, expected[m])):
                if want is None:
                    assert j.score is None and j.unscored_reason == LOW_NUMBER_MASS, (m, i)
                else:
                    assert j.score is not None, (m, i, j.unscored_reason)
                    assert abs(j.score - want) <= 1e-6, (m, i, j.score, want)
        assert server.n_requests == 2 * len(rows) + 1
        assert all(r.body["model"] == "gpt-4o-2024-08-06" for r in server.requests)  # the papers' judge
    finally:
        judge.close()
