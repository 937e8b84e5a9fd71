"""`em` console script: one sub-command per entry point, plus tools.

    em train --config configs/train/tiny.yaml [--key value ...]
    em evaluate --train_run_id RUN_ID [--questions core_misalignment ...]
    em judge --eval_run_id RUN_ID [--backend openai|openai-compatible|local]
    em pipeline [--config configs/pipeline/tiny.yaml] [--train k=v ...] [--evaluate k=v ...] [--judge k=v ...]
    em grid --config configs/grid/course.yaml [--print_commands true]
    em sweep --config configs/sweep/tiny.yaml [--n_trials 8 --storage URL]
    em directions extract|steer|ablate [--config configs/directions/tiny_steer.yaml] [--key value ...]
    em report RUN_ID
    em datasets list | fetch NAME [NAME ...] | generate --config configs/datasets/ai_optimism.yaml
    em metrics judged.csv [--json]
"""
from __future__ import annotations

import importlib
import sys

from em_core.console import run_main

# sub-command -> "module:function" taking argv and returning an exit code
COMMANDS = {
    "train": "entrypoints.train:main",
    "evaluate": "entrypoints.evaluate:main",
    "judge": "entrypoints.judge:main",
    "pipeline": "entrypoints.pipeline:main",
    "grid": "entrypoints.grid:main",
    "sweep": "entrypoints.sweep:main",
    "directions": "entrypoints.directions:main",
    "report": "em_core.analysis.report:main",
    "metrics": "em_core.analysis.metrics_cli:main",
    "datasets": "em_core.cli:datasets_main",
}


def datasets_main(argv: list[str]) -> int:
    """`em datasets list|fetch` (published datasets) and `em datasets generate` (LLM-made ones)."""
    if argv and argv[0] == "generate":
        from em_core.data.generation import main as generate

        return generate(argv[1:])  # wraps itself in run_main
    from em_core.data.published import main as registry

    return run_main(registry, argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip() + "\n\ncommands: " + ", ".join(COMMANDS), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, func = COMMANDS[argv[0]].split(":")
    return getattr(importlib.import_module(module), func)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
