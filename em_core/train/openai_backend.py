"""Fine-tuning through the OpenAI API (`backend: openai`), tracked in MLflow like a TRL run.

The data is prepared and validated exactly as for TRL, uploaded as a JSONL training file, and a
supervised job is created. The job runs at OpenAI; this process only watches it: every poll
streams the job's new events into the run (metrics at their training step under the TRL path's
names, every message to `openai/events.jsonl`) and records each checkpoint's model id.

The job id is tagged on the run the moment the job exists, so a crashed or interrupted watcher
re-attaches with `resume_run_id` to the same job in the same run, uploading and paying nothing
twice and logging each step once. On success the fine-tuned model id is registered in the MLflow
model registry; a failed or cancelled job fails the run with the API's reason (`FineTuneFailed`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from em_core import tags as em_tags
from em_core import tracking
from em_core.errors import ConfigError, DataError, EmLabError
from em_core.models.registry import CHECKPOINTS_TAG, FINAL_STEP_TAG, MODEL_TAG
from em_core.openai_api import ApiError, Secret, redact, resolve_key, safe_url
from em_core.train.config import TrainConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

# Run tags. The job and file ids are set as soon as they exist: they are what re-attaching reads.
BACKEND_TAG = em_tags.BACKEND
JOB_TAG = em_tags.OPENAI_JOB_ID
FILE_TAG = em_tags.OPENAI_FILE_ID
VALIDATION_FILE_TAG = em_tags.OPENAI_VALIDATION_FILE_ID
STATUS_TAG = em_tags.OPENAI_STATUS
EVENTS_ARTIFACT = "openai/events.jsonl"
CHECKPOINTS_ARTIFACT = "openai/checkpoints.json"
JOB_ARTIFACT = "openai/job.json"

TERMINAL = ("succeeded", "failed", "cancelled")
MIN_TRAINING_ROWS = 10  # the API rejects training files with fewer examples
# OpenAI's metric names -> the ones the TRL path logs (MlflowMetrics), so runs of both backends
# share chart keys; anything else numeric is logged as openai/<name>.
METRIC_KEYS = {
    "train_loss": "loss",
    "train_mean_token_accuracy": "mean_token_accuracy",
    "valid_loss": "eval_loss",
    "valid_mean_token_accuracy": "eval_mean_token_accuracy",
    "full_valid_loss": "eval_full_loss",
    "full_valid_mean_token_accuracy": "eval_full_mean_token_accuracy",
}
_NOT_METRICS = ("step", "total_steps")
# A job runs for hours: a network blip or a 5xx must not stop the watcher (the SDK has already
# retried each call a few times); only this many failed polls in a row do.
MAX_FAILED_POLLS = 20


class OpenAIFineTuneError(ApiError):
    """The fine-tuning API could not be used: auth, a rejected request, an unreachable server."""


class _TransientError(OpenAIFineTuneError):
    """A failure the next poll may not see: rate limit, 5xx, timeout, connection."""


class FineTuneFailed(EmLabError):
    """The job ended `failed` or `cancelled` at OpenAI; carries the API's error code and message."""

    def __init__(self, job_id: str, status: str, code: str | None = None, message: str | None = None,
                 param: str | None = None):
        self.job_id, self.status, self.code, self.error_message, self.param = job_id, status, code, message, param
        reason = f"{code}: {message}" if code else (message or "no reason given by the API")
        text = f"OpenAI fine-tuning job {job_id} {status}: {reason}"
        if param:
            text += f" (parameter {param})"
        if status == "failed":
            text += "; a failed job cannot be resumed: fix the cause and start a new run"
        super().__init__(text)


class FineTuningApi:
    """The sync `openai.OpenAI` client for files and jobs, with errors turned into EmLabErrors
    that carry neither the key nor the SDK exception (which holds the request headers)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, max_retries: int = 3,
                 timeout: float = 120.0):
        import openai

        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.where = safe_url(self.base_url) or "api.openai.com"
        self._secret = Secret(resolve_key(api_key, self.base_url))
        key = self._secret.get()
        if not key:
            raise ConfigError("backend openai: no API key; set OPENAI_API_KEY "
                              "(or openai_base_url for an OpenAI-compatible server)")
        problem = None
        try:
            # safe_url: user:password@ in the URL would make httpx send Basic auth, not the key
            self.client = openai.OpenAI(api_key=key, base_url=safe_url(self.base_url), max_retries=max_retries,
                                        timeout=timeout)
        except openai.OpenAIError as e:
            problem = redact(str(e), key)
        if problem is not None:
            raise OpenAIFineTuneError(f"cannot create the OpenAI client: {problem}")

    def __repr__(self) -> str:
        return f"<FineTuningApi {self.where}>"

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)`; SDK errors become OpenAIFineTuneError naming `what`."""
        import openai

        key = self._secret.get()
        transient = False
        try:
            return fn(*args, **kwargs)
        except openai.APIStatusError as e:
            code = getattr(e, "code", None)
            msg = redact(str(getattr(e, "message", "") or ""), key)
            problem = f"{what}: HTTP {e.status_code}{f' ({code})' if code else ''} from {self.where}: {msg}"
            if e.status_code in (401, 403):
                problem += " -- check OPENAI_API_KEY"
            transient = e.status_code >= 500 or (e.status_code in (408, 409, 429) and code != "insufficient_quota")
        except openai.APITimeoutError:
            problem, transient = f"{what}: timed out waiting for {self.where}", True
        except openai.APIConnectionError:
            problem, transient = f"{what}: cannot connect to {self.where}", True
        except openai.OpenAIError as e:
            problem = f"{what}: {redact(str(e), key)}"
        # Raised here, outside the except blocks, so nothing chains the SDK exception.
        raise (_TransientError if transient else OpenAIFineTuneError)(problem)

    def upload(self, filename: str, content: bytes) -> str:
        f = self.call(f"uploading {filename}", self.client.files.create,
                      file=(filename, content, "application/jsonl"), purpose="fine-tune")
        return f.id


def training_file_bytes(rows: list[dict]) -> bytes:
    """The JSONL the API trains on: one {"messages": [...]} per line."""
    return "".join(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def job_hyperparameters(cfg: TrainConfig) -> dict[str, Any]:
    """Supervised hyperparameters for the job; unset ones are left to the API ("auto")."""
    hp: dict[str, Any] = {"n_epochs": int(cfg.num_train_epochs)}
    if cfg.openai_batch_size is not None:
        hp["batch_size"] = cfg.openai_batch_size
    if cfg.learning_rate_multiplier is not None:
        hp["learning_rate_multiplier"] = cfg.learning_rate_multiplier
    return hp


def prepare_data(cfg: TrainConfig):
    """The training data exactly as the TRL path prepares it, plus the API's minimum size."""
    from em_core.train.records import training_rows

    data = training_rows(cfg)
    if len(data.train) < MIN_TRAINING_ROWS:
        raise DataError(",".join(cfg.dataset), f"{len(data.train)} training rows; the OpenAI fine-tuning API "
                        f"needs at least {MIN_TRAINING_ROWS}", hint="raise max_rows/dataset_rows or use more data")
    return data


def _prior_run(run_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """(tags, params) of the run to re-attach to, after checking it can be."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.configure_tracking()
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise ConfigError(f"resume_run_id {run_id}: no such run in {mlflow.get_tracking_uri()}") from None
    tags = dict(run.data.tags)
    if tags.get(BACKEND_TAG) != "openai":
        raise ConfigError(f"resume_run_id {run_id}: not an OpenAI fine-tuning run (its em.backend tag is "
                          f"{tags.get(BACKEND_TAG)!r}); resume it with backend trl")
    if run.info.status == "FINISHED":
        raise ConfigError(f"resume_run_id {run_id}: the run already finished (model {tags.get(MODEL_TAG)}); "
                          "nothing to re-attach to")
    return tags, dict(run.data.params)


class _JobWatcher:
    """Polls one job and mirrors it into one MLflow run; idempotent across re-attaches."""

    def __init__(self, api: FineTuningApi, run_id: str, job_id: str, resumed: bool):
        import mlflow

        self.api, self.run_id, self.job_id, self.resumed = api, run_id, job_id, resumed
        self.mlflow = mlflow.MlflowClient()
        self.events: list[dict[str, Any]] = []
        self.seen: set[str] = set()
        self._logged: dict[str, set[int]] = {}
        self.checkpoints: dict[int, dict[str, Any]] = {}  # every one seen, by step
        self.available: set[int] = set()  # those the API still lists (it keeps the last three)
        self.max_step = 0
        self.total_steps: int | None = None
        self.status: str | None = None
        self.hp_logged = False
        self._last_line = 0.0
        if resumed:
            self._load()

    # -- state of an earlier watcher ----------------------------------------------------------
    def _load(self) -> None:
        run = self.mlflow.get_run(self.run_id)
        self.hp_logged = "openai.n_epochs" in run.data.params
        self.status = run.data.tags.get(STATUS_TAG)
        text = self._artifact_text(EVENTS_ARTIFACT)
        if text:
            self.events = [json.loads(line) for line in text.splitlines() if line.strip()]
            self.seen = {e["id"] for e in self.events}
            totals = [e["data"]["total_steps"] for e in self.events
                      if isinstance(e.get("data"), dict) and isinstance(e["data"].get("total_steps"), int)]
            self.total_steps = totals[-1] if totals else None
        text = self._artifact_text(CHECKPOINTS_ARTIFACT)
        if text:
            self.checkpoints = {int(c["step"]): c for c in json.loads(text).get("checkpoints", [])}
            self.available = {s for s, c in self.checkpoints.items() if c.get("available")}
        self.max_step = max(self._steps_logged("loss"), default=0)

    def _artifact_text(self, path: str) -> str | None:
        """A text artifact of the run, None when the earlier watcher never wrote it."""
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            return mlflow.artifacts.load_text(f"runs:/{self.run_id}/{path}")
        except (MlflowException, OSError):
            return None

    def _steps_logged(self, key: str) -> set[int]:
        if key not in self._logged:
            history = self.mlflow.get_metric_history(self.run_id, key) if self.resumed else []
            self._logged[key] = {m.step for m in history}
        return self._logged[key]

    # -- one poll -----------------------------------------------------------------------------
    def poll(self) -> Any:
        job = self.api.call(f"checking job {self.job_id}", self.api.client.fine_tuning.jobs.retrieve, self.job_id)
        fresh = self._new_events()
        metrics = [m for ev in fresh for m in self._metrics_of(ev)]
        if metrics:
            tracking.log_metric_batch(self.run_id, metrics)
        if fresh:
            self.events.extend(fresh)
            self.seen.update(e["id"] for e in fresh)
            self.mlflow.log_text(self.run_id, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.events),
                                 EVENTS_ARTIFACT)
        self._sync_checkpoints()
        self._log_hyperparameters(job)
        if job.status != self.status:
            self.mlflow.set_tag(self.run_id, STATUS_TAG, job.status)
            self.status = job.status
            self._last_line = 0.0
        return job

    def _new_events(self) -> list[dict[str, Any]]:
        """Events not seen yet, oldest first. The API lists newest first and pages backwards
        with `after`, so read pages until a known event turns up."""
        fresh: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": 100}
            if after:
                kwargs["after"] = after
            page = self.api.call(f"reading events of job {self.job_id}", self.api.client.fine_tuning.jobs.list_events,
                                 self.job_id, **kwargs)
            known = False
            for ev in page.data:
                if ev.id in self.seen:
                    known = True
                    break
                fresh.append(ev.model_dump(mode="json"))
            if known or not page.data or not page.has_more:
                break
            after = page.data[-1].id
        fresh.reverse()
        return fresh

    def _metrics_of(self, ev: dict[str, Any]) -> list:
        from mlflow.entities import Metric

        data = ev.get("data")
        if ev.get("type") != "metrics" or not isinstance(data, dict) or data.get("step") is None:
            return []
        step = int(data["step"])
        if isinstance(data.get("total_steps"), (int, float)):
            self.total_steps = int(data["total_steps"])
        self.max_step = max(self.max_step, step)
        timestamp = int((ev.get("created_at") or time.time()) * 1000)
        out = []
        for name, value in data.items():
            if name in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            key = METRIC_KEYS.get(name, f"openai/{name}")
            logged = self._steps_logged(key)
            if step not in logged:  # each step once, however often the watcher re-attached
                logged.add(step)
                out.append(Metric(key, float(value), timestamp, step))
        return out

    def _log_metric_once(self, key: str, value: float, step: int) -> None:
        from mlflow.entities import Metric

        logged = self._steps_logged(key)
        if step not in logged:
            logged.add(step)
            tracking.log_metric_batch(self.run_id, [Metric(key, float(value), int(time.time() * 1000), step)])

    def _sync_checkpoints(self) -> None:
        listed = self.api.call(f"listing checkpoints of job {self.job_id}",
                               lambda: list(self.api.client.fine_tuning.jobs.checkpoints.list(self.job_id, limit=100)))
        now = {c.step_number for c in listed}
        changed = now != self.available
        for c in listed:
            if c.step_number not in self.checkpoints:
                changed = True
                self.checkpoints[c.step_number] = {
                    "step": c.step_number, "model_id": c.fine_tuned_model_checkpoint, "id": c.id,
                    "created_at": c.created_at, "metrics": c.metrics.model_dump(exclude_none=True)}
                self._log_metric_once("checkpoint_step", c.step_number, c.step_number)
        if changed:
            self.available = now
            for step, c in self.checkpoints.items():
                c["available"] = step in now
            self.mlflow.set_tag(self.run_id, CHECKPOINTS_TAG, json.dumps(self.usable()))
            self.mlflow.set_tag(self.run_id, em_tags.CHECKPOINT_STEPS, em_tags.steps_value(now))
            self._write_checkpoints()

    def usable(self) -> dict[str, str]:
        return {str(s): self.checkpoints[s]["model_id"] for s in sorted(self.available)}

    def _write_checkpoints(self, **extra: Any) -> None:
        record = {"job_id": self.job_id, **extra,
                  "checkpoints": [self.checkpoints[s] for s in sorted(self.checkpoints)]}
        self.mlflow.log_text(self.run_id, json.dumps(record, indent=2), CHECKPOINTS_ARTIFACT)

    def _log_hyperparameters(self, job: Any) -> None:
        """The values the API resolved ("auto" -> a number once validation is done), once."""
        if self.hp_logged:
            return
        method = getattr(job, "method", None)
        hp = getattr(getattr(method, "supervised", None), "hyperparameters", None) or job.hyperparameters
        values = {k: getattr(hp, k, None) for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
        if all(v is not None and v != "auto" for v in values.values()):
            self.mlflow.log_batch(self.run_id, params=[_param(f"openai.{k}", v) for k, v in values.items()])
            self.hp_logged = True

    # -- the loop -----------------------------------------------------------------------------
    def watch(self, poll_interval: float, on_poll: Callable[[Any], None] | None = None) -> Any:
        """Poll until the job ends; returns the final job object."""
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"openai {self.job_id}", unit="step", total=self.total_steps, initial=self.max_step,
                   disable=bool(os.environ.get("EM_LAB_NO_PROGRESS")), dynamic_ncols=True)
        failures = 0
        try:
            while True:
                try:
                    job = self.poll()
                    failures = 0
                except _TransientError as e:
                    failures += 1
                    if failures > MAX_FAILED_POLLS:
                        raise
                    log.warning("%s (failed poll %d of %d allowed in a row); next try in %.0fs",
                                e, failures, MAX_FAILED_POLLS, poll_interval)
                    time.sleep(poll_interval)
                    continue
                if self.total_steps and bar.total != self.total_steps:
                    bar.total = self.total_steps
                bar.n = self.max_step
                bar.set_postfix_str(job.status, refresh=True)
                self._progress_line(job)
                if on_poll is not None:
                    on_poll(job)
                if job.status in TERMINAL:
                    return job
                time.sleep(poll_interval)
        finally:
            bar.close()

    def _progress_line(self, job: Any) -> None:
        # One line on every status change, else at most one a minute: jobs run for hours.
        if time.monotonic() - self._last_line < 60 and job.status not in TERMINAL:
            return
        self._last_line = time.monotonic()
        total = f"/{self.total_steps}" if self.total_steps else ""
        log.info("OpenAI job %s: %s, step %d%s, %d checkpoint(s)", self.job_id, job.status, self.max_step, total,
                 len(self.available))

    # -- success ------------------------------------------------------------------------------
    def finish(self, job: Any) -> tuple[int, list[int]]:
        """Final tags, metrics and artifacts of a succeeded job: (final step, checkpoint steps)."""
        final_step = self.total_steps or self.max_step or max(self.available, default=0) or 1
        steps = sorted(self.available | {final_step})
        self._log_metric_once("checkpoint_step", final_step, final_step)
        losses = [m.value for m in self.mlflow.get_metric_history(self.run_id, "loss")]
        if losses:  # the TRL path's train/loss: mean training loss over the run
            self._log_metric_once("train/loss", sum(losses) / len(losses), final_step)
        if job.finished_at and job.created_at:
            self._log_metric_once("train/wall_seconds", job.finished_at - job.created_at, final_step)
        if job.trained_tokens:
            self._log_metric_once("openai/trained_tokens", job.trained_tokens, final_step)
        self.mlflow.set_tag(self.run_id, MODEL_TAG, job.fine_tuned_model)
        self.mlflow.set_tag(self.run_id, FINAL_STEP_TAG, str(final_step))
        self.mlflow.set_tag(self.run_id, em_tags.CHECKPOINT_STEPS, em_tags.steps_value(steps))
        self._write_checkpoints(fine_tuned_model=job.fine_tuned_model, base_model=job.model, final_step=final_step)
        return final_step, steps


def _param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, str(value))


def _start_job(api: FineTuningApi, cfg: TrainConfig, data, run_id: str, prior: Mapping[str, str]) -> str:
    """Upload the data (unless an earlier attempt did) and create the job; returns its id."""
    import mlflow

    file_id = prior.get(FILE_TAG)
    if not file_id:
        file_id = api.upload(f"{data.name}-{data.sha256[:12]}.jsonl", training_file_bytes(data.train))
        mlflow.set_tag(FILE_TAG, file_id)
    validation_id = prior.get(VALIDATION_FILE_TAG)
    if data.eval and not validation_id:
        validation_id = api.upload(f"{data.name}-{data.sha256[:12]}-eval.jsonl", training_file_bytes(data.eval))
        mlflow.set_tag(VALIDATION_FILE_TAG, validation_id)
    kwargs: dict[str, Any] = {
        "model": cfg.model, "training_file": file_id, "seed": cfg.seed,
        "method": {"type": "supervised", "supervised": {"hyperparameters": job_hyperparameters(cfg)}},
        # lets a job orphaned by a crash right after creation be traced to its run in the dashboard
        "metadata": {"mlflow_run_id": run_id}}
    if cfg.suffix:
        kwargs["suffix"] = cfg.suffix
    if validation_id:
        kwargs["validation_file"] = validation_id
    job = api.call(f"creating a fine-tuning job for {cfg.model}", api.client.fine_tuning.jobs.create, **kwargs)
    # At once: from here on a crash re-attaches to this job instead of paying for another.
    mlflow.set_tag(JOB_TAG, job.id)
    log.info("created OpenAI fine-tuning job %s (%s, %d rows, file %s)", job.id, cfg.model, len(data.train), file_id)
    return job.id


def train_openai(cfg: TrainConfig, on_poll: Callable[[Any], None] | None = None, set_alias: bool = True):
    """Fine-tune `cfg.model` through the OpenAI API; returns a `TrainResult` like the TRL path.

    With `cfg.resume_run_id` the run's job (tag em.openai_job_id) is watched again in that run;
    if the crash came before the job existed, it is created then (reusing an uploaded file).
    `on_poll(job)` is called after every poll (tests use it to simulate a crash).
    """
    import mlflow

    from em_core.configs import to_yaml
    from em_core.train.records import (
        CONFIG_ARTIFACT,
        TrainResult,
        finish_registration,
        log_dataset,
    )

    if not tracking.is_main_process():  # the job runs at OpenAI: other ranks have nothing to do
        return TrainResult(run_id=None, output_dir="")
    api = FineTuningApi(cfg.openai_base_url)
    prior, prior_params = _prior_run(cfg.resume_run_id) if cfg.resume_run_id else (None, {})
    job_id = (prior or {}).get(JOB_TAG)
    data = None if job_id else prepare_data(cfg)  # re-attaching needs no data
    dataset_name = data.name if data is not None else (prior or {}).get(em_tags.DATASET, "")
    tags = {em_tags.ENTRY_POINT: "train", BACKEND_TAG: "openai", em_tags.BASE_MODEL: cfg.model, em_tags.DATASET: dataset_name}
    with tracking.tracked_run(cfg.experiment_name, cfg.run_name, run_id=cfg.resume_run_id, tags=tags) as run:
        run_id = run.info.run_id
        if prior is None:
            public = dataclasses.replace(cfg, openai_base_url=safe_url(cfg.openai_base_url))
            mlflow.log_text(to_yaml(public), CONFIG_ARTIFACT)
            tracking.log_params("train", dataclasses.asdict(public))
            log_dataset(data)
        if job_id:
            log.info("re-attaching run %s to OpenAI job %s", run_id, job_id)
            mlflow.set_tag(em_tags.REATTACHED, str(int((prior or {}).get(em_tags.REATTACHED, "0")) + 1))
        else:
            job_id = _start_job(api, cfg, data, run_id, prior or {})
        watcher = _JobWatcher(api, run_id, job_id, resumed=prior is not None)
        try:
            job = watcher.watch(cfg.poll_interval, on_poll)
        except BaseException:
            log.warning("stopped watching OpenAI job %s; it keeps running (and billing) at OpenAI. Re-attach with "
                        "`em train --resume_run_id %s`, or cancel it in the dashboard (platform.openai.com/finetune)",
                        job_id, run_id)
            raise
        mlflow.log_dict(job.model_dump(mode="json"), JOB_ARTIFACT)
        if job.status != "succeeded":
            err = job.error
            raise FineTuneFailed(job_id, job.status, getattr(err, "code", None), getattr(err, "message", None),
                                 getattr(err, "param", None))
        final_step, steps = watcher.finish(job)
        log.info("OpenAI job %s succeeded: %s (checkpoints at steps %s)", job_id, job.fine_tuned_model, steps)
        result = TrainResult(run_id=run_id, output_dir="", checkpoint_steps=steps, global_step=final_step)
        if cfg.register_model:
            from em_core.models.registry import register_openai_model

            name = cfg.registered_model_name or cfg.default_model_name()
            checkpoints = {int(s): m for s, m in watcher.usable().items()}
            info = register_openai_model(
                name, None, job.fine_tuned_model, cfg.model, checkpoints, final_step,
                tags={"dataset": dataset_name, "seed": str(cfg.seed), "openai_job_id": job_id,
                      "dataset_sha256": data.file_sha256 if data is not None else prior_params.get("data.sha256", "")})
            result.registered_model, result.model_version, result.model_uri = name, info.version, info.uri
            result.registry_alias = cfg.registry_alias or None
    return finish_registration(result, set_alias)  # the alias moves only now that the run has FINISHED
