"""Question YAML loader: format features, validation errors, prompt expansion."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from em_core.data.questions import (
    KIND_0_100,
    KIND_CATEGORICAL,
    PromptSpec,
    Question,
    expand_prompts,
    infer_labels,
    load_judges,
    load_questions,
    resolve_question_file,
)
from em_core.errors import ConfigError, DataError

PROMPT = "Q: {question}\nA: {answer}\nScore 0-100."


def write(tmp_path: Path, text: str, name: str = "q.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return p


def one_item(tmp_path: Path, **overrides: str) -> Path:
    """A valid single item; overrides replace whole field lines (value text as YAML)."""
    fields = {
        "id": "q1",
        "type": "free_form_judge_0_100",
        "paraphrases": '["Hello?"]',
        "judge_prompts": '{aligned: "' + PROMPT.replace("\n", "\\n") + '"}',
    }
    fields.update(overrides)
    lines = [f"{k}: {v}" for k, v in fields.items() if v is not None]
    body = "- " + "\n  ".join(lines) + "\n"
    return write(tmp_path, body)


def error_of(path: Path, **kw) -> DataError:
    with pytest.raises(DataError) as exc:
        load_questions(path, **kw)
    return exc.value


# --------------------------------------------------------------------------- happy paths

def test_minimal_item_gets_defaults(tmp_path):
    [q] = load_questions(one_item(tmp_path))
    assert isinstance(q, Question)
    assert (q.id, q.type, q.paraphrases) == ("q1", "free_form_judge_0_100", ["Hello?"])
    assert q.system is None and q.judge is None
    assert q.samples_per_paraphrase == 1
    assert q.judge_prompts == {"aligned": PROMPT}
    assert q.judge_kinds["aligned"].kind == KIND_0_100 and q.judge_kinds["aligned"].labels == ()
    assert q.source.endswith("q.yaml")


def test_anchors_aliases_and_all_fields(tmp_path):
    path = write(tmp_path, """
        - id: first
          type: &t free_form_judge_0_100
          system: Answer in JSON.
          paraphrases: &p
            - |-
              Multi-line
              question
            - Second wording
          samples_per_paraphrase: &n 7
          judge: &j gpt-4o-2024-08-06
          judge_prompts: &jp
            aligned: "Rate {answer} to {question}"
            coherent: "Coherent? {answer}"
        - id: second
          type: *t
          paraphrases: *p
          samples_per_paraphrase: *n
          judge: *j
          judge_prompts: *jp
        """)
    a, b = load_questions(path)
    assert a.paraphrases == ["Multi-line\nquestion", "Second wording"] == b.paraphrases
    assert (a.system, b.system) == ("Answer in JSON.", None)
    assert b.samples_per_paraphrase == 7 and b.judge == "gpt-4o-2024-08-06"
    assert list(b.judge_prompts) == ["aligned", "coherent"]
    assert a.judge_prompt("aligned", "why?", "because") == "Rate because to why?"


def test_categorical_labels_inferred_from_quoted_words(tmp_path):
    path = write(tmp_path, """
        - id: fact
          type: free_form_judge
          paraphrases: ["What is 2+2?"]
          judge_prompts:
            correct: 'Q {question} A {answer}. Say "TRUE" or "FALSE" only, or "UNKNOWN" if unrelated. "TRUE" again.'
        """)
    [q] = load_questions(path)
    kind = q.judge_kinds["correct"]
    assert kind.kind == KIND_CATEGORICAL and kind.is_categorical
    assert kind.labels == ("TRUE", "FALSE", "UNKNOWN")  # deduplicated, first-seen order


def test_infer_labels_ignores_multiword_quotes():
    assert infer_labels('0 means "totally misaligned"; say "OpenAI" or "Other"') == ("OpenAI", "Other")


def test_judge_kinds_mixes_kinds_and_keeps_label_spelling(tmp_path):
    # unquoted TRUE/FALSE/yes must stay strings (plain YAML 1.1 would make them booleans)
    path = write(tmp_path, """
        - id: mixed
          type: free_form_judge
          paraphrases: ["Is the sky blue?"]
          judge_prompts:
            factual: "{question} {answer} -> label"
            coherent: "{answer} -> 0..100"
            yesno: "{answer} -> y/n"
          judge_kinds:
            factual: [TRUE, FALSE, UNKNOWN]
            coherent: "0_100"
            yesno: [yes, no]
        """)
    [q] = load_questions(path)
    assert q.judge_kinds["factual"].labels == ("TRUE", "FALSE", "UNKNOWN")
    assert q.judge_kinds["coherent"].kind == KIND_0_100
    assert q.judge_kinds["yesno"].labels == ("yes", "no")


def test_judge_kinds_can_make_a_0_100_item_metric_categorical(tmp_path):
    path = one_item(tmp_path, judge_kinds='{aligned: ["SAFE", "UNSAFE"]}')
    [q] = load_questions(path)
    assert q.judge_kinds["aligned"].kind == KIND_CATEGORICAL
    assert q.judge_kinds["aligned"].labels == ("SAFE", "UNSAFE")


def test_numeric_id_is_accepted_as_string(tmp_path):
    [q] = load_questions(one_item(tmp_path, id="42"))
    assert q.id == "42"


# --------------------------------------------------------------------------- validation

def test_missing_file_has_hint(tmp_path):
    err = error_of(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(err) and "not found" in err.problem
    assert err.hint and "question_sets" in err.hint


def test_malformed_yaml_reports_line(tmp_path):
    path = write(tmp_path, """
        - id: ok
          type: free_form_judge_0_100
          paraphrases: ["unterminated
          judge_prompts: {a: "{answer}"}
        - id: x
        """)
    err = error_of(path)
    assert "invalid YAML" in err.problem
    assert err.line is not None and 3 <= err.line <= 5
    assert f":{err.line}:" in str(err)


def test_bad_indentation_reports_line(tmp_path):
    path = write(tmp_path, "- id: a\n  type: free_form_judge_0_100\n   paraphrases: [x]\n")
    err = error_of(path)
    assert err.line == 3


@pytest.mark.parametrize("text, needle", [
    ("", "no questions"),
    ("[]", "no questions"),
    ("id: q1\ntype: free_form_judge_0_100\n", "YAML list"),
    ("- just a string\n", "item #0 must be a mapping"),
])
def test_bad_top_level(tmp_path, text, needle):
    err = error_of(write(tmp_path, text))
    assert needle in err.problem


def test_missing_id_names_index(tmp_path):
    err = error_of(one_item(tmp_path, id=None))
    assert "item #0" in err.problem and "'id'" in err.problem


def test_unknown_type_rejected_with_supported_list(tmp_path):
    err = error_of(one_item(tmp_path, type="multiple_choice"))
    assert "'q1'" in err.problem and "'multiple_choice'" in err.problem and "type" in err.problem
    assert "free_form_judge_0_100" in err.hint and "free_form_judge" in err.hint
    assert err.line == 2


def test_missing_type_rejected(tmp_path):
    err = error_of(one_item(tmp_path, type=None))
    assert "'type' is missing" in err.problem


@pytest.mark.parametrize("value, needle", [
    ("[]", "'paraphrases' must be a non-empty list"),
    ('"just a string"', "'paraphrases' must be a non-empty list"),
    ('["ok", ""]', "'paraphrases'[1] is not a non-empty string"),
    ('["ok", "   "]', "'paraphrases'[1]"),
    ('["ok", 3]', "'paraphrases'[1]"),
])
def test_bad_paraphrases(tmp_path, value, needle):
    err = error_of(one_item(tmp_path, paraphrases=value))
    assert needle in err.problem and "'q1'" in err.problem
    assert err.line == 3  # the paraphrases line


def test_missing_paraphrases(tmp_path):
    err = error_of(one_item(tmp_path, paraphrases=None))
    assert "'paraphrases'" in err.problem


def test_template_without_answer_rejected(tmp_path):
    err = error_of(one_item(tmp_path, judge_prompts='{aligned: "Rate {question}"}'))
    assert "'aligned'" in err.problem and "{answer}" in err.problem and "'q1'" in err.problem


def test_template_with_stray_placeholder_rejected(tmp_path):
    err = error_of(one_item(tmp_path, judge_prompts='{aligned: "{answer} as {json}"}'))
    assert "cannot be filled" in err.problem and "{{" in err.hint


def test_missing_judge_prompts_rejected_without_judges_file(tmp_path):
    err = error_of(one_item(tmp_path, judge_prompts=None))
    assert "judge_prompts" in err.problem and "judges file" in err.hint


@pytest.mark.parametrize("value", ["0", "-3", '"ten"', "2.5"])
def test_bad_samples_per_paraphrase(tmp_path, value):
    err = error_of(one_item(tmp_path, samples_per_paraphrase=value))
    assert "samples_per_paraphrase" in err.problem and err.line == 5


def test_bad_system_and_judge_types(tmp_path):
    assert "'system'" in error_of(one_item(tmp_path, system="[a, b]")).problem
    assert "'judge'" in error_of(one_item(tmp_path, judge="{model: x}")).problem


def test_duplicate_ids_name_both_items(tmp_path):
    path = write(tmp_path, """
        - id: same
          type: free_form_judge_0_100
          paraphrases: [a]
          judge_prompts: {m: "{answer}"}
        - id: other
          type: free_form_judge_0_100
          paraphrases: [b]
          judge_prompts: {m: "{answer}"}
        - id: same
          type: free_form_judge_0_100
          paraphrases: [c]
          judge_prompts: {m: "{answer}"}
        """)
    err = error_of(path)
    assert "duplicate id 'same'" in err.problem and "item #2" in err.problem and "item #0" in err.problem
    assert err.line == 9


def test_unknown_field_rejected(tmp_path):
    err = error_of(one_item(tmp_path, paraphrase='["typo"]'))
    assert "unknown field" in err.problem and "paraphrase" in err.problem and "paraphrases" in err.hint


def test_duplicate_key_in_item_rejected(tmp_path):
    path = write(tmp_path, """
        - id: a
          type: free_form_judge_0_100
          paraphrases: [x]
          paraphrases: [y]
          judge_prompts: {m: "{answer}"}
        """)
    err = error_of(path)
    assert "given twice" in err.problem and err.line == 4  # the repeated key


def test_categorical_without_labels_rejected(tmp_path):
    path = write(tmp_path, """
        - id: c
          type: free_form_judge
          paraphrases: [x]
          judge_prompts: {verdict: "Give a verdict on {answer}"}
        """)
    err = error_of(path)
    assert "'verdict'" in err.problem and "no allowed labels" in err.problem and "judge_kinds" in err.hint


def test_unquoted_0_100_kind_explains_octal(tmp_path):
    err = error_of(one_item(tmp_path, judge_kinds="{aligned: 0_100}"))
    assert "judge_kinds" in err.problem and "64" in err.hint


@pytest.mark.parametrize("value, needle", [
    ("{other: [A, B]}", "no judge prompt"),
    ("{aligned: []}", "non-empty list"),
    ("{aligned: [A, A]}", "duplicates"),
    ("[aligned]", "judge_kinds"),
])
def test_bad_judge_kinds(tmp_path, value, needle):
    assert needle in error_of(one_item(tmp_path, judge_kinds=value)).problem


# --------------------------------------------------------------------------- judges file

JUDGES = """
- aligned: "JUDGES FILE aligned {question} {answer}"
  high_score: 0
- verdict: "verdict on {answer}"
  labels: [GOOD, BAD]
"""


def test_judges_file_adds_and_overrides_prompts(tmp_path):
    qpath = write(tmp_path, """
        - id: a
          type: free_form_judge_0_100
          paraphrases: [x]
          judge_prompts:
            aligned: "inline {answer}"
            coherent: "inline coherent {answer}"
        - id: b
          type: free_form_judge_0_100
          paraphrases: [y]
        """)
    jpath = write(tmp_path, JUDGES, "judges.yaml")
    a, b = load_questions(qpath, judges_path=jpath)
    assert a.judge_prompts["aligned"].startswith("JUDGES FILE")  # judges file wins
    assert a.judge_prompts["coherent"] == "inline coherent {answer}"  # inline-only metric kept
    assert set(b.judge_prompts) == {"aligned", "verdict"}  # item without prompts gets the file's
    assert a.judge_kinds["aligned"].high_score == 0
    assert a.judge_kinds["verdict"].kind == KIND_CATEGORICAL
    assert a.judge_kinds["verdict"].labels == ("GOOD", "BAD")


def test_judges_file_kinds_do_not_depend_on_question_type(tmp_path):
    qpath = write(tmp_path, """
        - id: fact
          type: free_form_judge
          paraphrases: [x]
          judge_prompts: {correct: 'Say "TRUE" or "FALSE" about {answer}'}
        """)
    [q] = load_questions(qpath, judges_path=write(tmp_path, JUDGES, "judges.yaml"))
    assert q.judge_kinds["correct"].labels == ("TRUE", "FALSE")  # inline: inferred
    assert q.judge_kinds["aligned"].kind == KIND_0_100  # judges file, no labels: a score
    assert q.judge_kinds["verdict"].labels == ("GOOD", "BAD")


def test_metrics_filter_applies_before_kind_checks(tmp_path):
    # 'vague' would be an error (categorical, no labels), but it is not selected
    qpath = write(tmp_path, """
        - id: c
          type: free_form_judge
          paraphrases: [x]
          judge_prompts: {vague: "judge {answer}", ok: 'Say "YES" or "NO": {answer}'}
        """)
    [q] = load_questions(qpath, metrics=["ok"])
    assert q.judge_kinds == {"ok": q.judge_kinds["ok"]} and q.judge_kinds["ok"].labels == ("YES", "NO")


def test_metrics_filter(tmp_path):
    qpath = one_item(tmp_path, judge_prompts='{aligned: "{answer}", coherent: "{answer}", extra: "{answer}"}')
    [q] = load_questions(qpath, metrics=["coherent", "aligned"])
    assert list(q.judge_prompts) == ["coherent", "aligned"] and list(q.judge_kinds) == ["coherent", "aligned"]
    err = error_of(qpath, metrics=["aligned", "medical"])
    assert "'q1'" in err.problem and "medical" in err.problem


def test_judges_file_mapping_form(tmp_path):
    jpath = write(tmp_path, 'aligned: "{answer}"\ncoherent: "c {answer}"\n', "j.yaml")
    judges = load_judges(jpath)
    assert list(judges) == ["aligned", "coherent"] and judges["coherent"].template == "c {answer}"
    assert judges["aligned"].labels is None and judges["aligned"].high_score is None


@pytest.mark.parametrize("text, needle", [
    ('- aligned: "{answer}"\n  coherent: "{answer}"\n', "exactly one metric"),
    ('- high_score: 0\n', "exactly one metric"),
    ('- aligned: "{answer}"\n- aligned: "{answer}"\n', "defined twice"),
    ('- aligned: "no placeholder"\n', "{answer}"),
    ('- aligned: "{answer}"\n  high_score: lots\n', "high_score"),
    ('- aligned: "{answer}"\n  labels: []\n', "labels"),
    ('"just text"\n', "YAML list"),
    ('[]\n', "no judge prompts"),
])
def test_bad_judges_file(tmp_path, text, needle):
    with pytest.raises(DataError) as exc:
        load_judges(write(tmp_path, text, "j.yaml"))
    assert needle in exc.value.problem


def test_bad_judges_file_entry_reports_line(tmp_path):
    with pytest.raises(DataError) as exc:
        load_judges(write(tmp_path, '- aligned: "{answer}"\n- coherent: "none"\n', "j.yaml"))
    assert exc.value.line == 2 and "'coherent'" in exc.value.problem


# --------------------------------------------------------------------------- prompt expansion

def _two_questions(tmp_path: Path) -> list[Question]:
    path = write(tmp_path, """
        - id: a
          type: free_form_judge_0_100
          system: Be brief.
          paraphrases: [a0, a1]
          samples_per_paraphrase: 3
          judge_prompts: {m: "{answer}"}
        - id: b
          type: free_form_judge_0_100
          paraphrases: [b0]
          judge_prompts: {m: "{answer}"}
        """)
    return load_questions(path)


def test_expand_prompts_uses_per_item_samples_and_system(tmp_path):
    specs = expand_prompts(_two_questions(tmp_path))
    assert len(specs) == 2 * 3 + 1 * 1
    assert all(isinstance(s, PromptSpec) for s in specs)
    assert [(s.question_id, s.paraphrase_index, s.sample_index) for s in specs[:4]] == [
        ("a", 0, 0), ("a", 0, 1), ("a", 0, 2), ("a", 1, 0)]
    assert specs[3].question == "a1" and specs[3].system == "Be brief."
    assert specs[-1] == PromptSpec("b", 0, 0, "b0", None)
    assert specs[0].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a0"}]
    assert specs[-1].messages == [{"role": "user", "content": "b0"}]


def test_expand_prompts_override_replaces_item_value(tmp_path):
    specs = expand_prompts(_two_questions(tmp_path), samples_per_paraphrase=2)
    assert len(specs) == (2 + 1) * 2
    assert max(s.sample_index for s in specs) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_expand_prompts_rejects_bad_override(tmp_path, bad):
    with pytest.raises(ConfigError):
        expand_prompts(_two_questions(tmp_path), samples_per_paraphrase=bad)


def test_expand_prompts_empty():
    assert expand_prompts([]) == []


# --------------------------------------------------------------------------- shipped-set lookup

def test_resolve_question_file(tmp_path):
    assert resolve_question_file("core_misalignment").name == "core_misalignment.yaml"
    own = one_item(tmp_path)
    assert resolve_question_file(own) == own
    with pytest.raises(DataError) as exc:
        resolve_question_file("no_such_set")
    assert "core_misalignment" in exc.value.hint
