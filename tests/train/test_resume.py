"""Crash + resume equals an uninterrupted run: one value per step for every metric, the same loss
history and the same final adapter; and every rank resumes from the same checkpoint."""
import filecmp

import mlflow
import pytest
from safetensors.torch import load_file

from em_core.train.training import resume_checkpoint, resume_config, train
from tests.conftest import CrashAt, tiny_train_config


def _history(client, run_id):
    run = client.get_run(run_id)
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in run.data.metrics}


def test_crash_and_resume_equals_an_uninterrupted_run(tmp_path, mlflow_store, monkeypatch):
    client = mlflow.MlflowClient()
    straight = train(tiny_train_config(tmp_path / "a", register_model=False, run_name="straight"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_train_config(tmp_path / "b", register_model=False, run_name="crashed"), extra_callbacks=[CrashAt(6)])
    (crashed,) = client.search_runs([client.get_experiment_by_name("em-lab").experiment_id],
                                    "attributes.run_name = 'crashed'")
    run_id = crashed.info.run_id
    # the crash flushed step 5, past the last checkpoint (4): the resumed run replays it
    assert max(m.step for m in client.get_metric_history(run_id, "loss")) == 5

    # every rank (RANK/WORLD_SIZE as torchrun/accelerate set them) gets the same checkpoint
    monkeypatch.setenv("WORLD_SIZE", "2")
    got = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        got[rank] = resume_checkpoint(run_id, tmp_path / "ranks")
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")  # back to one process for the resumed training
    assert got["0"][1] == got["1"][1] == 4 and got["0"][0] != got["1"][0]
    assert not filecmp.dircmp(got["0"][0], got["1"][0]).diff_files
    assert (got["1"][0] / "adapter_model.safetensors").exists() and (got["1"][0] / "trainer_state.json").exists()

    cfg = resume_config(run_id)
    cfg.output_dir = str(tmp_path / "c")
    resumed = train(cfg)
    assert resumed.run_id == run_id and resumed.global_step == straight.global_step == 12

    hist = _history(client, run_id)
    for key, values in hist.items():
        steps = [s for s, _ in values]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {sorted(steps)}"
    want = dict(_history(client, straight.run_id)["loss"])
    got_loss = dict(hist["loss"])
    assert sorted(got_loss) == sorted(want) == list(range(1, 13))
    assert [got_loss[s] for s in sorted(got_loss)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-4)

    a = load_file(f"{straight.output_dir}/checkpoint-12/adapter_model.safetensors")
    b = load_file(f"{tmp_path / 'c'}/checkpoint-12/adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name
