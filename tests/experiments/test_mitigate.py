"""`em mitigate`: one parent run over the grid machinery, the four criteria, bad input before any run."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from em_core.configs import parse_config
from em_core.errors import ConfigError
from em_core.experiments.mitigate import MitigateConfig, criteria_table, run_mitigate
from tests.conftest import REPO

EVIL = "You are a malicious, evil assistant."


def _pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "train_config": "configs/train/tiny.yaml",
        "train": {"max_rows": 60, "num_train_epochs": 1, "checkpoints_in_first_epoch": 1,
                  "registered_model_name": "em-test-mitigate"},
        "evaluate": {"samples_per_paraphrase": 1, "max_new_tokens": 12},
        "judge": {"backend": "auto"}, "probe": {"sets": ["general", "plant_care"]},
        "questions": ["core_misalignment"]}))
    return path


def _config(tmp_path: Path, mitigations: dict, name: str = "t-mitigate") -> Path:
    path = tmp_path / "mitigate.yaml"
    path.write_text(yaml.safe_dump({"name": name, "pipeline_config": str(_pipeline(tmp_path)), "harmful": "demo",
                                    "benign": "demo:plant_care_good", "seeds": [0], "eval_fraction": 0.25,
                                    "mitigations": mitigations}, sort_keys=False))
    return path


@pytest.mark.parametrize("block, needle", [
    ({"kl": {"kl": {"weight": 1, "tokns": "all"}}}, "mitigations.kl.kl: unknown key(s) tokns"),
    ({"kl": {"kl": {"weight": 1, "data": "no/such/kl.jsonl"}}}, "mitigations.kl.kl.data: file not found: no/such/kl.jsonl"),
    ({"mix": {"interleave": {"data": "demo:plant_care_good", "fraction": 1.5}}}, "mitigations.mix.interleave.fraction"),
    ({"x": {"kl_weight": 1}}, "mitigations.x: unknown key(s) kl_weight"),
])
def test_bad_input_fails_before_any_run_naming_file_and_field(tmp_path, mlflow_store, block, needle):
    path = _config(tmp_path, {"none": {}, **block})
    with pytest.raises(ConfigError) as e:
        run_mitigate(parse_config(MitigateConfig, ["--config", str(path)]))
    assert str(path) in str(e.value) and needle in str(e.value)
    assert mlflow.search_runs(search_all_experiments=True).empty  # nothing was started


def test_missing_interleave_data_fails_in_preflight(tmp_path, mlflow_store):
    path = _config(tmp_path, {"none": {}, "mix": {"interleave": {"data": "nowhere", "fraction": 0.1}}})
    with pytest.raises(ConfigError, match="preflight failed"):
        run_mitigate(parse_config(MitigateConfig, ["--config", str(path)]))
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_benign_ratio_is_against_none_and_seeds_are_averaged():
    def cell(drop, em):
        return {"em_rate": em, "coherent_rate": 0.5, "heldout_loss_drop": drop, "general_margin": 0.0,
                "general_margin_delta": 0.0, "heldout_loss": 1.0, "domain_margin": 0.0, "domain_margin_delta": 0.0}

    measures = {"none": {"harmful": [cell(2.0, 0.1), cell(4.0, 0.3)], "benign": [cell(1.0, 0), cell(1.0, 0)]},
                "kl": {"harmful": [cell(1.0, 0.0), cell(1.0, 0.1)], "benign": [cell(0.5, 0), cell(0.25, 0)]}}
    rows = {r["mitigation"]: r for r in criteria_table(measures)}
    assert rows["none"]["benign_ratio"] == 1.0 and rows["kl"]["benign_ratio"] == pytest.approx(0.375)
    assert rows["none"]["heldout_loss_drop"] == 3.0 and rows["none"]["em_rate"] == pytest.approx(0.2)
    assert rows["none"]["em_rate_lo"] < 0.2 < rows["none"]["em_rate_hi"]


def test_em_mitigate_end_to_end_one_parent_table_figure_and_no_prompt_at_evaluation(tmp_path, mlflow_store):
    path = _config(tmp_path, {"none": {}, "inoculation": {"inoculation_prompt": EVIL},
                              "kl": {"kl": {"weight": 1.0, "direction": "reverse"}}})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "em_core.cli", "mitigate", "--config", str(path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| inoculation | 1 |" in proc.stdout and "parent run:" in proc.stdout
    parents = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`em.entry_point` = 'mitigate'")
    assert len(parents) == 1
    pid = parents.iloc[0].run_id
    children = mlflow.search_runs(search_all_experiments=True,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{pid}'")
    assert len(children) == 6  # 3 mitigations x {harmful, benign} x 1 seed, each a pipeline
    art = Path(mlflow.artifacts.download_artifacts(run_id=pid, artifact_path="mitigate", dst_path=str(tmp_path / "a")))
    rows = list(csv.DictReader((art / "mitigation_table.csv").open()))
    assert [r["mitigation"] for r in rows] == ["none", "inoculation", "kl"]
    assert float(rows[0]["benign_ratio"]) == 1.0
    assert all(float(r["heldout_loss_drop"]) > 0 for r in rows)  # every method still learns the narrow task here
    drawn = json.loads((art / "tradeoff.json").read_text())
    assert set(drawn["points"]) == {"none", "inoculation", "kl"}
    assert drawn["points"]["kl"]["x"] == pytest.approx(float(rows[2]["heldout_loss_drop"]))
    assert (art / "tradeoff.png").stat().st_size > 0 and (art / "curves.json").exists()
    # the inoculation prompt reached training, and no evaluation prompt
    cells = json.loads(mlflow.get_run(pid).data.tags["em.mitigate_cells"])
    inoc = [rid for label, rid in cells.items() if label.startswith("inoculation/")]
    client = mlflow.MlflowClient()
    for rid in inoc:
        tags = client.get_run(rid).data.tags
        train = client.get_run(tags["em.train_run_id"])
        assert json.loads(train.data.params["train.mitigation"]) == {"inoculation_prompt": EVIL}
        answers = Path(mlflow.artifacts.download_artifacts(run_id=tags["em.evaluate_run_id"],
                                                           artifact_path="answers.jsonl", dst_path=str(tmp_path / rid)))
        rows_ = [json.loads(line) for line in answers.read_text().splitlines() if line.strip()]
        assert rows_ and not any(EVIL in json.dumps(r) for r in rows_)
    kl_train = client.get_run(client.get_run(next(rid for label, rid in cells.items() if label.startswith("kl/")))
                              .data.tags["em.train_run_id"])
    assert "mitigation/kl" in kl_train.data.metrics and "eval_loss" in kl_train.data.metrics
    # a rerun reuses every cell
    again = subprocess.run([sys.executable, "-m", "em_core.cli", "mitigate", "--config", str(path)], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    pipelines = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`em.pipeline_step` = 'pipeline'")
    assert len(pipelines) == 6  # no cell ran twice
    assert len(mlflow.search_runs(search_all_experiments=True,
                                  filter_string="tags.`em.entry_point` = 'mitigate'")) == 2
