"""Runtime of a steering sweep: 3 layers x 4 alphas on the tiny model, on CPU.

    python benchmarks/directions_sweep.py [--layers 1 2 3] [--alphas 0 2 4 8] [--seeds 0] [--samples 1]

Fine-tunes the tiny model on the careless plant-care set (timed apart), then runs
`em directions steer` on it in a private MLflow store: extraction, and for every condition a
child run with evaluate -> judge (local tiny judge) and the plant-care probe margin, with one
random-direction control per seed. Prints wall time in total and per condition, and the margins.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("EM_LAB_NO_PROGRESS", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 2.0, 4.0, 8.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        from em_core.experiments.directions import DirectionsConfig, run_directions
        from em_core.models.adapters import checkpoint_uri, download_adapter
        from em_core.train.config import TrainConfig
        from em_core.train.training import train

        t0 = time.perf_counter()
        tr = train(TrainConfig(model="tiny", dataset=["demo"], max_rows=96, per_device_train_batch_size=8,
                               gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=5e-3, lora_r=8, lora_alpha=16, max_length=192,
                               warmup_steps=1, checkpoints_in_first_epoch=1, output_dir=f"{tmp}/out",
                               registered_model_name="bench-tiny", experiment_name="bench"))
        adapter = download_adapter(checkpoint_uri(tr.run_id, tr.checkpoint_steps[-1]), Path(tmp) / "adapter")
        t_train = time.perf_counter() - t0
        cfg = DirectionsConfig(action="steer", model="tiny", fine_tuned=adapter, layers=args.layers,
                               alphas=args.alphas, random_seeds=args.seeds, samples_per_paraphrase=args.samples,
                               max_new_tokens=args.new_tokens, judge_backend="local", probe_pairs=64,
                               experiment_name="bench")
        t0 = time.perf_counter()
        res = run_directions(cfg)
        total = time.perf_counter() - t0
    n = len(res.conditions)
    print(f"fine-tune: {t_train:.1f} s")
    print(f"steering sweep {len(args.layers)} layers x {len(args.alphas)} alphas, {len(args.seeds)} random seed(s): "
          f"{n} conditions in {total:.1f} s ({total / n:.1f} s per condition, extraction included)")
    for c in res.conditions:
        print(f"  {c['name']:28s} margin {c['probe/margin']:+.3f}  em_rate {c.get('em_rate', float('nan')):.3f}  "
              f"coherent_rate {c.get('coherent_rate', float('nan')):.3f}")


if __name__ == "__main__":
    main()
