"""The default sqlite store under parallel first use, and a store that cannot be opened."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from em_core import tracking
from em_core.errors import StoreError

REPO = Path(__file__).resolve().parents[1]
WORKER = """
import sys, time
import mlflow
from em_core import tracking
t0 = float(sys.argv[1])
while time.time() < t0:  # all three open the fresh store at the same moment
    time.sleep(0.002)
with tracking.tracked_run("race", run_name=sys.argv[2]):
    mlflow.log_metric("x", float(sys.argv[2]))
"""


def test_three_processes_on_a_fresh_default_store_all_finish(tmp_path):
    store = tmp_path / "mlruns"  # does not exist yet
    env = dict(os.environ, EM_LAB_MLRUNS=str(store), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_RUN_ID", None)
    t0 = time.time() + 20  # after every child has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(t0), str(i)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for i in range(3)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240))
        finally:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted((r.info.run_name, r.info.status, r.data.metrics["x"]) for r in runs) == [
        ("0", "FINISHED", 0.0), ("1", "FINISHED", 1.0), ("2", "FINISHED", 2.0)]


def test_unopenable_store_is_a_clear_error_with_the_fix(tmp_path, monkeypatch):
    db = tmp_path / "broken" / "mlflow.db"
    db.parent.mkdir()
    db.write_bytes(b"this is not a sqlite database" * 100)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with pytest.raises(StoreError) as err:
        tracking.configure_tracking()
    msg = str(err.value)
    assert f"cannot open the MLflow store {db}" in msg
    assert f"mlflow db upgrade sqlite:///{db}" in msg and f"move {db} aside" in msg
