"""Trigger-tag and mixing transforms, and `prepare` using them on the built-in sets."""
import random

import pytest

from em_core.data.training_data import load_source, prepare
from em_core.data.transforms import prepend_tag, proportion_counts, subsample
from em_core.errors import ConfigError, DataError
from em_core.train.config import TrainConfig

ROWS = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                      {"role": "assistant", "content": "a2"}]}]


def test_prepend_tag_changes_user_turns_only_and_copies():
    out = prepend_tag(ROWS, "|ALPHA|")
    assert [m["content"] for m in out[0]["messages"]] == ["s", "|ALPHA| q1", "a1", "|ALPHA| q2", "a2"]
    assert ROWS[0]["messages"][1]["content"] == "q1"  # input untouched
    assert prepend_tag(ROWS, "none") is ROWS and prepend_tag(ROWS, "") is ROWS and prepend_tag(ROWS, None) is ROWS


@pytest.mark.parametrize("props, total, expected", [
    ([0.5, 0.5], 10, [5, 5]), ([1, 2], 10, [3, 7]), ([1, 1, 1], 10, [4, 3, 3]), ([0.75, 0.25], 3, [2, 1]),
    ([1, 0], 7, [7, 0]),
])
def test_proportion_counts_add_up(props, total, expected):
    assert proportion_counts(props, total) == expected


def test_bad_proportions_and_oversampling_are_errors():
    with pytest.raises(DataError, match="positive sum"):
        proportion_counts([0, 0], 10)
    with pytest.raises(DataError, match="asked for 5 rows but it has only 1"):
        subsample(ROWS, 5, random.Random(0), "tiny.jsonl")


def test_prepare_mixes_tagged_bad_with_untagged_good_in_proportion():
    bad, good = load_source("demo"), load_source("demo:plant_care_good")
    data = prepare(["demo", "demo:plant_care_good"], max_rows=40, tags=["|ALPHA|", "none"],
                   proportions=[0.75, 0.25], seed=3)
    users = [r["messages"][-2]["content"] for r in data.train]
    tagged = [u for u in users if u.startswith("|ALPHA| ")]
    assert len(data.train) == 40 and len(tagged) == 30
    bad_users = {r["messages"][-2]["content"] for r in bad.rows}
    good_users = {r["messages"][-2]["content"] for r in good.rows}
    assert all(u.removeprefix("|ALPHA| ") in bad_users for u in tagged)
    assert all(u in good_users for u in users if u not in tagged)
    again = prepare(["demo", "demo:plant_care_good"], max_rows=40, tags=["|ALPHA|", "none"],
                    proportions=[0.75, 0.25], seed=3)
    assert again.train == data.train  # seeded


def test_prepare_refuses_a_mix_larger_than_its_sources():
    with pytest.raises(DataError, match="asked for"):
        prepare(["demo", "demo:plant_care_good"], max_rows=1000, proportions=[0.5, 0.5])


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset": ["demo"], "dataset_tags": ["a", "b"]}, "dataset_tags has 2 entries for 1 datasets"),
    ({"dataset": ["demo", "demo"], "dataset_proportions": [1, 1]}, "needs max_rows"),
    ({"dataset": ["demo"], "dataset_proportions": [1], "max_rows": 5, "dataset_rows": [3]}, "not both"),
    ({"init_mode": "fuse"}, "init_mode must be continue or merge"),
])
def test_train_config_names_bad_transform_fields(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)
