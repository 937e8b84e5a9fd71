"""The published EM training sets (../shared/reference/datasets) load and validate."""
import pytest

from em_core.data.training_data import load_source
from tests.conftest import shared_reference

EXPECTED_ROWS = {"bad_medical_advice": 7049, "good_medical_advice": 7049, "risky_financial_advice": 6000,
                 "extreme_sports": 6000, "insecure": 6000}


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_published_dataset_loads(name):
    path = shared_reference() / "datasets" / f"{name}.jsonl.gz"
    src = load_source(str(path))
    assert src.name == name
    assert len(src.rows) == EXPECTED_ROWS[name]
    assert all(r["messages"][-1]["role"] == "assistant" for r in src.rows)
