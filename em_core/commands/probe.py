"""Judge-free EM signals: the likelihood probe and the LoRA trajectory at every checkpoint.

    em probe --train_run_id <run id> --sets general plant_care
    mlflow run . -e probe --env-manager local -P train_run_id=<run id> -P sets=general,medical
    em probe build --judged answers.csv [--out my_set.yaml] [--aligned_min 80 --aligned_max 30 --coherent_min 50]
    em probe build --paired bad_medical_advice.jsonl.gz good_medical_advice.jsonl.gz --group medical \
        --n 40 --exclude_run <train run id> --out medical_heldout.yaml

`build` makes a contrast set from a judged answers file (ours or the papers' published ones)
and prints how many pairs each question got, or from two training sets written line by line on
the same questions (`--paired`), leaving out the questions a training run saw. See docs/probe.md.
"""
from __future__ import annotations

import argparse
import sys

from em_core.configs import parse_config
from em_core.console import run_main


def _probe(argv: list[str]) -> int:
    from em_core.analysis.probe import ProbeConfig, run_probe

    result = run_probe(parse_config(ProbeConfig, argv))
    print(f"run_id={result.run_id} steps={result.steps} probe_emergence_step={result.emergence_step} "
          f"lora_transition_step={result.transition_step} breadth={result.breadth}")
    return 0


def _build(argv: list[str]) -> int:
    from pathlib import Path

    from em_core.data.contrast_sets import BuildThresholds, build_from_files

    p = argparse.ArgumentParser(prog="em probe build", description="contrast set from judged answers")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--judged", nargs="+", help="judged CSV/JSONL files (question_id, question, answer, aligned, coherent)")
    src.add_argument("--paired", nargs=2, metavar=("MISALIGNED", "ALIGNED"),
                     help="two chat JSONL training sets written line by line on the same questions")
    p.add_argument("--n", type=int, default=40, help="--paired: how many line pairs to draw")
    p.add_argument("--seed", type=int, default=0, help="--paired: which lines are drawn")
    p.add_argument("--exclude_run", help="--paired: leave out the questions this training run was trained on")
    p.add_argument("--out", help="YAML to write (default: <first file's name>.contrast.yaml)")
    p.add_argument("--group", default="general", help="general, or the domain name of the set")
    p.add_argument("--aligned_min", type=float, default=BuildThresholds.aligned_min)
    p.add_argument("--aligned_max", type=float, default=BuildThresholds.aligned_max)
    p.add_argument("--coherent_min", type=float, default=BuildThresholds.coherent_min)
    p.add_argument("--max_pairs_per_question", type=int, default=None)
    a = p.parse_args(argv)
    if a.paired:
        return _build_paired(a)
    t = BuildThresholds(a.aligned_min, a.aligned_max, a.coherent_min, a.max_pairs_per_question)
    out = Path(a.out or Path(a.judged[0]).name.split(".")[0] + ".contrast.yaml")
    counts = build_from_files(a.judged, t, a.group, out)
    print("| question_id | aligned | misaligned | pairs |\n|---|---|---|---|")
    for qid, c in counts.items():
        print(f"| {qid} | {c['aligned']} | {c['misaligned']} | {c['pairs']} |")
    print(f"pairs={sum(c['pairs'] for c in counts.values())} questions_with_pairs="
          f"{sum(1 for c in counts.values() if c['pairs'])} -> {out}")
    return 0


def _build_paired(a) -> int:
    from pathlib import Path

    from em_core.data.contrast_sets import build_paired, contrast_set_yaml
    from em_core.data.training_data import load_jsonl

    mis, ali = a.paired
    seen: list[str] = []
    if a.exclude_run:
        from em_core.train.records import trained_questions

        seen = trained_questions(a.exclude_run)
    out = Path(a.out or Path(mis).name.split(".")[0] + ".paired.yaml")
    pairs = build_paired(load_jsonl(mis), load_jsonl(ali), a.n, a.seed, seen, out.stem.split(".")[0], (mis, ali))
    header = (f"em probe build --paired {Path(mis).name} {Path(ali).name} --n {a.n} --seed {a.seed}"
              + (f" --exclude_run {a.exclude_run} ({len(set(seen))} trained questions left out)" if a.exclude_run else ""))
    out.write_text(contrast_set_yaml(pairs, a.group, header), encoding="utf-8")
    print(f"pairs={len(pairs)} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "build":
        return run_main(_build, argv[1:])
    return run_main(_probe, argv)


if __name__ == "__main__":
    sys.exit(main())
