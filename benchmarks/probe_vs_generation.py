"""Cost of the judge-free signals: the likelihood probe (+ LoRA trajectory) on N checkpoints
against evaluate's generation on the same checkpoints (target: probe <= 10% of generation).

    python benchmarks/probe_vs_generation.py [--model tiny] [--checkpoints 4] [--samples 6] [--new-tokens 48]
        [--sets general plant_care]

Checkpoints are LoRA r16 all-linear adapters on `--model` with random B (what is timed is the
work per checkpoint, not what the adapter learned). Generation is what `evaluate` does with
the shipped tiny pipeline's sampling settings by default (core_misalignment, 6 samples per
paraphrase, 48 new tokens): base + N checkpoints, one base model, adapters swapped. The probe
scores the same base + N checkpoints on the contrast sets, then the LoRA trajectory of the N
adapters. Model loading is timed separately and left out of both figures.
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
# the prebuilt tiny model, when there is one; building it first would be timed by nobody
os.environ.setdefault("EM_LAB_CACHE", os.environ.get("EM_LAB_TEST_CACHE") or os.environ.get("EM_LAB_CACHE", ""))
if not os.environ["EM_LAB_CACHE"]:
    del os.environ["EM_LAB_CACHE"]


def make_adapters(model_id: str, root: Path, n: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model

    from em_core.models.loading import load_model

    model = get_peft_model(load_model(model_id), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                            task_type="CAUSAL_LM"))
    paths = []
    torch.manual_seed(0)
    for i in range(n):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.01)
        path = root / f"checkpoint-{(i + 1) * 10}"
        model.save_pretrained(path)
        paths.append(str(path))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--checkpoints", type=int, default=4)
    ap.add_argument("--samples", type=int, default=6, help="samples per paraphrase (evaluate)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--sets", nargs="+", default=["general", "plant_care"])
    a = ap.parse_args()

    import torch

    from em_core.analysis.lora_trajectory import trajectory
    from em_core.analysis.probe import ProbeScorer
    from em_core.data.contrast_sets import load_contrast_sets
    from em_core.sample.evaluation import EvalConfig, sampling_plan
    from em_core.sample.generation import HFGenerator

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [None, *make_adapters(a.model, Path(tmp), a.checkpoints)]
        plan = sampling_plan(EvalConfig(model=a.model, samples_per_paraphrase=a.samples, max_new_tokens=a.new_tokens))

        t = time.perf_counter()
        gen = HFGenerator(a.model)
        gen_load = time.perf_counter() - t
        t = time.perf_counter()
        for ad in adapters:
            gen.generate(plan.prompts, plan.params, adapter=ad)
        gen_s = time.perf_counter() - t
        print(f"generation done: {gen_s:.2f} s", flush=True)
        del gen

        sets = load_contrast_sets(a.sets)
        t = time.perf_counter()
        scorer = ProbeScorer(a.model, sets)
        probe_load = time.perf_counter() - t
        t = time.perf_counter()
        for ad in adapters:
            scorer.score(ad)
        probe_s = time.perf_counter() - t
        t = time.perf_counter()
        trajectory({i: ad for i, ad in enumerate(adapters[1:], start=1)})
        traj_s = time.perf_counter() - t

    n_pairs = sum(len(s.pairs) for s in sets)
    print(f"model={a.model} targets={len(adapters)} (base + {a.checkpoints} checkpoints)")
    print(f"generation: {len(plan.prompts)} prompts x {a.new_tokens} new tokens x {len(adapters)} targets: {gen_s:.2f} s "
          f"(+ {gen_load:.2f} s load)")
    print(f"probe: {2 * n_pairs} answers ({n_pairs} pairs) x {len(adapters)} targets: {probe_s:.2f} s (+ {probe_load:.2f} s load); "
          f"LoRA trajectory: {traj_s:.2f} s")
    ratio = (probe_s + traj_s) / gen_s
    print(f"probe + trajectory / generation = {ratio:.1%} (target <= 10%): {'PASS' if ratio <= 0.10 else 'MISS'}")


if __name__ == "__main__":
    main()
