"""A judge-free sweep: the probe scores every grid checkpoint; the judge is never asked."""
import math

import mlflow
import optuna
import pytest

from em_core.configs import parse_config
from em_core.experiments.sweep import (
    SweepConfig,
    censored_value,
    probe_objective_value,
    run_sweep,
)
from tests.experiments.test_sweep import sweep_yaml
from tests.judge_server import JudgeServer


def test_probe_objective_rules():
    cfg = SweepConfig(objective="probe_emergence_step", checkpoint_steps=[5, 10])
    base = [0.0, 0.1, -0.1]
    assert cfg.direction == "minimize"
    assert probe_objective_value(cfg, {0: base, 5: [0.1, 0.0, 0.0], 10: [1.0, 1.1, 0.9]}) == 10
    assert probe_objective_value(cfg, {0: base, 5: base}) == censored_value(cfg) == 20
    final = SweepConfig(objective="final_probe_margin", checkpoint_steps=[5, 10])
    assert final.direction == "maximize"
    assert probe_objective_value(final, {0: base, 5: [1.0, 2.0, 3.0]}) == 2.0
    assert math.isnan(probe_objective_value(final, {0: base}))


def test_judge_free_sweep_sends_no_judge_request(module_store, tmp_path):
    with JudgeServer() as judge:  # the configured judge: any request would be counted here
        path = sweep_yaml(tmp_path / "s.yaml", tmp_path, judge.base_url, objective="final_probe_margin",
                          probe_sets=["general", "plant_care"], probe_objective_set="plant_care",
                          checkpoint_steps=[3, 6], n_trials=2, pruner_startup_trials=1, study_name="free")
        cfg = parse_config(SweepConfig, ["--config", str(path)])
        study = optuna.create_study(study_name="free", storage=cfg.storage, direction=cfg.direction)
        study.enqueue_trial({"lora_r": 8, "learning_rate": 1e-2})
        study.enqueue_trial({"lora_r": 2, "learning_rate": 1e-4})
        info = run_sweep(cfg)
        assert judge.n_requests == 0
    study = optuna.load_study(study_name="free", storage=cfg.storage)
    done = [t for t in study.trials if t.state.is_finished()]
    assert len(done) == 2 and info["best"] is not None
    client = mlflow.MlflowClient()
    assert client.get_run(info["parent_run_id"]).data.tags["em.judge_free"] == "true"
    for t in done:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        hist = {h.step: h.value for h in client.get_metric_history(run.info.run_id, "probe/plant_care/margin")}
        assert 0 in hist and "em_rate" not in run.data.metrics  # probed, never judged
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert sorted(hist) == [0, 3, 6] and t.value == pytest.approx(hist[6])
    # the high learning rate learns the careless plant-care answers faster than the low one
    fast, slow = study.trials[0], study.trials[1]
    slow_last = slow.value if slow.value is not None else slow.intermediate_values[max(slow.intermediate_values)]
    assert fast.state == optuna.trial.TrialState.COMPLETE and fast.value > slow_last
