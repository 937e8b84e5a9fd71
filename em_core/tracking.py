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
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePath

from em_core import liveness
from em_core import tags as em_tags
from em_core.errors import StoreError, Terminated
from em_core.paths import file_lock, mlruns_dir

log = logging.getLogger(__name__)

# MLflow truncates nothing for us: params longer than this are rejected.
MAX_PARAM_LEN = 6000
# A pipeline run's stages (JSON list), written by experiments and read by the report.
STAGES_TAG = em_tags.STAGES
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
_REAPED: set[tuple[str, str]] = set()  # (tracking uri, experiment id) already reaped by this process
_READY: set[str] = set()  # sqlite stores this process has created/migrated (under the lock)
# Set by `child_runs`: the parent run, extra tags and the run name for runs started inside a pipeline step.
_CHILD_OF: contextvars.ContextVar[tuple[str, dict, str | None] | None] = contextvars.ContextVar("em_child_of",
                                                                                                default=None)
# The built-in demo sets by what `dataset: demo` / `demo:<name>` load.
_DEMO_DEFAULT = "plant_care_bad"


def short_id() -> str:
    """6 hex characters from the OS's randomness: training seeds Python's `random`, which made
    MLflow's own name generator give every seeded run the same name."""
    return secrets.token_hex(3)


def model_label(model: str) -> str:
    """`meta-llama/Llama-3.2-1B-Instruct` -> `Llama-3.2-1B-Instruct`; `tiny` stays `tiny`."""
    return str(model).rstrip("/").split("/")[-1]


def dataset_label(dataset) -> str:
    """A short, meaningful name of a dataset spec (or list/`a+b` mix): the file stem, the demo set's
    own name (`demo` -> `plant_care_bad`), a registry name, or a hub id's last part."""
    specs = dataset if isinstance(dataset, (list, tuple)) else str(dataset).split("+")
    parts = []
    for d in specs:
        d = str(d).strip()
        if d == "demo" or d.startswith("demo:"):
            parts.append(d.partition(":")[2] or _DEMO_DEFAULT)
        else:
            parts.append(PurePath(d.removeprefix("registry:")).name.removesuffix(".gz").removesuffix(".jsonl")
                         .removesuffix(".json"))
    return "+".join(parts)


def descriptive_name(kind: str, *parts: str | None, sid: str | None = None) -> str:
    """`train-tiny-plant_care_bad-3f9a1c`: what ran, on what, and a short id to tell repeats apart."""
    name = "-".join([kind, *(str(p) for p in parts if p), sid or short_id()])
    return re.sub(r"[^A-Za-z0-9_.+/:-]", "-", name)[:250]


def child_run_name() -> str | None:
    """The name a pipeline gave the run about to start in its step, if any."""
    child_of = _CHILD_OF.get()
    return child_of[2] if child_of else None


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
    if uri.startswith("sqlite:///") and uri not in _READY:
        _open_sqlite_store(uri)
        _READY.add(uri)
    return uri


def _open_sqlite_store(uri: str) -> None:
    """Create/migrate a sqlite store under an exclusive file lock beside it: MLflow's schema
    creation and alembic migrations are not safe against several processes opening a fresh store
    at once (`table experiments already exists`, or a half-migrated database)."""
    import mlflow

    db = os.path.abspath(uri.removeprefix("sqlite:///"))
    with file_lock(Path(db + ".lock")):
        try:
            # Both calls make MLflow build (and cache) its tracking and registry stores, which
            # creates or upgrades the schema; later calls in this process reuse them.
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
            mlflow.MlflowClient(uri, registry_uri=uri).search_registered_models(max_results=1)
        except Exception as e:
            raise StoreError(
                f"cannot open the MLflow store {db}: {type(e).__name__}: {scrub(str(e))[:500]}. To fix: if an "
                f"older MLflow wrote it, run `mlflow db upgrade {uri}`; if it is damaged, move {db} aside (a new "
                f"one is created; artifacts stay where they are) or point MLFLOW_TRACKING_URI at another store"
            ) from None


def default_artifact_location(tracking_uri: str, name: str, cwd: str | None = None) -> str | None:
    """Where a new experiment's artifacts go (pure): None when a server decides (http(s),
    databricks), else an absolute file:// folder. Without it a database store (sqlite,
    postgresql, mysql, ...) gets `./mlruns/<id>` relative to wherever the command runs, which
    the next command, run elsewhere, cannot find. sqlite: beside the database file; other
    databases: `EM_LAB_ARTIFACT_ROOT` if set, else `<project mlruns>/artifacts`."""
    scheme = tracking_uri.split(":", 1)[0].lower() if "://" in tracking_uri else ""
    if scheme in ("http", "https", "databricks", "databricks-uc", "uc") or tracking_uri.startswith("databricks"):
        return None
    if scheme == "sqlite":
        db = tracking_uri.split(":///", 1)[1] if ":///" in tracking_uri else "mlflow.db"
        root = os.path.join(os.path.dirname(os.path.abspath(os.path.join(cwd or os.getcwd(), db))), "artifacts")
    elif scheme:  # postgresql://, mysql://, mssql://, postgresql+psycopg://, ...
        root = os.environ.get("EM_LAB_ARTIFACT_ROOT") or str(mlruns_dir() / "artifacts")
        if "://" in root:  # an object store URL (s3://...) is used as given
            return f"{root.rstrip('/')}/{name}"
        root = os.path.abspath(os.path.join(cwd or os.getcwd(), root))
    else:
        return None
    return "file://" + os.path.join(root, name)


# MLflow 3's experiment-kind tag: without it the UI opens an experiment in its GenAI view (traces,
# evaluations); "custom_model_development" is the kind its UI labels "Machine learning" (runs,
# metric charts, models), the one that fits fine-tuning runs. Values from MLflow 3.17's UI bundle.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(name: str) -> str:
    """Experiment id; created with an explicit absolute artifact root for database stores
    without a server (`default_artifact_location`) and tagged as a model-training experiment
    (`EXPERIMENT_KIND_TAG`; an existing experiment without the tag gets it, one a person set is kept)."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            with contextlib.suppress(Exception):  # a read-only store still gives the id
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = default_artifact_location(mlflow.get_tracking_uri(), name)
    try:
        return mlflow.create_experiment(name, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created concurrently by another worker
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def child_runs(parent_run_id: str, tags: Mapping[str, str] | None = None,
               run_name: str | None = None) -> Iterator[None]:
    """Runs started by `tracked_run` inside this block are children of `parent_run_id` (with
    `tags` added, and named `run_name` unless they name themselves), so train/evaluate/judge
    need no pipeline-specific parameters."""
    token = _CHILD_OF.set((parent_run_id, dict(tags or {}), run_name))
    try:
        yield
    finally:
        _CHILD_OF.reset(token)


@contextlib.contextmanager
def tracked_run(experiment: str, run_name: str | None = None, run_id: str | None = None,
                nested: bool = False, tags: Mapping[str, str] | None = None) -> Iterator:
    """Start (or resume/attach to) a run that ends FINISHED, FAILED on error, KILLED on Ctrl-C
    or SIGTERM (see `errors.raise_on_sigterm`), with the reason in `em.killed_reason`."""
    import mlflow

    if not is_main_process():
        yield None
        return
    configure_tracking()
    env_run = os.environ.get("MLFLOW_RUN_ID")
    kwargs: dict = {"nested": nested}
    redirected_from = None
    child_of = _CHILD_OF.get()
    tags = dict(tags or {})
    if child_of is not None:
        tags.update(child_of[1])
    # Always our own name: MLflow's generator draws from `random`, which training seeds.
    run_name = run_name or child_run_name() or descriptive_name(tags.get(em_tags.ENTRY_POINT, "run"))
    if run_id:
        kwargs["run_id"] = run_id
    elif child_of is not None:
        kwargs.update(nested=True, parent_run_id=child_of[0], experiment_id=ensure_experiment(experiment),
                      run_name=run_name)
        # mlflow.start_run() without run_id adopts MLFLOW_RUN_ID whatever else it is given
        os.environ.pop("MLFLOW_RUN_ID", None)
    elif env_run and not nested and mlflow.active_run() is None:
        # launched by `mlflow run`; consumed, as MLflow does, so runs started later are not it
        os.environ.pop("MLFLOW_RUN_ID")
        if _launched_into_default(env_run, experiment):
            # `mlflow run` without --experiment-name made its run in `Default` (artifacts under
            # ./mlruns/0): run where `em <step>` runs instead, and leave a pointer on that stub.
            kwargs["experiment_id"] = ensure_experiment(experiment)
            kwargs["run_name"] = run_name
            redirected_from = env_run
        else:
            kwargs["run_id"] = env_run
            tags.setdefault("mlflow.runName", run_name)  # replaces the name `mlflow run` drew
    else:
        kwargs["experiment_id"] = ensure_experiment(experiment)
        kwargs["run_name"] = run_name
    _reap_once(kwargs.get("experiment_id") or _experiment_of(kwargs.get("run_id")))
    run = mlflow.start_run(**kwargs, tags=tags)
    if redirected_from:
        client = mlflow.MlflowClient()
        client.set_tag(redirected_from, em_tags.REDIRECTED_TO, run.info.run_id)
        client.set_tag(redirected_from, "mlflow.note.content",
                       f"em-lab ran this in experiment {experiment!r}, run {run.info.run_id}; pass "
                       f"--experiment-name {experiment} to `mlflow run` to attach to it directly")
        mlflow.set_tag(em_tags.LAUNCHED_BY_RUN, redirected_from)
    heartbeat = liveness.Heartbeat(run.info.run_id)
    try:
        try:
            heartbeat.start()
        except Exception as e:  # noqa: BLE001 -- a busy store must not fail the run; it only loses reaping
            log.warning("run %s: cannot start its heartbeat (%s); it will not be reaped if killed",
                        run.info.run_id, e)
        yield run
    except (KeyboardInterrupt, Terminated) as e:
        heartbeat.stop()
        with contextlib.suppress(Exception):
            reason = str(e) if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
            mlflow.set_tag(em_tags.KILLED_REASON, reason)
        mlflow.end_run("KILLED")
        raise
    except BaseException as e:
        if type(e).__name__ == "TrialPruned":  # optuna stopped it on purpose: KILLED, not FAILED
            with contextlib.suppress(Exception):
                mlflow.set_tag(em_tags.PRUNED, scrub(str(e))[:5000])
            heartbeat.stop()
            mlflow.end_run("KILLED")
            raise
        with contextlib.suppress(Exception):
            mlflow.set_tag(em_tags.ERROR, f"{type(e).__name__}: {scrub(str(e))}"[:5000])
        heartbeat.stop()
        mlflow.end_run("FAILED")
        raise
    else:
        heartbeat.stop()
        mlflow.end_run("FINISHED")
    finally:
        heartbeat.stop()


def _experiment_of(run_id: str | None) -> str | None:
    import mlflow

    if not run_id:
        return None
    return mlflow.MlflowClient().get_run(run_id).info.experiment_id


def _reap_once(experiment_id: str | None) -> None:
    """Before a command starts (or resumes) work in an experiment, runs there left RUNNING by a
    dead process are marked KILLED, so searches for reusable or resumable work see the truth."""
    import mlflow

    key = (mlflow.get_tracking_uri(), experiment_id or "")
    if experiment_id is None or key in _REAPED:
        return
    _REAPED.add(key)
    liveness.reap_stale_runs([experiment_id])


def local_artifact(run_id: str, path: str) -> str:
    """A local file path of a run's artifact: in place for a local artifact store, else downloaded
    (a `runs:/` address is not something a newcomer can open)."""
    from urllib.parse import unquote, urlparse

    import mlflow

    root = mlflow.MlflowClient().get_run(run_id).info.artifact_uri
    parsed = urlparse(root)
    if parsed.scheme in ("", "file"):
        return str(Path(unquote(parsed.path)) / path)
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)


def ui_command() -> str:
    """The command that browses this store (the frugal settings from the README)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return f"open {uri} in a browser"
    db = Path(uri.removeprefix("sqlite:///"))
    return (f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --workers 1 --backend-store-uri {uri} "
            f"--default-artifact-root {db.parent / 'artifacts'}")


def _launched_into_default(run_id: str, experiment: str) -> bool:
    """The run `mlflow run` made sits in the `Default` experiment while this step names another."""
    import mlflow

    if experiment == "Default":
        return False
    try:
        return mlflow.MlflowClient().get_run(run_id).info.experiment_id == "0"
    except Exception:  # not in this store: attach as before and let MLflow say what is wrong
        return False


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
