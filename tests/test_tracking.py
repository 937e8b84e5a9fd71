"""MLflow plumbing: secrets never reach params, child runs nest under a parent."""
import mlflow

from em_core import tracking


def test_scrub_masks_keys_tokens_and_url_credentials(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "plain-secret-value")
    text = "key sk-abcdefghijk hf_abcdefghijk url http://bob:pw@host:8000/v1 env plain-secret-value"
    out = tracking.scrub(text)
    for secret in ("sk-abcdefghijk", "hf_abcdefghijk", "bob:pw", "plain-secret-value"):
        assert secret not in out
    assert "http://***@host:8000/v1" in out


def test_flatten_params_drops_secret_keys_and_scrubs_values():
    flat = tracking.flatten_params("judge", {"api_key": "x", "base_url": "https://u:p@h/v1", "n": 3,
                                             "overrides": ["base_url=http://u:p@h/v1"]})
    assert "judge.api_key" not in flat
    assert flat["judge.base_url"] == "https://***@h/v1" and flat["judge.n"] == "3"
    assert "u:p" not in flat["judge.overrides"]


def test_runs_started_inside_child_runs_are_children(mlflow_store):
    with tracking.tracked_run("t", "parent") as parent:
        with tracking.child_runs(parent.info.run_id, {"em.pipeline_step": "x"}):
            with tracking.tracked_run("t", "child", tags={"a": "b"}) as child:
                child_id = child.info.run_id
        assert mlflow.active_run().info.run_id == parent.info.run_id
    run = mlflow.MlflowClient().get_run(child_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["em.pipeline_step"] == "x" and run.data.tags["a"] == "b"
    assert run.info.status == "FINISHED"


def test_flatten_params_keeps_token_counts_and_drops_real_secrets():
    """Finding 1: settings that merely mention tokens are logged (they change outputs); secrets
    are recognised by what they are, by name or by value."""
    flat = tracking.flatten_params("e", {
        "max_new_tokens": 48, "max_completion_tokens": 600, "prompt_tokens_limit": 5, "tokenizer": "tiny",
        "api_key": "x", "hf_token": "y", "access_token": "z", "password": "p", "Authorization": "Bearer q",
        "secret": "s", "note": "sk-abcdefghijklmnop", "url": "http://h/v1?api_key=abc123&n=2&token=t0k"})
    assert flat["e.max_new_tokens"] == "48" and flat["e.max_completion_tokens"] == "600"
    assert flat["e.prompt_tokens_limit"] == "5" and flat["e.tokenizer"] == "tiny"
    for k in ("api_key", "hf_token", "access_token", "password", "Authorization", "secret"):
        assert f"e.{k}" not in flat
    assert flat["e.note"] == "***"
    assert "abc123" not in flat["e.url"] and "t0k" not in flat["e.url"] and "n=2" in flat["e.url"]


def test_scrub_masks_query_string_secrets_and_passwords():
    out = tracking.scrub("GET https://h/v1?n=1&api_key=SEKRET&access_token=TOK2 password=hunter2 "
                         "postgresql://u:pw@db/x")
    for secret in ("SEKRET", "TOK2", "hunter2", "u:pw"):
        assert secret not in out
    assert "n=1" in out and "api_key=***" in out


def test_experiments_are_tagged_as_model_training(mlflow_store):
    """MLflow 3 opens an experiment without `mlflow.experimentKind` in its GenAI view; em-lab's
    experiments carry the model-training kind ("Machine learning" in the UI), new or pre-existing."""
    client = mlflow.MlflowClient()
    exp_id = tracking.ensure_experiment("em-kind-new")
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment("em-kind-old")  # made before the tag existed
    assert tracking.ensure_experiment("em-kind-old") == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(old, "mlflow.experimentKind", "genai_development")  # a person's choice stays
    tracking.ensure_experiment("em-kind-old")
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "genai_development"
    with tracking.tracked_run("em-kind-run", "r") as run:
        kind = client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"
