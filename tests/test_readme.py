"""The README's commands and snippets work as written (they are read from README.md, so they
cannot drift from what is tested)."""
import os
import re
import sys
from pathlib import Path

from em_core.train.training import train
from tests.conftest import tiny_train_config
from tests.proc import run as proc_run

REPO = Path(__file__).resolve().parents[1]


def readme_snippet(after: str) -> str:
    """The first ```python block after the line containing `after`."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(after)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_load_back_snippet_runs_as_written_from_a_fresh_folder(mlflow_store, tmp_path, monkeypatch):
    code = readme_snippet("Load it back")
    name = re.search(r'"models:/([^@"]+)@final"', code).group(1)
    train(tiny_train_config(tmp_path, max_rows=16, max_steps=2, checkpoint_steps=[2], registered_model_name=name))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env.update(EM_LAB_MLRUNS=str(mlflow_store), PYTHONPATH=str(REPO))  # a user's store, found without setup
    check = code + "\nimport peft\nprint(isinstance(model, peft.PeftModel), sorted(model.peft_config))\n"
    proc = proc_run([sys.executable, "-c", check], env=env, cwd=fresh, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "True ['default']"
    assert list(fresh.iterdir()) == []  # no stray ./mlflow.db or ./mlruns
