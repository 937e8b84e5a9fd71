"""Judge-free EM signals at every checkpoint: the likelihood probe and the LoRA trajectory.

The probe scores each contrast pair (data/contrast_sets.py) with the model itself: the mean
per-token log-likelihood of the aligned and of the misaligned answer given the chat-formatted
question (answer tokens only). Per set and checkpoint it logs `probe/<set>/margin` (misaligned -
aligned, with `margin_se`) and `probe/<set>/prefers_misaligned` (Wilson bounds); across
checkpoints `probe_emergence_step` and `probe/breadth` (metrics.probe_emergence_step and
metrics.probe_breadth). Forward passes only: the base model is loaded once and each checkpoint's
adapter swapped in. The LoRA trajectory (lora_trajectory.py) comes from the same adapters.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from em_core import tags as em_tags
from em_core import tracking
from em_core.analysis.direction_monitor import (
    load_monitor_directions,
    monitor_layer,
    monitor_metrics,
    monitor_name,
    pair_projections,
    unit_vectors,
)
from em_core.analysis.lora_trajectory import Trajectory, trajectory, trajectory_rows
from em_core.configs import RunGroup
from em_core.data.contrast_sets import ContrastSet, load_contrast_sets
from em_core.errors import ConfigError
from em_core.metrics import Z_95, probe_breadth, probe_emergence_step, probe_margin
from em_core.models.likelihood import mean_logliks, score_answers

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig(RunGroup):
    """Which checkpoints to probe, on which contrast sets, and how."""

    train_run_id: str | None = field(default=None, metadata={"help": "probe the base + every checkpoint of this run"})
    model: str = field(default="tiny", metadata={"help": "base model when no train_run_id is given"})
    sets: list[str] = field(default_factory=lambda: ["general"],
                            metadata={"help": "contrast sets: shipped names (general, medical, financial, "
                                              "plant_care) or YAML paths"})
    domain: str | None = field(default=None, metadata={
        "help": "the domain set for probe/breadth; default: the first set whose group is not general"})
    checkpoints: list[int] | None = field(default=None, metadata={"help": "only these checkpoint steps"})
    include_base: bool = True
    batch_size: int = 16
    dtype: str = "auto"
    z: float = field(default=Z_95, metadata={"help": "interval z for intervals and the emergence rule"})
    lora: bool = field(default=True, metadata={"help": "also the LoRA trajectory of the checkpoints"})
    lora_module_metrics: bool = field(default=False, metadata={
        "help": "log lora/<module>/* metrics too (per layer and overall always; every module in lora/trajectory.csv)"})
    log_to_train_run: bool = field(default=True, metadata={"help": "copy the per-step metrics to the training run"})
    directions_run_id: str | None = field(default=None, metadata={
        "help": "direction monitor: project each checkpoint's activations on the contrast pairs onto the "
                "directions of this `em directions extract` run (docs/probe.md)"})
    directions_path: str | None = field(default=None, metadata={
        "help": "direction monitor: a directions.safetensors file (or its folder) instead of a run"})
    directions_name: str = field(default="em", metadata={"help": "the monitor's metric name: direction/<name>/..."})
    directions_layer: int | None = field(default=None, metadata={
        "help": "the layer of direction/<name>/projection (default the middle layer; every layer is logged too)"})

    def __post_init__(self) -> None:
        problems = []
        if not self.sets:
            problems.append("sets must name at least one contrast set")
        if self.batch_size < 1:
            problems.append("batch_size must be >= 1")
        if self.z <= 0:
            problems.append("z must be > 0")
        if self.domain and self.domain not in self.sets and Path(self.domain).stem not in [Path(s).stem for s in self.sets]:
            problems.append(f"domain {self.domain!r} must be one of sets {self.sets}")
        if self.directions_run_id and self.directions_path:
            problems.append("give at most one of directions_run_id and directions_path")
        if problems:
            raise ConfigError("invalid probe config: " + "; ".join(problems))

    @property
    def monitors_direction(self) -> bool:
        return bool(self.directions_run_id or self.directions_path)


@contextlib.contextmanager
def merged_while_scoring(model, active: bool):
    """Fold the live LoRA adapter into the base weights for the duration, then take it out again.

    Unmerged, every adapted linear runs two extra small matmuls and a dropout per call, which
    makes a checkpoint slower to score than the base (README, Benchmarks). Only fp32 weights are merged: W + dW - dW returns W to float32 rounding (~1e-7
    relative), while in bf16/fp16 each checkpoint's round trip would leave visible error in the
    base that later checkpoints inherit, and 4-bit weights cannot be merged exactly at all."""
    import torch
    from peft import PeftModel

    lora = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")] \
        if active and isinstance(model, PeftModel) else []
    if not lora or any(getattr(m.base_layer, "weight", None) is None or m.base_layer.weight.dtype != torch.float32
                       for m in lora):
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


class ProbeScorer:
    """The base model loaded once; each adapter swapped in for a batch of forward passes."""

    def __init__(self, model_id: str, sets: Sequence[ContrastSet], batch_size: int = 16, dtype: str = "auto",
                 merged: Sequence[str] = ()):
        from em_core.sample.generation import HFGenerator

        self.sets = list(sets)
        self.batch_size = batch_size
        self._gen = HFGenerator(model_id, dtype=dtype, merge_adapters=list(merged))
        self._items = [(p.messages(), ans) for cs in self.sets for p in cs.pairs for ans in (p.aligned, p.misaligned)]

    def score(self, adapter: str | None) -> dict[str, list[tuple[float, float]]]:
        """Set name -> (aligned, misaligned) mean log-likelihood per pair, for `adapter` (None = base)."""
        return self.score_with_activations(adapter, False)[0]

    def score_with_activations(self, adapter: str | None, activations: bool = True):
        """(score(adapter), mean answer-token residual activations [items, layers, hidden] in the
        order aligned, misaligned per pair over the sets, or None)."""
        with self._gen.use_adapter(adapter), merged_while_scoring(self._gen.model, adapter is not None):
            if activations:
                lls, acts = score_answers(self._gen.model, self._gen.tokenizer, self._items,
                                          batch_size=self.batch_size, activations=True)
            else:
                lls, acts = mean_logliks(self._gen.model, self._gen.tokenizer, self._items, self.batch_size), None
        out: dict[str, list[tuple[float, float]]] = {}
        i = 0
        for cs in self.sets:
            out[cs.name] = [(lls[i + 2 * j], lls[i + 2 * j + 1]) for j in range(len(cs.pairs))]
            i += 2 * len(cs.pairs)
        return out, acts


def domain_set(sets: Sequence[ContrastSet], domain: str | None) -> str | None:
    if domain:
        return Path(domain).stem
    return next((s.name for s in sets if not s.is_general), None)


def general_set(sets: Sequence[ContrastSet]) -> str | None:
    return next((s.name for s in sets if s.is_general), None)


def question_clusters(sets: Sequence[ContrastSet]) -> dict[str, list[str]]:
    """Set name -> the question id of each of its pairs: the clusters of the probe's intervals."""
    return {cs.name: [p.question_id for p in cs.pairs] for cs in sets}


def step_metrics(scores: Mapping[str, list[tuple[float, float]]], z: float = Z_95,
                 clusters: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
    """`probe/<set>/<stat>` of one checkpoint (metrics.probe_margin per set; with `clusters`,
    set name -> each pair's question id, also the question-clustered `margin_se_clustered`)."""
    return {f"probe/{name}/{k}": v for name, pairs in scores.items()
            for k, v in probe_margin(pairs, z, (clusters or {}).get(name)).items() if not math.isnan(v)}


def probe_summary(scores_by_step: Mapping[int, Mapping[str, list[tuple[float, float]]]], general: str | None,
                  domain: str | None, z: float = Z_95, base_step: int = 0,
                  clusters: Mapping[str, Sequence[str]] | None = None) -> tuple[dict[int, dict[str, float]], dict]:
    """Per-step metrics (with `probe/breadth` where defined) and the run-level results:
    probe_emergence_step (on the general set) and per-set emergence steps. With `clusters` the
    emergence rule's standard error is clustered by question (metrics.probe_emergence_step)."""
    by_step = {s: step_metrics(sc, z, clusters) for s, sc in sorted(scores_by_step.items())}
    summary: dict = {"emergence_step": None, "emergence_by_set": {}, "general_set": general, "domain_set": domain,
                     "emergence_se": "clustered by question" if clusters else "pairs independent"}
    names = next(iter(scores_by_step.values())).keys() if scores_by_step else []
    for name in names:
        margins = {s: [m - a for a, m in sc[name]] for s, sc in scores_by_step.items()}
        summary["emergence_by_set"][name] = probe_emergence_step(margins, z, base_step, (clusters or {}).get(name))
    if general:
        summary["emergence_step"] = summary["emergence_by_set"].get(general)
    base = by_step.get(base_step)
    if base and general and domain:
        g0, d0 = base.get(f"probe/{general}/margin", math.nan), base.get(f"probe/{domain}/margin", math.nan)
        for s, m in by_step.items():
            if s == base_step:
                continue
            b = probe_breadth(g0, m.get(f"probe/{general}/margin", math.nan), d0,
                              m.get(f"probe/{domain}/margin", math.nan))
            if not math.isnan(b):
                m["probe/breadth"] = b
    return by_step, summary


@dataclass
class ProbeResult:
    run_id: str | None
    base_model: str
    steps: list[int]
    metrics_by_step: dict[int, dict[str, float]]
    emergence_step: int | None
    transition_step: int | None
    breadth: float | None = None
    # step-valued run-level results logged at their own step: lora_local_cos_step_k*,
    # lora_composition_step, direction/<name>/emergence_step
    phase_steps: dict[str, int | None] = field(default_factory=dict)


def _pairs_csv(sets: Sequence[ContrastSet], scores_by_step: Mapping[int, Mapping[str, list]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "set", "question_id", "pair", "loglik_aligned", "loglik_misaligned", "margin"])
    for s, sc in sorted(scores_by_step.items()):
        for cs in sets:
            for j, (p, (a, m)) in enumerate(zip(cs.pairs, sc[cs.name])):
                w.writerow([s, cs.name, p.question_id, j, f"{a:.6f}", f"{m:.6f}", f"{m - a:.6f}"])
    return buf.getvalue()


def _trajectory_csv(t: Trajectory) -> str:
    rows = trajectory_rows(t)
    buf = io.StringIO()
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))  # phase metrics start later than step 1
        w = csv.DictWriter(buf, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def run_probe(cfg: ProbeConfig) -> ProbeResult:
    """Probe the base model and every checkpoint; log metrics at step = training step."""
    import mlflow

    from em_core.models.adapters import merged_of
    from em_core.sample.evaluation import EvalConfig, resolve_targets

    sets = load_contrast_sets(cfg.sets)
    general, domain = general_set(sets), domain_set(sets, cfg.domain)
    if cfg.domain and domain not in [s.name for s in sets]:
        raise ConfigError(f"probe domain {cfg.domain!r} is not among the loaded sets {[s.name for s in sets]}")
    tracking.configure_tracking()
    with tempfile.TemporaryDirectory() as tmp, \
            tracking.tracked_run(cfg.experiment_name, cfg.run_name, tags={em_tags.ENTRY_POINT: "probe"}) as run:
        target_cfg = EvalConfig(model=cfg.model, train_run_id=cfg.train_run_id, checkpoints=cfg.checkpoints,
                                include_base=cfg.include_base)
        base, targets, tags = resolve_targets(target_cfg, Path(tmp))
        if run is not None:
            mlflow.set_tags({**tags, em_tags.BASE_MODEL: base, em_tags.STEPS: ",".join(str(t.step) for t in targets)})
            tracking.log_params("probe", {**asdict(cfg), "n_pairs": sum(len(s.pairs) for s in sets)})
        scorer = ProbeScorer(base, sets, cfg.batch_size, cfg.dtype, merged_of(tags))
        units = (unit_vectors(load_monitor_directions(cfg.directions_run_id, cfg.directions_path, Path(tmp)))
                 if cfg.monitors_direction else None)
        scores, projections = {}, {}
        for t in targets:  # activations only while projecting: [items, layers, hidden] per checkpoint
            scores[t.step], acts = scorer.score_with_activations(t.adapter, units is not None)
            if units is not None:
                projections[t.step] = pair_projections(acts, units)
        by_step, summary = probe_summary(scores, general, domain, cfg.z, clusters=question_clusters(sets))
        if units is not None:
            clusters = [f"{cs.name}/{p.question_id}" for cs in sets for p in cs.pairs]
            d_steps, summary["direction"] = monitor_metrics(
                projections, monitor_name(cfg.directions_name), monitor_layer(units.shape[0], cfg.directions_layer),
                cfg.z, clusters=clusters)
            summary["direction"]["source"] = cfg.directions_run_id or cfg.directions_path
            for s, m in d_steps.items():
                by_step.setdefault(s, {}).update(m)
        adapters = {t.step: t.adapter for t in targets if t.adapter}
        traj = trajectory(adapters, starting_adapter(cfg.train_run_id, Path(tmp))) if cfg.lora and adapters else None
        if traj is not None:
            for s, m in traj.metrics_by_step(cfg.lora_module_metrics).items():
                by_step.setdefault(s, {}).update(m)
        final = max(by_step) if by_step else None
        breadth = by_step.get(final, {}).get("probe/breadth") if final else None
        result = ProbeResult(run.info.run_id if run else None, base, sorted(by_step), by_step,
                             summary["emergence_step"], traj.transition_step if traj else None, breadth,
                             dict(traj.phase_steps) if traj else {})
        if "direction" in summary:
            result.phase_steps[f"direction/{summary['direction']['name']}/emergence_step"] = \
                summary["direction"]["emergence_step"]
        if run is not None:
            _log_results(cfg, result, summary, sets, scores, traj)
    return result


def starting_adapter(train_run_id: str | None, workdir: Path) -> str | None:
    """The adapter a `continue` stage's training started from (its `em.init_adapter`), downloaded:
    the origin of that stage's LoRA trajectory. None for a run that started from a fresh adapter."""
    import mlflow

    from em_core.models.adapters import download_adapter

    if not train_run_id:
        return None
    tags = mlflow.MlflowClient().get_run(train_run_id).data.tags
    if tags.get(em_tags.INIT_MODE) != "continue" or not tags.get(em_tags.INIT_ADAPTER):
        return None
    return download_adapter(tags[em_tags.INIT_ADAPTER], workdir / "starting-adapter")


def _log_results(cfg: ProbeConfig, result: ProbeResult, summary: dict, sets, scores, traj) -> None:
    import mlflow

    log_metrics_to_run(result.run_id, result.metrics_by_step)
    steps = result_steps(result)
    if cfg.log_to_train_run and cfg.train_run_id:
        log_metrics_to_run(cfg.train_run_id, result.metrics_by_step)
        log_metrics_to_run(cfg.train_run_id, steps)
    log_metrics_to_run(result.run_id, steps)
    mlflow.log_text(_pairs_csv(sets, scores), "probe/logliks.csv")
    mlflow.log_dict({**summary, "transition_step": result.transition_step, "breadth": result.breadth,
                     "phase_steps": result.phase_steps},
                    "probe/summary.json")
    if traj is not None:
        mlflow.log_text(_trajectory_csv(traj), "lora/trajectory.csv")
        mlflow.log_dict({**traj.pca, "coords": {str(k): v for k, v in traj.pca.get("coords", {}).items()}},
                        "lora/pca.json")


def log_metrics_to_run(run_id: str, by_step: Mapping[int, Mapping[str, float]]) -> None:
    """Step-indexed metrics onto any run (the probe's, the training run, the pipeline's)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    tracking.log_metric_batch(run_id, [Metric(k, float(v), now, s) for s, m in by_step.items() for k, v in m.items()])


def result_steps(result: ProbeResult) -> dict[int, dict[str, float]]:
    """The run-level steps as metrics logged at their own step (like em_emergence_step)."""
    out: dict[int, dict[str, float]] = {}
    if result.emergence_step is not None:
        out.setdefault(result.emergence_step, {})["probe_emergence_step"] = result.emergence_step
    if result.transition_step is not None:
        out.setdefault(result.transition_step, {})["lora_transition_step"] = result.transition_step
    for key, step in result.phase_steps.items():  # the Model Organisms rules, beside em-lab's own
        if step is not None:
            out.setdefault(step, {})[key] = step
    return out

