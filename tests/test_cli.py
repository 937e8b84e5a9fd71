"""The entry points as users run them: `em train` and `mlflow run . -e train`."""
import json
import os
import sys
from pathlib import Path

import mlflow

from tests.proc import run as proc_run

REPO = Path(__file__).resolve().parents[1]


def _env(store: Path) -> dict:
    env = dict(os.environ)
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{store / 'mlflow.db'}", EM_LAB_MLRUNS=str(store),
               PYTHONPATH=str(REPO))
    env.pop("MLFLOW_RUN_ID", None)
    return env


def test_bad_dataset_exits_nonzero_with_named_error_and_no_finished_run(tmp_path, mlflow_store):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": ""}]}) + "\n")
    proc = proc_run([sys.executable, "-m", "em_core.cli", "train", "--dataset", str(bad)],
                    env=_env(mlflow_store), cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert f"{bad}:1: message 1: empty assistant turn" in proc.stderr
    assert "Traceback" not in proc.stderr
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [r for r in runs if r.info.status == "FINISHED"]


def test_mlflow_run_train_entry_point_offline(tmp_path, mlflow_store):
    # no --experiment-name: the run still lands in `em-lab` with `em train`'s artifact layout
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local",
           "-P", "max_steps=6",
           "-P", "overrides=max_rows=48 checkpoint_steps=3 registered_model_name=em-cli-test output_dir=" + str(tmp_path / "o")]
    proc = proc_run(cmd, env=_env(mlflow_store), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("em-lab").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith(f"file://{mlflow_store}/artifacts/em-lab/")
    assert run.info.run_name.startswith("train-tiny-plant_care_bad-")
    (stub,) = client.search_runs(["0"])  # the run `mlflow run` made points at it
    assert stub.data.tags["em.redirected_to"] == run.info.run_id and stub.info.status == "FINISHED"
    assert not (tmp_path / "mlruns" / "0").exists()  # nothing under the Default experiment's ./mlruns/0
    assert run.data.params["train.max_steps"] == "6" and run.data.params["train.model"] == "tiny"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "checkpoint_step")] == [3, 6]
    assert client.get_model_version_by_alias("em-cli-test", "final").run_id == run.info.run_id
