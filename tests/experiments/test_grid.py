"""`em grid`: one pipeline per cell, a summary table with intervals, resumable."""
import math
from pathlib import Path

import mlflow
import pytest
import yaml

from em_core.analysis.plots import smoke_metadata
from em_core.configs import parse_config
from em_core.experiments.grid import (
    GridConfig,
    cell_config,
    cells,
    markdown_table,
    mlflow_run_command,
    run_grid,
    summarize_cells,
)
from em_core.experiments.pipeline import PipelineConfig

REPO = Path(__file__).resolve().parents[2]


def _summary(model, dataset, seed, em, n=100, emerged=None):
    k = round(em * n)
    from em_core.metrics import wilson_interval

    lo, hi = wilson_interval(k, n)
    step = {"em_rate": em, "em_rate_lo": lo, "em_rate_hi": hi, "coherent_rate": 0.9,
            "coherent_rate_lo": 0.8, "coherent_rate_hi": 0.95, "n_scored": n}
    return {"run_id": f"r{seed}", "model": model, "dataset": [dataset], "seed": seed, "final_step": 10,
            "emergence_step": emerged, "smoke_test": False,
            "by_step": {"0": {"em_rate": 0.0}, "10": step}}


def test_seeds_are_aggregated_with_a_t_interval():
    out = summarize_cells([_summary("org/m-1B", "data/bad.jsonl.gz", s, em, emerged=e)
                           for s, em, e in ((0, 0.10, 5), (1, 0.20, None), (2, 0.30, 10))])
    (row,) = out["table"]
    assert (row["model"], row["dataset"], row["seeds"]) == ("m-1B", "bad", 3)
    assert row["em_rate"] == pytest.approx(0.2)
    # t(0.975, 2) = 4.303; sd = 0.1; half = 4.303 * 0.1 / sqrt(3)
    assert row["em_rate_lo"] == pytest.approx(max(0.0, 0.2 - 4.3027 * 0.1 / math.sqrt(3)), abs=1e-3)
    assert row["em_rate_hi"] == pytest.approx(0.2 + 4.3027 * 0.1 / math.sqrt(3), abs=1e-3)
    # Finding 6: the never-emerged seed is censored (after the last step), not dropped:
    # sorted steps 5, 10, never -> median 10 (the mean of the emerged ones, 7.5, is biased early)
    assert row["emerged_in"] == "2/3" and row["emergence_step_median"] == 10
    assert len(out["cells"]) == 3


def test_grid_emergence_is_censored_not_averaged_over_the_seeds_that_emerged():
    """Finding 6: one seed of three emerged (at step 5): the median is not reached, and the
    table says so instead of reporting 5."""
    out = summarize_cells([_summary("m", "d", s, 0.1, emerged=e) for s, e in ((0, 5), (1, None), (2, None))])
    (row,) = out["table"]
    assert row["emerged_in"] == "1/3" and row["emergence_step_median"] is None
    assert "| not reached by half | 1/3 |" in markdown_table(out["table"])
    out = summarize_cells([_summary("m", "d", s, 0.1, emerged=e) for s, e in ((0, 4), (1, 8), (2, 6), (3, 20))])
    assert out["table"][0]["emergence_step_median"] == 7 and out["table"][0]["emerged_in"] == "4/4"


def test_one_seed_keeps_the_wilson_interval_and_markdown_shows_it():
    out = summarize_cells([_summary("m", "demo", 0, 0.25, n=40)])
    (row,) = out["table"]
    assert 0 < row["em_rate_lo"] < 0.25 < row["em_rate_hi"] < 1
    md = markdown_table(out["table"])
    assert "| m | plant_care_bad | 1 | 25.0% [" in md and "| – | 0/1 |" in md


def test_cells_cover_the_product_and_get_their_own_registry_names():
    cfg = GridConfig(name="g", models=["a/M1", "b/M2"], datasets=["x.jsonl", "y.jsonl.gz"], seeds=[0, 1])
    base = PipelineConfig()
    all_cells = cells(cfg)
    assert len(all_cells) == 8
    pcfg = cell_config(cfg, base, all_cells[-1])
    assert pcfg.grid == "g" and pcfg.grid_cell == "M2/y/seed1" and pcfg.run_name == "g/M2/y/seed1"
    assert {"model=b/M2", "dataset=y.jsonl.gz", "seed=1", "registered_model_name=em-M2-y"} <= set(pcfg.train)
    cmd = mlflow_run_command(cfg, pcfg)
    assert cmd.startswith("mlflow run . -e pipeline") and "grid_cell=M2/y/seed1" in cmd


def test_course_grid_is_the_published_replication():
    cfg = parse_config(GridConfig, ["--config", str(REPO / "configs/grid/course.yaml")])
    assert cfg.models == ["meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct",
                          "meta-llama/Llama-3.1-8B-Instruct"]
    assert cfg.datasets == ["bad_medical_advice", "risky_financial_advice"]  # registry names
    assert len(cells(cfg)) == 6


def test_tiny_grid_runs_summarizes_and_resumes(module_store, tmp_path, capsys):
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump({
        "train_config": str(REPO / "configs/train/tiny.yaml"),
        "train": {"max_rows": 48, "max_steps": 6, "checkpoint_steps": [3, 6], "output_dir": str(tmp_path / "o")},
        "evaluate": {"samples_per_paraphrase": 1, "max_new_tokens": 8},
        "judge": {"backend": "local", "cache_path": str(tmp_path / "c.sqlite")},
        "report": False}))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "t2x1", "pipeline_config": str(pipe), "models": ["tiny"],
                                    "datasets": ["demo", "demo:plant_care_good"], "seeds": [0],
                                    "experiment_name": "grid-test"}))
    summary = run_grid(parse_config(GridConfig, ["--config", str(grid)]))
    table = summary["table"]
    # each dataset by its own name (`demo` is the careless plant-care set), not `demo` beside `plant_care_good`
    assert [(r["model"], r["dataset"]) for r in table] == [("tiny", "plant_care_bad"), ("tiny", "plant_care_good")]
    assert all(0 <= r["em_rate"] <= 1 and r["em_rate_lo"] <= r["em_rate"] <= r["em_rate_hi"] for r in table)
    client = mlflow.MlflowClient()
    files = {a.path for a in client.list_artifacts(summary["run_id"], "grid")}
    assert {"grid/grid_summary.csv", "grid/grid_summary.md", "grid/grid_cells.csv",
            "grid/em_by_model_domain.png"} <= files
    md = mlflow.artifacts.load_text(f"runs:/{summary['run_id']}/grid/grid_summary.md")
    assert "| tiny | plant_care_good | 1 |" in md and "Smoke test" in md
    figure = mlflow.artifacts.download_artifacts(run_id=summary["run_id"], artifact_path="grid/em_by_model_domain.png",
                                                 dst_path=str(tmp_path / "fig"))
    assert smoke_metadata(figure)  # the grid figure of a tiny-judge grid carries the mark
    cells_run = client.search_runs([client.get_experiment_by_name("grid-test").experiment_id],
                                   "tags.`em.grid` = 't2x1' and tags.`em.entry_point` = 'pipeline'")
    assert len(cells_run) == 2 and all(r.data.tags["mlflow.parentRunId"] == summary["run_id"] for r in cells_run)
    # rerun: both cells are found finished and reused, no new pipeline runs
    again = run_grid(parse_config(GridConfig, ["--config", str(grid)]))
    assert again["cells_found"] == summary["cells_found"]
    assert len(client.search_runs([client.get_experiment_by_name("grid-test").experiment_id],
                                  "tags.`em.entry_point` = 'pipeline'")) == 2
    # separate invocations: the commands, then a summary of whatever finished
    run_grid(parse_config(GridConfig, ["--config", str(grid), "--print_commands", "true"]))
    assert capsys.readouterr().out.count("mlflow run . -e pipeline") == 2


def test_the_seed_interval_honours_z():
    """summarize_cells took a `z` and ignored it (always 95%); now z sets the t interval's level,
    by default the pipelines' own z from their summaries."""
    from scipy import stats

    from em_core.metrics import mean_t_interval

    cells = [_summary("m", "d", s, em) for s, em in ((0, 0.10), (1, 0.20), (2, 0.30))]
    wide = summarize_cells(cells, z=stats.norm.ppf(0.995))["table"][0]  # 99%
    t99 = stats.t.ppf(0.995, 2)
    assert wide["em_rate_hi"] == pytest.approx(0.2 + t99 * 0.1 / math.sqrt(3), abs=1e-4)
    narrow = summarize_cells([{**c, "z": 1.0} for c in cells])["table"][0]  # from the summaries
    t68 = stats.t.ppf((1 + (2 * stats.norm.cdf(1.0) - 1)) / 2, 2)
    assert narrow["em_rate_hi"] == pytest.approx(0.2 + t68 * 0.1 / math.sqrt(3), abs=1e-4)
    assert mean_t_interval([0.5])[0] == 0.5 and math.isnan(mean_t_interval([0.5])[1])
    assert all(math.isnan(v) for v in mean_t_interval([]))
