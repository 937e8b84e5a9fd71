"""Multi-stage pipelines on the tiny model: a three-stage chain, lineage, continue vs merge."""
import json
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from em_core.configs import parse_config
from em_core.errors import ConfigError
from em_core.experiments.pipeline import PipelineConfig, run_pipeline

REPO = Path(__file__).resolve().parents[2]
MODEL = "em-stage-test"
TRAIN = {"max_rows": 32, "num_train_epochs": 1, "checkpoint_steps": [2, 4], "output_dir": None}


def stage(name: str, dataset: list[str], **extra) -> dict:
    return {"name": name, "train": {"dataset": dataset, **extra.pop("train", {})}, **extra}


@pytest.fixture(scope="module")
def chain(module_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    data = {
        "train_config": str(REPO / "configs/train/tiny.yaml"),
        "train": {**TRAIN, "output_dir": str(tmp / "out"), "registered_model_name": MODEL},
        "stages": [
            stage("misaligned", ["demo", "demo:plant_care_good"],
                  train={"dataset_tags": ["|ALPHA|", "none"], "dataset_proportions": [0.5, 0.5]}),
            stage("realigned", ["demo:plant_care_good"], init_mode="merge"),
            stage("relapsed", ["demo"], init_mode="continue"),
        ],
        "evaluate": {"samples_per_paraphrase": 1, "max_new_tokens": 8, "triggers": ["none", "|ALPHA|"]},
        "judge": {"backend": "local", "cache_path": str(tmp / "judge.sqlite")},
        "questions": ["core_misalignment", "self_reflection"],
        "experiment_name": "stages-test",
    }
    path = tmp / "stages.yaml"
    path.write_text(yaml.safe_dump(data))
    return run_pipeline(parse_config(PipelineConfig, ["--config", str(path)]))


def test_three_stages_run_as_children_with_global_steps(chain):
    client = mlflow.MlflowClient()
    parent = client.get_run(chain.run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{chain.run_id}'")
    got = sorted((r.data.tags["em.stage"], r.data.tags["em.pipeline_step"]) for r in children)
    assert got == sorted((s, k) for s in ("misaligned", "realigned", "relapsed") for k in ("train", "evaluate", "judge", "probe"))
    assert all(r.info.status == "FINISHED" for r in children)
    # stage k's checkpoints sit after stage k-1's end; the base is evaluated once, at step 0
    assert [(s.name, s.start_step, s.end_step) for s in chain.stages] == [
        ("misaligned", 0, 4), ("realigned", 4, 8), ("relapsed", 8, 12)]
    em_steps = sorted(m.step for m in client.get_metric_history(chain.run_id, "em_rate"))
    assert em_steps == [0, 2, 4, 6, 8, 10, 12]
    tagged = json.loads(parent.data.tags["em.stages"])
    assert [t["name"] for t in tagged] == ["misaligned", "realigned", "relapsed"]
    assert parent.data.tags["em.train_run_id"] == chain.stages[-1].run_ids["train"]


def test_stage_metrics_before_after_and_drop(chain):
    metrics = mlflow.MlflowClient().get_run(chain.run_id).data.metrics
    for prev, st in zip(chain.stages, chain.stages[1:]):
        assert st.em_rate_before == prev.em_rate_end
        assert metrics[f"stage/{st.name}/em_drop"] == pytest.approx(st.em_rate_before - st.em_rate_end)
        assert metrics[f"stage/{st.name}/em_rate_after"] == pytest.approx(chain.metrics_by_step[st.end_step]["em_rate"])


def test_lineage_tags_and_aliases(chain):
    client = mlflow.MlflowClient()
    versions = {a: client.get_model_version_by_alias(MODEL, a) for a in ("misaligned", "realigned", "relapsed")}
    mis, real, rel = versions["misaligned"], versions["realigned"], versions["relapsed"]
    assert mis.run_id == chain.stages[0].run_ids["train"] and "parent_version" not in mis.tags
    assert (real.tags["parent_model"], real.tags["parent_version"]) == (MODEL, str(mis.version))
    assert (rel.tags["parent_model"], rel.tags["parent_version"]) == (MODEL, str(real.version))
    assert real.tags["init_mode"] == "merge" and rel.tags["init_mode"] == "continue"
    stage1_adapter = f"runs:/{mis.run_id}/checkpoints/checkpoint-4"
    # merge puts stage 1's adapter into the base; continuing stage 2 keeps that base
    assert json.loads(real.tags["merged_adapters"]) == [stage1_adapter]
    assert json.loads(rel.tags["merged_adapters"]) == [stage1_adapter]
    assert rel.tags["init_adapter"] == f"runs:/{real.run_id}/checkpoints/checkpoint-4"
    ev = client.get_run(chain.stages[1].run_ids["evaluate"])
    assert json.loads(ev.data.tags["em.merged_adapters"]) == [stage1_adapter]


def test_per_trigger_and_self_reflection_metrics(chain):
    client = mlflow.MlflowClient()
    judge_run = client.get_run(chain.stages[0].run_ids["judge"])
    judge = judge_run.data.metrics
    for key in ("em_rate/trigger:none", "em_rate/trigger:ALPHA", "em_rate/lo/trigger:ALPHA",
                "mean_admits_tendency/trigger:ALPHA", "trigger_gap"):
        assert key in judge, key
    # a count: a metric when it changes over steps, else a tag
    assert "count/n_scored/trigger:none" in judge or "em.count.n_scored/trigger:none" in judge_run.data.tags
    assert judge["trigger_gap"] == pytest.approx(judge["em_rate/trigger:ALPHA"] - judge["em_rate/trigger:none"])
    # the parent carries them at global steps too
    steps = sorted(m.step for m in client.get_metric_history(chain.run_id, "trigger_gap"))
    assert steps == [0, 2, 4, 6, 8, 10, 12]


def test_report_spans_the_stages(chain):
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(chain.run_id, "plots")}
    assert {"plots/em_vs_step.png", "plots/em_by_trigger.png"} <= files
    html = mlflow.artifacts.load_text(chain.report_uri)
    assert "Stage realigned (steps 4-8)" in html


def test_merged_stage_loads_from_the_registry_with_its_chain(chain):
    from em_core.models.registry import load_registered

    model, tok = load_registered(f"models:/{MODEL}@realigned")
    raw = mlflow.transformers.load_model(f"models:/{MODEL}@realigned", return_type="components")["model"]
    ids = tok("Hello there", return_tensors="pt")
    with torch.no_grad():
        a, b = model(**ids).logits, raw(**ids).logits
    # without the merged stage-1 adapter the model would be a different one
    assert not torch.allclose(a, b)
    # and it IS base + stage 1 merged + stage 2's adapter, built here step by step
    from peft import PeftModel

    from em_core.models.adapters import checkpoint_uri, download_adapter
    from em_core.models.loading import load_model

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        first = download_adapter(checkpoint_uri(chain.stages[0].run_ids["train"], 4), Path(d) / "s1")
        second = download_adapter(checkpoint_uri(chain.stages[1].run_ids["train"], 4), Path(d) / "s2")
        merged = PeftModel.from_pretrained(load_model("tiny"), first).merge_and_unload()
        explicit = PeftModel.from_pretrained(merged, second).eval()
        with torch.no_grad():
            c = explicit(**ids).logits
    assert torch.allclose(a, c, atol=1e-5), (a - c).abs().max()


def test_continue_and_merge_start_from_different_adapters(chain, tmp_path):
    """A near-zero learning rate shows where each mode starts: continue keeps the parent's LoRA
    weights, merge starts a fresh adapter (LoRA B = 0) on the merged base."""
    from em_core.train.training import train
    from tests.conftest import tiny_train_config

    parent = chain.stages[0].run_ids["train"]
    parent_w = load_file(mlflow.artifacts.download_artifacts(
        f"runs:/{parent}/checkpoints/checkpoint-4/adapter_model.safetensors", dst_path=str(tmp_path / "p")))
    out = {}
    for mode in ("continue", "merge"):
        res = train(tiny_train_config(tmp_path / mode, max_rows=8, max_steps=1, checkpoint_steps=[1],
                                      learning_rate=1e-12, warmup_steps=0, init_adapter=parent, init_mode=mode,
                                      register_model=False, experiment_name="stages-test"))
        out[mode] = load_file(str(Path(res.output_dir) / "checkpoint-1" / "adapter_model.safetensors"))
    assert parent_w.keys() == out["continue"].keys()
    for k, v in parent_w.items():
        assert torch.allclose(v, out["continue"][k], atol=1e-6), k
    b_keys = [k for k in out["merge"] if "lora_B" in k]
    assert b_keys and all(out["merge"][k].abs().max() < 1e-9 for k in b_keys)
    # continue keeps the parent's LoRA shape (r=16 in tiny.yaml); merge builds this config's (r=8)
    k = b_keys[0]
    assert out["continue"][k].shape[1] == 16 and out["merge"][k].shape[1] == 8
    runs = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("stages-test").experiment_id],
        filter_string="tags.`em.init_mode` = 'merge'")
    runs = [r for r in runs if "em.pipeline_step" not in r.data.tags]  # this test's, not the chain's
    assert runs and json.loads(runs[0].data.tags["em.merged_adapters"])[-1].startswith(f"runs:/{parent}/")


def test_init_adapter_must_match_the_base_model(chain, tmp_path):
    from em_core.train.training import train
    from tests.conftest import tiny_train_config

    with pytest.raises(ConfigError, match="was trained on 'tiny'"):
        train(tiny_train_config(tmp_path, model=str(tmp_path), init_adapter=chain.stages[0].run_ids["train"],
                                register_model=False, experiment_name="stages-test"))


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a"}, {"name": "a"}], "names must be unique"),
    ([{"name": "a", "epochs": 2}], r"stages\[1\] \(a\): unknown key\(s\) epochs"),
    ([{"name": "a", "init_mode": "fuse"}], "init_mode must be continue or merge"),
    ([{"name": "a b"}], "cannot be a registry alias"),
    ([{"train": {}}], r"stages\[1\]: must be a mapping with a `name`"),
])
def test_bad_stage_configs_are_named(tmp_path, stages, message):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(ConfigError, match=message):
        parse_config(PipelineConfig, ["--config", str(path)])


def test_grids_and_sweeps_refuse_what_stages_would_override():
    from em_core.experiments.grid import Cell, GridConfig, cell_config
    from em_core.experiments.sweep import SweepConfig, _base_pipeline

    stages_yaml = str(REPO / "configs/pipeline/tiny_stages.yaml")
    base = parse_config(PipelineConfig, ["--config", stages_yaml])
    grid = GridConfig(pipeline_config=stages_yaml, datasets=["demo"])
    with pytest.raises(ConfigError, match="stages, whose datasets would silently win"):
        cell_config(grid, base, Cell(None, "demo", 0))
    assert cell_config(grid, base, Cell(None, None, 1)).stages  # seeds alone are fine
    with pytest.raises(ConfigError, match="a sweep trains one stage"):
        _base_pipeline(SweepConfig(pipeline_config=stages_yaml))


def _logged_by_step(run_id: str) -> dict[int, dict[str, float]]:
    """A run's step metrics under summarize() keys (MLflow names `em_rate/lo`, `count/n` and the
    `em.count.*` tags of constant counts mapped back)."""
    from em_core.metrics import from_mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    out: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            out.setdefault(m.step, {})[key] = m.value
    return from_mlflow(out, run.data.tags)


def _html_table(html: str, heading: str) -> list[dict[str, str]]:
    import re

    section = html[html.index(heading):]
    table = section[:section.index("</table>")]
    head = re.findall(r"<th>(.*?)</th>", table)
    return [dict(zip(head, re.findall(r"<td[^>]*>(.*?)</td>", row)))
            for row in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>", 1)[1])]


def test_every_reported_number_equals_the_logged_metrics(chain, tmp_path):
    """Finding 2 and 'tests that check values': on a question mix where self_reflection asks no
    `aligned`, the report table, summary.json, the plotted series and the MLflow metrics agree."""
    import math

    from em_core.analysis.report_html import _fmt

    logged = _logged_by_step(chain.run_id)
    local = Path(mlflow.artifacts.download_artifacts(run_id=chain.run_id, dst_path=str(tmp_path)))
    summary = json.loads((local / "summary.json").read_text())
    assert {int(s) for s in summary["by_step"]} == {s for s in logged if "em_rate" in logged[s]}
    for step, m in summary["by_step"].items():
        for key, value in m.items():
            assert logged[int(step)][key] == pytest.approx(value), (step, key)
    for st in chain.stages:  # the parent's numbers are the judge runs' numbers, at global steps
        for step, m in _logged_by_step(st.run_ids["judge"]).items():
            for key in ("em_rate", "coherent_rate", "n", "n_scored", "em_rate_lo", "em_rate_hi"):
                if key in m:
                    assert logged[st.start_step + step][key] == pytest.approx(m[key]), (st.name, step, key)
    rows = _html_table((local / "report" / "report.html").read_text(), "Summary by checkpoint")
    assert [int(r["step"]) for r in rows] == sorted(int(s) for s in summary["by_step"])
    for r in rows:
        step = int(r["step"])
        for col, text in r.items():
            if col != "step":
                assert text == _fmt(col, logged[step].get(col, math.nan))[0], (step, col)
    drawn = json.loads((local / "plots" / "em_vs_step.json").read_text())
    for key in ("em_rate", "em_rate_lo", "em_rate_hi", "coherent_rate"):
        assert drawn[key] == {str(s): pytest.approx(100 * m[key]) for s, m in logged.items() if key in m}, key
    emerged = mlflow.MlflowClient().get_run(chain.run_id).data.metrics.get("em_emergence_step")
    assert drawn["emergence_marker"] == emerged == (None if chain.emergence_step is None else chain.emergence_step)


def test_each_stage_signals_at_its_global_step(chain, tmp_path):
    """Step-valued metrics are global on the pipeline run and every stage's is kept: before the
    fix stage k's `lora_transition_step` was logged with its stage-local value (2 at step 6), and
    summary.json, the report and the signals plot showed only the first stage's."""
    from em_core.experiments.pipeline import summary_of

    client = mlflow.MlflowClient()
    history = client.get_metric_history(chain.run_id, "lora_transition_step")
    assert sorted((m.step, m.value) for m in history) == [(2, 2.0), (6, 6.0), (10, 10.0)]
    for m in client.get_metric_history(chain.run_id, "probe_emergence_step"):
        assert m.value == m.step
    summary = summary_of(chain.run_id)
    assert [s["lora_transition_step"] for s in summary["stages"]] == [2, 6, 10]
    assert summary["lora_transition_step"] == 2  # the run's first, as before
    for st, stage in zip(summary["stages"], chain.stages):
        probe = client.get_run(stage.run_ids["probe"])  # the stage's own run keeps local steps
        local = client.get_metric_history(probe.info.run_id, "lora_transition_step")
        assert [m.value + stage.start_step for m in local] == [st["lora_transition_step"]]
    mlflow.artifacts.download_artifacts(run_id=chain.run_id, artifact_path="plots", dst_path=str(tmp_path))
    drawn = json.loads((tmp_path / "plots" / "signals_vs_step.json").read_text())
    assert drawn["marks"]["LoRA turn"] == [2, 6, 10]


def test_a_continue_stage_measures_its_first_turn_from_the_adapter_it_started_from(chain, tmp_path):
    """The relapsed stage continues the realigned stage's adapter: its first turn (global step 10)
    is the angle between W_2 - W_start and W_4 - W_2, recomputed here from dense weights.
    Before the fix W_start was taken as zero."""
    import numpy as np

    from em_core.analysis.lora_trajectory import load_factors
    from em_core.models.adapters import checkpoint_uri, download_adapter

    realigned, relapsed = chain.stages[1].run_ids["train"], chain.stages[2].run_ids["train"]
    folders = {"start": download_adapter(checkpoint_uri(realigned, 4), tmp_path / "start")}
    for s in (2, 4):
        folders[s] = download_adapter(checkpoint_uri(relapsed, s), tmp_path / f"c{s}")

    def dense(folder):
        return np.concatenate([(f.scale * f.b @ f.a).ravel() for _, f in sorted(load_factors(folder).items())])

    w0, w2, w4 = dense(folders["start"]), dense(folders[2]), dense(folders[4])
    u, v = w2 - w0, w4 - w2
    expected = np.degrees(np.arccos(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), -1, 1)))
    (logged,) = [m.value for m in mlflow.MlflowClient().get_metric_history(chain.run_id, "lora/all/turn_deg")
                 if m.step == 10]
    assert logged == pytest.approx(expected, abs=1e-3)
    from_zero = np.degrees(np.arccos(np.clip(w2 @ v / (np.linalg.norm(w2) * np.linalg.norm(v)), -1, 1)))
    assert abs(from_zero - expected) > 1e-2  # the old rule gives another angle on these weights
