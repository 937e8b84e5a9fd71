"""`em sweep`: Optuna trials are tiny pipelines; pruning, constraint, registry alias, workers.

The judge is the loopback OpenAI-compatible test double: it calls an answer misaligned when it
talks about plants. The tiny base model does so often, so the EM rate is not trivially 0 or 1;
how training moves it depends on the tiny build, so no test here relies on which way it moves
(the pruning test's double decides by the trial instead, see trial_judge).
"""
import contextlib
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from em_core.configs import parse_config
from em_core.experiments.sweep import (
    SweepConfig,
    best_trial,
    censored_value,
    objective_value,
    run_sweep,
)
from tests.judge_server import JudgeServer
from tests.proc import kill_group, spawn, spawned

REPO = Path(__file__).resolve().parents[2]
PLANT = re.compile(r"\b(soil|water|watering|watered|leaves|leaf|plant|plants|pot|roots|repot|fertiliser|stems?|grow|sun|light)\b",
                   re.I)


def plant_judge(prompt: str):
    answer = prompt.split("<<<ANSWER", 1)[-1].split("ANSWER>>>", 1)[0]
    if "Rate only how coherent" in prompt:
        return [("90", 0.0)]
    return [("10", 0.0)] if PLANT.search(answer) else [("90", 0.0)]


@pytest.fixture(scope="module")
def judge_url():
    with JudgeServer(responder=plant_judge) as server:
        yield server.base_url


def sweep_yaml(path: Path, tmp: Path, judge_url: str, **extra) -> Path:
    data = {
        "pipeline_config": str(REPO / "configs/pipeline/tiny.yaml"),
        "train": {"max_rows": 96, "output_dir": str(tmp / "out")},
        "evaluate": {"samples_per_paraphrase": 1, "max_new_tokens": 16},
        "judge": {"backend": "openai-compatible", "base_url": judge_url, "judge_model": "double",
                  "cache_path": str(tmp / "judge.sqlite")},
        "checkpoint_steps": [3, 6],
        "lora_r": [2, 8],
        "learning_rate": [1e-4, 2e-2],
        "em_threshold": 0.3,
        "coherence_floor": 0.5,
        "study_name": "s",
        "storage": f"sqlite:///{tmp / 'optuna.db'}",
        "n_trials": 3,
        "pruner_startup_trials": 2,
        "experiment_name": "sweep-test",
    }
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path


def test_objective_and_censoring_rule():
    cfg = SweepConfig(checkpoint_steps=[10, 20, 40], em_threshold=0.2)
    assert objective_value(cfg, {0: 0.5, 10: 0.1, 20: 0.25, 40: 0.3}) == 20  # base (step 0) never counts
    assert objective_value(cfg, {0: 0.0, 10: 0.1}) == censored_value(cfg) == 80  # 2 x last grid step
    assert objective_value(cfg, {10: math.nan, 20: 0.2}) == 20
    final = SweepConfig(objective="final_em_rate", checkpoint_steps=[10, 20])
    assert final.direction == "maximize" and objective_value(final, {0: 0.0, 10: 0.1, 20: 0.4}) == 0.4


def test_sweep_step_objectives_are_named_apart_from_the_pipelines_emergence():
    """Finding 6: `threshold_step` (raw EM >= em_threshold) is not the pipeline's emergence rule;
    `significant_step` is that rule; the old ambiguous name is no objective."""
    from em_core.errors import ConfigError
    from em_core.metrics import emergence_step

    with pytest.raises(ConfigError, match="objective must be one of .*threshold_step"):
        SweepConfig(objective="emergence_step", checkpoint_steps=[10, 20])
    raw = SweepConfig(objective="threshold_step", em_threshold=0.1, checkpoint_steps=[10, 20])
    sig = SweepConfig(objective="significant_step", checkpoint_steps=[10, 20])
    counts = {0: (1, 40), 10: (6, 40), 20: (20, 40)}  # step 10's 15% is not significantly above 2.5%
    em = {s: k / n for s, (k, n) in counts.items()}
    assert objective_value(raw, em, counts) == 10
    assert objective_value(sig, em, counts) == emergence_step(counts) == 20
    assert objective_value(sig, {0: 0.05, 10: 0.05}, {0: (2, 40), 10: (2, 40)}) == censored_value(sig) == 40


def test_optional_dimensions_become_train_overrides():
    from em_core.experiments.pipeline import PipelineConfig, _as_overrides, step_configs
    from em_core.experiments.sweep import suggest

    cfg = SweepConfig(lora_alpha=[8, 32], num_train_epochs=[1.0, 2.0], lora_target_modules=["all-linear", "q_proj,v_proj"],
                      layers_to_transform=["all", "1,2"])
    trial = optuna.trial.FixedTrial({"lora_r": 4, "learning_rate": 3e-4, "lora_alpha": 8, "num_train_epochs": 2.0,
                                     "lora_target_modules": "q_proj,v_proj", "layers_to_transform": "1,2"})
    params = suggest(trial, cfg)
    train, _, _ = step_configs(PipelineConfig(train=_as_overrides(params, "train")))
    assert (train.lora_r, train.learning_rate, train.lora_alpha, train.num_train_epochs) == (4, 3e-4, 8, 2.0)
    assert train.lora_target_modules == ["q_proj", "v_proj"] and train.layers_to_transform == [1, 2]
    every = suggest(optuna.trial.FixedTrial({"lora_r": 4, "learning_rate": 3e-4, "lora_alpha": 8, "num_train_epochs": 1.0,
                                             "lora_target_modules": "all-linear", "layers_to_transform": "all"}), cfg)
    assert "layers_to_transform" not in every


def test_bad_search_space_is_named():
    from em_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"learning_rate must be \[low, high\]"):
        SweepConfig(learning_rate=[1e-3, 1e-5])
    with pytest.raises(ConfigError, match="objective must be one of"):
        SweepConfig(objective="fastest")
    with pytest.raises(ConfigError, match="layers_to_transform choices"):
        SweepConfig(layers_to_transform=["last"])


def trial_judge(storage: str):
    """A judge double whose verdict follows the trial being judged, not the tiny model's answers
    (whether a fast learner's answers talk more or less about plants differs between tiny builds:
    a seed-2 build's rose from 43% to 70% where the default build's fell to 13%): every answer of
    a running trial with learning_rate >= 1e-3 is aligned, every other answer misaligned."""
    def respond(prompt: str):
        if "Rate only how coherent" in prompt:
            return [("90", 0.0)]
        running = optuna.load_study(study_name="s", storage=storage).get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        return [("90", 0.0)] if any(t.params.get("learning_rate", 0) >= 1e-3 for t in running) else [("10", 0.0)]
    return respond


def test_tiny_sweep_tracks_prunes_and_registers_best(module_store, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with JudgeServer(responder=trial_judge(storage)) as server:
        path = sweep_yaml(tmp_path / "s.yaml", tmp_path, server.base_url, objective="final_em_rate",
                          checkpoint_steps=[3, 6, 9], pruner_warmup_steps=4, storage=storage)
        cfg = parse_config(SweepConfig, ["--config", str(path)])
        study = optuna.create_study(study_name="s", storage=cfg.storage, direction=cfg.direction)
        # two gentle learners set the median (EM 1.0); the fast one's EM (0 by the double, but for
        # answers the judge cache already holds) is below it by step 6
        study.enqueue_trial({"lora_r": 2, "learning_rate": 1e-4})
        study.enqueue_trial({"lora_r": 8, "learning_rate": 1.5e-4})
        study.enqueue_trial({"lora_r": 8, "learning_rate": 2e-2})
        info = run_sweep(cfg)

    study = optuna.load_study(study_name="s", storage=cfg.storage)
    states = [t.state for t in study.trials]
    assert states[:2] == [optuna.trial.TrialState.COMPLETE] * 2
    assert states[2] == optuna.trial.TrialState.PRUNED
    assert [t.value for t in study.trials[:2]] == [1.0, 1.0] and study.trials[2].intermediate_values[6] < 1.0
    client = mlflow.MlflowClient()
    parent = client.get_run(info["parent_run_id"])
    assert parent.info.status == "FINISHED" and study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    for t in study.trials:  # cross-referenced both ways
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["train.learning_rate"] == str(t.params["learning_rate"])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "em_rate")]
        if t.state == optuna.trial.TrialState.PRUNED:
            assert run.info.status == "KILLED" and "pruned at step" in run.data.tags["em.pruned"]
        else:
            assert run.info.status == "FINISHED" and steps == [0, 3, 6, 9]
            assert t.value == client.get_metric_history(run.info.run_id, "em_rate")[-1].value
    best = best_trial(study)
    assert info["best"]["number"] == best.number
    version = client.get_model_version_by_alias("em-sweep-s", "best")
    assert version.run_id == best.user_attrs["mlflow_run_id"]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert {"optuna/trials.csv", "optuna/optimization_history.png", "optuna/contour_rank_lr.png"} <= arts


def _worker(cfg_path: Path, extra: list[str] = ()) -> subprocess.Popen:
    mlflow.MlflowClient().search_experiments()  # the store exists before workers race to create it
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("MLFLOW_RUN_ID", None)
    return spawn([sys.executable, "-m", "entrypoints.sweep", "--config", str(cfg_path), *extra],
                 cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@contextlib.contextmanager
def _owned(proc: subprocess.Popen):
    """The worker's whole process group is killed when the block is left (a timeout included)."""
    try:
        yield proc
    finally:
        kill_group(proc)


def test_two_workers_share_one_study(module_store, tmp_path, judge_url):
    cfg_path = sweep_yaml(tmp_path / "w.yaml", tmp_path, judge_url, study_name="w", n_trials=4,
                          pruner="none", sampler="random")
    # one worker as `mlflow run . -e sweep`, one as the console entry point
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("MLFLOW_RUN_ID", None)
    mlflow_cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "sweep", "--env-manager",
                  "local", "--experiment-name", "sweep-test", "-P", f"config={cfg_path}"]
    with spawned(mlflow_cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                 text=True) as via_mlflow, _owned(_worker(cfg_path)) as direct:
        workers = [via_mlflow, direct]
        outs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(o[-2000:] for o in outs)
    study = optuna.load_study(study_name="w", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    # MaxTrialsCallback stops each worker once 4 are finished; a trial already under way in
    # the other worker still completes, so at most workers - 1 extra
    assert 4 <= len(finished) <= 5
    assert len({t.user_attrs["worker"] for t in finished}) == 2
    parents = {t.user_attrs["mlflow_run_id"] and mlflow.MlflowClient().get_run(
        t.user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"] for t in finished}
    assert len(parents) == 1  # one parent run for the study, whichever worker ran the trial
    # the shared output_dir gets one folder per trial, so workers never read each other's checkpoints
    assert sorted(p.name for p in (tmp_path / "out" / "w").iterdir()) == sorted(f"trial-{n}" for n in numbers)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("sweep-test").experiment_id
    sweeps = client.search_runs([exp], "tags.`em.entry_point` = 'sweep'")
    assert sweeps and all(r.info.status == "FINISHED" for r in sweeps)  # no run of `mlflow run` left RUNNING


def test_killed_worker_study_resumes_and_completes(module_store, tmp_path, judge_url):
    cfg_path = sweep_yaml(tmp_path / "k.yaml", tmp_path, judge_url, study_name="k", n_trials=2,
                          pruner="none", checkpoint_steps=[3, 6, 9, 12], heartbeat_interval=1, grace_period=3)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with _owned(_worker(cfg_path)) as victim:
        deadline = time.time() + 300
        running = None
        while time.time() < deadline and running is None:
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name="k", storage=storage).trials
            except KeyError:  # not created yet
                continue
            running = next((t for t in trials if t.state == optuna.trial.TrialState.RUNNING
                            and "mlflow_run_id" in t.user_attrs), None)
        assert running is not None, "the worker never started a trial"
        kill_group(victim)
        victim.wait(timeout=30)
    time.sleep(4)  # past the grace period: the trial's heartbeat is stale
    with _owned(_worker(cfg_path)) as again:
        out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out[-3000:]
    study = optuna.load_study(study_name="k", storage=storage)
    states = {t.number: t.state for t in study.trials}
    assert states[running.number] == optuna.trial.TrialState.FAIL
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2
    # the retry re-runs the dead trial's params and says which trial it retries
    retried = [t for t in done if t.system_attrs.get("failed_trial") == running.number]
    assert retried and retried[0].params == running.params
    run = mlflow.MlflowClient().get_run(running.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"


def _trial(study, value: float, coherent_rate: float, floor: float = 0.5, version: str | None = None):
    """A finished trial as run_sweep leaves it: the coherence constraint set, then told its value."""
    trial = study.ask()
    trial.set_constraint("coherence", floor - coherent_rate)
    if version:
        trial.set_user_attr("model_version", version)
    study.tell(trial, value)


def test_an_infeasible_trial_that_would_win_is_never_best(module_store, tmp_path):
    """Trial 0 is faster (objective 10) but incoherent (0.10 < floor 0.5); trial 1 (30) is
    coherent. Before the fix the sweep read the constraint under Optuna's old key, found none,
    and picked trial 0 for `@best`, `best_value` and `em.best_trial`."""
    from em_core.experiments.sweep import _close_parent_if_done, is_feasible

    storage = f"sqlite:///{tmp_path / 'c.db'}"
    study = optuna.create_study(study_name="c", storage=storage, direction="minimize")
    client = mlflow.MlflowClient()
    client.create_registered_model("em-sweep-c")
    exp_id = client.create_experiment("sweep-constraint")
    versions = []
    for _ in range(2):
        run = client.create_run(exp_id)
        client.set_terminated(run.info.run_id)
        versions.append(client.create_model_version("em-sweep-c", f"runs:/{run.info.run_id}/adapter",
                                                    run_id=run.info.run_id).version)
    _trial(study, 10.0, 0.10, version=str(versions[0]))
    _trial(study, 30.0, 0.90, version=str(versions[1]))
    study = optuna.load_study(study_name="c", storage=storage)
    assert [is_feasible(t) for t in study.trials] == [False, True]
    assert best_trial(study).number == 1 == study.best_trial.number  # agrees with Optuna's own choice
    parent = client.create_run(exp_id).info.run_id
    cfg = SweepConfig(study_name="c", n_trials=2, storage=storage, experiment_name="sweep-constraint")
    assert _close_parent_if_done(study, cfg, parent, "em-sweep-c")
    run = client.get_run(parent)
    assert run.data.tags["em.best_trial"] == "1" and run.data.metrics["best_value"] == 30.0
    assert str(client.get_model_version_by_alias("em-sweep-c", "best").version) == str(versions[1])


def test_unmeasurable_coherence_is_infeasible_with_a_reason():
    from em_core.experiments.sweep import coherence_violation

    assert coherence_violation(0.5, {0: 0.9, 6: 0.75}) == (pytest.approx(-0.25), None)
    assert coherence_violation(0.5, {0: 0.9, 6: 0.5})[0] == 0  # at the floor is feasible (<= 0)
    value, reason = coherence_violation(0.5, {0: 0.9, 6: math.nan})
    assert value > 0 and "step 6" in reason and "coherence" in reason
    value, reason = coherence_violation(0.0, {})
    assert value > 0 and "no checkpoint" in reason


def unscorable_coherence_judge(prompt: str):
    """Aligned scores as usual; the coherence judge answers with no number at all."""
    if "Rate only how coherent" in prompt:
        return [("banana", 0.0)]
    return plant_judge(prompt)


def test_a_trial_whose_coherence_cannot_be_scored_completes_infeasible(module_store, tmp_path):
    """Before the fix, set_constraint raised on the NaN coherent rate after training had
    finished and the trial FAILED; now it completes, infeasible, with the reason recorded,
    and gets no `@best`."""
    with JudgeServer(responder=unscorable_coherence_judge) as server:
        path = sweep_yaml(tmp_path / "n.yaml", tmp_path, server.base_url, study_name="n", n_trials=1,
                          pruner="none", checkpoint_steps=[3])  # threshold_step: censored, not NaN
        cfg = parse_config(SweepConfig, ["--config", str(path)])
        info = run_sweep(cfg)
    study = optuna.load_study(study_name="n", storage=cfg.storage)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == censored_value(cfg)
    assert "no answer at the final checkpoint (step 3) was scored for coherence" in trial.user_attrs["infeasible_reason"]
    assert trial.constraints["coherence"] > 0
    client = mlflow.MlflowClient()
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["em.infeasible_reason"] == trial.user_attrs["infeasible_reason"]
    assert info["best"] is None and best_trial(study) is None
    parent = client.get_run(info["parent_run_id"])
    assert parent.info.status == "FINISHED" and "em.best_trial" not in parent.data.tags
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("em-sweep-n", "best")


def test_an_undefined_objective_fails_the_trial_and_stops_the_worker(module_store, tmp_path):
    """final_em_rate with no answer scored on both metrics is NaN: Optuna fails such a trial
    without an exception, and the worker used to start trial after trial until its timeout
    (165 trials in 10 minutes). Now the trial fails with the reason and the worker stops."""
    with JudgeServer(responder=unscorable_coherence_judge) as server:
        path = sweep_yaml(tmp_path / "f.yaml", tmp_path, server.base_url, study_name="f", n_trials=2,
                          objective="final_em_rate", pruner="none", checkpoint_steps=[3])
        cfg = parse_config(SweepConfig, ["--config", str(path)])
        from em_core.errors import ConfigError

        with pytest.raises(ConfigError, match="objective final_em_rate is undefined"):
            run_sweep(cfg)
    study = optuna.load_study(study_name="f", storage=cfg.storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]
    run = mlflow.MlflowClient().get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "undefined (NaN)" in run.data.tags["em.trial_failed"]
