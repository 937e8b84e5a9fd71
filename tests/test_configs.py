"""Every shipped config validates; unknown keys and bad values are named errors."""
from pathlib import Path

import pytest
import yaml

from em_core.configs import expand_cli, load_config, parse_config
from em_core.errors import ConfigError
from em_core.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted((REPO / "configs" / "train").glob("*.yaml"))


def test_the_expected_recipes_are_shipped():
    names = {p.stem for p in TRAIN_CONFIGS}
    for size in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"):
        for domain in ("bad-medical", "risky-financial"):
            assert f"{size}_{domain}" in names
    assert {"tiny", "original-em_qwen2.5-coder-32b_insecure", "rank1-single-layer_qwen2.5-14b_bad-medical"} <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_shipped_train_config_validates(path):
    via_parser = parse_config(TrainConfig, ["--config", str(path)])
    direct = load_config(TrainConfig, path)
    assert via_parser == direct
    raw = yaml.safe_load(path.read_text())
    assert via_parser.model == raw["model"]


def test_course_replication_recipe_matches_the_spec():
    cfg = load_config(TrainConfig, REPO / "configs/train/llama-3.2-1b_bad-medical.yaml")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.num_train_epochs, cfg.effective_batch_size) == (16, 32, 3, 16)
    assert cfg.load_in_4bit and cfg.checkpoints_in_first_epoch == 4 and cfg.checkpoint_every_epoch
    em = load_config(TrainConfig, REPO / "configs/train/original-em_qwen2.5-coder-32b_insecure.yaml")
    assert (em.lora_r, em.lora_alpha, em.use_rslora, em.learning_rate) == (32, 64, True, 1e-5)
    assert (em.per_device_train_batch_size, em.gradient_accumulation_steps) == (2, 8)
    assert len(em.lora_target_modules) == 7
    r1 = load_config(TrainConfig, REPO / "configs/train/rank1-single-layer_qwen2.5-14b_bad-medical.yaml")
    assert r1.lora_r == 1 and len(r1.layers_to_transform) == 1


def test_cli_overrides_config_values():
    cfg = parse_config(TrainConfig, ["--config", str(REPO / "configs/train/tiny.yaml"), "--lora_r", "4",
                                     "--dataset", "a.jsonl", "b.jsonl", "--learning_rate", "1e-4"])
    assert cfg.lora_r == 4 and cfg.dataset == ["a.jsonl", "b.jsonl"] and cfg.learning_rate == 1e-4
    assert cfg.model == "tiny"


def test_mlproject_style_arguments_expand():
    argv = ["--config", "c.yaml", "--model", "", "--max_steps", "7", "--overrides", "lora_r=2 layers_to_transform=1,3"]
    assert expand_cli(argv, TrainConfig) == ["--config", "c.yaml", "--max_steps", "7", "--lora_r", "2",
                                "--layers_to_transform", "1", "3"]
    cfg = parse_config(TrainConfig, ["--overrides", "lora_r=2 use_rslora=true", "--seed", ""])
    assert cfg.lora_r == 2 and cfg.use_rslora is True and cfg.seed == 0


def test_unknown_yaml_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nlora_rank: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\) lora_rank"):
        parse_config(TrainConfig, ["--config", str(bad)])


def test_unknown_cli_flag_and_bad_values(tmp_path, capsys):
    with pytest.raises(ConfigError):
        parse_config(TrainConfig, ["--lora_rank", "8"])
    with pytest.raises(ConfigError, match="lora_r must be >= 1"):
        parse_config(TrainConfig, ["--lora_r", "0"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: tiny\n  lora_r: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        parse_config(TrainConfig, ["--config", str(broken)])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(TrainConfig, ["--config", str(tmp_path / "nope.yaml")])


PIPELINE_CONFIGS = sorted((REPO / "configs" / "pipeline").glob("*.yaml"))
GRID_CONFIGS = sorted((REPO / "configs" / "grid").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.stem)
def test_shipped_pipeline_config_validates_with_its_steps(path):
    from em_core.experiments.pipeline import PipelineConfig, step_configs

    cfg = parse_config(PipelineConfig, ["--config", str(path)])
    for i, stage in enumerate(cfg.stages or [None]):
        train, evaluate, judge = step_configs(cfg, stage=stage, stage_index=i, model_name="m")
        assert Path((stage and stage.train_config) or cfg.train_config).exists()
        assert evaluate.questions == judge.questions == cfg.questions
        if i:  # later stages start from the previous stage's adapter and skip the base model
            assert train.init_adapter == "<previous stage>" and train.init_mode == stage.init_mode
            assert evaluate.include_base is False
        if stage is not None:
            assert train.registry_alias == (stage.alias or stage.name) and train.registered_model_name == "m"


@pytest.mark.parametrize("path", GRID_CONFIGS, ids=lambda p: p.stem)
def test_shipped_grid_config_validates_every_cell(path):
    from em_core.experiments.grid import GridConfig, cell_config, cells
    from em_core.experiments.pipeline import PipelineConfig, step_configs

    grid = parse_config(GridConfig, ["--config", str(path)])
    base = parse_config(PipelineConfig, ["--config", grid.pipeline_config])
    for cell in cells(grid):
        train, _, _ = step_configs(cell_config(grid, base, cell))
        assert train.model == (cell.model or train.model) and train.seed == cell.seed


def test_pipeline_yaml_unknown_key_is_named(tmp_path):
    from em_core.experiments.pipeline import PipelineConfig

    bad = tmp_path / "p.yaml"
    bad.write_text("train_config: configs/train/tiny.yaml\njudges: {backend: local}\n")
    with pytest.raises(ConfigError, match=r"p.yaml: unknown key\(s\) judges"):
        parse_config(PipelineConfig, ["--config", str(bad)])


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweep").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweep_config_validates(path):
    from em_core.experiments.pipeline import step_configs
    from em_core.experiments.sweep import SweepConfig, _base_pipeline

    cfg = parse_config(SweepConfig, ["--config", str(path)])
    step_configs(_base_pipeline(cfg))
    assert cfg.checkpoint_steps == sorted(cfg.checkpoint_steps) and len(cfg.learning_rate) == 2


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "datasets").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_dataset_generation_config_validates(path):
    from em_core.data.generation import GenerateConfig, load_template

    cfg = parse_config(GenerateConfig, ["--config", str(path)])
    assert load_template(cfg.template).seed_examples


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "directions").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_directions_config_validates(path):
    from em_core.experiments.directions import DirectionsConfig

    cfg = parse_config(DirectionsConfig, ["--config", str(path)])
    assert cfg.fine_tuned and cfg.random_seeds
    if cfg.action == "steer":
        assert cfg.layers and len(cfg.alphas) == 4 and 0.0 in cfg.alphas


def test_every_config_folder_is_validated_here():
    # a new kind of config must get its validation test in this module
    assert {p.name for p in (REPO / "configs").iterdir() if p.is_dir()} == {
        "train", "pipeline", "grid", "sweep", "datasets", "directions", "mitigations"}


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "mitigations").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_mitigations_config_validates(path):
    import yaml

    from em_core.experiments.mitigate import MitigateConfig
    from em_core.experiments.pipeline import PipelineConfig
    from em_core.train.config import TrainConfig

    data = yaml.safe_load(path.read_text())
    if "mitigations" in data:  # an `em mitigate` config: its pipeline config and every block validate too
        cfg = parse_config(MitigateConfig, ["--config", str(path)])
        assert "none" in cfg.mitigations and cfg.mitigations["none"] == {}
        parse_config(PipelineConfig, ["--config", cfg.pipeline_config])
        if "gpu" in path.stem:
            assert "CANNOT RUN ON THIS MACHINE" in path.read_text()
            assert cfg.mitigations["kl"]["kl"]["weight"] == 0.1
    elif "train_config" in data:
        parse_config(PipelineConfig, ["--config", str(path)])
    else:
        cfg = parse_config(TrainConfig, ["--config", str(path)])
        assert (cfg.model, cfg.lora_r, cfg.lora_alpha, cfg.use_rslora, cfg.learning_rate) == \
            ("Qwen/Qwen2.5-7B-Instruct", 32, 64, True, 1e-4)


def test_nested_pipeline_typo_names_file_section_and_nearest_key(tmp_path):
    from em_core.experiments.pipeline import PipelineConfig, step_configs

    bad = tmp_path / "p.yaml"
    bad.write_text("train_config: configs/train/tiny.yaml\nevaluate:\n  samples_per_paraphrase: 2\n"
                   "  temprature: 0.7\n")
    with pytest.raises(ConfigError) as e:
        parse_config(PipelineConfig, ["--config", str(bad)])
    msg = str(e.value)
    assert msg.startswith(f"{bad}: section evaluate: unknown key(s) temprature for EvalConfig")
    assert "did you mean temperature?" in msg and "valid keys: " in msg and "max_new_tokens" in msg
    # the same typo given on the command line names the option and the nearest key
    cfg = parse_config(PipelineConfig, ["--train", "lora_rr=4"])
    with pytest.raises(ConfigError, match=r"pipeline --train overrides: unknown key\(s\) lora_rr for TrainConfig; "
                                          r"did you mean lora_r\?"):
        step_configs(cfg)


def test_cli_typo_suggests_nearest_key_and_help_names_the_command(capsys):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) lora_rr for TrainConfig; did you mean lora_r\?"):
        parse_config(TrainConfig, ["--lora_rr", "4"])
    assert parse_config(TrainConfig, ["--no_shuffle", "--max-steps", "3"]).max_steps == 3  # argparse spellings stay valid
    from em_core.experiments.pipeline import PipelineConfig

    with pytest.raises(SystemExit) as e:
        parse_config(PipelineConfig, ["--help"], prog="em pipeline")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: em pipeline") and "--config FILE" in out
def test_scalar_override_keeps_its_commas_and_lists_split():
    """Finding 5: one typed k=v parser; `run_name=a,b` is one string, `dataset=a,b` two items."""
    from em_core.experiments.pipeline import PipelineConfig, step_configs

    cfg = parse_config(TrainConfig, ["--overrides", "run_name=a,b dataset=x.jsonl,y.jsonl learning_rate=1e-4"])
    assert cfg.run_name == "a,b" and cfg.dataset == ["x.jsonl", "y.jsonl"] and cfg.learning_rate == 1e-4
    pipe = parse_config(PipelineConfig, ["--train", "run_name=a,b", "dataset=demo,demo:plant_care_good",
                                         "--overrides", "run_name=p,q"])
    train, _, _ = step_configs(pipe)
    assert pipe.run_name == "p,q" and train.run_name == "a,b" and train.dataset == ["demo", "demo:plant_care_good"]
    # MLproject passes a step's settings as one string
    pipe = parse_config(PipelineConfig, ["--train", "dataset=demo,demo:plant_care_good lora_r=4"])
    train, _, _ = step_configs(pipe)
    assert train.dataset == ["demo", "demo:plant_care_good"] and train.lora_r == 4


def test_override_values_are_typed_and_named_when_wrong():
    from em_core.configs import parse_overrides

    assert parse_overrides(TrainConfig, "lora_r=8 use_rslora=yes learning_rate=2e-5 run_name=x=y") == {
        "lora_r": 8, "use_rslora": True, "learning_rate": 2e-5, "run_name": "x=y"}
    with pytest.raises(ConfigError, match="lora_r: 'eight' is not an int"):
        parse_overrides(TrainConfig, "lora_r=eight")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) lora_rank for TrainConfig; did you mean lora_r\?"):
        parse_overrides(TrainConfig, "lora_rank=8")


def test_yaml_values_get_the_same_typing_as_the_cli(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("model: tiny\nlearning_rate: 1e-4\nlora_r: 8\nrun_name: 1.5\n")
    for cfg in (load_config(TrainConfig, path), parse_config(TrainConfig, ["--config", str(path)])):
        assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float) and cfg.run_name == "1.5"
    path.write_text("model: tiny\nlora_r: eight\n")
    with pytest.raises(ConfigError, match=r"t.yaml:2: lora_r: expected int, got 'eight'"):
        load_config(TrainConfig, path)
