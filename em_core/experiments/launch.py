"""Dispatching work: claims on grid cells, grid cells and sweep workers as Ray tasks, Slurm arrays.

Claims: a cell is claimed by creating a registered model named after it (`claim_name`). Model
names are unique in every MLflow store (sqlite, PostgreSQL, a server), so creating one is an
atomic test-and-set that needs nothing beyond the tracking URI; two launchers (or two in-process
grids on two machines) never run one cell twice. The claim is deleted when its launcher is done
with the cell; a claim whose pipeline run ended without finishing (KILLED, FAILED) is broken.

Ray: `ray.init(address)` joins a cluster (None: a local one on this machine). Each cell is one
task with the grid's `num_cpus`/`num_gpus`; each sweep worker is one task running `run_sweep`.
Tasks inherit the launcher's MLflow/cache/offline environment through `runtime_env`.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shlex
import socket
import time
from pathlib import Path

from em_core import tags as em_tags
from em_core.errors import ConfigError, Terminated, raise_on_sigterm, sigterm_deferred
from em_core.paths import PROJECT_ROOT

log = logging.getLogger(__name__)
CLAIM_PREFIX = "em-claim."
# Environment the Ray tasks need from the launcher: where MLflow is, caches, offline switches.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "EM_LAB_CACHE", "EM_LAB_MLRUNS", "EM_LAB_ARTIFACT_ROOT",
                 "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "OPENAI_API_KEY",
                 "OPENAI_BASE_URL", "EM_LAB_NO_PROGRESS", "OMP_NUM_THREADS", "MLFLOW_ENABLE_ASYNC_LOGGING")


def claim_name(grid: str, label: str, identity: str) -> str:
    """Registered-model name of one cell's claim (pure): grid, cell and a hash of its params."""
    digest = hashlib.sha256(f"{grid}\0{label}\0{identity}".encode()).hexdigest()[:12]
    return f"{CLAIM_PREFIX}{grid}.{digest}"


def try_claim(name: str, label: str, run_id: str) -> bool:
    """Claim a cell for the launcher whose run is `run_id` (True), or find it claimed (False)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        client.create_registered_model(name, tags={em_tags.CLAIM: label, em_tags.CLAIMED_BY: _me(), em_tags.RUN_ID: run_id},
                                       description=f"claim on grid cell {label}: deleted when its launcher is done")
        return True
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e):
            raise
        return False


def release(name: str) -> None:
    import mlflow

    try:
        mlflow.MlflowClient().delete_registered_model(name)
    except Exception as e:  # already released or broken by someone else
        log.debug("claim %s: %s", name, e)


def claim_is_stale(name: str) -> bool:
    """A claim whose launcher's run has ended (KILLED, FAILED, or FINISHED without releasing
    it): the launcher is gone, so the cell is free again."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        run_id = client.get_registered_model(name).tags.get(em_tags.RUN_ID)
    except Exception:  # released meanwhile
        return False
    return bool(run_id) and client.get_run(run_id).info.status in ("KILLED", "FAILED", "FINISHED")


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def task_env() -> dict[str, str]:
    """The env vars a Ray task needs to import this checkout and reach the same MLflow store."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    path = [str(PROJECT_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def init_ray(address: str | None, num_cpus: float | None = None):
    try:
        import ray
    except ImportError as e:
        raise ConfigError("--launcher ray needs Ray: pip install 'em-lab[ray]'") from e
    if not ray.is_initialized():
        kwargs = {"runtime_env": {"env_vars": task_env()}, "include_dashboard": False,
                  "logging_level": logging.WARNING}
        if address:
            kwargs["address"] = address
        elif num_cpus:
            kwargs["num_cpus"] = int(num_cpus)
        ray.init(**kwargs)
        # ray.init() replaces the SIGTERM handler with its own (sys.exit, then an abort in Ray's
        # shutdown: exit 134, runs left RUNNING); put em's back, so SIGTERM unwinds as
        # `Terminated` and runs end KILLED, exit 143, as without Ray.
        raise_on_sigterm()
    return ray


def worker_died(error: BaseException) -> bool:
    """The task's worker process or node died (kill -9, OOM kill, lost node), as opposed to the
    task's own code raising (`RayTaskError`, whose runs already ended FAILED)."""
    try:
        from ray import exceptions as rx
    except ImportError:
        return False
    died = tuple(getattr(rx, n) for n in ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError",
                                          "ObjectLostError", "OutOfMemoryError", "RaySystemError")
                 if hasattr(rx, n))
    return isinstance(error, died) and not isinstance(error, rx.RayTaskError)


def _run_cell_task(pcfg, parent_run_id: str | None) -> str:
    """One grid cell inside a Ray worker: the pipeline as a child of the grid's summary run."""
    from em_core import tracking
    from em_core.experiments.pipeline import run_pipeline

    os.environ.pop("MLFLOW_RUN_ID", None)
    tracking.configure_tracking()
    if parent_run_id:
        with tracking.child_runs(parent_run_id):
            return run_pipeline(pcfg).run_id
    return run_pipeline(pcfg).run_id


def _run_sweep_task(cfg) -> dict:
    from em_core.experiments.sweep import run_sweep

    os.environ.pop("MLFLOW_RUN_ID", None)
    return run_sweep(cfg)


class RayCells:
    """Submits cells as Ray tasks; `wait` returns finished (cell key, run id or exception)."""

    def __init__(self, address: str | None, num_cpus: float, num_gpus: float):
        self.ray = init_ray(address)
        self.remote = self.ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(_run_cell_task)
        self.pending: dict = {}

    def submit(self, key: str, pcfg, parent_run_id: str | None) -> None:
        self.pending[self.remote.remote(pcfg, parent_run_id)] = key

    def wait(self) -> list[tuple[str, str | BaseException]]:
        if not self.pending:
            return []
        with sigterm_deferred():  # SIGTERM raised inside Ray's Cython calls would surface as SystemError
            done, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=2.0)
            out = []
            for ref in done:
                key = self.pending.pop(ref)
                try:
                    out.append((key, self.ray.get(ref)))
                except Exception as e:  # the cell's own code failed (runs FAILED) or its worker died
                    out.append((key, e))
        return out

    def cancel_all(self) -> list[str]:
        """Stop every pending task now (force: the workers are killed, so their runs are left
        RUNNING for the caller to end); returns their cell keys."""
        keys = list(self.pending.values())
        for ref in list(self.pending):
            try:
                self.ray.cancel(ref, force=True)
            except Exception as e:  # noqa: BLE001 -- already finished, or the cluster is gone
                log.debug("cancel %s: %s", ref, e)
        self.pending.clear()
        return keys


def sweep_on_ray(cfg) -> dict:
    """`cfg.workers` sweep workers as Ray tasks on one study; returns the info of the worker that
    closed the study's parent run (else the last one)."""
    import dataclasses

    ray = init_ray(cfg.ray_address)
    num_gpus = float(os.environ.get("EM_LAB_RAY_NUM_GPUS", "0") or 0)
    task = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=0)(_run_sweep_task)
    local = dataclasses.replace(cfg, launcher="local")
    t0 = time.time()
    refs = [task.remote(local) for _ in range(cfg.workers)]
    try:
        pending = refs
        while pending:  # short waits, so SIGTERM is raised here, not inside Ray's Cython (SystemError)
            with sigterm_deferred():
                _, pending = ray.wait(refs, num_returns=len(refs), timeout=2.0)
        with sigterm_deferred():
            infos = ray.get(refs)
    except (Terminated, KeyboardInterrupt) as stop:
        # not force: each worker gets KeyboardInterrupt, so its trial's run ends KILLED and its
        # Optuna trial FAIL, as a local worker's would; the shared parent stays for a rerun
        stopped_ms = int(time.time() * 1000)
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        with contextlib.suppress(Exception), sigterm_deferred():
            ray.wait(refs, num_returns=len(refs), timeout=30)
        if isinstance(stop, Terminated):
            _relabel_cancelled_trials(cfg, stopped_ms, f"{stop} (the Ray launcher cancelled this worker)")
        raise
    log.info("sweep %s: %d Ray workers done in %.1f s", cfg.study_name, cfg.workers, time.time() - t0)
    closer = next((i for i in infos if i.get("parent_closed")), infos[-1])
    return {**closer, "workers": len(infos)}


def _relabel_cancelled_trials(cfg, since_ms: int, reason: str) -> None:
    """A cancelled worker sees only a KeyboardInterrupt and records "interrupted (Ctrl-C)"; the
    launcher knows it was SIGTERM and says so on the trial runs that ended from then on."""
    import mlflow

    client = mlflow.MlflowClient()
    with contextlib.suppress(Exception):  # bookkeeping on the way out: never mask the signal
        exp = client.get_experiment_by_name(cfg.experiment_name)
        runs = client.search_runs([exp.experiment_id], f"tags.`{em_tags.SWEEP}` = '{cfg.study_name}' "
                                                       "and attributes.status = 'KILLED'", max_results=1000)
        for r in runs:
            if (r.info.end_time or 0) >= since_ms and r.data.tags.get(em_tags.KILLED_REASON) == "interrupted (Ctrl-C)":
                client.set_tag(r.info.run_id, em_tags.KILLED_REASON, reason)


def slurm_array_script(commands: list[str], name: str, num_cpus: float, num_gpus: float,
                       workdir: Path = PROJECT_ROOT) -> str:
    """A Slurm job-array script running command i as array task i (pure)."""
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name=em-grid-{name}", f"#SBATCH --array=0-{len(commands) - 1}",
             f"#SBATCH --cpus-per-task={max(1, int(num_cpus))}"]
    if num_gpus:
        lines.append(f"#SBATCH --gpus-per-task={int(num_gpus)}")
    lines += [f"#SBATCH --output=em-grid-{name}-%A_%a.log", "# Every task needs MLFLOW_TRACKING_URI pointing at the "
              "shared server (docs/scale-out.md).", "set -euo pipefail", f"cd {shlex.quote(str(workdir))}",
              "CELLS=("]
    lines += [f"  {shlex.quote(c)}" for c in commands]
    lines += [")", 'eval "${CELLS[$SLURM_ARRAY_TASK_ID]}"', ""]
    return "\n".join(lines)
