"""Finding 9: only MLflow's "does not exist" becomes a "not found" error; a broken store (here a
corrupt sqlite file, standing for a locked database or an auth failure) surfaces as itself."""
from __future__ import annotations

import mlflow
import pytest

from em_core.errors import ConfigError

MISSING = "0" * 32


@pytest.fixture
def broken_store(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not a sqlite database" * 400)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    return uri


def _calls(tmp_path):
    from em_core.judge.answers import JudgeConfig, run_judge
    from em_core.models.adapters import locate, model_version
    from em_core.sample.evaluation import EvalConfig, resolve_targets

    return {
        "judge": lambda: run_judge(JudgeConfig(eval_run_id=MISSING, backend="local")),
        "evaluate": lambda: resolve_targets(EvalConfig(train_run_id=MISSING), tmp_path),
        "init_adapter": lambda: locate(MISSING),
        "registry": lambda: model_version("models:/nothing/1"),
    }


@pytest.mark.parametrize("which", ["judge", "evaluate", "init_adapter", "registry"])
def test_broken_store_is_not_reported_as_a_missing_run(broken_store, tmp_path, which):
    with pytest.raises(Exception) as info:
        _calls(tmp_path)[which]()
    assert not isinstance(info.value, ConfigError), f"{which}: a store failure became {info.value}"
    assert "not a database" in str(info.value)


@pytest.mark.parametrize("which", ["judge", "evaluate", "init_adapter", "registry"])
def test_missing_run_is_still_a_clear_config_error(mlflow_store, tmp_path, which):
    with pytest.raises(ConfigError, match="no such|not found"):
        _calls(tmp_path)[which]()
