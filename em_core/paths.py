"""Where things live: the project root, the local MLflow store, caches, shipped resources."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent


def project_file(path: str) -> str:
    """`path` as given when it exists from here, else the project's file of that name (so shipped
    configs resolve from any working directory, e.g. under `mlflow run`)."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (PROJECT_ROOT / p).exists():
        return str(PROJECT_ROOT / p)
    return path


def resource_path(*parts: str) -> Path:
    return PACKAGE_DIR.joinpath("resources", *parts)


def cache_dir() -> Path:
    """EM_LAB_CACHE, else $XDG_CACHE_HOME/em-lab, else ~/.cache/em-lab."""
    env = os.environ.get("EM_LAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "em-lab"


def work_root() -> Path:
    """Where the local MLflow store and training outputs go by default: the checkout when em_core
    runs from one (PROJECT_ROOT holds MLproject), else the current directory -- an installed wheel
    never writes into site-packages."""
    return PROJECT_ROOT if (PROJECT_ROOT / "MLproject").is_file() else Path.cwd()


def mlruns_dir() -> Path:
    """The default local MLflow store: `mlruns/` under work_root(), or EM_LAB_MLRUNS."""
    return Path(os.environ.get("EM_LAB_MLRUNS") or work_root() / "mlruns").resolve()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing): serialises work that
    several processes may start at once, such as building a cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
