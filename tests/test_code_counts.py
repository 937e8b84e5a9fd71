"""The repetition issue 26 removed stays removed: counted from the source by tools/code_counts.py."""
import importlib.util
from pathlib import Path

from em_core import tags as em_tags

REPO = Path(__file__).resolve().parents[1]


def _counts() -> dict:
    spec = importlib.util.spec_from_file_location("code_counts", REPO / "tools" / "code_counts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.counts()


def test_every_em_tag_is_named_once_in_the_tags_module():
    """Before: 136 `"em.*"` literals (72 distinct) across 23 modules; a typo was a silent miss."""
    c = _counts()
    assert c["em_tag_literals_outside_tags_module"] == []
    names = [v for k, v in vars(em_tags).items() if k.isupper()]
    assert len(names) == len(set(names)), "two constants for one tag"


def test_a_runs_checkpoints_are_listed_in_one_place():
    """Before: four functions listed `checkpoints/` themselves (evaluate, directions, resume, adapters)."""
    (listing,) = _counts()["checkpoint_listings"]
    assert listing.startswith("em_core/models/adapters.py:")


def test_checkpoint_steps_tag_round_trips():
    """One writer and one parser of `em.checkpoint_steps` (was written in three places, parsed in two)."""
    value = em_tags.steps_value([12, 3, 6, 3])
    assert value == "3,6,12" and em_tags.steps_of({em_tags.CHECKPOINT_STEPS: value}) == [3, 6, 12]
    assert em_tags.steps_of({}) == [] and em_tags.steps_of(None) == []
