"""Checkpoint uploads off the training thread, with retries; adapter-only uploads; scratch
`outputs/<run id>` cleaned; registered adapters over local bases referenced portably."""
from __future__ import annotations

import shutil
import types
from pathlib import Path

import mlflow
import pytest

from em_core.errors import ConfigError
from em_core.models.registry import BASE_PATH_TAG, BASE_REF_TAG, base_reference, folder_sha256, resolve_base
from em_core.models.tiny import TINY_VERSION
from em_core.paths import PROJECT_ROOT
from em_core.train.training import LogCheckpoints, train
from tests.conftest import tiny_train_config

FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
         "trainer_state.json")


def _checkpoint(tmp_path: Path, step: int) -> types.SimpleNamespace:
    folder = tmp_path / "out" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in FILES:
        (folder / name).write_text(f"{name} at {step}")
    return types.SimpleNamespace(output_dir=str(tmp_path / "out"))


def test_uploads_retry_a_failing_store_and_adapter_only_skips_trainer_state(mlflow_store, tmp_path, monkeypatch):
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("up", artifact_location=f"file://{mlflow_store}/a")).info.run_id
    real, calls = mlflow.MlflowClient.log_artifact, {"n": 0}

    def flaky(self, *args, **kwargs):  # the store drops the first two uploads
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ConnectionError("store unreachable")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", flaky)
    cb = LogCheckpoints(run_id, adapter_only=True, retries=3, backoff=0.01)
    state = types.SimpleNamespace(is_world_process_zero=True, global_step=4)
    cb.on_save(_checkpoint(tmp_path, 4), state, None)
    assert cb.close() == [4]
    stored = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "checkpoints/checkpoint-4")}
    assert stored == {"adapter_model.safetensors", "adapter_config.json", "trainer_state.json"}
    assert [m.step for m in client.get_metric_history(run_id, "checkpoint_step")] == [4]

    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", lambda *a, **k: (_ for _ in ()).throw(OSError("down")))
    dead = LogCheckpoints(run_id, retries=1, backoff=0.01)
    dead.on_save(_checkpoint(tmp_path / "b", 8), types.SimpleNamespace(is_world_process_zero=True, global_step=8), None)
    with pytest.raises(RuntimeError, match="checkpoint-8: OSError: down"):
        dead.close()


def test_default_outputs_are_cleaned_after_upload_unless_kept(mlflow_store, tmp_path):
    cfg = tiny_train_config(tmp_path, output_dir=None, max_rows=32, checkpoints_in_first_epoch=1,
                            checkpoint_upload="adapter", register_model=False)
    result = train(cfg)
    assert not (PROJECT_ROOT / "outputs" / result.run_id).exists()
    client = mlflow.MlflowClient()
    final = f"checkpoints/checkpoint-{result.global_step}"
    stored = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(result.run_id, final)}
    assert "adapter_model.safetensors" in stored and "optimizer.pt" not in stored
    kept = train(tiny_train_config(tmp_path, output_dir=None, max_rows=32, checkpoints_in_first_epoch=1,
                                   keep_local_checkpoints=True, register_model=False))
    folder = PROJECT_ROOT / "outputs" / kept.run_id
    try:
        assert (folder / f"checkpoint-{kept.global_step}" / "optimizer.pt").exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_local_bases_are_referenced_portably(tmp_path):
    assert base_reference("tiny", "/some/cache/tiny-v2") == {BASE_REF_TAG: f"tiny-v{TINY_VERSION}"}
    assert base_reference("meta-llama/Llama-3.2-1B-Instruct", None) == {}
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"a": 1}')
    tags = base_reference(str(base), str(base))
    assert tags[BASE_REF_TAG] == f"folder-sha256:{folder_sha256(base)}" and tags[BASE_PATH_TAG] == str(base)
    assert resolve_base("models:/m/1", tags) == str(base)
    assert resolve_base("models:/m/1", {}) is None  # a hub base: its id is the reference
    (base / "config.json").write_text('{"a": 2}')
    with pytest.raises(ConfigError, match="not the base it was trained on"):
        resolve_base("models:/m/1", tags)
    shutil.rmtree(base)
    with pytest.raises(ConfigError, match=rf"local folder {base} .*not on this machine; copy that folder"):
        resolve_base("models:/m/1", tags)
    with pytest.raises(ConfigError, match="trained on the tiny model tiny-v0"):
        resolve_base("models:/m/1", {BASE_REF_TAG: "tiny-v0"})
