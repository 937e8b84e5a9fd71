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
        run_pipeline,
    )
    from em_core.paths import PROJECT_ROOT

    if "--config" not in argv:
        argv = ["--config", str(PROJECT_ROOT / DEFAULT_CONFIG), *argv]
    cfg = parse_config(PipelineConfig, argv, prog="em pipeline")
    result = run_pipeline(cfg)
    for step, m in result.metrics_by_step.items():
        print(f"step {step:>6}: em_rate={m.get('em_rate', float('nan')):.3f} "
              f"[{m.get('em_rate_lo', float('nan')):.3f}, {m.get('em_rate_hi', float('nan')):.3f}] "
              f"coherent_rate={m.get('coherent_rate', float('nan')):.3f} n_scored={int(m.get('n_scored', 0))}")
    print(f"em_emergence_step={result.emergence_step if result.emergence_step is not None else 'none'}")
    print(f"run_id={result.run_id} steps={result.step_run_ids} reused={','.join(result.reused) or 'none'}")
    if result.report_uri:
        print(f"report={result.report_uri}")
    if result.smoke_test:
        print("note: judged by the tiny offline model; these scores are a smoke test, not a measurement")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_pipeline, argv)


if __name__ == "__main__":
    sys.exit(main())
