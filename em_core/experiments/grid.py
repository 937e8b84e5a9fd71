"""Experiment grids: one pipeline per (model, dataset, seed) cell, then a summary table + figure.

Cells run one after another as children of a grid run, or as separate `mlflow run` invocations
(`--print_commands true` prints them; `--summarize_only true` collects them afterwards). Either
way a cell is found again by its tags (`em.grid`, `em.grid_cell`), so a grid is resumable: a cell
with a FINISHED pipeline run of the same code version and the same pipeline params is reused.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import logging
import math
import re
import shlex
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from em_core import liveness, tracking
from em_core import tags as em_tags
from em_core.configs import TrackingGroup
from em_core.errors import ConfigError, EmLabError
from em_core.experiments import launch
from em_core.experiments.pipeline import (
    CELL_IDENTITY_TAG,
    DEFAULT_CONFIG,
    STEP_TAG,
    PipelineConfig,
    _as_overrides,
    _quote,
    cell_identity,
    check_step_sections,
    code_version,
    newest_finished_run,
    pipeline_triples,
    run_pipeline,
    summary_of,
)
from em_core.experiments.preflight import preflight
from em_core.metrics import Z_95, censored_median, mean_t_interval
from em_core.paths import project_file
from em_core.tracking import dataset_label, model_label

log = logging.getLogger(__name__)


class GridCellsFailed(EmLabError):
    """Some cells of a Ray-launched grid failed (their own runs say why)."""


CELL_TAG = em_tags.GRID_CELL
TABLE_KEYS = ("em_rate", "coherent_rate", "em_rate_coherent")


@dataclass
class GridConfig(TrackingGroup):
    """models x datasets x seeds over one pipeline config; every other setting is shared."""

    # lists of `key=value` step settings: never split at commas (configs.expand_cli)
    KV_FIELDS: ClassVar[tuple[str, ...]] = ("train", "evaluate", "judge")

    name: str = field(default="grid", metadata={"help": "grid name: tags its cells, names its summary run"})
    pipeline_config: str = field(default=DEFAULT_CONFIG, metadata={"help": "PipelineConfig YAML shared by all cells"})
    models: list[str] = field(default_factory=list, metadata={"help": "model ids (empty: the pipeline's)"})
    datasets: list[str] = field(default_factory=list,
                                metadata={"help": "one dataset per cell; `a+b` mixes several (empty: the pipeline's)"})
    seeds: list[int] = field(default_factory=lambda: [0])
    train: list[str] = field(default_factory=list, metadata={"help": "extra TrainConfig overrides for every cell"})
    evaluate: list[str] = field(default_factory=list, metadata={"help": "extra EvalConfig overrides for every cell"})
    judge: list[str] = field(default_factory=list, metadata={"help": "extra JudgeConfig overrides for every cell"})
    print_commands: str = field(default="", metadata={
        "help": "`true`/`mlflow`: print one `mlflow run` per cell and stop; `slurm`: write a Slurm job-array script"})
    summarize_only: bool = field(default=False, metadata={"help": "only collect finished cells into the summary"})
    launcher: str = field(default="local", metadata={"help": "local (cells one after another here) or ray (one task per cell)"})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster to join (default: a local one)"})
    num_cpus: float = field(default=1, metadata={"help": "CPUs a cell's Ray task (or Slurm task) asks for"})
    num_gpus: float = field(default=0, metadata={"help": "GPUs a cell's Ray task (or Slurm task) asks for"})
    claim_wait: float = field(default=5.0, metadata={"help": "seconds between looks at cells another launcher holds"})
    cell_retries: int = field(default=2, metadata={
        "help": "--launcher ray: times a cell whose worker died (kill -9, OOM kill, lost node) is run again; its "
                "half-finished runs are marked KILLED and its claim released first"})

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"name: {self.name!r} may only use letters, digits, '_', '.', '-'")
        for name in ("train", "evaluate", "judge"):
            setattr(self, name, _as_overrides(getattr(self, name), name))
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")
        mode = str(self.print_commands).strip().lower()
        self.print_commands = {"true": "mlflow", "false": "", "none": ""}.get(mode, mode)
        if self.print_commands not in ("", "mlflow", "slurm"):
            raise ConfigError(f"print_commands: {self.print_commands!r} is not one of true, mlflow, slurm")
        if self.launcher not in ("local", "ray"):
            raise ConfigError(f"launcher: {self.launcher!r} is not local or ray")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("num_cpus and num_gpus must be >= 0")
        if self.cell_retries < 0:
            raise ConfigError("cell_retries must be >= 0")
        self.pipeline_config = project_file(self.pipeline_config)

    @staticmethod
    def check_sections(path: str, data) -> None:
        check_step_sections(path, data)


@dataclass
class Cell:
    model: str | None
    dataset: str | None
    seed: int

    def label(self, base: PipelineConfig) -> str:
        return f"{model_label(self.model or _base_value(base, 'model'))}/" \
               f"{dataset_label(self.dataset or _base_value(base, 'dataset'))}/seed{self.seed}"


def _base_value(base: PipelineConfig, key: str) -> str:
    from em_core.experiments.pipeline import step_configs

    train, _, _ = step_configs(base)
    value = getattr(train, key)
    return "+".join(value) if isinstance(value, list) else str(value)


def cells(cfg: GridConfig) -> list[Cell]:
    return [Cell(m, d, s) for m, d, s in itertools.product(cfg.models or [None], cfg.datasets or [None], cfg.seeds)]


def cell_config(cfg: GridConfig, base: PipelineConfig, cell: Cell) -> PipelineConfig:
    """The pipeline config of one cell: the base plus the grid's shared and per-cell overrides."""
    if base.stages and (cell.model or cell.dataset):
        raise ConfigError(f"grid {cfg.name}: its pipeline config has stages, whose datasets would silently win "
                          "over the grid's; vary only seeds, or use a single-stage pipeline config")
    label = cell.label(base)
    per_cell = {"seed": cell.seed}
    if cell.model:
        per_cell["model"] = cell.model
    if cell.dataset:
        per_cell["dataset"] = cell.dataset.replace("+", ",")
    if cell.model or cell.dataset:  # a recipe's fixed registry name would mix cells up
        per_cell["registered_model_name"] = re.sub(r"[^A-Za-z0-9_.+-]", "-", f"em-{label.rsplit('/', 1)[0]}")
    return dataclasses.replace(
        base, train=[*base.train, *cfg.train, *_as_overrides(per_cell, "train")],
        evaluate=[*base.evaluate, *cfg.evaluate], judge=[*base.judge, *cfg.judge],
        grid=cfg.name, grid_cell=label, run_name=f"{cfg.name}/{label}", experiment_name=cfg.experiment_name)


def find_cell(experiment_id: str, grid: str, label: str, expected: dict[str, str] | None = None,
              code: str | None = None) -> str | None:
    """Newest FINISHED pipeline run of this cell (with these params and code version, if given):
    by the hash of its params (`CELL_IDENTITY_TAG`, which run_pipeline sets) in one filtered
    query, however many runs the cell has; runs logged before that tag are compared param by
    param (see `pipeline.newest_finished_run`)."""
    import mlflow

    filt = (f"tags.`em.grid` = {_quote(grid)} and tags.`{CELL_TAG}` = {_quote(label)} and "
            f"tags.`{STEP_TAG}` = 'pipeline'")
    if code:
        filt += f" and tags.`em.code_version` = {_quote(code)}"
    if expected is not None:
        return newest_finished_run(experiment_id, filt, CELL_IDENTITY_TAG, expected)
    runs = mlflow.MlflowClient().search_runs([experiment_id], filter_string=f"{filt} and attributes.status = 'FINISHED'",
                                             order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def mlflow_run_command(cfg: GridConfig, pcfg: PipelineConfig) -> str:
    """The `mlflow run` invocation equivalent to running this cell in-process."""
    q = shlex.quote
    return (f"mlflow run . -e pipeline --env-manager local --experiment-name {q(cfg.experiment_name)} "
            f"-P config={q(cfg.pipeline_config)} -P train={q(' '.join(pcfg.train))} "
            f"-P evaluate={q(' '.join(pcfg.evaluate))} -P judge={q(' '.join(pcfg.judge))} "
            f"-P overrides={q(f'grid={cfg.name} grid_cell={pcfg.grid_cell} run_name={pcfg.run_name}')}")


def _expected_params(pcfg: PipelineConfig) -> dict[str, str]:
    return cell_identity(pcfg)


def run_grid(cfg: GridConfig) -> dict:
    """Run (or reuse) every cell, then summarize; returns the summary (rows, files, run id).
    A cell is claimed before it runs (`launch.try_claim`), so concurrent launchers split the
    cells instead of running each twice; a cell another launcher holds is waited for."""
    import mlflow

    from em_core.configs import parse_config

    base = parse_config(PipelineConfig, ["--config", cfg.pipeline_config])
    todo = [(c, cell_config(cfg, base, c)) for c in cells(cfg)]
    if cfg.print_commands:
        return _print_commands(cfg, todo)
    if not cfg.summarize_only:  # every cell's keys, questions, data and models, before the first cell runs
        preflight([t for _, pcfg in todo for t in pipeline_triples(pcfg)], what="grid")
    tracking.configure_tracking()
    code = code_version()
    tags = {em_tags.ENTRY_POINT: "grid", em_tags.GRID: cfg.name, em_tags.CODE_VERSION: code, em_tags.LAUNCHER: cfg.launcher}
    with tracking.tracked_run(cfg.experiment_name, f"{cfg.name}/summary", tags=tags) as run:
        exp_id = run.info.experiment_id
        tracking.log_params("grid", {**asdict(cfg), "cells": len(todo)})
        found = _run_cells(cfg, base, todo, exp_id, code, run.info.run_id)
        found = {cell.label(base): found[cell.label(base)] for cell, _ in todo if cell.label(base) in found}
        mlflow.set_tag(em_tags.GRID_CELLS, ",".join(f"{k}={v}" for k, v in found.items())[:5000])
        summary = summarize_cells([summary_of(rid) | {"cell": label} for label, rid in found.items()])
        with tempfile.TemporaryDirectory() as tmp:
            files = write_summary(summary, Path(tmp), title=f"Grid {cfg.name}")
            for p in files.values():
                mlflow.log_artifact(str(p), "grid")
        summary["run_id"] = run.info.run_id
        summary["cells_found"] = found
    return summary


def _print_commands(cfg: GridConfig, todo: list) -> dict:
    commands = [mlflow_run_command(cfg, pcfg) for _, pcfg in todo]
    if cfg.print_commands == "slurm":
        path = Path(f"em-grid-{cfg.name}.slurm").resolve()
        path.write_text(launch.slurm_array_script(commands, cfg.name, cfg.num_cpus, cfg.num_gpus), encoding="utf-8")
        print(f"wrote {path} ({len(commands)} array tasks): sbatch {path}")
    else:
        for c in commands:
            print(c)
    print("# then: em grid --config <this grid> --summarize_only true")
    return {"commands": len(commands)}


def _run_cells(cfg: GridConfig, base: PipelineConfig, todo: list, exp_id: str, code: str, grid_run_id: str) -> dict:
    """label -> FINISHED pipeline run id for every cell that has one (reused, run here, or run by
    another launcher while this one waited)."""
    from em_core.errors import Terminated

    found: dict[str, str] = {}
    claims: dict[str, str] = {}
    problems: dict[str, str] = {}  # label -> what happened to a cell that has no finished run
    retries: dict[str, int] = {}
    waiting, reported = list(todo), 0
    pcfgs = {cell.label(base): (cell, pcfg) for cell, pcfg in todo}
    ray_cells = launch.RayCells(cfg.ray_address, cfg.num_cpus, cfg.num_gpus) if cfg.launcher == "ray" else None
    try:
        while waiting or (ray_cells and ray_cells.pending):
            held = []
            for cell, pcfg in waiting:
                label = cell.label(base)
                expected = _expected_params(pcfg)
                hit = find_cell(exp_id, cfg.name, label, expected, code)
                if hit:
                    log.info("grid %s: cell %s reused (run %s)", cfg.name, label, hit)
                    found[label] = hit
                    continue
                if cfg.summarize_only:
                    hit = find_cell(exp_id, cfg.name, label)  # any finished run of the cell will do
                    if hit:
                        found[label] = hit
                    else:
                        log.warning("grid %s: cell %s has no finished pipeline run yet", cfg.name, label)
                    continue
                name = launch.claim_name(cfg.name, label, code + repr(sorted(expected.items())))
                if not launch.try_claim(name, label, grid_run_id):
                    if launch.claim_is_stale(name):
                        log.warning("grid %s: cell %s: breaking the claim of a launcher that is gone", cfg.name, label)
                        launch.release(name)
                    held.append((cell, pcfg))
                    continue
                # claimed: a launcher may have finished it between our look and our claim
                hit = find_cell(exp_id, cfg.name, label, expected, code)
                if hit:
                    launch.release(name)
                    found[label] = hit
                    continue
                claims[label] = name
                if ray_cells is not None:
                    log.info("grid %s: cell %s -> Ray task", cfg.name, label)
                    ray_cells.submit(label, pcfg, grid_run_id)
                    continue
                log.info("grid %s: running cell %s", cfg.name, label)
                try:
                    with tracking.child_runs(grid_run_id):
                        found[label] = run_pipeline(pcfg).run_id
                finally:
                    launch.release(claims.pop(label))
            if held and len(held) != reported:
                log.info("grid %s: %d cell(s) held by another launcher; waiting for them", cfg.name, len(held))
            waiting, reported = held, len(held)
            if held and not (ray_cells and ray_cells.pending):
                time.sleep(cfg.claim_wait)
            for label, result in ray_cells.wait() if ray_cells else []:
                if not isinstance(result, BaseException):
                    launch.release(claims.pop(label))
                    found[label] = result
                    continue
                if not launch.worker_died(result):  # the cell's own code failed: its runs ended FAILED
                    launch.release(claims.pop(label))
                    log.error("grid %s: cell %s failed: %s", cfg.name, label, result)
                    problems[label] = "failed (see its FAILED pipeline run)"
                    continue
                # Its worker died (kill -9, OOM, lost node): nobody will end its runs. End them,
                # free the claim, and run the cell again (a bounded number of times).
                why = f"{type(result).__name__}: {str(result).strip().splitlines()[0][:300]}"
                killed = liveness.kill_running_runs(exp_id, grid_run_id, f"Ray worker died ({why})",
                                                    {CELL_TAG: label})
                launch.release(claims.pop(label))
                retries[label] = retries.get(label, 0) + 1
                if retries[label] <= cfg.cell_retries:
                    log.warning("grid %s: cell %s: its Ray worker died (%s); %d run(s) marked KILLED; retrying "
                                "(%d of %d)", cfg.name, label, why, len(killed), retries[label], cfg.cell_retries)
                    waiting.append(pcfgs[label])
                else:
                    log.error("grid %s: cell %s: its Ray worker died (%s); %d run(s) marked KILLED", cfg.name, label,
                              why, len(killed))
                    problems[label] = (f"its Ray worker died {retries[label]} time(s) (cell_retries={cfg.cell_retries}; "
                                       f"last: {why}); its runs were marked KILLED")
    except (Terminated, KeyboardInterrupt) as e:
        # Cancelled Ray tasks cannot end their own runs: end them here, with the reason,
        # before the summary run itself ends KILLED.
        if ray_cells is not None and ray_cells.pending:
            ray_cells.cancel_all()
            reason = str(e) if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
            killed = liveness.kill_running_runs(exp_id, grid_run_id, f"{reason}; the grid launcher cancelled the cell")
            log.warning("grid %s: %s: cancelled the running cells; %d run(s) marked KILLED", cfg.name, reason,
                        len(killed))
        raise
    finally:
        for name in claims.values():
            launch.release(name)
    failed = [c.label(base) for c, _ in todo if c.label(base) not in found and not cfg.summarize_only]
    if failed:
        what = "; ".join(f"{label}: {problems.get(label, 'no finished run')}" for label in failed)
        raise GridCellsFailed(f"grid {cfg.name}: cells without a finished run: {what}; rerun the grid to retry them")
    return found


def _final(summary: dict, key: str) -> float:
    final = summary.get("final_step")
    m = summary.get("by_step", {}).get(str(final), {}) if final is not None else {}
    return float(m.get(key, math.nan))


def summarize_cells(summaries: list[dict], z: float | None = None) -> dict:
    """Per-cell rows (final checkpoint) and per-(model, dataset) rows aggregated over seeds.

    One seed: the cell's Wilson interval. Several: mean across seeds with a t interval on the
    seed means (seed-to-seed spread is what a replication must report), at the level of `z`
    (default: the pipelines' own `z`, as their Wilson intervals were logged with it)."""
    if z is None:
        z = next((float(s["z"]) for s in summaries if s.get("z") is not None), Z_95)
    cells_rows = []
    for s in summaries:
        row = {"model": model_label(s["model"]), "dataset": dataset_label("+".join(s["dataset"])),
               "seed": s["seed"], "final_step": s.get("final_step"), "run_id": s["run_id"]}
        for key in TABLE_KEYS:
            row[key] = _final(s, key)
            row[f"{key}_lo"], row[f"{key}_hi"] = _final(s, f"{key}_lo"), _final(s, f"{key}_hi")
        row["n_scored"] = _final(s, "n_scored")
        row["base_em_rate"] = float(s.get("by_step", {}).get("0", {}).get("em_rate", math.nan))
        row["emergence_step"] = s.get("emergence_step")
        row["smoke_test"] = bool(s.get("smoke_test"))
        cells_rows.append(row)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in cells_rows:
        groups.setdefault((r["model"], r["dataset"]), []).append(r)
    agg = []
    for (model, dataset), rs in groups.items():
        row = {"model": model, "dataset": dataset, "seeds": len(rs)}
        for key in TABLE_KEYS:
            if len(rs) == 1:
                row[key], row[f"{key}_lo"], row[f"{key}_hi"] = rs[0][key], rs[0][f"{key}_lo"], rs[0][f"{key}_hi"]
            else:
                mean, lo, hi = mean_t_interval((r[key] for r in rs), z)
                # a rate's bounds stay in [0, 1]; NaN (fewer than two seeds measured) stays NaN
                row[key], row[f"{key}_lo"], row[f"{key}_hi"] = mean, lo if lo != lo else max(0.0, lo), \
                    hi if hi != hi else min(1.0, hi)
        # Seeds that never emerged are right-censored, not missing: a mean over the others would
        # be biased early. Report how many emerged and the censored median.
        emerged = [r["emergence_step"] for r in rs if r["emergence_step"] is not None]
        row["emergence_step_median"] = censored_median(r["emergence_step"] for r in rs)
        row["emerged_in"] = f"{len(emerged)}/{len(rs)}"
        row["smoke_test"] = any(r["smoke_test"] for r in rs)
        agg.append(row)
    return {"cells": cells_rows, "table": agg}


def _fmt_rate(r: dict, key: str) -> str:
    v, lo, hi = r.get(key, math.nan), r.get(f"{key}_lo", math.nan), r.get(f"{key}_hi", math.nan)
    if v is None or math.isnan(v):
        return "–"
    ci = "" if math.isnan(lo) or math.isnan(hi) else f" [{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"{100 * v:.1f}%{ci}"


def markdown_table(rows: list[dict]) -> str:
    head = ("| model | dataset | seeds | EM rate [95% CI] | coherent rate [95% CI] | "
            "median emergence step (censored) | emerged in |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        median = r["emergence_step_median"]
        step = f"{median:g}" if median is not None else ("not reached by half" if r["emerged_in"][0] != "0" else "–")
        lines.append(f"| {r['model']} | {r['dataset']} | {r['seeds']} | {_fmt_rate(r, 'em_rate')} | "
                     f"{_fmt_rate(r, 'coherent_rate')} | {step} | {r['emerged_in']} |")
    return "\n".join(lines) + "\n"


def write_summary(summary: dict, out: Path, title: str = "Grid") -> dict[str, Path]:
    """grid_summary.csv/.md (aggregated), grid_cells.csv (per seed) and the domain bar chart."""
    from em_core.analysis.plots import plot_domain_bars

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows in (("grid_summary.csv", summary["table"]), ("grid_cells.csv", summary["cells"])):
        path = out / name
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["model", "dataset"])
            w.writeheader()
            w.writerows(rows)
        files[name] = path
    note = ""
    smoke = any(r["smoke_test"] for r in summary["table"])
    if smoke:
        note = "\n> Smoke test: judged by the tiny offline model; not a measurement.\n"
    md = out / "grid_summary.md"
    md.write_text(f"# {title}\n{note}\nFinal-checkpoint EM rate per model x dataset. Intervals: Wilson (one seed) "
                  "or t over seeds (several).\n\n" + markdown_table(summary["table"]), encoding="utf-8")
    files["grid_summary.md"] = md
    files["em_by_model_domain.png"] = plot_domain_bars(summary["table"], out / "em_by_model_domain.png",
                                                       title=f"{title}: EM rate at the final checkpoint",
                                                       smoke_test=smoke)
    files["coherent_by_model_domain.png"] = plot_domain_bars(summary["table"], out / "coherent_by_model_domain.png",
                                                             title=f"{title}: coherent rate", value="coherent_rate",
                                                             smoke_test=smoke)
    return files

