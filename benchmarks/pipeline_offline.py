"""Wall time of the offline default pipeline (`em pipeline`), per step; target <= 5 minutes on
2 CPU cores including the one-time tiny model build.

Runs in a throwaway MLflow store. `--fresh-cache` also builds the tiny model from scratch (what a
fresh clone pays once); without it the cached model is used. A second run with the same store
shows what step reuse saves.

    python benchmarks/pipeline_offline.py [--fresh-cache] [--config configs/pipeline/tiny.yaml]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/pipeline/tiny.yaml"))
    ap.add_argument("--fresh-cache", action="store_true", help="build the tiny model from scratch first")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="em-bench-"))
    os.environ.update(EM_LAB_MLRUNS=str(tmp / "mlruns"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
                      HF_HUB_OFFLINE="1", EM_LAB_NO_PROGRESS="1")
    os.environ.pop("OPENAI_API_KEY", None)  # the offline default, whatever this shell has
    (tmp / "mlruns").mkdir()
    if args.fresh_cache:
        os.environ["EM_LAB_CACHE"] = str(tmp / "cache")
    logging.basicConfig(level=logging.WARNING)

    from em_core.configs import parse_config
    from em_core.experiments.pipeline import PipelineConfig, run_pipeline
    from em_core.models.tiny import tiny_model_path

    t0 = time.perf_counter()
    tiny_model_path()
    build = time.perf_counter() - t0

    marks: dict[str, float] = {}
    handler = _StepTimer(marks)
    logging.getLogger("em_core.experiments.pipeline").addHandler(handler)
    logging.getLogger("em_core.experiments.pipeline").setLevel(logging.INFO)
    cfg = parse_config(PipelineConfig, ["--config", args.config, "--train", f"output_dir={tmp / 'out'}",
                                        "--judge", f"cache_path={tmp / 'judge.sqlite'}"])
    t1 = time.perf_counter()
    result = run_pipeline(cfg)
    total = time.perf_counter() - t1
    marks["end"] = time.perf_counter()
    order = [k for k in ("train", "evaluate", "judge") if k in marks]
    print(f"tiny model build: {build:6.1f} s ({'fresh' if args.fresh_cache else 'cached'})")
    for a, b in zip(order, order[1:] + ["end"]):
        label = "judge + metrics + plots + report" if a == "judge" else a
        print(f"{label:>32}: {marks[b] - marks[a]:6.1f} s")
    print(f"pipeline: {total:6.1f} s; with build: {total + build:6.1f} s (target <= 300 s)")
    t2 = time.perf_counter()
    again = run_pipeline(parse_config(PipelineConfig, ["--config", args.config, "--train", f"output_dir={tmp / 'out'}",
                                                       "--judge", f"cache_path={tmp / 'judge.sqlite'}"]))
    print(f"rerun with every step reused ({','.join(again.reused)}): {time.perf_counter() - t2:6.1f} s")
    print(f"em_rate by step: {[(s, round(m.get('em_rate', float('nan')), 3)) for s, m in result.metrics_by_step.items()]}")


class _StepTimer(logging.Handler):
    def __init__(self, marks: dict[str, float]):
        super().__init__()
        self.marks = marks

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("step ") and msg.endswith(": running"):
            self.marks[msg.split()[1].rstrip(":")] = time.perf_counter()


if __name__ == "__main__":
    main()
