"""`em mitigate`: in-training mitigations of EM compared on four criteria in one tracked experiment.

    em mitigate --config configs/mitigations/tiny.yaml

Every mitigation (one `mitigation:` block of TrainConfig each, `none` being the empty block) runs
as one grid over {harmful, benign} dataset x seeds through the grid machinery (`grid.cell_config`,
`grid._run_cells`: claimed, reused when finished with the same params and code, resumable), each
cell a full pipeline (train -> evaluate -> judge -> probe) and a child of ONE parent run. Then,
per mitigation, at the final checkpoint:

1. general EM: the judge's EM rate on the core questions and the probe's general margin (harmful data);
2. narrow learning: the held-out loss drop on the training domain (loss before - after) and the
   probe's domain margin (harmful data);
3. benign learning: the held-out loss drop on the benign dataset with the mitigation divided by
   the same drop without it (`none`);
4. coherence: the judge's coherent rate (harmful data).

Written to the parent run under `mitigate/`: mitigation_table.csv/.md, tradeoff.png (+ .json, the
drawn data) and curves.json (per-step values). docs/mitigations.md explains the methods.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from em_core import tags as em_tags
from em_core import tracking
from em_core.configs import TrackingGroup, read_yaml
from em_core.errors import ConfigError
from em_core.experiments.grid import GridConfig, _run_cells, cell_config, cells
from em_core.experiments.pipeline import (
    PipelineConfig,
    _as_overrides,
    code_version,
    pipeline_triples,
    summary_of,
)
from em_core.experiments.preflight import preflight
from em_core.metrics import Z_95, mean_t_interval
from em_core.paths import PROJECT_ROOT, project_file

log = logging.getLogger(__name__)

ARTIFACT_DIR = "mitigate"
COLUMNS = ("mitigation", "seeds", "em_rate", "em_rate_lo", "em_rate_hi", "general_margin", "general_margin_delta",
           "heldout_loss", "heldout_loss_drop", "heldout_loss_drop_lo", "heldout_loss_drop_hi", "domain_margin",
           "domain_margin_delta", "benign_loss_drop", "benign_ratio", "coherent_rate", "coherent_rate_lo",
           "coherent_rate_hi")


@dataclass
class MitigateConfig(TrackingGroup):
    """Mitigations x {harmful, benign} x seeds over one pipeline config."""

    KV_FIELDS: ClassVar[tuple[str, ...]] = ("train", "evaluate", "judge")

    name: str = field(default="mitigate", metadata={"help": "names the parent run and tags the cells"})
    pipeline_config: str = field(default="configs/pipeline/tiny.yaml", metadata={"help": "PipelineConfig YAML"})
    harmful: str = field(default="demo", metadata={"help": "the narrow harmful dataset"})
    benign: str = field(default="demo:plant_care_good", metadata={"help": "a benign dataset (criterion 3)"})
    mitigations: dict | str | None = field(default=None, metadata={
        "help": "YAML mapping name -> mitigation block (TrainConfig.mitigation); `none: {}` is the baseline"})
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_fraction: float = field(default=0.2, metadata={"help": "held-out share of each dataset (criteria 2, 3)"})
    train: list[str] = field(default_factory=list, metadata={"help": "TrainConfig overrides for every cell"})
    evaluate: list[str] = field(default_factory=list, metadata={"help": "EvalConfig overrides for every cell"})
    judge: list[str] = field(default_factory=list, metadata={"help": "JudgeConfig overrides for every cell"})
    general_set: str = field(default="general", metadata={"help": "probe set of criterion 1"})
    domain_set: str | None = field(default=None, metadata={
        "help": "probe set of criterion 2 (default: the pipeline's first probe set that is not general_set)"})
    z: float = Z_95

    def __post_init__(self) -> None:
        from em_core.train.mitigation import parse_mitigation

        for name in self.KV_FIELDS:
            setattr(self, name, _as_overrides(getattr(self, name), name))
        self.pipeline_config = project_file(self.pipeline_config)
        blocks = yaml.safe_load(self.mitigations) if isinstance(self.mitigations, str) else self.mitigations
        if not blocks or not isinstance(blocks, Mapping):
            raise ConfigError("mitigations: give a mapping of name -> mitigation block, e.g. none: {} and kl: {weight: 0.1}")
        self.mitigations = {str(k): parse_mitigation(v, f"mitigations.{k}").as_dict() for k, v in blocks.items()}
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction: must be in (0, 1) (the held-out loss needs held-out rows), not {self.eval_fraction}")
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")

    @staticmethod
    def check_sections(path: str, data) -> None:
        """Each mitigation block and the step sections, checked with the file named."""
        from em_core.experiments.pipeline import check_step_sections
        from em_core.train.mitigation import parse_mitigation

        check_step_sections(path, data)
        blocks = data.get("mitigations")
        if isinstance(blocks, Mapping):
            for k, v in blocks.items():
                parse_mitigation(v, f"{path}: mitigations.{k}")


def mitigation_train_config(cfg: MitigateConfig, base: PipelineConfig, name: str) -> str:
    """A TrainConfig YAML: the pipeline's recipe plus this mitigation's block (blocks hold free text,
    so they travel as a file, not as `key=value` overrides). Its name carries a hash of its content,
    so a changed block is a different cell."""
    data = read_yaml(_train_cls(), base.train_config)
    data.pop("env", None)
    data["mitigation"] = cfg.mitigations[name] or None
    text = yaml.safe_dump(data, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    path = PROJECT_ROOT / "outputs" / "mitigate" / cfg.name / f"{name}-{digest}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(f"# written by em mitigate ({cfg.name}): {base.train_config} + mitigation {name}\n" + text,
                        encoding="utf-8")
    return str(path)


def _train_cls():
    from em_core.train.config import TrainConfig

    return TrainConfig


def plan(cfg: MitigateConfig, base: PipelineConfig) -> dict[str, tuple[GridConfig, PipelineConfig, list]]:
    """mitigation -> (its grid, its base pipeline config, [(cell, pipeline config)])."""
    if base.stages:
        raise ConfigError(f"{cfg.pipeline_config}: em mitigate needs a single-stage pipeline config")
    shared = [*cfg.train, f"eval_fraction={cfg.eval_fraction}", "eval_on_start=true"]
    out = {}
    for name in cfg.mitigations:
        grid = GridConfig(name=f"{cfg.name}.{name}", pipeline_config=cfg.pipeline_config,
                          datasets=[cfg.harmful, cfg.benign], seeds=list(cfg.seeds), train=shared,
                          evaluate=list(cfg.evaluate), judge=list(cfg.judge), experiment_name=cfg.experiment_name)
        mbase = dataclasses.replace(base, train_config=mitigation_train_config(cfg, base, name))
        out[name] = (grid, mbase, [(c, cell_config(grid, mbase, c)) for c in cells(grid)])
    return out


def domain_set(cfg: MitigateConfig, base: PipelineConfig) -> str | None:
    if cfg.domain_set:
        return cfg.domain_set
    from em_core.experiments.pipeline import probe_config

    sets = [Path(s).stem for s in probe_config(base).sets]
    return next((s for s in sets if s != cfg.general_set), None)


def _eval_losses(train_run_id: str) -> dict[int, float]:
    import mlflow

    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(train_run_id, "eval_loss")}


def cell_measures(summary: dict, general: str, domain: str | None) -> dict:
    """One pipeline's final-checkpoint criteria and its per-step curves."""
    by_step = {int(s): m for s, m in summary.get("by_step", {}).items()}
    final = summary.get("final_step")
    last = by_step.get(final, {}) if final is not None else {}
    first = by_step.get(0, {})
    nan = math.nan
    losses = _eval_losses(summary["steps"]["train"])
    loss0 = losses.get(0, nan)
    loss_end = losses[max(losses)] if losses else nan
    g, d = f"probe/{general}/margin", f"probe/{domain}/margin"
    return {
        "em_rate": last.get("em_rate", nan), "em_rate_lo": last.get("em_rate_lo", nan),
        "em_rate_hi": last.get("em_rate_hi", nan), "coherent_rate": last.get("coherent_rate", nan),
        "coherent_rate_lo": last.get("coherent_rate_lo", nan), "coherent_rate_hi": last.get("coherent_rate_hi", nan),
        "general_margin": last.get(g, nan), "general_margin_delta": last.get(g, nan) - first.get(g, nan),
        "domain_margin": last.get(d, nan), "domain_margin_delta": last.get(d, nan) - first.get(d, nan),
        "heldout_loss0": loss0, "heldout_loss": loss_end, "heldout_loss_drop": loss0 - loss_end,
        "curves": {"em_rate": {str(s): m.get("em_rate") for s, m in sorted(by_step.items())},
                   "coherent_rate": {str(s): m.get("coherent_rate") for s, m in sorted(by_step.items())},
                   "general_margin": {str(s): m.get(g) for s, m in sorted(by_step.items()) if g in m},
                   "domain_margin": {str(s): m.get(d) for s, m in sorted(by_step.items()) if d in m},
                   "heldout_loss": {str(s): v for s, v in sorted(losses.items())}},
        "smoke_test": bool(summary.get("smoke_test")), "run_id": summary.get("run_id"),
    }


def _agg(values: list[float], z: float) -> tuple[float, float, float]:
    vals = [v for v in values if v == v]
    if len(vals) == 1:
        return vals[0], math.nan, math.nan
    return mean_t_interval(vals, z) if vals else (math.nan, math.nan, math.nan)


def criteria_table(measures: dict[str, dict[str, list[dict]]], z: float = Z_95) -> list[dict]:
    """One row per mitigation: means over seeds (t intervals with several seeds; a single seed's
    rates keep their Wilson interval) of the four criteria; benign ratio against `none`."""
    def mean_of(name: str, which: str, key: str) -> tuple[float, float, float]:
        cells_ = measures[name][which]
        if len(cells_) == 1 and f"{key}_lo" in cells_[0]:
            c = cells_[0]
            return c[key], c[f"{key}_lo"], c[f"{key}_hi"]
        return _agg([c[key] for c in cells_], z)

    base_benign = mean_of("none", "benign", "heldout_loss_drop")[0] if "none" in measures else math.nan
    rows = []
    for name in measures:
        row: dict = {"mitigation": name, "seeds": len(measures[name]["harmful"])}
        for key in ("em_rate", "coherent_rate", "heldout_loss_drop"):
            row[key], row[f"{key}_lo"], row[f"{key}_hi"] = mean_of(name, "harmful", key)
        for key in ("general_margin", "general_margin_delta", "heldout_loss", "domain_margin", "domain_margin_delta"):
            row[key] = mean_of(name, "harmful", key)[0]
        row["benign_loss_drop"] = mean_of(name, "benign", "heldout_loss_drop")[0]
        row["benign_ratio"] = row["benign_loss_drop"] / base_benign if base_benign and base_benign == base_benign \
            else math.nan
        rows.append({k: row.get(k, math.nan) for k in COLUMNS})
    return rows


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def _ci(r: dict, key: str, pct: bool) -> str:
    lo, hi = r.get(f"{key}_lo", math.nan), r.get(f"{key}_hi", math.nan)
    ci = "" if lo != lo or hi != hi else f" [{_fmt(lo, pct)}, {_fmt(hi, pct)}]"
    return _fmt(r[key], pct) + ci


def markdown_table(rows: list[dict], general: str, domain: str | None) -> str:
    head = (f"| mitigation | seeds | 1. EM rate | 1. probe {general} margin (Δ) | 2. held-out loss drop | "
            f"2. probe {domain} margin (Δ) | 3. benign loss drop (ratio to none) | 4. coherent rate |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['mitigation']} | {r['seeds']} | {_ci(r, 'em_rate', True)} | "
                     f"{_fmt(r['general_margin'])} ({_fmt(r['general_margin_delta'])}) | "
                     f"{_ci(r, 'heldout_loss_drop', False)} | {_fmt(r['domain_margin'])} "
                     f"({_fmt(r['domain_margin_delta'])}) | {_fmt(r['benign_loss_drop'])} "
                     f"({_fmt(r['benign_ratio'])}) | {_ci(r, 'coherent_rate', True)} |")
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict], curves: dict, out: Path, title: str, general: str, domain: str | None,
                  smoke: bool) -> dict[str, Path]:
    from em_core.analysis.plots import plot_mitigation_tradeoff

    out.mkdir(parents=True, exist_ok=True)
    files = {"mitigation_table.csv": out / "mitigation_table.csv", "mitigation_table.md": out / "mitigation_table.md",
             "curves.json": out / "curves.json"}
    with files["mitigation_table.csv"].open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)
    note = "\n> Smoke test: EM and coherent rates judged by the tiny offline model; not a measurement.\n" if smoke else ""
    files["mitigation_table.md"].write_text(
        f"# {title}\n{note}\nFinal checkpoint; criteria 1 and 2 and 4 on the harmful dataset, 3 on the benign one. "
        "Loss drop = held-out loss before training minus after (nats/token). Intervals: Wilson (one seed) "
        "or t over seeds.\n\n" + markdown_table(rows, general, domain), encoding="utf-8")
    files["curves.json"].write_text(json.dumps(curves, indent=1, sort_keys=True, default=str), encoding="utf-8")
    files["tradeoff.png"] = plot_mitigation_tradeoff(rows, out / "tradeoff.png", title=f"{title}: general EM vs narrow learning",
                                                     smoke_test=smoke)
    files["tradeoff.json"] = out / "tradeoff.json"
    return files


def run_mitigate(cfg: MitigateConfig) -> dict:
    """Run (or reuse) every mitigation's cells under one parent run; returns rows, files, run id."""
    import mlflow

    from em_core.configs import parse_config

    base = parse_config(PipelineConfig, ["--config", cfg.pipeline_config])
    planned = plan(cfg, base)
    preflight([t for _, _, todo in planned.values() for _, pcfg in todo for t in pipeline_triples(pcfg)],
              what="mitigate")
    general, domain = cfg.general_set, domain_set(cfg, base)
    tracking.configure_tracking()
    code = code_version()
    tags = {em_tags.ENTRY_POINT: "mitigate", em_tags.MITIGATE: cfg.name, em_tags.CODE_VERSION: code}
    with tracking.tracked_run(cfg.experiment_name, f"{cfg.name}/mitigate", tags=tags) as run:
        pid, exp_id = run.info.run_id, run.info.experiment_id
        tracking.log_params("mitigate", {**asdict(cfg), "cells": sum(len(t) for _, _, t in planned.values())})
        measures: dict[str, dict[str, list[dict]]] = {}
        cell_runs: dict[str, str] = {}
        for name, (grid, mbase, todo) in planned.items():
            mlflow.log_artifact(mbase.train_config, f"{ARTIFACT_DIR}/train_configs")
            found = _run_cells(grid, mbase, todo, exp_id, code, pid)
            measures[name] = {"harmful": [], "benign": []}
            for cell, _ in todo:
                label = cell.label(mbase)
                which = "harmful" if cell.dataset == cfg.harmful else "benign"
                cell_runs[f"{name}/{label}"] = found[label]
                measures[name][which].append(cell_measures(summary_of(found[label]), general, domain))
        rows = criteria_table(measures, cfg.z)
        smoke = any(c["smoke_test"] for m in measures.values() for cs in m.values() for c in cs)
        curves = {name: {which: [c["curves"] for c in cs] for which, cs in m.items()} for name, m in measures.items()}
        for r in rows:
            mlflow.log_metrics({f"mitigate/{r['mitigation']}/{k}": float(r[k]) for k in COLUMNS[2:]
                                if isinstance(r[k], (int, float)) and r[k] == r[k]})
        mlflow.set_tag(em_tags.MITIGATE_CELLS, json.dumps(cell_runs)[:5000])
        with tempfile.TemporaryDirectory() as tmp:
            files = write_outputs(rows, curves, Path(tmp), f"Mitigations {cfg.name}", general, domain, smoke)
            for p in files.values():
                mlflow.log_artifact(str(p), ARTIFACT_DIR)
            table = files["mitigation_table.md"].read_text(encoding="utf-8")
        return {"run_id": pid, "rows": rows, "cells": cell_runs, "table_md": table, "smoke_test": smoke,
                "general_set": general, "domain_set": domain}


def main(argv: list[str] | None = None) -> int:
    """`em mitigate --config configs/mitigations/tiny.yaml [--key value ...]`."""
    from em_core.configs import parse_config
    from em_core.console import run_main

    def _mitigate(args: list[str]) -> int:
        cfg = parse_config(MitigateConfig, args, prog="em mitigate")
        result = run_mitigate(cfg)
        print(result["table_md"], end="")
        print(f"parent run: {result['run_id']} (artifacts under {ARTIFACT_DIR}/: mitigation_table.csv/.md, "
              "tradeoff.png/.json, curves.json)")
        print(f"browse: {tracking.ui_command()}")
        return 0

    return run_main(_mitigate, argv)
