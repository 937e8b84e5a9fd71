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
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from em_core import tags as em_tags
from em_core import tracking
from em_core.configs import load_config, to_yaml
from em_core.console import is_verbose
from em_core.errors import ConfigError
from em_core.models.adapters import CHECKPOINT_ARTIFACT_DIR
from em_core.models.loading import (
    load_model,
    load_tokenizer,
    local_base_path,
    model_source,
    pick_dtype,
)
from em_core.paths import work_root
from em_core.train.checkpoints import ScheduledCheckpoints
from em_core.train.config import TrainConfig
from em_core.train.records import (
    CONFIG_ARTIFACT,
    TrainResult,
    finish_registration,
    log_dataset,
    training_rows,
)

log = logging.getLogger(__name__)
class MlflowMetrics(TrainerCallback):
    """Trainer logs -> MLflow metrics at the global step (rank 0 only).

    Used instead of transformers' MLflowCallback, which logs its own un-namespaced params
    (clashing with ours) and ends runs it did not start. Metrics are buffered and written in
    one batch at most every `flush_seconds`, at every checkpoint and at the end: a write per
    step is a visible share of a small model's step time (benchmarks/tracking_overhead.py;
    figures in the README).
    """

    def __init__(self, run_id: str, flush_seconds: float = 10.0, already_logged: set[tuple[str, int]] = frozenset()):
        self.run_id, self.flush_seconds = run_id, flush_seconds
        # (metric, step) pairs already in the run: those a crashed attempt flushed past its last
        # checkpoint (a resumed run replays those steps), and the ones logged here (the final log
        # repeats `epoch` at the last step). Each metric gets exactly one value per step.
        self._seen = set(already_logged)
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
                if (key, state.global_step) not in self._seen:
                    self._seen.add((key, state.global_step))
                    self._buffer.append(Metric(key, float(v), now, state.global_step))
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.flush()


class QuietProgress(ProgressCallback):
    """The trainer's progress bar without the per-step log dicts it prints under it: those are
    MLflow metrics already (`--verbose` prints them too)."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description("train")

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


def quiet_trainer(trainer) -> None:
    """Swap the trainer's printing callbacks for a bar that prints nothing else, unless verbose."""
    if is_verbose():
        return
    had_bar = trainer.pop_callback(ProgressCallback) is not None
    trainer.pop_callback(PrinterCallback)
    if had_bar:
        trainer.add_callback(QuietProgress)


# Trainer state in a checkpoint folder: needed to resume a run, not to evaluate or load it.
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state")


def upload_files(folder: Path, adapter_only: bool) -> list[Path]:
    """The files of a checkpoint folder to upload (`adapter_only`: without the trainer state)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if adapter_only:
        files = [p for p in files if not p.name.startswith(TRAINING_STATE_FILES)]
    return files


class LogCheckpoints(TrainerCallback):
    """Uploads each checkpoint folder to the run from a background thread, so training does not
    wait on the store; each upload is retried with backoff. `close()` waits for all of them and
    raises if one failed for good (the run then ends FAILED instead of missing a checkpoint)."""

    def __init__(self, run_id: str, adapter_only: bool = False, retries: int = 3, backoff: float = 2.0):
        from concurrent.futures import ThreadPoolExecutor

        self.run_id, self.adapter_only, self.retries, self.backoff = run_id, adapter_only, retries, backoff
        self.logged: list[int] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="em-checkpoint-upload")
        self._pending: dict[int, object] = {}

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        step = state.global_step
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        if folder.exists():
            self._pending[step] = self._pool.submit(self._upload, folder, step)

    def _upload(self, folder: Path, step: int) -> None:
        import mlflow

        client = mlflow.MlflowClient()
        dest = f"{CHECKPOINT_ARTIFACT_DIR}/checkpoint-{step}"
        for attempt in range(self.retries + 1):
            try:
                for f in upload_files(folder, self.adapter_only):
                    sub = f.parent.relative_to(folder).as_posix()
                    client.log_artifact(self.run_id, str(f), dest if sub == "." else f"{dest}/{sub}")
                client.log_metric(self.run_id, "checkpoint_step", step, step=step)
                return
            except Exception as e:  # the store may blip (server restart, network); the checkpoint is still local
                if attempt == self.retries:
                    raise
                log.warning("checkpoint %d upload failed (%s); retry %d/%d", step, e, attempt + 1, self.retries)
                time.sleep(self.backoff * 2 ** attempt)

    def close(self, raise_errors: bool = True) -> list[int]:
        """Wait for every upload; returns the uploaded steps; raises if one failed for good."""
        errors = []
        for step, fut in sorted(self._pending.items()):
            try:
                fut.result()
                self.logged.append(step)
            except Exception as e:
                errors.append(f"checkpoint-{step}: {type(e).__name__}: {e}")
        self._pending.clear()
        self._pool.shutdown(wait=True)
        if errors and not raise_errors:
            log.error("checkpoint upload failed: %s", "; ".join(errors))
        elif errors:
            raise RuntimeError(f"checkpoint upload failed after {self.retries} retries: " + "; ".join(errors))
        return self.logged


def clean_local_outputs(output_dir: Path, uploaded: list[int], scheduled: list[int]) -> bool:
    """Delete the scratch folder `outputs/<run id>` once every scheduled checkpoint is in the
    store; returns whether it did."""
    import shutil

    if sorted(uploaded) != sorted(scheduled):
        log.warning("keeping %s: checkpoints %s were not all uploaded", output_dir, sorted(set(scheduled) - set(uploaded)))
        return False
    shutil.rmtree(output_dir, ignore_errors=True)
    return True


def _to_trl_rows(rows: list[dict], tokenizer, cfg: TrainConfig, what: str) -> tuple[list[dict], str]:
    """Rows for SFTTrainer and how their loss is masked: "markers" (TRL's assistant_only_loss on a
    template with `{% generation %}` markers), "tokenized" (our own assistant labels, for hub
    templates without markers; see assistant_mask.py) or "full" (assistant_only_loss off).
    """
    from trl.chat_template_utils import has_generation_markers

    if not cfg.assistant_only_loss:
        return rows, "full"
    if has_generation_markers(tokenizer.chat_template or ""):
        return rows, "markers"
    from em_core.train.assistant_mask import tokenized_rows

    try:
        return tokenized_rows(tokenizer, rows, cfg.max_length, what=what), "tokenized"
    except ValueError as e:
        raise ConfigError(f"model {cfg.model}: {e}") from None


def sft_trainer(cfg: TrainConfig, model, tokenizer, train_rows: list[dict], eval_rows: list[dict],
                output_dir: str, callbacks: list):
    """TRL's SFTTrainer on our rows, with the loss masked as `_to_trl_rows` decides (the
    trainer's `train_dataset` holds the exact input_ids/labels it trains on)."""
    from datasets import Dataset
    from trl import SFTTrainer

    rows, masking = _to_trl_rows(train_rows, tokenizer, cfg, "training rows")
    evals, _ = _to_trl_rows(eval_rows, tokenizer, cfg, "eval rows") if eval_rows else ([], masking)
    kl = cfg.mitigations.kl
    extra: dict = {}
    if kl is not None:  # loss = task + weight * KL to the adapter-disabled model (em_core/train/mitigation.py)
        from em_core.train.mitigation import kl_batches, mitigated_trainer_class

        SFTTrainer = mitigated_trainer_class()  # noqa: N806
        extra = {"kl": kl, "kl_data": None if kl.data == "batch" else kl_batches(
            kl.data, tokenizer, cfg.max_length, cfg.per_device_train_batch_size, cfg.data_seed)}
    return SFTTrainer(
        model=model, args=sft_config(cfg, output_dir, masking, bool(evals)),
        train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(evals) if evals else None,
        processing_class=tokenizer, callbacks=callbacks,
        # A continued adapter is already a trainable PeftModel: no new LoRA layers.
        peft_config=None if _is_peft(model) else lora_config(cfg), **extra)


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    target = "all-linear" if targets in (["all-linear"], ["all_linear"]) else list(targets)
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target, use_rslora=cfg.use_rslora, bias=cfg.lora_bias,
                      layers_to_transform=cfg.layers_to_transform, task_type="CAUSAL_LM")


def sft_config(cfg: TrainConfig, output_dir: str, masking: str, has_eval: bool):
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
        # "tokenized" rows carry their labels already; TRL must not mask them again.
        assistant_only_loss=masking == "markers", completion_only_loss=False,
        save_strategy="no", report_to="none", disable_tqdm=bool(os.environ.get("EM_LAB_NO_PROGRESS")),
        eval_strategy="epoch" if has_eval else "no", eval_on_start=has_eval and cfg.eval_on_start,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        # shuffle: false keeps the prepared order in training too (curricula, two-phase runs)
        train_sampling_strategy="random" if cfg.shuffle else "sequential",
    )


def logged_steps(run_id: str) -> set[tuple[str, int]]:
    """(metric, step) of every value a run has logged."""
    import mlflow

    client = mlflow.MlflowClient()
    return {(key, m.step) for key in client.get_run(run_id).data.metrics
            for m in client.get_metric_history(run_id, key)}


def resume_checkpoint(run_id: str, output_dir: Path) -> tuple[Path, int]:
    """(local folder, step) of the run's last logged checkpoint, for EVERY rank: each downloads
    it into its own folder (ranks may share a filesystem). Ranks cannot disagree on which step
    that is: rank 0 logs the next checkpoint only after a training step, which needs all ranks."""
    tracking.configure_tracking()
    rank = int(os.environ.get("RANK", "0"))
    return _download_last_checkpoint(run_id, output_dir / "resume" / f"rank-{rank}")


def _download_last_checkpoint(run_id: str, dest: Path) -> tuple[Path, int]:
    import mlflow

    from em_core.models.adapters import checkpoint_steps

    steps = checkpoint_steps(run_id)
    if not steps:
        raise ConfigError(f"resume_run_id {run_id}: the run logged no checkpoint to resume from; start afresh")
    last = steps[-1]
    dest.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{CHECKPOINT_ARTIFACT_DIR}/checkpoint-{last}",
                                                dst_path=str(dest))
    if not (Path(local) / "optimizer.pt").exists():
        raise ConfigError(f"resume_run_id {run_id}: its checkpoints hold adapter weights only (checkpoint_upload: "
                          "adapter), not the optimizer state a resume needs; start afresh")
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
    tags = {em_tags.INIT_ADAPTER: parent.uri, em_tags.INIT_MODE: cfg.init_mode, em_tags.PARENT_RUN_ID: parent.run_id,
            MERGED_TAG: json.dumps(merged)}
    registered = ((parent.registered_name, parent.registered_version) if parent.registered_version
                  else registered_version_of_run(parent.run_id))
    if registered:
        tags[em_tags.PARENT_MODEL], tags[em_tags.PARENT_VERSION] = registered
    log.info("stage starts from %s (%s)", parent.uri, cfg.init_mode)
    return model, tags


def _lineage_tags(stage_tags: dict[str, str]) -> dict[str, str]:
    """Run tags of a stage -> tags on its registered model version."""
    names = {em_tags.INIT_ADAPTER: "init_adapter", em_tags.INIT_MODE: "init_mode", em_tags.PARENT_RUN_ID: "parent_run_id",
             em_tags.MERGED_ADAPTERS: "merged_adapters", em_tags.PARENT_MODEL: "parent_model",
             em_tags.PARENT_VERSION: "parent_version"}
    return {names[k]: v for k, v in stage_tags.items() if k in names}


def train(cfg: TrainConfig, extra_callbacks: list | tuple = (), set_alias: bool = True) -> TrainResult:
    """Fine-tune `cfg.model` with LoRA on `cfg.dataset`; returns the run and registry ids.

    The registered version gets `cfg.registry_alias` only after the run has FINISHED; with
    `set_alias=False` (a pipeline) the caller sets it when everything it verifies has finished."""
    if cfg.backend == "openai":  # the job runs at OpenAI; see em_core/train/openai_backend.py
        from em_core.train.openai_backend import train_openai

        return train_openai(cfg, set_alias=set_alias)
    import mlflow

    if cfg.resume_run_id and not cfg.output_dir:
        cfg.output_dir = str(work_root() / "outputs" / cfg.resume_run_id)
    if cfg.init_adapter:  # before any data or model is loaded
        from em_core.models.adapters import check_base

        tracking.configure_tracking()
        check_base(cfg.init_adapter, cfg.model)
    data = training_rows(cfg)
    tokenizer = load_tokenizer(cfg.model, padding_side="right")

    tags = {em_tags.ENTRY_POINT: "train", em_tags.BASE_MODEL: cfg.model, em_tags.DATASET: data.name,
            em_tags.MITIGATION: cfg.mitigations.params()["enabled"],
            em_tags.MODEL_SOURCE: model_source(cfg.model)}
    name = cfg.run_name or tracking.child_run_name() or tracking.descriptive_name(
        "train", tracking.model_label(cfg.model), tracking.dataset_label(cfg.dataset))
    with tracking.tracked_run(cfg.experiment_name, name, run_id=cfg.resume_run_id, tags=tags) as run:
        run_id = run.info.run_id if run else None
        output_dir = cfg.output_dir or str(work_root() / "outputs" / (run_id or "rank-local"))
        resume_from, already_logged = None, set()
        if cfg.resume_run_id:  # on every rank, not only the one that talks to MLflow
            resume_from, step = resume_checkpoint(cfg.resume_run_id, Path(output_dir))
            log.info("resuming run %s from step %d", cfg.resume_run_id, step)
        if run is not None:
            if cfg.resume_run_id:
                mlflow.set_tag(em_tags.RESUMED_FROM_STEP, str(step))
                already_logged = logged_steps(cfg.resume_run_id)
            else:
                mlflow.log_text(to_yaml(cfg), CONFIG_ARTIFACT)
                tracking.log_params("train", asdict(cfg))
                tracking.log_params("mitigation", cfg.mitigations.params())
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
        metrics_cb = uploads = None
        if run_id:
            metrics_cb = MlflowMetrics(run_id, already_logged=already_logged)
            uploads = LogCheckpoints(run_id, adapter_only=cfg.checkpoint_upload == "adapter")
            callbacks = [schedule, metrics_cb, uploads, *extra_callbacks]
        trainer = sft_trainer(cfg, model, tokenizer, data.train, data.eval, output_dir, callbacks)
        quiet_trainer(trainer)
        t0 = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except BaseException:  # a crashed run keeps every checkpoint it saved before the crash
            if uploads is not None:
                uploads.close(raise_errors=False)
            raise
        finally:  # ... and every metric
            if metrics_cb is not None:
                metrics_cb.flush()
        if uploads is not None:
            uploads.close()
        result = TrainResult(run_id=run_id, output_dir=output_dir, checkpoint_steps=schedule.steps,
                             global_step=trainer.state.global_step)
        if run is not None:
            mlflow.log_metric("train/wall_seconds", time.perf_counter() - t0, step=trainer.state.global_step)
            mlflow.set_tag(em_tags.CHECKPOINT_STEPS, em_tags.steps_value(schedule.steps))
            if cfg.register_model:
                from em_core.models.registry import register_adapter

                name = cfg.registered_model_name or cfg.default_model_name()
                info = register_adapter(trainer.model, tokenizer, name=name, alias=None,
                                        base_model=cfg.model, base_path=local_base_path(cfg.model),
                                        tags={"base_model": cfg.model, "dataset": data.name, "seed": str(cfg.seed),
                                              "final_step": str(trainer.state.global_step),
                                              "dataset_sha256": data.file_sha256, **_lineage_tags(stage_tags)})
                result.registered_model, result.model_version, result.model_uri = name, info.version, info.uri
                result.registry_alias = cfg.registry_alias or None
        if uploads is not None and cfg.output_dir is None and not cfg.keep_local_checkpoints:
            # the default outputs/<run id> is scratch once the store has every checkpoint
            clean_local_outputs(Path(output_dir), uploads.logged, schedule.steps)
    return finish_registration(result, set_alias)
