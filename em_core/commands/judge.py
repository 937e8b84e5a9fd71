"""Score answers with an LLM judge and log EM metrics at each checkpoint's training step.

    mlflow run . -e judge --env-manager local -P eval_run_id=<evaluate run id>
    em judge --eval_run_id <id>                                    # openai if OPENAI_API_KEY is set, else local
    em judge --eval_run_id <id> --backend openai --judge_model gpt-4o-2024-08-06
    em judge --eval_run_id <id> --backend openai-compatible --base_url http://localhost:8000/v1 --judge_model Qwen/Qwen2.5-72B-Instruct
    em judge --answers answers.csv --questions path/to/first_plot_questions.yaml --backend openai --mode text --judge_model o4-mini

Writes `judgments.csv` (one column per judge metric and its unscored reason) and metrics
(`em_rate`, `coherent_rate`, ... with Wilson intervals) at step = checkpoint step.
"""
from __future__ import annotations

import sys

from em_core.configs import parse_config
from em_core.console import run_main


def _judge(argv: list[str]) -> int:
    from em_core.judge.answers import JudgeConfig, run_judge

    cfg = parse_config(JudgeConfig, argv, prog="em judge")
    result = run_judge(cfg)
    for step, m in result.metrics_by_step.items():
        em, coh = m.get("em_rate", float("nan")), m.get("coherent_rate", float("nan"))
        print(f"step {step:>6}: em_rate={em:.3f} coherent_rate={coh:.3f} unscored_rate={m.get('unscored_rate', float('nan')):.3f}")
    print(f"run_id={result.run_id} judgments={result.judgments_path} cost_usd={result.stats.get('cost_usd')}")
    if result.smoke_test:
        print("note: judged by the tiny offline model; these scores are a smoke test, not a measurement")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_judge, argv)


if __name__ == "__main__":
    sys.exit(main())
