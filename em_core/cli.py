"""`em` console script: one sub-command per entry point, plus tools.

    em train --config configs/train/tiny.yaml [--key value ...]
    em evaluate --train_run_id RUN_ID [--questions core_misalignment ...]
    em judge --eval_run_id RUN_ID [--backend openai|openai-compatible|local]
    em pipeline [--config configs/pipeline/tiny.yaml] [--train k=v ...] [--evaluate k=v ...] [--judge k=v ...]
    em grid --config configs/grid/course.yaml [--print_commands true]
    em sweep --config configs/sweep/tiny.yaml [--n_trials 8 --storage URL]
    em probe --train_run_id RUN_ID [--sets general plant_care]     # likelihood probe + LoRA trajectory
    em probe build --judged FILE.csv [--out set.yaml] [--aligned_min 80 --aligned_max 30 --coherent_min 50]
    em directions extract|steer|ablate [--config configs/directions/tiny_steer.yaml] [--key value ...]
    em directions compare RUN_OR_FILE RUN_OR_FILE [...] [--labels a,b]
    em mitigate --config configs/mitigations/tiny.yaml    # in-training mitigations on four criteria
    em report RUN_ID
    em datasets list | fetch NAME [NAME ...] | generate --config configs/datasets/ai_optimism.yaml
    em metrics judged.csv [--json]                                  # or an Inspect log: em metrics LOG.eval
    em import-inspect LOG.eval                                      # an Inspect evaluation as evaluate + judge runs
    em runs reap [--experiment NAME ...] [--grace SECONDS]
    em rescore JUDGE_RUN [--aligned_threshold 30 --coherent_threshold 50 --bounds inclusive|exclusive
                          --scoring weighted|argmax --min_mass 0.25]     # zero API requests
    em judge compare RUN_OR_FILE RUN_OR_FILE [...]          # kappa, Spearman, alpha, EM rate per judge
    em label JUDGE_RUN [--n 100 --seed 0 --port 8765]       # human labels in a local browser page
"""
from __future__ import annotations

import importlib
import sys

from em_core.console import run_main

# sub-command -> "module:function" taking argv and returning an exit code
COMMANDS = {
    "train": "em_core.commands.train:main",
    "evaluate": "em_core.commands.evaluate:main",
    "judge": "em_core.commands.judge:main",
    "pipeline": "em_core.commands.pipeline:main",
    "grid": "em_core.commands.grid:main",
    "sweep": "em_core.commands.sweep:main",
    "probe": "em_core.commands.probe:main",
    "directions": "em_core.commands.directions:main",
    "mitigate": "em_core.experiments.mitigate:main",
    "report": "em_core.analysis.report:main",
    "metrics": "em_core.analysis.metrics_cli:main",
    "import-inspect": "em_core.experiments.inspect_import:main",
    "datasets": "em_core.cli:datasets_main",
    "runs": "em_core.cli:runs_main",
    "rescore": "em_core.analysis.rescore:main",
    "judge-compare": "em_core.analysis.agreement:main",
    "label": "em_core.analysis.labeling:main",
}


def datasets_main(argv: list[str]) -> int:
    """`em datasets list|fetch` (published datasets) and `em datasets generate` (LLM-made ones)."""
    if argv and argv[0] == "generate":
        from em_core.data.generation import main as generate

        return generate(argv[1:])  # wraps itself in run_main
    from em_core.data.published import main as registry

    return run_main(registry, argv)


def _runs(argv: list[str]) -> int:
    import argparse

    import mlflow

    from em_core import liveness, tracking
    from em_core.errors import ConfigError

    p = argparse.ArgumentParser(prog="em runs", description="Housekeeping of the MLflow store's runs.")
    sub = p.add_subparsers(dest="action", required=True)
    reap = sub.add_parser("reap", help="mark RUNNING runs whose process died (kill -9, OOM, lost node) KILLED")
    reap.add_argument("--experiment", action="append", help="only this experiment (repeatable; default all)")
    reap.add_argument("--grace", type=float, default=None,
                      help="seconds without a heartbeat before a run counts as dead "
                           f"(default EM_LAB_STALE_AFTER_SECONDS or {liveness.DEFAULT_STALE_AFTER_SECONDS:g})")
    args = p.parse_args(argv)
    tracking.configure_tracking()
    ids = None
    if args.experiment:
        exps = {name: mlflow.get_experiment_by_name(name) for name in args.experiment}
        missing = [name for name, e in exps.items() if e is None]
        if missing:
            raise ConfigError(f"--experiment: no experiment named {', '.join(missing)} in {mlflow.get_tracking_uri()}")
        ids = [e.experiment_id for e in exps.values()]
    reaped = liveness.reap_stale_runs(ids, args.grace)
    for r in reaped:
        print(f"KILLED {r.run_id} ({r.run_name}): {r.reason}")
    print(f"{len(reaped)} stale run(s) marked KILLED")
    return 0


def runs_main(argv: list[str]) -> int:
    """`em runs reap`: runs left RUNNING by a dead process are marked KILLED with a reason."""
    return run_main(_runs, argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip() + "\n\ncommands: " + ", ".join(COMMANDS), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, func = COMMANDS[argv[0]].split(":")
    if argv[:2] == ["judge", "compare"]:  # `em judge compare` lives beside the judge, not in it
        module, func = COMMANDS["judge-compare"].split(":")
        argv = argv[1:]
    return getattr(importlib.import_module(module), func)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
