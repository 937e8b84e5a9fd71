"""Judging: answers in, scores out, per-step EM metrics logged.

`scoring` holds the pure rules (logprob aggregation, text parsing, unscored reasons),
`backends` the judges (OpenAI, OpenAI-compatible, local HF) behind one cached driver, and
`answers` the judge step (`JudgeConfig`) that reads an evaluate run's answers and writes
`judgments.csv` and metrics. May import models, data and the base; never train or sample.
"""
from em_core.judge.backends import (
    DEFAULT_OPENAI_JUDGE,
    Judge,
    JudgmentCache,
    cache_key,
    make_judge,
)
from em_core.openai_api import PRICES_PER_1M, estimate_cost
from em_core.judge.scoring import (
    API_ERROR,
    LOW_LABEL_MASS,
    LOW_NUMBER_MASS,
    OUT_OF_RANGE,
    UNPARSEABLE,
    UNPARSEABLE_LABEL,
    Judgment,
    aggregate_0_100,
    categorical_from_probs,
    interpret,
    parse_label_text,
    parse_number_text,
    probs_from_top_logprobs,
    score_0_100,
)

__all__ = [
    "API_ERROR",
    "DEFAULT_OPENAI_JUDGE",
    "PRICES_PER_1M",
    "Judge",
    "JudgmentCache",
    "cache_key",
    "estimate_cost",
    "make_judge",
    "LOW_LABEL_MASS",
    "LOW_NUMBER_MASS",
    "OUT_OF_RANGE",
    "UNPARSEABLE",
    "UNPARSEABLE_LABEL",
    "Judgment",
    "aggregate_0_100",
    "categorical_from_probs",
    "interpret",
    "parse_label_text",
    "parse_number_text",
    "probs_from_top_logprobs",
    "score_0_100",
]
