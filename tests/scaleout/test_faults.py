"""The faults a shared cluster produces, against real processes: a preempted Ray launcher
(SIGTERM), a dead Ray worker (kill -9), a PostgreSQL restart under a 2-worker sweep, an
unreachable tracking server. Each backs one row of docs/scale-out.md, "What survives what"."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.scaleout.conftest import RAY_ENV, child_env, spawn, stop
from tests.scaleout.test_scaleout import _runs, pipeline_yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def _ray_grid(tmp_path: Path, name: str, ray_address: str, **extra) -> list[str]:
    """`em grid ... --launcher ray` on a one-cell grid whose training would take minutes."""
    grid = tmp_path / f"{name}-grid.yaml"
    grid.write_text(yaml.safe_dump({
        "name": name, "pipeline_config": str(pipeline_yaml(tmp_path, name, max_steps=5000, checkpoint_steps=[4000])),
        "models": ["tiny"], "datasets": ["demo"], "seeds": [0], "experiment_name": f"scale-{name}",
        "claim_wait": 1, **extra}))
    return [sys.executable, "-m", "entrypoints.grid", "--config", str(grid), "--launcher", "ray",
            "--ray_address", ray_address]


def _wait_for_training(experiment: str, proc, log: Path, seen: set[str], timeout: float = 300):
    """The next RUNNING train run (not in `seen`) of a grid cell or sweep trial, once its loop is
    under way."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        fresh = [r for r in _runs(experiment, "tags.`em.entry_point` = 'train' and attributes.status = 'RUNNING'")
                 if r.info.run_id not in seen]
        if fresh:
            seen.add(fresh[0].info.run_id)
            time.sleep(2)  # inside the training loop
            return fresh[0]
        time.sleep(1)
    raise AssertionError(f"no train run started:\n{log.read_text()[-3000:]}")


def test_sigterm_to_the_ray_grid_launcher_ends_every_run_killed(server_store, tmp_path, ray_head):
    cmd = _ray_grid(tmp_path, "rayterm", ray_head)
    log = tmp_path / "launcher.log"
    proc = spawn(cmd, child_env(**RAY_ENV), tmp_path, log)
    try:
        _wait_for_training("scale-rayterm", proc, log, set())
        proc.send_signal(signal.SIGTERM)  # the launcher only, as a scheduler's time limit would
        proc.wait(timeout=120)
    finally:
        stop(proc)
    out = log.read_text()
    runs = _runs("scale-rayterm")
    states = sorted((r.data.tags.get("em.entry_point"), r.info.status) for r in runs)
    print(f"\nFAULT sigterm ray launcher: exit {proc.returncode}, runs {states}")
    assert proc.returncode == 143, out[-3000:]
    assert states == [("grid", "KILLED"), ("pipeline", "KILLED"), ("train", "KILLED")]
    for r in runs:
        assert "SIGTERM" in r.data.tags["em.killed_reason"] and "em.error" not in r.data.tags
    assert not [m for m in mlflow.MlflowClient().search_registered_models() if m.name.startswith("em-claim.rayterm")]


def test_a_dead_ray_worker_is_retried_then_the_grid_says_its_runs_were_killed(server_store, tmp_path, ray_head):
    cmd = _ray_grid(tmp_path, "raydead", ray_head, cell_retries=1)
    log = tmp_path / "launcher.log"
    proc = spawn(cmd, child_env(**RAY_ENV), tmp_path, log)
    seen: set[str] = set()
    try:
        for _ in range(2):  # the first death is retried (cell_retries=1), the second is not
            train = _wait_for_training("scale-raydead", proc, log, seen)
            os.kill(int(train.data.tags["em.process"].rpartition("|")[2]), signal.SIGKILL)  # the Ray worker
        proc.wait(timeout=120)
    finally:
        stop(proc)
    out = log.read_text()
    runs = _runs("scale-raydead")
    states = sorted((r.data.tags.get("em.entry_point"), r.info.status) for r in runs)
    print(f"\nFAULT kill -9 ray worker: exit {proc.returncode}, runs {states}\n{out[-600:]}")
    assert proc.returncode == 2, out[-3000:]
    assert "tiny/plant_care_bad/seed0: its Ray worker died 2 time(s)" in out and "were marked KILLED" in out
    # two attempts, each a pipeline run and its train run, all ended KILLED with the reason
    assert states == [("grid", "FAILED"), ("pipeline", "KILLED"), ("pipeline", "KILLED"),
                      ("train", "KILLED"), ("train", "KILLED")]
    for r in runs:
        if r.data.tags.get("em.entry_point") != "grid":
            assert "Ray worker died" in r.data.tags["em.killed_reason"]
    assert not [m for m in mlflow.MlflowClient().search_registered_models() if m.name.startswith("em-claim.raydead")]


def _running_trials(url: str, study: str) -> int:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            return conn.execute("select count(*) from trials join studies using (study_id) where study_name = %s "
                                "and state = 'RUNNING'", (study,)).fetchone()[0]
    except psycopg.Error:  # tables not created yet
        return 0


def test_a_postgres_restart_under_a_two_worker_sweep_loses_nothing(server_store, private_postgres, tmp_path,
                                                                    monkeypatch):
    import optuna
    import psycopg

    from tests.scaleout.test_scaleout import sweep_yaml

    monkeypatch.setenv("PGUSER", "emlab")  # the documented way: no credentials in the URL
    with psycopg.connect(private_postgres.url(), autocommit=True) as conn:
        conn.execute("create database optuna")
    storage = private_postgres.url("optuna")
    study_name = "pg-restart"
    cfg = sweep_yaml(tmp_path, study_name, storage, n_trials=4, pruner="median", pruner_startup_trials=1)
    cmd = [sys.executable, "-m", "entrypoints.sweep", "--config", str(cfg), "--storage", storage]  # as documented
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = [spawn(cmd, child_env(PGUSER="emlab"), tmp_path, log) for log in logs]
    try:
        deadline = time.time() + 300
        while _running_trials(storage, study_name) < 1:  # a trial in flight (not the workers' marker study)
            assert time.time() < deadline and all(w.poll() is None for w in workers), \
                "\n".join(p.read_text()[-2000:] for p in logs)
            time.sleep(1)
        private_postgres.stop()  # as `pg_ctlcluster 15 main stop` would: sessions end with AdminShutdown
        time.sleep(20)
        private_postgres.start()
        for w in workers:
            w.wait(timeout=480)
    finally:
        for w in workers:
            stop(w)
    out = "\n".join(p.read_text() for p in logs)
    study = optuna.load_study(study_name=study_name, storage=storage)
    states = [t.state.name for t in study.trials]
    runs = {r.data.tags["optuna.trial_number"]: r for r in _runs("scale-sweep", f"tags.`em.sweep` = '{study_name}'")}
    pairs = sorted((t.number, t.state.name, runs[str(t.number)].info.status if str(t.number) in runs else None)
                   for t in study.trials)
    print(f"\nFAULT postgres restart: exits {[w.returncode for w in workers]}, trials/runs {pairs}")
    assert [w.returncode for w in workers] == [0, 0], out[-5000:]
    assert "is unreachable" in out and "is back after" in out
    assert "RUNNING" not in states and "FAIL" not in states and states.count("COMPLETE") + states.count("PRUNED") >= 4
    agree = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    assert all(run == agree[state] for _, state, run in pairs), pairs  # every trial has its run, in the same state
    assert len(runs) == len(study.trials)
    settings = [json.dumps(t.params, sort_keys=True) for t in study.trials]
    assert len(set(settings)) == len(settings)  # no setting rerun
    parent = mlflow.MlflowClient().get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and "em.heartbeat" in parent.data.tags  # reapable like any run
    assert "em.process" not in parent.data.tags  # shared by the workers: no one process owns it


def test_a_down_tracking_server_is_said_once_while_mlflow_retries(tmp_path):
    import socket
    import subprocess

    with socket.socket() as s:  # a port nobody listens on: the server is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = child_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", MLFLOW_HTTP_REQUEST_MAX_RETRIES="3",
                    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1", MLFLOW_HTTP_REQUEST_BACKOFF_JITTER="0", EM_LAB_MLRUNS=str(tmp_path / "mlruns"))
    env.pop("EM_LAB_VERBOSE", None)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "em_core.cli", "runs", "reap"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    print(f"\nFAULT tracking server down: exit {proc.returncode} after {time.time() - t0:.1f} s\n{out[-1500:]}")
    assert proc.returncode != 0
    notice = f"the MLflow tracking server at 127.0.0.1:{port} is unreachable ([Errno 111] Connection refused)"
    assert out.count(notice) == 1, out[-3000:]  # said once, though MLflow retried 3 times
    assert "Retrying (Retry(" not in out  # urllib3's own lines stay quiet


def test_sigterm_to_the_ray_sweep_launcher_ends_its_trials_killed(server_store, tmp_path, ray_head):
    """`em sweep --launcher ray` under a scheduler's SIGTERM ends as the grid launcher does: exit
    143, the trial's run KILLED with the SIGTERM reason, its Optuna trial FAIL (not RUNNING, which
    a later worker would take for a live one until the heartbeat grace)."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({
        "pipeline_config": str(pipeline_yaml(tmp_path, "sweepterm")), "checkpoint_steps": [4000],
        "lora_r": [2], "learning_rate": [1e-3, 1e-2], "objective": "final_probe_margin",
        "probe_sets": ["plant_care"], "study_name": "sweepterm", "storage": storage, "n_trials": 1,
        "pruner": "none", "experiment_name": "scale-sweepterm"}))
    cmd = [sys.executable, "-m", "entrypoints.sweep", "--config", str(cfg), "--launcher", "ray",
           "--workers", "1", "--ray_address", ray_head]
    log = tmp_path / "launcher.log"
    proc = spawn(cmd, child_env(**RAY_ENV), tmp_path, log)
    try:
        _wait_for_training("scale-sweepterm", proc, log, set())
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        stop(proc)
    out = log.read_text()
    trials = optuna.load_study(study_name="sweepterm", storage=storage).trials
    runs = _runs("scale-sweepterm", "tags.`em.entry_point` = 'train'")
    print(f"\nFAULT sigterm ray sweep launcher: exit {proc.returncode}, trials {[t.state.name for t in trials]}, "
          f"trial runs {[r.info.status for r in runs]}")
    assert proc.returncode == 143, out[-3000:]
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL]
    assert [r.info.status for r in runs] == ["KILLED"]
    assert "SIGTERM" in runs[0].data.tags["em.killed_reason"]
