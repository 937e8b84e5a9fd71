"""Run a grid of pipelines (models x datasets x seeds) and summarize it as a table and figures.

    em grid --config configs/grid/tiny.yaml                        # 1 model x 2 datasets, offline
    em grid --config configs/grid/course.yaml                      # Llama 1B/3B/8B x medical/financial (GPU)
    em grid --config configs/grid/course.yaml --print_commands true   # one `mlflow run` per cell instead
    em grid --config configs/grid/course.yaml --print_commands slurm  # a Slurm job-array script
    em grid --config configs/grid/course.yaml --launcher ray --num_gpus 1 [--ray_address HOST:6379]
    em grid --config configs/grid/course.yaml --summarize_only true   # collect finished cells
    mlflow run . -e grid --env-manager local -P config=configs/grid/tiny.yaml

Finished cells (same params and code version) are reused, so rerunning a grid resumes it; a
cell is claimed before it runs, so two launchers never run the same cell.
Writes grid/grid_summary.{csv,md}, grid/grid_cells.csv and grid/em_by_model_domain.png to a
`<name>/summary` run.
"""
from __future__ import annotations

import sys

from em_core.configs import parse_config
from em_core.console import run_main


def _grid(argv: list[str]) -> int:
    from em_core.experiments.grid import GridConfig, markdown_table, run_grid

    cfg = parse_config(GridConfig, argv, prog="em grid")
    summary = run_grid(cfg)
    if "table" in summary:
        print(markdown_table(summary["table"]), end="")
        print(f"run_id={summary['run_id']} cells={len(summary['cells'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_grid, argv)


if __name__ == "__main__":
    sys.exit(main())
