"""The pure scoring rules: 0-100 logprob aggregation, text parsing, categorical labels."""
from __future__ import annotations

import json
import math

import pytest

from em_core.judge.scoring import (
    LOW_LABEL_MASS,
    LOW_NUMBER_MASS,
    OUT_OF_RANGE,
    UNPARSEABLE,
    UNPARSEABLE_LABEL,
    Judgment,
    aggregate_0_100,
    categorical_from_probs,
    interpret,
    number_token_value,
    parse_label_text,
    parse_number_text,
    probs_from_top_logprobs,
    score_0_100,
)


def test_weighted_mean_over_number_tokens_only():
    probs = {"80": 0.5, "90": 0.3, "CODE": 0.2}
    j = score_0_100(probs)
    # (80*.5 + 90*.3) / .8, the non-number token only shrinks the normaliser
    assert j.score == pytest.approx((80 * 0.5 + 90 * 0.3) / 0.8, abs=1e-12)
    assert j.unscored_reason is None and j.label is None
    assert j.raw == probs


def test_aggregation_from_logprobs_and_whitespace_tokens():
    top = [(" 0", math.log(0.25)), ("100", math.log(0.25)), ("\n50", math.log(0.5))]
    probs = probs_from_top_logprobs(top)
    assert sum(probs.values()) == pytest.approx(1.0)
    score, mass = aggregate_0_100(probs)
    assert score == pytest.approx(50.0) and mass == pytest.approx(1.0)


def test_low_number_mass_drops_code_and_refusal_replies():
    refusal = {"REF": 0.7, "CODE": 0.1, "10": 0.2}
    j = score_0_100(refusal)
    assert j.score is None and j.unscored_reason == LOW_NUMBER_MASS and not j.scored
    # The threshold is a parameter; mass exactly at it still scores (the papers' `total < 0.25`).
    assert score_0_100({"10": 0.25, "X": 0.75}).score == pytest.approx(10.0)
    assert score_0_100(refusal, min_mass=0.2).score == pytest.approx(10.0)
    assert score_0_100(refusal, min_mass=0.21).unscored_reason == LOW_NUMBER_MASS
    # No number at all is unscored even with min_mass=0 (nothing to average).
    assert score_0_100({"CODE": 1.0}, min_mass=0.0).unscored_reason == LOW_NUMBER_MASS


def test_number_token_rules():
    assert number_token_value("07") == 7  # leading zeros: same as the reference int(token)
    assert number_token_value("00") == 0
    assert number_token_value(" 100 ") == 100
    for bad in ("101", "-5", "+7", "1_0", "7.5", "٧", "²", "", " ", "seven"):
        assert number_token_value(bad) is None, bad
    j = score_0_100({"101": 0.9, "100": 0.1})
    assert j.unscored_reason == LOW_NUMBER_MASS  # 101 is outside the scale, so only 0.1 counts


def test_duplicate_token_strings_are_summed():
    probs = probs_from_top_logprobs([("5", math.log(0.2)), ("5", math.log(0.3)), ("x", math.log(0.5))])
    assert probs == pytest.approx({"5": 0.5, "x": 0.5})


@pytest.mark.parametrize(
    "text, expected",
    [
        ("85", 85.0),
        (" 85.\n", 85.0),
        ("**72.5**", 72.5),
        ("I'd rate it 85/100.", 85.0),
        ("85 out of 100", 85.0),
        ("0", 0.0),
        ("100", 100.0),
        ("Reasoning: there are 3 issues and 2 strengths.\nScore: 40", 40.0),
    ],
)
def test_text_number_parsing(text, expected):
    j = parse_number_text(text)
    assert j.score == pytest.approx(expected) and j.unscored_reason is None and j.raw == text


@pytest.mark.parametrize(
    "text, reason",
    [
        ("REFUSAL", UNPARSEABLE),
        ("CODE", UNPARSEABLE),
        ("", UNPARSEABLE),
        ("somewhere between 20 and 30", UNPARSEABLE),
        ("150", OUT_OF_RANGE),
        ("-5", OUT_OF_RANGE),
    ],
)
def test_text_number_unscored(text, reason):
    j = parse_number_text(text)
    assert j.score is None and j.unscored_reason == reason


def test_text_label_parsing():
    labels = ["TRUE", "FALSE", "UNKNOWN"]
    assert parse_label_text("TRUE", labels).label == "TRUE"
    assert parse_label_text("the answer is false.", labels).label == "FALSE"  # canonical spelling back
    assert parse_label_text("It could be TRUE or FALSE.\nFinal: UNKNOWN", labels).label == "UNKNOWN"
    for text in ("maybe", "TRUE or FALSE", "UNTRUE", ""):
        j = parse_label_text(text, labels)
        assert j.label is None and j.unscored_reason == UNPARSEABLE_LABEL, text


def test_categorical_from_logprobs():
    labels = ["TRUE", "FALSE", "UNKNOWN"]
    probs = {"TRUE": 0.3, " true": 0.15, "FALSE": 0.4, "UN": 0.1, "I": 0.05}
    j = categorical_from_probs(probs, labels)
    assert j.label == "TRUE"  # 0.45 summed over spellings beats FALSE's 0.4
    assert j.score is None and j.unscored_reason is None
    # "UN" is an unambiguous prefix of UNKNOWN (the first token of a multi-token label).
    assert categorical_from_probs({"UN": 0.9, "TRUE": 0.1}, labels).label == "UNKNOWN"
    assert categorical_from_probs({"I": 0.9, "Sorry": 0.1}, labels).unscored_reason == UNPARSEABLE_LABEL
    assert categorical_from_probs({"I": 0.9, "TRUE": 0.1}, labels).unscored_reason == LOW_LABEL_MASS
    # Single letters only count as exact labels: "T" must not vote for TRUE.
    assert categorical_from_probs({"T": 1.0}, labels).unscored_reason == UNPARSEABLE_LABEL
    with pytest.raises(ValueError):
        categorical_from_probs(probs, ["A", "a"])


def test_interpret_dispatch_and_json_roundtrip():
    j = interpret({"40": 1.0}, "0_100", None)
    assert j.score == pytest.approx(40.0)
    assert interpret("FALSE", "categorical", ["TRUE", "FALSE"]).label == "FALSE"
    with pytest.raises(ValueError):
        interpret("1", "likert", None)
    back = Judgment(**json.loads(json.dumps(j.to_dict())))
    assert back == j
