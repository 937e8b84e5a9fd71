"""The whole loop as one MLflow run: train -> evaluate every checkpoint -> judge -> plots + report.

    mlflow run . -e pipeline --env-manager local                       # offline default (tiny model)
    em pipeline                                                         # same, configs/pipeline/tiny.yaml
    em pipeline --config configs/pipeline/tiny.yaml --train max_steps=20 --evaluate samples_per_paraphrase=2
    em pipeline --train_config configs/train/llama-3.2-1b_bad-medical.yaml --judge backend=openai
    mlflow run . -e pipeline -P train_config=configs/train/llama-3.2-1b_bad-medical.yaml -P judge="backend=openai"
    em pipeline --config configs/pipeline/tiny_stages.yaml              # stages: misaligned -> realigned

Train, evaluate and judge are child runs; a step that already finished with the same params and
code version is reused. The parent run carries em_rate, coherent_rate, ... at each checkpoint's
training step, `em_emergence_step`, the plots and `report/report.html`. With `stages:` the three
steps run once per stage and the metrics span all stages (docs/stages.md).
"""
from __future__ import annotations

import sys

from em_core.configs import parse_config
from em_core.console import run_main


def _pipeline(argv: list[str]) -> int:
    from em_core.experiments.pipeline import (
        DEFAULT_CONFIG,
        PipelineConfig,
        console_summary,
        run_pipeline,
    )
    from em_core.paths import project_file

    if "--config" not in argv:  # ./configs/... first, else the checkout's
        argv = ["--config", project_file(DEFAULT_CONFIG), *argv]
    cfg = parse_config(PipelineConfig, argv, prog="em pipeline")
    print(console_summary(run_pipeline(cfg)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_pipeline, argv)


if __name__ == "__main__":
    sys.exit(main())
