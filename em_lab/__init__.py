"""em-lab's evaluation as Inspect (`inspect_ai`) tasks and scorers: the optional extra
`pip install -e ".[inspect]"`; see docs/inspect.md.

    inspect eval em_lab/core_misalignment --model openai/gpt-4o-mini
    inspect eval em_lab/questions -T file=my_questions.yaml --model hf/path/to/model --no-score
    inspect score LOG.eval --scorer em_lab/em_judge

Inspect finds this package through the `inspect_ai` entry point in pyproject.toml
(`em_lab._registry`), and names its tasks and scorers `em_lab/<name>` after it. The package sits
above every layer of em_core (import-linter contract in pyproject.toml): it reuses em_core's
prompt building (`sample.evaluation.sampling_plan`), question files, pure judge rules
(`judge.scoring`) and EM statistics, so an Inspect evaluation and `em evaluate`/`em judge` ask
and score alike by construction. Nothing in em_core imports it.
"""
from em_core.data.inspect_logs import require_inspect

require_inspect("em_lab (em-lab's Inspect tasks and scorers)")
