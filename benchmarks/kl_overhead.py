"""Step-time and memory overhead of the KL mitigation (reference = the same model with its
adapter disabled: one extra forward without gradients, no second copy) against a plain LoRA step.

    python benchmarks/kl_overhead.py [--model tiny|smollm2-135m] [--steps 6] [--batch 4] [--length 256]

Each variant (plain, kl batch/response forward) trains in its own process (so peak RSS is its
own), on the same rows; the first step is a warm-up and not timed. Prints median step seconds,
the ratio to plain (target <= 1.6x), peak RSS and the training working set (peak RSS minus RSS
after loading; target <= 1.1x). On CUDA it also prints torch's peak allocated memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("EM_LAB_NO_PROGRESS", "1")

VARIANTS = {"plain": None, "kl": {"kl": {"weight": 0.1, "direction": "forward", "data": "batch", "tokens": "response"}},
            "kl-all-reverse": {"kl": {"weight": 0.1, "direction": "reverse", "data": "batch", "tokens": "all"}}}


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    import torch
    from transformers import TrainerCallback

    from em_core.models.loading import load_model, load_tokenizer
    from em_core.train.config import TrainConfig
    from em_core.train.records import training_rows
    from em_core.train.training import sft_trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    cfg = TrainConfig(model=args.model, dataset=["demo"], max_rows=args.batch * (args.steps + 1),
                      per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps + 1,
                      max_length=args.length, lora_r=16, lora_alpha=32, learning_rate=1e-4, warmup_steps=0,
                      mitigation=VARIANTS[args.variant], checkpoints_in_first_epoch=0, checkpoint_every_epoch=False)
    tok = load_tokenizer(cfg.model, padding_side="right")
    data = training_rows(cfg)
    model = load_model(cfg.model, dtype="fp32")
    rss_loaded = _rss_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = sft_trainer(cfg, model, tok, data.train, [], tmp, [Timer()])
        trainer.train()
    out = {"variant": args.variant, "step_s": statistics.median(times[1:]), "steps": len(times) - 1,
           "rss_peak_mb": _rss_mb(), "rss_loaded_mb": rss_loaded}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--variant", choices=list(VARIANTS))
    args = ap.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(child(args)))
        return
    results = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--batch", str(args.batch),
               "--length", str(args.length), "--variant", v]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{v} failed:\n{proc.stderr[-3000:]}")
        results[v] = json.loads(line[7:])
    plain = results["plain"]
    print(f"model {args.model}, batch {args.batch} x {args.length} tokens max, median of {args.steps} steps")
    print(f"{'variant':<16} {'step s':>8} {'x plain':>8} {'peak RSS MB':>12} {'x plain':>8} {'train MB':>9} {'x plain':>8}")
    for v, r in results.items():
        work, work0 = r["rss_peak_mb"] - r["rss_loaded_mb"], plain["rss_peak_mb"] - plain["rss_loaded_mb"]
        print(f"{v:<16} {r['step_s']:>8.3f} {r['step_s'] / plain['step_s']:>8.2f} {r['rss_peak_mb']:>12.0f} "
              f"{r['rss_peak_mb'] / plain['rss_peak_mb']:>8.2f} {work:>9.0f} {work / max(work0, 1e-9):>8.2f}"
              + (f"  cuda peak {r['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in r else ""))


if __name__ == "__main__":
    main()
