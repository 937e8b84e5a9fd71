"""MLflow tracking overhead of a tiny-model training run (target: <= 5% of step time).

    python benchmarks/tracking_overhead.py [--steps 60] [--repeats 3]

Trains the tiny model with the project's MLflow callback (metrics every step, batched) and
without any tracking (report_to="none", no run), and prints the ratio of mean step times.
Checkpoint uploads are excluded from both (no checkpoints in the schedule) so the figure is the
per-step logging cost.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("EM_LAB_NO_PROGRESS", "1")


class StepTimer:
    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            # Step-begin to step-begin, so the logging done after on_step_end is counted.
            def on_step_begin(self, args, state, control, **kw):
                now = time.perf_counter()
                if outer._t is not None:
                    outer.times.append(now - outer._t)
                outer._t = now

        self.times: list[float] = []
        self._t: float | None = None
        self.callback = _CB()


def run_once(tracked: bool, steps: int, tmp: Path) -> float:
    from datasets import Dataset
    from trl import SFTTrainer

    from em_core import tracking
    from em_core.data.training_data import prepare
    from em_core.models.loading import load_model, load_tokenizer
    from em_core.train.config import TrainConfig
    from em_core.train.training import (
        MlflowMetrics,
        _to_trl_rows,
        lora_config,
        sft_config,
    )

    cfg = TrainConfig(max_steps=steps, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                      learning_rate=5e-3, max_length=192)
    data = prepare(cfg.dataset, max_rows=200)
    tok = load_tokenizer("tiny", padding_side="right")
    rows, masking = _to_trl_rows(data.train, tok, cfg, "rows")
    timer = StepTimer()
    callbacks = [timer.callback]
    ctx = tracking.tracked_run("benchmark", "tracking-overhead") if tracked else None
    run = ctx.__enter__() if ctx else None
    if run:
        callbacks.append(MlflowMetrics(run.info.run_id))
    trainer = SFTTrainer(model=load_model("tiny"), args=sft_config(cfg, str(tmp / "out"), masking, False),
                         train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora_config(cfg), callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.train()
    if ctx:
        ctx.__exit__(None, None, None)
    wall = time.perf_counter() - t0
    body = timer.times[5:]  # skip warm-up steps
    return statistics.mean(body), wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        results = {True: [], False: []}
        for _ in range(args.repeats):
            for tracked in (False, True):
                results[tracked].append(run_once(tracked, args.steps, tmp))
    base_step = statistics.median(r[0] for r in results[False])
    tracked_step = statistics.median(r[0] for r in results[True])
    base_wall = statistics.median(r[1] for r in results[False])
    tracked_wall = statistics.median(r[1] for r in results[True])
    print(f"steps per run: {args.steps}, repeats: {args.repeats}")
    print(f"mean step time, report_to=none : {base_step * 1000:.1f} ms")
    print(f"mean step time, MLflow tracking: {tracked_step * 1000:.1f} ms")
    print(f"step-time overhead ratio: {tracked_step / base_step - 1:+.1%}  (target <= +5%)")
    print(f"train() wall time overhead: {tracked_wall / base_wall - 1:+.1%}")


if __name__ == "__main__":
    main()
