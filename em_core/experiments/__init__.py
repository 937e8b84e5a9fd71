"""Experiments: the steps composed into runs of runs.

`pipeline` (train -> evaluate -> judge as child runs, reuse, stages), `grid` (models x datasets
x seeds) and `sweep` (Optuna over LoRA rank and learning rate). May import everything below;
only the CLI and entry points import it.
"""
