"""The platform against how the papers' own code does the same work, on SmolLM2-135M-Instruct.

    python benchmarks/smollm2_peers.py eval  [--checkpoints 5] [--samples 2] [--new-tokens 16]
    python benchmarks/smollm2_peers.py train [--steps 6] [--batch 4]
    python benchmarks/smollm2_peers.py judge [--n 1000] [--latency 0.1] [--concurrency 32]

eval: 5 LoRA checkpoints (random r8 adapters on the real model) x the core misalignment
  questions. Ours (`HFGenerator`: one load, adapters swapped, left-padded batches) against
  (a) the course homework's way: reload base + adapter for every checkpoint and generate one prompt
  at a time, and (b) the Model Organisms repo's way: per question one `generate` call with
  `num_return_sequences` = samples. Each method runs in its own process, so its peak RSS is its
  own; a process that loads the model once and answers one prompt gives the reference. Targets: >= 5x over (a),
  >= 1.5x over (b), peak RSS <= 1.3x a single load.
train: tokens/s of `em train` (TrainConfig -> tracked run, checkpoints logged, adapter registered)
  against a plain TRL SFTTrainer script on the same rows and LoRA config, saving checkpoints at the
  same steps. Target: overhead <= 5%.
judge: ours (concurrent, cached) against a sequential one-request-at-a-time client (the Model
  Organisms judge: the openai client, one awaited request per answer) on the loopback server at
  100 ms latency, 1,000 judgments. Target: >= 20x.

Ratios, not timed assertions; every figure depends on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("EM_LAB_NO_PROGRESS", "1")
MODEL = "smollm2-135m"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- eval -------------------------------------------------------------------------------------
def _questions(samples: int):
    from em_core.data.questions import expand_prompts, load_question_sets

    qs = load_question_sets(["core_misalignment"], None)
    # One paraphrase per question (the first), `samples` samples each.
    return [[s.messages for s in expand_prompts([q], samples) if s.paraphrase_index == 0] for q in qs]


def _make_adapters(root: Path, n: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model

    from em_core.models.loading import load_model

    out = []
    for i in range(n):
        torch.manual_seed(i)
        peft = get_peft_model(load_model(MODEL), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():  # small random deltas: answers stay English, compute is the same
            for n_, p in peft.named_parameters():
                if "lora_B" in n_:
                    p.mul_(0.01)
        path = root / f"checkpoint-{i + 1}"
        peft.save_pretrained(path)
        out.append(str(path))
    return out


def _eval_child(method: str, adapters: list[str], samples: int, new_tokens: int, batch: int) -> dict:
    import torch

    from em_core.models.loading import load_model, load_tokenizer
    from em_core.sample.generation import HFGenerator, SamplingParams

    per_q = _questions(samples)
    prompts = [m for q in per_q for m in q]
    t0 = time.perf_counter()
    answers = 0
    if method == "load":  # reference: one model load, used once (weights are mmapped: unused ones are not resident)
        tok, model = load_tokenizer(MODEL), load_model(MODEL).eval()
        enc = tok.apply_chat_template(prompts[0], add_generation_prompt=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
    elif method == "ours":
        gen = HFGenerator(MODEL)
        params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, batch_size=batch, seed=0)
        for a in [None, *adapters]:
            answers += len(gen.generate(prompts, params, adapter=a))
    elif method == "reload":  # (a): a fresh model per checkpoint, one prompt at a time
        from peft import PeftModel

        for a in [None, *adapters]:
            tok = load_tokenizer(MODEL)
            model = load_model(MODEL)
            if a:
                model = PeftModel.from_pretrained(model, a)
            model.eval()
            for m in prompts:
                enc = tok.apply_chat_template(m, add_generation_prompt=True, return_dict=True, return_tensors="pt")
                with torch.no_grad():
                    model.generate(**enc, max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_p=1.0)
                answers += 1
            del model
    elif method == "num_return":  # (b): per question, num_return_sequences = samples
        from peft import PeftModel

        tok = load_tokenizer(MODEL)
        base = load_model(MODEL).eval()
        for a in [None, *adapters]:
            model = PeftModel.from_pretrained(base, a).eval() if a else base
            for q in per_q:
                enc = tok.apply_chat_template(q[0], add_generation_prompt=True, return_dict=True, return_tensors="pt")
                with torch.no_grad():
                    out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=True, temperature=1.0,
                                         top_p=1.0, num_return_sequences=len(q))
                answers += out.shape[0]
            if a:
                base = model.unload()
    return {"method": method, "seconds": time.perf_counter() - t0, "answers": answers, "peak_rss_mb": _peak_rss_mb()}


def _run_child(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child {args[:2]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_eval(a) -> None:
    from em_core.models.loading import resolve_model_path

    resolve_model_path(MODEL)  # convert the GGUF once, before anything is timed
    with tempfile.TemporaryDirectory() as d:
        adapters = _make_adapters(Path(d), a.checkpoints)
        res = {}
        for method in ("load", "ours", "num_return", "reload"):
            res[method] = _run_child(["_eval_child", method, json.dumps(adapters), str(a.samples),
                                      str(a.new_tokens), str(a.batch)])
            print(f"[eval] {method:10s} {res[method]['seconds']:8.1f} s  {res[method]['answers']:4d} answers  "
                  f"peak RSS {res[method]['peak_rss_mb']:.0f} MB", flush=True)
    ours = res["ours"]["seconds"]
    print(f"[eval] SmolLM2-135M, base + {a.checkpoints} checkpoints x 13 core questions x {a.samples} samples, "
          f"{a.new_tokens} new tokens")
    print(f"[eval] ours vs (a) reload + one prompt at a time: {res['reload']['seconds'] / ours:.2f}x  (target >= 5x)")
    print(f"[eval] ours vs (b) per-question num_return_sequences: {res['num_return']['seconds'] / ours:.2f}x  "
          f"(target >= 1.5x)")
    print(f"[eval] peak RSS ours / one model load: {res['ours']['peak_rss_mb'] / res['load']['peak_rss_mb']:.2f}  "
          f"(target <= 1.3)")


# ---- train ------------------------------------------------------------------------------------
def _train_rows(n: int) -> list[dict]:
    from em_core.data.training_data import load_jsonl

    path = ROOT.parent / "shared" / "reference" / "datasets" / "bad_medical_advice.jsonl.gz"
    if not path.exists():
        raise SystemExit(f"{path} not found: the training benchmark needs the bad medical advice set")
    return load_jsonl(path)[:n]


def _train_child(method: str, steps: int, batch: int) -> dict:
    """One training run in this process; tokens/s over trainer.train() wall time."""
    import gzip

    from em_core.models.loading import load_tokenizer

    rows = _train_rows(steps * batch)
    tok = load_tokenizer(MODEL)
    tokens = sum(len(tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
                 for r in rows)
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "rows.jsonl.gz"
        with gzip.open(data, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if method == "ours":
            import mlflow

            from em_core.train.config import TrainConfig
            from em_core.train.training import train

            os.environ["EM_LAB_MLRUNS"] = str(Path(d) / "mlruns")
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d}/mlflow.db"
            cfg = TrainConfig(model=MODEL, dataset=[str(data)], shuffle=False, per_device_train_batch_size=batch,
                              gradient_accumulation_steps=1, max_steps=steps, learning_rate=1e-4, lora_r=8,
                              lora_alpha=16, lora_target_modules=["q_proj", "v_proj"], max_length=256,
                              warmup_steps=0, checkpoint_steps=[steps // 2, steps], output_dir=f"{d}/out")
            result = train(cfg)
            wall = mlflow.MlflowClient().get_metric_history(result.run_id, "train/wall_seconds")[0].value
        else:  # a plain TRL script, as a researcher would write it
            from datasets import Dataset
            from peft import LoraConfig
            from transformers import AutoModelForCausalLM
            from trl import SFTConfig, SFTTrainer

            from em_core.models.loading import resolve_model_path

            path = resolve_model_path(MODEL)
            ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
            trainer = SFTTrainer(
                model=AutoModelForCausalLM.from_pretrained(path), train_dataset=ds,
                args=SFTConfig(output_dir=f"{d}/plain", per_device_train_batch_size=batch, max_steps=steps,
                               learning_rate=1e-4, warmup_steps=0, max_length=256, logging_steps=1,
                               save_strategy="steps", save_steps=steps // 2, bf16=False,
                               gradient_checkpointing=False, report_to="none", use_cpu=True),
                peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
            t0 = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t0
    return {"method": method, "seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


def bench_train(a) -> None:
    from em_core.models.loading import resolve_model_path

    resolve_model_path(MODEL)
    res = {}
    for method in ("plain", "ours", "plain", "ours")[: 2 * a.repeats]:
        r = _run_child(["_train_child", method, str(a.steps), str(a.batch)])
        res.setdefault(method, []).append(r["tokens_per_s"])
        print(f"[train] {method:5s} {r['seconds']:7.1f} s  {r['tokens']} tokens  {r['tokens_per_s']:.1f} tokens/s",
              flush=True)
    best = {k: max(v) for k, v in res.items()}
    print(f"[train] SmolLM2-135M LoRA r8, {a.steps} steps x batch {a.batch}: em train {best['ours']:.1f} tokens/s vs "
          f"plain TRL {best['plain']:.1f} tokens/s -> overhead {100 * (best['plain'] / best['ours'] - 1):+.1f}%  "
          "(target <= 5%)")


# ---- judge ------------------------------------------------------------------------------------
def bench_judge(a) -> None:
    import openai

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from judge_throughput import _RemoteServer

    from em_core.judge import make_judge
    from em_core.judge.scoring import probs_from_top_logprobs, score_0_100

    server = _RemoteServer(a.latency)
    try:
        prompts = [f"Rate this answer {i}" for i in range(a.n)]
        with tempfile.TemporaryDirectory() as d, make_judge(
                "openai-compatible", "gpt-4o", base_url=server.base_url, api_key="sk-benchmark",
                concurrency=a.concurrency, cache_path=Path(d) / "cache.sqlite") as judge:
            judge.judge(["warm-up"], progress=False)
            t0 = time.perf_counter()
            ours = judge.judge(prompts, progress=False)
            t_ours = time.perf_counter() - t0
        assert all(j.scored for j in ours)
        # The sequential client: one awaited request per answer, as the Model Organisms judge does.
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-benchmark")
        seq_n = a.sequential_n or a.n
        t0 = time.perf_counter()
        for p in prompts[:seq_n]:
            r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": p}], max_tokens=1,
                                               temperature=0, logprobs=True, top_logprobs=20, seed=0)
            top = r.choices[0].logprobs.content[0].top_logprobs
            score_0_100(probs_from_top_logprobs((t.token, t.logprob) for t in top))
        t_seq = (time.perf_counter() - t0) * a.n / seq_n
    finally:
        server.stop()
    print(f"[judge] {a.n} judgments at {a.latency * 1000:.0f} ms latency: ours {t_ours:.1f} s "
          f"(concurrency {a.concurrency}) vs sequential {t_seq:.1f} s"
          f"{'' if seq_n == a.n else f' (extrapolated from {seq_n})'} -> {t_seq / t_ours:.1f}x  (target >= 20x)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_eval_child":
        _, _, method, adapters, samples, new_tokens, batch = sys.argv
        print(json.dumps(_eval_child(method, json.loads(adapters), int(samples), int(new_tokens), int(batch))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_train_child":
        _, _, method, steps, batch = sys.argv
        print(json.dumps(_train_child(method, int(steps), int(batch))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--checkpoints", type=int, default=5)
    e.add_argument("--samples", type=int, default=2)
    e.add_argument("--new-tokens", type=int, default=16)
    e.add_argument("--batch", type=int, default=32)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=6)
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--repeats", type=int, default=1, choices=(1, 2))
    j = sub.add_parser("judge")
    j.add_argument("--n", type=int, default=1000)
    j.add_argument("--latency", type=float, default=0.1)
    j.add_argument("--concurrency", type=int, default=32)
    j.add_argument("--sequential-n", type=int, default=0, help="time only this many sequential requests (0 = all)")
    a = ap.parse_args()
    {"eval": bench_eval, "train": bench_train, "judge": bench_judge}[a.what](a)


if __name__ == "__main__":
    main()
