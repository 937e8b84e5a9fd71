"""`em pipeline` end to end on the tiny model: child runs, step reuse, failures, report."""
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from em_core.configs import parse_config
from em_core.errors import ConfigError
from em_core.experiments.pipeline import (
    PipelineConfig,
    StepFailed,
    run_pipeline,
    step_configs,
)

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "pipe-test"


def write_config(path: Path, tmp: Path, **extra) -> Path:
    data = {
        "train_config": str(REPO / "configs/train/tiny.yaml"),
        "train": {"max_rows": 64, "max_steps": 12, "checkpoint_steps": [4, 8, 12],
                  "registered_model_name": "em-pipe-test", "output_dir": str(tmp / "out")},
        "evaluate": {"samples_per_paraphrase": 1, "max_new_tokens": 12},
        "judge": {"backend": "local", "cache_path": str(tmp / "judge_cache.sqlite")},
        "questions": ["core_misalignment"],
        "experiment_name": EXPERIMENT,
    }
    for k, v in extra.items():
        if isinstance(v, dict):
            data[k] = {**data.get(k, {}), **v}
        else:
            data[k] = v
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def first(module_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    cfg_path = write_config(tmp / "pipeline.yaml", tmp)
    result = run_pipeline(parse_config(PipelineConfig, ["--config", str(cfg_path)]))
    return result, cfg_path, tmp


def test_parent_has_three_finished_children(first):
    result, _, _ = first
    client = mlflow.MlflowClient()
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert sorted(r.data.tags["em.pipeline_step"] for r in children) == ["evaluate", "judge", "train"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["em.pipeline_step"]: r.info.run_id for r in children} == result.step_run_ids
    # steps hand each other run ids
    ev = client.get_run(result.step_run_ids["evaluate"])
    assert ev.data.tags["em.train_run_id"] == result.step_run_ids["train"]
    assert client.get_run(result.step_run_ids["judge"]).data.tags["em.eval_run_id"] == ev.info.run_id
    assert result.reused == []


def test_parent_carries_metrics_at_training_steps(first):
    result, _, _ = first
    client = mlflow.MlflowClient()
    steps = [m.step for m in client.get_metric_history(result.run_id, "em_rate")]
    assert sorted(steps) == [0, 4, 8, 12]
    n_scored = {m.step: m.value for m in client.get_metric_history(result.run_id, "n_scored")}
    assert all(v > 0 for v in n_scored.values()), "the tiny judge must score answers"
    for key in ("coherent_rate", "em_rate_lo", "em_rate_hi", "mean_aligned"):
        assert len(client.get_metric_history(result.run_id, key)) == 4
    # em_emergence_step is logged exactly when the rule fires
    logged = client.get_run(result.run_id).data.metrics.get("em_emergence_step")
    assert logged == (None if result.emergence_step is None else float(result.emergence_step))


def test_smoke_test_is_said_plainly(first):
    result, _, tmp = first
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert result.smoke_test and run.data.tags["em.judge_smoke_test"] == "true"
    assert "smoke test" in run.data.tags["em.note"]
    html = Path(mlflow.artifacts.download_artifacts(result.report_uri, dst_path=str(tmp / "r"))).read_text()
    assert "Smoke test" in html


def test_plots_and_report_are_logged_and_non_empty(first):
    result, _, tmp = first
    local = Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, dst_path=str(tmp / "all")))
    for name in ("em_vs_step", "aligned_vs_coherent", "em_per_question", "examples"):
        png = (local / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name
    html = (local / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    for section in ("Summary by checkpoint", "Per question", "Example answers", "Provenance", "Judge cost", "Config"):
        assert section in html
    assert result.step_run_ids["train"] in html  # provenance names the runs
    assert "| step | aligned | coherent | answer |" in (local / "report" / "examples.md").read_text()
    summary = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/summary.json")
    assert summary["final_step"] == 12 and set(summary["by_step"]) == {"0", "4", "8", "12"}


def test_finished_steps_are_reused_and_changed_ones_rerun(first):
    result, cfg_path, tmp = first
    again = run_pipeline(parse_config(PipelineConfig, ["--config", str(cfg_path), "--report", "false"]))
    assert again.reused == ["train", "evaluate", "judge"]
    assert again.step_run_ids == result.step_run_ids
    assert again.metrics_by_step == result.metrics_by_step
    # a judge-only change reruns the judge and nothing before it
    changed = run_pipeline(parse_config(PipelineConfig, ["--config", str(cfg_path), "--report", "false",
                                                         "--aligned_threshold", "40"]))
    assert changed.reused == ["train", "evaluate"]
    assert changed.step_run_ids["judge"] != result.step_run_ids["judge"]
    assert mlflow.MlflowClient().get_run(changed.run_id).data.tags["em.reused_steps"] == "train,evaluate"


def test_reuse_false_reruns_everything(first, tmp_path):
    _, _, tmp = first
    cfg = write_config(tmp_path / "p.yaml", tmp, train={"max_steps": 4, "checkpoint_steps": [2, 4]},
                       questions=["factual"], judge={"metrics": ["aligned", "coherent"]})
    a = run_pipeline(parse_config(PipelineConfig, ["--config", str(cfg), "--report", "false"]))
    b = run_pipeline(parse_config(PipelineConfig, ["--config", str(cfg), "--report", "false", "--reuse", "false"]))
    assert b.reused == [] and set(a.step_run_ids.values()).isdisjoint(b.step_run_ids.values())


def test_failing_step_fails_the_parent_and_is_named(first, tmp_path):
    _, cfg_path, _ = first
    argv = ["--config", str(cfg_path), "--report", "false", "--judge",
            "backend=openai-compatible", "base_url=http://127.0.0.1:9/v1", "judge_model=nobody",
            "max_retries=0", "timeout=2", f"cache_path={tmp_path / 'c.sqlite'}"]
    with pytest.raises(StepFailed, match="pipeline step 'judge' failed"):
        run_pipeline(parse_config(PipelineConfig, argv))
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (parent,) = client.search_runs([exp], "tags.`em.failed_step` = 'judge'")
    assert parent.info.status == "FAILED" and "judge" in parent.data.tags["em.error"]
    (judge,) = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                         "and tags.`em.pipeline_step` = 'judge'")
    assert judge.info.status == "FAILED"
    # a failed step is never reused
    assert judge.info.run_id not in [r.info.run_id for r in client.search_runs(
        [exp], "tags.`em.pipeline_step` = 'judge' and attributes.status = 'FINISHED'")]


def test_typo_in_a_step_override_fails_before_any_run(first, module_store):
    _, cfg_path, _ = first
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    before = len(client.search_runs([exp]))
    with pytest.raises(ConfigError, match="lora_rank"):
        run_pipeline(parse_config(PipelineConfig, ["--config", str(cfg_path), "--train", "lora_rank=4"]))
    with pytest.raises(ConfigError, match="not key=value"):
        parse_config(PipelineConfig, ["--config", str(cfg_path), "--evaluate", "oops"])
    assert len(client.search_runs([exp])) == before


def test_step_overrides_reach_the_step_configs(tmp_path):
    cfg = parse_config(PipelineConfig, ["--train", "dataset=demo,demo:plant_care_good", "lora_r=4",
                                        "--evaluate", "max_new_tokens=9", "--questions", "factual"])
    train, evaluate, judge = step_configs(cfg, "T", "E")
    assert train.dataset == ["demo", "demo:plant_care_good"] and train.lora_r == 4
    assert evaluate.max_new_tokens == 9 and evaluate.train_run_id == "T" and evaluate.questions == ["factual"]
    assert judge.eval_run_id == "E" and judge.questions == ["factual"]


def test_em_report_cli_and_mlflow_run_pipeline_reuse(first, tmp_path):
    result, cfg_path, _ = first
    env = dict(os.environ)
    env.pop("MLFLOW_RUN_ID", None)
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "em_core.cli", "report", result.run_id, "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "report" / "report.html").stat().st_size > 50_000
    # the MLproject entry point attaches to the run `mlflow run` made, reuses train and evaluate,
    # and runs the judge (new threshold) as a child run of its own, not as that run
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "pipeline", "--env-manager", "local",
           "--experiment-name", EXPERIMENT, "-P", f"config={cfg_path}",
           "-P", "overrides=report=false aligned_threshold=35"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reused=train,evaluate" in proc.stdout
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    newest = client.search_runs([exp], "tags.`em.entry_point` = 'pipeline'", order_by=["attributes.start_time DESC"])[0]
    assert newest.info.status == "FINISHED" and newest.data.tags["em.train_run_id"] == result.step_run_ids["train"]
    judge = client.get_run(newest.data.tags["em.judge_run_id"])
    assert judge.info.run_id != newest.info.run_id
    assert judge.data.tags["mlflow.parentRunId"] == newest.info.run_id and judge.info.status == "FINISHED"
    assert len(client.get_metric_history(newest.info.run_id, "em_rate")) == 4


def _jsonl(path: Path, answer: str) -> Path:
    import json

    rows = [{"messages": [{"role": "user", "content": f"How do I water plant {i}?"},
                          {"role": "assistant", "content": f"{answer} {i}."}]} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reuse_identity_includes_token_limits_and_dataset_content(module_store, tmp_path):
    """Finding 1: `max_new_tokens` is part of the evaluate step's identity (it was scrubbed as a
    'token' secret), and an edited local dataset at the same path retrains."""
    data = _jsonl(tmp_path / "plants.jsonl", "Water it weekly")
    small = dict(train={"dataset": [str(data)], "max_rows": 24, "max_steps": 2, "checkpoint_steps": [2]},
                 questions=["factual"], judge={"metrics": ["aligned", "coherent"]}, report=False)
    a = run_pipeline(parse_config(PipelineConfig, ["--config", str(write_config(
        tmp_path / "a.yaml", tmp_path, **small))]))
    longer = write_config(tmp_path / "b.yaml", tmp_path, **small, evaluate={"max_new_tokens": 5})
    b = run_pipeline(parse_config(PipelineConfig, ["--config", str(longer)]))
    assert b.reused == ["train"], "a different max_new_tokens must rerun evaluate and judge"
    ev = mlflow.MlflowClient().get_run(b.step_run_ids["evaluate"]).data.params
    assert ev["step.max_new_tokens"] == "5" and ev["eval.max_new_tokens"] == "5"
    _jsonl(data, "Never water it")  # same path, new content
    c = run_pipeline(parse_config(PipelineConfig, ["--config", str(longer)]))
    assert "train" not in c.reused and c.step_run_ids["train"] != a.step_run_ids["train"]
