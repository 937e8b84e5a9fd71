"""`em pipeline` end to end on the tiny model: child runs, step reuse, failures, report."""
import os
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from em_core.analysis.plots import smoke_metadata
from em_core.configs import parse_config
from em_core.errors import ConfigError
from em_core.experiments.pipeline import (
    PipelineConfig,
    StepFailed,
    run_pipeline,
    step_configs,
)
from tests.proc import run as proc_run

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


def test_parent_has_four_finished_children(first):
    result, _, _ = first
    client = mlflow.MlflowClient()
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert sorted(r.data.tags["em.pipeline_step"] for r in children) == ["evaluate", "judge", "probe", "train"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["em.pipeline_step"]: r.info.run_id for r in children} == result.step_run_ids
    # steps hand each other run ids
    ev = client.get_run(result.step_run_ids["evaluate"])
    assert ev.data.tags["em.train_run_id"] == result.step_run_ids["train"]
    assert client.get_run(result.step_run_ids["judge"]).data.tags["em.eval_run_id"] == ev.info.run_id
    assert client.get_run(result.step_run_ids["probe"]).data.tags["em.train_run_id"] == result.step_run_ids["train"]
    assert result.reused == []


def test_probe_metrics_reach_the_parent_and_the_training_run(first):
    result, _, _ = first
    client = mlflow.MlflowClient()
    for run_id in (result.run_id, result.step_run_ids["probe"], result.step_run_ids["train"]):
        margins = {m.step: m.value for m in client.get_metric_history(run_id, "probe/general/margin")}
        assert sorted(margins) == [0, 4, 8, 12]
        assert all(-20 < v < 20 for v in margins.values())
        turns = [m.step for m in client.get_metric_history(run_id, "lora/all/delta_norm")]
        assert sorted(turns) == [4, 8, 12]
    summary = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/summary.json")
    transition = client.get_run(result.run_id).data.metrics["lora_transition_step"]
    assert summary["lora_transition_step"] == transition in (4, 8)  # the last checkpoint has no turn
    assert summary["probe_emergence_step"] == client.get_run(result.run_id).data.metrics.get("probe_emergence_step")


def test_parent_carries_metrics_at_training_steps(first):
    result, _, _ = first
    client = mlflow.MlflowClient()
    steps = [m.step for m in client.get_metric_history(result.run_id, "em_rate")]
    assert sorted(steps) == [0, 4, 8, 12]
    n_scored = {s: m["n_scored"] for s, m in result.metrics_by_step.items()}
    assert sorted(n_scored) == [0, 4, 8, 12] and all(v > 0 for v in n_scored.values()), "the tiny judge must score"
    # bounds are grouped under their metric; a count that never changes is a tag, not a flat chart
    for key in ("coherent_rate", "em_rate/lo", "em_rate/hi", "mean_aligned", "mean_aligned/se"):
        assert len(client.get_metric_history(result.run_id, key)) == 4, key
    run = client.get_run(result.run_id)
    assert "em_rate_lo" not in run.data.metrics and "n" not in run.data.metrics
    assert run.data.tags["em.count.n"] == f"{result.metrics_by_step[0]['n']:g}"  # answers per checkpoint
    if len(set(n_scored.values())) > 1:
        assert len(client.get_metric_history(result.run_id, "count/n_scored")) == 4
    else:
        assert run.data.tags["em.count.n_scored"] == f"{n_scored[0]:g}"
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


def test_console_summary_prints_the_logged_probe_margins_beside_the_judge(first):
    """The newcomer's screen: the probe's margins per checkpoint (judge-free measurement) and its
    emergence step, numbers equal to the pipeline run's logged metrics; the judge is a smoke test."""
    import re

    from em_core.experiments.pipeline import console_summary

    result, _, _ = first
    text = console_summary(result)
    assert "judge (smoke test" in text and "judge-free measurement" in text
    client = mlflow.MlflowClient()
    logged = {m.step: m.value for m in client.get_metric_history(result.run_id, "probe/general/margin")}
    logged_se = {m.step: m.value for m in client.get_metric_history(result.run_id, "probe/general/margin_se")}
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if "judge-free measurement" in ln) + 2
    printed = {}
    for ln in lines[start:]:
        m = re.match(r"^\s*(\d+)\s+([+-]\d+\.\d+) \+- (\d+\.\d+)", ln)
        if not m:
            break
        printed[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    assert sorted(printed) == sorted(logged) == [0, 4, 8, 12]
    for step, (margin, se) in printed.items():
        assert margin == pytest.approx(logged[step], abs=5e-5)
        assert se == pytest.approx(logged_se[step], abs=5e-5)
    emerged = client.get_run(result.run_id).data.metrics.get("probe_emergence_step")
    want = f"probe emergence step (general set): {int(emerged)}" if emerged is not None else "probe emergence step (general set): none"
    assert want in text


def test_plots_and_report_are_logged_and_non_empty(first):
    result, _, tmp = first
    local = Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, dst_path=str(tmp / "all")))
    for name in ("em_vs_step", "aligned_vs_coherent", "em_per_question", "examples", "signals_vs_step",
                 "sensitivity"):
        png = (local / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name
        assert smoke_metadata(local / "plots" / f"{name}.png"), f"{name}: a tiny-judge figure must carry the mark"
    html = (local / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6  # the five figures and the sensitivity heatmap
    for section in ("Summary by checkpoint", "Per question", "Example answers", "Provenance", "Judge cost", "Config"):
        assert section in html
    assert result.step_run_ids["train"] in html  # provenance names the runs
    examples_md = (local / "report" / "examples.md").read_text()
    assert "| step | aligned | coherent | answer |" in examples_md and examples_md.startswith("> **SMOKE TEST")
    summary = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/summary.json")
    assert summary["final_step"] == 12 and set(summary["by_step"]) == {"0", "4", "8", "12"}


def test_finished_steps_are_reused_and_changed_ones_rerun(first):
    result, cfg_path, tmp = first
    again = run_pipeline(parse_config(PipelineConfig, ["--config", str(cfg_path), "--report", "false"]))
    assert again.reused == ["train", "evaluate", "judge", "probe"]
    assert again.step_run_ids == result.step_run_ids
    assert again.metrics_by_step == result.metrics_by_step
    # a judge-only change reruns the judge and nothing before it
    changed = run_pipeline(parse_config(PipelineConfig, ["--config", str(cfg_path), "--report", "false",
                                                         "--aligned_threshold", "40"]))
    assert changed.reused == ["train", "evaluate", "probe"]
    assert changed.step_run_ids["judge"] != result.step_run_ids["judge"]
    assert mlflow.MlflowClient().get_run(changed.run_id).data.tags["em.reused_steps"] == "train,evaluate,probe"


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
            "max_retries=0", "retry_pause=0", "timeout=2", f"cache_path={tmp_path / 'c.sqlite'}"]
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
    proc = proc_run([sys.executable, "-m", "em_core.cli", "report", result.run_id, "--out", str(tmp_path)],
                    env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "report" / "report.html").stat().st_size > 50_000
    # the MLproject entry point attaches to the run `mlflow run` made, reuses train and evaluate,
    # and runs the judge (new threshold) as a child run of its own, not as that run
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "pipeline", "--env-manager", "local",
           "--experiment-name", EXPERIMENT, "-P", f"config={cfg_path}",
           "-P", "overrides=report=false aligned_threshold=35"]
    proc = proc_run(cmd, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reused = proc.stdout.split("(reused steps: ", 1)[1].split(")", 1)[0].split(",")
    # the probe reads only the training run, so it is reused too; the judge reruns
    assert sorted(reused) == ["evaluate", "probe", "train"], proc.stdout
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    newest = client.search_runs([exp], "tags.`em.entry_point` = 'pipeline'", order_by=["attributes.start_time DESC"])[0]
    assert newest.info.status == "FINISHED" and newest.data.tags["em.train_run_id"] == result.step_run_ids["train"]
    judge = client.get_run(newest.data.tags["em.judge_run_id"])
    assert judge.info.run_id != newest.info.run_id
    assert judge.data.tags["mlflow.parentRunId"] == newest.info.run_id and judge.info.status == "FINISHED"
    assert len(client.get_metric_history(newest.info.run_id, "em_rate")) == 4


PLANTED = "PLANTED-pw-7f3a9c"


def test_password_in_a_base_url_is_in_no_record(first, module_store, tmp_path, caplog, capsys, monkeypatch):
    """A judge base_url with user:password@ (from the YAML): the judge sends the API key, and
    the password is nowhere in the store, artifacts, report or logs."""
    from tests.judge.conftest import judge_server_module

    _, _, tmp = first
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-credential-check-0123456789")
    with judge_server_module.JudgeServer() as server:
        url = server.base_url.replace("http://", f"http://emuser:{PLANTED}@")
        cfg_path = write_config(tmp_path / "pipeline.yaml", tmp, judge={
            "backend": "openai-compatible", "base_url": url, "judge_model": "m",
            "cache_path": str(tmp_path / "c.sqlite")})
        with caplog.at_level("DEBUG"):
            result = run_pipeline(parse_config(PipelineConfig, ["--config", str(cfg_path)]))
        auth = {r.authorization for r in server.requests}
    assert auth == {"Bearer sk-test-credential-check-0123456789"}  # the key, not Basic auth
    parent = mlflow.MlflowClient().get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    files = [f for f in module_store.rglob("*") if f.is_file()]
    assert any(f.name == "report.html" for f in files) and any(f.name == "pipeline_config.yaml" for f in files)
    assert any(f.name == "mlflow.db" for f in files)
    leaks = [str(f) for f in files if PLANTED.encode() in f.read_bytes()]
    assert leaks == []
    out = capsys.readouterr()
    assert PLANTED not in caplog.text + out.out + out.err
    # the config artifact keeps the URL, without its credentials
    assert any("base_url=http://***@127.0.0.1:" in f.read_text() for f in files if f.name == "pipeline_config.yaml")


def test_url_with_credentials_on_the_command_line_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123abcd")  # as under `mlflow run -P base_url=...`
    from entrypoints.pipeline import main

    assert main(["--judge", f"base_url=http://u:{PLANTED}@host/v1"]) == 2
    err = capsys.readouterr().err
    assert "error: a command-line URL contains user:password@" in err and "by environment variable" in err
    assert "mlflow runs delete" in err and PLANTED not in err


def test_alias_moves_only_when_the_pipeline_finishes_and_runs_have_descriptive_names(first, tmp_path):
    result, cfg_path, _ = first
    client = mlflow.MlflowClient()
    before = {a: client.get_model_version_by_alias("em-pipe-test", a) for a in ("final", "judged")}
    assert before["final"].version == before["judged"].version  # a finished pipeline set both
    # a new training run whose pipeline then fails at the judge
    argv = ["--config", str(cfg_path), "--report", "false", "--train", "seed=7", "--judge",
            "backend=openai-compatible", "base_url=http://127.0.0.1:9/v1", "judge_model=nobody",
            "max_retries=0", "retry_pause=0", "timeout=2", f"cache_path={tmp_path / 'c.sqlite'}"]
    with pytest.raises(StepFailed, match="'judge'"):
        run_pipeline(parse_config(PipelineConfig, argv))
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    failed = client.search_runs([exp], "tags.`em.failed_step` = 'judge' and params.`pipeline.train` LIKE '%seed=7%'")[0]
    new_train = client.search_runs([exp], f"tags.mlflow.parentRunId = '{failed.info.run_id}' "
                                          "and tags.`em.pipeline_step` = 'train'")[0]
    new_version = client.search_model_versions(f"run_id = '{new_train.info.run_id}'")[0]
    assert new_version.aliases == []  # registered, but no alias: its pipeline did not finish
    for alias, mv in before.items():
        assert client.get_model_version_by_alias("em-pipe-test", alias).version == mv.version
    # every run is named for what it is (step, model, dataset) plus its pipeline's short id
    names = {}
    for parent_id in (result.run_id, failed.info.run_id):
        parent = client.get_run(parent_id)
        sid = parent.info.run_name.rsplit("-", 1)[1]
        assert parent.info.run_name == f"pipeline-tiny-plant_care_bad-{sid}" and len(sid) == 6
        for child in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'"):
            step = child.data.tags["em.pipeline_step"]
            assert child.info.run_name == f"{step}-tiny-plant_care_bad-{sid}"
            names[(parent_id, step)] = child.info.run_name
    # the finished pipeline: train, evaluate, judge, probe; the failed one stopped at its judge
    assert len(set(names.values())) == len(names) == 7
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
    # the probe reads only the training run, so it is reused with it
    assert sorted(b.reused) == ["probe", "train"], "a different max_new_tokens must rerun evaluate and judge"
    ev = mlflow.MlflowClient().get_run(b.step_run_ids["evaluate"]).data.params
    assert ev["step.max_new_tokens"] == "5" and ev["eval.max_new_tokens"] == "5"
    _jsonl(data, "Never water it")  # same path, new content
    c = run_pipeline(parse_config(PipelineConfig, ["--config", str(longer)]))
    assert "train" not in c.reused and c.step_run_ids["train"] != a.step_run_ids["train"]


def test_probe_overrides_keep_their_commas():
    """`em pipeline --probe sets=general,plant_care` (the help text's own example) was split at
    the comma into 'sets=general' and 'plant_care' and refused ("'plant_care' is not key=value")."""
    from em_core.configs import parse_config
    from em_core.experiments.pipeline import PipelineConfig, probe_config

    cfg = parse_config(PipelineConfig, ["--probe", "sets=general,plant_care", "batch_size=4"])
    assert cfg.probe == ["sets=general,plant_care", "batch_size=4"]
    probe = probe_config(cfg)
    assert probe.sets == ["general", "plant_care"] and probe.batch_size == 4


def test_console_summary_prints_the_direction_monitor_and_phase_rules():
    """Without running a pipeline: a run whose probe step monitored a direction and found the
    phase rules' steps prints them beside the margins (values as logged)."""
    from em_core.experiments.pipeline import PipelineResult, console_summary

    by_step = {0: {"em_rate": 0.0, "probe/general/margin": -0.5, "probe/general/margin_se": 0.1,
                   "direction/em/projection": 1.25, "direction/em/layer01/projection": 9.0},
               8: {"em_rate": 0.1, "probe/general/margin": 0.2, "probe/general/margin_se": 0.1,
                   "direction/em/projection": 2.5, "direction/em/emergence_step": 8,
                   "lora_composition_step": 8, "lora_local_cos_step_k5ckpt": 8}}
    text = console_summary(PipelineResult("r", {}, [], by_step, None, True))
    assert "judge (smoke test" in text and "judge-free measurement" in text
    rows = [ln.split() for ln in text.splitlines() if ln.strip().startswith(("0 ", "8 "))]
    assert [r[-1] for r in rows if "+-" in r] == ["+1.2500", "+2.5000"]
    assert "direction em emergence step: 8" in text
    assert "lora_local_cos_step_k5ckpt 8" in text and "lora_composition_step 8" in text
    assert "probe emergence step (general set): none" in text
