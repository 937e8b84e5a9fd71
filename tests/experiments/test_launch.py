"""Scale-out pieces that need no server: worker seeds, study fingerprints, cell claims, Slurm
arrays, artifact roots of database stores, SIGTERM -> KILLED runs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from em_core.configs import parse_config
from em_core.experiments import launch
from em_core.experiments.grid import GridConfig, run_grid
from em_core.experiments.sweep import (
    SweepConfig,
    _base_pipeline,
    _differences,
    join_study,
    make_sampler,
    make_study,
    study_fingerprint,
    worker_seed,
)
from em_core.tracking import default_artifact_location

REPO = Path(__file__).resolve().parents[2]


def test_worker_seeds_differ_and_worker_zero_keeps_the_configured_one():
    assert worker_seed(0, 0) == 0 and worker_seed(7, 0) == 7 and worker_seed(None, 5) is None
    assert len({worker_seed(0, i) for i in range(100)}) == 100
    assert worker_seed(0, 3) == worker_seed(0, 3) != worker_seed(1, 3)  # reproducible per (seed, worker)


def test_workers_joining_one_study_get_distinct_indices_and_first_points(tmp_path):
    cfg = SweepConfig(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="j", n_trials=6)
    fp = study_fingerprint(cfg, _base_pipeline(cfg))
    points = []
    for expected_index in range(3):  # three workers with the same config and the default seed 0
        study = make_study(cfg)
        index, parent = join_study(study, cfg, fp, wait=1)
        assert index == expected_index and parent == (None if index == 0 else "p")
        if index == 0:
            study.set_user_attr("mlflow_parent_run_id", "p")  # worker 0 publishes its parent run
        study.sampler = make_sampler(cfg, worker_seed(cfg.seed, index))
        trial = study.ask()
        points.append((trial.suggest_categorical("lora_r", cfg.lora_r),
                       trial.suggest_float("learning_rate", *cfg.learning_rate, log=True)))
    assert len(set(points)) == 3


def test_fingerprint_ignores_machine_local_fields_and_names_real_differences(tmp_path):
    a = SweepConfig(storage="sqlite:///a.db", study_name="f")
    b = SweepConfig(storage="sqlite:///b.db", study_name="f", n_trials=50, seed=3, train=["output_dir=/elsewhere"],
                    judge=["cache_path=/x.sqlite"])
    assert study_fingerprint(a, _base_pipeline(a))[0] == study_fingerprint(b, _base_pipeline(b))[0]
    c = SweepConfig(study_name="f", lora_r=[2, 16], train=["max_rows=10"])
    fa, fc = study_fingerprint(a, _base_pipeline(a)), study_fingerprint(c, _base_pipeline(c))
    assert fa[0] != fc[0]
    diff = _differences(fa[1], fc[1])
    assert "sweep.lora_r: study has [1, 4, 16, 64], this worker [2, 16]" in diff
    assert any(d.startswith("train.max_rows:") for d in diff)


def test_database_stores_get_an_absolute_artifact_root(tmp_path, monkeypatch):
    monkeypatch.setenv("EM_LAB_MLRUNS", str(tmp_path / "store"))
    monkeypatch.delenv("EM_LAB_ARTIFACT_ROOT", raising=False)
    pg = default_artifact_location("postgresql://u:p@db:5432/mlflow", "exp", cwd="/somewhere")
    assert pg == f"file://{tmp_path / 'store' / 'artifacts' / 'exp'}"
    monkeypatch.setenv("EM_LAB_ARTIFACT_ROOT", "s3://bucket/em")
    assert default_artifact_location("mysql+pymysql://db/m", "exp") == "s3://bucket/em/exp"
    monkeypatch.setenv("EM_LAB_ARTIFACT_ROOT", "rel/arts")
    assert default_artifact_location("postgresql+psycopg://db/m", "e", cwd="/w") == "file:///w/rel/arts/e"
    assert default_artifact_location("sqlite:///runs/m.db", "e", cwd="/w") == "file:///w/runs/artifacts/e"
    assert default_artifact_location("http://127.0.0.1:5000", "e") is None  # the server decides


def test_cell_claims_are_exclusive_released_and_broken_when_their_launcher_is_gone(mlflow_store):
    client = mlflow.MlflowClient()
    exp = client.create_experiment("claims", artifact_location=f"file://{mlflow_store}/a")
    launcher = client.create_run(exp).info.run_id
    name = launch.claim_name("g", "tiny/demo/seed0", "abc")
    assert name == launch.claim_name("g", "tiny/demo/seed0", "abc") != launch.claim_name("g", "tiny/demo/seed1", "abc")
    assert launch.try_claim(name, "tiny/demo/seed0", launcher) is True
    assert launch.try_claim(name, "tiny/demo/seed0", "other") is False
    assert launch.claim_is_stale(name) is False  # its launcher is RUNNING
    client.set_terminated(launcher, "KILLED")
    assert launch.claim_is_stale(name) is True
    launch.release(name)
    assert launch.try_claim(name, "tiny/demo/seed0", "other") is True


def test_slurm_array_runs_cell_i_as_task_i(tmp_path, monkeypatch, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "sl", "pipeline_config": str(REPO / "configs/pipeline/tiny.yaml"),
                                    "datasets": ["demo", "demo:plant_care_good"], "num_gpus": 1, "num_cpus": 4}))
    monkeypatch.chdir(tmp_path)
    assert run_grid(parse_config(GridConfig, ["--config", str(grid), "--print_commands", "slurm"])) == {"commands": 2}
    script = (tmp_path / "em-grid-sl.slurm").read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --gpus-per-task=1" in script
    assert "#SBATCH --cpus-per-task=4" in script
    assert subprocess.run(["bash", "-n", str(tmp_path / "em-grid-sl.slurm")]).returncode == 0
    # what task 1 would eval: the second cell's `mlflow run`
    body = script.replace('eval "${CELLS[$SLURM_ARRAY_TASK_ID]}"', 'printf "%s" "${CELLS[$SLURM_ARRAY_TASK_ID]}"')
    out = subprocess.run(["bash", "-c", body], env=dict(os.environ, SLURM_ARRAY_TASK_ID="1"),
                         capture_output=True, text=True).stdout
    assert out.startswith("mlflow run . -e pipeline") and "grid_cell=tiny/plant_care_good/seed0" in out
    with pytest.raises(Exception, match="print_commands"):
        GridConfig(print_commands="pbs")


SIGTERM_SCRIPT = """
import sys, time
from em_core import tracking
from em_core.console import run_main

def main(argv):
    with tracking.tracked_run("term", "outer") as outer:
        with tracking.child_runs(outer.info.run_id):
            with tracking.tracked_run("term", "inner"):
                print("READY", flush=True)
                time.sleep(120)

sys.exit(run_main(main, []))
"""


def test_sigterm_ends_the_run_and_its_parents_killed_with_a_reason(mlflow_store, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143 and "terminated: SIGTERM received" in err
    runs = mlflow.search_runs(experiment_names=["term"], output_format="list")
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [("inner", "KILLED"), ("outer", "KILLED")]
    assert all("SIGTERM" in r.data.tags["em.killed_reason"] for r in runs)
