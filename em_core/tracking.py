"""MLflow plumbing: the default local store, runs that end FAILED on error, safe params.

Default store: `mlruns/mlflow.db` (sqlite) with artifacts under `mlruns/artifacts/<experiment>`.
`MLFLOW_TRACKING_URI` overrides it. Under `mlflow run`, the run MLflow started (MLFLOW_RUN_ID)
is attached to. Under `accelerate launch`, only rank 0 talks to MLflow.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping

from em_core.paths import mlruns_dir

log = logging.getLogger(__name__)

# MLflow truncates nothing for us: params longer than this are rejected.
MAX_PARAM_LEN = 6000
# A pipeline run's stages (JSON list), written by experiments and read by the report.
STAGES_TAG = "em.stages"
# Secrets are recognised by what they are, never by a key that merely mentions tokens
# (`max_new_tokens` changes a step's output and must be logged and part of its identity).
# A key is secret when its last word (split at _ - . and camel case) is one of _SECRET_WORDS, when
# its last two words are one of _SECRET_PAIRS, or when it is exactly `key` or `token`.
_SECRET_WORDS = {"apikey", "password", "passwd", "pwd", "secret", "authorization", "credentials"}
_SECRET_PAIRS = {("api", "key"), ("auth", "token"), ("access", "token"), ("refresh", "token"), ("hf", "token"),
                 ("hub", "token"), ("bearer", "token"), ("session", "token"), ("id", "token"),
                 ("secret", "key"), ("private", "key"), ("openai", "key")}
_SECRET_VALUE = re.compile(r"(sk-[A-Za-z0-9_-]{8,}|hf_[A-Za-z0-9]{8,}|gh[pousr]_[A-Za-z0-9]{16,}"
                           r"|xox[abpr]-[A-Za-z0-9-]{8,}|Bearer\s+[A-Za-z0-9._~+/=-]{8,})")
_URL_CREDENTIALS = re.compile(r"(://)[^/@\s]+@")  # user:password@ in a URL
# `?api_key=...`, `&token=...`, `password=...` in URLs, DSNs and messages
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(\b(?:api[_-]?key|apikey|key|access[_-]?token|auth[_-]?token|refresh[_-]?token|hf[_-]?token|token"
    r"|password|passwd|pwd|secret|client[_-]?secret|sig|signature)=)[^&\s#'\"]+")
# Set by `child_runs`: the parent run and extra tags for runs started inside a pipeline step.
_CHILD_OF: contextvars.ContextVar[tuple[str, dict] | None] = contextvars.ContextVar("em_child_of", default=None)


NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


@contextlib.contextmanager
def missing_as(error: Callable[[], BaseException]) -> Iterator[None]:
    """Turn MLflow's "no such run / artifact / model version" into `error()` (a clear message for
    the user); every other failure -- a locked or corrupt store, an auth error, a network error --
    propagates unchanged with its own cause."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        if e.error_code != NOT_FOUND:
            raise
        raise error() from e


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def default_tracking_uri() -> str:
    return f"sqlite:///{mlruns_dir() / 'mlflow.db'}"


def configure_tracking() -> str:
    """Point MLflow at MLFLOW_TRACKING_URI, else at the project's `mlruns/` store."""
    import mlflow

    # One bar per downloaded checkpoint buries the log; our own bars show progress instead.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        mlruns_dir().mkdir(parents=True, exist_ok=True)
        uri = default_tracking_uri()
        os.environ["MLFLOW_TRACKING_URI"] = uri  # child processes (mlflow run, workers) inherit it
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_experiment(name: str) -> str:
    """Experiment id; created with an explicit artifact root for local sqlite stores, because
    otherwise artifacts land in ./mlruns relative to wherever the command runs."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    location = None
    if uri.startswith("sqlite:///"):
        db = uri.removeprefix("sqlite:///")
        location = (os.path.dirname(os.path.abspath(db)) + f"/artifacts/{name}")
        location = "file://" + location
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another worker
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def child_runs(parent_run_id: str, tags: Mapping[str, str] | None = None) -> Iterator[None]:
    """Runs started by `tracked_run` inside this block are children of `parent_run_id` (with
    `tags` added), so train/evaluate/judge need no pipeline-specific parameters."""
    token = _CHILD_OF.set((parent_run_id, dict(tags or {})))
    try:
        yield
    finally:
        _CHILD_OF.reset(token)


@contextlib.contextmanager
def tracked_run(experiment: str, run_name: str | None = None, run_id: str | None = None,
                nested: bool = False, tags: Mapping[str, str] | None = None) -> Iterator:
    """Start (or resume/attach to) a run that ends FINISHED, FAILED on error, KILLED on Ctrl-C."""
    import mlflow

    if not is_main_process():
        yield None
        return
    configure_tracking()
    env_run = os.environ.get("MLFLOW_RUN_ID")
    kwargs: dict = {"nested": nested}
    child_of = _CHILD_OF.get()
    tags = dict(tags or {})
    if child_of is not None:
        tags.update(child_of[1])
    if run_id:
        kwargs["run_id"] = run_id
    elif child_of is not None:
        kwargs.update(nested=True, parent_run_id=child_of[0], experiment_id=ensure_experiment(experiment),
                      run_name=run_name)
        # mlflow.start_run() without run_id adopts MLFLOW_RUN_ID whatever else it is given
        os.environ.pop("MLFLOW_RUN_ID", None)
    elif env_run and not nested and mlflow.active_run() is None:
        # launched by `mlflow run`; consumed, as MLflow does, so runs started later are not it
        kwargs["run_id"] = os.environ.pop("MLFLOW_RUN_ID")
    else:
        kwargs["experiment_id"] = ensure_experiment(experiment)
        kwargs["run_name"] = run_name
    run = mlflow.start_run(**kwargs, tags=tags)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException as e:
        if type(e).__name__ == "TrialPruned":  # optuna stopped it on purpose: KILLED, not FAILED
            with contextlib.suppress(Exception):
                mlflow.set_tag("em.pruned", scrub(str(e))[:5000])
            mlflow.end_run("KILLED")
            raise
        with contextlib.suppress(Exception):
            mlflow.set_tag("em.error", f"{type(e).__name__}: {scrub(str(e))}"[:5000])
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def is_secret_key(key: str) -> bool:
    """A setting named like a credential (`api_key`, `hf_token`, `password`, `Authorization`),
    not one that only mentions tokens (`max_new_tokens`, `tokenizer`)."""
    words = tuple(w.lower() for w in re.split(r"[_\-.\s]+|(?<=[a-z])(?=[A-Z])", key.strip()) if w)
    if not words:
        return False
    return words in (("key",), ("token",)) or words[-1] in _SECRET_WORDS or words[-2:] in _SECRET_PAIRS


def scrub(text: str) -> str:
    """Mask API keys, passwords, `user:pass@` in URLs and secret query-string values."""
    text = _SECRET_VALUE.sub("***", text)
    text = _URL_CREDENTIALS.sub(r"\1***@", text)
    text = _SECRET_ASSIGNMENT.sub(r"\1***", text)
    for var in ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "ANTHROPIC_API_KEY"):
        val = os.environ.get(var)
        if val and len(val) >= 4:
            text = text.replace(val, "***")
    return text


def flatten_params(prefix: str, params: Mapping) -> dict[str, str]:
    """`prefix.key` -> string value; secret-named keys dropped, secret values masked, long values
    cut to MLflow's limit."""
    out = {}
    for k, v in params.items():
        if is_secret_key(str(k)):
            continue
        s = v if isinstance(v, str) else json.dumps(v)
        out[f"{prefix}.{k}"] = scrub(s)[:MAX_PARAM_LEN]
    return out


def log_params(prefix: str, params: Mapping) -> None:
    import mlflow

    if is_main_process() and mlflow.active_run() is not None:
        mlflow.log_params(flatten_params(prefix, params))


def log_metric_batch(run_id: str, metrics: list) -> None:
    """Write `mlflow.entities.Metric`s to any run (active or finished) in log_batch-sized chunks."""
    import mlflow

    client = mlflow.MlflowClient()
    for i in range(0, len(metrics), 1000):  # log_batch's per-call limit
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
