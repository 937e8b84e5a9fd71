"""Evaluate a model and its checkpoints on question sets: answers per checkpoint, in MLflow.

Targets: a training run (base model as step 0, then every logged checkpoint at its step), a
registered adapter (`models:/name@alias`), or a plain model (`tiny`, hub id, local folder).
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from em_core import tracking
from em_core.checkpoints import CHECKPOINT_ARTIFACT_DIR, step_of
from em_core.errors import ConfigError
from em_core.generation import SamplingParams, answer_rows, make_generator, with_trigger
from em_core.questions import Question, expand_prompts, load_questions, resolve_question_file

log = logging.getLogger(__name__)
ANSWERS_DIR = "answers"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class EvalConfig:
    """What to sample, from which model/checkpoints, and how."""

    model: str = field(default="tiny", metadata={"help": "`tiny`, hub id, folder, `models:/name@alias`, or `runs:/<train run id>`"})
    train_run_id: str | None = field(default=None, metadata={"help": "evaluate base + every checkpoint of this training run"})
    checkpoints: list[int] | None = field(default=None, metadata={"help": "only these checkpoint steps"})
    include_base: bool = True
    questions: list[str] = field(default_factory=lambda: ["core_misalignment"],
                                 metadata={"help": "question YAML paths or shipped set names"})
    judges_path: str | None = None
    samples_per_paraphrase: int | None = field(default=None, metadata={"help": "override every item's value"})
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 600
    batch_size: int = 32
    seed: int = 0
    trigger: str | None = field(default=None, metadata={"help": "prepended to every user message"})
    backend: str = field(default="hf", metadata={"help": "hf, or vllm on a GPU with vllm installed"})
    dtype: str = "auto"
    load_in_4bit: bool = False
    experiment_name: str = "em-lab"
    run_name: str | None = None

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


def load_question_sets(specs: list[str], judges_path: str | None = None) -> list[Question]:
    questions: list[Question] = []
    seen: set[str] = set()
    for spec in specs:
        for q in load_questions(resolve_question_file(spec), judges_path=judges_path):
            if q.id in seen:
                raise ConfigError(f"questions: id {q.id!r} appears in more than one of {specs}")
            seen.add(q.id)
            questions.append(q)
    return questions


def _download_adapter(run_id: str, step: int, dest: Path) -> str:
    import mlflow

    folder = dest / CHECKPOINT_ARTIFACT_DIR / f"checkpoint-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:  # not the optimizer state: evaluation needs only the adapter
        mlflow.artifacts.download_artifacts(run_id=run_id,
                                            artifact_path=f"{CHECKPOINT_ARTIFACT_DIR}/checkpoint-{step}/{name}",
                                            dst_path=str(folder))
    return str(folder)


def resolve_targets(cfg: EvalConfig, workdir: Path) -> tuple[str, list[Target], dict[str, str]]:
    """(base model id, targets in step order, provenance tags)."""
    import mlflow

    if cfg.train_run_id:
        client = mlflow.MlflowClient()
        try:
            run = client.get_run(cfg.train_run_id)
        except Exception:
            raise ConfigError(f"train_run_id {cfg.train_run_id}: no such run in {mlflow.get_tracking_uri()}") from None
        base = run.data.params.get("train.model")
        if not base:
            raise ConfigError(f"train_run_id {cfg.train_run_id}: not a training run (no train.model param)")
        steps = sorted(s for s in (step_of(a.path) for a in client.list_artifacts(cfg.train_run_id, CHECKPOINT_ARTIFACT_DIR)) if s)
        if cfg.checkpoints:
            missing = sorted(set(cfg.checkpoints) - set(steps))
            if missing:
                raise ConfigError(f"checkpoints {missing} not logged by run {cfg.train_run_id}; it has {steps}")
            steps = sorted(cfg.checkpoints)
        targets = [Target(0, "base", None)] if cfg.include_base else []
        for s in steps:
            targets.append(Target(s, f"checkpoint-{s}", _download_adapter(cfg.train_run_id, s, workdir)))
        return base, targets, {"em.train_run_id": cfg.train_run_id}
    if cfg.model.startswith("models:/"):
        from em_core.registry import registered_adapter

        base, adapter, step, src_run = registered_adapter(cfg.model, workdir)
        targets = ([Target(0, "base", None)] if cfg.include_base else []) + [Target(step, cfg.model, adapter)]
        return base, targets, {"em.model_uri": cfg.model, "em.train_run_id": src_run}
    return cfg.model, [Target(0, "base", None)], {}


def sampling_plan(cfg: EvalConfig) -> tuple[list[Question], list, list[list[dict]], SamplingParams]:
    """(questions, prompt specs, chat prompts with the trigger applied, sampling params)."""
    questions = load_question_sets(cfg.questions, cfg.judges_path)
    specs = expand_prompts(questions, cfg.samples_per_paraphrase)
    prompts = [with_trigger(s.messages, cfg.trigger) for s in specs]
    return questions, specs, prompts, SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens,
                                                     cfg.batch_size, cfg.seed)


def generator_for(cfg: EvalConfig, base: str):
    return make_generator(cfg.backend, base, **({"dtype": cfg.dtype, "load_in_4bit": cfg.load_in_4bit}
                                                if cfg.backend == "hf" else {}))


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Sample every target on the questions; log answers per checkpoint to an MLflow run."""
    import mlflow

    _, specs, prompts, params = sampling_plan(cfg)
    tracking.configure_tracking()
    with tempfile.TemporaryDirectory() as tmp, \
            tracking.tracked_run(cfg.experiment_name, cfg.run_name, tags={"em.entry_point": "evaluate"}) as run:
        base, targets, tags = resolve_targets(cfg, Path(tmp))
        if run is not None:
            mlflow.set_tags({**tags, "em.base_model": base, "em.steps": ",".join(str(t.step) for t in targets)})
            tracking.log_params("eval", {**asdict(cfg), "n_prompts": len(specs)})
        gen = generator_for(cfg, base)
        all_rows: list[dict] = []
        out_dir = Path(tmp) / ANSWERS_DIR
        out_dir.mkdir()
        for t in targets:
            generated = gen.generate(prompts, params, adapter=t.adapter, desc=f"{t.label} (step {t.step})")
            rows = answer_rows(specs, generated, model=base, step=t.step, checkpoint=t.label, trigger=cfg.trigger)
            path = out_dir / f"step_{t.step:07d}.jsonl"
            _write_jsonl(path, rows)
            all_rows.extend(rows)
            if run is not None:
                mlflow.log_artifact(str(path), ANSWERS_DIR)
                mlflow.log_table(_table(rows), artifact_file=f"tables/answers_step_{t.step:07d}.json")
                mlflow.log_metrics({"eval/answers": len(rows),
                                    "eval/mean_completion_tokens": sum(r["completion_tokens"] for r in rows) / max(len(rows), 1)},
                                   step=t.step)
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
