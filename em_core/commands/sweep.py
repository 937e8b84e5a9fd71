"""Optuna study of LoRA rank x learning rate against how fast EM emerges; trials are pipelines.

    mlflow run . -e sweep --env-manager local                         # configs/sweep/tiny.yaml
    em sweep --config configs/sweep/tiny.yaml --n_trials 6
    em sweep --config configs/sweep/llama-3.2-1b_bad-medical.yaml --storage postgresql://user@host/optuna
    # N workers on one study: start the same command N times (any machines, same storage and
    # MLFLOW_TRACKING_URI); together they stop at n_trials finished trials. Each worker gets its
    # own sampler seed; a worker whose config differs from the study's is refused.
    em sweep --config ... --storage postgresql://... --launcher ray --workers 4 [--ray_address HOST:6379]

Each trial is a child run of the study's parent run with metrics at every checkpoint step; the
best feasible trial's adapter gets the registry alias `best`; Optuna's plots are logged to the
parent run under optuna/.
"""
from __future__ import annotations

import sys

from em_core.configs import parse_config
from em_core.console import run_main


def _sweep(argv: list[str]) -> int:
    from em_core.experiments.launch import sweep_on_ray
    from em_core.experiments.sweep import SweepConfig, run_sweep

    if "--config" not in argv:  # ./configs/... first, else the checkout's
        from em_core.paths import project_file

        argv = ["--config", project_file("configs/sweep/tiny.yaml"), *argv]
    cfg = parse_config(SweepConfig, argv, prog="em sweep")
    info = sweep_on_ray(cfg) if cfg.launcher == "ray" else run_sweep(cfg)
    print(f"study={info['study']} worker={info['worker']} finished_trials={info['trials']} "
          f"parent_run_id={info['parent_run_id']} parent_closed={info['parent_closed']}")
    best = info["best"]
    if best:
        print(f"best trial {best['number']}: {best['value']:g} params={best['params']} run_id={best['run_id']} "
              f"model={best['model_uri']}")
    else:
        print("no feasible completed trial yet (all pruned, or coherence below the floor)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_sweep, argv)


if __name__ == "__main__":
    sys.exit(main())
