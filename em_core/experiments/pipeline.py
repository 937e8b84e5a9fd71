"""The whole loop as one MLflow parent run: train -> evaluate every checkpoint -> judge -> plots.

Each step is a child run of the pipeline run; steps hand each other run ids (train run id to
evaluate, evaluate run id to judge), never shared state. A step is reused instead of rerun when a
FINISHED run of that step exists in the experiment whose `step.*` params -- its resolved config,
its input run ids and the code version, all as strings, as MLflow stores them -- equal this one's
(found by their hash, the tag `em.identity_sha256`, in one query: `find_reusable`).

The parent run gets the judge's per-checkpoint metrics at step = training step (base model at 0),
`em_emergence_step` (see `metrics.emergence_step`), plots, `summary.json` and the HTML report.
"""
from __future__ import annotations

import gc
import hashlib
import logging
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from em_core import tags as em_tags
from em_core import tracking
from em_core.configs import RunGroup, override_items
from em_core.errors import ConfigError, EmLabError, Terminated
from em_core.experiments.preflight import preflight
from em_core.metrics import (
    ALIGNED_THRESHOLD,
    COHERENT_THRESHOLD,
    DEFAULT_INTERVAL,
    STEP_VALUED_KEYS,
    Z_95,
    emergence_intervals,
    emergence_step,
    from_mlflow,
    is_step_valued,
)
from em_core.paths import PROJECT_ROOT, project_file

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "configs/pipeline/tiny.yaml"
STEPS = ("train", "evaluate", "judge")
STEP_TAG = em_tags.PIPELINE_STEP
SUMMARY_ARTIFACT = "summary.json"
# Never part of a step's identity: where it is logged and what it is called.
_NOT_IDENTITY = ("experiment_name", "run_name")


class StepFailed(EmLabError):
    def __init__(self, step: str, cause: BaseException):
        self.step = step
        super().__init__(f"pipeline step '{step}' failed: {type(cause).__name__}: {tracking.scrub(str(cause))}")


STAGE_KEYS = ("name", "train_config", "train", "init_mode", "alias")
_ALIAS = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class Stage:
    """One training stage of a multi-stage pipeline; stage k > 1 starts from stage k-1's adapter."""

    name: str
    train_config: str | None = None  # default: the pipeline's train_config
    train: list[str] = field(default_factory=list)  # TrainConfig overrides on top of the pipeline's
    init_mode: str = "continue"  # continue the previous adapter, or merge it and train a fresh one
    alias: str | None = None  # registry alias of this stage's model version; default: name


def _as_stages(value) -> list[Stage]:
    if not value:
        return []
    if not isinstance(value, (list, tuple)):
        raise ConfigError("stages: must be a list of mappings, each with at least `name`")
    stages: list[Stage] = []
    for i, item in enumerate(value, start=1):
        if isinstance(item, Stage):
            stages.append(item)
            continue
        if not isinstance(item, Mapping) or not item.get("name"):
            raise ConfigError(f"stages[{i}]: must be a mapping with a `name` (e.g. name: misaligned)")
        unknown = sorted(set(item) - set(STAGE_KEYS))
        if unknown:
            raise ConfigError(f"stages[{i}] ({item['name']}): unknown key(s) {', '.join(unknown)}; "
                              f"valid keys: {', '.join(STAGE_KEYS)}")
        st = Stage(name=str(item["name"]), train_config=item.get("train_config"),
                   train=_as_overrides(item.get("train"), f"stages[{i}].train"),
                   init_mode=str(item.get("init_mode") or "continue"), alias=item.get("alias"))
        if st.train_config:
            st.train_config = project_file(st.train_config)
        if st.init_mode not in ("continue", "merge"):
            raise ConfigError(f"stages[{i}] ({st.name}): init_mode must be continue or merge, not {st.init_mode!r}")
        if not _ALIAS.match(st.alias or st.name):
            raise ConfigError(f"stages[{i}]: {st.alias or st.name!r} cannot be a registry alias; "
                              "use letters, digits, - and _")
        stages.append(st)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stages: names must be unique, got {names}")
    return stages


@dataclass
class PipelineConfig(RunGroup):
    """One train -> evaluate -> judge loop. Step settings are `key=value` overrides of the step's
    own config (TrainConfig, EvalConfig, JudgeConfig); in YAML they may be a mapping."""

    # lists of `key=value` step settings: never split at commas (configs.expand_cli)
    KV_FIELDS: ClassVar[tuple[str, ...]] = ("train", "evaluate", "judge", "probe")

    train_config: str = field(default="configs/train/tiny.yaml", metadata={"help": "TrainConfig YAML"})
    train: list[str] = field(default_factory=list, metadata={"help": "TrainConfig overrides, key=value"})
    evaluate: list[str] = field(default_factory=list, metadata={"help": "EvalConfig overrides, key=value"})
    judge: list[str] = field(default_factory=list, metadata={"help": "JudgeConfig overrides, key=value"})
    probe: list[str] = field(default_factory=list, metadata={"help": "ProbeConfig overrides, key=value (e.g. sets=general,medical)"})
    with_probe: bool = field(default=True, metadata={"help": "run the likelihood probe + LoRA trajectory step (judge-free)"})
    questions: list[str] = field(default_factory=lambda: ["core_misalignment"],
                                 metadata={"help": "question sets, used by evaluate and judge"})
    aligned_threshold: float = ALIGNED_THRESHOLD
    coherent_threshold: float = COHERENT_THRESHOLD
    z: float = field(default=Z_95, metadata={"help": "Wilson interval z for intervals and the emergence rule"})
    interval: str = field(default=DEFAULT_INTERVAL, metadata={
        "help": "emergence rule intervals: wilson (default: comparable with earlier runs and the papers) or "
                "clustered (by question; never narrower, see metrics.emergence_intervals)"})
    reuse: bool = field(default=True, metadata={"help": "reuse finished steps with identical params"})
    report: bool = field(default=True, metadata={"help": "write plots and the HTML report at the end"})
    stages: list[str] | None = field(default=None, metadata={
        "help": "YAML only: a list of training stages run in order (name, train_config, train, init_mode, alias); "
                "see docs/stages.md"})
    verified_alias: str = field(default="judged", metadata={
        "help": "registry alias the (last stage's) model version gets once the whole pipeline FINISHED: "
                "trained, every checkpoint sampled and judged; empty for none"})
    grid: str | None = field(default=None, metadata={"help": "grid name (set by `em grid`)"})
    grid_cell: str | None = field(default=None, metadata={"help": "model/dataset/seed label (set by `em grid`)"})

    def __post_init__(self) -> None:
        for name in (*STEPS, "probe"):
            setattr(self, name, _as_overrides(getattr(self, name), name))
        self.train_config = project_file(self.train_config)
        self.stages = _as_stages(self.stages)
        if self.z <= 0:
            raise ConfigError("z must be > 0 (1.96 gives 95% intervals)")
        if self.interval not in ("wilson", "clustered"):
            raise ConfigError(f"interval: unknown {self.interval!r}; use wilson or clustered")
        if self.verified_alias and not _ALIAS.match(self.verified_alias):
            raise ConfigError(f"verified_alias: {self.verified_alias!r} cannot be a registry alias; "
                              "use letters, digits, - and _")

    @staticmethod
    def check_sections(path: str, data: Mapping) -> None:
        """Keys inside `train:`/`evaluate:`/`judge:` (and each stage's `train:`) of a YAML file are
        checked against the step's config here, so a typo names the file and section."""
        check_step_sections(path, data)


def _section_keys(value) -> list[str]:
    if isinstance(value, Mapping):
        return [str(k) for k in value]
    if isinstance(value, (list, tuple)):
        return [str(v).partition("=")[0].strip().lstrip("-") for v in value if "=" in str(v)]
    return []


def step_classes() -> dict[str, type]:
    from em_core.judge.answers import JudgeConfig
    from em_core.sample.evaluation import EvalConfig
    from em_core.train.config import TrainConfig

    return {"train": TrainConfig, "evaluate": EvalConfig, "judge": JudgeConfig}


def check_step_sections(path: str, data: Mapping) -> None:
    """ConfigError for a key under a step section of `data` (read from `path`) that the step's
    config does not have, with the nearest valid key."""
    from em_core.configs import check_keys

    classes = step_classes()
    for section, cls in classes.items():
        check_keys(f"{path}: section {section}", _section_keys(data.get(section)), cls)
    for i, st in enumerate(data.get("stages") or [], start=1):
        if isinstance(st, Mapping):
            check_keys(f"{path}: stages[{i}] ({st.get('name')}) section train", _section_keys(st.get("train")),
                       classes["train"])


def _as_overrides(value, name: str) -> list[str]:
    """YAML mapping or CLI `k=v` list -> `k=v` strings (see configs.override_items); typed per
    field when the step config parses them (configs.parse_overrides)."""
    return override_items(value, name)


def step_configs(cfg: PipelineConfig, train_run_id: str = "<train>", eval_run_id: str = "<evaluate>",
                 stage: Stage | None = None, stage_index: int = 0, previous_train_run_id: str = "<previous stage>",
                 model_name: str | None = None):
    """The three step configs (of `stage` in a multi-stage pipeline); parsing them all up front
    catches a typo before hours of training."""
    from em_core.configs import check_keys, parse_config
    from em_core.judge.answers import JudgeConfig
    from em_core.sample.evaluation import EvalConfig
    from em_core.train.config import TrainConfig

    def parse(cls, base: list[str], overrides: list[str], fixed: list[str]):
        where = f"stage {stage.name!r} " if stage else ""
        section = {TrainConfig: "train", EvalConfig: "evaluate", JudgeConfig: "judge"}[cls]
        check_keys(f"pipeline {where}--{section} overrides", _section_keys(overrides), cls)
        argv = base + (["--overrides", " ".join(shlex.quote(o) for o in overrides)] if overrides else []) + fixed
        try:
            return parse_config(cls, argv)
        except ConfigError as e:
            where = f"stage {stage.name!r} " if stage else ""
            raise ConfigError(f"pipeline {where}{cls.__name__}: {e}") from None

    exp = ["--experiment_name", cfg.experiment_name]
    train_fixed, eval_fixed = list(exp), []
    if stage is not None:
        # Every stage registers into one model, its alias naming the stage.
        train_fixed += ["--registry_alias", stage.alias or stage.name]
        if model_name:
            train_fixed += ["--registered_model_name", model_name]
        if stage_index > 0:
            train_fixed += ["--init_adapter", previous_train_run_id, "--init_mode", stage.init_mode]
            eval_fixed = ["--include_base", "false"]  # the previous stage's end is this stage's start
    train = parse(TrainConfig, ["--config", (stage and stage.train_config) or cfg.train_config],
                  cfg.train + (stage.train if stage else []), train_fixed)
    # A model fine-tuned through the OpenAI API is sampled through it too (overridable).
    api: list[str] = []
    if train.backend == "openai":
        api = ["--backend", "openai"] + (["--base_url", train.openai_base_url] if train.openai_base_url else [])
    evaluate = parse(EvalConfig, api, cfg.evaluate, exp + eval_fixed + ["--train_run_id", train_run_id,
                                                                       "--questions", *cfg.questions])
    judge = parse(JudgeConfig, [], cfg.judge, exp + ["--eval_run_id", eval_run_id, "--questions", *cfg.questions,
                                                       "--aligned_threshold", str(cfg.aligned_threshold),
                                                       "--coherent_threshold", str(cfg.coherent_threshold),
                                                       "--z", repr(cfg.z)])
    return train, evaluate, judge


def code_version() -> str:
    """Hash of the package's code and shipped data: what a reused step must have been run with."""
    h = hashlib.sha256()
    roots = [PROJECT_ROOT / "em_core", PROJECT_ROOT / "entrypoints"]
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix in (".py", ".yaml", ".jsonl") and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(PROJECT_ROOT)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def identity_params(step_cfg, code: str, **inputs: str) -> dict[str, str]:
    """`step.*` params that decide reuse: the config minus naming, inputs and code version."""
    d = {k: v for k, v in asdict(step_cfg).items() if k not in _NOT_IDENTITY}
    return tracking.flatten_params("step", {**d, **inputs, "code_version": code})


def train_identity(train_cfg, code: str, **inputs: str) -> dict[str, str]:
    """A training step's identity: its config plus the content of every local dataset file."""
    from em_core.data.training_data import source_fingerprint

    datasets = ",".join(source_fingerprint(d) for d in train_cfg.dataset)
    return identity_params(train_cfg, code, dataset_content=datasets, **inputs)


def dataset_content(cfg: PipelineConfig) -> str:
    """Fingerprints of every stage's training data (see `source_fingerprint`), so a grid reuses a
    finished cell only when its local dataset files are unchanged."""
    from em_core.data.training_data import source_fingerprint

    out = []
    for i, stage in enumerate(cfg.stages or [None]):
        train_cfg, _, _ = step_configs(cfg, stage=stage, stage_index=i)
        out.append(",".join(source_fingerprint(d) for d in train_cfg.dataset))
    return ";".join(out)


IDENTITY_TAG = em_tags.IDENTITY_SHA256  # a step run's (and a pipeline run's) `step.*` identity, hashed
CELL_IDENTITY_TAG = em_tags.CELL_IDENTITY_SHA256  # a pipeline run's `pipeline.*` params, hashed (grid cells)
# Runs logged before the identity tags existed are still compared param by param, newest first,
# at most this many (with a warning when there are more). Since `step.code_version` is part of
# every identity and is filtered on, only runs of the same code version without the tag are read.
LEGACY_SCAN_LIMIT = 5000


def identity_sha256(identity: Mapping[str, str]) -> str:
    """sha256 of the identity's sorted (key, value) string pairs: equal iff the identities are."""
    import json

    return hashlib.sha256(json.dumps(sorted((str(k), str(v)) for k, v in identity.items())).encode()).hexdigest()


def _quote(value: str) -> str:
    """A string literal of an MLflow filter (which has no escapes: a value with both quote kinds
    cannot be written)."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"{value!r} has both quote characters and cannot be looked up in MLflow")


def newest_finished_run(experiment_id: str, filter_string: str, identity_tag: str, identity: Mapping[str, str],
                        legacy_filter: str | None = None) -> str | None:
    """Newest FINISHED run matching `filter_string` whose `identity_tag` is the hash of `identity`:
    one filtered query for one row, however many runs the experiment holds. Runs logged before the
    tag existed (it IS NULL) are then compared param by param -- narrowed by `legacy_filter`,
    paged, at most LEGACY_SCAN_LIMIT of them (a warning says when more were left unread)."""
    import mlflow

    client = mlflow.MlflowClient()
    base = f"{filter_string} and attributes.status = 'FINISHED'"
    hit = client.search_runs([experiment_id], filter_string=f"{base} and tags.`{identity_tag}` = "
                                                            f"{_quote(identity_sha256(identity))}",
                             order_by=["attributes.start_time DESC"], max_results=1)
    if hit:
        return hit[0].info.run_id
    legacy = f"{base} and tags.`{identity_tag}` IS NULL" + (f" and {legacy_filter}" if legacy_filter else "")
    seen, token = 0, None
    while seen < LEGACY_SCAN_LIMIT:
        page = client.search_runs([experiment_id], filter_string=legacy, order_by=["attributes.start_time DESC"],
                                  max_results=min(1000, LEGACY_SCAN_LIMIT - seen), page_token=token)
        for r in page:
            if all(r.data.params.get(k) == v for k, v in identity.items()):
                return r.info.run_id
        seen += len(page)
        token = page.token
        if not token:
            return None
    log.warning("reuse lookup: more than %d runs logged before %s existed match %s; the older ones were not "
                "compared (rerunning)", LEGACY_SCAN_LIMIT, identity_tag, filter_string)
    return None


def find_reusable(experiment_id: str, step: str, identity: Mapping[str, str]) -> str | None:
    """Newest FINISHED run of `step` whose `step.*` params equal `identity`: found by its
    IDENTITY_TAG in one query (no limit on how many runs of the step the experiment holds)."""
    legacy = None
    if "step.code_version" in identity:
        legacy = f"params.`step.code_version` = {_quote(identity['step.code_version'])}"
    return newest_finished_run(experiment_id, f"tags.`{STEP_TAG}` = {_quote(step)}", IDENTITY_TAG, identity,
                               legacy_filter=legacy)


def _log_identity(run_id: str, identity: Mapping[str, str]) -> None:
    """The identity params and their hash (the tag reuse is looked up by), in one call."""
    import mlflow
    from mlflow.entities import Param, RunTag

    mlflow.MlflowClient().log_batch(run_id, params=[Param(k, v) for k, v in identity.items()],
                                    tags=[RunTag(IDENTITY_TAG, identity_sha256(identity))])


def cell_identity(cfg: PipelineConfig) -> dict[str, str]:
    """The `pipeline.*` params a pipeline run logs, which decide whether a grid reuses it."""
    return tracking.flatten_params("pipeline", {**asdict(cfg), "dataset_content": dataset_content(cfg)})


@dataclass
class PipelineResult:
    run_id: str
    step_run_ids: dict[str, str]
    reused: list[str]
    metrics_by_step: dict[int, dict[str, float]]
    emergence_step: int | None
    smoke_test: bool
    report_uri: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> models:/name@alias, set at the end
    stages: list = field(default_factory=list)  # StageResult per stage (one unnamed stage without `stages`)


def _run_step(name: str, kind: str, identity: dict[str, str], ctx: dict, run: Callable[[], str]) -> str:
    """Reuse or run one step (`kind`: train, evaluate or judge; `name` adds the stage) as a child
    of the pipeline run; returns the step's run id."""
    import mlflow

    if ctx["reuse"]:
        found = find_reusable(ctx["experiment_id"], kind, identity)
        if found:
            log.info("step %s: reusing finished run %s (same params and code version)", name, found)
            ctx["reused"].append(name)
            return found
    log.info("step %s: running", name)
    child_tags = {STEP_TAG: kind, em_tags.PIPELINE_RUN_ID: ctx["parent"]}
    if "/" in name:
        child_tags[em_tags.STAGE] = name.split("/")[0]
    # e.g. `misaligned/train-tiny-plant_care_bad-3f9a1c`: the step, what it ran on, the pipeline's short id
    run_name = tracking.descriptive_name(name, *ctx["label"], sid=ctx["sid"])
    try:
        with tracking.child_runs(ctx["parent"], child_tags, run_name=run_name):
            run_id = run()
    except BaseException as e:
        mlflow.set_tag(em_tags.FAILED_STEP, name)
        if isinstance(e, (KeyboardInterrupt, Terminated)):  # killed, not failed: the parents end KILLED too
            raise
        raise StepFailed(name, e) from e
    finally:
        gc.collect()
        _empty_cuda_cache()
    _log_identity(run_id, identity)
    return run_id


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort between steps
        pass


def copy_step_metrics(src_run_id: str, dst_run_id: str | None, skip_prefixes: tuple[str, ...] = ("judge/",),
                      offset: int = 0) -> dict[int, dict[str, float]]:
    """Copy every step-indexed metric of `src` onto `dst` (None: only read) at step + `offset`;
    returns {step: {key: value}} with summarize() keys. A metric whose value is a step
    (STEP_VALUED_KEYS, e.g. a stage's `lora_transition_step`) is shifted by `offset` too, so on
    the pipeline run every step is global."""
    import mlflow

    from em_core.judge.answers import log_metrics_to_run

    client = mlflow.MlflowClient()
    src = client.get_run(src_run_id)
    named: dict[int, dict[str, float]] = {}
    for key in src.data.metrics:
        if key.startswith(skip_prefixes):
            continue
        shift = offset if is_step_valued(key) else 0
        for m in client.get_metric_history(src_run_id, key):
            named.setdefault(m.step + offset, {})[key] = m.value + shift
    by_step = from_mlflow(named, src.data.tags)  # summarize() keys, constant counts filled back in
    if dst_run_id:
        log_metrics_to_run(dst_run_id, by_step)
    return dict(sorted(by_step.items()))


@dataclass
class StageResult:
    name: str
    alias: str
    start_step: int  # global step at which the stage starts (its checkpoints are start + local step)
    end_step: int
    run_ids: dict[str, str]
    em_rate_end: float | None = None
    em_rate_before: float | None = None
    signals: dict[str, int | None] = field(default_factory=dict)  # the stage's probe steps, global

    @property
    def em_drop(self) -> float | None:
        if self.em_rate_before is None or self.em_rate_end is None:
            return None
        return self.em_rate_before - self.em_rate_end


def _final_step(train_run_id: str) -> int:
    import mlflow

    return max(em_tags.steps_of(mlflow.MlflowClient().get_run(train_run_id).data.tags), default=0)


def _run_stages(cfg: PipelineConfig, ctx: dict, code: str) -> tuple[list[StageResult], dict[int, dict[str, float]]]:
    """Each stage's train -> evaluate -> judge; metrics copied to the parent at global steps."""
    from em_core.judge.answers import log_metrics_to_run, run_judge
    from em_core.sample.evaluation import evaluate
    from em_core.train.training import train

    stages = cfg.stages or [None]
    first_train, _, _ = step_configs(cfg, stage=stages[0])
    model_name = (first_train.registered_model_name or first_train.default_model_name()) if cfg.stages else None
    results: list[StageResult] = []
    by_step: dict[int, dict[str, float]] = {}
    previous = "<previous stage>"
    offset = 0
    for i, stage in enumerate(stages):
        prefix = f"{stage.name}/" if stage else ""
        common = {"stage": stage, "stage_index": i, "previous_train_run_id": previous, "model_name": model_name}
        ids: dict[str, str] = {}
        train_cfg, _, _ = step_configs(cfg, **common)
        ctx["label"] = (tracking.model_label(train_cfg.model), tracking.dataset_label(train_cfg.dataset))
        ids["train"] = _run_step(f"{prefix}train", "train", train_identity(train_cfg, code), ctx,
                                 lambda: train(train_cfg, set_alias=False).run_id)
        if train_cfg.register_model and train_cfg.registry_alias:  # set once the whole pipeline finished
            ctx["aliases"].append((ids["train"], train_cfg.registry_alias))
        _, eval_cfg, _ = step_configs(cfg, train_run_id=ids["train"], **common)
        ids["evaluate"] = _run_step(f"{prefix}evaluate", "evaluate", identity_params(eval_cfg, code), ctx,
                                    lambda: evaluate(eval_cfg).run_id)
        _, _, judge_cfg = step_configs(cfg, train_run_id=ids["train"], eval_run_id=ids["evaluate"], **common)
        ids["judge"] = _run_step(f"{prefix}judge", "judge",
                                 identity_params(judge_cfg, code, resolved_backend=judge_cfg.resolved_backend()),
                                 ctx, lambda: run_judge(judge_cfg).run_id)
        stage_steps = copy_step_metrics(ids["judge"], None, offset=offset)
        if cfg.with_probe and train_cfg.backend != "openai":  # the probe needs local weights
            _run_probe_step(cfg, ctx, code, prefix, ids, i, offset, stage_steps)
        for s, m in stage_steps.items():  # a stage's start step also holds the previous stage's end
            by_step.setdefault(s, {}).update(m)
        end = offset + _final_step(ids["train"])
        before = results[-1].em_rate_end if results else stage_steps.get(offset, {}).get("em_rate")
        results.append(StageResult(stage.name if stage else "train", (stage.alias or stage.name) if stage else "",
                                   offset, end, ids, stage_steps.get(end, {}).get("em_rate"), before,
                                   _probe_summary(stage_steps)))
        previous, offset = ids["train"], end
    # once, over all stages: a count is a tag only if it is the same at every step of every stage
    log_metrics_to_run(ctx["parent"], by_step)
    return results, dict(sorted(by_step.items()))


def pipeline_triples(cfg: PipelineConfig) -> list[tuple]:
    """(train, evaluate, judge) configs of every stage, with placeholders for run ids not yet known."""
    return [step_configs(cfg, stage=stage, stage_index=i) for i, stage in enumerate(cfg.stages or [None])]


def probe_config(cfg: PipelineConfig, train_run_id: str = "<train>", stage_index: int = 0):
    """The probe step's config: the pipeline's `probe` overrides on ProbeConfig's defaults."""
    from em_core.analysis.probe import ProbeConfig
    from em_core.configs import parse_config

    fixed = ["--experiment_name", cfg.experiment_name, "--train_run_id", train_run_id, "--z", str(cfg.z)]
    if stage_index > 0:  # as in evaluate: the previous stage's end is this stage's start
        fixed += ["--include_base", "false"]
    argv = (["--overrides", " ".join(shlex.quote(o) for o in cfg.probe)] if cfg.probe else []) + fixed
    try:
        return parse_config(ProbeConfig, argv)
    except ConfigError as e:
        raise ConfigError(f"pipeline ProbeConfig: {e}") from None


def _run_probe_step(cfg: PipelineConfig, ctx: dict, code: str, prefix: str, ids: dict[str, str], stage_index: int,
                    offset: int, stage_steps: dict[int, dict[str, float]]) -> None:
    """Run (or reuse) the probe on this stage's checkpoints; its metrics join the parent's."""
    from em_core.analysis.probe import run_probe

    probe_cfg = probe_config(cfg, ids["train"], stage_index)
    ids["probe"] = _run_step(f"{prefix}probe", "probe", identity_params(probe_cfg, code), ctx,
                             lambda: run_probe(probe_cfg).run_id)
    # the parent gets every stage's metrics once, at the end of _run_stages
    for s, m in copy_step_metrics(ids["probe"], None, offset=offset).items():
        stage_steps.setdefault(s, {}).update(m)


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    """Run (or reuse) train, evaluate and judge -- once, or once per stage -- under one parent
    run; then metrics, plots, report."""
    import json

    import mlflow

    from em_core.judge.answers import SMOKE_TEST_NOTE

    stages = cfg.stages or [None]
    # every step of every stage, its keys, questions, data, models and the store: before any run exists
    triples = pipeline_triples(cfg)
    if cfg.with_probe:
        probe_config(cfg)
    preflight(triples)
    smoke = triples[-1][2].smoke_test()
    code = code_version()
    tags = {STEP_TAG: "pipeline", em_tags.ENTRY_POINT: "pipeline", em_tags.CODE_VERSION: code,
            em_tags.JUDGE_SMOKE_TEST: str(smoke).lower()}
    if cfg.grid:
        tags.update({em_tags.GRID: cfg.grid, em_tags.GRID_CELL: cfg.grid_cell or ""})
    tracking.configure_tracking()
    sid = tracking.short_id()  # shared by the pipeline run and its steps' runs
    first = triples[0][0]
    run_name = cfg.run_name or tracking.descriptive_name(
        "pipeline", tracking.model_label(first.model), tracking.dataset_label(first.dataset), sid=sid)
    with tracking.tracked_run(cfg.experiment_name, run_name, tags=tags) as parent:
        pid = parent.info.run_id
        exp_id = parent.info.experiment_id
        cfg.experiment_name = mlflow.get_experiment(exp_id).name  # `mlflow run --experiment-name` wins
        if smoke:
            log.warning("pipeline: %s", SMOKE_TEST_NOTE)
            mlflow.set_tag(em_tags.NOTE, SMOKE_TEST_NOTE)
        from em_core.configs import to_yaml

        mlflow.log_text(tracking.scrub(to_yaml(cfg)), "config/pipeline_config.yaml")  # no user:pass@ of a URL
        cell = cell_identity(cfg)
        if tracking.is_main_process():
            mlflow.log_params(cell)
            mlflow.set_tag(CELL_IDENTITY_TAG, identity_sha256(cell))  # what `find_cell` looks for
        ctx = {"parent": pid, "experiment_id": exp_id, "reuse": cfg.reuse, "reused": [], "aliases": [],
               "sid": sid, "label": ()}
        stage_results, by_step = _run_stages(cfg, ctx, code)
        ids = {f"{st.name}/{k}" if cfg.stages else k: v for st in stage_results for k, v in st.run_ids.items()}
        if cfg.stages:
            # The report and grids read the last stage's runs as "the" train/evaluate/judge runs.
            mlflow.set_tags({f"em.{k}_run_id": v for k, v in stage_results[-1].run_ids.items()})
            mlflow.set_tag(tracking.STAGES_TAG, json.dumps([_stage_summary(st) for st in stage_results]))
            _log_stage_metrics(stage_results)
        else:
            mlflow.set_tags({f"em.{k}_run_id": v for k, v in ids.items()})
        mlflow.set_tag(em_tags.REUSED_STEPS, ",".join(ctx["reused"]))

        counts = {s: (int(m.get("n_em", 0)), int(m.get("n_scored", 0))) for s, m in by_step.items()}
        emerged = emergence_step(counts, cfg.z, intervals=emergence_intervals(by_step, cfg.interval))
        if emerged is not None:
            mlflow.log_metric("em_emergence_step", emerged, step=emerged)
        final = max(by_step) if by_step else None
        first_train, _, _ = step_configs(cfg, stage=stages[0])
        summary = {"run_id": pid, "steps": ids, "reused": ctx["reused"], "final_step": final,
                   "emergence_step": emerged, "smoke_test": smoke,
                   **_probe_summary(by_step),
                   "aligned_threshold": cfg.aligned_threshold, "coherent_threshold": cfg.coherent_threshold,
                   "z": cfg.z, "model": first_train.model, "dataset": first_train.dataset, "seed": first_train.seed,
                   "by_step": {str(s): m for s, m in by_step.items()}}
        if cfg.stages:
            summary["stages"] = [_stage_summary(st) for st in stage_results]
        mlflow.log_dict(summary, SUMMARY_ARTIFACT)
        # The parent's own identity, logged last so a grid only ever reuses a complete pipeline.
        _log_identity(pid, identity_params(cfg, code, **{f"{k}_run_id": v for k, v in ids.items()}))
        result = PipelineResult(pid, ids, ctx["reused"], by_step, emerged, smoke, stages=stage_results)
        if cfg.report:
            from em_core.analysis.report import publish

            result.report_uri = publish(pid)
    # Only now, with the pipeline run FINISHED, do aliases move: a failed step leaves them alone.
    last_train = stage_results[-1].run_ids["train"]
    pending = ctx["aliases"] + ([(last_train, cfg.verified_alias)] if cfg.verified_alias else [])
    result.aliases = _point_aliases(pending)
    return result


def _point_aliases(pending: list[tuple[str, str]]) -> dict[str, str]:
    """Set each (training run id, alias) on the model version that run registered; returns
    alias -> `models:/name@alias`."""
    from em_core.models.adapters import registered_version_of_run
    from em_core.models.registry import set_alias

    out = {}
    for run_id, alias in pending:
        found = registered_version_of_run(run_id)
        if found:
            out[alias] = set_alias(found[0], found[1], alias)
    return out


PROBE_STEP_KEYS = ("probe_emergence_step", "lora_transition_step")


def _probe_summary(by_step: Mapping[int, Mapping[str, float]]) -> dict:
    """The probe's run-level steps in `by_step` (one stage's, or the run's: the earliest wins;
    each stage's own are in its stage summary). Values are global steps (copy_step_metrics)."""
    found: dict[str, int] = {}
    for step in sorted(by_step):
        for k in PROBE_STEP_KEYS:
            if k in by_step[step]:
                found.setdefault(k, int(by_step[step][k]))
    return {k: found.get(k) for k in PROBE_STEP_KEYS}


def _stage_summary(st: StageResult) -> dict:
    return {"name": st.name, "alias": st.alias, "start_step": st.start_step, "end_step": st.end_step,
            "run_ids": st.run_ids, "em_rate_before": st.em_rate_before, "em_rate_end": st.em_rate_end,
            "em_drop": st.em_drop, **{k: st.signals.get(k) for k in PROBE_STEP_KEYS}}


def _log_stage_metrics(stages: list[StageResult]) -> None:
    """Per stage, at its end step: EM at its start and end, and the drop (positive = less EM)."""
    import mlflow

    for st in stages:
        values = {"em_rate_before": st.em_rate_before, "em_rate_after": st.em_rate_end, "em_drop": st.em_drop}
        mlflow.log_metrics({f"stage/{st.name}/{k}": v for k, v in values.items() if v is not None},
                           step=st.end_step)


def console_summary(result: PipelineResult) -> str:
    """What `em pipeline` prints at the end: the table, where the report is, how to browse."""
    nan = float("nan")
    lines = ["judge (smoke test: the tiny offline judge):"] if result.smoke_test else []
    lines += [f"{'step':>6}  {'em_rate':>7}  {'95% interval':>15}  {'coherent_rate':>13}  {'n_scored':>8}"]
    for step, m in result.metrics_by_step.items():
        lines.append(f"{step:>6}  {m.get('em_rate', nan):>7.3f}  "
                     f"[{m.get('em_rate_lo', nan):.3f}, {m.get('em_rate_hi', nan):.3f}]  "
                     f"{m.get('coherent_rate', nan):>13.3f}  {int(m.get('n_scored', 0)):>8}")
    emerged = result.emergence_step
    lines.append(f"EM emergence step: {emerged}" if emerged is not None
                 else "EM emergence step: none (no checkpoint's EM rate is significantly above the base model's)")
    lines += _probe_console_lines(result.metrics_by_step)
    lines.append(f"pipeline run: {result.run_id} (reused steps: {','.join(result.reused) or 'none'})")
    if result.aliases:
        lines.append("model: " + ", ".join(result.aliases.values()))
    if result.report_uri:
        lines.append(f"report: {tracking.local_artifact(result.run_id, 'report/report.html')}")
    lines.append(f"browse: {tracking.ui_command()}")
    if result.smoke_test:
        lines.append("note: judged by the tiny offline model; these scores are a smoke test, not a measurement")
    return "\n".join(lines)


def probe_margin_sets(by_step: Mapping[int, Mapping[str, float]]) -> list[str]:
    """Contrast sets with a logged `probe/<set>/margin`, in first-seen order."""
    out: list[str] = []
    for m in by_step.values():
        for k in m:
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "probe" and parts[2] == "margin" and parts[1] not in out:
                out.append(parts[1])
    return out


def _probe_console_lines(by_step: Mapping[int, Mapping[str, float]]) -> list[str]:
    """The probe's table (margin per contrast set, +- its standard error, per checkpoint) and its
    run-level steps: the judge-free measurement, printed beside the judge's table."""
    sets = probe_margin_sets(by_step)
    if not sets:
        return []
    nan = float("nan")
    directions = sorted({k.split("/")[1] for m in by_step.values() for k in m
                         if k.startswith("direction/") and k.endswith("/projection") and k.count("/") == 2})
    lines = ["likelihood probe (judge-free measurement; margin = mean loglik(misaligned) - loglik(aligned), +- SE):",
             f"{'step':>6}  " + "  ".join(f"{s + ' margin':>22}" for s in sets)
             + "".join(f"  {'direction ' + d:>18}" for d in directions)]
    for step, m in by_step.items():
        if not any(f"probe/{s}/margin" in m for s in sets):
            continue
        cells = [f"{m.get(f'probe/{s}/margin', nan):+.4f} +- {m.get(f'probe/{s}/margin_se', nan):.4f}" for s in sets]
        lines.append(f"{step:>6}  " + "  ".join(f"{c:>22}" for c in cells)
                     + "".join(f"  {m.get(f'direction/{d}/projection', nan):>+18.4f}" for d in directions))
    found = _probe_summary(by_step)
    emerged = found.get("probe_emergence_step")
    # the rule runs on the general set (broad EM); a domain set's margin can rise without it
    lines.append(f"probe emergence step (general set): {emerged}" if emerged is not None
                 else "probe emergence step (general set): none (no checkpoint's general margin is significantly "
                      "above the base model's)")
    for d in directions:
        step = _first_step_valued(by_step, f"direction/{d}/emergence_step")
        lines.append(f"direction {d} emergence step: {step if step is not None else 'none'}")
    turn = found.get("lora_transition_step")
    if turn is not None:
        lines.append(f"LoRA transition step (sharpest turn of the adapter's path): {turn}")
    phase = {k: _first_step_valued(by_step, k) for k in STEP_VALUED_KEYS
             if k.startswith(("lora_local_cos_step_", "lora_composition_step"))}
    phase = {k: v for k, v in phase.items() if v is not None}
    if phase:
        lines.append("LoRA phase rules (Turner et al.): " + ", ".join(f"{k} {v}" for k, v in phase.items()))
    return lines


def _first_step_valued(by_step: Mapping[int, Mapping[str, float]], key: str) -> int | None:
    return next((int(by_step[s][key]) for s in sorted(by_step) if key in by_step[s]), None)


def summary_of(run_id: str) -> dict:
    """The `summary.json` a finished pipeline run logged."""
    import mlflow

    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{SUMMARY_ARTIFACT}")

