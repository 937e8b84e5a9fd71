"""The faults a shared cluster produces, against real processes: a preempted Ray launcher
(SIGTERM), a dead Ray worker (kill -9), a PostgreSQL restart under a 2-worker sweep, an
unreachable tracking server. Each backs one row of docs/scale-out.md, "What survives what"."""
from __future__ import annotations

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
    """The next RUNNING train run (not in `seen`) of a grid cell, once its loop is under way."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        fresh = [r for r in _runs(experiment, "tags.`em.pipeline_step` = 'train' and attributes.status = 'RUNNING'")
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
