"""The package layout is a checked contract: `lint-imports` (import-linter, configured in
pyproject.toml) fails on an import cycle or an import from a higher layer."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _lint(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or pytest.fail("lint-imports missing: pip install -e '.[dev]'")
    return subprocess.run([exe, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_layers_and_no_cycles() -> None:
    proc = _lint()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The contract has teeth: a copy of the package where data imports experiments is refused."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "em_core", copy / "em_core")
    shutil.copytree(REPO / "entrypoints", copy / "entrypoints")
    shutil.copytree(REPO / "em_lab", copy / "em_lab")
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    bad = copy / "em_core" / "data" / "transforms.py"
    bad.write_text(bad.read_text() + "\n\ndef _upward():\n    from em_core.experiments import pipeline  # noqa\n")
    exe = shutil.which("lint-imports")
    proc = subprocess.run([exe, "--no-cache"], cwd=copy, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(copy), "PATH": str(Path(sys.executable).parent)})
    assert proc.returncode != 0
    assert "em_core.data.transforms -> em_core.experiments.pipeline" in proc.stdout


def test_em_core_does_not_import_inspect(tmp_path: Path) -> None:
    """The Inspect extra stays optional: em_core importing inspect_ai anywhere but
    data.inspect_logs breaks a contract."""
    copy = tmp_path / "repo"
    for pkg in ("em_core", "entrypoints", "em_lab"):
        shutil.copytree(REPO / pkg, copy / pkg)
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    bad = copy / "em_core" / "metrics.py"
    bad.write_text(bad.read_text() + "\n\ndef _inspect():\n    import inspect_ai  # noqa\n")
    proc = subprocess.run([shutil.which("lint-imports"), "--no-cache"], cwd=copy, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(copy), "PATH": str(Path(sys.executable).parent)})
    assert proc.returncode != 0
    assert "em_core.metrics -> inspect_ai" in proc.stdout
