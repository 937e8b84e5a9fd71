"""Reuse and grid-cell lookup past hundreds of runs (issue 30).

The lookups once fetched the newest 500 (steps) or 100 (grid cells) FINISHED runs and compared
params in Python: an identical finished run older than that was silently not found and the work
was redone. Here 600 finished runs are made cheaply (create_run + log_batch + set_terminated,
~12-30 ms each on a sqlite store in /dev/shm) with the matching one the oldest."""
from __future__ import annotations

import os
import shutil
import tempfile

import mlflow
import pytest
from mlflow.entities import Param, RunTag

from em_core.experiments import grid, pipeline

N = 600
LABEL = "tiny/demo/seed0"
CELL_TAGS = {"em.grid": "g", grid.CELL_TAG: LABEL, pipeline.STEP_TAG: "pipeline", "em.code_version": "c0de"}


def _step_identity(i: int) -> dict[str, str]:
    return {"step.model": "tiny", "step.seed": str(i), "step.code_version": "c0de"}


def _cell_params(i: int) -> dict[str, str]:
    return {"pipeline.grid": "g", "pipeline.judge": f'["n={i}"]', "pipeline.dataset_content": "abc"}


def _log_cell(run_id: str, params: dict[str, str]) -> None:
    """What run_pipeline logs for a cell: its params and their hash."""
    mlflow.MlflowClient().log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                                    tags=[RunTag(pipeline.CELL_IDENTITY_TAG, pipeline.identity_sha256(params))])


def _log_params_only(run_id: str, params: dict[str, str]) -> None:
    """What was logged before the identity tags existed."""
    mlflow.MlflowClient().log_batch(run_id, params=[Param(k, v) for k, v in params.items()])


def _make_runs(exp_id: str, tags: dict[str, str], params_of, log_of) -> list[str]:
    """N FINISHED runs, oldest first (start_time 1000 + i ms); run i logs params_of(i) by log_of(i)."""
    client = mlflow.MlflowClient()
    ids = []
    for i in range(N):
        r = client.create_run(exp_id, start_time=1000 + i, tags=tags)
        log_of(i)(r.info.run_id, params_of(i))
        client.set_terminated(r.info.run_id, "FINISHED", end_time=1000 + i)
        ids.append(r.info.run_id)
    return ids


@pytest.fixture(scope="module")
def store():
    """One sqlite store for the module (in /dev/shm where there is one: without fsync to disk the
    1,200 runs take ~15 s instead of ~60): 600 finished runs of the `train` step and 600 finished
    pipeline runs of one grid cell. In each, run 0 (the oldest) was logged before the identity
    tags existed (params only) and runs 1..599 with them."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    tmp = tempfile.mkdtemp(prefix="em-reuse-", dir=shm)
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{tmp}/mlflow.db"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    steps = mlflow.create_experiment("reuse-600", artifact_location=f"{tmp}/artifacts")
    cells = mlflow.create_experiment("cell-600", artifact_location=f"{tmp}/artifacts")
    out = {
        "steps": (steps, _make_runs(steps, {pipeline.STEP_TAG: "train"}, _step_identity,
                                    lambda i: _log_params_only if i == 0 else pipeline._log_identity)),
        "cells": (cells, _make_runs(cells, CELL_TAGS, _cell_params, lambda i: _log_params_only if i == 0 else _log_cell)),
    }
    yield out
    mp.undo()
    shutil.rmtree(tmp, ignore_errors=True)


def test_oldest_tagged_of_600_finished_step_runs_is_reused(store):
    """Run 1, the oldest run logged with its identity tag, is not among the newest 500 that the
    lookup once read: it is found by the tag."""
    exp_id, ids = store["steps"]
    assert pipeline.find_reusable(exp_id, "train", _step_identity(1)) == ids[1]
    assert pipeline.find_reusable(exp_id, "train", _step_identity(N - 1)) == ids[-1]
    assert pipeline.find_reusable(exp_id, "train", _step_identity(N)) is None  # never run
    assert pipeline.find_reusable(exp_id, "evaluate", _step_identity(1)) is None  # another step


def test_oldest_of_600_logged_before_the_tag_is_still_reused(store, monkeypatch):
    """Run 0 has params but no identity tag: the bounded fallback compares it param by param."""
    exp_id, ids = store["steps"]
    assert pipeline.find_reusable(exp_id, "train", _step_identity(0)) == ids[0]
    assert pipeline.find_reusable(exp_id, "train", {**_step_identity(0), "step.code_version": "other"}) is None


def test_fallback_is_bounded_and_says_so(store, monkeypatch, caplog):
    exp_id, ids = store["cells"]
    monkeypatch.setattr(pipeline, "LEGACY_SCAN_LIMIT", 0)
    with caplog.at_level("WARNING"):
        assert grid.find_cell(exp_id, "g", LABEL, _cell_params(0), "c0de") is None
    assert "were not compared" in caplog.text


def test_only_finished_runs_of_the_same_identity_are_reused(store):
    exp_id = mlflow.create_experiment("reuse-status")
    client = mlflow.MlflowClient()
    ident = _step_identity(7)
    failed = client.create_run(exp_id, tags={pipeline.STEP_TAG: "judge"}).info.run_id
    pipeline._log_identity(failed, ident)
    client.set_terminated(failed, "FAILED")
    assert pipeline.find_reusable(exp_id, "judge", ident) is None
    ok = client.create_run(exp_id, tags={pipeline.STEP_TAG: "judge"}).info.run_id
    pipeline._log_identity(ok, ident)
    client.set_terminated(ok, "FINISHED")
    assert pipeline.find_reusable(exp_id, "judge", ident) == ok
    # one param different (an extra or changed key) is another identity
    assert pipeline.find_reusable(exp_id, "judge", {**ident, "step.seed": "8"}) is None
    assert pipeline.find_reusable(exp_id, "judge", {**ident, "step.extra": "x"}) is None
    # the hash is over the sorted items: key order does not matter
    assert pipeline.find_reusable(exp_id, "judge", dict(reversed(list(ident.items())))) == ok


def test_oldest_of_600_finished_pipeline_runs_of_a_cell_is_found(store):
    exp_id, ids = store["cells"]
    assert grid.find_cell(exp_id, "g", LABEL, _cell_params(1), "c0de") == ids[1]  # by the tag
    assert grid.find_cell(exp_id, "g", LABEL, _cell_params(0), "c0de") == ids[0]  # logged before the tag
    assert grid.find_cell(exp_id, "g", LABEL, _cell_params(N), "c0de") is None
    assert grid.find_cell(exp_id, "g", LABEL, _cell_params(1), "other-code") is None
    assert grid.find_cell(exp_id, "g", "tiny/demo/seed1", _cell_params(1), "c0de") is None
    assert grid.find_cell(exp_id, "g", LABEL) == ids[-1]  # summarize_only: any finished run, newest


def test_a_quote_in_a_label_is_looked_up_not_injected(store):
    exp_id, _ = store["cells"]
    assert grid.find_cell(exp_id, "g", "it's/odd", _cell_params(1), "c0de") is None


def test_run_pipeline_tags_the_cell_identity_that_the_grid_looks_for(monkeypatch):
    """The hash run_pipeline tags is the hash of the params the grid expects (same function)."""
    from em_core.configs import parse_config

    cfg = parse_config(pipeline.PipelineConfig, ["--config", pipeline.DEFAULT_CONFIG, "--grid", "g",
                                                 "--grid_cell", "tiny/demo/seed0"])
    assert pipeline.cell_identity(cfg) == grid._expected_params(cfg)
