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
Coherence is a constraint, not an objective (multi-objective studies cannot prune): a trial is
feasible when its coherent rate at the last evaluated checkpoint is >= `coherence_floor`.
"""
from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from em_core import tracking
from em_core.errors import ConfigError
from em_core.experiments.pipeline import (
    DEFAULT_CONFIG,
    PipelineConfig,
    _as_overrides,
    step_configs,
)
from em_core.metrics import emergence_step
from em_core.paths import mlruns_dir, project_file

log = logging.getLogger(__name__)
OBJECTIVES = {"threshold_step": "minimize", "significant_step": "minimize", "final_em_rate": "maximize"}
STEP_OBJECTIVES = ("threshold_step", "significant_step")  # censored when EM never arrives
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
RUN_ATTR = "mlflow_run_id"
PARENT_ATTR = "mlflow_parent_run_id"


@dataclass
class SweepConfig:
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
                "emergence rule) or final_em_rate"})
    em_threshold: float = field(default=0.2, metadata={"help": "threshold_step: raw EM rate that counts as reached"})
    z: float = field(default=1.96, metadata={"help": "significant_step: Wilson interval z"})
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
    experiment_name: str = "em-lab"

    def __post_init__(self) -> None:
        for name in ("train", "evaluate", "judge"):
            setattr(self, name, _as_overrides(getattr(self, name), name))
        problems = []
        if self.objective == "emergence_step":
            problems.append("objective emergence_step was renamed: threshold_step is the first step with raw EM >= "
                            "em_threshold; significant_step is the pipeline's em_emergence_step rule")
        elif self.objective not in OBJECTIVES:
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
        if self.n_trials < 1 or self.censored_factor <= 1:
            problems.append("n_trials must be >= 1 and censored_factor > 1")
        if problems:
            raise ConfigError("invalid sweep config: " + "; ".join(problems))
        self.checkpoint_steps = sorted(set(self.checkpoint_steps))
        self.pipeline_config = project_file(self.pipeline_config)

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]

    def storage_url(self) -> str:
        if self.storage:
            return self.storage
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
    """RDB storage with heartbeats, so trials of a killed worker go stale and are retried."""
    import time

    from optuna.storages import RDBStorage, RetryFailedTrialCallback
    from sqlalchemy.exc import SQLAlchemyError

    url = cfg.storage_url()
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=cfg.heartbeat_interval,
                              grace_period=cfg.grace_period,
                              heartbeat_stale_trial_callback=_retry_and_kill_run(
                                  RetryFailedTrialCallback(max_retry=cfg.max_retry)))
        except SQLAlchemyError:
            if attempt == 4:
                raise
            time.sleep(1 + attempt)  # workers starting together race to create the schema


def _retry_and_kill_run(retry):
    """A dead worker's trial: mark its MLflow run KILLED (nobody else will), then retry it."""
    def callback(study, trial) -> None:
        import mlflow

        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id:
            try:
                mlflow.MlflowClient().set_terminated(run_id, "KILLED")
                mlflow.MlflowClient().set_tag(run_id, "em.note", "worker died; trial retried by Optuna")
            except Exception as e:  # the store may be unreachable; the retry matters more
                log.warning("could not mark run %s KILLED: %s", run_id, e)
        retry(study, trial)
    return callback



def make_study(cfg: SweepConfig):
    import optuna

    sampler = (optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=min(10, cfg.n_trials))
               if cfg.sampler == "tpe" else optuna.samplers.RandomSampler(seed=cfg.seed))
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                          n_warmup_steps=cfg.pruner_warmup_steps)
              if cfg.pruner == "median" else optuna.pruners.NopPruner())
    storage = make_storage(cfg)
    try:
        return optuna.create_study(study_name=cfg.study_name, storage=storage, sampler=sampler,
                                   pruner=pruner, direction=cfg.direction, load_if_exists=True)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it a moment ago
        return optuna.load_study(study_name=cfg.study_name, storage=storage, sampler=sampler, pruner=pruner)


def _claim_parent(study, cfg: SweepConfig, wait: float = 300.0) -> tuple[bool, str | None]:
    """(this worker creates the study's MLflow parent run, else its id). Workers starting
    together must agree on one parent: creating a marker study is atomic in the storage (study
    names are unique), so exactly one worker wins; the others wait for it to publish the id."""
    import time

    import optuna

    parent_id = study.user_attrs.get(PARENT_ATTR)
    if parent_id:
        return False, parent_id
    try:
        optuna.create_study(study_name=f"{cfg.study_name}.mlflow-parent", storage=study._storage)
        return True, None
    except optuna.exceptions.DuplicatedStudyError:
        deadline = time.time() + wait
        while time.time() < deadline:
            parent_id = optuna.load_study(study_name=cfg.study_name, storage=study._storage).user_attrs.get(PARENT_ATTR)
            if parent_id:
                return False, parent_id
            time.sleep(0.5)
        raise ConfigError(f"study {cfg.study_name}: another worker claimed the MLflow parent run but never "
                          f"published it; if that worker died, delete the study '{cfg.study_name}.mlflow-parent'")


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
            clean = {k: v for k, v in metrics.items() if not math.isnan(v)}
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
    run the same config against one storage and MLflow store."""
    import mlflow
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from em_core.train.training import train

    base = _base_pipeline(cfg)
    step_configs(base)  # a typo in any override fails here, before a study or run exists
    tracking.configure_tracking()
    study = make_study(cfg)
    name = cfg.registered_model_name or f"em-sweep-{cfg.study_name}"
    creator, parent_id = _claim_parent(study, cfg)
    tags = {"em.entry_point": "sweep", "optuna.study_name": cfg.study_name}
    evaluator = _Evaluator(base)
    env_run = os.environ.get("MLFLOW_RUN_ID")  # `mlflow run` made a run for this worker
    if parent_id and env_run and env_run != parent_id:
        mlflow.MlflowClient().set_tag(env_run, "em.sweep_parent_run_id", parent_id)
    ok = False
    try:
        with tracking.tracked_run(cfg.experiment_name, f"sweep/{cfg.study_name}", run_id=parent_id, tags=tags) as parent:
            if creator:
                study.set_user_attr(PARENT_ATTR, parent.info.run_id)
                tracking.log_params("sweep", asdict(cfg))
            pid = parent.info.run_id
            mlflow.set_tag("optuna.storage", tracking.scrub(cfg.storage_url()))

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
                with tracking.child_runs(pid, {"em.sweep": cfg.study_name, "optuna.trial_number": str(trial.number)}):
                    result = train(train_cfg, extra_callbacks=[_trial_callback(trial, cfg, evaluator, em, coh, counts)])
                trial.set_user_attr("model_version", result.model_version)
                final = max(s for s in coh)
                trial.set_constraint("coherence", cfg.coherence_floor - coh[final])
                value = objective_value(cfg, em, counts)
                trial.set_user_attr("censored", cfg.objective in STEP_OBJECTIVES and value == censored_value(cfg))
                mlflow.MlflowClient().log_metric(result.run_id, "sweep/objective", value)
                return value

            study.optimize(objective, timeout=cfg.timeout, gc_after_trial=True,
                           callbacks=[MaxTrialsCallback(cfg.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))])
            best = best_trial(study)
            info = {"study": cfg.study_name, "parent_run_id": pid, "best": None,
                    "trials": len([t for t in study.trials if t.state.is_finished()])}
            if best is not None:
                version = best.user_attrs.get("model_version")
                if version:
                    mlflow.MlflowClient().set_registered_model_alias(name, "best", version)
                mlflow.set_tags({"em.best_trial": str(best.number), "em.best_run_id": best.user_attrs.get(RUN_ATTR, "")})
                mlflow.log_metric("best_value", best.value)
                info["best"] = {"number": best.number, "value": best.value, "params": best.params,
                                "run_id": best.user_attrs.get(RUN_ATTR), "model_uri": f"models:/{name}@best"}
            log_study_artifacts(study, pid)
            ok = True
            return info
    finally:
        evaluator.close()
        if parent_id and env_run and env_run != parent_id:  # trials went to the study's parent run
            mlflow.MlflowClient().set_terminated(env_run, "FINISHED" if ok else "FAILED")


def is_feasible(trial) -> bool:
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

    return all(c <= 0 for c in (trial.system_attrs.get(_CONSTRAINTS_KEY) or ()))


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

