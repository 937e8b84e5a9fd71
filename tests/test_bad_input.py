"""Bad input is refused with an error that names the file, the field and the fix."""
from __future__ import annotations

import csv
import json

import pytest

from em_core.analysis.metrics_cli import main as metrics_main
from em_core.configs import parse_config
from em_core.errors import ConfigError
from em_core.train.config import TrainConfig


@pytest.mark.parametrize("value", [-5, -2, 0])
def test_max_steps_other_than_minus_one_or_positive_is_refused(value):
    with pytest.raises(ConfigError, match=rf"max_steps must be -1 \(train num_train_epochs\) or > 0, not {value}"):
        TrainConfig(max_steps=value)
    assert TrainConfig(max_steps=-1).max_steps == -1 and TrainConfig(max_steps=3).max_steps == 3


def test_max_steps_minus_five_in_yaml_is_refused(tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("model: tiny\nmax_steps: -5\n")
    with pytest.raises(ConfigError, match="max_steps must be -1"):
        parse_config(TrainConfig, ["--config", str(cfg)])


@pytest.mark.parametrize("line, field, expected", [
    ("lora_r: abc", "lora_r", "int"),
    ("learning_rate: fast", "learning_rate", "float"),
    ("shuffle: maybe", "shuffle", "bool"),
    ("lora_target_modules: [q_proj, [k]]", "lora_target_modules", "list[str]"),
    ("max_steps: 2.5", "max_steps", "int"),
])
def test_wrong_yaml_type_names_file_line_field_and_type(tmp_path, line, field, expected):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: tiny\n{line}\nseed: 1\n")
    with pytest.raises(ConfigError) as err:
        parse_config(TrainConfig, ["--config", str(cfg)])
    assert str(err.value).startswith(f"{cfg}:2: {field}: expected {expected}, got ")


def test_yaml_values_the_cli_would_coerce_still_load(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("model: tiny\nlearning_rate: 1e-4\nlora_r: 8\nnum_train_epochs: 2\nshuffle: false\n")
    out = parse_config(TrainConfig, ["--config", str(cfg)])
    assert (out.learning_rate, out.lora_r, out.num_train_epochs, out.shuffle) == (1e-4, 8, 2.0, False)


def test_em_metrics_refuses_a_file_without_any_numeric_score(tmp_path, capsys):
    path = tmp_path / "judged.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question_id", "aligned", "coherent"])
        w.writerows([["q1", "REFUSAL", "high"], ["q2", "CODE", "n/a"]])
    assert metrics_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: none of its 2 rows has numeric 'aligned' and 'coherent' scores" in err
    assert "'REFUSAL'" in err and "em judge" in err


def test_em_metrics_warns_when_most_scores_are_missing(tmp_path, capsys):
    path = tmp_path / "judged.jsonl"
    rows = [{"question_id": "q", "aligned": a, "coherent": 90} for a in (10, "x", "y", None)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert metrics_main([str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "75% of rows have no numeric" in captured.err
    assert json.loads(captured.out)["overall"]["n_scored"] == 1
