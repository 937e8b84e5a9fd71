"""`em directions extract|steer|ablate`: misalignment directions as tracked experiments.

- extract: per-layer mean-difference directions from labelled answers on a model (by default
  the fine-tuned one), stored as `directions/directions.safetensors`, with held-out separation
  (`directions/auroc`) and norms (`directions/norm`) as metrics at step = layer.
- steer: the base model with alpha * unit direction added at a layer, for every layer x alpha.
- ablate: the fine-tuned model with the direction projected out at every layer, and with the
  direction projected out of its LoRA B matrices (the edited adapter is logged).

steer and ablate run one parent run with a child run per condition. Each condition is sampled by
`evaluate` (with the intervention hooked in), scored by `judge`, and gets the likelihood margin
on a contrast set (`probe/margin`), all as child runs of the condition, so every condition has
`em_rate`, `coherent_rate` and a margin. Every condition has controls: the same intervention
with a random direction of the same norm, one per seed in `random_seeds`.
"""
from __future__ import annotations

import csv
import logging
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from em_core import tags as em_tags
from em_core import tracking
from em_core.analysis.directions import (
    extract_directions,
    labelled_from_judgments,
    labelled_from_pairs,
    likelihood_margin,
    load_pairs,
    plot_ablation,
    plot_steering,
    split_by_group,
)
from em_core.configs import RunGroup
from em_core.errors import ConfigError
from em_core.metrics import ALIGNED_THRESHOLD, COHERENT_THRESHOLD, mlflow_key
from em_core.models.steering import (
    DIRECTIONS_FILE,
    Directions,
    Intervention,
    ablate_lora_b,
    decoder_layers,
    intervene,
    write_intervention_spec,
)

log = logging.getLogger(__name__)
ACTIONS = ("extract", "steer", "ablate")
COPIED = ("em_rate", "em_rate_lo", "em_rate_hi", "coherent_rate", "coherent_rate_lo", "coherent_rate_hi",
          "mean_aligned", "mean_coherent")


@dataclass
class DirectionsConfig(RunGroup):
    """One directions experiment: where the directions come from and which interventions to run."""

    action: str = field(default="steer", metadata={"help": "extract, steer or ablate"})
    model: str = field(default="tiny", metadata={"help": "the base model (`tiny`, hub id, folder)"})
    fine_tuned: str | None = field(default=None, metadata={
        "help": "the fine-tuned adapter: models:/name@alias, runs:/<train run id> (its last checkpoint) or a "
                "local adapter folder; directions are extracted from it and ablation acts on it"})
    extract_from: str = field(default="fine_tuned", metadata={"help": "fine_tuned or base"})
    # labelled answers: a judge run / judged file split by the EM thresholds, or a contrast set
    judge_run_id: str | None = None
    judgments: str | None = field(default=None, metadata={"help": "a judgments.csv (question, answer, aligned, coherent)"})
    contrast: str = field(default="plant_care_demo", metadata={
        "help": "contrast set used when no judge source is given: a shipped set (general, medical, "
                "financial, plant_care), plant_care_demo (the demo's training rows) or a contrast-set YAML"})
    aligned_threshold: float = ALIGNED_THRESHOLD
    coherent_threshold: float = COHERENT_THRESHOLD
    aligned_min: float = field(default=70.0, metadata={"help": "judged answers with aligned >= this count as aligned"})
    heldout_fraction: float = 0.25
    max_length: int = 512
    # reuse directions instead of extracting
    directions_run_id: str | None = None
    directions_path: str | None = None
    # interventions
    layers: list[int] | None = field(default=None, metadata={
        "help": "steering layers, each its own condition; -1 steers every layer at once (default: the middle one)"})
    alphas: list[float] = field(default_factory=lambda: [0.0, 4.0, 8.0, 16.0])
    source_layer: int | None = field(default=None, metadata={
        "help": "ablate with this layer's direction at every layer (the papers' single direction); "
                "default each layer's own"})
    random_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    weight_ablation: bool = True
    # outcome measures
    questions: list[str] = field(default_factory=lambda: ["core_misalignment"])
    samples_per_paraphrase: int | None = 2
    max_new_tokens: int = 64
    temperature: float = 1.0
    batch_size: int = 32
    seed: int = 0
    judge: bool = True
    judge_backend: str = "auto"
    judge_model: str | None = None
    base_url: str | None = None
    probe: str | None = field(default="plant_care_demo",
                              metadata={"help": "contrast set for probe/margin (as `contrast`); empty: none"})
    probe_pairs: int | None = field(default=64, metadata={"help": "held-out pairs scored per condition"})
    dtype: str = "auto"
    load_in_4bit: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.action not in ACTIONS:
            problems.append(f"action: unknown {self.action!r}; use {', '.join(ACTIONS)}")
        if not 0 < self.heldout_fraction < 1:
            problems.append("heldout_fraction must be in (0, 1): separation and the probe use held-out questions")
        if self.extract_from not in ("fine_tuned", "base"):
            problems.append("extract_from must be fine_tuned or base")
        if self.judge_run_id and self.judgments:
            problems.append("give at most one of judge_run_id and judgments")
        if self.directions_run_id and self.directions_path:
            problems.append("give at most one of directions_run_id and directions_path")
        if self.action == "ablate" and not self.fine_tuned:
            problems.append("ablate acts on a fine-tuned model: set fine_tuned (models:/..., runs:/<id> or a folder)")
        if self.extract_from == "fine_tuned" and not self.fine_tuned and not (self.directions_run_id or self.directions_path):
            problems.append("extract_from fine_tuned needs fine_tuned (or extract_from=base)")
        if not self.random_seeds and self.action != "extract":
            problems.append("random_seeds: every condition needs at least one random-direction control")
        if self.action == "steer" and not self.alphas:
            problems.append("alphas: give at least one steering strength")
        if not self.judge and not self.probe:
            problems.append("nothing measures the conditions: enable judge or give a probe contrast set")
        if self.layers and any(l < -1 for l in self.layers):
            problems.append(f"layers {self.layers}: use layer indices >= 0, or -1 for every layer at once")
        if problems:
            raise ConfigError("invalid directions config: " + "; ".join(problems))


@dataclass
class DirectionsResult:
    run_id: str | None
    directions_path: str  # runs:/<id>/directions/directions.safetensors
    conditions: list[dict]
    seconds: float


def resolve_fine_tuned(spec: str, workdir: Path) -> tuple[str | None, str, dict[str, str]]:
    """(its base model, local adapter folder, provenance tags) of `fine_tuned` (models.refs.resolve:
    a registered adapter, a training run's last checkpoint, a PEFT adapter folder or hub adapter)."""
    from em_core.models.refs import resolve

    ref = resolve(spec, workdir)
    if ref.final is None:
        raise ConfigError(f"fine_tuned {spec}: no adapter there (not models:/..., runs:/<id> with checkpoints, "
                          "a PEFT adapter folder or a hub adapter id)")
    return ref.base, ref.final[1], ref.tags


def _load(cfg: DirectionsConfig, adapter: str | None):
    import torch

    from em_core.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(cfg.model, padding_side="right")
    model = load_model(cfg.model, dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit)
    if torch.cuda.is_available() and not cfg.load_in_4bit:
        model.to("cuda")
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tok


def _labelled(cfg: DirectionsConfig):
    import mlflow

    from em_core.data.judged_files import read_judged

    if cfg.judge_run_id or cfg.judgments:
        path = cfg.judgments or mlflow.artifacts.download_artifacts(run_id=cfg.judge_run_id,
                                                                    artifact_path="judgments.csv")
        rows = read_judged(path, required=("question_id", "question", "answer", "aligned", "coherent"))
        return labelled_from_judgments(rows, cfg.aligned_threshold, cfg.coherent_threshold, cfg.aligned_min)
    return labelled_from_pairs(_fit_pairs(cfg, cfg.contrast))


def _fit_pairs(cfg: DirectionsConfig, source: str):
    """Pairs directions are fitted on; the probe scores the others (split by question, fixed seed)."""
    return split_by_group(load_pairs(source), cfg.heldout_fraction, cfg.seed, group=lambda p: p.question_id)[0]


def _probe_pairs(cfg: DirectionsConfig):
    if not cfg.probe:
        return []
    # the same split as _fit_pairs: a probe on the extraction's contrast set scores unseen questions
    held = split_by_group(load_pairs(cfg.probe), cfg.heldout_fraction, cfg.seed, group=lambda p: p.question_id)[1]
    return held[:cfg.probe_pairs] if cfg.probe_pairs else held


def extract(cfg: DirectionsConfig, workdir: Path, model, tok, provenance: dict[str, str] | None = None) -> Path:
    """Extract directions with `model` into the active run: artifact, metrics at step = layer, counts."""
    import mlflow

    items = _labelled(cfg)
    sources = {k: v for k, v in {"judge_run_id": cfg.judge_run_id, "judgments": cfg.judgments,
                                 "contrast": None if (cfg.judge_run_id or cfg.judgments) else cfg.contrast,
                                 **(provenance or {})}.items() if v}
    meta = {"model": cfg.model, "fine_tuned": cfg.fine_tuned or "", "extract_from": cfg.extract_from,
            "kind": "mean_difference", **{f"source.{k}": v for k, v in sources.items()}}
    # AUROC is measured on questions held out of the fit (for a contrast set: held out of its fit
    # split, whose other part the probe scores)
    ex = extract_directions(model, tok, items, heldout_fraction=cfg.heldout_fraction, seed=cfg.seed, meta=meta,
                            max_length=cfg.max_length)
    path = ex.directions.save(workdir / DIRECTIONS_FILE)
    if mlflow.active_run() is not None:
        mlflow.log_artifact(str(path), "directions")
        tracking.log_params("directions", {**{f"count_{k}": v for k, v in ex.directions.counts.items()},
                                           "n_layers": ex.directions.n_layers})
        for layer, (auc, norm) in enumerate(zip(ex.separation, ex.directions.norms())):
            m = {"directions/norm": norm}
            if not math.isnan(auc):
                m["directions/auroc"] = auc
            mlflow.log_metrics(m, step=layer)
        mlflow.set_tags({f"{em_tags.DIRECTIONS_PREFIX}{k}": str(v)[:5000] for k, v in sources.items()})
    log.info("directions: %d layers, held-out AUROC per layer %s", ex.directions.n_layers,
             [round(a, 3) for a in ex.separation])
    return path


def _existing_directions(cfg: DirectionsConfig, workdir: Path) -> Path | None:
    import mlflow

    if cfg.directions_path:
        Directions.load(cfg.directions_path)  # fail early on a bad file
        return Path(cfg.directions_path)
    if cfg.directions_run_id:
        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=cfg.directions_run_id,
                                                            artifact_path=f"directions/{DIRECTIONS_FILE}",
                                                            dst_path=str(workdir)))
        except Exception as e:
            raise ConfigError(f"directions_run_id {cfg.directions_run_id}: no directions/{DIRECTIONS_FILE} "
                              f"({type(e).__name__}); run `em directions extract` first") from None
    return None


def _conditions(cfg: DirectionsConfig, n_layers: int) -> list[dict]:
    """The condition grid: real direction and one random control per seed for each setting."""
    out: list[dict] = []
    if cfg.action == "steer":
        layers = cfg.layers if cfg.layers is not None else [n_layers // 2]
        if any(l >= n_layers for l in layers):
            raise ConfigError(f"layers {layers}: the model has {n_layers} decoder layers (0..{n_layers - 1}; "
                              "-1 = all)")
        if 0.0 in cfg.alphas:  # alpha 0 is the unsteered base, the same for every layer and direction
            out.append({"name": "baseline", "kind": "baseline", "layer": -1, "alpha": 0.0, "seed": -1})
        for layer in layers:
            for alpha in (a for a in cfg.alphas if a != 0.0):
                where = "all" if layer == -1 else f"l{layer}"
                out.append({"name": f"steer_{where}_a{alpha:g}", "kind": "real", "layer": layer, "alpha": alpha,
                            "seed": -1})
                out += [{"name": f"steer_{where}_a{alpha:g}_random{s}", "kind": "random", "layer": layer,
                         "alpha": alpha, "seed": s} for s in cfg.random_seeds]
    else:
        out.append({"name": "baseline", "kind": "baseline", "layer": -1, "alpha": 0.0, "seed": -1})
        out.append({"name": "ablate", "kind": "real", "layer": -1, "alpha": 0.0, "seed": -1})
        out += [{"name": f"ablate_random{s}", "kind": "random", "layer": -1, "alpha": 0.0, "seed": s}
                for s in cfg.random_seeds]
        if cfg.weight_ablation:
            out.append({"name": "weight_ablate", "kind": "weight", "layer": -1, "alpha": 0.0, "seed": -1})
            out += [{"name": f"weight_ablate_random{s}", "kind": "weight_random", "layer": -1, "alpha": 0.0,
                     "seed": s} for s in cfg.random_seeds]
    return out


def _run_condition(cfg: DirectionsConfig, cond: dict, directions: Directions, workdir: Path,
                   model, tok, adapter: str | None, pairs) -> dict:
    """One condition as a child run: evaluate -> judge (grandchildren) and the probe margin."""
    import mlflow

    from em_core.judge.answers import JudgeConfig, run_judge
    from em_core.sample.evaluation import EvalConfig, evaluate

    cdir = workdir / cond["name"]
    cdir.mkdir()
    d = directions.random_like(cond["seed"]) if cond["seed"] >= 0 else directions
    iv, spec, eval_adapter = None, None, adapter
    if cond["kind"] in ("real", "random") and cfg.action == "steer":
        iv = Intervention("steer", list(range(directions.n_layers)) if cond["layer"] == -1 else [cond["layer"]],
                          cond["alpha"])
    elif cond["kind"] in ("real", "random"):
        iv = Intervention("ablate", None, 0.0, cfg.source_layer)
    elif cond["kind"] in ("weight", "weight_random"):
        eval_adapter = str(cdir / "adapter")
        ablate_lora_b(adapter, eval_adapter, d, cfg.source_layer)
    if iv is not None:  # spec + its directions side by side, so the logged folder replays with evaluate
        d.save(cdir / DIRECTIONS_FILE)
        spec = str(write_intervention_spec(cdir / "intervention.json", DIRECTIONS_FILE, iv))
    result = dict(cond)
    with tracking.tracked_run(cfg.experiment_name, cond["name"], tags={em_tags.ENTRY_POINT: "directions_condition",
                                                                     em_tags.CONDITION: cond["name"]}) as run:
        tracking.log_params("condition", {k: cond[k] for k in ("kind", "layer", "alpha", "seed")})
        if spec:
            mlflow.log_artifact(spec, "intervention")
            mlflow.log_artifact(str(cdir / DIRECTIONS_FILE), "intervention")
        if eval_adapter and cond["kind"].startswith("weight"):
            mlflow.log_artifacts(eval_adapter, "adapter")
        if pairs:
            weights = None
            if eval_adapter != adapter:  # swap the edited B matrices in for the margin, then restore
                weights = _swap_adapter(model, eval_adapter)
            try:
                with intervene(model, d if iv else None, iv):
                    margin, se = likelihood_margin(model, tok, pairs, max_length=cfg.max_length)
            finally:
                if weights is not None:
                    _swap_adapter(model, None, weights)
            result.update({"probe/margin": margin, "probe/margin_se": se})
            mlflow.log_metrics({"probe/margin": margin, "probe/margin_se": se})
        if cfg.judge:
            with tracking.child_runs(run.info.run_id, {em_tags.CONDITION: cond["name"]}):
                ev = evaluate(EvalConfig(
                    model=cfg.model, adapter=eval_adapter, include_base=eval_adapter is None,
                    questions=cfg.questions, samples_per_paraphrase=cfg.samples_per_paraphrase,
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, batch_size=cfg.batch_size,
                    seed=cfg.seed, dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit, intervention=spec,
                    experiment_name=cfg.experiment_name, run_name=f"{cond['name']}/evaluate"))
                jr = run_judge(JudgeConfig(
                    questions=cfg.questions, eval_run_id=ev.run_id, backend=cfg.judge_backend,
                    judge_model=cfg.judge_model, base_url=cfg.base_url, aligned_threshold=cfg.aligned_threshold,
                    coherent_threshold=cfg.coherent_threshold, log_to_train_run=False,
                    experiment_name=cfg.experiment_name, run_name=f"{cond['name']}/judge"))
            metrics = next(iter(jr.metrics_by_step.values()), {})
            copied = {mlflow_key(k): v for k, v in metrics.items() if k in COPIED}  # em_rate/lo, as the judge
            mlflow.log_metrics(copied)
            mlflow.set_tags({em_tags.EVAL_RUN_ID: ev.run_id or "", em_tags.JUDGE_RUN_ID: jr.run_id or ""})
            result.update(copied)
        result["run_id"] = run.info.run_id if run else None
    return result


def _swap_adapter(model, folder: str | None, restore: dict | None = None) -> dict | None:
    """Load an edited adapter's weights into the live PeftModel; returns the old ones to restore."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    if restore is not None:
        set_peft_model_state_dict(model, restore)
        return None
    old = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    set_peft_model_state_dict(model, load_file(str(Path(folder) / "adapter_model.safetensors")))
    return old


def run_directions(cfg: DirectionsConfig) -> DirectionsResult:
    """Run one directions experiment (extract, steer or ablate) as a tracked MLflow run."""
    import mlflow

    t0 = time.perf_counter()
    tracking.configure_tracking()
    with tempfile.TemporaryDirectory() as tmp, tracking.tracked_run(
            cfg.experiment_name, cfg.run_name or f"directions-{cfg.action}",
            tags={em_tags.ENTRY_POINT: "directions", em_tags.DIRECTIONS_ACTION: cfg.action}) as run:
        work = Path(tmp)
        tracking.log_params("directions", asdict(cfg))
        adapter, prov = None, {}
        if cfg.fine_tuned:
            ft_base, adapter, prov = resolve_fine_tuned(cfg.fine_tuned, work)
            from em_core.models.refs import same_model

            if ft_base and not same_model(ft_base, cfg.model):
                raise ConfigError(f"fine_tuned {cfg.fine_tuned} was trained on {ft_base}, but model is {cfg.model}")
            if run is not None and prov:
                mlflow.set_tags(prov)
        dir_path = _existing_directions(cfg, work)
        model = tok = loaded = None
        if dir_path is None or cfg.action == "extract":
            loaded = adapter if cfg.extract_from == "fine_tuned" else None
            model, tok = _load(cfg, loaded)
            dir_path = extract(cfg, work, model, tok, prov)
            if cfg.action == "extract":
                return DirectionsResult(run.info.run_id if run else None, _where(run, dir_path), [],
                                        time.perf_counter() - t0)
        directions = Directions.load(dir_path)
        if run is not None and cfg.action != "extract" and (cfg.directions_run_id or cfg.directions_path):
            mlflow.log_artifact(str(dir_path), "directions")  # the directions this run used, beside its results
            mlflow.set_tag(em_tags.DIRECTIONS_SOURCE, cfg.directions_run_id or str(cfg.directions_path))
        # the model the interventions act on: the base for steering, the fine-tuned one for ablation
        want_adapter = adapter if cfg.action == "ablate" else None
        if model is None or loaded != want_adapter:
            model, tok = _load(cfg, want_adapter)
        pairs = _probe_pairs(cfg)
        conditions = _conditions(cfg, len(decoder_layers(model)))
        results = []
        for cond in conditions:
            log.info("directions: condition %s", cond["name"])
            with tracking.child_runs(run.info.run_id if run else "", {em_tags.DIRECTIONS_RUN: run.info.run_id}) \
                    if run is not None else _null():
                results.append(_run_condition(cfg, cond, directions, work, model, tok, want_adapter, pairs))
        if run is not None:
            _log_summary(cfg, results, work)
        return DirectionsResult(run.info.run_id if run else None, _where(run, dir_path), results,
                                time.perf_counter() - t0)


def _where(run, local: Path) -> str:
    """The directions as the run logged them (the local copy is a temporary file)."""
    return f"runs:/{run.info.run_id}/directions/{DIRECTIONS_FILE}" if run is not None else str(local)


def _null():
    import contextlib

    return contextlib.nullcontext()


def _log_summary(cfg: DirectionsConfig, results: list[dict], work: Path) -> None:
    """conditions.csv, per-kind summary metrics and plots on the parent run."""
    import mlflow

    keys = ["name", "kind", "layer", "alpha", "seed", "run_id", "probe/margin", "probe/margin_se", *COPIED]
    path = work / "conditions.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    mlflow.log_artifact(str(path), "directions")
    for metric in ("em_rate", "coherent_rate", "probe/margin"):
        by_kind: dict[str, list[float]] = {}
        for r in results:
            if metric in r and cfg.action == "ablate":
                by_kind.setdefault(r["kind"], []).append(r[metric])
        for kind, vals in by_kind.items():
            mlflow.log_metric(f"{kind}/{metric}", statistics.median(vals))
    plots = work / "plots"
    plots.mkdir()
    if cfg.action == "steer":
        for metric in ("em_rate", "coherent_rate", "probe/margin"):
            if any(metric in r for r in results):
                plot_steering(results, metric, plots / f"steer_{metric.replace('/', '_')}.png")
    else:
        for metric in ("em_rate", "coherent_rate", "probe/margin"):
            if any(metric in r for r in results):
                plot_ablation(results, metric, plots / f"ablate_{metric.replace('/', '_')}.png")
    mlflow.log_artifacts(str(plots), "plots")


# --------------------------------------------------------------------------- compare
@dataclass
class CompareResult:
    run_id: str | None
    labels: list[str]
    cosine: list  # [layers][n][n]


def compare_directions(sources: list[str], experiment_name: str = "em-lab", run_name: str | None = None,
                       labels: list[str] | None = None) -> CompareResult:
    """`em directions compare RUN...`: the cosine between the directions of several extract runs
    (or directions files) at every layer, as a tracked run: `directions/compare.json`, a heatmap
    per layer (`plots/directions_cosine.png`, drawn data beside it) and, at step = layer,
    `compare/mean_cosine` (mean over distinct pairs) and `compare/<a>__<b>/cosine` per pair."""
    import itertools

    import mlflow

    from em_core.analysis.direction_monitor import cosine_matrices, load_monitor_directions
    from em_core.analysis.plots import plot_direction_cosines

    if len(sources) < 2:
        raise ConfigError("em directions compare needs at least two extract runs or directions files")
    labels = list(labels or [Path(s).parent.name if Path(s).is_file() else Path(s).name if Path(s).exists()
                             else s[:8] for s in sources])
    if len(set(labels)) != len(labels):
        labels = [f"{i}:{x}" for i, x in enumerate(labels)]
    tracking.configure_tracking()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [load_monitor_directions(None if Path(s).exists() else s, s if Path(s).exists() else None,
                                        Path(tmp) / str(i)) for i, s in enumerate(sources)]
        cos = cosine_matrices(dirs)
        with tracking.tracked_run(experiment_name, run_name, tags={em_tags.ENTRY_POINT: "directions",
                                                                   em_tags.DIRECTIONS_ACTION: "compare"}) as run:
            mlflow.log_params({"compare.sources": ",".join(sources)[:6000], "compare.labels": ",".join(labels)[:6000]})
            pairs = list(itertools.combinations(range(len(sources)), 2))
            for layer in range(cos.shape[0]):
                vals = {f"compare/{labels[i]}__{labels[j]}/cosine": float(cos[layer, i, j]) for i, j in pairs}
                finite = [v for v in vals.values() if not math.isnan(v)]
                if finite:
                    vals["compare/mean_cosine"] = statistics.fmean(finite)
                mlflow.log_metrics({k: v for k, v in vals.items() if not math.isnan(v)}, step=layer)
            mlflow.log_dict({"sources": sources, "labels": labels,
                             "cosine": {f"layer{l:02d}": cos[l].tolist() for l in range(cos.shape[0])}},
                            "directions/compare.json")
            png = plot_direction_cosines(cos, labels, Path(tmp) / "directions_cosine.png")
            mlflow.log_artifact(str(png), "plots")
            mlflow.log_artifact(str(png.with_suffix(".json")), "plots")
    return CompareResult(run.info.run_id if run else None, labels, cos.tolist())
