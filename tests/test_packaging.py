"""What a non-editable install gets: the built wheel holds every file em_core reads at run time
and installs nothing but em_core and em_lab (Inspect's tasks; no top-level `entrypoints`, a PyPI
package's name). Every
other test runs on an editable install, which sees the checkout and would miss both."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The project's wheel, built offline from a copy of the sources (a build in the checkout
    would leave build/ and *.egg-info behind)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("em_core", "em_lab", "entrypoints"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("em_lab-*.whl")
    with zipfile.ZipFile(whl) as z:
        yield z


def _package_files() -> set[str]:
    return {p.relative_to(REPO).as_posix() for p in (REPO / "em_core").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_wheel_holds_every_file_under_em_core(wheel) -> None:
    """Question sets, generation templates, contrast sets, the tiny corpus and the demo data:
    all are read at run time (the contrast sets were missing, so an installed `em probe` failed)."""
    files = _package_files()
    data = {f for f in files if not f.endswith(".py")}
    assert {"em_core/data/contrast_sets/general.yaml", "em_core/data/question_sets/judges.yaml",
            "em_core/resources/tiny_corpus.jsonl"} <= data
    missing = sorted(files - set(wheel.namelist()))
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data]): {missing}"


def test_wheel_installs_only_em_core(wheel) -> None:
    """`entrypoints/` stays in the checkout for MLproject; installed, it would shadow the PyPI
    package `entrypoints` (a dependency of common tools). `em_lab` is installed on purpose:
    Inspect names tasks after their package (`inspect eval em_lab/core_misalignment`)."""
    names = wheel.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"em_core", "em_lab"}
    assert not any(n.startswith("entrypoints") for n in names)
    info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert sorted(wheel.read(info).decode().split()) == ["em_core", "em_lab"]
    scripts = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "em = em_core.cli:main" in scripts and "em_lab = em_lab._registry" in scripts


def test_cli_reaches_every_step_through_em_core() -> None:
    """`em <step>` imports only em_core modules, so it works where entrypoints/ is absent."""
    import importlib

    from em_core.cli import COMMANDS

    for cmd, target in COMMANDS.items():
        module, func = target.split(":")
        assert module.split(".")[0] == "em_core", cmd
        assert callable(getattr(importlib.import_module(module), func)), cmd


def test_outside_a_checkout_stores_and_outputs_go_to_the_working_directory(tmp_path, monkeypatch) -> None:
    """Installed from the wheel, PROJECT_ROOT is site-packages: the default `mlruns/` and training
    `outputs/` go under the current directory instead; in a checkout they stay in the checkout."""
    from em_core import paths

    monkeypatch.delenv("EM_LAB_MLRUNS", raising=False)
    assert paths.work_root() == REPO and paths.mlruns_dir() == REPO / "mlruns"
    site = tmp_path / "site-packages"
    (site / "em_core").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(paths, "PROJECT_ROOT", site)
    monkeypatch.chdir(work)
    assert paths.work_root() == work and paths.mlruns_dir() == work / "mlruns"


def _conda_requirements(conda_file: Path) -> tuple[list[str], list[str]]:
    """The requirements `mlflow run .` installs from conda.yaml, with the project (`.[extras]`)
    expanded into pyproject's dependencies and those extras; and the constraint files it uses."""
    import re

    import tomllib
    import yaml

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = yaml.safe_load(conda_file.read_text())["dependencies"]
    (pip,) = [d["pip"] for d in deps if isinstance(d, dict)]
    reqs, constraints = [], []
    for line in pip:
        if line.startswith("-c "):
            constraints.append(line[3:].strip())
        elif m := re.fullmatch(r"(?:-e )?\.(?:\[([\w,-]+)\])?", line.strip()):
            reqs += project["dependencies"]
            for extra in filter(None, (m.group(1) or "").split(",")):
                reqs += project["optional-dependencies"][extra]
        else:
            reqs.append(line)
    return reqs, constraints


def test_conda_env_installs_every_pin_of_pyproject() -> None:
    """conda.yaml had drifted (no cryptography, no gguf: `mlflow run .` with its default env
    manager built an environment where some entry points fail); now it installs the project."""
    import re

    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs, constraints = _conda_requirements(REPO / "conda.yaml")
    name = lambda r: re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower()
    want = project["dependencies"] + project["optional-dependencies"]["gguf"]
    assert {"cryptography", "gguf"} <= {name(r) for r in want}
    by_name: dict[str, set[str]] = {}
    for r in reqs:
        by_name.setdefault(name(r), set()).add(r.split(";")[0].strip())
    missing = sorted({name(r) for r in want} - set(by_name))
    assert not missing, f"conda.yaml does not install {missing}"
    for r in want:
        assert r.split(";")[0].strip() in by_name.get(name(r), set()), f"conda.yaml does not install {r}"
        assert len(by_name[name(r)]) == 1, f"conda.yaml pins {name(r)} differently: {by_name[name(r)]}"
    for c in constraints:
        assert (REPO / c).is_file(), c
    assert constraints == ["constraints-cpu.txt"]  # torch's pin, as .ci/run installs it


def test_mlproject_entry_points_are_thin_wrappers_of_em_core_commands() -> None:
    """MLproject runs `python -m entrypoints.<step>` from the project root; each wrapper is the
    em_core command `em <step>` runs, nothing more."""
    import importlib
    import re

    from em_core.cli import COMMANDS

    steps = re.findall(r"python -m entrypoints\.(\w+)", (REPO / "MLproject").read_text())
    assert len(steps) >= 8
    for step in steps:
        wrapper = importlib.import_module(f"entrypoints.{step}")
        assert wrapper.main is importlib.import_module(f"em_core.commands.{step}").main, step
        assert COMMANDS[step] == f"em_core.commands.{step}:main", step
