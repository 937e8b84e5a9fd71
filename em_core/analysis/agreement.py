"""Judge agreement: how far two (or more) judges -- or a judge and human labels -- agree.

    em judge compare RUN_OR_FILE RUN_OR_FILE [...] [--aligned_threshold 30 --coherent_threshold 50
                     --bounds inclusive|exclusive --experiment_name em-lab]

Each input is a judge run (its judgments.csv), a rescore or label run, or a judged file (CSV/JSONL,
optionally gzipped, with question_id, answer, aligned, coherent). Answers are matched on
(question_id, checkpoint_step, answer text; repeats by order). On the answers two inputs share:
Cohen's kappa on the EM label and on the coherent label, Spearman on the aligned and on the coherent
scores, the EM confusion matrix, and the EM rate by each with their paired difference and its
question-clustered interval; over all inputs, Krippendorff's alpha (nominal on the EM label,
interval on the scores; the multi-judge statistic, reported for two as well). Logged as a run
(entry point `judge_compare`) with a figure.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

from em_core import tags as em_tags
from em_core import tracking
from em_core.analysis import plots
from em_core.errors import ConfigError, DataError
from em_core.metrics import (
    ALIGNED_THRESHOLD,
    BOUNDS,
    COHERENT_THRESHOLD,
    DEFAULT_BOUNDS,
    NAN,
    Z_95,
    clustered_mean_se,
    cohen_kappa,
    confusion,
    is_em,
    krippendorff_alpha,
    spearman,
    to_score,
    wilson_interval,
)

log = logging.getLogger(__name__)
PLOT = "plots/agreement.png"


class NoSharedAnswers(DataError):
    """Two inputs judged no answer in common."""


@dataclass
class Judged:
    name: str
    source: str  # run id or path
    rows: list[dict]
    is_labels: bool = False
    smoke_test: bool = False

    def keyed(self) -> dict[tuple, dict]:
        seen: dict[tuple, int] = {}
        out = {}
        for r in self.rows:
            base = (str(r.get("question_id") or ""), _step(r), str(r.get("answer") or ""))
            k = seen.get(base, 0)
            seen[base] = k + 1
            out[(*base, k)] = r
        return out


def _step(r: dict) -> int:
    s = to_score(r.get("checkpoint_step"))
    return 0 if s is None else int(s)


def load_input(spec: str, tmp: Path) -> Judged:
    """A run id or a judged file."""
    from em_core.data.judged_files import SUPPORTED_SUFFIXES, read_judged

    if spec.endswith(SUPPORTED_SUFFIXES) or Path(spec).exists():
        rows = read_judged(spec, required=("question_id", "answer", "aligned", "coherent"))
        return Judged(Path(spec).name, spec, rows)
    import mlflow

    tracking.configure_tracking()
    client = mlflow.MlflowClient()
    with tracking.missing_as(lambda: ConfigError(
            f"{spec}: neither a judged file nor a run in {mlflow.get_tracking_uri()}")):
        run = client.get_run(spec)
    with tracking.missing_as(lambda: ConfigError(f"run {spec} ({run.info.run_name}) has no judgments.csv: "
                                                 "not a judge, rescore or label run")):
        path = mlflow.artifacts.download_artifacts(run_id=spec, artifact_path="judgments.csv",
                                                   dst_path=str(tmp / spec))
    rows = read_judged(path, required=("question_id", "answer", "aligned", "coherent"))
    tags = run.data.tags
    is_labels = tags.get(em_tags.ENTRY_POINT) == "label"
    who = "human labels" if is_labels else tags.get(em_tags.JUDGE_MODEL, "judge")
    if tags.get(em_tags.RESCORED_FROM):
        who += f" rescored {tags.get(em_tags.JUDGE_SCORING, '')}"
    return Judged(f"{who} ({run.info.run_name or spec})", spec, rows, is_labels,
                  tags.get(em_tags.JUDGE_SMOKE_TEST) == "true")


def pair_stats(a: Judged, b: Judged, aligned_threshold: float = ALIGNED_THRESHOLD,
               coherent_threshold: float = COHERENT_THRESHOLD, bounds: str = DEFAULT_BOUNDS,
               z: float = Z_95) -> dict[str, Any]:
    ka, kb = a.keyed(), b.keyed()
    shared = [k for k in ka if k in kb]
    if not shared:
        raise NoSharedAnswers(f"{a.source} vs {b.source}", "the two share no answers (matched on question_id, "
                              "checkpoint_step and answer text): compare judgments of the same answers")
    al_a, al_b, co_a, co_b, em_a, em_b, coh_a, coh_b, em_q = [], [], [], [], [], [], [], [], []
    for k in shared:
        ra, rb = ka[k], kb[k]
        xa, xb = to_score(ra.get("aligned")), to_score(rb.get("aligned"))
        ca, cb = to_score(ra.get("coherent")), to_score(rb.get("coherent"))
        al_a.append(xa)
        al_b.append(xb)
        if ca is not None and cb is not None:
            co_a.append(ca)
            co_b.append(cb)
            coh_a.append(ca > coherent_threshold)
            coh_b.append(cb > coherent_threshold)
        if None not in (xa, xb, ca, cb):
            em_a.append(is_em(xa, ca, aligned_threshold, coherent_threshold, bounds))
            em_b.append(is_em(xb, cb, aligned_threshold, coherent_threshold, bounds))
            em_q.append(k[0])
    both_al = [(x, y) for x, y in zip(al_a, al_b) if x is not None and y is not None]
    n = len(em_a)
    ra_, rb_ = (sum(em_a) / n, sum(em_b) / n) if n else (NAN, NAN)
    diff, se = clustered_mean_se([float(x) - float(y) for x, y in zip(em_a, em_b)], em_q) if n else (NAN, NAN)
    lo_a, hi_a = wilson_interval(sum(em_a), n, z)
    lo_b, hi_b = wilson_interval(sum(em_b), n, z)
    return {
        "n_shared": len(shared), "n_em_labelled": n,
        "kappa_em": cohen_kappa(em_a, em_b), "kappa_coherent": cohen_kappa(coh_a, coh_b),
        "spearman_aligned": spearman([x for x, _ in both_al], [y for _, y in both_al]),
        "spearman_coherent": spearman(co_a, co_b),
        "confusion_em": confusion(em_a, em_b, [True, False]),
        "em_rate_a": ra_, "em_rate_a_lo": lo_a, "em_rate_a_hi": hi_a,
        "em_rate_b": rb_, "em_rate_b_lo": lo_b, "em_rate_b_hi": hi_b,
        "em_rate_diff": diff,
        "em_rate_diff_lo": diff - z * se if not math.isnan(se) else NAN,
        "em_rate_diff_hi": diff + z * se if not math.isnan(se) else NAN,
        "aligned_a": [x for x in al_a], "aligned_b": [y for y in al_b],
    }


def alpha_stats(inputs: Sequence[Judged], aligned_threshold: float = ALIGNED_THRESHOLD,
                coherent_threshold: float = COHERENT_THRESHOLD, bounds: str = DEFAULT_BOUNDS) -> dict[str, float]:
    """Krippendorff's alpha over every answer judged by at least two inputs."""
    keyed = [j.keyed() for j in inputs]
    keys = list(dict.fromkeys(k for kd in keyed for k in kd))
    em_units, al_units, co_units = [], [], []
    for k in keys:
        em_u, al_u, co_u = [], [], []
        for kd in keyed:
            r = kd.get(k)
            a = to_score(r.get("aligned")) if r else None
            c = to_score(r.get("coherent")) if r else None
            al_u.append(a)
            co_u.append(c)
            em_u.append(None if a is None or c is None else is_em(a, c, aligned_threshold, coherent_threshold, bounds))
        em_units.append(em_u)
        al_units.append(al_u)
        co_units.append(co_u)
    return {"alpha_em": krippendorff_alpha(em_units, "nominal"),
            "alpha_aligned": krippendorff_alpha(al_units, "interval"),
            "alpha_coherent": krippendorff_alpha(co_units, "interval")}


def check_label_questions(inputs: Sequence[Judged]) -> None:
    """Human labels whose question ids no judge input has: a named error (wrong file or run)."""
    for i, j in enumerate(inputs):
        if not j.is_labels:
            continue
        others = {str(r.get("question_id")) for k, o in enumerate(inputs) if k != i for r in o.rows}
        unknown = sorted({str(r.get("question_id")) for r in j.rows} - others)
        if unknown:
            raise DataError(j.source, f"label(s) for question ids no other input has: {', '.join(unknown[:10])}",
                            hint="compare labels with the judge run they were sampled from")


def compare(specs: Sequence[str], *, aligned_threshold: float = ALIGNED_THRESHOLD,
            coherent_threshold: float = COHERENT_THRESHOLD, bounds: str = DEFAULT_BOUNDS, z: float = Z_95,
            experiment_name: str = "em-lab", log_run: bool = True) -> dict[str, Any]:
    if len(specs) < 2:
        raise ConfigError("em judge compare needs at least two judge runs or judged files")
    if bounds not in BOUNDS:
        raise ConfigError(f"--bounds: unknown {bounds!r}; use {' or '.join(BOUNDS)}")
    import mlflow

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        inputs = [load_input(s, tmp) for s in specs]
        check_label_questions(inputs)
        names = [j.name for j in inputs]
        pairs = []
        for i, k in combinations(range(len(inputs)), 2):
            st = pair_stats(inputs[i], inputs[k], aligned_threshold, coherent_threshold, bounds, z)
            pairs.append({"a": i, "b": k, **st})
        result: dict[str, Any] = {"inputs": [{"name": j.name, "source": j.source} for j in inputs],
                                  "aligned_threshold": aligned_threshold, "coherent_threshold": coherent_threshold,
                                  "bounds": bounds, "pairs": pairs,
                                  **alpha_stats(inputs, aligned_threshold, coherent_threshold, bounds)}
        smoke = any(j.smoke_test for j in inputs)
        png = plots.plot_agreement(names, pairs, tmp / PLOT, smoke_test=smoke)
        (tmp / "agreement.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        result["run_id"] = None
        if log_run:
            tags = {em_tags.ENTRY_POINT: "judge_compare", em_tags.COMPARED: ",".join(specs)[:4000]}
            with tracking.tracked_run(experiment_name, tracking.descriptive_name("judge-compare"), tags=tags) as run:
                if run is not None:
                    result["run_id"] = run.info.run_id
                    tracking.log_params("compare", {"inputs": ",".join(specs)[:500],
                                                    "aligned_threshold": aligned_threshold,
                                                    "coherent_threshold": coherent_threshold, "bounds": bounds})
                    mlflow.log_artifact(str(tmp / "agreement.json"))
                    mlflow.log_artifact(str(png), "plots")
                    mlflow.log_artifact(str(png.with_suffix(".json")), "plots")
                    mlflow.log_metrics(_metrics(result))
    return result


PAIR_KEYS = ("n_shared", "kappa_em", "kappa_coherent", "spearman_aligned", "spearman_coherent", "em_rate_a",
             "em_rate_b", "em_rate_diff", "em_rate_diff_lo", "em_rate_diff_hi")


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    out = {k: result[k] for k in ("alpha_em", "alpha_aligned", "alpha_coherent")}
    for p in result["pairs"]:
        prefix = "" if len(result["pairs"]) == 1 else f"pair/{p['a']}-{p['b']}/"
        out.update({prefix + k: float(p[k]) for k in PAIR_KEYS})
    return {k: v for k, v in out.items() if not math.isnan(v)}


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="em judge compare", description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="judge/rescore/label run ids or judged files")
    ap.add_argument("--aligned_threshold", type=float, default=ALIGNED_THRESHOLD)
    ap.add_argument("--coherent_threshold", type=float, default=COHERENT_THRESHOLD)
    ap.add_argument("--bounds", choices=BOUNDS, default=DEFAULT_BOUNDS)
    ap.add_argument("--z", type=float, default=Z_95)
    ap.add_argument("--experiment_name", default="em-lab")
    ns = ap.parse_args(argv)
    res = compare(ns.inputs, aligned_threshold=ns.aligned_threshold, coherent_threshold=ns.coherent_threshold,
                  bounds=ns.bounds, z=ns.z, experiment_name=ns.experiment_name)
    for i, j in enumerate(res["inputs"]):
        print(f"[{i}] {j['name']}: {j['source']}")
    for p in res["pairs"]:
        print(f"[{p['a']}] vs [{p['b']}]: n_shared={p['n_shared']} kappa_em={p['kappa_em']:.3f} "
              f"kappa_coherent={p['kappa_coherent']:.3f} spearman_aligned={p['spearman_aligned']:.3f} "
              f"spearman_coherent={p['spearman_coherent']:.3f} em_rate_a={p['em_rate_a']:.4f} "
              f"em_rate_b={p['em_rate_b']:.4f} em_rate_diff={p['em_rate_diff']:+.4f} "
              f"[{p['em_rate_diff_lo']:+.4f}, {p['em_rate_diff_hi']:+.4f}]")
    print(f"alpha_em={res['alpha_em']:.3f} alpha_aligned={res['alpha_aligned']:.3f} "
          f"alpha_coherent={res['alpha_coherent']:.3f} compare_run_id={res['run_id']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`em judge compare RUN_A RUN_B [...]`."""
    import sys

    from em_core.console import run_main

    return run_main(_main, argv if argv is not None else sys.argv[1:])
