"""LoRA fine-tuning with TRL's SFTTrainer, tracked in MLflow.

Every scheduled checkpoint (adapter + trainer state) is logged to the run under
`checkpoints/checkpoint-<step>/`, metrics go to the run at their global step, and the final
adapter is registered in the model registry. A failed run can be resumed from its last
logged checkpoint, continuing the same MLflow run.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback

from em_core import tracking
from em_core.configs import load_config, to_yaml
from em_core.data.training_data import prepare
from em_core.errors import ConfigError
from em_core.models.adapters import CHECKPOINT_ARTIFACT_DIR, step_of
from em_core.models.loading import (
    load_model,
    load_tokenizer,
    local_base_path,
    pick_dtype,
)
from em_core.paths import PROJECT_ROOT
from em_core.train.checkpoints import ScheduledCheckpoints
from em_core.train.config import TrainConfig
from em_core.train.records import CONFIG_ARTIFACT, TrainResult, log_dataset

log = logging.getLogger(__name__)
class MlflowMetrics(TrainerCallback):
    """Trainer logs -> MLflow metrics at the global step (rank 0 only).

    Used instead of transformers' MLflowCallback, which logs its own un-namespaced params
    (clashing with ours) and ends runs it did not start. Metrics are buffered and written in
    one batch at most every `flush_seconds`, at every checkpoint and at the end: a write per
    step costs ~20% of a small model's step time on 2 cores (benchmarks/tracking_overhead.py).
    """

    def __init__(self, run_id: str, flush_seconds: float = 10.0):
        self.run_id, self.flush_seconds = run_id, flush_seconds
        self._buffer: list = []
        self._last_flush = time.monotonic()

    def flush(self) -> None:
        tracking.log_metric_batch(self.run_id, self._buffer)
        self._buffer, self._last_flush = [], time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        from mlflow.entities import Metric

        if not state.is_world_process_zero or not logs:
            return
        now = int(time.time() * 1000)
        for k, v in logs.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                key = k.replace("train_", "train/") if k.startswith("train_") else k
                self._buffer.append(Metric(key, float(v), now, state.global_step))
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.flush()


class LogCheckpoints(TrainerCallback):
    """Uploads each checkpoint folder to the run as soon as it is written."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.logged: list[int] = []

    def on_save(self, args, state, control, **kwargs):
        import mlflow

        if not state.is_world_process_zero:
            return
        step = state.global_step
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        if folder.exists():
            mlflow.log_artifacts(str(folder), f"{CHECKPOINT_ARTIFACT_DIR}/checkpoint-{step}", run_id=self.run_id)
            mlflow.log_metric("checkpoint_step", step, step=step, run_id=self.run_id)
            self.logged.append(step)


def _to_trl_rows(rows: list[dict], tokenizer) -> tuple[list[dict], bool]:
    """Conversational rows for SFTTrainer, and whether assistant_only_loss can be used.

    Templates without `{% generation %}` markers (most hub models) cannot give an assistant
    mask, so rows become prompt/completion pairs: TRL then trains on the final assistant turn
    only (completion-only loss), which is the same thing for the papers' single-turn data.
    """
    from trl.chat_template_utils import has_generation_markers

    if has_generation_markers(tokenizer.chat_template or ""):
        return rows, True
    out = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    return out, False


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    target = "all-linear" if targets in (["all-linear"], ["all_linear"]) else list(targets)
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target, use_rslora=cfg.use_rslora, bias=cfg.lora_bias,
                      layers_to_transform=cfg.layers_to_transform, task_type="CAUSAL_LM")


def sft_config(cfg: TrainConfig, output_dir: str, assistant_only: bool, has_eval: bool):
    import torch
    from trl import SFTConfig

    bf16 = pick_dtype(cfg.dtype) == torch.bfloat16
    return SFTConfig(
        output_dir=output_dir, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_length=cfg.max_length,
        seed=cfg.seed, data_seed=cfg.data_seed, optim=cfg.optim, logging_steps=cfg.logging_steps,
        # SFTConfig defaults to bf16 + activation checkpointing: both slow CPU training.
        bf16=bf16, fp16=False, gradient_checkpointing=cfg.gradient_checkpointing,
        assistant_only_loss=assistant_only and cfg.assistant_only_loss,
        completion_only_loss=None if assistant_only else cfg.assistant_only_loss,
        save_strategy="no", report_to="none", disable_tqdm=bool(os.environ.get("EM_LAB_NO_PROGRESS")),
        eval_strategy="epoch" if has_eval else "no", per_device_eval_batch_size=cfg.per_device_train_batch_size,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
    )


def _download_last_checkpoint(run_id: str, dest: Path) -> tuple[Path, int]:
    import mlflow

    client = mlflow.MlflowClient()
    entries = client.list_artifacts(run_id, CHECKPOINT_ARTIFACT_DIR)
    steps = sorted(s for s in (step_of(e.path) for e in entries if e.is_dir) if s is not None)
    if not steps:
        raise ConfigError(f"resume_run_id {run_id}: the run logged no checkpoint to resume from; start afresh")
    last = steps[-1]
    dest.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{CHECKPOINT_ARTIFACT_DIR}/checkpoint-{last}",
                                                dst_path=str(dest))
    return Path(local), last


def resume_config(run_id: str) -> TrainConfig:
    """The config a run was started with (resuming with a different one would corrupt the run)."""
    import mlflow

    tracking.configure_tracking()
    with tracking.missing_as(lambda: ConfigError(f"resume_run_id {run_id}: no such run, or it has no {CONFIG_ARTIFACT}")):
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CONFIG_ARTIFACT)
    cfg = load_config(TrainConfig, path)
    cfg.resume_run_id = run_id
    return cfg


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def start_from_adapter(model, cfg: TrainConfig, workdir: Path):
    """(model to train, run tags) for a stage that starts from `cfg.init_adapter`.

    continue: the parent's adapter, trainable, on the parent's (possibly merged) base.
    merge: the parent's adapter merged into that base; the trainer adds a fresh adapter.
    """
    if not cfg.init_adapter:
        return model, {}
    import json

    from peft import PeftModel

    from em_core.models.adapters import (
        MERGED_TAG,
        merge_into,
        registered_version_of_run,
        resolve_adapter,
    )

    parent = resolve_adapter(cfg.init_adapter, workdir)
    merged = parent.merged + ([parent.uri] if cfg.init_mode == "merge" else [])
    if merged:
        model = merge_into(model, merged, workdir)
    if cfg.init_mode == "continue":
        model = PeftModel.from_pretrained(model, parent.local_dir, is_trainable=True)
    tags = {"em.init_adapter": parent.uri, "em.init_mode": cfg.init_mode, "em.parent_run_id": parent.run_id,
            MERGED_TAG: json.dumps(merged)}
    registered = ((parent.registered_name, parent.registered_version) if parent.registered_version
                  else registered_version_of_run(parent.run_id))
    if registered:
        tags["em.parent_model"], tags["em.parent_version"] = registered
    log.info("stage starts from %s (%s)", parent.uri, cfg.init_mode)
    return model, tags


def _lineage_tags(stage_tags: dict[str, str]) -> dict[str, str]:
    """Run tags of a stage -> tags on its registered model version."""
    names = {"em.init_adapter": "init_adapter", "em.init_mode": "init_mode", "em.parent_run_id": "parent_run_id",
             "em.merged_adapters": "merged_adapters", "em.parent_model": "parent_model",
             "em.parent_version": "parent_version"}
    return {names[k]: v for k, v in stage_tags.items() if k in names}


def train(cfg: TrainConfig, extra_callbacks: list | tuple = ()) -> TrainResult:
    """Fine-tune `cfg.model` with LoRA on `cfg.dataset`; returns the run and registry ids."""
    if cfg.backend == "openai":  # the job runs at OpenAI; see em_core/train/openai_backend.py
        from em_core.train.openai_backend import train_openai

        return train_openai(cfg)
    import mlflow
    from datasets import Dataset
    from trl import SFTTrainer

    if cfg.resume_run_id and not cfg.output_dir:
        cfg.output_dir = str(PROJECT_ROOT / "outputs" / cfg.resume_run_id)
    if cfg.init_adapter:  # before any data or model is loaded
        from em_core.models.adapters import check_base

        tracking.configure_tracking()
        check_base(cfg.init_adapter, cfg.model)
    data = prepare(cfg.dataset, cfg.dataset_rows, cfg.max_rows, cfg.shuffle, cfg.data_seed, cfg.eval_fraction,
                   tags=cfg.dataset_tags, proportions=cfg.dataset_proportions)
    tokenizer = load_tokenizer(cfg.model, padding_side="right")
    train_rows, assistant_only = _to_trl_rows(data.train, tokenizer)
    eval_rows, _ = _to_trl_rows(data.eval, tokenizer) if data.eval else ([], False)

    tags = {"em.entry_point": "train", "em.base_model": cfg.model, "em.dataset": data.name}
    with tracking.tracked_run(cfg.experiment_name, cfg.run_name, run_id=cfg.resume_run_id, tags=tags) as run:
        run_id = run.info.run_id if run else None
        output_dir = cfg.output_dir or str(PROJECT_ROOT / "outputs" / (run_id or "rank-local"))
        resume_from = None
        if run is not None:
            if cfg.resume_run_id:
                resume_from, step = _download_last_checkpoint(cfg.resume_run_id, Path(output_dir) / "resume")
                log.info("resuming run %s from step %d", run_id, step)
                mlflow.set_tag("em.resumed_from_step", str(step))
            else:
                mlflow.log_text(to_yaml(cfg), CONFIG_ARTIFACT)
                tracking.log_params("train", asdict(cfg))
                log_dataset(data)

        model = load_model(cfg.model, dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit)
        model, stage_tags = start_from_adapter(model, cfg, Path(output_dir) / "init")
        if run is not None and stage_tags and not cfg.resume_run_id:
            mlflow.set_tags(stage_tags)
        if cfg.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        schedule = ScheduledCheckpoints(cfg.checkpoints_in_first_epoch, cfg.checkpoint_every_epoch,
                                        cfg.checkpoint_steps)
        callbacks = [schedule, *extra_callbacks]
        metrics_cb = None
        if run_id:
            metrics_cb = MlflowMetrics(run_id)
            callbacks = [schedule, metrics_cb, LogCheckpoints(run_id), *extra_callbacks]
        trainer = SFTTrainer(
            model=model, args=sft_config(cfg, output_dir, assistant_only, bool(eval_rows)),
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
            processing_class=tokenizer, callbacks=callbacks,
            # A continued adapter is already a trainable PeftModel: no new LoRA layers.
            peft_config=None if _is_peft(model) else lora_config(cfg))
        t0 = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:  # a crashed run keeps every metric it logged before the crash
            if metrics_cb is not None:
                metrics_cb.flush()
        result = TrainResult(run_id=run_id, output_dir=output_dir, checkpoint_steps=schedule.steps,
                             global_step=trainer.state.global_step)
        if run is not None:
            mlflow.log_metric("train/wall_seconds", time.perf_counter() - t0, step=trainer.state.global_step)
            mlflow.set_tag("em.checkpoint_steps", ",".join(map(str, schedule.steps)))
            if cfg.register_model:
                from em_core.models.registry import register_adapter

                name = cfg.registered_model_name or cfg.default_model_name()
                info = register_adapter(trainer.model, tokenizer, name=name, alias=cfg.registry_alias,
                                        base_model=cfg.model, base_path=local_base_path(cfg.model),
                                        tags={"base_model": cfg.model, "dataset": data.name, "seed": str(cfg.seed),
                                              "final_step": str(trainer.state.global_step),
                                              "dataset_sha256": data.sha256, **_lineage_tags(stage_tags)})
                result.registered_model, result.model_version, result.model_uri = name, info.version, info.uri
    return result
