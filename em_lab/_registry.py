"""The `inspect_ai` entry point (pyproject.toml): importing it registers em-lab's Inspect tasks,
scorers and metrics under the `em_lab/` namespace."""
from em_lab.scorers import em_judge, em_rate, em_rate_coherent, em_summary, judge_label, judge_score  # noqa: F401
from em_lab.tasks import (  # noqa: F401
    core_misalignment,
    factual,
    financial,
    medical,
    questions,
    self_reflection,
)
