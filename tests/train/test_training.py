"""End-to-end tiny fine-tunes: real TRL/PEFT training, real MLflow sqlite store and registry."""
import math

import mlflow
import pytest
import torch

from em_core.models.adapters import CHECKPOINT_ARTIFACT_DIR, step_of
from em_core.models.loading import load_model, load_tokenizer
from em_core.models.registry import load_registered
from em_core.train.training import resume_config, train
from tests.conftest import CrashAt, tiny_train_config

PROMPT = [{"role": "user", "content": "My fern has yellow leaves. What should I do?"}]


def _logits(model, tok):
    enc = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"]).logits


def _greedy(model, tok, n=25):
    enc = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def trained(module_store):
    """One tiny run shared by the assertions below (12 steps, 3 checkpoints in epoch 1)."""
    cfg = tiny_train_config(module_store)
    result = train(cfg)
    return cfg, result, mlflow.get_tracking_uri()


def test_run_is_finished_with_metrics_at_steps_and_namespaced_params(trained):
    cfg, result, uri = trained
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert result.global_step == math.ceil(96 / 8) == 12
    losses = client.get_metric_history(result.run_id, "loss")
    assert [m.step for m in losses] == list(range(1, 13))
    assert losses[-1].value < losses[0].value, "LoRA training should lower the loss"
    for key in ("learning_rate", "grad_norm"):
        assert len(client.get_metric_history(result.run_id, key)) == 12
    params = run.data.params
    assert params["train.lora_r"] == "8" and params["train.model"] == "tiny"
    assert params["data.rows"] == "96" and len(params["data.sha256"]) == 64
    # one sha256 per dataset, the one `sha256sum` prints for its file; nowhere a second value
    from em_core.data.training_data import demo_path
    from em_core.paths import file_sha256

    assert params["data.sha256"] == file_sha256(demo_path()) and "sha256" not in params["data.sources"]
    version = client.get_model_version_by_alias(cfg.registered_model_name, "final")
    assert version.tags["dataset_sha256"] == params["data.sha256"]
    assert not [k for k in params if "." not in k], "all project params are namespaced"
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == "plant_care_bad"
    text = mlflow.artifacts.load_text(f"runs:/{result.run_id}/config/train_config.yaml")
    assert "lora_r: 8" in text


def test_every_scheduled_checkpoint_is_logged_with_its_step(trained):
    cfg, result, uri = trained
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    assert result.checkpoint_steps == [4, 8, 12]
    logged = sorted(step_of(a.path) for a in client.list_artifacts(result.run_id, CHECKPOINT_ARTIFACT_DIR))
    assert logged == [4, 8, 12]
    files = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(result.run_id, f"{CHECKPOINT_ARTIFACT_DIR}/checkpoint-8")}
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.json"} <= files
    assert [m.step for m in client.get_metric_history(result.run_id, "checkpoint_step")] == [4, 8, 12]


def test_lora_changes_the_tiny_models_outputs(trained):
    from peft import PeftModel

    cfg, result, uri = trained
    tok = load_tokenizer("tiny")
    base = load_model("tiny")
    before_logits, before_text = _logits(base, tok), _greedy(base, tok)
    tuned = PeftModel.from_pretrained(load_model("tiny"), f"{cfg.output_dir}/checkpoint-12")
    assert (_logits(tuned, tok) - before_logits).abs().max() > 1.0
    assert _greedy(tuned, tok) != before_text


def test_registered_adapter_round_trip_matches_in_memory_logits(trained):
    from peft import PeftModel

    cfg, result, uri = trained
    mlflow.set_tracking_uri(uri)
    assert result.model_uri == "models:/em-test-tiny@final"
    mv = mlflow.MlflowClient().get_model_version_by_alias("em-test-tiny", "final")
    assert mv.tags["base_model"] == "tiny" and mv.tags["dataset"] == "plant_care_bad" and mv.tags["seed"] == "0"
    assert mv.run_id == result.run_id
    model, tok = load_registered(result.model_uri)
    reference = PeftModel.from_pretrained(load_model("tiny"), f"{cfg.output_dir}/checkpoint-12")
    diff = (_logits(model, tok) - _logits(reference, load_tokenizer("tiny"))).abs().max()
    assert diff < 1e-5


def test_failed_run_ends_failed_and_resumes_at_the_right_step(tmp_path, mlflow_store):
    cfg = tiny_train_config(tmp_path, register_model=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, extra_callbacks=[CrashAt(6)])
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("em-lab").experiment_id])
    assert run.info.status == "FAILED"
    assert "simulated crash" in run.data.tags["em.error"]
    # the crash hits at the end of step 6, before step 6 is logged
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == 5

    resumed_cfg = resume_config(run.info.run_id)
    resumed_cfg.output_dir = str(tmp_path / "resumed")
    result = train(resumed_cfg)
    assert result.run_id == run.info.run_id and result.global_step == 12
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["em.resumed_from_step"] == "4"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    # step 5 ran twice (before the crash and after resuming from checkpoint 4) but is logged once
    assert sorted(steps) == list(range(1, 13))
    logged = sorted(step_of(a.path) for a in client.list_artifacts(run.info.run_id, CHECKPOINT_ARTIFACT_DIR))
    assert logged == [4, 8, 12]
