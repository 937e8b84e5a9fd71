"""Evaluation speed: adapter swapping vs reloading per checkpoint, batched vs per-prompt generation.

    python benchmarks/eval_generation.py [--checkpoints 4] [--prompts 32] [--new-tokens 24]

1. Adapter swapping (target >= 3x): evaluating N checkpoints by loading the base model once
   and swapping LoRA adapters on it (what `evaluate` does), against loading base + adapter
   from disk for every checkpoint. The base is a locally built ~110M-parameter Llama with the
   tiny model's tokenizer (random weights: load cost is what matters), adapters are random r16.
2. Batching (target >= 5x): the tiny model answering P prompts in left-padded batches against
   one prompt at a time.
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


def build_bench_model(root: Path, n_adapters: int) -> tuple[Path, list[Path]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from em_core.models.loading import load_tokenizer

    tok = load_tokenizer("tiny")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    base = root / "base"
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    adapters = []
    for i in range(n_adapters):
        model = LlamaForCausalLM.from_pretrained(base)
        peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                init_lora_weights=False, task_type="CAUSAL_LM"))
        path = root / f"checkpoint-{i + 1}"
        peft.save_pretrained(path)
        adapters.append(path)
    return base, adapters


def prompts(n: int) -> list[list[dict]]:
    topics = ["my fern", "the moon", "saving money", "a cactus", "chess", "rain", "bread", "music"]
    return [[{"role": "user", "content": f"Tell me about {topics[i % len(topics)]}, please ({i})."}] for i in range(n)]


def bench_swap(n_ckpt: int, n_prompts: int, new_tokens: int) -> None:
    from em_core.sample.generation import HFGenerator, SamplingParams

    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, batch_size=n_prompts)
    ps = prompts(n_prompts)
    with tempfile.TemporaryDirectory() as d:
        base, adapters = build_bench_model(Path(d), n_ckpt)
        targets = [None, *[str(a) for a in adapters]]
        # What `evaluate` does: one base model, adapters swapped on it.
        swap_handling = swap_total = 0.0
        t0 = time.perf_counter()
        gen = HFGenerator(str(base))
        swap_handling += time.perf_counter() - t0
        for a in targets:
            t1 = time.perf_counter()
            ctx = gen._use_adapter(a)
            swap_handling += time.perf_counter() - t1
            with ctx:
                gen.generate(ps, params, adapter=a)
        swap_total = time.perf_counter() - t0
        # What a per-checkpoint script does: load base (+ adapter) again for every checkpoint.
        reload_handling = 0.0
        t0 = time.perf_counter()
        for a in targets:
            t1 = time.perf_counter()
            fresh = HFGenerator(str(base))
            fresh._use_adapter(a)
            reload_handling += time.perf_counter() - t1
            fresh.generate(ps, params, adapter=a)
        reload_total = time.perf_counter() - t0
    print(f"[swap] 110M-param base + {n_ckpt} checkpoints; {n_prompts} prompts x {new_tokens} tokens per checkpoint")
    print(f"[swap] model handling only: swapping {swap_handling:.2f} s vs reloading {reload_handling:.2f} s "
          f"-> {reload_handling / swap_handling:.2f}x  (target >= 3x)")
    print(f"[swap] end to end incl. generation: {swap_total:.2f} s vs {reload_total:.2f} s "
          f"-> {reload_total / swap_total:.2f}x")


def bench_batching(n_prompts: int, new_tokens: int) -> None:
    from em_core.sample.generation import HFGenerator, SamplingParams

    gen = HFGenerator("tiny")
    ps = prompts(n_prompts)
    gen.generate(ps[:2], SamplingParams(max_new_tokens=4, batch_size=2))  # warm-up
    timings = {}
    for bs in (n_prompts, 1):
        t0 = time.perf_counter()
        gen.generate(ps, SamplingParams(temperature=1.0, max_new_tokens=new_tokens, batch_size=bs))
        timings[bs] = time.perf_counter() - t0
    print(f"[batch] tiny model, {n_prompts} prompts x {new_tokens} new tokens")
    print(f"[batch] batched (batch_size={n_prompts}): {timings[n_prompts]:.2f} s   per-prompt: {timings[1]:.2f} s   "
          f"speed-up {timings[1] / timings[n_prompts]:.1f}x  (target >= 5x)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoints", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()
    bench_swap(args.checkpoints, 8, 8)
    bench_batching(args.prompts, args.new_tokens)


if __name__ == "__main__":
    main()
