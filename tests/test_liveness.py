"""Runs left RUNNING by a dead process: heartbeats, and reaping by the next command or `em runs reap`."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from em_core import liveness
from em_core.cli import main as em
from tests.judge.conftest import judge_server_module

REPO = Path(__file__).resolve().parents[1]


def _run_with(client, exp_id: str, name: str, tags: dict[str, str]) -> str:
    run = client.create_run(exp_id, run_name=name, tags=tags)
    return run.info.run_id


def test_reap_marks_only_dead_runs_killed(mlflow_store, capsys):
    client = mlflow.MlflowClient()
    exp = client.create_experiment("reap")
    now = time.time()
    dead = subprocess.Popen(["true"])
    dead.wait()
    far = "other-host|boot|pid:[1]|4242"
    runs = {
        "silent": _run_with(client, exp, "silent", {liveness.HEARTBEAT_TAG: f"{now - 900}", liveness.PROCESS_TAG: far}),
        "alive": _run_with(client, exp, "alive", {liveness.HEARTBEAT_TAG: f"{now}", liveness.PROCESS_TAG: far}),
        "pid-gone": _run_with(client, exp, "pid-gone", {liveness.HEARTBEAT_TAG: f"{now}", liveness.PROCESS_TAG:
                                                         f"{liveness.process_id().rpartition('|')[0]}|{dead.pid}"}),
        "me": _run_with(client, exp, "me", {liveness.HEARTBEAT_TAG: f"{now}",
                                             liveness.PROCESS_TAG: liveness.process_id()}),
        "foreign": _run_with(client, exp, "foreign", {}),  # no heartbeat: not ours to judge
    }
    assert em(["runs", "reap", "--grace", "600"]) == 0
    assert "2 stale run(s) marked KILLED" in capsys.readouterr().out
    status = {k: client.get_run(v) for k, v in runs.items()}
    assert {k: r.info.status for k, r in status.items()} == {
        "silent": "KILLED", "alive": "RUNNING", "pid-gone": "KILLED", "me": "RUNNING", "foreign": "RUNNING"}
    assert status["silent"].data.tags[liveness.KILLED_REASON_TAG] in (
        f"stale: no heartbeat for {s}s (grace 600s)" for s in (900, 901, 902))
    assert status["silent"].info.end_time == pytest.approx((now - 900) * 1000, abs=2)
    assert status["pid-gone"].data.tags[liveness.KILLED_REASON_TAG].startswith(f"stale: process {dead.pid} is gone")


def test_heartbeat_is_refreshed_while_a_run_is_open(mlflow_store, monkeypatch):
    from em_core import tracking

    monkeypatch.setenv("EM_LAB_HEARTBEAT_SECONDS", "0.2")
    with tracking.tracked_run("beat") as run:
        first = float(mlflow.get_run(run.info.run_id).data.tags[liveness.HEARTBEAT_TAG])
        time.sleep(0.7)
        later = float(mlflow.get_run(run.info.run_id).data.tags[liveness.HEARTBEAT_TAG])
    assert later - first >= 0.3
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"


def _env(store: Path, **extra: str) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store / 'mlflow.db'}", EM_LAB_MLRUNS=str(store),
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", EM_LAB_HEARTBEAT_SECONDS="0.5", **extra)
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _start_then_kill9(cmd: list[str], env: dict, experiment: str, cwd: Path, timeout: float = 240) -> str:
    """Start `cmd`, wait until its run is RUNNING with a heartbeat, kill -9 its process group."""
    # The store exists before the child starts: this process polling a fresh sqlite store while
    # the child creates it raced in MLflow's schema migration ("duplicate column name").
    mlflow.MlflowClient().search_experiments()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    client = mlflow.MlflowClient()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            exp = client.get_experiment_by_name(experiment)
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and liveness.HEARTBEAT_TAG in runs[0].data.tags:
                time.sleep(1.0)  # a few beats in, mid-work
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                run = client.get_run(runs[0].info.run_id)
                assert run.info.status == "RUNNING" and run.info.end_time is None  # what kill -9 leaves
                return run.info.run_id
            time.sleep(0.2)
        raise AssertionError("the command never started its run")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_kill9_judge_is_killed_by_the_next_judge(mlflow_store, tmp_path):
    qfile = tmp_path / "q.yaml"
    qfile.write_text('- id: q\n  type: free_form_judge_0_100\n  paraphrases: ["Hi?"]\n'
                     '  judge_prompts: {aligned: "A {question} {answer}", coherent: "C {question} {answer}"}\n')
    answers = tmp_path / "answers.csv"
    with answers.open("w", newline="") as f:
        csv.writer(f).writerows([["question_id", "question", "answer"]] + [["q", "Hi?", f"a{i}"] for i in range(40)])
    with judge_server_module.JudgeServer(latency=0.5) as server:
        cmd = [sys.executable, "-m", "em_core.cli", "judge", "--answers", str(answers), "--questions", str(qfile),
               "--backend", "openai-compatible", "--judge_model", "m", "--base_url", server.base_url,
               "--concurrency", "1", "--cache_path", str(tmp_path / "cache.sqlite"), "--experiment_name", "j"]
        killed = _start_then_kill9(cmd, _env(mlflow_store), "j", tmp_path)
        server.latency = 0.0
        proc = subprocess.run(cmd, env=_env(mlflow_store), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = mlflow.MlflowClient().get_run(killed)
    assert run.info.status == "KILLED" and run.info.end_time is not None
    assert run.data.tags[liveness.KILLED_REASON_TAG].startswith("stale: process ")


def test_kill9_train_is_killed_by_em_runs_reap(mlflow_store, tmp_path):
    cmd = [sys.executable, "-m", "em_core.cli", "train", "--config", "configs/train/tiny.yaml", "--max_steps", "5000",
           "--experiment_name", "t", "--output_dir", str(tmp_path / "out")]
    killed = _start_then_kill9(cmd, _env(mlflow_store), "t", REPO)
    proc = subprocess.run([sys.executable, "-m", "em_core.cli", "runs", "reap"], env=_env(mlflow_store), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"KILLED {killed}" in proc.stdout
    run = mlflow.MlflowClient().get_run(killed)
    assert run.info.status == "KILLED"
    assert run.data.tags[liveness.KILLED_REASON_TAG].startswith("stale: process ")
