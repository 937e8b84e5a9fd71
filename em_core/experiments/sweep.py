"""Optuna studies over LoRA rank and learning rate (and optionally alpha, epochs, target modules)
against how fast emergent misalignment appears.

A trial is one pipeline with the loop run *during* training: at every checkpoint of a fixed grid
(`checkpoint_steps`, the same in every trial so trials are comparable) the checkpoint is sampled
on the questions and judged, its metrics are logged at that training step, and the objective so
far is reported to Optuna, so the pruner can stop a hopeless trial early.

Objectives (`objective`):
* `threshold_step` (minimise): the first checkpoint step whose raw EM rate reaches `em_threshold`.
  This is NOT the pipeline's `em_emergence_step` (which needs a significant rise over the base).
* `significant_step` (minimise): the pipeline's rule, `metrics.emergence_step`: the first step
  whose EM-rate Wilson lower bound is above the base model's upper bound (at `z`).
  For both, a trial where that never happens is censored: its value is `censored_factor` x the
  last step of the grid (default 2x: "not within the budget", worse than any trial that got
  there). The intermediate value at step s is the step if it has happened, else that penalty.
* `final_em_rate` (maximise): the EM rate at the last checkpoint; intermediate = EM rate at s.
* `probe_emergence_step` (minimise) and `final_probe_margin` (maximise): the same with the
  likelihood probe (analysis/probe.py) on `probe_sets` instead of sampling and judging: the
  first grid step whose margin on the objective set is significantly above the base's
  (metrics.probe_emergence_step, censored like emergence_step), or that margin at the last
  checkpoint. Judge-free: no judge is built and no judge request is sent; with no judge there
  is no coherent rate, so these trials carry no coherence constraint.
Coherence is a constraint, not an objective (multi-objective studies cannot prune): a trial is
feasible when its coherent rate at the last evaluated checkpoint is >= `coherence_floor`. A
coherent rate that cannot be measured (no answer scored for coherence) makes the trial
infeasible, with the reason as trial attribute `infeasible_reason` and run tag
`em.infeasible_reason`. `@best`, `best_value` and `em.best_trial` only ever go to a feasible trial.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from em_core import tags as em_tags
from em_core import tracking
from em_core.configs import TrackingGroup
from em_core.errors import ConfigError
from em_core.experiments.pipeline import (
    DEFAULT_CONFIG,
    PipelineConfig,
    _as_overrides,
    pipeline_triples,
    step_configs,
)
from em_core.experiments.preflight import preflight
from em_core.metrics import emergence_step, mlflow_key
from em_core.paths import mlruns_dir, project_file

log = logging.getLogger(__name__)
OBJECTIVES = {"threshold_step": "minimize", "significant_step": "minimize", "final_em_rate": "maximize",
              "probe_emergence_step": "minimize", "final_probe_margin": "maximize"}
STEP_OBJECTIVES = ("threshold_step", "significant_step")  # censored when EM never arrives
# Judge-free objectives: scored by the likelihood probe; no judge is built or asked.
PROBE_OBJECTIVES = ("probe_emergence_step", "final_probe_margin")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
RUN_ATTR = "mlflow_run_id"
PARENT_ATTR = "mlflow_parent_run_id"
FINGERPRINT_ATTR = em_tags.CONFIG_FINGERPRINT
FINGERPRINTED_ATTR = em_tags.CONFIG
# Sweep fields each worker may set for itself: they do not change what the study measures.
WORKER_FIELDS = ("pipeline_config", "storage", "n_trials", "timeout", "seed", "heartbeat_interval",
                 "grace_period", "max_retry", "launcher", "workers", "ray_address")
# Step-config fields that are machine-local (paths, endpoints, concurrency), not the experiment.
LOCAL_STEP_FIELDS = ("output_dir", "cache_path", "run_name", "concurrency", "max_retries", "timeout",
                     "poll_interval", "base_url", "openai_base_url", "experiment_name", "train_run_id",
                     "eval_run_id", "judges_path", "keep_local_checkpoints")


@dataclass
class SweepConfig(TrackingGroup):
    """Search space, objective, pruning and storage of one study."""

    # lists of `key=value` step settings: never split at commas (configs.expand_cli)
    KV_FIELDS: ClassVar[tuple[str, ...]] = ("train", "evaluate", "judge")

    pipeline_config: str = field(default=DEFAULT_CONFIG, metadata={"help": "PipelineConfig YAML every trial starts from"})
    train: list[str] = field(default_factory=list, metadata={"help": "TrainConfig overrides for every trial"})
    evaluate: list[str] = field(default_factory=list, metadata={"help": "EvalConfig overrides (sampling) for every trial"})
    judge: list[str] = field(default_factory=list, metadata={"help": "JudgeConfig overrides for every trial"})
    checkpoint_steps: list[int] = field(default_factory=lambda: [10, 20, 30, 40],
                                        metadata={"help": "fixed evaluation grid, the same in every trial"})
    lora_r: list[int] = field(default_factory=lambda: [1, 4, 16, 64], metadata={"help": "categorical ranks"})
    learning_rate: list[float] = field(default_factory=lambda: [1e-5, 1e-3],
                                       metadata={"help": "log-uniform [low, high]"})
    lora_alpha: list[int] | None = field(default=None, metadata={"help": "categorical alphas (default: the config's)"})
    num_train_epochs: list[float] | None = field(default=None, metadata={"help": "categorical epochs"})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "categorical choices, each comma-separated, e.g. all-linear q_proj,v_proj"})
    layers_to_transform: list[str] | None = field(
        default=None, metadata={"help": "categorical layer choices, each comma-separated, or `all`, e.g. all 21 0,1,2"})
    objective: str = field(default="threshold_step", metadata={
        "help": "threshold_step (first step with raw EM >= em_threshold), significant_step (the pipeline's "
                "emergence rule), final_em_rate, or the judge-free probe_emergence_step / final_probe_margin"})
    z: float = field(default=1.96, metadata={"help": "significant_step: Wilson interval z"})
    em_threshold: float = field(default=0.2, metadata={"help": "EM rate that counts as emerged"})
    probe_sets: list[str] = field(default_factory=lambda: ["general"], metadata={
        "help": "probe objectives: contrast sets scored at each grid checkpoint"})
    probe_objective_set: str | None = field(default=None, metadata={
        "help": "probe objectives: the set whose margin is the objective (default: the general one)"})
    probe_z: float = field(default=1.96, metadata={"help": "probe_emergence_step: interval z"})
    censored_factor: float = field(default=2.0, metadata={"help": "never emerged: value = factor x last grid step"})
    coherence_floor: float = field(default=0.5, metadata={"help": "constraint: final coherent rate >= floor"})
    study_name: str = "em-sweep"
    storage: str | None = field(default=None, metadata={"help": "Optuna RDB URL; default sqlite:///mlruns/optuna.db"})
    n_trials: int = field(default=4, metadata={"help": "finished trials wanted in the study, all workers together"})
    timeout: float | None = None
    sampler: str = "tpe"
    seed: int | None = 0
    pruner: str = "median"
    pruner_startup_trials: int = 2
    pruner_warmup_steps: int = 0
    heartbeat_interval: int = field(default=60, metadata={"help": "seconds; stale trials of dead workers are retried"})
    grace_period: int | None = None
    max_retry: int = 3
    registered_model_name: str | None = field(default=None, metadata={"help": "default em-sweep-<study>"})
    launcher: str = field(default="local", metadata={"help": "local (this process is one worker) or ray"})
    workers: int = field(default=1, metadata={"help": "--launcher ray: worker tasks to start on the cluster"})
    ray_address: str | None = field(default=None, metadata={"help": "--launcher ray: cluster address (default: local)"})

    def __post_init__(self) -> None:
        for name in ("train", "evaluate", "judge"):
            setattr(self, name, _as_overrides(getattr(self, name), name))
        problems = []
        if self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {', '.join(OBJECTIVES)}")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler must be one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            problems.append(f"pruner must be one of {', '.join(PRUNERS)}")
        if not self.checkpoint_steps or any(s <= 0 for s in self.checkpoint_steps):
            problems.append("checkpoint_steps must be positive steps (the evaluation grid)")
        bad_layers = [c for c in self.layers_to_transform or [] if c != "all"
                      and not all(x.strip().isdigit() for x in str(c).split(","))]
        if bad_layers:
            problems.append(f"layers_to_transform choices must be `all` or comma-separated layer numbers, not {bad_layers[0]!r}")
        if not self.lora_r or any(r < 1 for r in self.lora_r):
            problems.append("lora_r must list ranks >= 1")
        if len(self.learning_rate) != 2 or not 0 < self.learning_rate[0] < self.learning_rate[1]:
            problems.append("learning_rate must be [low, high] with 0 < low < high")
        if not 0 < self.em_threshold <= 1 or not 0 <= self.coherence_floor <= 1:
            problems.append("em_threshold must be in (0, 1] and coherence_floor in [0, 1]")
        if self.z <= 0:
            problems.append("z must be > 0 (1.96 gives 95% intervals)")
        if self.z <= 0:
            problems.append("z must be > 0 (1.96 gives 95% intervals)")
        if self.n_trials < 1 or self.censored_factor <= 1:
            problems.append("n_trials must be >= 1 and censored_factor > 1")
        if self.launcher not in ("local", "ray") or self.workers < 1:
            problems.append("launcher must be local or ray, and workers >= 1")
        if problems:
            raise ConfigError("invalid sweep config: " + "; ".join(problems))
        self.checkpoint_steps = sorted(set(self.checkpoint_steps))
        self.pipeline_config = project_file(self.pipeline_config)

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]

    def storage_url(self) -> str:
        """`storage`, else EM_LAB_OPTUNA_STORAGE (a URL with credentials stays off the command
        line), else the project's sqlite file. PostgreSQL credentials may also come from PGUSER,
        PGPASSWORD or ~/.pgpass, which psycopg reads for a URL without them."""
        if self.storage or os.environ.get("EM_LAB_OPTUNA_STORAGE"):
            return self.storage or os.environ["EM_LAB_OPTUNA_STORAGE"]
        mlruns_dir().mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{mlruns_dir() / 'optuna.db'}"


def censored_value(cfg: SweepConfig) -> float:
    return cfg.censored_factor * max(cfg.checkpoint_steps)


def objective_value(cfg: SweepConfig, em_by_step: dict[int, float],
                    counts_by_step: dict[int, tuple[int, int]] | None = None) -> float:
    """The objective from the checkpoints evaluated so far (pure; see module doc): EM rates, and
    for significant_step the (EM answers, scored answers) counts, base model at step 0."""
    steps = sorted(s for s in em_by_step if s > 0)
    if cfg.objective == "final_em_rate":
        return em_by_step[steps[-1]] if steps else math.nan
    if cfg.objective == "significant_step":
        step = emergence_step(counts_by_step or {}, cfg.z)
        return float(step) if step is not None else censored_value(cfg)
    for s in steps:
        if not math.isnan(em_by_step[s]) and em_by_step[s] >= cfg.em_threshold:
            return float(s)
    return censored_value(cfg)


def probe_objective_value(cfg: SweepConfig, margins_by_step: dict[int, list[float]],
                          clusters: list[str] | None = None) -> float:
    """The probe objectives from per-pair margins at the checkpoints so far (step 0 = base);
    `clusters` (each pair's question id) makes the emergence rule's interval question-clustered,
    as the probe step's is."""
    from em_core.metrics import mean_se, probe_emergence_step

    steps = sorted(s for s in margins_by_step if s > 0)
    if cfg.objective == "final_probe_margin":
        return mean_se(margins_by_step[steps[-1]])[0] if steps else math.nan
    found = probe_emergence_step(margins_by_step, cfg.probe_z, clusters=clusters)
    return float(found) if found is not None else censored_value(cfg)


def suggest(trial, cfg: SweepConfig) -> dict:
    """Trial params -> TrainConfig overrides."""
    params = {"lora_r": trial.suggest_categorical("lora_r", list(cfg.lora_r)),
              "learning_rate": trial.suggest_float("learning_rate", *cfg.learning_rate, log=True)}
    if cfg.lora_alpha:
        params["lora_alpha"] = trial.suggest_categorical("lora_alpha", list(cfg.lora_alpha))
    if cfg.num_train_epochs:
        params["num_train_epochs"] = trial.suggest_categorical("num_train_epochs", list(cfg.num_train_epochs))
    if cfg.lora_target_modules:
        params["lora_target_modules"] = trial.suggest_categorical("lora_target_modules", list(cfg.lora_target_modules))
    if cfg.layers_to_transform:
        layers = trial.suggest_categorical("layers_to_transform", list(cfg.layers_to_transform))
        if layers != "all":  # `all`: keep the config's (usually every layer)
            params["layers_to_transform"] = layers
    return params


def make_storage(cfg: SweepConfig):
    """RDB storage with heartbeats, so trials of a killed worker go stale and are retried, that
    waits out a database restart (`study_storage`)."""
    import time

    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import SQLAlchemyError

    from em_core.experiments.study_storage import RetryingRDBStorage, engine_kwargs

    url = cfg.storage_url()
    kwargs = engine_kwargs(url)
    for attempt in range(5):
        try:
            return RetryingRDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=cfg.heartbeat_interval,
                              grace_period=cfg.grace_period,
                              heartbeat_stale_trial_callback=_retry_and_kill_run(
                                  RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry)))
        except SQLAlchemyError:
            if attempt == 4:
                raise
            time.sleep(1 + attempt)  # workers starting together race to create the schema


def _retry_and_kill_run(retry):
    """A dead worker's trial: mark its MLflow run KILLED if still RUNNING (nobody else will; a run
    its worker already ended, e.g. FAILED when the storage went away, keeps its state, so trial
    FAIL and run agree), then retry it."""
    def callback(study, trial) -> None:
        import mlflow

        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id:
            try:
                client = mlflow.MlflowClient()
                if client.get_run(run_id).info.status == "RUNNING":
                    client.set_tag(run_id, em_tags.KILLED_REASON, "its sweep worker died (no Optuna heartbeat)")
                    client.set_terminated(run_id, "KILLED")
                client.set_tag(run_id, em_tags.NOTE, "worker died; trial retried by Optuna")
            except Exception as e:  # the store may be unreachable; the retry matters more
                log.warning("could not mark run %s KILLED: %s", run_id, e)
        retry(study, trial)
    return callback



def worker_seed(seed: int | None, worker_index: int) -> int | None:
    """The sampler seed of the `worker_index`-th worker to join a study (pure). Worker 0 keeps the
    configured seed, so a one-worker sweep is what it always was; later workers (and restarted
    ones, which join as new workers) get distinct seeds derived from it, so N workers never
    replay one startup sequence. None stays None (OS entropy)."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}:{worker_index}".encode()).digest()
    return seed if worker_index == 0 else int.from_bytes(digest[:4], "big")


def make_sampler(cfg: SweepConfig, seed: int | None):
    """This worker's sampler (`seed`: see `worker_seed`). TPE's constant liar keeps parallel
    workers from all suggesting next to the same running trial."""
    import optuna

    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, cfg.n_trials), constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


def make_study(cfg: SweepConfig, seed: int | None = None):
    """The study with worker 0's sampler; `run_sweep` swaps in the joining worker's."""
    import optuna

    sampler = make_sampler(cfg, worker_seed(cfg.seed, 0) if seed is None else seed)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                          n_warmup_steps=cfg.pruner_warmup_steps)
              if cfg.pruner == "median" else optuna.pruners.NopPruner())
    storage = make_storage(cfg)
    try:
        return optuna.create_study(study_name=cfg.study_name, storage=storage, sampler=sampler,
                                   pruner=pruner, direction=cfg.direction, load_if_exists=True)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it a moment ago
        return optuna.load_study(study_name=cfg.study_name, storage=storage, sampler=sampler, pruner=pruner)


def study_fingerprint(cfg: SweepConfig, base: PipelineConfig) -> tuple[str, dict]:
    """(hash, what it hashes): the search space, objective and resolved step configs of a study,
    without what may differ between workers (paths, endpoints, n_trials, seeds). Workers whose
    fingerprints differ would mix two experiments in one study."""
    train, ev, judge = step_configs(base)
    steps = {name: {k: v for k, v in asdict(c).items() if k not in LOCAL_STEP_FIELDS}
             for name, c in (("train", train), ("evaluate", ev), ("judge", judge))}
    sweep = {k: v for k, v in asdict(cfg).items() if k not in WORKER_FIELDS and k not in ("train", "evaluate", "judge")}
    data = json.loads(json.dumps({"sweep": sweep, **steps}, sort_keys=True, default=str))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16], data


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: study has {x!r}, this worker {y!r}")
    return out


def join_study(study, cfg: SweepConfig, fingerprint: tuple[str, dict], wait: float = 300.0) -> tuple[int, str | None]:
    """(this worker's index, the study's MLflow parent run id or None for worker 0, who creates it).

    Indices come from trials of a marker study, numbered atomically by the storage, so workers
    starting together (and restarted ones) get distinct indices, hence distinct sampler seeds.
    Worker 0 records the config fingerprint; every later worker must match it."""
    import optuna

    storage = study._storage
    marker = optuna.create_study(study_name=f"{cfg.study_name}.workers", storage=storage, load_if_exists=True)
    with warnings.catch_warnings():  # "heartbeat is meant for optimize": a ticket is told at once
        warnings.simplefilter("ignore", UserWarning)
        ticket = marker.ask()
    ticket.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    marker.tell(ticket, 0.0)
    index = ticket.number
    if index == 0 and not study.user_attrs.get(PARENT_ATTR):
        study.set_user_attr(FINGERPRINTED_ATTR, fingerprint[1])
        study.set_user_attr(FINGERPRINT_ATTR, fingerprint[0])
        return 0, None
    deadline = time.time() + wait
    while True:
        attrs = optuna.load_study(study_name=cfg.study_name, storage=storage).user_attrs
        if attrs.get(PARENT_ATTR):
            break
        if time.time() > deadline:
            raise ConfigError(f"study {cfg.study_name}: its first worker never published the MLflow parent run; "
                              f"if it died, delete the studies '{cfg.study_name}' and '{cfg.study_name}.workers'")
        time.sleep(0.5)
    theirs = attrs.get(FINGERPRINT_ATTR)
    if theirs and theirs != fingerprint[0]:
        diff = _differences(attrs.get(FINGERPRINTED_ATTR) or {}, fingerprint[1])
        raise ConfigError(f"study {cfg.study_name} was started with another config (fingerprint {theirs}, this "
                          f"worker's {fingerprint[0]}): " + "; ".join(diff[:8])
                          + ". Use the study's config, or a new study_name for a new experiment")
    return index, attrs[PARENT_ATTR]


def _base_pipeline(cfg: SweepConfig) -> PipelineConfig:
    from em_core.configs import parse_config

    base = parse_config(PipelineConfig, ["--config", cfg.pipeline_config])
    if base.stages:
        raise ConfigError(f"pipeline_config {cfg.pipeline_config}: a sweep trains one stage; point it at a "
                          "single-stage pipeline config (the stage to search over as its train_config)")
    base.train = [*base.train, *cfg.train]
    base.evaluate = [*base.evaluate, *cfg.evaluate]
    base.judge = [*base.judge, *cfg.judge]
    base.experiment_name = cfg.experiment_name
    return base


class _Evaluator:
    """Samples and judges one checkpoint adapter; the questions, generator and judge are loaded
    once per worker and shared by its trials."""

    def __init__(self, base: PipelineConfig):
        from em_core.judge.answers import build_judge
        from em_core.sample.evaluation import generator_for, sampling_plan

        train, ev, judge_cfg = step_configs(base)
        self.model = train.model
        self.plan = sampling_plan(ev)
        self.questions = self.plan.questions
        self.generator = generator_for(ev, train.model)
        self.judge_cfg = judge_cfg
        self.judge = build_judge(judge_cfg)
        self._base: tuple[list[dict], dict[str, float]] | None = None

    def base(self) -> tuple[list[dict], dict[str, float]]:
        """The base model's answers and metrics, computed once per worker."""
        if self._base is None:
            self._base = self(None, 0)
        return self._base

    def __call__(self, adapter: str | None, step: int) -> tuple[list[dict], dict[str, float]]:
        from em_core.judge.answers import judge_rows
        from em_core.metrics import summarize_judged
        from em_core.sample.generation import answer_rows

        plan = self.plan
        generated = self.generator.generate(plan.prompts, plan.params, adapter=adapter, desc=f"step {step}")
        rows = answer_rows(plan.specs, generated, model=self.model, step=step,
                           checkpoint="base" if adapter is None else f"checkpoint-{step}", trigger=plan.triggers)
        judge_rows(rows, self.questions, self.judge, ["aligned", "coherent"])
        return rows, summarize_judged(rows, self.judge_cfg.aligned_threshold, self.judge_cfg.coherent_threshold,
                                      self.judge_cfg.z)

    def close(self) -> None:
        self.judge.close()


class _ProbeEvaluator:
    """Scores one checkpoint with the likelihood probe: the base model loaded once per worker,
    adapters swapped in; no sampling, no judge."""

    def __init__(self, base: PipelineConfig, cfg: SweepConfig):
        from em_core.analysis.probe import ProbeScorer, general_set, question_clusters
        from em_core.data.contrast_sets import load_contrast_sets

        train, _, _ = step_configs(base)
        sets = load_contrast_sets(cfg.probe_sets)
        names = [s.name for s in sets]
        self.objective_set = cfg.probe_objective_set or general_set(sets) or names[0]
        if self.objective_set not in names:
            raise ConfigError(f"probe_objective_set {self.objective_set!r} is not among probe_sets {names}")
        self.scorer = ProbeScorer(train.model, sets, dtype=train.dtype)
        self.clusters = question_clusters(sets)
        self._base: dict | None = None

    def __call__(self, adapter: str | None) -> dict[str, list[tuple[float, float]]]:
        if adapter is None:
            if self._base is None:
                self._base = self.scorer.score(None)
            return self._base
        return self.scorer.score(adapter)

    def close(self) -> None:
        pass


def _probe_trial_callback(trial, cfg: SweepConfig, evaluator: _ProbeEvaluator, margins: dict[int, list[float]]):
    """TrainerCallback: at each grid checkpoint probe, log, report the objective; prune if hopeless."""
    import mlflow
    import optuna
    from transformers import TrainerCallback

    from em_core.analysis.probe import step_metrics

    class ProbeAndReport(TrainerCallback):
        def _record(self, scores: dict, step: int) -> None:
            margins[step] = [m - a for a, m in scores[evaluator.objective_set]]
            if mlflow.active_run() is not None:
                mlflow.log_metrics(step_metrics(scores, cfg.probe_z, evaluator.clusters), step=step)

        def on_train_begin(self, args, state, control, **kw):
            run = mlflow.active_run()
            if run is not None:
                trial.set_user_attr(RUN_ATTR, run.info.run_id)
                mlflow.set_tags({"optuna.study_name": cfg.study_name, "optuna.trial_number": str(trial.number)})
            self._record(evaluator(None), 0)

        def on_save(self, args, state, control, **kw):
            step = state.global_step
            if step not in cfg.checkpoint_steps:
                return
            self._record(evaluator(str(Path(args.output_dir) / f"checkpoint-{step}")), step)
            value = probe_objective_value(cfg, margins, evaluator.clusters[evaluator.objective_set])
            trial.report(value, step)
            log.info("trial %d step %d: probe margin (%s)=%.3f objective=%.3f", trial.number, step,
                     evaluator.objective_set, sum(margins[step]) / max(len(margins[step]), 1), value)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (objective so far {value:g})")

    return ProbeAndReport()


def _trial_callback(trial, cfg: SweepConfig, evaluator: _Evaluator, em_by_step: dict[int, float],
                    coherent_by_step: dict[int, float], counts_by_step: dict[int, tuple[int, int]]):
    """TrainerCallback: at each grid checkpoint evaluate, log, report; prune if hopeless."""
    import mlflow
    import optuna
    from transformers import TrainerCallback

    class EvalAndReport(TrainerCallback):
        def _record(self, rows: list[dict], metrics: dict[str, float], step: int) -> None:
            em_by_step[step] = metrics["em_rate"]
            coherent_by_step[step] = metrics["coherent_rate"]
            counts_by_step[step] = (int(metrics["n_em"]), int(metrics["n_scored"]))
            clean = {mlflow_key(k): v for k, v in metrics.items() if not math.isnan(v)}
            if mlflow.active_run() is not None:
                mlflow.log_metrics(clean, step=step)
                mlflow.log_table({k: [r.get(k) for r in rows] for k in ("question_id", "answer", "aligned", "coherent")},
                                 artifact_file=f"judgments/step_{step:07d}.json")

        def on_train_begin(self, args, state, control, **kw):
            run = mlflow.active_run()
            if run is not None:
                trial.set_user_attr(RUN_ATTR, run.info.run_id)
                mlflow.set_tags({"optuna.study_name": cfg.study_name, "optuna.trial_number": str(trial.number)})
            rows, metrics = evaluator.base()  # the base model, as step 0 of every trial
            self._record(rows, metrics, 0)

        def on_save(self, args, state, control, **kw):
            step = state.global_step
            if step not in cfg.checkpoint_steps:
                return
            path = Path(args.output_dir) / f"checkpoint-{step}"
            rows, metrics = evaluator(str(path), step)
            self._record(rows, metrics, step)
            value = objective_value(cfg, em_by_step, counts_by_step)
            trial.report(value, step)
            log.info("trial %d step %d: em_rate=%.3f coherent_rate=%.3f objective=%.3f", trial.number, step,
                     metrics["em_rate"], metrics["coherent_rate"], value)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (objective so far {value:g})")

    return EvalAndReport()


def run_sweep(cfg: SweepConfig) -> dict:
    """Run this worker's share of the study; returns best-trial info. Any number of workers may
    run the same config against one storage and MLflow store (`launch.sweep_on_ray` starts N of
    them as Ray tasks)."""
    import mlflow
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from em_core.train.training import train

    base = _base_pipeline(cfg)
    fingerprint = study_fingerprint(cfg, base)  # also catches a typo in any override, before any run exists
    # keys, question files, datasets, models and the store, before a study or run exists
    preflight(pipeline_triples(base), what="sweep")
    tracking.configure_tracking()
    study = make_study(cfg)
    index, parent_id = join_study(study, cfg, fingerprint)
    study.sampler = make_sampler(cfg, worker_seed(cfg.seed, index))
    name = cfg.registered_model_name or f"em-sweep-{cfg.study_name}"
    client = mlflow.MlflowClient()
    env_run = os.environ.pop("MLFLOW_RUN_ID", None)  # `mlflow run` made a run for this worker
    if parent_id is None:
        parent_id = _create_parent(study, cfg)
    elif client.get_run(parent_id).info.status != "RUNNING" and not study_done(study, cfg):
        client.update_run(parent_id, "RUNNING")  # more trials asked of a study that had ended
    if env_run:
        for k, v in {em_tags.SWEEP_PARENT_RUN_ID: parent_id, em_tags.SWEEP_WORKER: str(index)}.items():
            client.set_tag(env_run, k, v)
    log.info("sweep %s: worker %d (sampler seed %s), parent run %s", cfg.study_name, index,
             worker_seed(cfg.seed, index), parent_id)
    # The shared parent beats while any worker works (no `em.process`: one worker's death must not
    # make it look dead), so `em runs reap` closes it once every worker is gone.
    parent_beat = _start_parent_heartbeat(parent_id)
    judge_free = cfg.objective in PROBE_OBJECTIVES
    evaluator = _ProbeEvaluator(base, cfg) if judge_free else _Evaluator(base)
    if judge_free:
        client.set_tag(parent_id, em_tags.JUDGE_FREE, "true")

    def objective(trial) -> float:
        params = suggest(trial, cfg)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        overrides = _as_overrides({**params, "checkpoint_steps": cfg.checkpoint_steps,
                                   "max_steps": max(cfg.checkpoint_steps),
                                   "checkpoints_in_first_epoch": 0, "checkpoint_every_epoch": False,
                                   "registered_model_name": name,
                                   "registry_alias": f"trial-{trial.number}",
                                   "run_name": f"{cfg.study_name}/trial-{trial.number}"}, "train")
        train_cfg, _, _ = step_configs(PipelineConfig(**{**asdict(base), "train": [*base.train, *overrides]}))
        if train_cfg.output_dir:  # a fixed folder: trials (and workers) would overwrite each other's checkpoints
            train_cfg.output_dir = str(Path(train_cfg.output_dir) / cfg.study_name / f"trial-{trial.number}")
        em, coh, counts = {}, {}, {}
        with tracking.child_runs(parent_id, {em_tags.SWEEP: cfg.study_name, "optuna.trial_number": str(trial.number),
                                             em_tags.SWEEP_WORKER: str(index)}):
            callback = (_probe_trial_callback(trial, cfg, evaluator, em) if judge_free
                        else _trial_callback(trial, cfg, evaluator, em, coh, counts))
            result = train(train_cfg, extra_callbacks=[callback])
        trial.set_user_attr("model_version", result.model_version)
        if judge_free:  # no judge, no coherent rate: no constraint (module doc)
            value = probe_objective_value(cfg, em, evaluator.clusters[evaluator.objective_set])
            trial.set_user_attr("censored", cfg.objective == "probe_emergence_step" and value == censored_value(cfg))
            client.log_metric(result.run_id, "sweep/objective", value)
            return value
        violation, reason = coherence_violation(cfg.coherence_floor, coh)
        trial.set_constraint("coherence", violation)
        if reason:  # unmeasurable coherence: infeasible, and the trial says why
            trial.set_user_attr(INFEASIBLE_ATTR, reason)
            client.set_tag(result.run_id, INFEASIBLE_TAG, reason)
            log.warning("trial %d is infeasible: %s", trial.number, reason)
        value = objective_value(cfg, em, counts)
        if math.isnan(value):  # Optuna would fail the trial and this worker would start another, forever
            msg = (f"trial {trial.number}: objective {cfg.objective} is undefined (NaN) at the final checkpoint: "
                   "no answer there was scored on both aligned and coherent")
            client.set_tag(result.run_id, em_tags.TRIAL_FAILED, msg)
            client.set_terminated(result.run_id, "FAILED")  # the trial fails: its run agrees
            raise ConfigError(msg)
        trial.set_user_attr("censored", cfg.objective in STEP_OBJECTIVES and value == censored_value(cfg))
        client.log_metric(result.run_id, "sweep/objective", value)
        return value

    ok = False
    try:
        # A failing trial fails its own run (train's tracked_run) and the trial, then stops this
        # worker; the shared parent is never ended by one worker's error.
        study.optimize(objective, timeout=cfg.timeout, gc_after_trial=True,
                       callbacks=[MaxTrialsCallback(cfg.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))])
        ok = True
    finally:
        parent_beat.stop()
        evaluator.close()
        if env_run:
            client.set_terminated(env_run, "FINISHED" if ok else "FAILED")
        closed = _close_parent_if_done(study, cfg, parent_id, name)
    best = best_trial(study)
    info = {"study": cfg.study_name, "parent_run_id": parent_id, "best": None, "worker": index,
            "parent_closed": closed, "trials": len([t for t in study.trials if t.state.is_finished()])}
    if best is not None:
        info["best"] = {"number": best.number, "value": best.value, "params": best.params,
                        "run_id": best.user_attrs.get(RUN_ATTR), "model_uri": f"models:/{name}@best"}
    return info


def _start_parent_heartbeat(parent_id: str):
    from em_core.liveness import Heartbeat

    beat = Heartbeat(parent_id, process=False)
    try:
        return beat.start()
    except Exception as e:  # noqa: BLE001 -- a busy store must not stop the worker; it only loses reaping
        log.warning("sweep parent run %s: cannot start its heartbeat (%s)", parent_id, e)
        return beat


def _create_parent(study, cfg: SweepConfig) -> str:
    """The study's MLflow parent run, created (not entered) by worker 0: it stays RUNNING until
    the study is done, whichever worker finishes last."""
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient()
    tags = {em_tags.ENTRY_POINT: "sweep", "optuna.study_name": cfg.study_name,
            "optuna.storage": tracking.scrub(cfg.storage_url())}
    run = client.create_run(tracking.ensure_experiment(cfg.experiment_name), tags=tags,
                            run_name=f"sweep/{cfg.study_name}")
    params = tracking.flatten_params("sweep", asdict(cfg))
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    study.set_user_attr(PARENT_ATTR, run.info.run_id)
    return run.info.run_id


def study_done(study, cfg: SweepConfig) -> bool:
    """n_trials finished (complete or pruned) and no trial still running or waiting."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    busy = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    return finished >= cfg.n_trials and not busy


def _close_parent_if_done(study, cfg: SweepConfig, parent_id: str, name: str) -> bool:
    """The worker that finds the study done ends the parent FINISHED with the failed-trial count,
    the best trial's alias and Optuna's plots. Each worker's own trials are over when it
    checks, so the last worker to check sees every trial finished."""
    import mlflow
    from optuna.trial import TrialState

    try:
        if not study_done(study, cfg):
            return False
        client = mlflow.MlflowClient()
        trials = study.get_trials(deepcopy=False)
        failed = sum(t.state == TrialState.FAIL for t in trials)
        client.log_metric(parent_id, "trials_failed", failed)
        client.log_metric(parent_id, "trials_finished", sum(t.state.is_finished() for t in trials) - failed)
        client.set_tag(parent_id, em_tags.TRIALS_FAILED, str(failed))
        best = best_trial(study)
        if best is not None:
            version = best.user_attrs.get("model_version")
            if version:
                client.set_registered_model_alias(name, "best", version)
            client.set_tag(parent_id, em_tags.BEST_TRIAL, str(best.number))
            client.set_tag(parent_id, em_tags.BEST_RUN_ID, best.user_attrs.get(RUN_ATTR, ""))
            client.log_metric(parent_id, "best_value", best.value)
        log_study_artifacts(study, parent_id)
        client.set_terminated(parent_id, "FINISHED")
        log.info("sweep %s: study done (%d failed trials); parent run %s FINISHED", cfg.study_name, failed, parent_id)
        return True
    except Exception as e:  # closing is bookkeeping: never mask the worker's own outcome
        log.warning("sweep %s: could not close the parent run %s: %s", cfg.study_name, parent_id, e)
        return False


INFEASIBLE_ATTR = "infeasible_reason"  # trial user attr
INFEASIBLE_TAG = em_tags.INFEASIBLE_REASON  # on the trial's MLflow run


def coherence_violation(floor: float, coherent_by_step: Mapping[int, float]) -> tuple[float, str | None]:
    """The coherence constraint's value (Optuna: feasible when <= 0) from the coherent rate at
    the last evaluated checkpoint, and a reason when that rate cannot be measured (no checkpoint,
    or no answer scored for coherence there). Unmeasurable means infeasible: a model whose
    coherence nobody could score cannot be vouched for. The value is then 1 + floor, the
    violation of a coherent rate of -1, worse than any measured one (Optuna refuses NaN)."""
    if not coherent_by_step:
        return 1.0 + floor, "no checkpoint was evaluated, so the coherent rate is unknown"
    final = max(coherent_by_step)
    rate = coherent_by_step[final]
    if rate is None or math.isnan(rate):
        return 1.0 + floor, f"no answer at the final checkpoint (step {final}) was scored for coherence"
    return floor - rate, None


def is_feasible(trial) -> bool:
    """Whether every constraint the trial set is met, read through Optuna's public API
    (`FrozenTrial.constraints`; Optuna 5 stores each under its own key)."""
    return all(c <= 0 for c in trial.constraints.values())


def best_trial(study):
    """Best COMPLETE trial that meets the coherence constraint (None if there is none)."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if is_feasible(t)]
    if not done:
        return None
    key = (lambda t: t.value) if study.direction.name == "MINIMIZE" else (lambda t: -t.value)
    return min(done, key=lambda t: (key(t), t.number))


def log_study_artifacts(study, run_id: str) -> None:
    """trials.csv and Optuna's matplotlib plots (history, importances, rank x lr contour)."""
    import tempfile
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    from optuna.visualization import matplotlib as ovm

    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
        df = study.trials_dataframe()
        df.to_csv(Path(tmp) / "trials.csv", index=False)
        client.log_artifact(run_id, str(Path(tmp) / "trials.csv"), "optuna")
        plots = {"optimization_history": lambda: ovm.plot_optimization_history(study),
                 "param_importances": lambda: ovm.plot_param_importances(study)}
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        # with fewer than 2 values of either parameter Optuna draws empty axes; say so instead
        if all(len({t.params.get(p) for t in complete}) >= 2 for p in ("lora_r", "learning_rate")):
            plots["contour_rank_lr"] = lambda: ovm.plot_contour(study, params=["lora_r", "learning_rate"])
        else:
            log.info("contour of rank x lr skipped: completed trials do not vary both parameters yet")
        for fname, make in plots.items():
            try:
                ax = make()
            except Exception as e:  # e.g. importances need >= 2 completed trials with varying params
                log.info("optuna plot %s skipped: %s", fname, e)
                continue
            fig = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            path = Path(tmp) / f"{fname}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            client.log_artifact(run_id, str(path), "optuna")

