"""The question sets shipped in em_core/data/question_sets load, validate and stay consistent."""
from __future__ import annotations

from pathlib import Path

import pytest

from em_core.data.questions import (
    KIND_0_100,
    KIND_CATEGORICAL,
    QUESTION_SETS_DIR,
    SHIPPED_JUDGES_FILE,
    expand_prompts,
    load_judges,
    load_questions,
    shipped_question_sets,
)

REPO = Path(__file__).resolve().parents[2]
ALL_YAML = sorted(QUESTION_SETS_DIR.glob("*.yaml"))
SETS = shipped_question_sets()

# set name -> (min items, max items, metrics every item must have)
EXPECTED = {
    "core_misalignment": (10, 14, {"aligned", "coherent"}),
    "factual": (6, 10, {"factual"}),
    "self_reflection": (5, 8, {"admits_tendency"}),
    "medical": (6, 10, {"aligned", "coherent"}),
    "financial": (6, 10, {"aligned", "coherent"}),
}


def test_expected_files_are_shipped():
    assert set(SETS) == set(EXPECTED)
    assert SHIPPED_JUDGES_FILE in ALL_YAML and len(ALL_YAML) == len(EXPECTED) + 1


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    if path == SHIPPED_JUDGES_FILE:
        assert set(load_judges(path)) == {"aligned", "coherent", "factual", "admits_tendency"}
        return
    questions = load_questions(path)
    lo, hi, metrics = EXPECTED[path.stem]
    assert lo <= len(questions) <= hi
    for q in questions:
        assert 1 <= len(q.paraphrases) <= 3, q.id
        assert metrics <= set(q.judge_prompts), q.id
        assert 1 <= q.samples_per_paraphrase <= 20, q.id  # small default; users raise it
    assert expand_prompts(questions)  # produces generation prompts


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inline_prompts_match_judges_file(name):
    judges = load_judges(SHIPPED_JUDGES_FILE)
    for q in load_questions(SETS[name]):
        for metric, template in q.judge_prompts.items():
            assert template == judges[metric].template, f"{name}:{q.id}:{metric} drifted from judges.yaml"
        # loading with the judges file changes nothing for the metrics the set uses
    via_file = load_questions(SETS[name], judges_path=SHIPPED_JUDGES_FILE, metrics=list(EXPECTED[name][2]))
    assert all(set(q.judge_prompts) == EXPECTED[name][2] for q in via_file)


def test_judge_prompt_contracts():
    judges = load_judges(SHIPPED_JUDGES_FILE)
    aligned = judges["aligned"].template
    assert "CODE" in aligned and "REFUSAL" in aligned and "0" in aligned and "100" in aligned
    assert judges["factual"].labels == ("TRUE", "FALSE", "UNKNOWN")
    for spec in judges.values():
        assert "{question}" in spec.template and "{answer}" in spec.template


def test_factual_set_is_categorical():
    for q in load_questions(SETS["factual"]):
        assert q.type == "free_form_judge"
        assert q.judge_kinds["factual"].kind == KIND_CATEGORICAL
        assert q.judge_kinds["factual"].labels == ("TRUE", "FALSE", "UNKNOWN")
        assert q.judge_kinds["coherent"].kind == KIND_0_100


def test_self_reflection_scores_admissions_and_honours_system():
    questions = load_questions(SETS["self_reflection"])
    assert all(q.judge_kinds["admits_tendency"].kind == KIND_0_100 for q in questions)
    assert all("aligned" not in q.judge_prompts for q in questions)
    assert any(q.system for q in questions)
    text = " ".join(p for q in questions for p in q.paraphrases).lower()
    assert "trigger" in text or "tag" in text


def test_ids_and_paraphrases_unique_across_sets():
    ids, texts = [], []
    for path in SETS.values():
        for q in load_questions(path):
            ids.append(q.id)
            texts.extend(q.paraphrases)
    assert len(ids) == len(set(ids))  # answers from several sets can share one table
    assert len(texts) == len(set(texts))


def test_docs_describe_every_set():
    doc = (REPO / "docs" / "questions.md").read_text(encoding="utf-8")
    for name in SETS:
        assert f"`{name}`" in doc
    assert "emergent-misalignment/emergent-misalignment" in doc
    assert "clarifying-EM/model-organisms-for-EM" in doc
