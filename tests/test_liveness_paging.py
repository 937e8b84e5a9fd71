"""kill_running_runs reaches every child, not the newest 1000 (issue 30: search_runs with
max_results stops silently). 1,006 children made cheaply in a /dev/shm sqlite store."""
from __future__ import annotations

import os
import shutil
import tempfile

import mlflow
import pytest

from em_core import liveness


@pytest.fixture
def fast_store(monkeypatch):
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    tmp = tempfile.mkdtemp(prefix="em-live-", dir=shm)
    uri = f"sqlite:///{tmp}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def test_running_child_older_than_1000_finished_siblings_is_killed(fast_store):
    client = mlflow.MlflowClient()
    exp = client.create_experiment("live", artifact_location=f"{fast_store}/a")
    parent = client.create_run(exp, start_time=1).info.run_id
    child = {"mlflow.parentRunId": parent}
    running = client.create_run(exp, start_time=2, tags=child).info.run_id  # the oldest child
    grandchild = client.create_run(exp, start_time=3, tags={"mlflow.parentRunId": running}).info.run_id
    for i in range(1005):
        r = client.create_run(exp, start_time=10 + i, tags=child).info.run_id
        client.set_terminated(r, "FINISHED")
    killed = liveness.kill_running_runs(exp, parent, "test: worker died")
    assert sorted(killed) == sorted([running, grandchild])
    assert client.get_run(running).info.status == "KILLED"
    assert client.get_run(running).data.tags[liveness.KILLED_REASON_TAG] == "test: worker died"
