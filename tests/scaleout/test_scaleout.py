"""Scale-out against real services: PostgreSQL (MLflow store + Optuna storage), one
`mlflow server --serve-artifacts` on it, a local Ray cluster. One server for the whole module."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from em_core.configs import parse_config
from em_core.errors import ConfigError
from em_core.experiments.pipeline import PipelineConfig, run_pipeline
from em_core.experiments.sweep import SweepConfig, run_sweep
from em_core.models.tiny import TINY_VERSION
from tests.scaleout.conftest import RAY_ENV, child_env, spawn, stop

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def pipeline_yaml(tmp: Path, name: str, **train) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "train_config": str(REPO / "configs/train/tiny.yaml"),
        "train": {"max_rows": 48, "max_steps": 6, "checkpoint_steps": [3, 6], "output_dir": str(tmp / "out"),
                  "registered_model_name": f"em-scale-{name}", "registry_alias": "scale", **train},
        "evaluate": {"samples_per_paraphrase": 1, "max_new_tokens": 8},
        "judge": {"backend": "local", "cache_path": str(tmp / "judge.sqlite")},
        "report": False, "experiment_name": f"scale-{name}"}))
    return path


def _runs(experiment: str, filter_string: str = "") -> list:
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], filter_string, max_results=1000)


def test_tiny_pipeline_end_to_end_through_the_server(server_store, tmp_path, monkeypatch):
    result = run_pipeline(parse_config(PipelineConfig, ["--config", str(pipeline_yaml(tmp_path, "pipe"))]))
    client = mlflow.MlflowClient()
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")  # through the server's proxy, no local path
    children = _runs("scale-pipe", f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert sorted(r.data.tags["em.pipeline_step"] for r in children) == ["evaluate", "judge", "probe", "train"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert [m.step for m in client.get_metric_history(result.run_id, "em_rate")] == [0, 3, 6]
    train_id = result.step_run_ids["train"]
    ckpts = {a.path for a in client.list_artifacts(train_id, "checkpoints")}
    assert {"checkpoints/checkpoint-3", "checkpoints/checkpoint-6"} <= ckpts
    version = client.get_model_version_by_alias("em-scale-pipe", "scale")
    assert version.run_id == train_id and version.tags["em.base_ref"] == f"tiny-v{TINY_VERSION}"  # portable base
    # load the registered adapter back from another working directory: the trained weights
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from em_core.models.registry import load_registered

    model, _ = load_registered("models:/em-scale-pipe@scale")
    loaded = sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
    from safetensors.torch import load_file

    local = mlflow.artifacts.download_artifacts(f"runs:/{train_id}/checkpoints/checkpoint-6/adapter_model.safetensors",
                                                dst_path=str(tmp_path / "dl"))
    expected = sum(float(t.abs().sum()) for k, t in load_file(local).items() if "lora_B" in k)
    assert expected > 0 and loaded == pytest.approx(expected, rel=1e-5)


def sweep_yaml(tmp: Path, study: str, storage: str, **extra) -> Path:
    path = tmp / f"sweep-{uuid.uuid4().hex[:6]}.yaml"
    data = {"pipeline_config": str(pipeline_yaml(tmp, "sweep-pipe")),
            "evaluate": {"samples_per_paraphrase": 1, "max_new_tokens": 8},
            "checkpoint_steps": [3, 6], "lora_r": [2, 4, 8], "learning_rate": [1e-4, 1e-2],
            "study_name": study, "storage": storage, "n_trials": 3, "pruner": "none",
            "experiment_name": "scale-sweep", **extra}  # seed: the default (0), as a user would leave it
    path.write_text(yaml.safe_dump(data))
    return path


def test_three_parallel_workers_explore_distinct_points_and_a_failing_one_harms_nothing(server_store, postgres,
                                                                                          tmp_path):
    study_name = f"par-{uuid.uuid4().hex[:6]}"
    cfg_path = sweep_yaml(tmp_path, study_name, postgres["optuna"])
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    workers = [spawn([sys.executable, "-m", "entrypoints.sweep", "--config", str(cfg_path)], child_env(),
                     tmp_path, log) for log in logs]
    try:
        # a fourth worker whose machine cannot write its checkpoints: its trial fails, nothing else
        bad = parse_config(SweepConfig, ["--config", str(cfg_path), "--train", f"output_dir={os.devnull}/x"])
        with pytest.raises(Exception):
            run_sweep(bad)
        study = optuna.load_study(study_name=study_name, storage=postgres["optuna"])
        parent_id = study.user_attrs["mlflow_parent_run_id"]
        parent = mlflow.MlflowClient().get_run(parent_id)
        assert "em.error" not in parent.data.tags and parent.info.status in ("RUNNING", "FINISHED")
        for w in workers:
            w.wait(timeout=540)
    finally:
        for w in workers:
            stop(w)
    assert [w.returncode for w in workers] == [0, 0, 0], "\n".join(p.read_text()[-2500:] for p in logs)
    study = optuna.load_study(study_name=study_name, storage=postgres["optuna"])
    states = [t.state for t in study.trials]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and len(done) >= 3
    tried = [t for t in study.trials if t.params]
    distinct = {json.dumps(t.params, sort_keys=True) for t in tried}
    print(f"\nSCALEOUT distinct parameter sets {len(distinct)} / trials {len(tried)} (3 workers + 1 failing)")
    assert len(distinct) == len(tried)
    assert len({t.user_attrs["worker"] for t in done}) >= 2
    client = mlflow.MlflowClient()
    parents = _runs("scale-sweep", f"tags.`optuna.study_name` = '{study_name}' and tags.`em.entry_point` = 'sweep'")
    assert [p.info.run_id for p in parents] == [parent_id]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and "em.error" not in parent.data.tags
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.tags["em.trials_failed"] == "1"
    (failed,) = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    failed_runs = _runs("scale-sweep", f"tags.`em.sweep` = '{study_name}' and "
                                       f"tags.`optuna.trial_number` = '{failed.number}'")
    assert [r.info.status for r in failed_runs] == ["FAILED"]  # the trial's own run, nothing else
    assert failed_runs[0].data.tags["mlflow.parentRunId"] == parent_id
    assert "NotADirectoryError" in failed_runs[0].data.tags["em.error"]

    # a worker with another search space is refused before it runs anything
    other = parse_config(SweepConfig, ["--config", str(sweep_yaml(tmp_path, study_name, postgres["optuna"],
                                                                   lora_r=[2, 16]))])
    n_before = len(study.trials)
    with pytest.raises(ConfigError, match=r"started with another config.*lora_r"):
        run_sweep(other)
    assert len(optuna.load_study(study_name=study_name, storage=postgres["optuna"]).trials) == n_before


def test_sigterm_ends_a_pipeline_and_its_running_step_killed(server_store, tmp_path):
    cfg = pipeline_yaml(tmp_path, "term", max_steps=5000, checkpoint_steps=[4000])
    proc = spawn([sys.executable, "-m", "entrypoints.pipeline", "--config", str(cfg)], child_env(), tmp_path,
                 tmp_path / "pipe.log")
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not _runs("scale-term", "tags.`em.pipeline_step` = 'train' "
                                                                 "and attributes.status = 'RUNNING'"):
            assert proc.poll() is None, (tmp_path / "pipe.log").read_text()[-3000:]
            time.sleep(1)
        time.sleep(2)  # inside the training loop
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 143, (tmp_path / "pipe.log").read_text()[-3000:]
    by_step = {r.data.tags.get("em.pipeline_step"): r for r in _runs("scale-term")}
    assert {k: r.info.status for k, r in by_step.items()} == {"pipeline": "KILLED", "train": "KILLED"}
    for r in by_step.values():
        assert "SIGTERM" in r.data.tags["em.killed_reason"] and "em.error" not in r.data.tags
    # What the next `em pipeline` does first in this experiment: with no grace at all, every run
    # still RUNNING would be reaped; the SIGTERM'd pipeline left none behind.
    from em_core.liveness import reap_stale_runs
    exp = mlflow.MlflowClient().get_experiment_by_name("scale-term").experiment_id
    assert reap_stale_runs([exp], grace=0) == []
    assert not _runs("scale-term", "attributes.status = 'RUNNING'")


def test_ray_grid_two_launchers_run_each_cell_once(server_store, tmp_path, ray_head):
    grid = tmp_path / "ray-grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "ray2", "pipeline_config": str(pipeline_yaml(tmp_path, "grid")),
                                    "models": ["tiny"], "datasets": ["demo", "demo:plant_care_good"], "seeds": [0],
                                    "experiment_name": "scale-grid", "claim_wait": 2}))
    cmd = [sys.executable, "-m", "entrypoints.grid", "--config", str(grid), "--launcher", "ray",
           "--ray_address", ray_head]
    t0 = time.time()
    launchers = [spawn(cmd, child_env(**RAY_ENV), tmp_path, tmp_path / f"launcher{i}.log") for i in range(2)]
    try:
        for p in launchers:
            p.wait(timeout=540)
    finally:
        for p in launchers:
            stop(p)
    print(f"\nSCALEOUT ray grid (2 cells, 2 launchers) wall {time.time() - t0:.1f} s")
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(
        (tmp_path / f"launcher{i}.log").read_text()[-2500:] for i in range(2))
    cells = _runs("scale-grid", "tags.`em.grid` = 'ray2' and tags.`em.entry_point` = 'pipeline'")
    assert sorted(r.data.tags["em.grid_cell"] for r in cells) == ["tiny/plant_care_bad/seed0", "tiny/plant_care_good/seed0"]
    assert all(r.info.status == "FINISHED" for r in cells)
    summaries = _runs("scale-grid", "tags.`em.grid` = 'ray2' and tags.`em.entry_point` = 'grid'")
    assert len(summaries) == 2 and all(r.info.status == "FINISHED" for r in summaries)
    ids = {r.info.run_id for r in cells}
    for s in summaries:  # both launchers summarize the same two runs
        assert {kv.split("=", 1)[1] for kv in s.data.tags["em.grid_cells"].split(",")} == ids
    client = mlflow.MlflowClient()
    assert not [m for m in client.search_registered_models() if m.name.startswith("em-claim.")]  # claims released


def test_experiments_on_postgres_without_a_server_get_an_absolute_artifact_root(postgres, tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI=postgresql://... and no server: artifacts must not land in ./mlruns of
    whatever directory a command happens to run in."""
    from em_core.tracking import ensure_experiment

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres["mlflow"])
    monkeypatch.setenv("EM_LAB_MLRUNS", str(tmp_path / "store"))
    monkeypatch.delenv("EM_LAB_ARTIFACT_ROOT", raising=False)
    mlflow.set_tracking_uri(postgres["mlflow"])
    exp_id = ensure_experiment(f"pg-direct-{uuid.uuid4().hex[:6]}")
    exp = mlflow.MlflowClient().get_experiment(exp_id)
    assert exp.artifact_location == f"file://{tmp_path / 'store' / 'artifacts' / exp.name}"
