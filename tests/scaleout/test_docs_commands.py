"""The scale-out docs' commands run as written: parsed from the fenced blocks of
docs/scale-out.md and docs/sweep.md, the hosts of the examples pointed at this machine's
services. The heavy ones run for real, at small size, in test_faults.py (`em sweep --config
... --storage $STORAGE` with PGUSER, `em grid ... --launcher ray --ray_address ...`); here every
`em` command must pass the command-line guard and parse, the documented storage URL must reach
PostgreSQL with the credentials from PGUSER/PGPASSWORD, and the Slurm command must write its
script. A storage that stays down ends in one named line."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "docs/scale-out.md", REPO / "docs/sweep.md"]


def doc_commands(path: Path) -> tuple[list[list[str]], dict[str, str]]:
    """(`em ...` commands as argv, shell variables assigned) of a markdown file's bash blocks."""
    commands, variables = [], {}
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if words[0] == "export":
                words = words[1:]
            if all(re.fullmatch(r"[A-Z_]+=.*", w) for w in words):
                variables.update(w.split("=", 1) for w in words)
            part: list[str] = []
            for w in [*words, "&&"]:
                if w in ("&&", "||", ";", "|"):
                    if part and part[0] == "em":
                        commands.append(part)
                    part = []
                else:
                    part.append(w)
    return commands, variables


def _expand(argv: list[str], variables: dict[str, str]) -> list[str]:
    return [re.sub(r"\$([A-Z_]+)", lambda m: variables[m.group(1)], a) for a in argv]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_documented_em_command_passes_the_guard_and_parses(doc, monkeypatch):
    from em_core.configs import parse_config
    from em_core.console import refuse_url_credentials
    from em_core.experiments.grid import GridConfig
    from em_core.experiments.sweep import SweepConfig

    monkeypatch.chdir(REPO)
    commands, variables = doc_commands(doc)
    assert any(c[1] == "sweep" for c in commands)
    if doc.name == "scale-out.md":
        assert any(c[1] == "grid" for c in commands) and variables["STORAGE"].startswith("postgresql://")
    for argv in commands:
        argv = _expand(argv, variables)
        refuse_url_credentials(argv)  # the documented URLs carry no credentials
        kind = {"grid": GridConfig, "sweep": SweepConfig}[argv[1]]
        parse_config(kind, argv[2:])  # every flag and config file exists


def test_the_documented_storage_url_reaches_postgres_with_pguser_and_pgpassword(postgres, monkeypatch, tmp_path):
    import optuna

    from em_core.experiments.study_storage import RetryingRDBStorage, engine_kwargs

    _, variables = doc_commands(REPO / "docs/scale-out.md")
    admin = urlsplit(postgres["optuna"])
    doc = urlsplit(variables["STORAGE"])
    assert doc.username is None and doc.password is None
    url = doc._replace(netloc=f"{admin.hostname}:{admin.port}", path=admin.path).geturl()
    monkeypatch.setenv("PGUSER", admin.username)
    monkeypatch.setenv("PGPASSWORD", admin.password)
    study = optuna.create_study(study_name="docs-url", storage=RetryingRDBStorage(url, engine_kwargs=engine_kwargs(url)),
                                load_if_exists=True)
    assert study.study_name == "docs-url"


def test_the_documented_slurm_command_writes_its_script(tmp_path, monkeypatch, capsys):
    from entrypoints.grid import main

    (argv,) = [c for c in doc_commands(REPO / "docs/scale-out.md")[0] if "--print_commands" in c]
    monkeypatch.chdir(REPO)
    argv = [str(REPO / a) if a.startswith("configs/") else a for a in argv]
    monkeypatch.chdir(tmp_path)
    assert main(argv[2:]) == 0
    script = (tmp_path / "em-grid-course.slurm").read_text()
    assert "#SBATCH --array=0-" in script and "mlflow run . -e pipeline" in script


def test_a_storage_that_stays_down_ends_in_one_named_line(private_postgres, monkeypatch):
    import optuna

    from em_core.experiments.study_storage import RetryingRDBStorage, StudyStorageGone, engine_kwargs

    import psycopg

    monkeypatch.setenv("PGUSER", "emlab")
    with psycopg.connect(private_postgres.url(), autocommit=True) as conn:
        conn.execute("create database optuna")
    url = private_postgres.url("optuna")
    study = optuna.create_study(study_name="gone", storage=RetryingRDBStorage(url, engine_kwargs=engine_kwargs(url)))
    study.enqueue_trial({"x": 1})
    private_postgres.stop()
    monkeypatch.setenv("EM_LAB_STORAGE_RETRY_SECONDS", "3")
    with pytest.raises(StudyStorageGone) as e:
        study.ask()
    msg = str(e.value)
    assert msg.startswith(f"the Optuna storage at {url} went away: OperationalError: connection failed")
    assert "\n" not in msg and "invalid data in the commit" not in msg
    with pytest.raises(StudyStorageGone):  # from now on at once, not after another full wait
        study.trials


def test_the_guard_refuses_passwords_and_web_tokens_but_not_a_database_user_name():
    from em_core.console import url_credentials

    assert not url_credentials("postgresql://db.internal:5432/optuna")
    assert not url_credentials("postgresql://emlab@db.internal/optuna")  # a user name is no secret
    assert url_credentials("postgresql://emlab:pw@db.internal/optuna")
    assert url_credentials("--storage=mysql://u:@db/x")
    assert url_credentials("base_url=https://hf_token@host/v1")  # a token passed as the user
