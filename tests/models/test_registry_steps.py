"""Finding 8: a registered model whose training step is unknown is an error, never step 1."""
from __future__ import annotations

import mlflow
import pytest

from em_core.errors import ConfigError


def _register(tmp_path, tags: dict[str, str], run_tags: dict[str, str] | None = None) -> str:
    client = mlflow.MlflowClient()
    with mlflow.start_run(tags=run_tags or {}) as run:
        peft = tmp_path / "peft"
        peft.mkdir(exist_ok=True)
        (peft / "adapter_config.json").write_text("{}")
        mlflow.log_artifacts(str(peft), "adapter/peft")
    client.create_registered_model("em-steps")
    mv = client.create_model_version("em-steps", f"{run.info.artifact_uri}/adapter", run.info.run_id, tags=tags)
    return f"models:/em-steps/{mv.version}"


def test_missing_step_tags_are_an_error_not_step_1(mlflow_store, tmp_path):
    from em_core.models.registry import registered_adapter

    uri = _register(tmp_path, {"base_model": "tiny"})
    with pytest.raises(ConfigError, match="training step is unknown"):
        registered_adapter(uri, tmp_path / "w")


def test_step_comes_from_the_version_or_its_training_run(mlflow_store, tmp_path):
    from em_core.models.registry import registered_adapter

    uri = _register(tmp_path, {"base_model": "tiny"}, {"em.checkpoint_steps": "12,4,8"})
    assert registered_adapter(uri, tmp_path / "w")[2] == 12


def test_openai_model_without_final_step_is_an_error(mlflow_store, tmp_path):
    from em_core.models.adapters import model_version
    from em_core.sample.evaluation import EvalConfig, _api_version_targets

    uri = _register(tmp_path, {"base_model": "gpt-4o-mini", "openai_model_id": "ft:gpt-4o-mini:x"})
    cfg = EvalConfig(model=uri, backend="openai", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="training step is unknown"):
        _api_version_targets(cfg, model_version(uri))
